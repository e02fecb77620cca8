"""An independent numpy model of one gmtk step.

Written from the contract only (../shared/design/SPEC.md, docs/semantics.md,
docs/python.md, include/gmtk/gmtk.h), never from gmtk's own sources, so that
the tests in this folder compare the library with a second implementation.

Everything the library computes in fp32 is emulated here with numpy float32
arrays and np.float32 scalars: numpy rounds every float32 operation to fp32 and
never contracts a multiply and an add into an FMA, which is exactly the
"no FMA, this op order" definition of docs/semantics.md. The per-step scalars
are computed in Python floats (double) and then rounded to fp32.

bfloat16 is represented as uint16 arrays (numpy has no bfloat16), with the
conversions written here: widening is a 16-bit shift, narrowing rounds to
nearest-even (NaN stays NaN, overflow goes to infinity).

Public surface (mirrors gmtk's Python API so that tests read symmetrically):

    RefGroup(optimizer="adamw", lr=..., ...)        # torch.optim defaults
    RefTensor(grad, group=0, param=None, master_param=None, exp_avg=None,
              exp_avg_sq=None, max_exp_avg_sq=None, grad_dtype=None,
              param_dtype=None)
    plan = RefPlan(groups, tensors)                  # holds the arrays, mutates them in place
    plan.set_group_hyperparams(group, RefGroup(...))
    out = plan.select_thresholds(inv_loss_scale=None)
    out = plan.mask_gradients(inv_loss_scale=None)
    out = plan.step(step=1, step_count=None, inv_loss_scale=None)

`out` is a RefOutputs(thresholds float32[num_tensors], kept_counts
int64[num_tensors], found_inf bool, keep list of bool arrays, applied bool).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, NamedTuple, Optional

import numpy as np

FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"

ADAMW = "adamw"
ADAM = "adam"
SGD = "sgd"

PER_TENSOR = "per_tensor"
GLOBAL = "global"

MASK_GRAD = "grad"
MASK_FREEZE = "freeze"

F32 = np.float32
_ZERO = F32(0.0)


# ---------------------------------------------------------------------------
# 16-bit conversions
# ---------------------------------------------------------------------------

def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the bits are the top half."""
    u = np.asarray(u, dtype=np.uint16)
    return (u.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest-even.

    Overflow goes to +-inf (falls out of the integer rounding), NaN stays a NaN
    (quiet, sign and top payload kept)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = (bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)
    nan_bits = (bits >> np.uint64(16)) | np.uint64(0x0040)
    out = np.where(np.isnan(x), nan_bits, rounded)
    return out.astype(np.uint16)


def f32_to_f16_bits(x) -> np.ndarray:
    """float32 -> float16 bits, round to nearest-even, written out by hand.

    Used only to self-check numpy's own float32 -> float16 cast (which the
    reference uses), so that the reference does not silently depend on it."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    out = np.empty(x.shape, dtype=np.uint16)
    flat_in = x.reshape(-1).view(np.uint32)
    flat_out = out.reshape(-1)
    for i, b in enumerate(flat_in.tolist()):
        sign = (b >> 16) & 0x8000
        exp = (b >> 23) & 0xFF
        man = b & 0x7FFFFF
        if exp == 0xFF:
            flat_out[i] = sign | 0x7C00 | ((0x200 | (man >> 13)) if man else 0)
            continue
        # value = 1.man * 2^(exp-127) (normal) or 0.man * 2^-126 (subnormal)
        if exp == 0:
            mant = man          # value = mant * 2^-149
            e2 = -149
        else:
            mant = man | 0x800000
            e2 = exp - 127 - 23  # value = mant * 2^e2
        # fp16 subnormal unit is 2^-24; normal ulp is 2^(E-10) for value in [2^E, 2^(E+1))
        if mant == 0:
            flat_out[i] = sign
            continue
        E = mant.bit_length() - 1 + e2  # floor(log2(value))
        ulp_e = max(E - 10, -24)
        shift = ulp_e - e2              # value / 2^ulp_e = mant / 2^shift
        if shift <= 0:
            q = mant << (-shift)
        else:
            q = mant >> shift
            rem = mant & ((1 << shift) - 1)
            half = 1 << (shift - 1)
            if rem > half or (rem == half and (q & 1)):
                q += 1
        # q * 2^ulp_e; encode
        if ulp_e == -24 and q < 1024:
            flat_out[i] = sign | q
            continue
        # normal: q in [1024, 2048] (2048 after a carry)
        e_field = ulp_e + 10 + 15
        if q >= 2048:
            q >>= 1
            e_field += 1
        if e_field >= 31:
            flat_out[i] = sign | 0x7C00
        else:
            flat_out[i] = sign | (e_field << 10) | (q - 1024)
    return out


def infer_dtype(arr: np.ndarray, explicit: Optional[str]) -> str:
    if explicit is not None:
        return explicit
    if arr.dtype == np.float32:
        return FLOAT32
    if arr.dtype == np.float16:
        return FLOAT16
    raise ValueError(f"cannot infer a gmtk dtype from {arr.dtype}; pass it explicitly")


def widen(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32 (exact for every input)."""
    if dtype == FLOAT32:
        return np.asarray(arr, dtype=np.float32).reshape(-1).copy()
    if dtype == FLOAT16:
        return np.asarray(arr).view(np.float16).reshape(-1).astype(np.float32)
    if dtype == BFLOAT16:
        return bf16_to_f32(np.asarray(arr).view(np.uint16).reshape(-1))
    raise ValueError(dtype)


def narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> stored representation (rounded to nearest-even), flat."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == FLOAT32:
        return x.copy()
    if dtype == FLOAT16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16)  # numpy's cast is RNE with overflow to inf (self-checked)
    if dtype == BFLOAT16:
        return f32_to_bf16(x)
    raise ValueError(dtype)


# ---------------------------------------------------------------------------
# Selection keys
# ---------------------------------------------------------------------------

def keys_of(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Magnitude keys: the stored bit pattern with the sign bit cleared, as
    unsigned integers (int64 here). Orders -0 == +0, subnormals correctly,
    NaN above +inf and NaNs among themselves by payload."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if dtype == FLOAT32:
        return (flat.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64)
    if dtype in (FLOAT16, BFLOAT16):
        return (flat.view(np.uint16) & np.uint16(0x7FFF)).astype(np.int64)
    raise ValueError(dtype)


def key_to_float(key: int, dtype: str) -> np.float32:
    """The threshold as a float32 in the stored gradient's units."""
    if dtype == FLOAT32:
        return np.array([key], dtype=np.uint32).view(np.float32)[0]
    if dtype == FLOAT16:
        return np.array([key], dtype=np.uint16).view(np.float16).astype(np.float32)[0]
    if dtype == BFLOAT16:
        return bf16_to_f32(np.array([key], dtype=np.uint16))[0]
    raise ValueError(dtype)


def kept_target(n: int, ratio: float) -> int:
    """k = n - floor(r * n), the product taken in double (Python's int(r * n))."""
    masked = int(math.floor(float(ratio) * float(n)))
    return n - masked


# ---------------------------------------------------------------------------
# Configuration records
# ---------------------------------------------------------------------------

_UNSET = object()


@dataclasses.dataclass
class RefGroup:
    optimizer: str = ADAMW
    lr: float = 1e-3
    weight_decay: object = _UNSET  # AdamW: 1e-2, Adam/SGD: 0
    maximize: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    mask_ratio: float = 0.0
    scope: str = PER_TENSOR
    mask_mode: str = MASK_GRAD
    lr_device: Optional[np.ndarray] = None  # float32[1]: read at step time if set

    def __post_init__(self):
        if self.weight_decay is _UNSET:
            self.weight_decay = 1e-2 if self.optimizer == ADAMW else 0.0

    def validate(self):
        r = self.mask_ratio
        if not (isinstance(r, (int, float)) and not math.isnan(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"mask_ratio {r!r} is not in [0, 1]")


@dataclasses.dataclass
class RefTensor:
    grad: np.ndarray
    group: int = 0
    param: Optional[np.ndarray] = None
    master_param: Optional[np.ndarray] = None
    exp_avg: Optional[np.ndarray] = None
    exp_avg_sq: Optional[np.ndarray] = None
    max_exp_avg_sq: Optional[np.ndarray] = None
    grad_dtype: Optional[str] = None
    param_dtype: Optional[str] = None

    def __post_init__(self):
        self.grad_dtype = infer_dtype(self.grad, self.grad_dtype)
        if self.param is not None:
            self.param_dtype = infer_dtype(self.param, self.param_dtype)

    @property
    def numel(self) -> int:
        return int(self.grad.size)


class RefOutputs(NamedTuple):
    thresholds: np.ndarray  # float32[num_tensors]
    kept_counts: np.ndarray  # int64[num_tensors]
    found_inf: bool
    keep: List[np.ndarray]  # bool per entry, flat, per tensor
    applied: bool


def _flat_view(arr: np.ndarray) -> np.ndarray:
    """A flat view that writes through to the caller's array."""
    assert arr.flags.c_contiguous
    return arr.reshape(-1)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------

class RefPlan:
    def __init__(self, groups: List[RefGroup], tensors: List[RefTensor]):
        self.groups = [dataclasses.replace(g) for g in groups]
        for g in self.groups:
            g.validate()
        self.tensors = list(tensors)
        for i, t in enumerate(self.tensors):
            if not (0 <= t.group < len(self.groups)):
                raise ValueError(f"tensor {i}: group {t.group} out of range")
        for gi, g in enumerate(self.groups):
            if g.scope == GLOBAL:
                dts = {t.grad_dtype for t in self.tensors if t.group == gi}
                if len(dts) > 1:
                    raise NotImplementedError("global scope needs one gradient dtype per group")

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    def set_group_hyperparams(self, group: int, config: RefGroup):
        config = dataclasses.replace(config)
        config.validate()
        old = self.groups[group]
        for name in ("optimizer", "amsgrad", "scope", "mask_mode"):
            if getattr(old, name) != getattr(config, name):
                raise ValueError(f"{name} cannot change")
        self.groups[group] = config

    # -- selection -----------------------------------------------------------

    def _select(self):
        nt = len(self.tensors)
        thresholds = np.zeros(nt, dtype=np.float32)
        kept = np.zeros(nt, dtype=np.int64)
        keep: List[Optional[np.ndarray]] = [None] * nt
        for gi, g in enumerate(self.groups):
            members = [i for i, t in enumerate(self.tensors) if t.group == gi]
            if g.scope == PER_TENSOR:
                sets = [[i] for i in members]
            else:
                sets = [members] if members else []
            for s in sets:
                n = sum(self.tensors[i].numel for i in s)
                k = kept_target(n, g.mask_ratio)
                if n == 0 or k == n:
                    # nothing masked (or nothing there): T = 0, every entry kept
                    T = F32(0.0)
                    for i in s:
                        keep[i] = np.ones(self.tensors[i].numel, dtype=bool)
                elif k == 0:
                    T = F32(np.inf)
                    for i in s:
                        keep[i] = np.zeros(self.tensors[i].numel, dtype=bool)
                else:
                    dtype = self.tensors[s[0]].grad_dtype
                    ks = [keys_of(self.tensors[i].grad, dtype) for i in s]
                    allk = np.concatenate(ks)
                    tkey = int(np.sort(allk, kind="stable")[n - k])  # k-th largest
                    T = key_to_float(tkey, dtype)
                    for i, kk in zip(s, ks):
                        keep[i] = kk >= tkey
                for i in s:
                    thresholds[i] = T
                    kept[i] = int(np.count_nonzero(keep[i]))
        return thresholds, kept, keep

    @np.errstate(over="ignore", invalid="ignore")
    def _unscaled(self, i: int, inv_loss_scale) -> np.ndarray:
        t = self.tensors[i]
        g = widen(t.grad, t.grad_dtype)
        if inv_loss_scale is not None:
            g = g * _scalar_f32(inv_loss_scale)
        return g

    def _found_inf(self, inv_loss_scale) -> bool:
        for i in range(len(self.tensors)):
            if not np.all(np.isfinite(self._unscaled(i, inv_loss_scale))):
                return True
        return False

    def select_thresholds(self, inv_loss_scale=None) -> RefOutputs:
        thr, kept, keep = self._select()
        return RefOutputs(thr, kept, self._found_inf(inv_loss_scale), keep, False)

    def mask_gradients(self, inv_loss_scale=None) -> RefOutputs:
        thr, kept, keep = self._select()
        found = self._found_inf(inv_loss_scale)
        if not found:
            for t, kp in zip(self.tensors, keep):
                flat = _flat_view(t.grad)
                flat[~kp] = 0  # +0 in every dtype (all-zero bits)
        return RefOutputs(thr, kept, found, keep, not found)

    # -- the full step --------------------------------------------------------

    def step(self, step: int = 1, step_count: Optional[np.ndarray] = None,
             inv_loss_scale=None) -> RefOutputs:
        thr, kept, keep = self._select()
        found = self._found_inf(inv_loss_scale)
        if found:
            return RefOutputs(thr, kept, True, keep, False)
        t_index = int(step_count.reshape(-1)[0]) + 1 if step_count is not None else int(step)
        for i, ten in enumerate(self.tensors):
            g = self._unscaled(i, inv_loss_scale)
            _update_tensor(self.groups[ten.group], ten, g, keep[i], t_index)
        if step_count is not None:
            step_count.reshape(-1)[0] = t_index
        return RefOutputs(thr, kept, False, keep, True)


def _scalar_f32(x) -> np.float32:
    if isinstance(x, np.ndarray):
        return np.float32(x.reshape(-1)[0])
    return np.float32(x)


class StepScalars(NamedTuple):
    lr: np.float32
    wd: np.float32
    beta1: np.float32
    beta2: np.float32
    one_minus_beta1: np.float32
    one_minus_beta2: np.float32
    eps: np.float32
    step_size: np.float32
    bias_correction2_sqrt: np.float32
    decay_factor: np.float32
    momentum: np.float32
    one_minus_dampening: np.float32


def step_scalars(g: RefGroup, t: int) -> StepScalars:
    """Per-step scalars: computed in double from the hyper-parameters and t,
    then rounded to fp32 (docs/semantics.md, "Optimizer arithmetic")."""
    lr = float(g.lr)
    if g.lr_device is not None:
        lr = float(np.float32(g.lr_device.reshape(-1)[0]))
    wd = float(g.weight_decay)
    b1 = float(g.beta1)
    b2 = float(g.beta2)
    return StepScalars(
        lr=F32(lr),
        wd=F32(wd),
        beta1=F32(b1),
        beta2=F32(b2),
        one_minus_beta1=F32(1.0 - b1),
        one_minus_beta2=F32(1.0 - b2),
        eps=F32(float(g.eps)),
        step_size=F32(lr / (1.0 - b1 ** t)),
        bias_correction2_sqrt=F32(math.sqrt(1.0 - b2 ** t)),
        decay_factor=F32(1.0 - lr * wd),
        momentum=F32(float(g.momentum)),
        one_minus_dampening=F32(1.0 - float(g.dampening)),
    )


@np.errstate(over="ignore", invalid="ignore")  # IEEE overflow to inf is part of what is modelled
def _update_tensor(grp: RefGroup, ten: RefTensor, g_all: np.ndarray, keep: np.ndarray, t: int):
    n = ten.numel
    if n == 0:
        return
    if grp.mask_mode == MASK_GRAD:
        sel = np.ones(n, dtype=bool)
        g = np.where(keep, g_all, _ZERO).astype(np.float32)
    else:
        sel = keep
        g = g_all[sel]
    if not np.any(sel):
        return
    s = step_scalars(grp, t)

    master = _flat_view(ten.master_param) if ten.master_param is not None else None
    param = _flat_view(ten.param)
    if master is not None:
        p = master[sel].astype(np.float32)
    else:
        p = widen(param, ten.param_dtype)[sel]

    if grp.maximize:
        g = -g

    if grp.optimizer in (ADAMW, ADAM):
        m_buf = _flat_view(ten.exp_avg)
        v_buf = _flat_view(ten.exp_avg_sq)
        m = m_buf[sel]
        v = v_buf[sel]
        if grp.weight_decay != 0:
            if grp.optimizer == ADAMW:
                p = p * s.decay_factor
            else:
                g = g + s.wd * p
        m = s.beta1 * m + s.one_minus_beta1 * g
        v = s.beta2 * v + s.one_minus_beta2 * (g * g)
        denom_v = v
        if grp.amsgrad:
            vm_buf = _flat_view(ten.max_exp_avg_sq)
            vm = np.maximum(vm_buf[sel], v)
            vm_buf[sel] = vm
            denom_v = vm
        p = p - (s.step_size * m) / (np.sqrt(denom_v) / s.bias_correction2_sqrt + s.eps)
        m_buf[sel] = m
        v_buf[sel] = v
    elif grp.optimizer == SGD:
        if grp.weight_decay != 0:
            g = g + s.wd * p
        if grp.momentum != 0:
            b_buf = _flat_view(ten.exp_avg)
            if t == 1:
                buf = g.copy()
            else:
                buf = s.momentum * b_buf[sel] + s.one_minus_dampening * g
            b_buf[sel] = buf
            if grp.nesterov:
                g = g + s.momentum * buf
            else:
                g = buf
        p = p - s.lr * g
    else:
        raise ValueError(grp.optimizer)

    assert p.dtype == np.float32 and g.dtype == np.float32, "promoted out of fp32"
    if master is not None:
        master[sel] = p
        param[sel] = narrow(p, ten.param_dtype).view(param.dtype)
    else:
        param[sel] = narrow(p, ten.param_dtype).view(param.dtype)
