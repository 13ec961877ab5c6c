"""SGD: the declaration, the functional step, the drop-in class.

- :data:`SGD_SPEC`: the spec (one state stream, ``momentum_buffer``, when
  momentum is non-zero, filled from the grad on its first step as torch's
  ``buf = grad``); the update math is ``sgd_update`` in
  csrc/common/update_math.h.
- :func:`sgd`: the functional step over lists of tensors, with
  ``torch.optim.sgd.sgd``'s arguments; torch.compile traces it (the native
  part is the custom op ``fusedoptim::sgd_step_``).
- :class:`SGD`: the torch.optim class.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import sgd as _torch_sgd

from . import _compile, _config
from . import _torch_compat as compat
from ._spec import Spec, Stream, checked, in_range, number
from .backends import cpu
from .optimizer import FusedOptimizer, ParamsT, precision_options

__all__ = ["SGD", "SGDHyper", "SGD_SPEC", "sgd"]


class SGDHyper(NamedTuple):
    """A param group's SGD hyperparameters, validated."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


def _check_momentum_rules(momentum: Any, dampening: Any, nesterov: bool) -> None:
    """torch's rules: any finite dampening; Nesterov needs momentum and no dampening.
    Plain comparisons, so that they hold for traced symbolic floats too."""
    if not -math.inf < dampening < math.inf:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def sgd_hyper(group: Dict[str, Any]) -> SGDHyper:
    """The hyperparameters of ``group``, checked with torch's messages."""
    lr = checked(group["lr"], "learning rate")
    momentum = checked(group["momentum"], "momentum value")
    weight_decay = checked(group["weight_decay"], "weight_decay value")
    dampening = number(group["dampening"], "dampening value")
    nesterov = bool(group["nesterov"])
    _check_momentum_rules(momentum, dampening, nesterov)
    return SGDHyper(lr, momentum, dampening, weight_decay, nesterov, bool(group["maximize"]))


def _native(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], first_step: List[bool],
            lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
            lr_tensor: Optional[Tensor] = None, num_threads: int = 0) -> None:
    """One fused SGD step over CPU tensors, in place.

    Args:
        params: contiguous CPU fp32/bf16/fp16 params (any mix of those dtypes).
        grads: one per param, same dtype and size, any strides.
        momentum_buffers: torch's buffers, contiguous, the param's dtype,
            when ``momentum != 0``; else empty.
        first_step: per buffer, True to initialise it with the (decayed)
            grad, as torch's ``buf = grad`` on a buffer's first step; its
            old contents are not read.
        lr, weight_decay, momentum, dampening, nesterov, maximize: the
            group's hyperparameters.
        lr_tensor: a 1-element tensor lr, read when the op runs; it
            overrides ``lr`` (the traced step always passes one).
        num_threads: CPU threads; 0 follows :func:`fusedoptim.get_num_threads`.

    Raises ValueError before anything is written when a tensor or a
    hyperparameter does not fit.
    """
    if lr_tensor is not None:
        lr = number(lr_tensor, "lr")
    hyper = SGDHyper(in_range(lr, "learning rate"), in_range(momentum, "momentum value"), dampening,
                     in_range(weight_decay, "weight_decay value"), nesterov, maximize)
    _check_momentum_rules(momentum, dampening, nesterov)
    use_momentum = momentum != 0.0
    cpu.run_tensors("sgd", params, grads, {"momentum_buffer": momentum_buffers} if use_momentum else {}, None,
                    first_step if use_momentum else None, hyper, _config.threads_of(num_threads or None))


_op = _compile.custom_op("sgd_step_", ("params", "momentum_buffers"))(_native)


def sgd(params: List[Tensor], d_p_list: List[Tensor], momentum_buffer_list: List[Optional[Tensor]], *,
        weight_decay: Any, momentum: Any, lr: Any, dampening: Any, nesterov: bool, maximize: bool,
        has_sparse_grad: bool = False, differentiable: bool = False, num_threads: Optional[int] = None) -> None:
    """Functional SGD step, in place, with ``torch.optim.sgd.sgd``'s arguments.

    Dense contiguous fp32/bf16/fp16 CPU params (with buffers in the param's
    dtype) go to the native kernels in one call per dtype; everything else
    (sparse grads, other devices and dtypes, strided params, tensor
    hyperparameters other than ``lr``, ``differentiable``) to torch's
    for-loop implementation. A ``None`` buffer is created, as torch's
    functional step does, and put in ``momentum_buffer_list``. Under
    torch.compile the native part is the custom op ``fusedoptim::sgd_step_``.
    """
    use_momentum = momentum != 0
    keys = SGD_SPEC.own_keys({"momentum": momentum})
    native_ok = not differentiable and not any(isinstance(v, Tensor) for v in (momentum, dampening, weight_decay))
    bufs = momentum_buffer_list if use_momentum else [None] * len(params)
    states = [{"momentum_buffer": buf} if buf is not None else {} for buf in bufs]
    native, fallback = SGD_SPEC.split(params, d_p_list, states, keys, native_ok)
    if native:
        in_range(momentum, "momentum value")
        in_range(weight_decay, "weight_decay value")
        _check_momentum_rules(momentum, dampening, bool(nesterov))
        first: List[bool] = []
        if use_momentum:
            for i in native:
                # A missing buffer is filled by the kernel with the (decayed)
                # grad (torch's buf = grad); whether it existed is known when tracing.
                first.append(momentum_buffer_list[i] is None)
                if momentum_buffer_list[i] is None:
                    momentum_buffer_list[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
        op = torch.ops.fusedoptim.sgd_step_ if _compile.HAVE_CUSTOM_OP and _compile.is_compiling() else _native
        op([params[i] for i in native], [d_p_list[i] for i in native],
           [momentum_buffer_list[i] for i in native] if use_momentum else [], first, 0.0, weight_decay, momentum,
           dampening, bool(nesterov), bool(maximize), _compile.lr_arg(lr), num_threads or 0)
    if fallback:
        bufs = [momentum_buffer_list[i] for i in fallback] if use_momentum else []
        _torch_sgd.sgd([params[i] for i in fallback], [d_p_list[i] for i in fallback], bufs,
                       has_sparse_grad=has_sparse_grad, foreach=False, fused=False, grad_scale=None, found_inf=None,
                       weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
                       maximize=maximize)
        for k, i in enumerate(fallback if use_momentum else ()):
            momentum_buffer_list[i] = bufs[k]


def _traced_step(opt: Any, group: Dict[str, Any]) -> None:
    """One group's step as torch.compile traces it; see Note [state under Dynamo]."""
    params: List[Tensor] = []
    grads: List[Tensor] = []
    bufs: List[Optional[Tensor]] = []
    has_sparse_grad = compat.init_group(opt, group, params, grads, bufs)
    if not params:
        return
    new = [buf is None for buf in bufs]
    sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
        dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
        has_sparse_grad=has_sparse_grad, differentiable=group["differentiable"],
        num_threads=_compile.threads_arg(opt))
    if group["momentum"] != 0:
        # torch's step stores the buffers its functional form created.
        for k in range(len(params)):
            if new[k] and bufs[k] is not None:
                _compile.store_state(opt, params[k], "momentum_buffer", bufs[k])


#: SGD: a momentum buffer when momentum is non-zero; no step counter (torch keeps none).
SGD_SPEC = Spec("SGD", "sgd", (Stream("momentum_buffer", when=lambda g: g["momentum"] != 0, init="grad"),),
                sgd_hyper, _traced_step, torch_step=False, grads_of_any_dtype=True)


class SGD(FusedOptimizer, torch.optim.SGD):
    """Drop-in :class:`torch.optim.SGD` with a fused multi-tensor step.

    Plain SGD, momentum, dampening, Nesterov, weight decay and maximize, with
    torch's arguments, defaults, validation and ``state_dict`` layout
    (``momentum_buffer`` only when momentum is non-zero, initialised with the
    gradient on its first step). Dense fp32/bf16/fp16 CPU params run natively,
    and CUDA params too when the wheel has the CUDA backend; sparse grads,
    other dtypes and devices, strided params and ``differentiable=True`` run
    torch's own implementation.

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
            ``torch.amp.GradScaler`` hand the unscaling to the step. As
            torch's SGD, only from torch 2.3 on (before, any value but None
            is a TypeError, and groups have no ``"fused"`` key).
        master_weights, stochastic_rounding, kahan_summation, state_dtype,
            max_grad_norm: the precision options, as for
            :class:`fusedoptim.Adam` (``state_dtype`` sets the momentum
            buffer's dtype; stochastic rounding keeps a float32 ``step``).
        state_bits: ``8`` keeps the momentum buffer of every tensor with at
            least ``min_quantized_numel`` elements as 8-bit codes with one
            fp32 scale per block (``momentum_buffer_codes``,
            ``momentum_buffer_scale``; Note [8-bit states]). CPU and CUDA params.
        state_block_size: elements per scale, a power of two from 64 to
            4096 (default: 256).
        min_quantized_numel: smaller tensors keep a full buffer (default: 4096).
    """

    _torch_cls = torch.optim.SGD
    _spec = SGD_SPEC

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
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        master_weights: bool = False, stochastic_rounding: bool = False, kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
        state_bits: Optional[int] = None, state_block_size: int = 256, min_quantized_numel: int = 4096,
    ) -> None:
        has_fused = compat.accepts(torch.optim.SGD, "fused")  # torch 2.3+
        if fused is not None and not has_fused:
            raise TypeError(f"SGD.__init__() got an unexpected keyword argument 'fused' (torch {torch.__version__}'s "
                            "SGD has none; it needs torch 2.3 or later)")
        torch.optim.SGD.__init__(
            self, params, lr, momentum, dampening, weight_decay, nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable,
            **({"fused": None} if has_fused else {}),
        )
        self._fo_init(fused, foreach, differentiable, precision_options(
            master_weights, stochastic_rounding, kahan_summation, state_dtype, max_grad_norm,
            state_bits, state_block_size, min_quantized_numel))
