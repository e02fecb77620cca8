"""Tests of gmtk.torch, the drop-in torch.optim optimizers (AdamW, Adam, SGD).

Everything here is derived from the documentation, not from the code:
shared/design/SPEC.md (the contract), docs/semantics.md (selection rule, op
order, step counter) and docs/python.md (section "gmtk.torch").

Three things are compared:

* gmtk.torch, on the device under test (CPU -> gmtk's CPU reference backend);
* `Reference`, a transcription in torch fp32 ops of the per-entry arithmetic
  that docs/semantics.md defines ("Optimizer arithmetic (fp32)": scalars
  computed in double then rounded to fp32, then one IEEE fp32 operation at a
  time in the stated order; the CPU reference is built without FMA
  contraction, "so its results are defined to the bit"). On CPU gmtk must
  equal it bit for bit. Masks are computed here independently (k = n -
  int(r * n), T = k-th largest |g| by sorting, keep |g| >= T).
* torch.optim.AdamW / Adam / SGD (foreach=False, i.e. the single-tensor
  implementation) fed the same masked gradients. torch writes some terms in a
  different but mathematically equal form (exp_avg.lerp_(g, 1 - beta1),
  exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2), add(alpha=) which may use
  an FMA on CPU, addcdiv(value=-step_size)), so it agrees with gmtk only up to
  rounding: see TORCH_ULPS.

Every test runs on CPU; CUDA variants run when torch.cuda.is_available()
and are reported as skipped otherwise.
"""

import copy
import io
import math

import pytest

torch = pytest.importorskip("torch")

import gmtk.torch as gmtk_torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CUDA_ONLY = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA is not available: gmtk's CUDA backend is not exercised")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]

F32 = torch.float32

# Tolerances. A tolerance is either EXACT (bitwise, -0 == +0), or a number of
# fp32 ulps of a scale (see assert_close_tol and compare_to_torch). An
# element-wise relative bound is meaningless here: exp_avg and momentum
# buffers cancel (beta1*m and (1-beta1)*g of opposite signs) and parameters
# cross zero, so a 1-ulp rounding difference of an operand can be a large
# relative difference of a tiny result.
EXACT = "exact"

# gmtk versus torch.optim (single-tensor, foreach=False, fed the same masked
# gradients). The two compute the same real-number formula with different
# roundings: torch writes exp_avg.lerp_(g, 1 - beta1) (m + w*(g - m)) where
# gmtk writes beta1*m + (1-beta1)*g; addcmul's (value*g)*g where gmtk writes
# (1-beta2)*(g*g); add(alpha=), i.e. Adam's g + wd*p and SGD's momentum
# update, which is one FMA on CPU (checked: equal to the fused result on 1e6
# random inputs) where gmtk rounds twice; addcdiv with the scalar cast by the
# kernel; and a CPU sqrt that is not correctly rounded (see sqrt32).
# The bound is TORCH_ULPS ulp of the largest magnitude the tensor has held
# (torch_step records it): a rounding difference is relative to the terms a
# value was computed from, which a cancellation can make much larger than the
# value itself.
# Measured between `Reference` (gmtk's documented op order, which gmtk's CPU
# backend must equal bit for bit) and torch 2.x over every configuration of
# test_twenty_steps_match_reference_and_torch (plus lr 3e-3), 12 model/data
# seeds, at every one of the 20 steps: exp_avg <= 3.1, exp_avg_sq and
# max_exp_avg_sq <= 2.1, momentum_buffer <= 1.8, AdamW/SGD params <= 2.6,
# Adam (L2) params <= 5.4 ulp. Adam's outlier is an entry where g + wd*p
# cancels to ~eps: the update lr*m/(|m|-ish + eps) then amplifies the FMA
# versus two-rounding difference. 16 ulp leaves a 3x margin and is still
# ~2e-6 of the scale, far below any masking, scalar or op-order bug (one
# wrongly masked entry moves a parameter by ~lr).
TORCH_ULPS = 16


def _ref_tol(device):
    """gmtk versus `Reference`.

    CPU: the CPU reference backend is defined to the bit (docs/semantics.md:
    fixed op order, compiled without FMA contraction).
    CUDA: docs/semantics.md bounds CUDA vs the CPU reference by 4 ulp after one
    step; over a sequence such differences compound like torch's, so the bound
    is twice the torch one.
    """
    return EXACT if device == "cpu" else 2 * TORCH_ULPS


def assert_close_tol(actual, expected, tol, msg=""):
    actual = actual.detach()
    expected = expected.detach()
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.cpu().double()
    e = expected.cpu().double()
    if tol == EXACT:
        bad = ~((a == e) | (a.isnan() & e.isnan()))
        assert not bad.any(), (
            f"{msg}: {int(bad.sum())}/{a.numel()} entries differ, max |diff| "
            f"{float((a - e).abs()[bad].max()):.3g} (expected bitwise equality)")
        return
    if a.numel() == 0:
        return
    # ulps of the largest magnitude of the expected tensor
    bound = tol * 2.0 ** -23 * float(e.abs().max())
    diff = float((a - e).abs().max())
    assert diff <= bound, (
        f"{msg}: max |diff| {diff:.3g} > {tol} ulp of max |expected| ({bound:.3g})")


# ----------------------------------------------------------------------------
# Helpers: model, data, selection, bit comparison
# ----------------------------------------------------------------------------


def make_model(device, dtype=F32, seed=0):
    """A few Linear layers with odd shapes (37x19 with bias, 23x37 without, 5x23)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(19, 37),
            torch.nn.Tanh(),
            torch.nn.Linear(37, 23, bias=False),
            torch.nn.Tanh(),
            torch.nn.Linear(23, 5),
        )
    return model.to(device=device, dtype=dtype)


def make_batches(device, steps, seed=1, dtype=F32, batch=8):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 19, generator=gen)
        y = torch.randn(batch, 5, generator=gen)
        out.append((x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)))
    return out


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def threshold_of(absvals, ratio):
    """T for one set of magnitudes (a 1-D float32 tensor) at mask ratio `ratio`.

    docs/semantics.md: k = n - floor(r * n), the product in double (Python's
    int(r * n)); T = k-th largest |g|; T = 0 when nothing is masked (also for
    n = 0); T = +inf when k == 0.
    """
    n = absvals.numel()
    n_masked = int(ratio * n)
    k = n - n_masked
    if n_masked == 0:
        return 0.0
    if k == 0:
        return math.inf
    return float(torch.sort(absvals.float().cpu(), descending=True).values[k - 1])


def select(grads, ratio, scope):
    """Thresholds, keep-masks and kept counts for a group's gradients (None = skipped).

    Returns lists over the gradients that are not None, in order.
    """
    present = [g for g in grads if g is not None]
    mags = [g.detach().abs().float().reshape(-1) for g in present]
    if scope == "per_tensor":
        ts = [threshold_of(m, ratio) for m in mags]
    elif scope == "global":
        t = threshold_of(torch.cat(mags) if mags else torch.zeros(0), ratio)
        ts = [t] * len(mags)
    else:
        raise AssertionError(scope)
    keeps = [g.detach().abs().float() >= t for g, t in zip(present, ts)]
    counts = [int(k.sum()) for k in keeps]
    return ts, keeps, counts


def masked(g, keep):
    """The gradient gmtk's mask-grad mode feeds the optimizer: +0 where masked."""
    return torch.where(keep, g, torch.zeros_like(g))


def bits(t):
    t = t.detach()
    if t.dtype == F32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def assert_same_bits(actual, expected, msg=""):
    assert actual.dtype == expected.dtype, msg
    assert actual.shape == expected.shape, msg
    assert torch.equal(bits(actual).cpu(), bits(expected).cpu()), (
        f"{msg}: bits differ at {int((bits(actual).cpu() != bits(expected).cpu()).sum())} entries")


def check_logging(opt, group, device, ts, counts):
    """last_thresholds / last_kept_counts of one group against our selection."""
    thr = opt.last_thresholds(group)
    kc = opt.last_kept_counts(group)
    assert thr.device.type == device and kc.device.type == device
    assert thr.dtype == F32
    assert kc.dtype == torch.int64
    torch.testing.assert_close(thr.cpu(), torch.tensor(ts, dtype=F32), rtol=0, atol=0)
    torch.testing.assert_close(kc.cpu(), torch.tensor(counts, dtype=torch.int64), rtol=0, atol=0)


def check_kept_fraction(opt, device, kept, total):
    kf = opt.kept_fraction()
    assert isinstance(kf, torch.Tensor)
    assert kf.dim() == 0 and kf.dtype == F32 and kf.device.type == device
    # kept/total as a float32 (1 ulp for an fp32-vs-double division)
    torch.testing.assert_close(kf.cpu(), torch.tensor(kept / total, dtype=F32),
                               rtol=2.0 ** -23, atol=0)


# ----------------------------------------------------------------------------
# Reference: the documented fp32 op order (docs/semantics.md)
# ----------------------------------------------------------------------------

DEFAULTS = {
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, maximize=False),
    "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False),
    "SGD": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                nesterov=False, maximize=False),
}

STATE_KEYS = {
    "AdamW": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "Adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "SGD": ("momentum_buffer",),
}


def sqrt32(x):
    """Correctly rounded fp32 square root (IEEE 754 sqrt, as C's sqrtf).

    torch.sqrt on a CPU float32 tensor is not correctly rounded on every build
    (an AVX512 build of torch 2.x differs from sqrtf in ~0.7% of random
    inputs); the square root of the exactly widened double, rounded to fp32,
    is (double has more than 2*24+2 bits).
    """
    return torch.sqrt(x.double()).float()


class Reference:
    """One param group, stepped with the documented per-entry fp32 arithmetic.

    `params` holds fp32 values (the master weights for 16-bit parameters).
    One step counter for the group, as gmtk's plan has.
    """

    def __init__(self, kind, params, **hp):
        self.kind = kind
        self.hp = dict(DEFAULTS[kind])
        self.hp.update(hp)
        self.params = [p.detach().float().clone() for p in params]
        self.t = 0
        self.state = []
        for p in self.params:
            st = {}
            if kind in ("AdamW", "Adam"):
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
                if self.hp["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
            elif self.hp["momentum"] != 0:
                st["momentum_buffer"] = torch.zeros_like(p)
            self.state.append(st)

    def step(self, grads, keeps, mode="grad", inv_scale=None):
        """grads: stored gradients (None = skipped); keeps: one per non-None grad."""
        self.t += 1
        t = self.t
        hp = self.hp
        keep_iter = iter(keeps)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            keep = next(keep_iter)
            dev = p.device

            def s(x):
                return torch.tensor(x, dtype=F32, device=dev)

            st = self.state[i]
            old_p = p.clone()
            old_st = {k: v.clone() for k, v in st.items()}
            g = g.detach().float()
            if inv_scale is not None:
                g = g * s(inv_scale)
            if mode == "grad":
                g = torch.where(keep, g, torch.zeros_like(g))
            if hp["maximize"]:
                g = -g
            wd = hp["weight_decay"]
            if self.kind in ("AdamW", "Adam"):
                beta1, beta2 = hp["betas"]
                lr = hp["lr"]
                step_size = s(lr / (1.0 - beta1 ** t))
                bc2_sqrt = s(math.sqrt(1.0 - beta2 ** t))
                if wd != 0:
                    if self.kind == "AdamW":
                        p = p * s(1.0 - lr * wd)
                    else:
                        g = g + s(wd) * p
                m = s(beta1) * st["exp_avg"] + s(1.0 - beta1) * g
                v = s(beta2) * st["exp_avg_sq"] + s(1.0 - beta2) * (g * g)
                new = {"exp_avg": m, "exp_avg_sq": v}
                den = v
                if hp["amsgrad"]:
                    den = torch.maximum(st["max_exp_avg_sq"], v)
                    new["max_exp_avg_sq"] = den
                p = p - (step_size * m) / (sqrt32(den) / bc2_sqrt + s(hp["eps"]))
            else:
                if wd != 0:
                    g = g + s(wd) * p
                new = {}
                mom = hp["momentum"]
                if mom != 0:
                    if t == 1:
                        buf = g.clone()
                    else:
                        buf = s(mom) * st["momentum_buffer"] + s(1.0 - hp["dampening"]) * g
                    new["momentum_buffer"] = buf
                    g = g + s(mom) * buf if hp["nesterov"] else buf
                p = p - s(hp["lr"]) * g
            if mode == "freeze":
                p = torch.where(keep, p, old_p)
                new = {k: torch.where(keep, v, old_st[k]) for k, v in new.items()}
            self.params[i] = p
            st.update(new)


def gmtk_opt(kind, params, **kw):
    return getattr(gmtk_torch, kind)(params, **kw)


def torch_opt(kind, params, **hp):
    return getattr(torch.optim, kind)(params, foreach=False, **hp)


def compare_to_reference(opt, params, ref, device, msg):
    tol = _ref_tol(device)
    for i, (p, rp) in enumerate(zip(params, ref.params)):
        assert_close_tol(p.float(), rp, tol, f"{msg}: param {i}")
        st = opt.state[p]
        for key, rv in ref.state[i].items():
            assert key in st, f"{msg}: state {key!r} missing for param {i}"
            assert_close_tol(st[key], rv, tol, f"{msg}: {key} of param {i}")


def _record_magnitudes(topt):
    hist = topt.__dict__.setdefault("_test_max_abs", {})
    for group in topt.param_groups:
        for p in group["params"]:
            items = [("param", p)] + [(k, v) for k, v in topt.state.get(p, {}).items()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0]
            for key, v in items:
                if v.numel():
                    m = float(v.detach().abs().max())
                    hist[(id(p), key)] = max(hist.get((id(p), key), 0.0), m)


def torch_step(topt):
    """topt.step(), recording the largest magnitude each tensor has held.

    A rounding difference is relative to the terms a value is computed from,
    not to the value: m = beta1*m + (1-beta1)*g can cancel to a value far
    below its terms. Those terms are bounded by (about) the largest magnitude
    the tensor held so far, so compare_to_torch scales its bound by that.
    """
    _record_magnitudes(topt)
    out = topt.step()
    _record_magnitudes(topt)
    return out


def compare_to_torch(opt, params, topt, tparams, keys, msg):
    hist = topt.__dict__.get("_test_max_abs", {})

    def check(actual, expected, tp, key, i):
        if expected.numel() == 0:
            return
        scale = max(hist.get((id(tp), key), 0.0), float(expected.detach().abs().max()))
        diff = float((actual.detach().cpu().double() - expected.detach().cpu().double())
                     .abs().max())
        bound = TORCH_ULPS * 2.0 ** -23 * scale
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert diff <= bound, (f"{msg}: {key} of param {i}: max |diff| {diff:.3g} > "
                               f"{TORCH_ULPS} ulp of its largest magnitude ({bound:.3g})")

    for i, (p, tp) in enumerate(zip(params, tparams)):
        check(p, tp, tp, "param", i)
        for key in keys:
            if key in topt.state[tp]:
                check(opt.state[p][key], topt.state[tp][key], tp, key, i)


# ----------------------------------------------------------------------------
# 1. Sequences against the documented op order and against torch.optim
# ----------------------------------------------------------------------------

CONFIGS = {
    "adamw": ("AdamW", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    "adamw_maximize": ("AdamW", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                     weight_decay=0.05, maximize=True)),
    "adam_amsgrad": ("Adam", dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05,
                                  amsgrad=True)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening": ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_twenty_steps_match_reference_and_torch(config, ratio, scope, device):
    kind, hp = CONFIGS[config]
    model = make_model(device)
    tmodel = copy.deepcopy(model)
    params, tparams = list(model.parameters()), list(tmodel.parameters())
    opt = gmtk_opt(kind, params, mask_ratio=ratio, scope=scope, mask_mode="grad", **hp)
    topt = torch_opt(kind, tparams, **hp)
    ref = Reference(kind, params, **hp)
    total = sum(p.numel() for p in params)
    for step, batch in enumerate(make_batches(device, 20), start=1):
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, ratio, scope)
        opt.step()
        ref.step(grads, keeps)
        for tp, g, keep in zip(tparams, grads, keeps):
            tp.grad = masked(g, keep)
        torch_step(topt)

        check_logging(opt, 0, device, ts, counts)
        check_kept_fraction(opt, device, sum(counts), total)
        compare_to_reference(opt, params, ref, device, f"step {step}")
    compare_to_torch(opt, params, topt, tparams, STATE_KEYS[kind], "after 20 steps")
    if kind != "SGD":
        sd = opt.state_dict()
        for i in range(len(params)):
            step_t = sd["state"][i]["step"]
            assert step_t.dtype == F32 and step_t.device.type == "cpu" and step_t.dim() == 0
            assert float(step_t) == 20.0


# ----------------------------------------------------------------------------
# 2. freeze mode
# ----------------------------------------------------------------------------

FREEZE_CONFIGS = ["adamw", "adam_amsgrad", "sgd_nesterov"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("config", FREEZE_CONFIGS)
def test_freeze_keeps_masked_entries_bits(config, scope, device):
    kind, hp = CONFIGS[config]
    ratio = 0.7
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt(kind, params, mask_ratio=ratio, scope=scope, mask_mode="freeze", **hp)
    ref = Reference(kind, params, **hp)
    for step, batch in enumerate(make_batches(device, 6), start=1):
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, ratio, scope)
        before_p = [p.detach().clone() for p in params]
        before_st = [{k: (opt.state[p][k].clone() if k in opt.state.get(p, {})
                          else torch.zeros_like(p))
                      for k in ref.state[i]} for i, p in enumerate(params)]
        opt.step()
        ref.step(grads, keeps, mode="freeze")
        check_logging(opt, 0, device, ts, counts)
        assert any(k.any() for k in keeps) and not all(k.all() for k in keeps)
        for i, (p, keep) in enumerate(zip(params, keeps)):
            frozen = ~keep
            assert torch.equal(bits(p)[frozen], bits(before_p[i])[frozen]), (
                f"step {step}: a masked entry of param {i} changed in freeze mode")
            for key, old in before_st[i].items():
                assert torch.equal(bits(opt.state[p][key])[frozen], bits(old)[frozen]), (
                    f"step {step}: a masked entry of {key} {i} changed in freeze mode")
            if keep.any() and hp.get("weight_decay", 0) != 0:
                # kept entries did move (so the check above is not vacuous)
                assert not torch.equal(bits(p)[keep], bits(before_p[i])[keep])
        compare_to_reference(opt, params, ref, device, f"freeze step {step}")


# ----------------------------------------------------------------------------
# 3. GradScaler
# ----------------------------------------------------------------------------


def _snapshot(opt, params):
    return [(p.detach().clone(),
             {k: v.clone() for k, v in opt.state.get(p, {}).items()
              if isinstance(v, torch.Tensor)})
            for p in params]


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_inf_skips_then_matches_torch(device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ratio, scope = 0.5, "per_tensor"
    model = make_model(device)
    tmodel = copy.deepcopy(model)
    params, tparams = list(model.parameters()), list(tmodel.parameters())
    opt = gmtk_opt("AdamW", params, mask_ratio=ratio, scope=scope, **hp)
    topt = torch_opt("AdamW", tparams, **hp)
    ref = Reference("AdamW", params, **hp)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    tscaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    assert getattr(opt, "_step_supports_amp_scaling", False)

    inject = [False, True, False, False]
    for step, (batch, inf) in enumerate(zip(make_batches(device, len(inject)), inject)):
        opt.zero_grad()
        topt.zero_grad()
        scale = scaler.get_scale()
        assert scale == tscaler.get_scale()
        scaler.scale(loss_of(model, batch)).backward()
        tscaler.scale(loss_of(tmodel, batch)).backward()
        if inf:
            params[2].grad.view(-1)[7] = float("inf")
        grads = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, ratio, scope)
        # torch gets gmtk's scaled gradients, masked (the scales are equal, so
        # the two optimizers see the same inputs even after rounding drift)
        for tp, g, keep in zip(tparams, grads, keeps):
            tp.grad = masked(g, keep)
        before = _snapshot(opt, params)
        applied_before = ref.t

        scaler.step(opt)
        scaler.update()
        _record_magnitudes(topt)
        tscaler.step(topt)
        _record_magnitudes(topt)
        tscaler.update()

        # thresholds are reported in the stored (scaled) gradient's units
        check_logging(opt, 0, device, ts, counts)
        if inf:
            assert float(opt.last_found_inf(0)) != 0.0
            for i, (p, (bp, bst)) in enumerate(zip(params, before)):
                assert_same_bits(p, bp, f"param {i} after an inf step")
                for k, v in bst.items():
                    assert torch.equal(opt.state[p][k].cpu(), v.cpu()) and \
                        opt.state[p][k].dtype == v.dtype, f"state {k} {i} after an inf step"
            sd = opt.state_dict()
            for i in range(len(params)):
                assert float(sd["state"][i]["step"]) == applied_before
            assert scaler.get_scale() == scale * 0.5  # backed off
        else:
            assert float(opt.last_found_inf(0)) == 0.0
            ref.step(grads, keeps, inv_scale=1.0 / scale)
            compare_to_reference(opt, params, ref, device, f"scaled step {step}")
            assert scaler.get_scale() == scale
    assert ref.t == 3
    assert scaler.get_scale() == tscaler.get_scale() == 2.0 ** 9
    compare_to_torch(opt, params, topt, tparams, STATE_KEYS["AdamW"], "GradScaler run")
    sd = opt.state_dict()
    assert all(float(sd["state"][i]["step"]) == 3.0 for i in range(len(params)))


@CUDA_ONLY
def test_cuda_step_does_not_synchronize():
    # docs/python.md: with GradScaler the skip decision stays on the device; a
    # step with an unchanged plan does not synchronize the host. Only torch-side
    # synchronizations are visible to set_sync_debug_mode.
    device = "cuda"
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt("AdamW", params, lr=1e-3, mask_ratio=0.5)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    batches = make_batches(device, 3)
    for i, batch in enumerate(batches):
        opt.zero_grad(set_to_none=False)
        scaler.scale(loss_of(model, batch)).backward()
        if i == 0:  # builds the plan (allowed to synchronize once)
            scaler.step(opt)
            scaler.update()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            opt.kept_fraction()
            opt.last_thresholds(0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        scaler.update()
    assert int(opt.plan_builds) == 1


# ----------------------------------------------------------------------------
# 4. state_dict
# ----------------------------------------------------------------------------


def _roundtrip(sd):
    """What torch.save / torch.load do to a state dict (also: no shared tensors)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _drive(models_and_opts, batches, source_model):
    """Feed the gradients of `source_model` to every (params, opt) pair, then step."""
    src = list(source_model.parameters())
    for batch in batches:
        for params, opt in models_and_opts:
            opt.zero_grad()
        loss_of(source_model, batch).backward()
        grads = [p.grad.detach().clone() for p in src]
        for params, opt in models_and_opts:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for params, opt in models_and_opts:
            if type(opt) in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
                torch_step(opt)
            else:
                opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_state_dict_gmtk_to_torch(kind, device):
    hp = (dict(lr=1e-2, weight_decay=0.1, amsgrad=False) if kind == "AdamW"
          else dict(lr=0.05, momentum=0.9, weight_decay=0.01))
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt(kind, params, mask_ratio=0.0, **hp)
    batches = make_batches(device, 6)
    _drive([(params, opt)], batches[:3], model)

    sd = opt.state_dict()
    assert set(sd["state"]) == set(range(len(params)))
    if kind == "AdamW":
        steps = [sd["state"][i]["step"] for i in range(len(params))]
        for st in steps:
            assert isinstance(st, torch.Tensor)
            assert st.dtype == F32 and st.device.type == "cpu" and st.dim() == 0
            assert float(st) == 3.0
        assert len({id(s) for s in steps}) == len(steps), "one step tensor per parameter"
        # live: one int64 counter on the device, shared by the group
        live = [opt.state[p]["step"] for p in params]
        assert all(s.dtype == torch.int64 and s.device.type == device for s in live)
        assert len({s.data_ptr() for s in live}) == 1
        assert int(live[0]) == 3
    for i in range(len(params)):
        for key in STATE_KEYS[kind]:
            if key == "max_exp_avg_sq":
                continue
            assert sd["state"][i][key].dtype == F32

    tmodel = copy.deepcopy(model)
    tparams = list(tmodel.parameters())
    topt = torch_opt(kind, tparams, **hp)
    topt.load_state_dict(_roundtrip(sd))
    _drive([(params, opt), (tparams, topt)], batches[3:], model)
    compare_to_torch(opt, params, topt, tparams, STATE_KEYS[kind], "gmtk -> torch")
    if kind == "AdamW":
        assert float(topt.state[tparams[0]]["step"]) == 6.0
        assert float(opt.state_dict()["state"][0]["step"]) == 6.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_state_dict_torch_to_gmtk(kind, device):
    hp = (dict(lr=1e-2, weight_decay=0.1) if kind == "AdamW"
          else dict(lr=0.05, momentum=0.9, weight_decay=0.01))
    tmodel = make_model(device)
    tparams = list(tmodel.parameters())
    topt = torch_opt(kind, tparams, **hp)
    batches = make_batches(device, 6)
    _drive([(tparams, topt)], batches[:3], tmodel)

    model = copy.deepcopy(tmodel)
    params = list(model.parameters())
    opt = gmtk_opt(kind, params, mask_ratio=0.0, **hp)
    opt.load_state_dict(_roundtrip(topt.state_dict()))
    for p, tp in zip(params, tparams):
        for key in STATE_KEYS[kind]:
            if key in topt.state[tp]:
                assert_same_bits(opt.state[p][key], topt.state[tp][key], f"loaded {key}")
    _drive([(params, opt), (tparams, topt)], batches[3:], tmodel)
    compare_to_torch(opt, params, topt, tparams, STATE_KEYS[kind], "torch -> gmtk")
    if kind == "AdamW":
        assert float(opt.state_dict()["state"][0]["step"]) == 6.0


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_gmtk_to_gmtk(device):
    hp = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt("AdamW", params, mask_ratio=0.5, scope="global", **hp)
    batches = make_batches(device, 6)
    _drive([(params, opt)], batches[:3], model)
    sd = _roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["mask_ratio"] == 0.5
    assert sd["param_groups"][0]["scope"] == "global"

    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    # constructed with other mask settings: load_state_dict restores the group's
    opt2 = gmtk_opt("AdamW", params2, mask_ratio=0.0, scope="per_tensor", **hp)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["mask_ratio"] == 0.5
    assert opt2.param_groups[0]["scope"] == "global"
    _drive([(params, opt), (params2, opt2)], batches[3:], model)
    for i, (p, p2) in enumerate(zip(params, params2)):
        assert_same_bits(p2, p, f"param {i}")
        for key in STATE_KEYS["AdamW"]:
            assert_same_bits(opt2.state[p2][key], opt.state[p][key], f"{key} {i}")
    torch.testing.assert_close(opt2.last_thresholds(0), opt.last_thresholds(0), rtol=0, atol=0)
    sd2 = opt2.state_dict()
    assert float(sd2["state"][0]["step"]) == 6.0


# ----------------------------------------------------------------------------
# 5. Param group changes; parameters without a gradient
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_group_lr_and_mask_ratio_change_between_steps(scope, device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    model = make_model(device)
    tmodel = copy.deepcopy(model)
    params, tparams = list(model.parameters()), list(tmodel.parameters())
    opt = gmtk_opt("AdamW", params, mask_ratio=0.5, scope=scope, **hp)
    topt = torch_opt("AdamW", tparams, **hp)
    ref = Reference("AdamW", params, **hp)
    schedule = [(1e-2, 0.5, 0.1)] * 2 + [(2e-3, 0.9, 0.1)] * 2 + [(5e-3, 0.0, 0.3)] * 2
    for step, (batch, (lr, ratio, wd)) in enumerate(
            zip(make_batches(device, len(schedule)), schedule), start=1):
        for o in (opt, topt):
            o.param_groups[0]["lr"] = lr
            o.param_groups[0]["weight_decay"] = wd
        opt.param_groups[0]["mask_ratio"] = ratio
        ref.hp["lr"] = lr
        ref.hp["weight_decay"] = wd
        opt.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()
        grads = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, ratio, scope)
        opt.step()
        ref.step(grads, keeps)
        for tp, g, keep in zip(tparams, grads, keeps):
            tp.grad = masked(g, keep)
        torch_step(topt)
        check_logging(opt, 0, device, ts, counts)
        compare_to_reference(opt, params, ref, device, f"step {step} (lr={lr}, r={ratio})")
    compare_to_torch(opt, params, topt, tparams, STATE_KEYS["AdamW"], "schedule")
    # docs/python.md: a plan is rebuilt only when parameters, gradient storage or
    # the set of parameters with a gradient change; hyper-parameters do not.
    assert int(opt.plan_builds) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_add_param_group_starts_its_own_step_count(device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    m1 = make_model(device, seed=0)
    m2 = make_model(device, seed=5)
    t2 = copy.deepcopy(m2)
    p1, p2, tp2 = list(m1.parameters()), list(m2.parameters()), list(t2.parameters())
    opt = gmtk_opt("AdamW", p1, mask_ratio=0.5, **hp)
    ref1 = Reference("AdamW", p1, **hp)
    batches = make_batches(device, 6)
    for batch in batches[:3]:
        opt.zero_grad()
        loss_of(m1, batch).backward()
        grads = [p.grad.detach().clone() for p in p1]
        ref1.step(grads, select(grads, 0.5, "per_tensor")[1])
        opt.step()

    opt.add_param_group({"params": p2, "lr": 3e-3, "mask_ratio": 0.9, "scope": "global"})
    g1 = opt.param_groups[1]
    assert g1["weight_decay"] == 0.1 and g1["mask_mode"] == "grad"  # from the defaults
    ref2 = Reference("AdamW", p2, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.1)
    topt2 = torch_opt("AdamW", tp2, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.1)
    n1, n2 = sum(p.numel() for p in p1), sum(p.numel() for p in p2)
    for step, batch in enumerate(batches[3:], start=4):
        opt.zero_grad()
        (loss_of(m1, batch) + loss_of(m2, batch)).backward()
        grads1 = [p.grad.detach().clone() for p in p1]
        grads2 = [p.grad.detach().clone() for p in p2]
        ts1, keeps1, c1 = select(grads1, 0.5, "per_tensor")
        ts2, keeps2, c2 = select(grads2, 0.9, "global")
        opt.step()
        ref1.step(grads1, keeps1)
        ref2.step(grads2, keeps2)
        for tp, g, keep in zip(tp2, grads2, keeps2):
            tp.grad = masked(g, keep)
        torch_step(topt2)
        check_logging(opt, 0, device, ts1, c1)
        check_logging(opt, 1, device, ts2, c2)
        check_kept_fraction(opt, device, sum(c1) + sum(c2), n1 + n2)
        compare_to_reference(opt, p1, ref1, device, f"old group, step {step}")
        compare_to_reference(opt, p2, ref2, device, f"new group, step {step}")
    compare_to_torch(opt, p2, topt2, tp2, STATE_KEYS["AdamW"], "added group vs fresh torch")
    sd = opt.state_dict()
    ids0, ids1 = sd["param_groups"][0]["params"], sd["param_groups"][1]["params"]
    assert all(float(sd["state"][i]["step"]) == 6.0 for i in ids0)
    assert all(float(sd["state"][i]["step"]) == 3.0 for i in ids1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_param_with_none_grad_is_skipped(scope, device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ratio = 0.5
    model = make_model(device)
    extra = torch.nn.Parameter(torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
                               .to(device))  # never gets a gradient
    tmodel = copy.deepcopy(model)
    params = list(model.parameters()) + [extra]
    tparams = list(tmodel.parameters()) + [torch.nn.Parameter(extra.detach().clone())]
    opt = gmtk_opt("AdamW", params, mask_ratio=ratio, scope=scope, **hp)
    topt = torch_opt("AdamW", tparams, **hp)
    ref = Reference("AdamW", params, **hp)
    extra_before = extra.detach().clone()
    skipped = 2  # the 37x23 weight: no gradient at step 2
    for step, batch in enumerate(make_batches(device, 2), start=1):
        opt.zero_grad()
        loss_of(model, batch).backward()
        if step == 2:
            params[skipped].grad = None
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, ratio, scope)
        before = _snapshot(opt, params)
        opt.step()
        ref.step(grads, keeps)
        keep_iter = iter(keeps)
        for tp, g in zip(tparams, grads):
            tp.grad = None if g is None else masked(g, next(keep_iter))
        torch_step(topt)
        # one entry per parameter that had a gradient, in group order
        check_logging(opt, 0, device, ts, counts)
        assert_same_bits(extra, extra_before, "parameter that never had a gradient")
        if step == 2:
            bp, bst = before[skipped]
            assert_same_bits(params[skipped], bp, "skipped parameter")
            for k in ("exp_avg", "exp_avg_sq"):
                assert_same_bits(opt.state[params[skipped]][k], bst[k], f"skipped {k}")
        for i, p in enumerate(params):
            if grads[i] is None:
                continue
            assert_close_tol(p, ref.params[i], _ref_tol(device), f"step {step}: param {i}")
            assert_close_tol(p, tparams[i], TORCH_ULPS, f"step {step}: param {i} vs torch")
            for k in ("exp_avg", "exp_avg_sq"):
                assert_close_tol(opt.state[p][k], ref.state[i][k], _ref_tol(device),
                                 f"step {step}: {k} of param {i}")


# ----------------------------------------------------------------------------
# 6. Gradient accumulation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_gradient_accumulation_equals_summed_gradient(scope, device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ratio = 0.9
    ma = make_model(device)
    mb = copy.deepcopy(ma)
    pa, pb = list(ma.parameters()), list(mb.parameters())
    opt_a = gmtk_opt("AdamW", pa, mask_ratio=ratio, scope=scope, **hp)
    opt_b = gmtk_opt("AdamW", pb, mask_ratio=ratio, scope=scope, **hp)
    ref = Reference("AdamW", pa, **hp)
    batches = make_batches(device, 6)
    for step in range(3):
        b1, b2 = batches[2 * step], batches[2 * step + 1]
        # A: two micro-batches accumulated by autograd, one step
        opt_a.zero_grad()
        loss_of(ma, b1).backward()
        loss_of(ma, b2).backward()
        # B: the summed gradient set by hand
        opt_b.zero_grad()
        loss_of(mb, b1).backward()
        g1 = [p.grad.detach().clone() for p in pb]
        opt_b.zero_grad()
        loss_of(mb, b2).backward()
        for p, g in zip(pb, g1):
            p.grad = g + p.grad
        grads = [p.grad.detach().clone() for p in pb]
        for p, g in zip(pa, grads):
            assert_same_bits(p.grad, g, "accumulated gradient")
        ts, keeps, counts = select(grads, ratio, scope)  # on the accumulated gradient
        opt_a.step()
        opt_b.step()
        ref.step(grads, keeps)
        check_logging(opt_a, 0, device, ts, counts)
        check_logging(opt_b, 0, device, ts, counts)
        for i, (a, b) in enumerate(zip(pa, pb)):
            assert_same_bits(a, b, f"step {step}: param {i}")
            for k in ("exp_avg", "exp_avg_sq"):
                assert_same_bits(opt_a.state[a][k], opt_b.state[b][k], f"{k} {i}")
        compare_to_reference(opt_a, pa, ref, device, f"accumulated step {step}")


# ----------------------------------------------------------------------------
# 7. Logging: thresholds, kept counts, kept fraction on constructed gradients
# ----------------------------------------------------------------------------


def _params_with_grads(device, grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.linspace(-1, 1, g.numel()).reshape(g.shape).to(device))
        p.grad = g.to(device)
        params.append(p)
    return params


@pytest.mark.parametrize("device", DEVICES)
def test_logging_ties_and_extreme_ratios(device):
    # 20 entries, ratio 0.5 -> k = 10; the 10th largest |g| (2.0) is tied with
    # the 11th and 12th (one of them negative), so 12 are kept (ties kept).
    tied = torch.tensor([5.0, -4.5, 4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.125, 2.0,
                         -2.0, 2.0, 1.0, -0.5, 0.25, 0.125, 0.0, -0.0, 1e-30, 1.5]).reshape(4, 5)
    # 10 distinct entries. The product r * n is taken in double, as Python's
    # int(r * n) (docs/semantics.md): 0.3 * 10 masks 3 (the exact binary value
    # of 0.3 would mask 2); 0.7 * 10 and 0.9 * 10 mask 7 and 9 (a float32 ratio
    # would mask 6 and 8).
    ten = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    cases = [
        (0.5, [tied], [2.0], [12]),
        (0.3, [ten], [4.0], [7]),
        (0.7, [ten], [8.0], [3]),
        (0.9, [ten], [10.0], [1]),
        (0.0, [tied, ten], [0.0, 0.0], [20, 10]),
        (1.0, [tied, ten], [math.inf, math.inf], [0, 0]),
        (0.01, [tied, ten], [0.0, 0.0], [20, 10]),  # int(0.2) == 0: nothing masked
    ]
    for ratio, grads, expect_t, expect_k in cases:
        params = _params_with_grads(device, grads)
        opt = gmtk_opt("AdamW", params, lr=1e-3, mask_ratio=ratio)
        opt.step()
        ts, _, counts = select([p.grad for p in params], ratio, "per_tensor")
        assert ts == expect_t and counts == expect_k  # the test's own selection
        check_logging(opt, 0, device, expect_t, expect_k)
        check_kept_fraction(opt, device, sum(expect_k), sum(g.numel() for g in grads))

    # global scope over both tensors: 30 entries, ratio 0.5 -> k = 15
    params = _params_with_grads(device, [tied, ten])
    opt = gmtk_opt("AdamW", params, lr=1e-3, mask_ratio=0.5, scope="global")
    opt.step()
    ts, _, counts = select([p.grad for p in params], 0.5, "global")
    assert ts == [2.5, 2.5] and counts == [7, 8]
    check_logging(opt, 0, device, ts, counts)
    check_kept_fraction(opt, device, 15, 30)


@pytest.mark.parametrize("device", DEVICES)
def test_small_and_empty_tensors(device):
    # a 0-dim parameter (1 entry), an empty one (0 entries: T = 0, kept 0),
    # and 3 entries at ratio 0.5 (int(1.5) = 1 masked, k = 2)
    grads = [torch.tensor(0.25), torch.zeros(0), torch.tensor([0.5, -0.125, 1.0])]
    params = _params_with_grads(device, grads)
    hp = dict(lr=1e-2, weight_decay=0.1)
    opt = gmtk_opt("AdamW", params, mask_ratio=0.5, **hp)
    ref = Reference("AdamW", params, **hp)
    for _ in range(2):
        gs = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(gs, 0.5, "per_tensor")
        opt.step()
        ref.step(gs, keeps)
        assert ts == [0.0, 0.0, 0.5] and counts == [1, 0, 2]
        check_logging(opt, 0, device, ts, counts)
        check_kept_fraction(opt, device, 3, 4)
        compare_to_reference(opt, params, ref, device, "small tensors")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["grad", "freeze"])
def test_ratio_one_masks_everything(mode, device):
    hp = dict(lr=1e-2, weight_decay=0.1)
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt("AdamW", params, mask_ratio=1.0, mask_mode=mode, **hp)
    ref = Reference("AdamW", params, **hp)
    start = [p.detach().clone() for p in params]
    for batch in make_batches(device, 2):
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = [p.grad.detach().clone() for p in params]
        ts, keeps, counts = select(grads, 1.0, "per_tensor")
        opt.step()
        ref.step(grads, keeps, mode=mode)
        check_logging(opt, 0, device, ts, counts)
        check_kept_fraction(opt, device, 0, sum(p.numel() for p in params))
        compare_to_reference(opt, params, ref, device, f"r=1 {mode}")
    if mode == "freeze":
        for p, s in zip(params, start):
            assert_same_bits(p, s, "freeze with nothing kept")
    # the step counter advances either way (one counter per plan)
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_groups_with_different_scope_mode_and_ratio(device):
    model = make_model(device)
    params = list(model.parameters())
    g0, g1 = params[:2], params[2:]
    hp0 = dict(lr=1e-2, weight_decay=0.1)
    hp1 = dict(lr=3e-3, weight_decay=0.0)
    opt = gmtk_opt("AdamW", [
        dict(params=g0, mask_ratio=0.5, scope="per_tensor", mask_mode="grad", **hp0),
        dict(params=g1, mask_ratio=0.9, scope="global", mask_mode="freeze", **hp1),
    ])
    ref0 = Reference("AdamW", g0, **hp0)
    ref1 = Reference("AdamW", g1, **hp1)
    for step, batch in enumerate(make_batches(device, 4)):
        opt.zero_grad()
        loss_of(model, batch).backward()
        gr0 = [p.grad.detach().clone() for p in g0]
        gr1 = [p.grad.detach().clone() for p in g1]
        ts0, k0, c0 = select(gr0, 0.5, "per_tensor")
        ts1, k1, c1 = select(gr1, 0.9, "global")
        opt.step()
        ref0.step(gr0, k0, mode="grad")
        ref1.step(gr1, k1, mode="freeze")
        check_logging(opt, 0, device, ts0, c0)
        check_logging(opt, 1, device, ts1, c1)
        check_kept_fraction(opt, device, sum(c0) + sum(c1), sum(p.numel() for p in params))
        compare_to_reference(opt, g0, ref0, device, f"group 0 step {step}")
        compare_to_reference(opt, g1, ref1, device, f"group 1 step {step}")


# ----------------------------------------------------------------------------
# 8. 16-bit parameters
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_master_weights_follow_fp32_run(dtype, scope, device):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ratio = 0.5
    m16 = make_model(device, dtype=dtype)
    m32 = copy.deepcopy(m16).float()  # the same values, widened exactly
    p16, p32 = list(m16.parameters()), list(m32.parameters())
    opt16 = gmtk_opt("AdamW", p16, mask_ratio=ratio, scope=scope, master_weights=True, **hp)
    opt32 = gmtk_opt("AdamW", p32, mask_ratio=ratio, scope=scope, **hp)
    ref = Reference("AdamW", p32, **hp)
    for step, batch in enumerate(make_batches(device, 5, dtype=dtype), start=1):
        opt16.zero_grad()
        opt32.zero_grad()
        loss_of(m16, batch).backward()
        grads = [p.grad.detach().clone() for p in p16]
        assert all(g.dtype == dtype for g in grads)
        for p, g in zip(p32, grads):
            p.grad = g.float()  # exact
        ts, keeps, counts = select(grads, ratio, scope)
        opt16.step()
        opt32.step()
        ref.step(grads, keeps)
        check_logging(opt16, 0, device, ts, counts)
        check_logging(opt32, 0, device, ts, counts)
        compare_to_reference(opt32, p32, ref, device, f"fp32 run step {step}")
        for i, (a, b) in enumerate(zip(p16, p32)):
            st = opt16.state[a]
            assert a.dtype == dtype
            master = st["master_param"]
            assert master.dtype == F32 and master.shape == a.shape
            for k in ("exp_avg", "exp_avg_sq"):
                assert st[k].dtype == F32
                assert_close_tol(st[k], opt32.state[b][k], _ref_tol(device),
                                 f"step {step}: {k} of param {i}")
            assert_close_tol(master, b, _ref_tol(device), f"step {step}: master {i}")
            # the 16-bit parameter is the master rounded to nearest-even
            assert_same_bits(a, master.to(dtype), f"16-bit param {i} from master")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_without_master_weights(device):
    # docs/semantics.md: without master weights the 16-bit parameter is read,
    # widened, updated in fp32 and written back rounded to nearest-even; state fp32.
    hp = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ratio = 0.5
    m16 = make_model(device, dtype=torch.bfloat16)
    p16 = list(m16.parameters())
    opt = gmtk_opt("AdamW", p16, mask_ratio=ratio, master_weights=False, **hp)
    ref = Reference("AdamW", p16, **hp)
    for step, batch in enumerate(make_batches(device, 4, dtype=torch.bfloat16), start=1):
        opt.zero_grad()
        loss_of(m16, batch).backward()
        grads = [p.grad.detach().clone() for p in p16]
        ts, keeps, counts = select(grads, ratio, "per_tensor")
        ref.params = [p.detach().float() for p in p16]  # widened 16-bit values
        opt.step()
        ref.step(grads, keeps)
        check_logging(opt, 0, device, ts, counts)
        for i, p in enumerate(p16):
            assert "master_param" not in opt.state[p]
            assert opt.state[p]["exp_avg"].dtype == F32
            assert_close_tol(opt.state[p]["exp_avg"], ref.state[i]["exp_avg"],
                             _ref_tol(device), f"step {step}: exp_avg of param {i}")
            if device == "cpu":
                assert_same_bits(p, ref.params[i].to(torch.bfloat16), f"step {step}: param {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_master_weights_state_dict_round_trip(device):
    # docs/python.md: master_param is part of the state (fp32); a gmtk -> gmtk
    # round trip restores it, so continuing is bit-identical.
    hp = dict(lr=1e-2, weight_decay=0.1)
    m16 = make_model(device, dtype=torch.bfloat16)
    p16 = list(m16.parameters())
    opt = gmtk_opt("AdamW", p16, mask_ratio=0.5, master_weights=True, **hp)
    batches = make_batches(device, 4, dtype=torch.bfloat16)
    _drive([(p16, opt)], batches[:2], m16)
    sd = _roundtrip(opt.state_dict())
    for i in range(len(p16)):
        assert sd["state"][i]["master_param"].dtype == F32
        assert sd["state"][i]["exp_avg"].dtype == F32
    m2 = copy.deepcopy(m16)
    p2 = list(m2.parameters())
    opt2 = gmtk_opt("AdamW", p2, mask_ratio=0.5, master_weights=True, **hp)
    opt2.load_state_dict(sd)
    for p, q in zip(p16, p2):
        assert_same_bits(opt2.state[q]["master_param"], opt.state[p]["master_param"], "loaded")
    _drive([(p16, opt), (p2, opt2)], batches[2:], m16)
    for i, (p, q) in enumerate(zip(p16, p2)):
        assert_same_bits(q, p, f"param {i}")
        for k in ("master_param", "exp_avg", "exp_avg_sq"):
            assert_same_bits(opt2.state[q][k], opt.state[p][k], f"{k} {i}")


# ----------------------------------------------------------------------------
# API surface a torch.optim user relies on
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["AdamW", "Adam", "SGD"])
def test_defaults_match_torch_optim(kind):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = gmtk_opt(kind, [p])
    topt = getattr(torch.optim, kind)([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.Optimizer)
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                "momentum", "dampening", "nesterov"):
        if key in topt.defaults:
            assert opt.defaults[key] == topt.defaults[key], key
            assert opt.param_groups[0][key] == topt.param_groups[0][key], key
    group = opt.param_groups[0]
    assert group["mask_ratio"] == 0
    assert group["scope"] == "per_tensor"
    assert group["mask_mode"] == "grad"
    assert "master_weights" in group


@pytest.mark.parametrize("kwargs", [
    dict(mask_ratio=-0.1), dict(mask_ratio=1.5), dict(mask_ratio=float("nan")),
    dict(scope="bogus"), dict(mask_mode="bogus"),
], ids=["ratio<0", "ratio>1", "ratio-nan", "bad-scope", "bad-mode"])
def test_invalid_group_settings_raise_value_error(kwargs):
    # Raised at construction or at the first step (gmtk.InvalidArgumentError is a
    # ValueError); either way nothing is written.
    model = make_model("cpu")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError):
        opt = gmtk_opt("AdamW", params, lr=1e-2, **kwargs)
        loss_of(model, make_batches("cpu", 1)[0]).backward()
        opt.step()
    for p, b in zip(params, before):
        assert_same_bits(p, b, "after a rejected step")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_in_place_builds_one_plan(device):
    model = make_model(device)
    params = list(model.parameters())
    opt = gmtk_opt("AdamW", params, lr=1e-2, mask_ratio=0.5)
    for batch in make_batches(device, 4):
        opt.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()
        opt.step()
    assert int(opt.plan_builds) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_step_closure_returns_loss(device):
    # torch.optim.Optimizer.step(closure): the closure is re-evaluated and its loss returned
    model = make_model(device)
    opt = gmtk_opt("AdamW", list(model.parameters()), lr=1e-2, mask_ratio=0.5)
    batch = make_batches(device, 1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    expected = loss_of(make_model(device), batch).detach()  # same initial weights
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
