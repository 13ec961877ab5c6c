"""Adam and AdamW: torch.optim's classes with a fused native step."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _C, _cuda
from ._backend import DTYPE_CODES, FusedOptimizerMixin, _Bucket, _hyper, _local
from ._precision import OPTION_DEFAULTS, Options

__all__ = ["Adam", "AdamW"]

_TORCH_ADAM_ARGS = inspect.signature(torch.optim.Adam.__init__).parameters


def _check_fused(fused: Any, foreach: Any, differentiable: bool) -> None:
    # torch's own checks for `fused`, minus its device check: fusedoptim's
    # fused step runs on the CPU (and falls back to torch elsewhere).
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


class _FusedAdamMixin(FusedOptimizerMixin):
    _fo_has_step = True
    _fo_always_decoupled = False

    def _fo_set_fused(self, fused: Any) -> None:
        self.defaults["fused"] = fused  # type: ignore[attr-defined]
        for group in self.param_groups:  # type: ignore[attr-defined]
            group["fused"] = fused
        if fused:
            self._step_supports_amp_scaling = True

    def _fo_hyper(self, group: Dict[str, Any]) -> Tuple[Any, ...]:
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and (lr.device.type != "cpu" or _cuda.emulating())):
            lr = _hyper(lr, "learning rate")
        # else: a device lr (capturable); the CUDA kernels read it on the device
        # (under emulation the "device" is the CPU).
        beta1 = _hyper(group["betas"][0], "beta parameter at index 0", upper=1.0)
        beta2 = _hyper(group["betas"][1], "beta parameter at index 1", upper=1.0)
        eps = _hyper(group["eps"], "epsilon value")
        wd = _hyper(group["weight_decay"], "weight_decay value")
        decoupled = self._fo_always_decoupled or bool(group.get("decoupled_weight_decay", False))
        return lr, beta1, beta2, eps, wd, decoupled, bool(group["amsgrad"]), bool(group["maximize"])

    def _fo_state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        keys: Tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        extra = self._fo_opts(group).extra_key
        return keys + (extra,) if extra else keys

    def _fo_check_grad(self, i: int, p: Tensor, g: Tensor) -> None:
        if g.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        _check_grad_matches(i, p, g)

    def _fo_state_usable(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        step = state.get("step")
        if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device.type == "cpu"
                and step.numel() == 1 and not step.requires_grad):
            return False
        return _states_fit(p, state, self._fo_state_keys(group), self._fo_opts(group))

    def _fo_init_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        # torch's layout: a float32 0-d `step` and moments shaped like the param
        # (in the dtypes of the precision options, when set).
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        opts = self._fo_opts(group)
        for key in self._fo_state_keys(group):
            if state.get(key) is None:
                state[key] = _new_state(p, key, opts)
        return False

    def _fo_state_usable_cuda(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        # Step counters on the host (torch's default layout) or on the
        # param's device (capturable=True or fused=True); moments beside the param.
        step = state.get("step")
        if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.numel() == 1
                and not step.requires_grad and (step.device.type == "cpu" or step.device == p.device)):
            return False
        return _states_fit(p, state, self._fo_state_keys(group), self._fo_opts(group))

    def _fo_run_cuda(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                     hyper: Tuple[Any, ...], grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> List[Tuple["_cuda.Batch", List[int]]]:
        """Create missing state (torch's layout) and launch the CUDA kernels.

        Returns the batches and, for each, its positions in ``params``, from
        which the step caches a plan for the next steps.
        """
        keys = self._fo_state_keys(group)
        opts = self._fo_opts(group)
        position = self._fo_positions() if opts.stochastic_rounding else {}
        on_device = bool(group.get("capturable")) or bool(group.get("fused"))
        state_all = self.state  # type: ignore[attr-defined]
        batches: Dict[Tuple[Any, ...], List[int]] = {}
        states = []
        for j, p in enumerate(params):
            state = state_all[p]
            if "step" not in state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                                 else torch.tensor(0.0, dtype=torch.float32))
            for key in keys:
                if state.get(key) is None:
                    state[key] = _new_state(p, key, opts)
            states.append(state)
            device_steps = state["step"].device.type != "cpu" or (_cuda.emulating() and on_device)
            batches.setdefault((p.device, p.dtype, device_steps), []).append(j)
        out = []
        for (device, dtype, device_steps), idx in batches.items():
            b = _cuda.batch_of(device, DTYPE_CODES[dtype], [params[j] for j in idx], [states[j] for j in idx],
                               keys, device_steps, with_steps=True, opts=opts,
                               ids=[position[id(params[j])] for j in idx] if opts.stochastic_rounding else None)
            out.append((b, idx))
            gptrs, copies, keep = _cuda.grad_ptrs([grads[j] for j in idx])
            self._fo_cuda_call(b, gptrs, hyper, grad_scale, found_inf)
            _cuda.write_back(copies, grad_scale)
            del keep
        return out

    def _fo_cuda_call(self, b: "_cuda.Batch", gptrs: List[int], hyper: Tuple[Any, ...],
                      grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        if not b.device_steps and found_inf is not None and bool(found_inf.item()):
            return  # host step counters must not count a skipped step
        _cuda.adam_call(b, gptrs, hyper, grad_scale, found_inf, self._fo_clip)

    def _fo_run_plan(self, plan: "_C.StepPlan", group: Dict[str, Any], hyper: Tuple[Any, ...], threads: int) -> None:
        lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize = hyper
        lr = float(lr)
        opts = self._fo_opts(group)
        if not opts.active:
            plan.run_adam(lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize, threads)
            return
        plan.run_adam(lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize, threads, state_dtype=opts.state_code,
                      store=opts.store, seed=opts.seed, grad_mul=1.0 if self._fo_clip is None else self._fo_clip)

    def _fo_native(self, bucket: _Bucket, group: Dict[str, Any], hyper: Tuple[Any, ...], gptrs, threads: int) -> None:
        lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize = hyper
        lr = float(lr)
        s = bucket.streams
        opts = self._fo_opts(group)
        if not opts.active:
            _C.adam_step(
                bucket.pptrs, gptrs, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"), bucket.steps,
                bucket.numels, bucket.code, lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize, threads,
            )
            return
        _C.adam_step(
            bucket.pptrs, gptrs, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"), bucket.steps,
            bucket.numels, bucket.code, lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize, threads,
            **_precision_kwargs(self, bucket, opts),
        )


def _new_state(p: Tensor, key: str, opts: "Options") -> Tensor:
    """A new state tensor: zeros (moments, Kahan compensation) or the param
    itself in float32 (master weights), in the options' dtype."""
    if key == "master_param":
        return p.detach().to(dtype=torch.float32, memory_format=torch.preserve_format, copy=True)
    return torch.zeros_like(p, dtype=opts.key_dtype(p, key), memory_format=torch.preserve_format)


def _states_fit(p: Tensor, state: Dict[str, Any], keys: Tuple[str, ...], opts: "Options") -> bool:
    """Whether the existing state tensors of p are in the layout the kernels expect."""
    lp = _local(p)
    for key in keys:
        t = state.get(key)
        if t is not None and not (isinstance(t, Tensor) and t.dtype == opts.key_dtype(p, key) and t.device == p.device
                                  and _local(t).is_contiguous() and _local(t).shape == lp.shape):
            return False
    return True


def _precision_kwargs(opt: Any, bucket: _Bucket, opts: "Options") -> Dict[str, Any]:
    """Keyword arguments of the native step for a group with precision options."""
    p0 = bucket.params[0]
    kw: Dict[str, Any] = {
        "state_dtype": DTYPE_CODES[opts.moment_dtype(p0)],
        "store": opts.store,
        "grad_mul": 1.0 if opt._fo_clip is None else opt._fo_clip,
    }
    if opts.extra_key is not None:
        kw["extras"] = bucket.streams[opts.extra_key]
    if opts.stochastic_rounding:
        kw["tensor_ids"] = bucket.ids
        kw["seed"] = opts.seed
    return kw


def _check_grad_matches(i: int, p: Tensor, g: Tensor) -> None:
    if g.shape != p.shape:
        raise ValueError(f"grad of param {i} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise ValueError(f"grad of param {i} has dtype {g.dtype} but the param has dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"grad of param {i} is on {g.device} but the param is on {p.device}")


ParamsT = Union[Iterable[Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, Tensor]]]


class Adam(_FusedAdamMixin, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` with a fused multi-tensor step.

    Takes exactly torch's arguments and defaults, validates them as torch
    does and keeps torch's ``state_dict`` layout, so checkpoints move freely
    between the two. Dense fp32/bf16/fp16 CPU params are updated by one native
    call per param group and dtype (AVX-512, AVX2 or scalar, chosen at run
    time); everything else (other devices and dtypes, complex, strided
    params, ``differentiable=True``) runs torch's own implementation.

    Args:
        params: iterable of parameters or param groups to optimize.
        lr: learning rate (default: 1e-3); a 1-element tensor is accepted.
        betas: coefficients of the running averages of the gradient and its
            square (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty (default: 0).
        amsgrad: use the AMSGrad variant (default: False).
        foreach: passed to torch's implementation when it runs (fallback).
        maximize: maximize the objective (default: False).
        capturable: accepted for compatibility; CPU steps need no capture
            support.
        differentiable: run torch's differentiable implementation.
        fused: accepted; the CPU step is always fused. ``True`` also lets
            ``torch.amp.GradScaler`` hand the unscaling to the step.
        decoupled_weight_decay: AdamW-style decay (default: False).
        master_weights: bf16/fp16 params only: keep an fp32 copy of each param
            (``state["master_param"]``) and fp32 moments; the update runs on
            the copy and the param receives it rounded to nearest.
        stochastic_rounding: bf16 params only: round each updated param up
            or down at random, with probability by distance (unbiased), so
            updates below half a bf16 step still count on average. The bits
            are reproducible: a hash of (seed, step, param, element); the
            seed comes from torch's generator and is kept in the param group.
        kahan_summation: bf16/fp16 params only: carry each store's rounding
            error into the next step (``state["kahan_comp"]``, param dtype).
        state_dtype: ``torch.bfloat16`` stores the moments of fp32 params in
            bf16 (math in fp32): 4 instead of 8 bytes of state per param.
        max_grad_norm: clip the global L2 norm of all grads of the optimizer
            to this value in the same step, as ``clip_grad_norm_`` followed
            by the step would, without writing the grads;
            :attr:`last_grad_norm` gives the norm.

    The precision options are off by default (torch's results). They need
    params the fused kernels take (dense, contiguous, CPU or GPU) and raise
    otherwise; bad combinations raise ValueError.

    Threads default to :func:`torch.get_num_threads`; set
    :func:`fusedoptim.set_num_threads` or the ``num_threads`` attribute to
    change it. :attr:`last_backends` tells which backend each group took.
    """

    _torch_cls = torch.optim.Adam

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        _check_fused(fused, foreach, differentiable)
        kwargs: Dict[str, Any] = dict(
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable, fused=None
        )
        if "decoupled_weight_decay" in _TORCH_ADAM_ARGS:
            kwargs["decoupled_weight_decay"] = decoupled_weight_decay
        elif decoupled_weight_decay:
            raise TypeError(
                f"torch {torch.__version__} has no Adam(decoupled_weight_decay=...); use fusedoptim.AdamW"
            )
        torch.optim.Adam.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._fo_set_fused(fused)
        self._fo_setup_options(dict(
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            kahan_summation=kahan_summation, state_dtype=state_dtype, max_grad_norm=max_grad_norm,
        ))


class AdamW(_FusedAdamMixin, torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` with a fused multi-tensor step.

    Same arguments, defaults (``weight_decay=1e-2``), validation and
    ``state_dict`` as torch's AdamW; see :class:`fusedoptim.Adam` for what
    runs natively and what falls back to torch, and for the precision
    options (``master_weights``, ``stochastic_rounding``,
    ``kahan_summation``, ``state_dtype``, ``max_grad_norm``).
    """

    _torch_cls = torch.optim.AdamW
    _fo_always_decoupled = True

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        _check_fused(fused, foreach, differentiable)
        torch.optim.AdamW.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=None,
        )
        self._fo_set_fused(fused)
        self._fo_setup_options(dict(
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            kahan_summation=kahan_summation, state_dtype=state_dtype, max_grad_norm=max_grad_norm,
        ))
