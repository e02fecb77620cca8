"""gmtk's Python binding on the CPU reference backend, against an independent
numpy model of a step (numpy_reference.py, written from the contract only).

The CPU backend defines its results to the bit (docs/semantics.md: fp32 in a
fixed op order, per-step scalars in double rounded to fp32, no FMA), so every
comparison here is bitwise: thresholds, kept counts, found_inf, gradients after
masking, parameters, master weights and optimizer state.

Run: python -m pytest -q python_bindings_optional/tests/test_cpu_backend.py
"""

from __future__ import annotations

import math
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any pytest import mode
import numpy_reference as R  # noqa: E402

try:
    import gmtk
except ImportError:  # pragma: no cover - the reference self-checks still run
    gmtk = None

needs_gmtk = pytest.mark.skipif(gmtk is None, reason="the gmtk package is not installed")

RATIOS = [0.0, 0.3, 0.5, 0.9, 0.99, 1.0]
DTYPES = [R.FLOAT32, R.FLOAT16, R.BFLOAT16]
SCOPES = [R.PER_TENSOR, R.GLOBAL]
MODES = [R.MASK_GRAD, R.MASK_FREEZE]
# Odd sizes, one empty tensor, one single entry.
SIZES = [7, 0, 1, 257, 33, 1000]


# ---------------------------------------------------------------------------
# Helpers: bit comparisons
# ---------------------------------------------------------------------------

def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]).reshape(-1)


def assert_same_bits(actual, expected, what: str):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.size == expected.size, f"{what}: {actual.size} entries, expected {expected.size}"
    ab, eb = bits(actual), bits(expected)
    if not np.array_equal(ab, eb):
        idx = np.flatnonzero(ab != eb)
        i = int(idx[0])
        a_flat, e_flat = actual.reshape(-1), expected.reshape(-1)
        raise AssertionError(
            f"{what}: {idx.size} of {ab.size} entries differ; first at [{i}]: got {a_flat[i]!r} "
            f"(0x{int(ab[i]):x}), expected {e_flat[i]!r} (0x{int(eb[i]):x})")


def assert_thresholds(actual, expected, grad_dtypes, what="thresholds"):
    """Bitwise, except that a NaN threshold of a 16-bit gradient only has to be
    a NaN: how a 16-bit NaN payload widens to fp32 is not part of the contract."""
    actual = np.asarray(actual, dtype=np.float32).reshape(-1)[: len(expected)]
    expected = np.asarray(expected, dtype=np.float32)
    for i, dt in enumerate(grad_dtypes):
        if dt != R.FLOAT32 and np.isnan(expected[i]):
            assert np.isnan(actual[i]), f"{what}[{i}]: got {actual[i]!r}, expected a NaN"
            actual = actual.copy()
            actual[i] = expected[i]
    assert_same_bits(actual, expected, what)


# ---------------------------------------------------------------------------
# Helpers: data
# ---------------------------------------------------------------------------

def nasty_f32(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    """Gradient-like fp32 values with ties, duplicates of both signs, -0/+0 and
    subnormals mixed in (the selection's hard cases)."""
    x = (rng.standard_normal(n) * scale * 10.0 ** rng.uniform(-2, 1, n)).astype(np.float32)
    if n == 0:
        return x
    kind = rng.integers(0, 8, n)
    ties = (rng.integers(-4, 5, n) * 0.25 * scale).astype(np.float32)  # many equal magnitudes
    x = np.where(kind == 1, ties, x)
    x = np.where(kind == 2, -x, x)
    x[kind == 3] = np.float32(-0.0)
    x[kind == 4] = np.float32(0.0)
    sub = (rng.integers(-3, 4, n) * np.float32(1e-45)).astype(np.float32)  # fp32 subnormals, duplicates
    x = np.where(kind == 5, sub, x)
    return x.astype(np.float32)


def nasty(rng, n, dtype, scale=1.0) -> np.ndarray:
    """Stored gradient values for a dtype (bf16 as uint16), with dtype-specific
    subnormals, ties and signed zeros."""
    x = nasty_f32(rng, n, scale)
    if dtype != R.FLOAT32 and n:
        # 16-bit subnormals: fp16's unit is 2^-24 (~6e-8), bf16's 2^-133 (~9.2e-41)
        unit = 2.0 ** -24 if dtype == R.FLOAT16 else 2.0 ** -133
        kind = rng.integers(0, 6, n)
        x = np.where(kind == 0, (rng.integers(-5, 6, n) * unit).astype(np.float32), x).astype(np.float32)
    return R.narrow(x, dtype) if dtype != R.FLOAT32 else x


BUFFERS = ("grad", "param", "master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def tensor_spec(rng, n, *, group=0, grad_dtype=R.FLOAT32, param_dtype=R.FLOAT32, master=False,
                optimizer=R.ADAMW, amsgrad=False, momentum=0.0, state="zeros", params=True):
    spec = dict(group=group, grad_dtype=grad_dtype, param_dtype=param_dtype if params else None)
    spec["grad"] = nasty(rng, n, grad_dtype)
    if not params:
        return spec
    p = nasty_f32(rng, n, 0.5)
    spec["param"] = R.narrow(p, param_dtype) if param_dtype != R.FLOAT32 else p
    if master:
        spec["master_param"] = (R.widen(spec["param"], param_dtype)
                                + (rng.standard_normal(n) * 1e-3).astype(np.float32)).astype(np.float32)

    def st(nonneg=False):
        if state == "zeros":
            return np.zeros(n, np.float32)
        v = (rng.standard_normal(n) * 0.1).astype(np.float32)
        return (v * v).astype(np.float32) if nonneg else v

    if optimizer in (R.ADAMW, R.ADAM):
        spec["exp_avg"] = st()
        spec["exp_avg_sq"] = st(nonneg=True)
        if amsgrad:
            spec["max_exp_avg_sq"] = (spec["exp_avg_sq"] * np.float32(1.5)).astype(np.float32)
    elif momentum != 0:
        spec["exp_avg"] = st()
    return spec


def carved_empty(dtype, shape=(0,)) -> np.ndarray:
    """An empty array with ordinary (non-zero) strides, cut from a real buffer.

    numpy >= 2 gives a freshly allocated empty array zero strides; the binding
    refuses those as "not C-contiguous" (see test_fresh_empty_array_is_accepted,
    which keeps that failure visible). The matrix tests below use carved empties
    so that they test what a 0-entry tensor computes, not that one check."""
    return np.empty(2, dtype)[:0].reshape(shape) if len(shape) == 1 else np.empty((2,) + shape[1:], dtype)[:0]


def own_copy(a: np.ndarray) -> np.ndarray:
    return a.copy() if a.size else carved_empty(a.dtype, a.shape)


def copy_arrays(spec):
    return {k: own_copy(spec[k]) for k in BUFFERS if spec.get(k) is not None}


# ---------------------------------------------------------------------------
# Helpers: the binding and the reference side by side
# ---------------------------------------------------------------------------

def g_group(cfg: R.RefGroup):
    opt = {R.ADAMW: gmtk.Optimizer.ADAMW, R.ADAM: gmtk.Optimizer.ADAM, R.SGD: gmtk.Optimizer.SGD}[cfg.optimizer]
    scope = {R.PER_TENSOR: gmtk.Scope.PER_TENSOR, R.GLOBAL: gmtk.Scope.GLOBAL}[cfg.scope]
    mode = {R.MASK_GRAD: gmtk.MaskMode.GRAD, R.MASK_FREEZE: gmtk.MaskMode.FREEZE}[cfg.mask_mode]
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, maximize=cfg.maximize, beta1=cfg.beta1,
              beta2=cfg.beta2, eps=cfg.eps, amsgrad=cfg.amsgrad, momentum=cfg.momentum,
              dampening=cfg.dampening, nesterov=cfg.nesterov, mask_ratio=cfg.mask_ratio,
              scope=scope, mask_mode=mode)
    if cfg.lr_device is not None:
        kw["lr_device"] = cfg.lr_device
    return gmtk.GroupConfig(opt, **kw)


def cpu_handle():
    return gmtk.Handle(backend=gmtk.Backend.CPU_REFERENCE)


def g_tensor(arrays, spec):
    kw = {k: v for k, v in arrays.items() if k != "grad"}
    if spec["grad_dtype"] == R.BFLOAT16:
        kw["grad_dtype"] = gmtk.Dtype.BFLOAT16
    if spec.get("param_dtype") == R.BFLOAT16 and "param" in arrays:
        kw["param_dtype"] = gmtk.Dtype.BFLOAT16
    return gmtk.Tensor(arrays["grad"], group=spec["group"], **kw)


class Twin:
    """The same plan twice: gmtk (CPU reference backend) and the numpy model,
    each on its own copy of every caller-owned array."""

    def __init__(self, groups, specs, *, allocate_workspace=True):
        self.groups = [R.RefGroup(**dataclass_kwargs(g)) for g in groups]
        self.specs = specs
        self.lib = [copy_arrays(s) for s in specs]
        self.ref = [copy_arrays(s) for s in specs]
        self.grad_dtypes = [s["grad_dtype"] for s in specs]
        self.handle = cpu_handle()
        self.plan = gmtk.Plan(self.handle, [g_group(g) for g in self.groups],
                              [g_tensor(a, s) for a, s in zip(self.lib, specs)],
                              allocate_workspace=allocate_workspace)
        self.ref_plan = R.RefPlan(self.groups, [
            R.RefTensor(a["grad"], group=s["group"], param=a.get("param"),
                        master_param=a.get("master_param"), exp_avg=a.get("exp_avg"),
                        exp_avg_sq=a.get("exp_avg_sq"), max_exp_avg_sq=a.get("max_exp_avg_sq"),
                        grad_dtype=s["grad_dtype"], param_dtype=s.get("param_dtype") if "param" in a else None)
            for a, s in zip(self.ref, specs)])
        self.nt = len(specs)

    def set_grads(self, rng, scale=1.0):
        for s, a, b in zip(self.specs, self.lib, self.ref):
            g = nasty(rng, a["grad"].size, s["grad_dtype"], scale)
            a["grad"][...] = g.reshape(a["grad"].shape)
            b["grad"][...] = g.reshape(b["grad"].shape)

    def set_group_hyperparams(self, group, cfg: R.RefGroup):
        self.plan.set_group_hyperparams(group, g_group(cfg))
        self.ref_plan.set_group_hyperparams(group, cfg)

    def outputs(self):
        return dict(thresholds=np.full(self.nt, -3.0, np.float32),
                    kept_counts=np.full(self.nt, -7, np.int64),
                    found_inf=np.full(1, -1.0, np.float32))

    def call(self, what, *, step=None, step_count=None, inv_loss_scale=None, **extra):
        out = self.outputs()
        kw = dict(out)
        ref_kw = {}
        if inv_loss_scale is not None:
            kw["inv_loss_scale"] = np.array([inv_loss_scale], np.float32)
            ref_kw["inv_loss_scale"] = np.float32(inv_loss_scale)
        if what == "step":
            if step_count is not None:
                lib_sc = np.array([step_count], np.int64)
                ref_sc = np.array([step_count], np.int64)
                self.plan.step(step_count=lib_sc, **kw, **extra)
                ref = self.ref_plan.step(step_count=ref_sc, **ref_kw)
                assert int(lib_sc[0]) == int(ref_sc[0]), f"step_count: got {lib_sc[0]}, expected {ref_sc[0]}"
            else:
                if step is not None:
                    kw["step"] = step
                self.plan.step(**kw, **extra)
                ref = self.ref_plan.step(step=1 if step is None else step, **ref_kw)
        elif what == "select":
            self.plan.select_thresholds(**kw, **extra)
            ref = self.ref_plan.select_thresholds(**ref_kw)
        elif what == "mask":
            self.plan.mask_gradients(**kw, **extra)
            ref = self.ref_plan.mask_gradients(**ref_kw)
        else:
            raise ValueError(what)
        assert_thresholds(out["thresholds"], ref.thresholds, self.grad_dtypes)
        assert_same_bits(out["kept_counts"], ref.kept_counts, "kept_counts")
        assert out["found_inf"][0] == (1.0 if ref.found_inf else 0.0), \
            f"found_inf: got {out['found_inf'][0]}, expected {float(ref.found_inf)}"
        return out, ref

    def assert_buffers_equal(self, when=""):
        for i, (a, b) in enumerate(zip(self.lib, self.ref)):
            for k in a:
                assert_same_bits(a[k], b[k], f"{when} tensor {i} {k}")


def dataclass_kwargs(g: R.RefGroup):
    import dataclasses
    return {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}


def snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after, what):
    for i, (b, a) in enumerate(zip(before, after)):
        assert_same_bits(a, b, f"{what} #{i}")


# ---------------------------------------------------------------------------
# The numpy reference checks itself (runs without gmtk)
# ---------------------------------------------------------------------------

class TestReferenceSelf:
    def test_fp16_cast_is_rne(self):
        rng = np.random.default_rng(10)
        x = np.concatenate([
            (rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 6, 3000)).astype(np.float32),
            np.array([65504, 65519.99, 65520, 1e6, 2049, 2051, 2 ** -25, 2 ** -24 * 1.5,
                      2 ** -24 * 2.5, 2 ** -14 * (1 - 2 ** -11), -0.0, 0.0, np.inf, -np.inf], np.float32)])
        with np.errstate(over="ignore"):
            assert_same_bits(x.astype(np.float16), R.f32_to_f16_bits(x), "numpy fp16 cast vs hand RNE")

    def test_bf16_conversions(self):
        x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -2.5,
                      3.3895314e38, 3.3961e38, 3.3963e38, 1e-40, np.inf, -0.0], np.float32)
        expect = np.array([0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F7F, 0x7F7F, 0x7F80, 0x0001, 0x7F80, 0x8000],
                          np.uint16)
        assert_same_bits(R.f32_to_bf16(x), expect, "f32_to_bf16")
        assert np.isnan(R.bf16_to_f32(R.f32_to_bf16(np.array([np.nan, -np.nan], np.float32)))).all()
        u = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
        finite = np.isfinite(R.bf16_to_f32(u))
        assert_same_bits(R.f32_to_bf16(R.bf16_to_f32(u))[finite], u[finite], "bf16 round trip")

    @pytest.mark.parametrize("n,r,k", [(10, 0.3, 7), (10, 0.5, 5), (3, 0.99, 1), (100, 0.99, 1),
                                       (0, 0.5, 0), (7, 1.0, 0), (257, 1e-4, 257), (1, 0.5, 1)])
    def test_kept_target(self, n, r, k):
        assert R.kept_target(n, r) == k

    def test_selection_against_sort(self):
        rng = np.random.default_rng(11)
        for n in (1, 5, 100, 1001):
            for r in RATIOS:
                g = nasty_f32(rng, n)
                out = R.RefPlan([R.RefGroup(mask_ratio=r)], [R.RefTensor(g.copy())]).select_thresholds()
                k = n - int(r * n)
                mags = np.sort(np.abs(g.astype(np.float64)))[::-1]
                t = 0.0 if k == n else (np.inf if k == 0 else mags[k - 1])
                assert out.thresholds[0] == t
                assert out.kept_counts[0] == (0 if k == 0 else np.count_nonzero(np.abs(g) >= t)) >= k

    def test_nan_orders_above_inf(self):
        g = np.array([1.0, np.nan, np.inf, -2.0, -0.0, 0.0], np.float32)
        for r, t, kept in [(0.5, 2.0, 3), (0.75, np.inf, 2)]:
            out = R.RefPlan([R.RefGroup(mask_ratio=r)], [R.RefTensor(g)]).select_thresholds()
            assert out.thresholds[0] == t and out.kept_counts[0] == kept and out.found_inf
        out = R.RefPlan([R.RefGroup(mask_ratio=0.9)], [R.RefTensor(g)]).select_thresholds()
        assert np.isnan(out.thresholds[0]) and out.kept_counts[0] == 1

    def test_adamw_hand_computed(self):
        p = np.array([1.0], np.float32)
        m, v = np.zeros(1, np.float32), np.zeros(1, np.float32)
        R.RefPlan([R.RefGroup()], [R.RefTensor(np.array([0.5], np.float32), param=p, exp_avg=m,
                                               exp_avg_sq=v)]).step(step=1)
        # p*(1-1e-5) - (0.01*0.05)/(0.5+1e-8)
        assert abs(float(p[0]) - (0.99999 - 0.0005 / (0.5 + 1e-8) )) < 1e-7
        assert m[0] == np.float32(np.float32(0.1) * np.float32(0.5))

    @pytest.mark.parametrize("cfg", [
        dict(optimizer=R.ADAMW, lr=1e-2, weight_decay=0.1),
        dict(optimizer=R.ADAM, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(optimizer=R.SGD, lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.3),
        dict(optimizer=R.SGD, lr=0.1, weight_decay=0.1, momentum=0.9, nesterov=True, maximize=True),
    ])
    def test_optimizers_against_float64(self, cfg):
        """Ten masked steps in fp32 stay within rounding of a float64 model of
        torch.optim's formulas (fed the same masked gradients)."""
        rng = np.random.default_rng(12)
        n = 300
        p = rng.standard_normal(n).astype(np.float32)
        m, v, vm = (np.zeros(n, np.float32) for _ in range(3))
        gbuf = np.zeros(n, np.float32)
        grp = R.RefGroup(mask_ratio=0.5, **cfg)
        plan = R.RefPlan([grp], [R.RefTensor(gbuf, param=p, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vm)])
        P, M, V, VM, B = p.astype(np.float64), *(np.zeros(n) for _ in range(4))
        b1, b2 = grp.beta1, grp.beta2
        for t in range(1, 11):
            gbuf[:] = rng.standard_normal(n).astype(np.float32)
            out = plan.step(step=t)
            g = np.where(out.keep[0], gbuf, 0).astype(np.float64)
            if grp.maximize:
                g = -g
            wd, lr = grp.weight_decay, grp.lr
            if grp.optimizer == R.SGD:
                g = g + wd * P
                B = g.copy() if t == 1 else grp.momentum * B + (1 - grp.dampening) * g
                g = g + grp.momentum * B if grp.nesterov else B
                P = P - lr * g
            else:
                if grp.optimizer == R.ADAMW:
                    P = P * (1 - lr * wd)
                else:
                    g = g + wd * P
                M = b1 * M + (1 - b1) * g
                V = b2 * V + (1 - b2) * g * g
                VM = np.maximum(VM, V)
                den = np.sqrt(VM if grp.amsgrad else V) / math.sqrt(1 - b2 ** t) + grp.eps
                P = P - lr / (1 - b1 ** t) * M / den
        assert np.max(np.abs(p - P)) < 2e-6 * max(1.0, np.max(np.abs(P)))


# ---------------------------------------------------------------------------
# Version
# ---------------------------------------------------------------------------

@needs_gmtk
def test_version():
    assert isinstance(gmtk.__version__, str)
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", gmtk.__version__)
    assert m, f"gmtk.__version__ = {gmtk.__version__!r} is not 'x.y.z'"
    code = gmtk.library_version()
    assert isinstance(code, int)
    assert f"{code // 10000}.{code // 100 % 100}.{code % 100}" == gmtk.__version__


@needs_gmtk
def test_handle_and_group_defaults():
    h = cpu_handle()
    assert h.backend == gmtk.Backend.CPU_REFERENCE and isinstance(h.device, int)
    c = gmtk.GroupConfig(gmtk.Optimizer.ADAMW)
    assert (c.lr, c.weight_decay, c.beta1, c.beta2, c.eps) == (1e-3, 1e-2, 0.9, 0.999, 1e-8)
    assert c.mask_ratio == 0.0 and c.scope == gmtk.Scope.PER_TENSOR and c.mask_mode == gmtk.MaskMode.GRAD
    assert not c.amsgrad and not c.maximize
    assert gmtk.GroupConfig(gmtk.Optimizer.ADAM).weight_decay == 0.0
    s = gmtk.GroupConfig(gmtk.Optimizer.SGD)
    assert (s.lr, s.momentum, s.dampening, s.weight_decay, bool(s.nesterov)) == (1e-3, 0.0, 0.0, 0.0, False)
    c.mask_ratio = 0.25
    assert c.mask_ratio == 0.25


# ---------------------------------------------------------------------------
# Selection: thresholds and kept counts
# ---------------------------------------------------------------------------

@needs_gmtk
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_thresholds(dtype, scope, ratio):
    rng = np.random.default_rng(100)
    specs = [tensor_spec(rng, n, grad_dtype=dtype, params=False) for n in SIZES]
    tw = Twin([R.RefGroup(mask_ratio=ratio, scope=scope)], specs)
    grads_before = snapshot(*(a["grad"] for a in tw.lib))
    _, ref = tw.call("select")
    assert_unchanged(grads_before, [a["grad"] for a in tw.lib], "selection wrote a gradient")
    assert not ref.found_inf
    if scope == R.GLOBAL:
        assert len(set(bits(ref.thresholds).tolist())) == 1


@needs_gmtk
def test_select_ties_are_all_kept():
    """Hand-made: ties at T are kept (kept > k), -0 == +0, duplicates of both signs."""
    g = np.array([0.5, -0.5, 0.5, 1.0, -0.0, 0.0, -2.0, 0.5, 0.25, -0.25], np.float32)
    spec = dict(group=0, grad_dtype=R.FLOAT32, param_dtype=None, grad=g)
    for ratio, t, kept in [(0.3, 0.25, 8), (0.5, 0.5, 6), (0.8, 1.0, 2), (0.9, 2.0, 1),
                           (0.95, 2.0, 1), (0.05, 0.0, 10), (1.0, np.inf, 0)]:
        tw = Twin([R.RefGroup(mask_ratio=ratio)], [spec])
        out, _ = tw.call("select")
        assert out["thresholds"][0] == t and out["kept_counts"][0] == kept, (ratio, out)
    # ratio 0.7 of 10 masks 7 (k = 3): T = 0.5 and all four 0.5s are kept
    tw = Twin([R.RefGroup(mask_ratio=0.7)], [spec])
    out, _ = tw.call("select")
    assert out["thresholds"][0] == 0.5 and out["kept_counts"][0] == 6
    # zeros only: T = 0 once anything is kept, and every (signed) zero is kept
    z = dict(spec, grad=np.array([0.0, -0.0, 0.0, -0.0], np.float32))
    out, _ = Twin([R.RefGroup(mask_ratio=0.5)], [z]).call("select")
    assert bits(out["thresholds"])[0] == 0 and out["kept_counts"][0] == 4


@needs_gmtk
def test_select_subnormals_order():
    g = np.array([1e-45, 2e-45, -3e-45, 1e-38, -1e-39, 0.0, -0.0, 5e-45], np.float32)
    spec = dict(group=0, grad_dtype=R.FLOAT32, param_dtype=None, grad=g)
    for ratio in (0.25, 0.5, 0.75, 0.875):
        out, _ = Twin([R.RefGroup(mask_ratio=ratio)], [spec]).call("select")
        k = 8 - int(ratio * 8)
        assert out["thresholds"][0] == np.sort(np.abs(g))[::-1][k - 1]


@needs_gmtk
@pytest.mark.parametrize("ratio", [1e-4, 0.001, 0.3])
def test_small_ratio_masks_nothing_and_reports_zero(ratio):
    """floor(r*n) == 0 for every tensor: T = 0 and all kept (n <= 3 at r = 0.3)."""
    rng = np.random.default_rng(101)
    sizes = [1, 2, 3, 0] + ([257, 999] if ratio < 0.001 else [])
    specs = [tensor_spec(rng, n, params=False) for n in sizes]
    out, _ = Twin([R.RefGroup(mask_ratio=ratio)], specs).call("select")
    assert (out["thresholds"] == 0).all() and not np.signbit(out["thresholds"]).any()
    assert out["kept_counts"].tolist() == sizes


@needs_gmtk
def test_select_several_groups_interleaved():
    rng = np.random.default_rng(102)
    groups = [R.RefGroup(mask_ratio=0.3, scope=R.PER_TENSOR),
              R.RefGroup(mask_ratio=0.9, scope=R.GLOBAL),
              R.RefGroup(optimizer=R.SGD, mask_ratio=0.5, scope=R.GLOBAL),
              R.RefGroup(mask_ratio=0.99, scope=R.GLOBAL)]  # group 3: only an empty tensor
    layout = [(0, 33, R.FLOAT32), (1, 100, R.FLOAT32), (2, 17, R.FLOAT16), (0, 0, R.FLOAT32),
              (1, 1, R.FLOAT32), (2, 257, R.FLOAT16), (3, 0, R.BFLOAT16), (1, 0, R.FLOAT32),
              (0, 1000, R.FLOAT32), (2, 3, R.FLOAT16)]
    specs = [tensor_spec(rng, n, group=g, grad_dtype=dt, params=False) for g, n, dt in layout]
    Twin(groups, specs).call("select")


KEPT_TARGETS = [(10, 0.3, 7), (10, 0.7, 3), (100, 0.29, 72), (100, 0.57, 44), (1000, 0.001, 999),
                (3, 0.999, 1), (1001, 0.5, 501)]


@needs_gmtk
@pytest.mark.parametrize("n,ratio,kept", KEPT_TARGETS)
def test_kept_target_uses_the_double_product(n, ratio, kept):
    """k = n - floor(r*n) with r*n in double (Python's int(r*n)): 0.29 of 100
    masks 28, not 29; 0.7 of 10 masks 7. Distinct magnitudes, so kept == k."""
    assert n - int(ratio * n) == kept
    g = (np.arange(1, n + 1, dtype=np.float32) * np.where(np.arange(n) % 2, -1, 1)).astype(np.float32)
    np.random.default_rng(n).shuffle(g)
    spec = dict(group=0, grad_dtype=R.FLOAT32, param_dtype=None, grad=g)
    out, _ = Twin([R.RefGroup(mask_ratio=ratio)], [spec]).call("select")
    assert out["kept_counts"][0] == kept and out["thresholds"][0] == n + 1 - kept


LARGE_KINDS = ["normal", "one_binade", "few_values"]


@needs_gmtk
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("kind", LARGE_KINDS)
def test_select_large(kind, scope):
    """Bigger sets whose magnitudes crowd into few leading bits (one binade) or
    few distinct values, where a radix/histogram selection must refine."""
    rng = np.random.default_rng(103)
    sizes = [150_001, 3, 49_999]
    specs = []
    for n in sizes:
        if kind == "normal":
            g = rng.standard_normal(n).astype(np.float32)
        elif kind == "one_binade":
            g = (1.0 + rng.random(n)).astype(np.float32) * np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32)
        else:
            g = rng.choice(np.array([0.5, -0.5, 1e-3, 0.0, -0.0, 2.0, 1e-40], np.float32), n)
        specs.append(dict(group=0, grad_dtype=R.FLOAT32, param_dtype=None, grad=g.astype(np.float32)))
    for ratio in (0.5, 0.9, 0.999):
        Twin([R.RefGroup(mask_ratio=ratio, scope=scope)], specs).call("select")


@needs_gmtk
def test_global_scope_needs_one_grad_dtype():
    rng = np.random.default_rng(103)
    specs = [tensor_spec(rng, 5, grad_dtype=R.FLOAT32, params=False),
             tensor_spec(rng, 5, grad_dtype=R.FLOAT16, params=False)]
    arrays = [copy_arrays(s) for s in specs]
    with pytest.raises(gmtk.NotSupportedError) as e:
        gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.5, scope=R.GLOBAL))],
                  [g_tensor(a, s) for a, s in zip(arrays, specs)])
    assert str(e.value)
    # per-tensor scope takes the same mix
    Twin([R.RefGroup(mask_ratio=0.5)], specs).call("select")


# ---------------------------------------------------------------------------
# Non-finite gradients
# ---------------------------------------------------------------------------

NAN_BITS = {R.FLOAT32: (0x7FC00001, 0xFFC00010), R.FLOAT16: (0x7E01, 0xFE10), R.BFLOAT16: (0x7FC1, 0xFFD0)}
INF_BITS = {R.FLOAT32: 0x7F800000, R.FLOAT16: 0x7C00, R.BFLOAT16: 0x7F80}


def with_nonfinite(rng, dtype, n=20):
    g = nasty(rng, n, dtype)
    b = bits(g).copy()
    sign = 0x80000000 if dtype == R.FLOAT32 else 0x8000
    b[3], b[11] = NAN_BITS[dtype]
    b[5], b[8] = INF_BITS[dtype], INF_BITS[dtype] | sign
    return b.view(g.dtype)


@needs_gmtk
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 0.85, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_nan_inf_keys(dtype, ratio):
    """NaN orders above +inf (NaNs by payload), -inf == +inf; found_inf is set."""
    rng = np.random.default_rng(200)
    spec = dict(group=0, grad_dtype=dtype, param_dtype=None, grad=with_nonfinite(rng, dtype))
    out, ref = Twin([R.RefGroup(mask_ratio=ratio)], [spec]).call("select")
    assert ref.found_inf and out["found_inf"][0] == 1.0
    k = 20 - int(ratio * 20)
    if 0 < k < 20:
        expect = {1: "nan", 2: "nan", 3: "inf", 4: "inf"}.get(k, "finite")
        t = out["thresholds"][0]
        assert {"nan": np.isnan(t), "inf": t == np.inf, "finite": np.isfinite(t)}[expect]


@needs_gmtk
@pytest.mark.parametrize("what", ["step", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_step_is_a_noop(dtype, what):
    """Any inf/NaN gradient (here in another group's tensor) makes the whole call a
    no-op: no parameter, state, gradient or counter changes; outputs written."""
    rng = np.random.default_rng(201)
    specs = [tensor_spec(rng, 50, grad_dtype=R.FLOAT32, state="random"),
             tensor_spec(rng, 20, group=1, grad_dtype=dtype, param_dtype=dtype, master=dtype != R.FLOAT32,
                         optimizer=R.SGD, momentum=0.9, state="random")]
    specs[1]["grad"] = with_nonfinite(rng, dtype)
    tw = Twin([R.RefGroup(mask_ratio=0.5), R.RefGroup(optimizer=R.SGD, momentum=0.9, mask_ratio=0.3)], specs)
    before = snapshot(*(v for a in tw.lib for v in a.values()))
    if what == "step":
        out, ref = tw.call("step", step_count=4)  # asserts the counter stays at 4
    else:
        out, ref = tw.call("mask")
    assert ref.found_inf and not ref.applied
    assert_unchanged(before, [v for a in tw.lib for v in a.values()], "non-finite call wrote")


@needs_gmtk
@pytest.mark.parametrize("inv", [2.0, float("nan"), float("inf")])
def test_found_inf_after_unscaling(inv):
    """A finite gradient that unscaling makes non-finite counts (found_inf), and
    the step is a no-op; thresholds stay in the stored gradient's units."""
    rng = np.random.default_rng(202)
    specs = [tensor_spec(rng, 30, state="random")]
    specs[0]["grad"][4] = np.float32(3e38)
    tw = Twin([R.RefGroup(mask_ratio=0.5)], specs)
    before = snapshot(*tw.lib[0].values())
    out, ref = tw.call("step", step_count=0, inv_loss_scale=inv)
    assert ref.found_inf
    assert_unchanged(before, list(tw.lib[0].values()), "step after overflowing unscale")
    # and a finite scale on the same gradients applies
    tw.call("step", step_count=0, inv_loss_scale=0.5)
    tw.assert_buffers_equal("after scale 0.5")


# ---------------------------------------------------------------------------
# mask_gradients
# ---------------------------------------------------------------------------

@needs_gmtk
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_gradients(dtype, scope, ratio):
    rng = np.random.default_rng(300)
    specs = [tensor_spec(rng, n, grad_dtype=dtype, params=False) for n in SIZES]
    tw = Twin([R.RefGroup(mask_ratio=ratio, scope=scope)], specs)
    before = snapshot(*(a["grad"] for a in tw.lib))
    _, ref = tw.call("mask")
    for i, a in enumerate(tw.lib):
        got, old, keep = bits(a["grad"]), bits(before[i]), ref.keep[i]
        assert (got[~keep] == 0).all(), f"tensor {i}: a masked entry is not +0"
        assert_same_bits(got[keep], old[keep], f"tensor {i}: kept entries")
    tw.assert_buffers_equal("after mask_gradients")


# ---------------------------------------------------------------------------
# Full steps, fp32
# ---------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": dict(optimizer=R.ADAMW, lr=1e-2),
    "adamw_wd0": dict(optimizer=R.ADAMW, lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.99, eps=1e-6),
    "adam": dict(optimizer=R.ADAM, lr=1e-2),
    "adam_wd_amsgrad_maximize": dict(optimizer=R.ADAM, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    "adamw_amsgrad": dict(optimizer=R.ADAMW, lr=2e-2, weight_decay=0.05, amsgrad=True),
    "sgd": dict(optimizer=R.SGD, lr=0.1),
    "sgd_momentum_dampening_wd": dict(optimizer=R.SGD, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd_nesterov_maximize": dict(optimizer=R.SGD, lr=0.05, momentum=0.8, nesterov=True, maximize=True,
                                  weight_decay=1e-3),
}


def specs_for(rng, cfg, sizes, group=0, **kw):
    return [tensor_spec(rng, n, group=group, optimizer=cfg.get("optimizer", R.ADAMW),
                        amsgrad=cfg.get("amsgrad", False), momentum=cfg.get("momentum", 0.0), **kw)
            for n in sizes]


@needs_gmtk
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_step_fp32(opt, mode, scope):
    cfg = OPTIMIZERS[opt]
    rng = np.random.default_rng(400)
    tw = Twin([R.RefGroup(mask_ratio=0.5, scope=scope, mask_mode=mode, **cfg)], specs_for(rng, cfg, SIZES))
    for t in range(1, 5):
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


@needs_gmtk
@pytest.mark.parametrize("mode", MODES)
def test_step_ratios_sweep(mode):
    """One tensor set stepped at every ratio in turn (0 and 1 included)."""
    rng = np.random.default_rng(401)
    cfg = OPTIMIZERS["adamw"]
    tw = Twin([R.RefGroup(mask_ratio=0.0, mask_mode=mode, **cfg)], specs_for(rng, cfg, SIZES))
    for t, ratio in enumerate(RATIOS + RATIOS[::-1], start=1):
        tw.set_group_hyperparams(0, R.RefGroup(mask_ratio=ratio, mask_mode=mode, **cfg))
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t} ratio {ratio}")


SCALAR_EDGES = {
    # 1 - lr*wd = 1 - 2^-25(1 + 2^-26) in double rounds to 1 - 2^-24; computed from
    # fp32 lr (= 2^-12) and wd it is a tie at 1 - 2^-25 and rounds to 1.0
    "adamw_decay_factor": dict(optimizer=R.ADAMW, lr=2.0 ** -12 * (1 + 2.0 ** -26), weight_decay=2.0 ** -13),
    # 1 - beta1 = 0.75 * 2^-24 exactly in double; fp32(1) - fp32(beta1) = 2^-24
    "adam_one_minus_beta1": dict(optimizer=R.ADAM, lr=1e-2, beta1=1 - 3 * 2.0 ** -26),
    "adam_one_minus_beta2": dict(optimizer=R.ADAM, lr=1e-2, beta2=1 - 3 * 2.0 ** -26),
    # 1 - dampening, as the decay factor above
    "sgd_one_minus_dampening": dict(optimizer=R.SGD, lr=0.1, momentum=0.5, dampening=2.0 ** -25 * (1 + 2.0 ** -26)),
}


@needs_gmtk
@pytest.mark.parametrize("name", list(SCALAR_EDGES))
def test_step_scalars_are_rounded_from_double(name):
    """docs/semantics.md: the per-step scalars are computed in double from the
    hyper-parameters, then rounded to fp32 (hyper-parameters chosen so that an
    fp32 computation of the scalar gives another value)."""
    cfg = SCALAR_EDGES[name]
    rng = np.random.default_rng(410)
    tw = Twin([R.RefGroup(mask_ratio=0.3, **cfg)], specs_for(rng, cfg, [200], state="random"))
    for t in range(1, 4):
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


@needs_gmtk
def test_freeze_keeps_masked_bits():
    """freeze: a masked entry's parameter and every state buffer keep their bits,
    checked on the binding's output alone (not only against the reference)."""
    rng = np.random.default_rng(402)
    cfg = OPTIMIZERS["adam_wd_amsgrad_maximize"]
    tw = Twin([R.RefGroup(mask_ratio=0.7, mask_mode=R.MASK_FREEZE, **cfg)],
              specs_for(rng, cfg, [500], state="random"))
    before = snapshot(*tw.lib[0].values())
    _, ref = tw.call("step", step=3)
    masked = ~ref.keep[0]
    assert masked.sum() > 100
    for name, b, a in zip(tw.lib[0].keys(), before, tw.lib[0].values()):
        if name != "grad":
            assert_same_bits(a.reshape(-1)[masked], b.reshape(-1)[masked], f"frozen {name}")
    assert not np.array_equal(bits(tw.lib[0]["param"])[~masked], bits(before[1])[~masked])
    tw.assert_buffers_equal()


@needs_gmtk
def test_several_groups_step():
    rng = np.random.default_rng(403)
    g0 = dict(OPTIMIZERS["adamw"], mask_ratio=0.9, scope=R.GLOBAL)
    g1 = dict(OPTIMIZERS["sgd_momentum_dampening_wd"], mask_ratio=0.3, mask_mode=R.MASK_FREEZE)
    g2 = dict(OPTIMIZERS["adam_wd_amsgrad_maximize"], mask_ratio=0.0)
    specs = (specs_for(rng, g0, [33, 0], group=0) + specs_for(rng, g1, [100, 7], group=1)
             + specs_for(rng, g2, [64], group=2) + specs_for(rng, g0, [257], group=0))
    tw = Twin([R.RefGroup(**g0), R.RefGroup(**g1), R.RefGroup(**g2)], specs)
    for t in range(1, 4):
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


@needs_gmtk
def test_multidimensional_arrays_are_flattened():
    """Arrays of any C-contiguous shape are read as their flat entries."""
    rng = np.random.default_rng(404)
    cfg = OPTIMIZERS["adamw_amsgrad"]
    flat = specs_for(rng, cfg, [60, 24])
    shaped = []
    for spec, shape in zip(flat, [(3, 4, 5), (2, 12)]):
        d = dict(spec)
        for k in BUFFERS:
            if k in d:
                d[k] = d[k].reshape(shape)
        shaped.append(d)
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)], shaped)
    assert [gmtk.Tensor(a["grad"]).numel for a in tw.lib] == [60, 24]
    for t in range(1, 3):
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")
    tw.call("mask")
    tw.assert_buffers_equal("mask")


@needs_gmtk
def test_outputs_may_be_longer_than_num_tensors():
    rng = np.random.default_rng(405)
    tw = Twin([R.RefGroup(mask_ratio=0.5)], specs_for(rng, {}, [20, 3]))
    thr, kept = np.full(5, -3.0, np.float32), np.full(5, -7, np.int64)
    tw.plan.step(step=1, thresholds=thr, kept_counts=kept)
    ref = tw.ref_plan.step(step=1)
    assert_thresholds(thr[:2], ref.thresholds, tw.grad_dtypes)
    assert_same_bits(kept[:2], ref.kept_counts, "kept_counts")
    assert (thr[2:] == -3.0).all() and (kept[2:] == -7).all(), "entries past num_tensors were written"
    tw.assert_buffers_equal()


@needs_gmtk
def test_plan_keeps_its_arrays_alive():
    """The plan holds a reference to every array it was given."""
    import gc
    import weakref
    rng = np.random.default_rng(406)
    spec = specs_for(rng, {}, [16])[0]
    arrays = copy_arrays(spec)
    refs = {k: weakref.ref(v) for k, v in arrays.items()}
    plan = gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.5))], [g_tensor(arrays, spec)])
    p0 = arrays["param"].copy()
    del arrays
    gc.collect()
    assert all(r() is not None for r in refs.values()), "an array died while its plan lives"
    plan.step(step=1)
    assert not np.array_equal(refs["param"](), p0)
    del plan
    gc.collect()
    assert all(r() is None for r in refs.values()), "the plan leaked its arrays"


@needs_gmtk
def test_empty_plan_steps():
    plan = gmtk.Plan(cpu_handle(), [gmtk.GroupConfig(gmtk.Optimizer.ADAMW)], [])
    assert plan.num_tensors == 0
    sc, fi = np.zeros(1, np.int64), np.full(1, -1.0, np.float32)
    plan.step(step_count=sc, found_inf=fi)
    assert sc[0] == 1 and fi[0] == 0.0


# ---------------------------------------------------------------------------
# Step counter
# ---------------------------------------------------------------------------

@needs_gmtk
@pytest.mark.parametrize("opt", ["adamw", "sgd_nesterov_maximize"])
def test_step_count_equals_step(opt):
    """step_count=c runs step t = c + 1 and stores it; bits equal step=t."""
    cfg = OPTIMIZERS[opt]
    results = []
    for use_counter in (False, True):
        rng = np.random.default_rng(500)
        specs = specs_for(rng, cfg, [40, 9], state="random")
        arrays = [copy_arrays(s) for s in specs]
        plan = gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.5, **cfg))],
                         [g_tensor(a, s) for a, s in zip(arrays, specs)])
        sc = np.array([5], np.int64)
        for t in range(6, 9):
            for a, s in zip(arrays, specs):
                a["grad"][...] = nasty(rng, a["grad"].size, R.FLOAT32)
            if use_counter:
                plan.step(step_count=sc)
                assert sc[0] == t
            else:
                plan.step(step=t)
        results.append(arrays)
    for a, b in zip(*results):
        for k in a:
            assert_same_bits(b[k], a[k], f"step_count vs step: {k}")


@needs_gmtk
def test_step_count_against_reference():
    rng = np.random.default_rng(501)
    cfg = OPTIMIZERS["sgd_momentum_dampening_wd"]
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)], specs_for(rng, cfg, [40, 0, 9], state="random"))
    for start in (0, 1, 2, 9):  # start 0: the momentum buffer starts as the gradient
        tw.set_grads(rng)
        tw.call("step", step_count=start)
        tw.assert_buffers_equal(f"step_count {start}")


# ---------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------

PAIRS = [(g, p, m) for g in DTYPES for p in DTYPES for m in ((False,) if p == R.FLOAT32 else (False, True))]


@needs_gmtk
@pytest.mark.parametrize("opt", ["adamw", "sgd_momentum_dampening_wd"])
@pytest.mark.parametrize("grad_dtype,param_dtype,master", PAIRS,
                         ids=[f"g{g}-p{p}{'-master' if m else ''}" for g, p, m in PAIRS])
def test_step_mixed_precision(grad_dtype, param_dtype, master, opt):
    cfg = OPTIMIZERS[opt]
    rng = np.random.default_rng(600)
    specs = specs_for(rng, cfg, [129, 0, 31], grad_dtype=grad_dtype, param_dtype=param_dtype, master=master)
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg),
               R.RefGroup(mask_ratio=0.3, mask_mode=R.MASK_FREEZE, scope=R.GLOBAL, **cfg)],
              specs + specs_for(rng, cfg, [77, 5], group=1, grad_dtype=grad_dtype, param_dtype=param_dtype,
                                master=master))
    for t in range(1, 4):
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


ROUNDING_VALUES = np.array([
    1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -11 + 2 ** -20,  # fp16 ties and near-ties
    1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8 - 2 ** -20,         # bf16 ties and near-ties
    65504.0, 65519.0, 65520.0, -65520.0, 1e5,                             # fp16 overflow boundary
    3.3895314e38, 3.3961e38, 3.3963e38, -3.4e38,                                     # bf16 overflow boundary
    2 ** -25, 3 * 2 ** -25, 2 ** -24 * 1.5, 5e-8, 2 ** -14 * (1 - 2 ** -12),  # fp16 subnormals
    1e-40, 3e-45, -1.5e-39, -0.0, 0.0], np.float32)


@needs_gmtk
@pytest.mark.parametrize("param_dtype", [R.FLOAT16, R.BFLOAT16])
def test_16bit_write_rounds_to_nearest_even(param_dtype):
    """With a master and a zero update (SGD, lr 1, g = 0), the 16-bit parameter
    is exactly the nearest-even rounding of the master (ties, subnormals,
    overflow to inf)."""
    n = ROUNDING_VALUES.size
    spec = dict(group=0, grad_dtype=R.FLOAT32, param_dtype=param_dtype,
                grad=np.zeros(n, np.float32), param=R.narrow(np.full(n, 7.0, np.float32), param_dtype),
                master_param=ROUNDING_VALUES.copy())
    tw = Twin([R.RefGroup(optimizer=R.SGD, lr=1.0)], [spec])
    with np.errstate(over="ignore"):
        tw.call("step", step=1)
        expect = (ROUNDING_VALUES.astype(np.float16) if param_dtype == R.FLOAT16
                  else R.f32_to_bf16(ROUNDING_VALUES))
    assert_same_bits(tw.lib[0]["param"], expect, "16-bit parameter")
    assert_same_bits(tw.lib[0]["master_param"], ROUNDING_VALUES, "master")
    tw.assert_buffers_equal()


# ---------------------------------------------------------------------------
# Loss scaling
# ---------------------------------------------------------------------------

@needs_gmtk
@pytest.mark.parametrize("inv", [1.0 / 1024, 1.0 / 3.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inv_loss_scale(dtype, inv):
    rng = np.random.default_rng(700)
    cfg = OPTIMIZERS["adam_wd_amsgrad_maximize"]
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)],
              specs_for(rng, cfg, [100, 13], grad_dtype=dtype, param_dtype=dtype, master=dtype != R.FLOAT32))
    for t in range(1, 3):
        tw.set_grads(rng, scale=1.0 / inv if dtype == R.FLOAT32 else 1.0)
        out, ref = tw.call("step", step=t, inv_loss_scale=inv)
        tw.assert_buffers_equal(f"step {t}")
    # thresholds are in the stored (scaled) units
    out, _ = tw.call("select", inv_loss_scale=inv)
    for i, a in enumerate(tw.lib):
        mags = np.sort(np.abs(R.widen(a["grad"], dtype)))[::-1]
        k = a["grad"].size - int(0.5 * a["grad"].size)
        assert out["thresholds"][i] == mags[k - 1]


# ---------------------------------------------------------------------------
# Schedules: set_group_hyperparams, lr_device
# ---------------------------------------------------------------------------

@needs_gmtk
@pytest.mark.parametrize("mode", MODES)
def test_set_group_hyperparams_between_steps(mode):
    rng = np.random.default_rng(800)
    base = dict(OPTIMIZERS["adamw_amsgrad"], mask_mode=mode)
    tw = Twin([R.RefGroup(mask_ratio=0.5, **base),
               R.RefGroup(mask_ratio=0.3, **dict(OPTIMIZERS["sgd_nesterov_maximize"], mask_mode=mode))],
              specs_for(rng, base, [64, 5]) + specs_for(rng, OPTIMIZERS["sgd_nesterov_maximize"], [50], group=1))
    schedule = [
        (0, dict(base, lr=1e-2, mask_ratio=0.5)),
        (0, dict(base, lr=3e-3, weight_decay=0.2, mask_ratio=0.9)),
        (1, dict(OPTIMIZERS["sgd_nesterov_maximize"], mask_mode=mode, lr=0.5, momentum=0.5, mask_ratio=0.99)),
        (0, dict(base, lr=1e-4, beta1=0.5, beta2=0.9, eps=1e-3, maximize=True, mask_ratio=0.0)),
        (1, dict(OPTIMIZERS["sgd_nesterov_maximize"], mask_mode=mode, nesterov=False, dampening=0.5,
                 mask_ratio=1.0)),
    ]
    for t, (group, cfg) in enumerate(schedule, start=1):
        tw.set_group_hyperparams(group, R.RefGroup(**cfg))
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


@needs_gmtk
def test_set_group_hyperparams_cannot_change_structure():
    rng = np.random.default_rng(801)
    tw = Twin([R.RefGroup(mask_ratio=0.5)], specs_for(rng, {}, [10]))
    for change in (dict(scope=R.GLOBAL), dict(mask_mode=R.MASK_FREEZE), dict(amsgrad=True)):
        with pytest.raises(gmtk.Error) as e:
            tw.plan.set_group_hyperparams(0, g_group(R.RefGroup(mask_ratio=0.5, **change)))
        assert str(e.value)
    tw.set_grads(rng)
    tw.call("step", step=1)
    tw.assert_buffers_equal()


@needs_gmtk
def test_lr_device_is_read_at_step_time():
    rng = np.random.default_rng(802)
    lr_dev = np.array([0.02], np.float32)
    cfg = dict(OPTIMIZERS["adamw"], lr=123.0, mask_ratio=0.5)
    tw = Twin([R.RefGroup(**cfg, lr_device=lr_dev)], specs_for(rng, cfg, [64]))
    # the reference reads tw.groups[0].lr_device, which is this same array
    tw.ref_plan.groups[0].lr_device = lr_dev
    for t, lr in enumerate([0.02, 0.005, 1e-3], start=1):
        lr_dev[0] = lr
        tw.set_grads(rng)
        tw.call("step", step=t)
        tw.assert_buffers_equal(f"step {t}")


# ---------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------

@needs_gmtk
def test_caller_workspace():
    rng = np.random.default_rng(900)
    cfg = OPTIMIZERS["adamw"]
    tw = Twin([R.RefGroup(mask_ratio=0.9, scope=R.GLOBAL, **cfg)], specs_for(rng, cfg, [300, 0, 45]),
              allocate_workspace=False)
    size = tw.plan.workspace_size
    assert isinstance(size, int) and size >= 0
    owning = gmtk.Plan(tw.handle, [g_group(g) for g in tw.groups],
                       [g_tensor(copy_arrays(s), s) for s in tw.specs])
    assert owning.workspace_size == 0  # a plan that owns its workspace needs none from the caller
    ws = np.zeros(max(size, 1), np.uint8)
    tw.set_grads(rng)
    tw.call("step", step=1, workspace=ws)
    tw.assert_buffers_equal()
    if size > 0:
        before = snapshot(*(v for a in tw.lib for v in a.values()))
        with pytest.raises(gmtk.Error):
            tw.plan.step(step=2, workspace=np.zeros(size - 1, np.uint8))
        assert_unchanged(before, [v for a in tw.lib for v in a.values()], "insufficient workspace")


@needs_gmtk
def test_plan_context_manager_and_determinism():
    rng = np.random.default_rng(901)
    cfg = OPTIMIZERS["adam_wd_amsgrad_maximize"]
    specs = specs_for(rng, cfg, [200, 3], state="random")
    runs = []
    for _ in range(2):
        arrays = [copy_arrays(s) for s in specs]
        with gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.9, scope=R.GLOBAL, **cfg))],
                       [g_tensor(a, s) for a, s in zip(arrays, specs)]) as plan:
            assert plan.num_tensors == 2
            thr = np.zeros(2, np.float32)
            plan.step(step=2, thresholds=thr)
        runs.append((arrays, thr))
    for k in runs[0][0][0]:
        assert_same_bits(runs[1][0][0][k], runs[0][0][0][k], f"rerun {k}")
    assert_same_bits(runs[1][1], runs[0][1], "rerun thresholds")


# ---------------------------------------------------------------------------
# Errors: type, message, and nothing the caller owns changes
# ---------------------------------------------------------------------------

def _plan_args(rng, ratio=0.5, n=10, **tkw):
    spec = tensor_spec(rng, n, **tkw)
    arrays = copy_arrays(spec)
    return spec, arrays


@needs_gmtk
@pytest.mark.parametrize("ratio", [1.5, -0.1, float("nan"), float("inf")])
def test_bad_ratio_at_plan_creation(ratio):
    rng = np.random.default_rng(1000)
    spec, arrays = _plan_args(rng)
    before = snapshot(*arrays.values())
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        cfg = gmtk.GroupConfig(gmtk.Optimizer.ADAMW)
        cfg.mask_ratio = ratio
        gmtk.Plan(cpu_handle(), [cfg], [g_tensor(arrays, spec)])
    assert isinstance(e.value, ValueError) and isinstance(e.value, gmtk.Error)
    assert e.value.status == gmtk.Status.INVALID_ARGUMENT
    assert "ratio" in str(e.value), str(e.value)
    assert_unchanged(before, list(arrays.values()), "refused plan")


@needs_gmtk
@pytest.mark.parametrize("ratio", [1.0000001, float("nan")])
def test_bad_ratio_in_set_group_hyperparams_changes_nothing(ratio):
    rng = np.random.default_rng(1001)
    cfg = OPTIMIZERS["adamw"]
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)], specs_for(rng, cfg, [40]))
    bad = g_group(R.RefGroup(**cfg))
    bad.mask_ratio = ratio
    before = snapshot(*tw.lib[0].values())
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        tw.plan.set_group_hyperparams(0, bad)
    assert isinstance(e.value, ValueError) and "ratio" in str(e.value), str(e.value)
    assert_unchanged(before, list(tw.lib[0].values()), "refused set_group_hyperparams")
    # the plan still steps with its old ratio
    tw.set_grads(rng)
    tw.call("step", step=1)
    tw.assert_buffers_equal()


@needs_gmtk
@pytest.mark.parametrize("buffer", ["param", "exp_avg", "exp_avg_sq", "master_param"])
def test_short_buffer_is_refused_naming_it(buffer):
    rng = np.random.default_rng(1002)
    pdt = R.FLOAT16 if buffer == "master_param" else R.FLOAT32
    spec, arrays = _plan_args(rng, param_dtype=pdt, master=buffer == "master_param")
    arrays[buffer] = arrays[buffer][:-1].copy()
    before = snapshot(*arrays.values())
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.5))], [g_tensor(arrays, spec)])
    assert isinstance(e.value, ValueError)
    assert buffer in str(e.value), str(e.value)
    assert_unchanged(before, list(arrays.values()), "refused plan")


@needs_gmtk
@pytest.mark.parametrize("buffer", ["grad", "param", "exp_avg"])
def test_non_contiguous_array_is_refused(buffer):
    rng = np.random.default_rng(1003)
    spec, arrays = _plan_args(rng)
    wide = np.zeros(2 * arrays[buffer].size, arrays[buffer].dtype)
    wide[::2] = arrays[buffer]
    arrays[buffer] = wide[::2]
    assert not arrays[buffer].flags.c_contiguous
    before = snapshot(*arrays.values())
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Tensor(arrays["grad"], param=arrays["param"], exp_avg=arrays["exp_avg"],
                    exp_avg_sq=arrays["exp_avg_sq"])
        # (if the Tensor record itself accepts it, the plan must refuse it)
        gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(mask_ratio=0.5))], [g_tensor(arrays, spec)])
    assert buffer in str(e.value), str(e.value)
    assert_unchanged(before, list(arrays.values()), "refused non-contiguous")


@needs_gmtk
def test_unsupported_dtype_is_refused():
    rng = np.random.default_rng(1004)
    spec, arrays = _plan_args(rng)
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Tensor(arrays["grad"].astype(np.float64))
        gmtk.Plan(cpu_handle(), [g_group(R.RefGroup())],
                  [gmtk.Tensor(arrays["grad"].astype(np.float64))])
    assert "grad" in str(e.value), str(e.value)


def _bad_step_kwargs(nt):
    good = dict(thresholds=np.zeros(nt, np.float32), kept_counts=np.zeros(nt, np.int64),
                found_inf=np.zeros(1, np.float32), step_count=np.array([3], np.int64))
    cases = {
        "thresholds": np.zeros(nt - 1, np.float32),
        "kept_counts": np.zeros(nt - 1, np.int64),
        "found_inf": np.zeros(1, np.float64),
        "step_count": np.array([3], np.int32),
        "inv_loss_scale": carved_empty(np.float32),
    }
    strided = np.zeros(2 * nt, np.float32)[::2]
    cases["thresholds_strided"] = strided
    return good, cases


REFUSED_CALLS = [(w, b) for w in ("step", "select", "mask")
                 for b in ("thresholds", "kept_counts", "found_inf", "step_count", "inv_loss_scale",
                           "thresholds_strided") if not (b == "step_count" and w != "step")]


@needs_gmtk
@pytest.mark.parametrize("what,bad", REFUSED_CALLS, ids=[f"{w}-{b}" for w, b in REFUSED_CALLS])
def test_refused_call_writes_nothing(what, bad):
    rng = np.random.default_rng(1005)
    cfg = OPTIMIZERS["sgd_momentum_dampening_wd"]
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)], specs_for(rng, cfg, [30, 4, 9], state="random"))
    good, cases = _bad_step_kwargs(tw.nt)
    kw = dict(good)
    name = bad.replace("_strided", "")
    kw[name] = cases[bad]
    if what != "step":
        kw.pop("step_count")
    owned = [v for a in tw.lib for v in a.values()] + list(kw.values())
    before = snapshot(*owned)
    fn = {"step": tw.plan.step, "select": tw.plan.select_thresholds, "mask": tw.plan.mask_gradients}[what]
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        fn(**kw)
    assert isinstance(e.value, ValueError)
    assert name in str(e.value), str(e.value)
    assert_unchanged(before, owned, f"refused {what} ({bad})")
    # and the plan is still good
    tw.set_grads(rng)
    tw.call(what, step=1) if what == "step" else tw.call(what)
    tw.assert_buffers_equal()


BAD_GROUPS = [
    (R.ADAMW, dict(lr=-1.0), "lr"),
    (R.ADAMW, dict(lr=float("nan")), "lr"),
    (R.ADAMW, dict(weight_decay=-0.1), "weight_decay"),
    (R.ADAM, dict(beta1=1.0), "beta1"),
    (R.ADAM, dict(beta2=1.0), "beta2"),
    (R.ADAMW, dict(beta1=-0.1), "beta1"),
    (R.ADAMW, dict(eps=-1e-8), "eps"),
    (R.SGD, dict(momentum=-0.5), "momentum"),
    (R.SGD, dict(nesterov=True), "nesterov"),
    (R.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
]


@needs_gmtk
@pytest.mark.parametrize("opt,change,field", BAD_GROUPS, ids=[f"{o}-{f}-{i}" for i, (o, _, f) in enumerate(BAD_GROUPS)])
def test_bad_group_config_is_refused_naming_the_field(opt, change, field):
    rng = np.random.default_rng(1006)
    spec, arrays = _plan_args(rng, optimizer=opt, momentum=0.9)
    before = snapshot(*arrays.values())
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Plan(cpu_handle(), [g_group(R.RefGroup(optimizer=opt, **change))], [g_tensor(arrays, spec)])
    assert field in str(e.value), str(e.value)
    assert_unchanged(before, list(arrays.values()), "refused plan")


@needs_gmtk
def test_bad_tensor_records_are_refused():
    rng = np.random.default_rng(1007)
    h = cpu_handle()
    grp = [g_group(R.RefGroup())]
    # master weights are for 16-bit parameters only
    spec, a = _plan_args(rng)
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Plan(h, grp, [gmtk.Tensor(a["grad"], param=a["param"], master_param=a["param"].copy(),
                                       exp_avg=a["exp_avg"], exp_avg_sq=a["exp_avg_sq"])])
    assert "master_param" in str(e.value)
    # overlapping buffers
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Plan(h, grp, [gmtk.Tensor(a["grad"], param=a["grad"], exp_avg=a["exp_avg"],
                                       exp_avg_sq=a["exp_avg_sq"])])
    assert "overlap" in str(e.value)
    # a group index out of range
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        gmtk.Plan(h, grp, [gmtk.Tensor(a["grad"], group=1)])
    assert "group" in str(e.value)
    # a float32 array cannot hold bfloat16; a uint16 array needs an explicit dtype
    with pytest.raises(gmtk.InvalidArgumentError):
        gmtk.Tensor(a["grad"], grad_dtype=gmtk.Dtype.BFLOAT16)
    with pytest.raises(gmtk.InvalidArgumentError):
        gmtk.Tensor(np.zeros(4, np.uint16))


@needs_gmtk
@pytest.mark.parametrize("missing", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"])
def test_step_needs_its_buffers(missing):
    """A plan without the buffers a step needs still selects and masks, but
    its step is refused, naming the buffer, and writes nothing."""
    rng = np.random.default_rng(1008)
    cfg = (dict(optimizer=R.SGD, momentum=0.9) if missing == "momentum_buffer"
           else dict(optimizer=R.ADAM, amsgrad=True))
    spec = tensor_spec(rng, 12, optimizer=cfg["optimizer"], amsgrad=cfg.get("amsgrad", False),
                       momentum=cfg.get("momentum", 0.0))
    name = "exp_avg" if missing == "momentum_buffer" else missing
    if missing == "param":  # a selection/mask-only plan: no parameter, no state
        for k in BUFFERS[1:]:
            spec.pop(k, None)
    else:
        del spec[name]
    tw = Twin([R.RefGroup(mask_ratio=0.5, **cfg)], [spec])
    owned = list(tw.lib[0].values())
    before = snapshot(*owned)
    with pytest.raises(gmtk.InvalidArgumentError) as e:
        tw.plan.step(step=1)
    assert name in str(e.value), str(e.value)
    assert_unchanged(before, owned, "refused step")
    tw.call("select")
    tw.call("mask")
    tw.assert_buffers_equal()


@needs_gmtk
def test_closed_plan_is_refused():
    rng = np.random.default_rng(1009)
    tw = Twin([R.RefGroup(mask_ratio=0.5)], specs_for(rng, {}, [8]))
    tw.plan.close()
    before = snapshot(*tw.lib[0].values())
    with pytest.raises(gmtk.Error):
        tw.plan.step(step=1)
    assert_unchanged(before, list(tw.lib[0].values()), "closed plan")


FRESH_EMPTY = ["grad", "grad_2d", "all_buffers", "thresholds_of_empty_plan"]


@needs_gmtk
@pytest.mark.parametrize("how", FRESH_EMPTY)
def test_fresh_empty_array_is_accepted(how):
    """SPEC section 6: tensors of 0 entries are valid. numpy (>= 2) allocates an
    empty array with zero strides; it is C-contiguous (arr.flags.c_contiguous),
    so the binding must take it like any other array."""
    h = cpu_handle()
    if how == "thresholds_of_empty_plan":
        plan = gmtk.Plan(h, [gmtk.GroupConfig(gmtk.Optimizer.ADAMW)], [])
        thr, kept = np.zeros(0, np.float32), np.zeros(0, np.int64)
        assert thr.flags.c_contiguous
        plan.step(thresholds=thr, kept_counts=kept)
        return
    grad = np.zeros((0, 3) if how == "grad_2d" else 0, np.float32)
    assert grad.flags.c_contiguous and grad.size == 0
    kw = {}
    if how == "all_buffers":
        kw = dict(param=np.zeros(0, np.float32), exp_avg=np.zeros(0, np.float32), exp_avg_sq=np.zeros(0, np.float32))
    t = gmtk.Tensor(grad, **kw)
    assert t.numel == 0
    plan = gmtk.Plan(h, [g_group(R.RefGroup(mask_ratio=0.5))], [t])
    thr, kept = np.full(1, -1.0, np.float32), np.full(1, -1, np.int64)
    plan.select_thresholds(thresholds=thr, kept_counts=kept)
    assert thr[0] == 0.0 and kept[0] == 0
    if how == "all_buffers":
        plan.step(step=1)
