"""gmtk.torch: torch.optim optimizers whose step is one gmtk call.

``AdamW``, ``Adam`` and ``SGD`` take torch.optim's arguments and defaults plus,
per param group, ``mask_ratio``, ``scope`` ("per_tensor" or "global"),
``mask_mode`` ("grad" or "freeze") and ``master_weights``. With
``mask_ratio=0`` they are the plain optimizers. docs/python.md says what is
kept where; in short:

- CUDA parameters use gmtk's CUDA backend on the current stream, CPU
  parameters its CPU reference backend.
- Each param group has one gmtk plan and one device step counter (state
  ``step``, shared by the group's parameters); the plan is rebuilt only when
  the parameters, their gradients' storage or the set of parameters with a
  gradient change (``plan_builds`` counts builds).
- ``state_dict()`` is torch's layout, so it loads into torch.optim and back.
- ``torch.amp.GradScaler`` hands the step its scale and found_inf; nothing
  synchronizes the host.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import _gmtk

__all__ = ["AdamW", "Adam", "SGD"]

_SCOPES = {"per_tensor": _gmtk.Scope.PER_TENSOR, "global": _gmtk.Scope.GLOBAL}
_MASK_SETTINGS = ("mask_ratio", "scope", "mask_mode", "master_weights")
_MASK_MODES = {"grad": _gmtk.MaskMode.GRAD, "freeze": _gmtk.MaskMode.FREEZE}
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One gmtk handle per backend and device, shared by every optimizer of the
# process: a handle holds no per-call state and creating one queries the device.
_handles: Dict[Tuple[str, int], _gmtk.Handle] = {}


def _handle_for(device: torch.device) -> _gmtk.Handle:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index)
        backend = _gmtk.Backend.CUDA
    elif device.type == "cpu":
        key, index, backend = ("cpu", 0), 0, _gmtk.Backend.CPU_REFERENCE
    else:
        raise ValueError(f"gmtk.torch: parameters on {device} are not supported (CUDA or CPU only)")
    handle = _handles.get(key)
    if handle is None:
        handle = _handles[key] = _gmtk.Handle(backend, index)
    return handle


def _stream_for(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


class _GroupRuntime:
    """What a param group needs between steps: its plan and its device buffers."""

    def __init__(self, device: torch.device, initial_step: float = 0.0) -> None:
        self.device = device
        # The step counter outlives plans: a rebuilt plan goes on counting.
        self.step_count = torch.full((), int(initial_step), dtype=torch.int64, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.plan: Optional[_gmtk.Plan] = None
        self.key: Optional[tuple] = None
        self.hyperparams: Optional[tuple] = None
        self.params: List[torch.Tensor] = []
        self.thresholds: Optional[torch.Tensor] = None
        self.kept_counts: Optional[torch.Tensor] = None
        self.numel = 0
        self.workspace: Optional[torch.Tensor] = None
        self.stepped = False


class _GmtkOptimizer(torch.optim.Optimizer):
    """Shared machinery of AdamW, Adam and SGD; not for direct use."""

    _gmtk_optimizer: _gmtk.Optimizer
    # torch.amp.GradScaler.step then passes grad_scale and found_inf as
    # attributes instead of checking found_inf on the host.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any]) -> None:
        _check_mask_settings(defaults)
        self._runtimes: Dict[int, _GroupRuntime] = {}
        self.plan_builds = 0
        super().__init__(params, defaults)

    # ---- torch.optim.Optimizer --------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # Checked before torch appends it: a refused group leaves param_groups as it was.
        settings = {name: param_group.get(name, self.defaults[name]) for name in _MASK_SETTINGS}
        _check_mask_settings(settings)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"gmtk.torch: parameter of dtype {p.dtype}; gmtk takes float32, float16, bfloat16")
        super().add_param_group(dict(param_group, params=params))

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Also what a copy or an unpickled optimizer goes through: its plans are
        # rebuilt at the next step, its counters taken from state["step"].
        super().__setstate__(state)
        self.__dict__.setdefault("_runtimes", {})
        self.__dict__.setdefault("plan_builds", 0)
        for group in self.param_groups:
            for name in _MASK_SETTINGS + ("capturable",):
                group.setdefault(name, self.defaults[name])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        scaler_found_inf = getattr(self, "found_inf", None)
        for runtime in self._runtimes.values():
            runtime.stepped = False  # kept_fraction() covers this step's groups only
        for index, group in enumerate(self.param_groups):
            runtime = self._prepare(index, group)
            if runtime is None:
                continue
            runtime.plan.step(
                step_count=runtime.step_count,
                inv_loss_scale=_inverse_scale(runtime.device, grad_scale, scaler_found_inf),
                found_inf=runtime.found_inf,
                thresholds=runtime.thresholds,
                kept_counts=runtime.kept_counts,
                workspace=runtime.workspace,
                stream=_stream_for(runtime.device),
            )
            runtime.stepped = True
        return loss

    def state_dict(self) -> Dict[str, Any]:
        packed = super().state_dict()
        # Live, a group's parameters share its int64 device counter; torch.optim
        # writes one float32 CPU tensor per parameter, and so does this.
        step_values: Dict[int, float] = {}
        state = packed["state"]
        for index, entry in list(state.items()):
            if "step" in entry:
                counter = entry["step"]
                if id(counter) not in step_values:
                    step_values[id(counter)] = float(counter.item())
                state[index] = dict(entry, step=torch.tensor(step_values[id(counter)], dtype=torch.float32))
        return packed

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch casts state to each parameter's dtype; gmtk keeps it in fp32, so
        # take the fp32 values from the dict itself.
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        own_params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in saved_groups for i in group["params"]]
        if len(own_params) != len(saved_ids):
            raise ValueError("loaded state dict holds a different number of parameters than this optimizer")
        # Refused before anything changes: one step per group.
        position = 0
        for index, saved_group in enumerate(saved_groups):
            steps = set()
            for saved_id in saved_group["params"]:
                entry = saved_state.get(saved_id, {})
                if "step" in entry:
                    steps.add(float(entry["step"]))
            position += len(saved_group["params"])
            if len(steps) > 1:
                raise ValueError(
                    f"param_groups[{index}]: its parameters' state has different steps {sorted(steps)}; "
                    "gmtk keeps one step counter per param group: split the group"
                )
        fp32_state = {}
        for p, saved_id in zip(own_params, saved_ids):
            entry = saved_state.get(saved_id)
            if entry is None:
                continue
            fp32_state[p] = {
                name: value.detach().to(device=p.device, dtype=torch.float32).contiguous()
                for name, value in entry.items()
                if name != "step" and isinstance(value, torch.Tensor)
            }
        super().load_state_dict(state_dict)
        self._runtimes.clear()
        for index, group in enumerate(self.param_groups):
            steps = set()
            for p in group["params"]:
                if p not in self.state:
                    continue
                entry = self.state[p]
                entry.update(fp32_state.get(p, {}))
                if "step" in entry:
                    steps.add(float(entry.pop("step")))
                elif entry.get("momentum_buffer") is not None:
                    steps.add(1.0)  # torch.optim.SGD keeps no step; a buffer means it stepped
            if not steps:
                continue
            stepped = [p for p in group["params"] if p in self.state]
            runtime = _GroupRuntime(stepped[0].device, steps.pop())
            self._runtimes[index] = runtime
            for p in stepped:
                self.state[p]["step"] = runtime.step_count

    # ---- Logging ---------------------------------------------------------------------

    def kept_fraction(self) -> torch.Tensor:
        """Kept entries / entries over the groups of the last step: a 0-dim
        float32 tensor on the device, computed without a host synchronization."""
        runtimes = [r for r in self._runtimes.values() if r.stepped]
        if not runtimes:
            return torch.ones((), dtype=torch.float32)
        device = runtimes[0].device
        kept = sum(r.kept_counts.sum().to(device) for r in runtimes)
        total = sum(r.numel for r in runtimes)
        return (kept.to(torch.float64) / max(total, 1)).to(torch.float32)

    def last_thresholds(self, group: int = 0) -> torch.Tensor:
        """The threshold of each parameter of the group that had a gradient at the last step."""
        return self._stepped_runtime(group).thresholds

    def last_kept_counts(self, group: int = 0) -> torch.Tensor:
        """Entries kept (|g| >= T) in each parameter of the group at the last step."""
        return self._stepped_runtime(group).kept_counts

    def last_found_inf(self, group: int = 0) -> torch.Tensor:
        """1.0 if the group's last step met a non-finite gradient (and was skipped), else 0.0."""
        return self._stepped_runtime(group).found_inf

    # ---- Internals -----------------------------------------------------------------------

    def _stepped_runtime(self, group: int) -> _GroupRuntime:
        runtime = self._runtimes.get(group)
        if runtime is None or not runtime.stepped:
            raise RuntimeError(f"param_groups[{group}] has not stepped yet")
        return runtime

    def _prepare(self, index: int, group: Dict[str, Any]) -> Optional[_GroupRuntime]:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        device = params[0].device
        for p in params:
            if p.device != device:
                raise ValueError(f"param_groups[{index}] has parameters on {device} and {p.device}; "
                                 "gmtk steps a group on one device")
            if p.grad.is_sparse:
                raise ValueError("gmtk.torch does not support sparse gradients")
        runtime = self._runtimes.get(index)
        if runtime is None or runtime.device != device:
            runtime = _GroupRuntime(device, self._existing_step(group, device))
            self._runtimes[index] = runtime
        if group.get("capturable") and device.type != "cuda":
            raise ValueError("capturable=True needs CUDA parameters")

        key = self._plan_key(group, params, runtime, device)
        if key != runtime.key:
            self._build_plan(index, group, params, runtime)
            runtime.key = self._plan_key(group, params, runtime, device)
        hyperparams = self._hyperparams(group)
        if hyperparams != runtime.hyperparams:
            runtime.plan.set_group_hyperparams(0, self._group_config(group, runtime.device))
            runtime.hyperparams = hyperparams
        return runtime

    def _build_plan(self, index: int, group: Dict[str, Any], params: List[torch.Tensor],
                    runtime: _GroupRuntime) -> None:
        tensors = []
        for position, p in enumerate(params):
            if not p.grad.is_contiguous():
                raise ValueError(f"param_groups[{index}]: the gradient of parameter {position} is not contiguous")
            if not p.is_contiguous():
                raise ValueError(f"param_groups[{index}]: parameter {position} is not contiguous")
            state = self._state_for(p, group, runtime)
            tensors.append(_gmtk.Tensor(
                p.grad.detach(),
                param=p.detach(),
                master_param=state.get("master_param"),
                exp_avg=state.get(self._first_moment_name),
                exp_avg_sq=state.get("exp_avg_sq"),
                max_exp_avg_sq=state.get("max_exp_avg_sq"),
            ))
        runtime.plan = None  # the old plan's captured pointers go before the new plan is made
        runtime.plan = _gmtk.Plan(_handle_for(runtime.device), [self._group_config(group, runtime.device)],
                                  tensors, allocate_workspace=False, hold_gradients=False)
        size = runtime.plan.workspace_size
        # The caching allocator's memory: no cudaMalloc and no synchronization.
        runtime.workspace = torch.empty(size, dtype=torch.uint8, device=runtime.device) if size else None
        runtime.params = params
        runtime.thresholds = torch.zeros(len(params), dtype=torch.float32, device=runtime.device)
        runtime.kept_counts = torch.zeros(len(params), dtype=torch.int64, device=runtime.device)
        runtime.numel = sum(p.numel() for p in params)
        runtime.hyperparams = self._hyperparams(group)
        self.plan_builds += 1

    def _plan_key(self, group: Dict[str, Any], params: List[torch.Tensor], runtime: _GroupRuntime,
                  device: torch.device) -> tuple:
        """Everything a plan captured. The plan borrows the gradients (it does not
        keep them alive, so that the allocator can give a freed .grad's memory to
        the next backward): their addresses and sizes, like the parameters' and
        the state's, are checked against the plan's before every step."""
        structure = (group["scope"], group["mask_mode"], bool(group.get("amsgrad", False)),
                     bool(group["master_weights"]), self._needs_momentum_buffer(group), _stream_for(device))
        return (structure,) + tuple(
            (p.data_ptr(), p.grad.data_ptr(), p.numel(), p.grad.numel(), p.grad.dtype, p.grad.is_contiguous())
            + tuple(value.data_ptr() for value in (self.state[p].values() if p in self.state else ())
                    if isinstance(value, torch.Tensor) and value is not runtime.step_count)
            for p in params)

    def _existing_step(self, group: Dict[str, Any], device: torch.device) -> float:
        """The group's step where state already has one (an optimizer copied or
        unpickled with its state), else 0."""
        for p in group["params"]:
            step = self.state[p].get("step") if p in self.state else None
            if step is not None:
                return float(step)
        return 0.0

    def _state_for(self, p: torch.Tensor, group: Dict[str, Any], runtime: _GroupRuntime) -> Dict[str, Any]:
        state = self.state[p]
        zeros = lambda: torch.zeros(p.shape, dtype=torch.float32, device=p.device)  # noqa: E731
        for name in self._state_names(group):
            if state.get(name) is None:
                state[name] = zeros()
        if group["master_weights"] and p.dtype in _SIXTEEN_BIT and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32).clone()
        state["step"] = runtime.step_count
        return state

    def _group_config(self, group: Dict[str, Any], device: torch.device) -> _gmtk.GroupConfig:
        config = _gmtk.GroupConfig(
            self._gmtk_optimizer,
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group.get("maximize", False)),
            mask_ratio=float(group["mask_ratio"]),
            scope=_SCOPES[group["scope"]],
            mask_mode=_MASK_MODES[group["mask_mode"]],
        )
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != device or lr.dtype != torch.float32 or lr.numel() != 1:
                raise ValueError(f"a tensor lr must be one float32 entry on {device} (the device the step reads it on)")
            config.lr_device = lr.detach()
        else:
            config.lr = float(lr)
        self._configure(config, group)
        return config

    def _hyperparams(self, group: Dict[str, Any]) -> tuple:
        lr = group["lr"]
        lr_key = ("tensor", lr.data_ptr()) if isinstance(lr, torch.Tensor) else float(lr)
        return (lr_key, group["weight_decay"], group.get("maximize"), group["mask_ratio"]) + self._own_hyperparams(group)

    # Per optimizer (overridden).
    _first_moment_name = "exp_avg"

    def _state_names(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        raise NotImplementedError

    def _needs_momentum_buffer(self, group: Dict[str, Any]) -> bool:
        return False

    def _configure(self, config: _gmtk.GroupConfig, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _own_hyperparams(self, group: Dict[str, Any]) -> tuple:
        raise NotImplementedError


def _check_mask_settings(settings: Dict[str, Any]) -> None:
    ratio = settings.get("mask_ratio", 0.0)
    if isinstance(ratio, torch.Tensor) or not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"mask_ratio must be a float in [0, 1], got {ratio!r}")
    if settings.get("scope", "per_tensor") not in _SCOPES:
        raise ValueError(f"scope must be one of {sorted(_SCOPES)}, got {settings.get('scope')!r}")
    if settings.get("mask_mode", "grad") not in _MASK_MODES:
        raise ValueError(f"mask_mode must be one of {sorted(_MASK_MODES)}, got {settings.get('mask_mode')!r}")
    if settings.get("differentiable"):
        raise ValueError("gmtk.torch optimizers are not differentiable")


def _inverse_scale(device: torch.device, grad_scale: Optional[torch.Tensor],
                   found_inf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The scalar the library multiplies gradients by: 1 / scale as torch's
    unscale computes it (in double, then float), or NaN when GradScaler found
    an inf, which makes the library skip the step on the device."""
    if grad_scale is None and found_inf is None:
        return None
    # A copy to the host must be complete before the CPU backend reads it.
    non_blocking = device.type == "cuda"
    if grad_scale is not None:
        inverse = grad_scale.to(device, non_blocking=non_blocking).double().reciprocal().float().reshape(())
    else:
        inverse = torch.ones((), dtype=torch.float32, device=device)
    if found_inf is not None:
        inverse = torch.where(found_inf.to(device, non_blocking=non_blocking).reshape(()) > 0,
                              torch.full_like(inverse, math.nan), inverse)
    return inverse


def _mask_defaults(mask_ratio: float, scope: str, mask_mode: str, master_weights: bool) -> Dict[str, Any]:
    return {"mask_ratio": mask_ratio, "scope": scope, "mask_mode": mask_mode, "master_weights": master_weights}


class _AdamFamily(_GmtkOptimizer):
    def _state_names(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _configure(self, config: _gmtk.GroupConfig, group: Dict[str, Any]) -> None:
        config.beta1, config.beta2 = (float(b) for b in group["betas"])
        config.eps = float(group["eps"])
        config.amsgrad = bool(group["amsgrad"])

    def _own_hyperparams(self, group: Dict[str, Any]) -> tuple:
        return (tuple(group["betas"]), group["eps"])


class AdamW(_AdamFamily):
    """torch.optim.AdamW (decoupled weight decay) with gradient-mask tuning.

    Arguments as torch.optim.AdamW (``foreach`` and ``fused`` are accepted and
    ignored: the step is always gmtk's fused one), plus ``mask_ratio`` (the
    fraction of each tensor's, or the group's, entries to mask), ``scope``,
    ``mask_mode`` and ``master_weights``.
    """

    _gmtk_optimizer = _gmtk.Optimizer.ADAMW

    def __init__(self, params: Iterable, lr: Any = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, mask_ratio: float = 0.0,
                 scope: str = "per_tensor", mask_mode: str = "grad", master_weights: bool = False) -> None:
        _check_adam_arguments(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
                        **_mask_defaults(mask_ratio, scope, mask_mode, master_weights))
        super().__init__(params, defaults)


class Adam(_AdamFamily):
    """torch.optim.Adam (L2 weight decay in the gradient) with gradient-mask
    tuning; arguments as :class:`AdamW`, weight_decay 0 by default."""

    _gmtk_optimizer = _gmtk.Optimizer.ADAM

    def __init__(self, params: Iterable, lr: Any = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, mask_ratio: float = 0.0,
                 scope: str = "per_tensor", mask_mode: str = "grad", master_weights: bool = False) -> None:
        _check_adam_arguments(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=False,
                        **_mask_defaults(mask_ratio, scope, mask_mode, master_weights))
        super().__init__(params, defaults)


class SGD(_GmtkOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay) with
    gradient-mask tuning; the momentum buffer is state ``momentum_buffer``."""

    _gmtk_optimizer = _gmtk.Optimizer.SGD
    _first_moment_name = "momentum_buffer"

    def __init__(self, params: Iterable, lr: Any = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 capturable: bool = False, mask_ratio: float = 0.0, scope: str = "per_tensor",
                 mask_mode: str = "grad", master_weights: bool = False) -> None:
        if not isinstance(lr, torch.Tensor) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, capturable=capturable,
                        **_mask_defaults(mask_ratio, scope, mask_mode, master_weights))
        super().__init__(params, defaults)

    def _state_names(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("momentum_buffer",) if self._needs_momentum_buffer(group) else ()

    def _needs_momentum_buffer(self, group: Dict[str, Any]) -> bool:
        return group["momentum"] != 0

    def _configure(self, config: _gmtk.GroupConfig, group: Dict[str, Any]) -> None:
        config.momentum = float(group["momentum"])
        config.dampening = float(group["dampening"])
        config.nesterov = bool(group["nesterov"])

    def _own_hyperparams(self, group: Dict[str, Any]) -> tuple:
        return (group["momentum"], group["dampening"], group["nesterov"])


def _check_adam_arguments(lr: Any, betas: Tuple[float, float], eps: float, weight_decay: float) -> None:
    if not isinstance(lr, torch.Tensor) and lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
