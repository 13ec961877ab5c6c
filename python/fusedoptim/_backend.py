"""Which native path runs, and the fallback to torch.

Every fusedoptim optimizer is a subclass of its torch.optim counterpart that
replaces ``step()`` with :meth:`FusedOptimizerMixin.step`. A step runs in two
phases so that a raised error leaves params and state exactly as they were:

1. *Check* (nothing is written): hyperparameters are validated, every
   param's grad is compared with its param, and each param is routed to the
   native kernels or to torch's own implementation.
2. *Run*: missing state is created with torch's layout, then one native call
   per (group, dtype) bucket updates all its tensors, and the params the
   kernels do not cover go through torch's for-loop/foreach code.

The routing and the pointer tables of a group are cached in a
:class:`_C.StepPlan` (see Note [cached step plans] in csrc/bindings/step_plan.h).
Each step it checks itself from C (the same params, addresses, sizes, dtypes
and contiguity, the same grads present, the same ``optimizer.state`` entries
and state tensors) and reads the grads' addresses; only when something
changed does Python run the full check above again. A step over thousands of
small tensors therefore costs one ``collect`` and one ``run`` call per group.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from . import _C, _cuda, _ops, _precision
from ._precision import OPTION_DEFAULTS, Options

__all__ = [
    "backend_info",
    "get_num_threads",
    "set_num_threads",
    "set_cpu_isa",
    "get_cpu_isa",
]

#: torch dtype -> dtype code of the compiled module.
DTYPE_CODES: Dict[torch.dtype, int] = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.float16: _C.DTYPE_FLOAT16,
}

_num_threads: Optional[int] = None


def set_num_threads(num_threads: Optional[int]) -> None:
    """Set the number of threads of the CPU kernels (all optimizers).

    ``None`` (the default) follows :func:`torch.get_num_threads` at every step.
    An optimizer's own ``num_threads`` attribute, when set, takes precedence.
    """
    global _num_threads
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    _num_threads = num_threads


def get_num_threads() -> int:
    """Threads the CPU kernels use when an optimizer sets none of its own."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def set_cpu_isa(name: str) -> None:
    """Force a CPU variant: ``"scalar"``, ``"avx2"`` or ``"avx512"``.

    Raises ValueError for an unknown name and RuntimeError for a variant this
    build or this CPU cannot run. The environment variable
    ``FUSEDOPTIM_CPU_ISA`` does the same at import time.
    """
    _C.set_cpu_isa(name)


def get_cpu_isa() -> str:
    """The CPU variant in use (``"scalar"``, ``"avx2"`` or ``"avx512"``)."""
    return _C.get_cpu_isa()


def backend_info() -> Dict[str, Any]:
    """What was compiled, the CPU features found and the variant in use.

    Keys: ``version``, ``compiled_isas``, ``supported_isas``, ``isa``,
    ``vector_width``, ``cpu_features``, ``isa_request`` (the value of
    ``FUSEDOPTIM_CPU_ISA``, or None) and ``isa_request_honored``,
    ``num_threads``, ``threading``, ``compiler``, ``cuda_compiled``,
    ``cuda_available`` with ``cuda_reason``, and ``torch_version``.
    """
    info = dict(_C.backend_info())
    request = os.environ.get("FUSEDOPTIM_CPU_ISA") or None
    info["isa_request"] = request
    info["isa_request_honored"] = request is None or request == info["isa"]
    info["num_threads"] = get_num_threads()
    cuda = _cuda.info()
    info["cuda_available"] = bool(cuda["available"])
    info["cuda_reason"] = cuda["reason"] or None
    info["cuda"] = cuda
    info["torch_version"] = torch.__version__
    return info


def _warn_ignored_isa_request() -> None:
    request = os.environ.get("FUSEDOPTIM_CPU_ISA")
    if request and request != _C.get_cpu_isa():
        import warnings

        supported = _C.backend_info()["supported_isas"]
        warnings.warn(
            f"FUSEDOPTIM_CPU_ISA={request!r} cannot be used here (supported: {supported}); "
            f"using {_C.get_cpu_isa()!r}",
            RuntimeWarning,
            stacklevel=3,
        )


def _unhooked(fn: Callable) -> Callable:
    """torch wraps ``Optimizer.step`` with its hook runner; get the inner step."""
    while getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _scalar(value: Any, name: str) -> float:
    """A hyperparameter as a Python float (tensors of one element allowed)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}") from None
    if out != out:
        raise ValueError(f"Invalid {name}: nan")
    return out


def _hyper(value: Any, name: str, upper: float = math.inf) -> float:
    """A hyperparameter that must lie in [0, upper): torch's message otherwise."""
    out = _scalar(value, name)
    if not 0.0 <= out < upper:
        raise ValueError(f"Invalid {name}: {out}")
    return out


class _Bucket:
    """One native call: the tensors of one group that share a dtype."""

    __slots__ = ("code", "index", "params", "numels", "pptrs", "streams", "steps", "first", "refs", "ids")

    def __init__(self, code: int) -> None:
        self.code = code
        self.index: List[int] = []  # positions in the group's params-with-grad list
        self.params: List[Tensor] = []
        self.numels: List[int] = []
        self.pptrs: List[int] = []
        self.streams: Dict[str, List[int]] = {}
        self.steps: List[int] = []
        self.first: List[bool] = []
        self.refs: List[Tensor] = []  # keeps every tensor we hold a pointer to alive
        self.ids: List[int] = []  # stochastic rounding: the params' positions in the optimizer


class _Plan:
    """Routing and pointer tables of one param group, valid while unchanged."""

    __slots__ = ("built", "state_dicts", "state_keys", "buckets", "fallback", "native", "cuda", "cuda_native", "opts")

    def __init__(self) -> None:
        self.built = False  # state created and tables filled (phase 2)
        self.state_dicts: List[dict] = []  # per native param, in bucket order
        self.state_keys: Tuple[str, ...] = ()
        self.native: Optional[_C.StepPlan] = None  # the same tables, checked and run from C
        self.buckets: List[_Bucket] = []
        self.fallback: List[int] = []  # positions that torch updates
        self.cuda: List[int] = []  # positions the CUDA kernels update (real or emulated)
        self.cuda_native: Optional[_CudaPlan] = None  # cached CUDA batches, for groups that are all CUDA
        self.opts: Optional[Options] = None  # the precision options the plan was built for


class _CudaPlan:
    """A group whose params all go to the CUDA kernels: a :class:`_C.StepPlan`
    that checks the group from C each step and reads its grads' addresses,
    and the cached batches (addresses of params and state) those feed."""

    __slots__ = ("native", "batches", "emulated")

    def __init__(self, native: "_C.StepPlan", batches: List["_cuda.Batch"]) -> None:
        self.native = native
        self.batches = batches
        self.emulated = _cuda.emulating()  # host addresses for the emulated kernels


def _plain(t: Tensor) -> bool:
    """A tensor whose storage is its own memory: not a wrapper subclass such
    as FSDP2's DTensor (whose data lives in a local shard), a fake or a
    functional tensor. Only these have a data pointer the kernels can use."""
    return type(t).__torch_dispatch__ is _TENSOR_DISPATCH and (t.numel() == 0 or t.data_ptr() != 0)


_TENSOR_DISPATCH = torch.Tensor.__torch_dispatch__


def _local(t: Tensor) -> Tensor:
    """The memory the kernels update: a DTensor's local shard (FSDP2 and
    other sharded params, whose optimizer state is sharded alike), else the
    tensor itself. The update is element-wise, so a shard updates like a
    whole tensor."""
    if type(t).__name__ == "DTensor":
        local = getattr(t, "_local_tensor", None)
        if isinstance(local, Tensor):
            return local
    return t


def _same_sharding(p: Tensor, g: Tensor) -> bool:
    """A DTensor param and its grad must be laid out alike for their shards to match."""
    if p is _local(p) and g is _local(g):
        return True
    if p is _local(p) or g is _local(g):
        return False
    try:
        return (p.placements == g.placements and p.device_mesh == g.device_mesh  # type: ignore[attr-defined]
                and _local(p).shape == _local(g).shape)
    except Exception:
        return False


def _grads_of(params: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    ps, gs = [], []
    for p in params:
        g = p.grad
        if g is not None:
            ps.append(p)
            gs.append(g)
    return ps, gs


def _step_dtype() -> torch.dtype:
    # torch keeps `step` in float32 unless the default dtype is float64.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _unscale_(grads: List[Tensor], grad_scale: Tensor) -> None:
    """Divide grads by the AMP scale in place, as torch's fused kernels do."""
    by_device: Dict[torch.device, List[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        torch._foreach_div_(gs, grad_scale.to(device))


class FusedOptimizerMixin:
    """The step shared by fusedoptim's optimizers; see the module docstring.

    A subclass names the torch class it replaces (``_torch_cls``) and gives
    the per-optimizer pieces: ``_fo_hyper``, ``_fo_state_keys``,
    ``_fo_check_grad``, ``_fo_state_usable``, ``_fo_init_state`` and
    ``_fo_native``.
    """

    _torch_cls: type
    _fo_has_step: bool = False
    #: The clip coefficient of max_grad_norm for this step's kernels (None: no clipping).
    _fo_clip: Any = None
    #: Threads of the CPU kernels for this optimizer; None follows
    #: :func:`fusedoptim.get_num_threads`.
    num_threads: Optional[int] = None

    # -- public ---------------------------------------------------------------
    @property
    def last_backends(self) -> List[str]:
        """Which backend each param group took on the last step.

        One entry per group: ``"native-cpu/<isa>"``, ``"torch"``, both joined
        with ``+`` when only some params of the group could use the kernels,
        ``"none"`` for a group without grads, or ``"skipped (found_inf)"``.
        """
        return list(self.__dict__.get("_fo_last", []))

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """With ``max_grad_norm``: the global grad norm of the last step (a
        0-d float32 tensor, what ``clip_grad_norm_`` returns), else None."""
        return self.__dict__.get("_fo_last_norm")

    def torch_state_dict(self) -> Dict[str, Any]:
        """A ``state_dict`` for torch.optim: without the state of fusedoptim's
        precision options (``master_param``, ``kahan_comp``, SGD's ``step``)
        and with the moments in each param's dtype, as torch keeps them.

        Warns (UserWarning) when something is dropped: e.g. torch keeps no
        fp32 master copy, so the params' rounded values carry on.
        """
        sd = self.state_dict()  # type: ignore[attr-defined]
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        dropped = set()
        new_state = {}
        for pid, st in sd["state"].items():
            p = params[pid] if isinstance(pid, int) and pid < len(params) else None
            out = {}
            for key, v in st.items():
                if key in _precision.EXTRA_KEYS or (key == "step" and not self._fo_has_step):
                    dropped.add(key)
                    continue
                if key in _precision.MOMENT_KEYS and isinstance(v, Tensor) and p is not None and v.dtype != p.dtype:
                    v = v.to(p.dtype)
                    dropped.add(f"{key} precision")
                out[key] = v
            new_state[pid] = out
        groups = []
        for g in sd["param_groups"]:
            g = {k: v for k, v in g.items() if k not in OPTION_DEFAULTS and k != "sr_seed"}
            groups.append(g)
        if dropped:
            import warnings

            warnings.warn(
                "torch_state_dict(): dropped fusedoptim-only state torch.optim does not use: "
                + ", ".join(sorted(dropped)),
                UserWarning,
                stacklevel=2,
            )
        return {"state": new_state, "param_groups": groups}

    # -- torch.optim.Optimizer protocol ------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        if self.__dict__.get("_fo_options_set"):  # (after __init__; torch's __init__ adds groups too)
            groups = self.param_groups  # type: ignore[attr-defined]
            try:
                self._fo_check_group_options(groups[-1], len(groups) - 1)
            except Exception:
                groups.pop()  # as torch, a rejected group is not added
                raise

    def _fo_setup_options(self, options: Dict[str, Any]) -> None:
        """Validate the precision options of the constructor and store them in
        ``defaults`` and every group (they are param-group options, so a group
        may override them). With every option off nothing is stored: the
        defaults, groups and state_dicts stay exactly torch's."""
        _precision.check_options(options)
        options = dict(options)
        if any(options[k] != v for k, v in OPTION_DEFAULTS.items()):
            if options["stochastic_rounding"]:
                options["sr_seed"] = _precision.draw_seed()
            self.defaults.update(options)  # type: ignore[attr-defined]
            for group in self.param_groups:  # type: ignore[attr-defined]
                for k, v in options.items():
                    group.setdefault(k, v)
        for gi, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            self._fo_check_group_options(group, gi)
        self._fo_options_set = True

    def _fo_check_group_options(self, group: Dict[str, Any], gi: int) -> None:
        _precision.check_options({k: group.get(k, v) for k, v in OPTION_DEFAULTS.items()})
        if group.get("stochastic_rounding") and "sr_seed" not in group:
            group["sr_seed"] = _precision.draw_seed()
        _precision.check_group(self._fo_opts(group), group, gi)

    def _fo_opts(self, group: Dict[str, Any]) -> Options:
        get = group.get
        return Options(bool(get("master_weights", False)), bool(get("stochastic_rounding", False)),
                       bool(get("kahan_summation", False)), get("state_dtype"), get("max_grad_norm"),
                       int(get("sr_seed", 0)))

    def _fo_uses_step(self, group: Dict[str, Any]) -> bool:
        """Whether params of this group keep a float32 ``step`` the kernels count."""
        return self._fo_has_step or bool(group.get("stochastic_rounding", False))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._fo_plans = {}
        # torch's loader casts every floating state tensor to its param's
        # dtype; the precision options keep other dtypes (fp32 master and
        # moments, bf16 moments). Keep the saved tensors and cast them here.
        saved = []
        for g_saved, g in zip(state_dict.get("param_groups", []), self.param_groups):  # type: ignore[attr-defined]
            for sid, p in zip(g_saved.get("params", []), g["params"]):
                st = state_dict.get("state", {}).get(sid)
                if isinstance(st, dict):
                    for key, v in st.items():
                        if isinstance(v, Tensor) and (key in _precision.MOMENT_KEYS or key in _precision.EXTRA_KEYS):
                            saved.append((p, key, v))
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # A checkpoint without the options (e.g. torch's) keeps this optimizer's.
        for gi, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            for k in OPTION_DEFAULTS:
                if k in self.defaults:  # type: ignore[attr-defined]
                    group.setdefault(k, self.defaults[k])  # type: ignore[attr-defined]
            if group.get("stochastic_rounding") and "sr_seed" not in group:
                group["sr_seed"] = self.defaults.get("sr_seed", 0) or _precision.draw_seed()  # type: ignore[attr-defined]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        dropped = set()
        for p, key, v in saved:
            o = self._fo_opts(group_of[id(p)])
            st = self.state[p]  # type: ignore[attr-defined]
            if key in _precision.EXTRA_KEYS and key != o.extra_key:
                st.pop(key, None)
                dropped.add(key)
            elif p.is_floating_point():
                st[key] = v.to(dtype=o.key_dtype(p, key), device=p.device)
        if dropped:
            import warnings

            warnings.warn(
                f"load_state_dict: ignored state of precision options this optimizer does not use: "
                f"{', '.join(sorted(dropped))}",
                UserWarning,
                stacklevel=2,
            )
        self._fo_plans = {}

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state = dict(state)
        state["num_threads"] = self.__dict__.get("num_threads")
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        num_threads = state.pop("num_threads", None)
        super().__setstate__(state)  # type: ignore[misc]
        self.num_threads = num_threads
        self._fo_plans = {}

    # -- the step -------------------------------------------------------------------
    @_ops.compile_aware  # under torch.compile: _ops.compiled_step, custom ops, no graph break
    @_use_grad_for_differentiable
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        return self._fo_step(closure)

    def _fo_step(self, closure: Optional[Callable[[], Any]]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # AMP: with fused=True torch's GradScaler hands the scale and the inf
        # flag to the step (_step_supports_amp_scaling) instead of unscaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # A found_inf on a GPU (or under CUDA emulation) goes to the kernels
        # as a pointer: reading it here would be a host sync.
        defer_inf = found_inf is not None and (found_inf.device.type != "cpu" or _cuda.emulating())
        if found_inf is not None and not defer_inf and bool(found_inf.item()):
            self._fo_last = ["skipped (found_inf)"] * len(self.param_groups)  # type: ignore[attr-defined]
            return loss

        plans: Dict[int, Tuple[dict, _Plan]] = self.__dict__.setdefault("_fo_plans", {})
        state_all = self.state  # type: ignore[attr-defined]
        emulating = _cuda.emulating()  # cached plans hold to the mode they were built in

        # Phase 1: check everything, write nothing.
        work = []
        try:
            for group in self.param_groups:  # type: ignore[attr-defined]
                hyper = None
                cached = plans.get(id(group))
                plan = cached[1] if cached is not None and cached[0] is group else None
                if plan is not None and plan.opts != self._fo_opts(group):
                    plan = None  # built for other precision options
                if (
                    plan is not None
                    and plan.native is not None
                    and not plan.fallback
                    and not plan.cuda
                    and not emulating
                    and plan.state_keys == self._fo_state_keys(group)
                ):
                    # Fast path: the cached plan checks itself in C.
                    hyper = self._fo_hyper(group)
                    if plan.native.collect(group["params"], state_all) == 0:
                        work.append((group, plan, None, None, hyper, True))
                        continue
                elif (
                    plan is not None
                    and plan.cuda_native is not None
                    and plan.cuda_native.emulated == emulating
                    and plan.state_keys == self._fo_state_keys(group)
                ):
                    # The same for a group that is all CUDA.
                    hyper = self._fo_hyper(group)
                    if plan.cuda_native.native.collect(group["params"], state_all) == 0:
                        work.append((group, plan, None, None, hyper, "cuda"))
                        continue
                ps, gs = _grads_of(group["params"])
                if not ps:
                    work.append((group, None, ps, gs, None, False))
                    continue
                if hyper is None:
                    hyper = self._fo_hyper(group)
                # The general path checks everything again, every time.
                plan = self._fo_route(group, ps, gs)
                work.append((group, plan, ps, gs, hyper, False))

            if defer_inf and any(w[1] is not None and (w[1].buckets or w[1].fallback) for w in work):
                # Work outside the CUDA kernels cannot read the flag on the device.
                if bool(found_inf.item()):  # type: ignore[union-attr]
                    self._fo_last = ["skipped (found_inf)"] * len(self.param_groups)  # type: ignore[attr-defined]
                    return loss
                defer_inf = False
            if grad_scale is not None:
                # The CUDA kernels unscale their own grads in place; the rest here.
                grads = []
                for w in work:
                    wg = w[3] if w[3] is not None else _grads_of(w[0]["params"])[1]
                    skip = set(w[1].cuda) if w[1] is not None else ()
                    grads.extend(g for k, g in enumerate(wg) if k not in skip)
                if grads:
                    _unscale_(grads, grad_scale)

            threads = self.num_threads if self.num_threads is not None else get_num_threads()
            # max_grad_norm: the global norm of all grads (after AMP
            # unscaling), before anything is updated.
            self._fo_clip = None
            max_norm = self._fo_max_grad_norm()
            if max_norm is not None:
                self._fo_clip = self._fo_grad_norm(work, max_norm, threads, grad_scale)

            # Phase 2: create missing state, run the kernels, then torch.
            names: List[str] = []
            fallback_groups: List[Dict[str, Any]] = []
            isa = _C.get_cpu_isa()
            cuda_name = "native-cuda" + ("-emulated" if _cuda.emulating() else "")
            for group, plan, ps, gs, hyper, fast in work:
                if plan is None:
                    names.append("none")
                    continue
                if fast == "cuda":
                    cp = plan.cuda_native
                    gptrs = cp.native.take_grad_ptrs()
                    for b in cp.batches:
                        self._fo_cuda_call(b, gptrs[b.lo:b.hi], hyper, grad_scale, found_inf if defer_inf else None)
                    names.append(cuda_name)
                    continue
                if not plan.built:
                    self._fo_build(plan, group, ps)
                    plans[id(group)] = (group, plan)
                    if plan.native is not None and not plan.fallback:
                        fast = plan.native.collect(group["params"], state_all) == 0
                used = []
                if fast:
                    self._fo_run_plan(plan.native, group, hyper, threads)
                    used.append(f"native-cpu/{isa}")
                elif plan.buckets:
                    for bucket in plan.buckets:
                        gptrs, keep = _grad_ptrs(bucket, gs)
                        self._fo_native(bucket, group, hyper, gptrs, threads)
                        del keep
                        if any(bucket.first):
                            bucket.first = [False] * len(bucket.first)
                    if plan.native is not None:
                        plan.native.clear_first()
                    used.append(f"native-cpu/{isa}")
                if plan.cuda:
                    batches = self._fo_run_cuda(
                        group, [ps[i] for i in plan.cuda], [gs[i] for i in plan.cuda], hyper,
                        grad_scale, found_inf if defer_inf else None,
                    )
                    if not plan.buckets and not plan.fallback:
                        plan.cuda_native = self._fo_build_cuda(group, ps, plan, batches)
                    used.append(cuda_name)
                if plan.fallback:
                    sub = dict(group)
                    sub["params"] = [ps[i] for i in plan.fallback]
                    if all(p.device.type == "cpu" for p in sub["params"]):
                        # Never torch's fused CPU kernels: they ignore strides.
                        sub["fused"] = False
                    fallback_groups.append(sub)
                    used.append("torch")
                names.append("+".join(used))
        finally:
            for w in work:
                if w[1] is not None and w[1].native is not None:
                    w[1].native.release()
                if w[1] is not None and w[1].cuda_native is not None:
                    w[1].cuda_native.native.release()

        if fallback_groups:
            self._fo_torch_step(fallback_groups)
        self._fo_last = names  # type: ignore[attr-defined]
        return loss

    def _fo_torch_step(self, groups: List[Dict[str, Any]]) -> None:
        """Run torch's own implementation (for-loop or foreach) on ``groups``."""
        saved = self.param_groups  # type: ignore[attr-defined]
        hidden = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        self.param_groups = groups  # type: ignore[attr-defined]
        try:
            _unhooked(self._torch_cls.step)(self)
        finally:
            self.param_groups = saved  # type: ignore[attr-defined]
            self.__dict__.update(hidden)

    # -- routing ---------------------------------------------------------------------
    def _fo_route(self, group: Dict[str, Any], ps: List[Tensor], gs: List[Tensor]) -> _Plan:
        """Check every (param, grad, state) of a group and decide who updates it.

        Raises before anything is written. The plan gets its pointer tables
        in phase 2 (:meth:`_fo_build`), once missing state exists.
        """
        plan = _Plan()
        plan.state_keys = self._fo_state_keys(group)
        plan.opts = self._fo_opts(group)
        native_ok = not group.get("differentiable", False)
        if self._fo_has_step and _step_dtype() != torch.float32:
            native_ok = False
        state_all = self.state  # type: ignore[attr-defined]
        buckets: Dict[int, _Bucket] = {}
        for i, (p, g) in enumerate(zip(ps, gs)):
            self._fo_check_grad(i, p, g)
            state = state_all.get(p)
            if state:
                self._fo_check_state(i, p, state, group)
            lp, lg = _local(p), _local(g)
            kernel_ok = (
                native_ok
                and p.layout == torch.strided
                and g.layout == torch.strided
                and _same_sharding(p, g)
                and _plain(lp)
                and _plain(lg)
                and p.dtype in DTYPE_CODES
                and lp.is_contiguous()
            )
            if kernel_ok and _cuda.takes(p):
                if not state or self._fo_state_usable_cuda(p, state, group):
                    plan.cuda.append(i)
                else:
                    plan.fallback.append(i)
                continue
            if p.device.type == "cuda":
                _cuda.warn_unavailable(p)
            usable = kernel_ok and p.device.type == "cpu" and (not state or self._fo_state_usable(p, state, group))
            if usable:
                code = DTYPE_CODES[p.dtype]
                bucket = buckets.get(code)
                if bucket is None:
                    bucket = buckets[code] = _Bucket(code)
                bucket.index.append(i)
            else:
                plan.fallback.append(i)
        plan.buckets = list(buckets.values())
        native = [i for b in plan.buckets for i in b.index] + plan.cuda
        if native and not _disjoint(ps, native):
            # Params that share memory are updated one after the other by
            # torch, never by threads that would race on the shared bytes.
            plan.fallback = sorted(plan.fallback + native)
            plan.buckets = []
            plan.cuda = []
        if plan.opts.active:
            self._fo_check_precision(group, plan.opts, ps, plan)
        return plan

    def _fo_check_precision(self, group: Dict[str, Any], opts: Options, ps: List[Tensor], plan: _Plan) -> None:
        """Phase 1 for a group with precision options: every param must be one
        the kernels take (torch has no implementation of these options)."""
        gi = next(k for k, g in enumerate(self.param_groups) if g is group)  # type: ignore[attr-defined]
        for i, p in enumerate(ps):
            _precision.check_param(opts, p, f"param {i} of group {gi}")
        if plan.fallback:
            i = plan.fallback[0]
            p = ps[i]
            why = f"a {p.layout} {p.dtype} tensor on {p.device}"
            if not _local(p).is_contiguous():
                why += ", not contiguous"
            if group.get("differentiable"):
                why += ", with differentiable=True"
            raise RuntimeError(
                f"{type(self).__name__}: the precision options (master_weights, stochastic_rounding, "
                f"kahan_summation, state_dtype, max_grad_norm) need params the fused kernels take: dense, "
                f"contiguous, not sharing memory, float32/bfloat16/float16 on the CPU (or a usable GPU), "
                f"with state in the options' layout; param {i} of group {gi} ({why}) is not one. "
                f"Nothing was updated."
            )

    def _fo_max_grad_norm(self) -> Optional[float]:
        """The optimizer's max_grad_norm: one value for all groups, or None."""
        values = {g.get("max_grad_norm") for g in self.param_groups}  # type: ignore[attr-defined]
        if values == {None}:
            return None
        if len(values) > 1:
            raise ValueError(
                "max_grad_norm clips the global norm of all grads of the optimizer: every param group "
                f"must have the same value, got {sorted(values, key=str)}"
            )
        return float(values.pop())

    def _fo_grad_norm(self, work: List[Tuple[Any, ...]], max_norm: float, threads: int,
                      grad_scale: Optional[Tensor]) -> Any:
        """The global grad norm of this step and the clip coefficient: a float
        for the CPU kernels, or a device tensor ``[norm, coef]`` for the CUDA
        kernels (no host sync). Sets :attr:`last_grad_norm`.

        CPU grads are already unscaled (AMP) here; CUDA grads are unscaled by
        the kernels, so their norm divides by ``grad_scale`` element by element.
        """
        # The CPU grads in the order of the plans' entries (bucket by bucket),
        # which the cached fast path reads too: the same sum either way.
        ptrs: List[int] = []
        numels: List[int] = []
        codes: List[int] = []
        keep: List[Tensor] = []
        device_grads: List[Tensor] = []
        for group, plan, ps, gs, hyper, fast in work:
            if plan is None:
                continue
            if fast == "cuda":
                device_grads.extend(_grads_of(group["params"])[1])
                continue
            if fast:
                ptrs.extend(plan.native.grad_ptrs())
                numels.extend(n for b in plan.buckets for n in b.numels)
                codes.extend(b.code for b in plan.buckets for _ in b.index)
                continue
            for b in plan.buckets:
                for i in b.index:
                    g = _local(gs[i])
                    if not g.is_contiguous():
                        g = g.contiguous()
                        keep.append(g)
                    ptrs.append(g.data_ptr())
                    numels.append(g.numel())
                    codes.append(DTYPE_CODES[g.dtype])
            device_grads.extend(gs[i] for i in plan.cuda)
        if device_grads:
            if ptrs:
                raise RuntimeError("max_grad_norm needs all params of the optimizer on one device type "
                                   "(CPU or CUDA), not both")
            return _cuda.clip_on_device(self, device_grads, max_norm, grad_scale)
        sumsq = _C.grad_norm_sq(ptrs, numels, codes, threads)
        del keep
        norm, coef = _C.clip_coef(sumsq, max_norm)
        self._fo_last_norm = torch.tensor(norm, dtype=torch.float32)
        return coef

    def _fo_check_state(self, i: int, p: Tensor, state: dict, group: Dict[str, Any]) -> None:
        """Existing state must fit its param, else torch's code would fail midway."""
        for key in self._fo_state_keys(group):
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"state[{key!r}] of param {i} must be a Tensor, got {type(t).__name__}")
            if t.shape != p.shape:
                raise ValueError(
                    f"state[{key!r}] of param {i} has shape {tuple(t.shape)} but the param has {tuple(p.shape)}"
                )

    def _fo_build(self, plan: _Plan, group: Dict[str, Any], ps: List[Tensor]) -> None:
        """Phase 2: create missing state and fill the plan's pointer tables."""
        state_all = self.state  # type: ignore[attr-defined]
        keys = plan.state_keys
        locals_ = [_local(p) for p in ps]
        pptrs = [lp.data_ptr() for lp in locals_]
        sharded = False
        plan.state_dicts = []
        opts = self._fo_opts(group)
        uses_step = self._fo_uses_step(group)
        position = self._fo_positions() if opts.stochastic_rounding else {}
        for bucket in plan.buckets:
            bucket.params, bucket.numels, bucket.pptrs, bucket.steps, bucket.first, bucket.refs = [], [], [], [], [], []
            bucket.streams = {k: [] for k in keys}
            for i in bucket.index:
                p = ps[i]
                # Touch optimizer.state only where torch would keep state
                # (SGD without momentum keeps none).
                state = state_all[p] if (keys or uses_step) else {}
                bucket.first.append(self._fo_init_state(p, state, group))
                bucket.params.append(p)
                bucket.numels.append(locals_[i].numel())
                sharded = sharded or locals_[i] is not p
                bucket.pptrs.append(pptrs[i])
                for k in keys:
                    t = state[k]
                    bucket.streams[k].append(_local(t).data_ptr())
                    bucket.refs.append(t)
                if uses_step:
                    bucket.steps.append(state["step"].data_ptr())
                    bucket.refs.append(state["step"])
                if opts.stochastic_rounding:
                    bucket.ids.append(position[id(p)])
                plan.state_dicts.append(state)
        plan.built = True
        plan.native = None
        params = group["params"]
        # Sharded params take the general path every step: the C plan checks
        # params by their own addresses, which a DTensor does not have.
        if plan.buckets and isinstance(params, list) and not sharded:
            builder = _C.StepPlanBuilder(params, state_all, list(keys), uses_step)
            k = 0
            for bucket in plan.buckets:
                for j, i in enumerate(bucket.index):
                    builder.add(i, bucket.params[j], plan.state_dicts[k], bucket.code, bucket.numels[j],
                                bucket.pptrs[j], [bucket.streams[key][j] for key in keys],
                                bucket.steps[j] if uses_step else 0, bucket.first[j],
                                bucket.ids[j] if opts.stochastic_rounding else 0)
                    k += 1
            plan.native = builder.build()

    def _fo_build_cuda(self, group: Dict[str, Any], ps: List[Tensor], plan: _Plan,
                       batches: List[Tuple["_cuda.Batch", List[int]]]) -> Optional[_CudaPlan]:
        """Cache a group that is all CUDA, for the next steps (see _CudaPlan).

        Returns None (the general path again next step) unless every param's
        state is complete and every param is a plain tensor with its own address.
        """
        params = group["params"]
        if not batches or not isinstance(params, list):
            return None
        state_all = self.state  # type: ignore[attr-defined]
        keys = plan.state_keys
        tracked = self._fo_tracked_keys(plan, group)
        with_step = self._fo_uses_step(group)
        builder = _C.StepPlanBuilder(params, state_all, list(keys), with_step)
        k = 0
        # The plan's entries of one dtype must be consecutive: batches by dtype
        # code (stably); each batch keeps its slice [lo, hi) of the plan.
        for b, idx in sorted(batches, key=lambda bi: bi[0].code):
            for n, j in enumerate(idx):
                i = plan.cuda[j]
                p = ps[i]
                if _local(p) is not p:
                    return None  # sharded: the C plan checks params by their own addresses
                state = state_all[p] if (keys or self._fo_has_step) else {}
                if any(state.get(key) is None for key in tracked):
                    return None  # e.g. SGD buffers a skipped first step did not create
                builder.add(i, p, state, b.code, b.numels[n], b.pptrs[n], [b.streams[s][n] for s in range(len(keys))],
                            b.steps[n] if with_step else 0, False, 0)
            b.lo, b.hi = k, k + len(idx)
            k = b.hi
        return _CudaPlan(builder.build(), [b for b, _ in batches])

    def _fo_positions(self) -> Dict[int, int]:
        """id(param) -> its position in the optimizer, over all groups in order
        (the tensor id of stochastic rounding; stable across state_dicts)."""
        out: Dict[int, int] = {}
        for g in self.param_groups:  # type: ignore[attr-defined]
            for p in g["params"]:
                out.setdefault(id(p), len(out))
        return out

    def _fo_tracked_keys(self, plan: _Plan, group: Dict[str, Any]) -> Tuple[str, ...]:
        return plan.state_keys + (("step",) if self._fo_uses_step(group) else ())


def _grad_ptrs(bucket: _Bucket, gs: List[Tensor]) -> Tuple[List[int], List[Tensor]]:
    """Addresses of a bucket's grads. A grad whose strides differ from its
    (contiguous) param is read through a contiguous copy; the grad itself is
    never written."""
    grads = [_local(gs[i]) for i in bucket.index]
    ptrs = [g.data_ptr() for g in grads]
    keep: List[Tensor] = []
    if not all([g.is_contiguous() for g in grads]):
        for k, g in enumerate(grads):
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
                ptrs[k] = g.data_ptr()
    return ptrs, keep


def _disjoint(ps: List[Tensor], index: List[int]) -> bool:
    spans = []
    for i in index:
        p = _local(ps[i])
        n = p.numel() * p.element_size()
        if n:
            start = p.data_ptr()
            spans.append((start, start + n))
    spans.sort()
    return all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1))
