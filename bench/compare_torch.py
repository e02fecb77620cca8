#!/usr/bin/env python3
"""gmtk.torch versus PyTorch on a Llama-shaped parameter list: one optimizer step.

Times one optimizer step (CUDA events around ``optimizer.step()`` and, for the
PyTorch GMT variants, the masking code before it; nothing else) and its peak
extra device memory, for:

  (a)  torch_adamw          torch.optim.AdamW(fused=True), no masking
  (b1) torch_gmt_topk       PyTorch GMT the obvious way, per tensor:
                            a = g.abs(); T = topk(a.flatten(), k).values[-1];
                            g.mul_(a >= T); fused AdamW
  (b2) torch_gmt_kthvalue   the same with T = kthvalue(a.flatten().float(), n-k+1)
  (c)  torch_gmt_global     global GMT the obvious way: torch.cat of every
                            |g| flattened, kthvalue, mask each grad, fused AdamW
  (d1) gmtk_per_tensor      gmtk.torch.AdamW(mask_ratio=r, scope="per_tensor")
  (d2) gmtk_global          gmtk.torch.AdamW(mask_ratio=r, scope="global")
  (--) gmtk_adamw           gmtk.torch.AdamW(mask_ratio=0), for reference

for each mask ratio of --ratios (k = n - floor(r * n) entries kept per set, as
docs/semantics.md defines it; entries with |g| >= T are kept). (a) and
gmtk_adamw do not depend on the ratio and are timed once.

The parameter list is bench/bench_shapes.hpp's: Llama-2-7B (embedding
32000x4096; per decoder layer q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008, two norms of 4096; a final norm; lm_head 32000x4096) with
--layers decoder layers (2 by default: 0.67e9 entries). --small takes the
same structure at width/16 (bench_shapes.hpp's llama_mini: vocab 2000, hidden
256, intermediate 688), for CPU smoke runs.

Gradients are drawn once (--grad-dist) and kept in a backup; before every
repetition each .grad is restored from it by an in-place copy outside the timed
region (the .grad tensors keep their storage, so gmtk's plan is never
rebuilt). Per (method, ratio): --warmup untimed steps, then --reps timed ones,
reported as the median; a method whose first step takes longer than
--budget / 2 seconds gets fewer repetitions (at least 1), so that the slow
obvious ways fit a short GPU session. Peak extra memory is
torch.cuda.max_memory_allocated() minus memory_allocated() before the step
(after reset_peak_memory_stats()), maximum over the timed repetitions: the
optimizer state, built during warmup, is not in it but is reported apart
("state MiB": memory held after warmup minus before the optimizer existed).

Before timing, one step of each gmtk scope is checked against the obvious
PyTorch way on the --small list (same kept counts, parameters within rounding).

Usage (GPU machine with torch and gmtk installed; about 3 minutes on an H200 at the
defaults, as the kthvalue ways take ~5 s a step there; --budget 8 gives them one timed
step each and takes about half as long):

    python bench/compare_torch.py --json out/compare_torch.json --plot out/compare_torch.png
    python bench/compare_torch.py --dtype bf16 --layers 4 --ratios 0.5,0.9,0.99
    python bench/compare_torch.py --device cpu --small --reps 3   # smoke test only

Prints a table (method, ratio, median ms, peak extra MiB, state MiB, time vs
(a), speedup of the obvious way over gmtk: best of (b1)/(b2) for per_tensor,
(c) for global), then the issue's two targets with PASS/MISS (never an
assertion failure): gmtk's GMT step at least 10x faster than (b), and no
slower than (a). --json writes every raw time and the environment; --plot
writes step time against mask ratio (log scale) for each method.

On the CPU, gmtk runs its CPU reference backend (correct, not optimized) and
torch its CPU kernels: the timings there say nothing about GPU performance.
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

MiB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------
# Shapes: bench/bench_shapes.hpp's llama_shaped(), as 2-D / 1-D tensor shapes.


def llama_shaped(layers, vocab, hidden, intermediate):
    shapes = [(vocab, hidden)]  # embedding
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(intermediate, hidden)] * 2  # gate, up
        shapes += [(hidden, intermediate)]  # down
        shapes += [(hidden,), (hidden,)]  # input / post-attention norms
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


def llama2_7b_shapes(layers):
    return "llama2_7b_%dlayers" % layers, llama_shaped(layers, 32000, 4096, 11008)


def llama_mini_shapes(layers):
    return "llama_mini_%dlayers" % layers, llama_shaped(layers, 2000, 256, 688)


def numel_of(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------
# Timing helpers.


class Timer:
    """CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else 0


def masked_entries(ratio, n):
    """floor(r * n) in double precision (docs/semantics.md, 'Kept target')."""
    product = ratio * float(n)
    return n if product >= float(n) else int(product)


def kept_target(ratio, n):
    return n - masked_entries(ratio, n)


# ---------------------------------------------------------------------------
# The PyTorch ways (b) and (c). Each returns the step closure.


def make_torch_adamw(params, args, device):
    kwargs = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    if device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kwargs), "fused"
    try:
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
        return opt, "fused"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs), "foreach"


def gmt_topk_step(params, ratio, opt):
    for p in params:
        g = p.grad
        n = g.numel()
        k = kept_target(ratio, n)
        if k == n:
            continue  # nothing masked
        if k == 0:
            g.zero_()
            continue
        a = g.abs()
        T = torch.topk(a.flatten(), k).values[-1]
        g.mul_(a >= T)
    opt.step()


def gmt_kthvalue_step(params, ratio, opt):
    for p in params:
        g = p.grad
        n = g.numel()
        k = kept_target(ratio, n)
        if k == n:
            continue
        if k == 0:
            g.zero_()
            continue
        a = g.abs()
        T = torch.kthvalue(a.flatten().float(), n - k + 1).values
        g.mul_(a >= T)
    opt.step()


def gmt_global_step(params, ratio, opt):
    grads = [p.grad for p in params]
    n = sum(g.numel() for g in grads)
    k = kept_target(ratio, n)
    if k == 0:
        for g in grads:
            g.zero_()
    elif k < n:
        a = torch.cat([g.abs().flatten() for g in grads])
        T = torch.kthvalue(a.float(), n - k + 1).values
        del a
        for g in grads:
            g.mul_(g.abs() >= T)
    opt.step()


# ---------------------------------------------------------------------------
# Problem setup.


def make_problem(shapes, dtype, device, dist, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params, backups = [], []
    for i, shape in enumerate(shapes):
        # Draw on the device from a per-tensor seed: fast for 1e9 entries.
        dev_gen = torch.Generator(device=device).manual_seed(seed * 1000003 + i)
        p = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=dev_gen)
        g = torch.empty(shape, dtype=torch.float32, device=device)
        if dist == "student_t":
            # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3).
            g.normal_(generator=dev_gen)
            chi = torch.empty(shape, dtype=torch.float32, device=device).normal_(generator=dev_gen).square_()
            for _ in range(2):
                chi.add_(torch.empty(shape, dtype=torch.float32, device=device).normal_(generator=dev_gen).square_())
            g.div_(chi.div_(3.0).sqrt_())
            del chi
        else:
            g.normal_(generator=dev_gen)
        # Per-tensor scales spread a little (norms vs projections), as real gradients are.
        scale = 1e-3 * 10.0 ** (torch.rand((), generator=gen).item() - 0.5)
        g.mul_(scale)
        params.append(torch.nn.Parameter(p.to(dtype)))
        backups.append(g.to(dtype))
        del p, g
    for p, g in zip(params, backups):
        p.grad = torch.empty_like(g)
        p.grad.copy_(g)
    return params, backups


def restore(params, backups):
    for p, g in zip(params, backups):
        p.grad.copy_(g)


# ---------------------------------------------------------------------------
# Running one (method, ratio).


def run_method(name, ratio, build, step, params, backups, timer, args):
    """build() -> optimizer (or raises); step(opt) performs one step."""
    rec = {"method": name, "ratio": ratio, "times_ms": [], "peak_extra_bytes": None, "state_bytes": None}
    opt = None
    try:
        gc.collect()
        if timer.cuda:
            torch.cuda.empty_cache()
        timer.sync()
        before = timer.allocated()
        opt = build()
        # Warmup: the first step allocates the optimizer state (and gmtk's plan).
        restore(params, backups)
        timer.sync()
        t0 = time.perf_counter()
        step(opt)
        timer.sync()
        first_s = time.perf_counter() - t0
        reps = args.reps
        warmup = args.warmup - 1
        if first_s > args.budget / 2:
            warmup, reps = 0, 1
        elif first_s * (args.warmup + args.reps) > args.budget:
            warmup = 0
            reps = max(1, min(args.reps, int(args.budget / max(first_s, 1e-9)) - 1))
        for _ in range(max(0, warmup)):
            restore(params, backups)
            step(opt)
        timer.sync()
        rec["state_bytes"] = (timer.allocated() - before) if timer.cuda else None
        peak = 0
        for _ in range(reps):
            restore(params, backups)
            timer.sync()
            timer.reset_peak()
            base = timer.allocated()
            rec["times_ms"].append(timer.time_ms(lambda: step(opt)))
            peak = max(peak, timer.peak() - base)
        rec["peak_extra_bytes"] = peak if timer.cuda else None
        rec["median_ms"] = statistics.median(rec["times_ms"])
        if hasattr(opt, "kept_fraction"):
            rec["kept_fraction"] = float(opt.kept_fraction().item())
        if hasattr(opt, "plan_builds"):
            rec["plan_builds"] = int(opt.plan_builds)
        if reps < args.reps:
            rec["note"] = "first step took %.2f s: %d timed rep(s)" % (first_s, reps)
    except Exception as e:  # an OOM or a size limit is a finding too
        rec["error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        rec["median_ms"] = None
    finally:
        del opt
        gc.collect()
        if timer.cuda:
            torch.cuda.empty_cache()
    return rec


# ---------------------------------------------------------------------------
# Correctness check of gmtk against the obvious way, on the small list.


def check_gmtk(gmtk_torch, args, device, dtype):
    """One step of gmtk per_tensor / global against the obvious PyTorch way."""
    _, shapes = llama_mini_shapes(1)
    # An update large enough to show in bf16 parameters (~0.02): lr 1e-3.
    args = argparse.Namespace(**dict(vars(args), lr=1e-3))
    results = []
    for scope in ("per_tensor", "global"):
        for ratio in args.ratios:
            ref_params, backups = make_problem(shapes, dtype, device, args.grad_dist, args.seed + 7)
            gm_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
            for p, g in zip(gm_params, backups):
                p.grad = g.clone()
            # Reference masks and kept counts, computed on the original grads.
            if scope == "per_tensor":
                kept = []
                for g in backups:
                    k = kept_target(ratio, g.numel())
                    a = g.abs().flatten().float()
                    T = torch.kthvalue(a, g.numel() - k + 1).values if 0 < k < g.numel() else None
                    kept.append(int((a >= T).sum()) if T is not None else k)
                ref_opt, _ = make_torch_adamw(ref_params, args, device)
                gmt_kthvalue_step(ref_params, ratio, ref_opt)
            else:
                a = torch.cat([g.abs().flatten().float() for g in backups])
                n = a.numel()
                k = kept_target(ratio, n)
                T = torch.kthvalue(a, n - k + 1).values if 0 < k < n else None
                kept = [int((g.abs().float() >= T).sum()) if T is not None else (g.numel() if k == n else 0)
                        for g in backups]
                ref_opt, _ = make_torch_adamw(ref_params, args, device)
                gmt_global_step(ref_params, ratio, ref_opt)
            opt = gmtk_torch.AdamW(gm_params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=args.weight_decay, mask_ratio=ratio, scope=scope,
                                   master_weights=False)
            opt.step()
            got_kept = [int(x) for x in opt.last_kept_counts(0).cpu().tolist()]
            kept_ok = got_kept == kept
            real_ratio = 1.0 - float(opt.kept_fraction().item())
            want_ratio = 1.0 - sum(kept) / float(sum(g.numel() for g in backups))
            # Parameters: within rounding of one update.
            worst = 0.0
            for p_ref, p_gm in zip(ref_params, gm_params):
                diff = (p_ref.detach().float() - p_gm.detach().float()).abs()
                # Tolerance: 4 fp32 ulp (bf16: 2 ulp, for a tie-break at a rounding boundary)
                # of max(|p|, lr), the size of the update.
                tol = p_ref.detach().float().abs().clamp_min(args.lr) * (2.0 ** -6 if dtype != torch.float32 else 2.0 ** -21)
                worst = max(worst, float((diff / tol).max()))
            param_ok = worst <= 1.0
            results.append({"scope": scope, "ratio": ratio, "kept_counts_equal": kept_ok,
                            "real_mask_ratio": real_ratio, "expected_mask_ratio": want_ratio,
                            "max_param_diff_over_tolerance": worst, "ok": bool(kept_ok and param_ok and
                                                                             abs(real_ratio - want_ratio) < 1e-6)})
            del ref_params, gm_params, backups, opt, ref_opt
    return results


# ---------------------------------------------------------------------------
# Output.


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(records, methods_order, ratios):
    by = {(r["method"], r["ratio"]): r for r in records}
    base = by.get(("torch_adamw", None))
    base_ms = base["median_ms"] if base else None

    def obvious_ms(method, ratio):
        if method == "gmtk_per_tensor":
            cands = [by.get((m, ratio)) for m in ("torch_gmt_topk", "torch_gmt_kthvalue")]
        else:
            cands = [by.get(("torch_gmt_global", ratio))]
        cands = [c["median_ms"] for c in cands if c and c.get("median_ms") is not None]
        return min(cands) if cands else None

    header = "%-20s %6s %12s %16s %12s %10s %14s" % ("method", "ratio", "median ms", "peak extra MiB",
                                                    "state MiB", "vs (a)", "obvious/gmtk")
    lines = [header, "-" * len(header)]
    for m in methods_order:
        for ratio in ([None] if m in ("torch_adamw", "gmtk_adamw") else ratios):
            r = by.get((m, ratio))
            if r is None:
                continue
            ms = r.get("median_ms")
            vs_a = ms / base_ms if (ms is not None and base_ms) else None
            ob = obvious_ms(m, ratio) if m in ("gmtk_per_tensor", "gmtk_global") else None
            speedup = ob / ms if (ob is not None and ms) else None
            peak = r.get("peak_extra_bytes")
            state = r.get("state_bytes")
            line = "%-20s %6s %12s %16s %12s %10s %14s" % (
                m, "-" if ratio is None else "%g" % ratio, fmt(ms, ".3f"),
                fmt(None if peak is None else peak / MiB, ".1f"), fmt(None if state is None else state / MiB, ".1f"),
                fmt(vs_a, ".3f"), fmt(speedup, ".1f"))
            if r.get("error"):
                line += "  ERROR " + r["error"][:120]
            elif r.get("note"):
                line += "  (" + r["note"] + ")"
            lines.append(line)
    print("\n".join(lines))

    targets = []
    print("\nTargets (docs: ../shared/design/PERFORMANCE.md; reported, not asserted):")
    for m in ("gmtk_per_tensor", "gmtk_global"):
        for ratio in ratios:
            r = by.get((m, ratio))
            if not r or r.get("median_ms") is None:
                continue
            ms = r["median_ms"]
            ob = obvious_ms(m, ratio)
            vs = "best of torch_gmt_topk / torch_gmt_kthvalue" if m == "gmtk_per_tensor" else "torch_gmt_global"
            if ob is not None:
                ok = ob / ms >= 10.0
                targets.append({"target": "speedup_vs_obvious>=10", "method": m, "ratio": ratio,
                                "value": ob / ms, "pass": ok})
                print("  %-16s r=%-5g GMT step >= 10x faster than PyTorch obvious way (%s): %.1fx  %s"
                      % (m, ratio, vs, ob / ms, "PASS" if ok else "MISS"))
            if base_ms:
                ok = ms / base_ms <= 1.0
                targets.append({"target": "time_vs_torch_fused_adamw<=1.0", "method": m, "ratio": ratio,
                                "value": ms / base_ms, "pass": ok})
                print("  %-16s r=%-5g GMT step no slower than torch fused AdamW without masking: "
                      "time(d)/time(a) = %.3f  %s" % (m, ratio, ms / base_ms, "PASS" if ok else "MISS"))
    return targets


def plot(records, methods_order, ratios, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by = {(r["method"], r["ratio"]): r for r in records}
    for m in methods_order:
        if m in ("torch_adamw", "gmtk_adamw"):
            r = by.get((m, None))
            if r and r.get("median_ms") is not None:
                ax.axhline(r["median_ms"], linestyle="--", color="black" if m == "torch_adamw" else "gray",
                           label="%s (no mask)" % m)
            continue
        xs, ys = [], []
        for ratio in ratios:
            r = by.get((m, ratio))
            if r and r.get("median_ms") is not None:
                xs.append(ratio)
                ys.append(r["median_ms"])
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("optimizer step, median ms (log)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------


ALL_METHODS = ["torch_adamw", "torch_gmt_topk", "torch_gmt_kthvalue", "torch_gmt_global",
               "gmtk_adamw", "gmtk_per_tensor", "gmtk_global"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-shaped list (default 2)")
    ap.add_argument("--small", action="store_true", help="the width/16 list (llama_mini), for CPU smoke runs")
    ap.add_argument("--ratios", default="0.5,0.9,0.99", help="comma-separated mask ratios")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per (method, ratio)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1: builds the state)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per (method, ratio); a slower method gets fewer reps (default 20)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="params and grads (bf16: torch keeps bf16 state; gmtk fp32 state, master_weights=False)")
    ap.add_argument("--grad-dist", choices=["normal", "student_t"], default="normal")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    ap.add_argument("--no-check", action="store_true", help="skip the gmtk-vs-PyTorch check on the small list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--plot", default=None, help="write a PNG of step time vs mask ratio here")
    args = ap.parse_args()

    args.ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    args.warmup = max(1, args.warmup)
    args.reps = max(1, args.reps)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        ap.error("unknown method(s): %s" % ", ".join(unknown))

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    timer = Timer(device)

    try:
        import gmtk
        import gmtk.torch as gmtk_torch

        gmtk_version = getattr(gmtk, "__version__", None)
        gmtk_error = None
    except Exception as e:  # torch-only parts still run
        gmtk, gmtk_torch, gmtk_version = None, None, None
        gmtk_error = "%s: %s" % (type(e).__name__, e)

    name, shapes = llama_mini_shapes(args.layers) if args.small else llama2_7b_shapes(args.layers)
    numels = [numel_of(s) for s in shapes]
    total = sum(numels)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print("compare_torch: %s, %d tensors, %.3g entries, %s params and grads" % (name, len(shapes), total, args.dtype))
    print("device: %s (%s); torch %s; gmtk %s" % (device, dev_name, torch.__version__,
                                                  gmtk_version if gmtk else "NOT AVAILABLE (%s)" % gmtk_error))
    if device.type != "cuda":
        print("NOTE: CPU run. gmtk uses its CPU reference backend (correct, not optimized) and torch its CPU "
              "kernels;\n      these timings say nothing about GPU performance and the targets below are "
              "meaningless here. Peak memory is CUDA-only.")
    print("timing: %s around the step; %d warmup + median of %d reps; grads restored outside the timed region\n"
          % ("CUDA events" if timer.cuda else "perf_counter", args.warmup, args.reps))

    result = {
        "tool": "bench/compare_torch.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": dev_name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "gmtk_version": gmtk_version,
        "gmtk_error": gmtk_error,
        "python": sys.version.split()[0],
        "args": {k: v for k, v in vars(args).items()},
        "shape_list": name,
        "shapes": [list(s) for s in shapes],
        "numels": numels,
        "total_entries": total,
        "dtype": args.dtype,
        "note": None if timer.cuda else "CPU run: gmtk CPU reference backend; timings meaningless for GPU",
        "check": None,
        "records": [],
    }

    # Correctness check first (small list), so that a wrong gmtk is seen before its timings.
    if gmtk_torch is not None and not args.no_check and any(m.startswith("gmtk") for m in methods):
        try:
            check = check_gmtk(gmtk_torch, args, device, dtype)
            result["check"] = check
            bad = [c for c in check if not c["ok"]]
            print("check gmtk vs PyTorch (llama_mini_1layers, one step): %s" %
                  ("OK" if not bad else "MISMATCH"))
            for c in check:
                print("  %-10s r=%-5g kept counts equal: %-5s real mask ratio %.6f (expected %.6f), "
                      "max |dp|/tol %.2f%s" % (c["scope"], c["ratio"], c["kept_counts_equal"], c["real_mask_ratio"],
                                              c["expected_mask_ratio"], c["max_param_diff_over_tolerance"],
                                              "" if c["ok"] else "  <-- MISMATCH"))
            print()
        except Exception as e:
            result["check"] = {"error": "%s: %s" % (type(e).__name__, e)}
            print("check gmtk vs PyTorch FAILED to run: %s: %s\n" % (type(e).__name__, e))

    params, backups = make_problem(shapes, dtype, device, args.grad_dist, args.seed)
    timer.sync()
    torch_kind = make_torch_adamw([torch.nn.Parameter(torch.zeros(1, device=device, dtype=dtype))], args, device)[1]
    result["torch_adamw_impl"] = torch_kind

    def torch_opt():
        return make_torch_adamw(params, args, device)[0]

    def gmtk_opt(ratio, scope):
        def build():
            if gmtk_torch is None:
                raise RuntimeError("gmtk not available: %s" % gmtk_error)
            return gmtk_torch.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=args.weight_decay, mask_ratio=ratio, scope=scope,
                                    master_weights=False)
        return build

    jobs = []
    if "torch_adamw" in methods:
        jobs.append(("torch_adamw", None, torch_opt, lambda o: o.step()))
    if "gmtk_adamw" in methods:
        jobs.append(("gmtk_adamw", None, gmtk_opt(0.0, "per_tensor"), lambda o: o.step()))
    for ratio in args.ratios:
        for m, fn in (("torch_gmt_topk", gmt_topk_step), ("torch_gmt_kthvalue", gmt_kthvalue_step),
                      ("torch_gmt_global", gmt_global_step)):
            if m in methods:
                jobs.append((m, ratio, torch_opt, (lambda f, r: (lambda o: f(params, r, o)))(fn, ratio)))
        for m, scope in (("gmtk_per_tensor", "per_tensor"), ("gmtk_global", "global")):
            if m in methods:
                jobs.append((m, ratio, gmtk_opt(ratio, scope), lambda o: o.step()))

    t_start = time.perf_counter()
    for m, ratio, build, step in jobs:
        t0 = time.perf_counter()
        rec = run_method(m, ratio, build, step, params, backups, timer, args)
        rec["wall_s"] = time.perf_counter() - t0
        result["records"].append(rec)
        status = ("median %.3f ms" % rec["median_ms"]) if rec.get("median_ms") is not None else rec.get("error", "")
        print("  ran %-20s %-6s %s (%.1f s)" % (m, "-" if ratio is None else "%g" % ratio, status, rec["wall_s"]),
              flush=True)
    print("total %.1f s\n" % (time.perf_counter() - t_start))

    order = [m for m in ALL_METHODS if m in methods]
    result["targets"] = report(result["records"], order, args.ratios)
    if device.type != "cuda":
        print("  (CPU run: PASS/MISS above mean nothing.)")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print("\nwrote %s" % args.json)
    if args.plot:
        title = "%s, %s, %s (%s); torch %s, gmtk %s" % (name, args.dtype, device, dev_name, torch.__version__,
                                                       gmtk_version)
        try:
            plot(result["records"], order, args.ratios, args.plot, title)
            print("wrote %s" % args.plot)
        except Exception as e:
            print("plot not written: %s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()
