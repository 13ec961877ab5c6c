"""The base of fusedoptim's optimizers: the step driver, state_dict, torch's fallback.

Every fusedoptim optimizer subclasses its torch.optim counterpart and this
class, and declares a :class:`~fusedoptim._spec.Spec`. ``step()`` runs in
two phases so that a raised error leaves params and state exactly as they
were:

1. *Check* (nothing is written): per param group, a cached plan checks
   itself from C (:mod:`fusedoptim._plans`), or every param is routed again
   (:func:`fusedoptim._routing.route`): its grad compared with it, its
   state checked, and the CPU kernels, the CUDA kernels or torch chosen.
   AMP's inf flag, unscaling and ``max_grad_norm``'s norm come last.
2. *Run*: missing state is created with torch's layout, the params the
   kernels do not cover go through torch's own for-loop/foreach step, and
   then the backends update theirs (one call per group and dtype). torch's
   step comes first because it checks its state as it goes (a missing
   ``step`` raises KeyError): an error there leaves the rest unwritten.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _compile, _config, _plans, _precision
from . import _torch_compat as compat
from ._plans import GroupPlan
from ._routing import route
from ._spec import Spec
from ._tensors import DTYPE_CODES, grad_addresses, grads_of, local
from .backends import StepArgs, cpu, cuda

__all__ = ["FusedOptimizer", "ParamsT", "TorchProtocol", "check_fused", "precision_options"]


#: What the constructors take as ``params``, as torch.optim.
ParamsT = Union[Iterable[Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, Tensor]]]


def precision_options(master_weights: bool, stochastic_rounding: bool, kahan_summation: bool,
                      state_dtype: Optional[torch.dtype], max_grad_norm: Optional[float],
                      state_bits: Optional[int] = None, state_block_size: int = 256,
                      min_quantized_numel: int = 4096) -> Dict[str, Any]:
    """The precision options of a constructor, by name (see :mod:`fusedoptim._precision`)."""
    return dict(master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                kahan_summation=kahan_summation, state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                state_bits=state_bits, state_block_size=state_block_size, min_quantized_numel=min_quantized_numel)


def check_fused(fused: Any, foreach: Any, differentiable: bool) -> None:
    """torch's own checks of ``fused``, minus its device check: the fused
    step runs on the CPU and the GPU (and falls back to torch elsewhere)."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


class StepReport:
    """What the last step did. One object per optimizer, mutated by every
    step, never replaced: a framework wrapper that copies the optimizer's
    ``__dict__`` once (Lightning's LightningOptimizer) sees every later step."""

    __slots__ = ("backends", "grad_norm")

    def __init__(self) -> None:
        self.backends: List[str] = []
        self.grad_norm: Optional[Tensor] = None


class _Work:
    """One param group in one step: its plan, and how it runs."""

    __slots__ = ("group", "plan", "ps", "gs", "hyper", "cached")

    def __init__(self, group: Dict[str, Any], plan: Optional[GroupPlan], ps: Any = None, gs: Any = None,
                 hyper: Any = None, cached: Optional[str] = None) -> None:
        self.group, self.plan, self.ps, self.gs, self.hyper, self.cached = group, plan, ps, gs, hyper, cached

    def grads(self) -> List[Tensor]:
        return self.gs if self.gs is not None else grads_of(self.group["params"])[1]


class TorchProtocol:
    """The torch.optim.Optimizer methods fusedoptim extends: param groups,
    checkpoints, grads and pickling (the step is :class:`FusedOptimizer`'s)."""

    def torch_state_dict(self) -> Dict[str, Any]:
        """A ``state_dict`` for torch.optim: without the state of fusedoptim's
        precision options (``master_param``, ``kahan_comp``, SGD's ``step``)
        and with the moments in each param's dtype, as torch keeps them.

        Warns (UserWarning) when something is dropped: e.g. torch keeps no
        fp32 master copy, so the params' rounded values carry on.
        """
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        return _precision.torch_state_dict(self.state_dict(), params, self._spec.torch_step)  # type: ignore[attr-defined]

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group, as :meth:`torch.optim.Optimizer.add_param_group` does.

        Args:
            param_group: a dict with ``"params"`` and any of the constructor's
                arguments; those left out take the optimizer's defaults.

        Raises:
            ValueError: torch's checks (e.g. a param already in another
                group), or a precision option the group's params cannot take
                (e.g. ``master_weights`` on fp32 params). A rejected group is
                not added.
        """
        super().add_param_group(param_group)  # type: ignore[misc]
        if self.__dict__.get("_fo_options_set"):  # torch's __init__ adds groups before the options exist
            groups = self.param_groups  # type: ignore[attr-defined]
            try:
                _precision.check_group_options(groups[-1], len(groups) - 1)
            except Exception:
                groups.pop()
                raise

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's state and param groups, in torch.optim's layout.

        ``{"state": {index: {...}}, "param_groups": [...]}`` with torch's
        keys (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``, with ``amsgrad``
        ``max_exp_avg_sq``; SGD: ``momentum_buffer``), so torch.optim loads
        it. The precision options add their own state (``master_param``,
        ``kahan_comp``, SGD's ``step``) and group entries (the options and
        the stochastic-rounding seed), which torch ignores;
        :meth:`torch_state_dict` gives a copy without them.

        Returns:
            A dict that refers to the state tensors themselves, as torch's
            does: save it or copy it before the next step.
        """
        return super().state_dict()  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the grads of every param, as torch.optim does.

        Args:
            set_to_none: set each ``.grad`` to None (the default, torch's)
                instead of filling it with zeros; the next backward then
                allocates new grads. The step reads the grads' addresses
                every time, so it takes either.
        """
        if compat.zero_grad_runs_bare(self, set_to_none):
            # torch's zero_grad without its profiler range (Note [step runner]).
            for group in self.param_groups:  # type: ignore[attr-defined]
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = None
            return
        super().zero_grad(set_to_none)  # type: ignore[misc]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint of fusedoptim or of torch.optim, as torch does.

        Checkpoints move both ways, also mid-training. The state of the
        precision options keeps the dtypes the options need (torch's loader
        would cast it to the param's dtype); the state of an option this
        optimizer does not use is dropped with a warning.

        Args:
            state_dict: what :meth:`state_dict` returned, here or in torch.optim.

        Raises:
            ValueError: torch's checks (the number of groups, of params per group).
        """
        self._fo_plans: Dict[int, Any] = {}
        saved = _precision.saved_state(state_dict, self.param_groups)  # type: ignore[attr-defined]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        _precision.restore_state(self.defaults, self.param_groups, self.state, saved)  # type: ignore[attr-defined]
        self._fo_plans = {}

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[misc]
        if "num_threads" in self.__dict__:  # set on this optimizer (else the class's None)
            state["num_threads"] = self.__dict__["num_threads"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # A copy has exactly the original's public attributes: num_threads
        # only where the original set its own.
        state = dict(state)
        own = "num_threads" in state
        num_threads = state.pop("num_threads", None)
        super().__setstate__(state)  # type: ignore[misc]
        if own:
            self.num_threads = num_threads
        self._fo_plans = {}
        self._fo_report = StepReport()


class FusedOptimizer(TorchProtocol):
    """The step shared by fusedoptim's optimizers; see the module docstring.

    A subclass names the torch class it replaces (``_torch_cls``) and its
    declaration (``_spec``).
    """

    _torch_cls: type
    _spec: Spec
    #: Threads of the CPU kernels for this optimizer; None follows
    #: :func:`fusedoptim.get_num_threads`.
    num_threads: Optional[int] = None

    def _fo_init(self, fused: Any, foreach: Any, differentiable: bool, options: Dict[str, Any]) -> None:
        """The end of a constructor (torch's ran with ``fused=None``): torch's
        checks of ``fused``, the flag kept as given (``True`` lets
        ``torch.amp.GradScaler`` hand the unscaling to the step), then the
        precision options."""
        check_fused(fused, foreach, differentiable)
        if "fused" in self.defaults:  # type: ignore[attr-defined]  # (not in SGD's before torch 2.3)
            self.defaults["fused"] = fused  # type: ignore[attr-defined]
            for group in self.param_groups:  # type: ignore[attr-defined]
                group["fused"] = fused
        if fused:
            setattr(self, compat.AMP_SCALING_ATTR, True)
        _precision.setup(self.defaults, self.param_groups, options)  # type: ignore[attr-defined]
        self._fo_options_set = True
        self._fo_report = StepReport()

    @property
    def _report(self) -> StepReport:
        report = self.__dict__.get("_fo_report")
        if report is None:
            # A wrapper that takes the optimizer's class but not its __dict__
            # (Lightning's LightningOptimizer, which holds it as _optimizer)
            # reports the wrapped optimizer's steps.
            inner = self.__dict__.get("_optimizer")
            if isinstance(inner, FusedOptimizer) and inner is not self:
                return inner._report
            # Unpickled: __setstate__ makes one, this is a fallback.
            report = self.__dict__["_fo_report"] = StepReport()
        return report

    @property
    def last_backends(self) -> List[str]:
        """Which backend each param group took on the last step.

        One entry per group: ``"native-cpu/<isa>"``, ``"native-cuda"``,
        ``"torch"``, several joined with ``+`` when only some params of the
        group could use the kernels, ``"none"`` for a group without grads,
        or ``"skipped (found_inf)"``.
        """
        return list(self._report.backends)

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """With ``max_grad_norm``: the global grad norm of the last step (a
        0-d float32 tensor, what ``clip_grad_norm_`` returns), else None."""
        return self._report.grad_norm

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every param that has a grad, once.

        Each param group is updated by one native call per dtype (CPU) or one
        launch per ~450 tensors (CUDA); params the kernels cannot take run
        torch's own step. :attr:`last_backends` tells which ran.

        Args:
            closure: re-evaluates the model and returns the loss; called once,
                with grad enabled, before the update.

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            RuntimeError: a grad whose shape, dtype or device differs from its
                param (``GradMismatchError``, also a ValueError; SGD takes a
                grad of another dtype, as torch's does), a state tensor of
                another shape (``StateMismatchError``, also a ValueError),
                torch's errors (its step runs before the kernels), or a param
                the fused kernels cannot take under a precision option.
            ValueError: a hyperparameter or a state tensor that does not fit.

        Every check runs before anything is written: after a raise the
        params, grads and state are exactly as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # AMP: with fused=True torch's GradScaler hands the scale and the inf
        # flag to the step (_step_supports_amp_scaling) instead of unscaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # An inf flag the CUDA kernels read on the device: reading it here would be a host sync.
        defer_inf = found_inf is not None and cuda.on_device(found_inf)
        if found_inf is not None and not defer_inf and bool(found_inf.item()):
            self._report.backends[:] = ["skipped (found_inf)"] * len(self.param_groups)  # type: ignore[attr-defined]
            return loss
        work: List[_Work] = []
        try:
            self._fo_check(work)
            if defer_inf and any(w.plan is not None and (w.plan.route.cpu or w.plan.route.torch) for w in work):
                # Work outside the CUDA kernels cannot read the flag on the device.
                if bool(found_inf.item()):  # type: ignore[union-attr]
                    self._report.backends[:] = ["skipped (found_inf)"] * len(self.param_groups)  # type: ignore
                    return loss
                defer_inf = False
            if grad_scale is not None:
                # The CUDA kernels unscale their own grads in place; the rest here.
                grads = []
                for w in work:
                    skip = set(w.plan.route.cuda) if w.plan is not None else ()
                    grads.extend(g for k, g in enumerate(w.grads()) if k not in skip)
                _unscale_(grads, grad_scale)
            args = StepArgs(_config.threads_of(self.num_threads), grad_scale, found_inf if defer_inf else None)
            max_norm = _precision.max_grad_norm(self.param_groups)  # type: ignore[attr-defined]
            if max_norm is not None:
                # The global norm of all grads (after AMP unscaling), before anything is updated.
                self._report.grad_norm, args.clip = _grad_norm(work, max_norm, args)
            self._fo_run(work, args)
        finally:
            for w in work:
                if w.plan is not None:
                    w.plan.release()
        return loss

    # torch's hooks and grad mode; under torch.compile the traced step (Note [step runner]).
    step = compat.step_runner(_compile.compile_aware(compat.use_grad_for_differentiable(step)), step)

    def _fo_check(self, work: List[_Work]) -> None:
        """Phase 1: check every group, write nothing."""
        spec = self._spec
        plans: Dict[int, Any] = self.__dict__.setdefault("_fo_plans", {})
        state_all = self.state  # type: ignore[attr-defined]
        for gi, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            cached = plans.get(id(group))
            plan = cached[1] if cached is not None and cached[0] is group else None
            if plan is not None:
                # The group's values as at the last step: the options, hyperparameters and
                # which cached plan runs it are as they were then.
                values = _plans.group_values(group)
                fast = plan.fast
                if fast is not None and values is not None and fast[0] == values and fast[3] == cuda.mode():
                    _, hyper, how, _ = fast
                    native = plan.cpu_plan if how == "cpu" else plan.cuda_plan
                    if native.collect(group["params"], state_all) == 0:  # type: ignore[union-attr]
                        work.append(_Work(group, plan, hyper=hyper, cached=how))
                        continue
            opts = _precision.options_of(group)
            how = plan.cached(spec, group, opts) if plan is not None else None
            if how is not None:
                native = plan.cpu_plan if how == "cpu" else plan.cuda_plan  # type: ignore[union-attr]
                hyper = spec.hyper(group)
                if native.collect(group["params"], state_all) == 0:  # type: ignore[union-attr]
                    plan.fast = (values, hyper, how, plan.mode) if values is not None else None  # type: ignore
                    work.append(_Work(group, plan, hyper=hyper, cached=how))
                    continue
            ps, gs = grads_of(group["params"])
            if not ps:
                work.append(_Work(group, None, ps, gs))
                continue
            hyper = spec.hyper(group)
            r = route(spec, group, ps, gs, state_all, opts, gi, type(self).__name__)
            work.append(_Work(group, GroupPlan(r), ps, gs, hyper))

    def _fo_run(self, work: List[_Work], args: StepArgs) -> None:
        """Phase 2: create missing state, run torch's step on the params the
        kernels do not take, then the kernels."""
        spec = self._spec
        plans = self._fo_plans
        names: List[str] = []
        # Every group routed this step creates its missing state and fills its
        # tables first, each address checked (Note [addresses]), and torch's
        # step runs next; should either raise, the state created is removed
        # and no kernel has written anything.
        journal: List[tuple] = []
        cuda_built: Dict[int, Optional[_plans.CudaBuild]] = {}
        try:
            for k, w in enumerate(work):
                if w.plan is None or w.cached is not None:
                    continue
                _plans.build_cpu(w.plan, spec, self, w.group, w.ps, journal)
                if w.plan.route.cuda:
                    cuda_built[k] = _plans.build_cuda(w.plan, spec, self, w.group, w.ps, args, journal)
            fallback = [_fallback_group(w) for w in work
                        if w.plan is not None and w.cached is None and w.plan.route.torch]
            if fallback:
                self._fo_torch_step(fallback)
        except BaseException:
            _plans.undo(journal)
            raise
        for k, w in enumerate(work):
            plan = w.plan
            if plan is None:
                names.append("none")
                continue
            if w.cached == "cpu":
                if plan.opts.state_bits is not None:
                    _plans.run_cpu_cached(plan, spec, w.hyper, args)
                else:
                    cpu.run_plan(spec.kernel, plan.cpu_plan, w.hyper, plan.opts, args)
                names.append(cpu.name())
                continue
            if w.cached == "cuda":
                _plans.run_cuda_cached(plan, spec, w.hyper, args)
                names.append(cuda.name())
                continue
            r = plan.route
            used = []
            # A plan routed and built this step: cache it.
            plans[id(w.group)] = (w.group, plan)
            if r.cpu:
                if plan.cpu_plan is not None and not r.torch and not r.cuda and plan.opts.state_bits is None \
                        and plan.cpu_plan.collect(w.group["params"], self.state) == 0:  # type: ignore[attr-defined]
                    cpu.run_plan(spec.kernel, plan.cpu_plan, w.hyper, plan.opts, args)
                else:
                    _plans.run_cpu(plan, spec, w.gs, w.hyper, args)
                used.append(cpu.name())
            if r.cuda:
                built = cuda_built[k]
                if built is not None:  # None: a step AMP skips
                    _plans.run_cuda(plan, spec, self, w.group, w.ps, w.gs, built, w.hyper)
                used.append(cuda.name())
            if r.torch:
                used.append("torch")  # (ran above)
            names.append("+".join(used))
        self._report.backends[:] = names

    def _fo_torch_step(self, groups: List[Dict[str, Any]]) -> None:
        """Run torch's own implementation (for-loop or foreach) on ``groups``."""
        saved = self.param_groups  # type: ignore[attr-defined]
        hidden = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        self.param_groups = groups
        try:
            compat.unhooked(self._torch_cls.step)(self)
        finally:
            self.param_groups = saved
            self.__dict__.update(hidden)
        if not compat.SGD_STATE_ONLY_WITH_MOMENTUM:
            # torch's SGD before 2.3 stores momentum_buffer=None for every param
            # even without momentum; fusedoptim keeps no state there on any path.
            state = self.state  # type: ignore[attr-defined]
            for group in groups:
                for p in group["params"]:
                    st = state.get(p)
                    if st is not None and st.get("momentum_buffer", 0) is None and len(st) == 1:
                        del state[p]


def _fallback_group(w: _Work) -> Dict[str, Any]:
    """The group of ``w`` reduced to the params routed to torch's step."""
    sub = dict(w.group)
    sub["params"] = [w.ps[i] for i in w.plan.route.torch]  # type: ignore[union-attr]
    if all(p.device.type == "cpu" for p in sub["params"]):
        sub["fused"] = False  # never torch's fused CPU kernels: they ignore strides
    return sub


def _grad_norm(work: List[_Work], max_norm: float, args: StepArgs) -> Tuple[Tensor, Any]:
    """The global grad norm (a 0-d float32 tensor) and the clip coefficient
    (a float for the CPU kernels, a device tensor ``[norm, coef]`` for the
    CUDA kernels, with no host sync). CPU grads are summed in the order of
    the plans' tables, which a cached plan reads too."""
    ptrs: List[int] = []
    numels: List[int] = []
    codes: List[int] = []
    keep = []
    device_grads: List[Tensor] = []
    for w in work:
        if w.plan is None:
            continue
        if w.cached == "cuda":
            device_grads.extend(w.grads())
        elif w.cached == "cpu":
            ptrs.extend(w.plan.cpu_plan.grad_ptrs())  # type: ignore[union-attr]
            numels.extend(n for t in w.plan.tables for n in t.numels)
            codes.extend(t.code for t in w.plan.tables for _ in t.index)
        else:
            for idx in w.plan.route.cpu.values():
                addr = grad_addresses([w.gs[i] for i in idx])
                keep.append(addr)
                ptrs.extend(addr.ptrs)
                numels.extend(local(w.gs[i]).numel() for i in idx)
                codes.extend(DTYPE_CODES[w.gs[i].dtype] for i in idx)
            device_grads.extend(w.gs[i] for i in w.plan.route.cuda)
    if device_grads:
        if ptrs:
            raise RuntimeError("max_grad_norm needs all params of the optimizer on one device type "
                               "(CPU or CUDA), not both")
        out = cuda.clip_on_device(device_grads, max_norm, args.grad_scale)
        return out[0], out
    return cpu.grad_norm(ptrs, numels, codes, max_norm, args.threads)


def _unscale_(grads: List[Tensor], grad_scale: Tensor) -> None:
    """Divide grads by the AMP scale in place, as torch's fused kernels do."""
    by_device: Dict[torch.device, List[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        compat.foreach_div_(gs, grad_scale.to(device))
