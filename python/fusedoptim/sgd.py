"""SGD: torch.optim.SGD with a fused native step."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _C, _cuda
from ._backend import DTYPE_CODES, FusedOptimizerMixin, _Bucket, _hyper, _local, _scalar
from .adam import ParamsT, _check_fused, _check_grad_matches, _new_state, _precision_kwargs, _states_fit

__all__ = ["SGD"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """Drop-in :class:`torch.optim.SGD` with a fused multi-tensor step.

    Plain SGD, momentum, dampening, Nesterov, weight decay and maximize, with
    torch's arguments, defaults, validation and ``state_dict`` layout
    (``momentum_buffer`` only when momentum is non-zero, initialised with the
    gradient on its first step). Dense fp32/bf16/fp16 CPU params run natively;
    sparse grads, other dtypes and devices, strided params and
    ``differentiable=True`` run torch's own implementation.

    Args:
        params: iterable of parameters or param groups to optimize.
        lr: learning rate (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening for momentum (default: 0).
        weight_decay: L2 penalty (default: 0).
        nesterov: enable Nesterov momentum (default: False).
        maximize: maximize the objective (default: False).
        foreach: passed to torch's implementation when it runs (fallback).
        differentiable: run torch's differentiable implementation.
        fused: accepted; the CPU step is always fused. ``True`` also lets
            ``torch.amp.GradScaler`` hand the unscaling to the step.
        master_weights, stochastic_rounding, kahan_summation, state_dtype,
            max_grad_norm: the precision options, as for
            :class:`fusedoptim.Adam` (``state_dtype`` sets the momentum
            buffer's dtype; stochastic rounding keeps a float32 ``step``).
    """

    _torch_cls = torch.optim.SGD

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        _check_fused(fused, foreach, differentiable)
        torch.optim.SGD.__init__(
            self, params, lr, momentum, dampening, weight_decay, nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=None,
        )
        self.defaults["fused"] = fused
        for group in self.param_groups:
            group["fused"] = fused
        if fused:
            self._step_supports_amp_scaling = True
        self._fo_setup_options(dict(
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            kahan_summation=kahan_summation, state_dtype=state_dtype, max_grad_norm=max_grad_norm,
        ))

    def _fo_hyper(self, group: Dict[str, Any]) -> Tuple[Any, ...]:
        lr = _hyper(group["lr"], "learning rate")
        momentum = _hyper(group["momentum"], "momentum value")
        wd = _hyper(group["weight_decay"], "weight_decay value")
        dampening = _scalar(group["dampening"], "dampening value")  # torch allows any finite value
        if not math.isfinite(dampening):
            raise ValueError(f"Invalid dampening value: {dampening}")
        nesterov = bool(group["nesterov"])
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return lr, momentum, dampening, wd, nesterov, bool(group["maximize"])

    def _fo_state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        keys: Tuple[str, ...] = ("momentum_buffer",) if group["momentum"] != 0 else ()
        extra = self._fo_opts(group).extra_key
        return keys + (extra,) if extra else keys

    def _fo_check_grad(self, i: int, p: Tensor, g: Tensor) -> None:
        if g.layout != torch.strided:
            # Sparse grads are torch's business (its SGD supports them).
            if g.shape != p.shape:
                raise ValueError(
                    f"grad of param {i} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}"
                )
            return
        _check_grad_matches(i, p, g)

    def _fo_state_usable(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        opts = self._fo_opts(group)
        if opts.stochastic_rounding:
            step = state.get("step")
            if step is not None and not (isinstance(step, Tensor) and step.dtype == torch.float32
                                         and step.device.type == "cpu" and step.numel() == 1):
                return False
        return _states_fit(p, state, ("momentum_buffer",) + ((opts.extra_key,) if opts.extra_key else ()), opts)

    def _fo_init_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        opts = self._fo_opts(group)
        first = False
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            # Filled by the kernel with the (decayed) gradient: torch's buf = grad.
            state["momentum_buffer"] = torch.empty_like(p, dtype=opts.moment_dtype(p),
                                                        memory_format=torch.preserve_format)
            first = True
        if opts.extra_key is not None and state.get(opts.extra_key) is None:
            state[opts.extra_key] = _new_state(p, opts.extra_key, opts)
        if opts.stochastic_rounding and "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # the random keys count steps
        return first

    def _fo_state_usable_cuda(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        return self._fo_state_usable(p, state, group)

    def _fo_run_cuda(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                     hyper: Tuple[Any, ...], grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> List[Tuple["_cuda.Batch", List[int]]]:
        """Create missing momentum buffers and launch the CUDA kernels; see Adam's."""
        use_momentum = hyper[1] != 0
        opts = self._fo_opts(group)
        position = self._fo_positions() if opts.stochastic_rounding else {}
        state_all = self.state  # type: ignore[attr-defined]
        first = [state_all[p].get("momentum_buffer") is None for p in params] if use_momentum else []
        if found_inf is not None and (any(first) or opts.stochastic_rounding):
            # A first step creates the buffers (buf = grad): it must know now
            # whether the step happens, which costs one host sync on the very
            # first step only. Torch's own fused SGD leaves them uninitialised.
            # (Stochastic rounding counts SGD steps on the host: a sync each step.)
            if bool(found_inf.item()):
                return []
            found_inf = None
        batches: Dict[Tuple[Any, ...], List[int]] = {}
        states = []
        keys = self._fo_state_keys(group)
        for j, p in enumerate(params):
            state: Dict[str, Any] = {}
            if keys or opts.stochastic_rounding:
                state = state_all[p]
                if use_momentum and first[j]:
                    # Written by the kernel with the (decayed) gradient: torch's buf = grad.
                    state["momentum_buffer"] = torch.empty_like(p, dtype=opts.moment_dtype(p),
                                                                memory_format=torch.preserve_format)
                if opts.extra_key is not None and state.get(opts.extra_key) is None:
                    state[opts.extra_key] = _new_state(p, opts.extra_key, opts)
                if opts.stochastic_rounding and "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)  # the random keys count steps
            states.append(state)
            batches.setdefault((p.device, p.dtype), []).append(j)
        out = []
        for (device, dtype), idx in batches.items():
            b = _cuda.batch_of(device, DTYPE_CODES[dtype], [params[j] for j in idx], [states[j] for j in idx], keys,
                               with_steps=opts.stochastic_rounding, opts=opts,
                               ids=[position[id(params[j])] for j in idx] if opts.stochastic_rounding else None)
            out.append((b, idx))
            gptrs, copies, keep = _cuda.grad_ptrs([grads[j] for j in idx])
            _cuda.sgd_call(b, gptrs, [first[j] for j in idx] if use_momentum else None, hyper, grad_scale, found_inf,
                           self._fo_clip)
            _cuda.write_back(copies, grad_scale)
            del keep
        return out

    def _fo_cuda_call(self, b: "_cuda.Batch", gptrs: List[int], hyper: Tuple[Any, ...],
                      grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        # A cached plan exists only once every buffer does: never a first step.
        if found_inf is not None and b.opts is not None and b.opts.stochastic_rounding:
            if bool(found_inf.item()):
                return  # host step counters must not count a skipped step
            found_inf = None
        _cuda.sgd_call(b, gptrs, [False] * len(gptrs), hyper, grad_scale, found_inf, self._fo_clip)

    def _fo_run_plan(self, plan: "_C.StepPlan", group: Dict[str, Any], hyper: Tuple[Any, ...], threads: int) -> None:
        lr, momentum, dampening, wd, nesterov, maximize = hyper
        opts = self._fo_opts(group)
        if not opts.active:
            plan.run_sgd(lr, wd, momentum, dampening, nesterov, maximize, threads)
            return
        plan.run_sgd(lr, wd, momentum, dampening, nesterov, maximize, threads, state_dtype=opts.state_code,
                     store=opts.store, seed=opts.seed, grad_mul=1.0 if self._fo_clip is None else self._fo_clip)

    def _fo_native(self, bucket: _Bucket, group: Dict[str, Any], hyper: Tuple[Any, ...], gptrs, threads: int) -> None:
        lr, momentum, dampening, wd, nesterov, maximize = hyper
        use_momentum = momentum != 0
        opts = self._fo_opts(group)
        kw = {}
        if opts.active:
            kw = _precision_kwargs(self, bucket, opts)
            if opts.stochastic_rounding:
                kw["steps"] = bucket.steps
        _C.sgd_step(
            bucket.pptrs, gptrs, bucket.streams.get("momentum_buffer") if use_momentum else None,
            bucket.first if use_momentum else None, bucket.numels, bucket.code,
            lr, wd, momentum, dampening, nesterov, maximize, threads, **kw,
        )
