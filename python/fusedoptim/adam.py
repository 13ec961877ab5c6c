"""Adam and AdamW: the declaration, the functional step, the drop-in classes.

- :data:`ADAM` / :data:`ADAMW`: the specs (state streams ``exp_avg``,
  ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``; torch's float32
  ``step``); the update math is ``adam_update`` in csrc/common/update_math.h.
- :func:`adam`: the functional step over lists of tensors, with
  ``torch.optim.adam.adam``'s arguments: the native kernels for what they
  take, torch's own functional step for the rest. torch.compile traces it
  (the native part is the custom op ``fusedoptim::adam_step_``).
- :class:`Adam`, :class:`AdamW`: the torch.optim classes.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import adam as _torch_adam

from . import _compile, _config
from . import _torch_compat as compat
from ._spec import Spec, Stream, checked, in_range, number
from .backends import cpu, cuda
from .optimizer import FusedOptimizer, ParamsT, precision_options

__all__ = ["ADAM", "ADAMW", "Adam", "AdamHyper", "AdamW", "adam"]

_TORCH_DECOUPLED_ARG = compat.accepts(_torch_adam.adam, "decoupled_weight_decay")  # torch 2.6+

class AdamHyper(NamedTuple):
    """A param group's Adam hyperparameters, validated."""

    lr: Any  # a float, or a 1-element device tensor the CUDA kernels read (capturable)
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool


def adam_hyper(group: Dict[str, Any], decoupled: bool = False) -> AdamHyper:
    """The hyperparameters of ``group``, checked with torch's messages."""
    lr = group["lr"]
    if not (isinstance(lr, Tensor) and cuda.on_device(lr)):
        lr = checked(lr, "learning rate")
    return AdamHyper(
        lr,
        checked(group["betas"][0], "beta parameter at index 0", upper=1.0),
        checked(group["betas"][1], "beta parameter at index 1", upper=1.0),
        checked(group["eps"], "epsilon value"),
        checked(group["weight_decay"], "weight_decay value"),
        # A group's own flag, where torch's Adam has one (2.6+; before, torch ignores the key).
        decoupled or (_TORCH_DECOUPLED_ARG and bool(group.get("decoupled_weight_decay", False))),
        bool(group["amsgrad"]),
        bool(group["maximize"]),
    )


def _native(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
            max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, beta1: float, beta2: float,
            eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
            lr_tensor: Optional[Tensor] = None, num_threads: int = 0) -> None:
    """One fused Adam/AdamW step over CPU tensors, in place.

    Args:
        params: contiguous CPU fp32/bf16/fp16 params (any mix of those dtypes).
        grads: one per param, same dtype and size, any strides.
        exp_avgs, exp_avg_sqs: torch's moments, contiguous, the param's dtype.
        max_exp_avg_sqs: torch's AMSGrad maxima when ``amsgrad``, else empty.
        state_steps: float32 0-d step counters, each incremented by one.
        lr, beta1, beta2, eps, weight_decay: the group's hyperparameters.
        decoupled: AdamW-style weight decay (else L2 added to the grad).
        amsgrad, maximize: torch's flags.
        lr_tensor: a 1-element tensor lr, read when the op runs; it
            overrides ``lr`` (the traced step always passes one, see
            Note [hyperparameters under Dynamo]).
        num_threads: CPU threads; 0 follows :func:`fusedoptim.get_num_threads`.

    Raises ValueError before anything is written when a tensor or a
    hyperparameter does not fit.
    """
    if lr_tensor is not None:
        lr = number(lr_tensor, "lr")
    hyper = AdamHyper(in_range(lr, "learning rate"), in_range(beta1, "beta parameter at index 0", 1.0),
                      in_range(beta2, "beta parameter at index 1", 1.0), in_range(eps, "epsilon value"),
                      in_range(weight_decay, "weight_decay value"), decoupled, amsgrad, maximize)
    streams = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        streams["max_exp_avg_sq"] = max_exp_avg_sqs
    cpu.run_tensors("adam", params, grads, streams, state_steps, None, hyper,
                    _config.threads_of(num_threads or None))


_op = _compile.custom_op("adam_step_", ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))(
    _native)


def adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
         max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, amsgrad: bool, beta1: Any, beta2: Any,
         lr: Any, weight_decay: Any, eps: Any, maximize: bool, decoupled_weight_decay: bool = False,
         capturable: bool = False, differentiable: bool = False, has_complex: bool = False,
         num_threads: Optional[int] = None) -> None:
    """Functional Adam/AdamW step, in place, with ``torch.optim.adam.adam``'s arguments.

    Dense contiguous fp32/bf16/fp16 CPU params (with float32 step counters
    and moments in the param's dtype) go to the native kernels in one call
    per dtype; everything else (other devices and dtypes, complex, strided
    params, tensor hyperparameters other than ``lr``, ``differentiable``)
    to torch's for-loop implementation. Under torch.compile the native part
    is the custom op ``fusedoptim::adam_step_``.

    Raises torch's errors for bad grads and StateMismatchError (a
    RuntimeError and a ValueError) for state that does not fit its param,
    before anything is written.
    """
    spec = ADAMW if decoupled_weight_decay else ADAM
    keys = spec.own_keys({"amsgrad": amsgrad})
    native_ok = not differentiable and not any(isinstance(v, Tensor) for v in (beta1, beta2, eps, weight_decay))
    # Literals only: torch 2.5's tracer has no dict(mapping, **kwargs).
    states = [{"step": state_steps[i], "exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i],
               "max_exp_avg_sq": max_exp_avg_sqs[i]} if amsgrad else
              {"step": state_steps[i], "exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i]}
              for i in range(len(params))]
    native, fallback = spec.split(params, grads, states, keys, native_ok)
    if native:
        op = torch.ops.fusedoptim.adam_step_ if _compile.HAVE_CUSTOM_OP and _compile.is_compiling() else _native
        op([params[i] for i in native], [grads[i] for i in native], [exp_avgs[i] for i in native],
           [exp_avg_sqs[i] for i in native], [max_exp_avg_sqs[i] for i in native] if amsgrad else [],
           [state_steps[i] for i in native], 0.0, in_range(beta1, "beta parameter at index 0", upper=1.0),
           in_range(beta2, "beta parameter at index 1", upper=1.0), in_range(eps, "epsilon value"),
           in_range(weight_decay, "weight_decay value"), decoupled_weight_decay, amsgrad, maximize,
           _compile.lr_arg(lr), num_threads or 0)
    if fallback:
        kwargs: Dict[str, Any] = dict(
            foreach=False, capturable=capturable, differentiable=differentiable, fused=None, grad_scale=None,
            found_inf=None, has_complex=has_complex, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
            weight_decay=weight_decay, eps=eps, maximize=maximize,
        )
        functional = _torch_adam.adam
        if _TORCH_DECOUPLED_ARG:
            kwargs["decoupled_weight_decay"] = decoupled_weight_decay
        elif decoupled_weight_decay:  # torch < 2.6 keeps AdamW's functional form apart
            from torch.optim.adamw import adamw as functional
        functional([params[i] for i in fallback], [grads[i] for i in fallback], [exp_avgs[i] for i in fallback],
                   [exp_avg_sqs[i] for i in fallback], [max_exp_avg_sqs[i] for i in fallback] if amsgrad else [],
                   [state_steps[i] for i in fallback], **kwargs)


def _traced_step(opt: Any, group: Dict[str, Any]) -> None:
    """One group's step as torch.compile traces it; see Note [state under Dynamo]."""
    params: List[Tensor] = []
    grads: List[Tensor] = []
    exp_avgs: List[Tensor] = []
    exp_avg_sqs: List[Tensor] = []
    max_exp_avg_sqs: List[Tensor] = []
    state_steps: List[Tensor] = []
    has_complex = compat.init_group(opt, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if params:
        adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad=bool(group["amsgrad"]),
             beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=bool(group["maximize"]),
             decoupled_weight_decay=opt._spec is ADAMW or (_TORCH_DECOUPLED_ARG
                                                           and bool(group.get("decoupled_weight_decay", False))),
             capturable=group["capturable"], differentiable=group["differentiable"], has_complex=has_complex,
             num_threads=_compile.threads_arg(opt))


_STREAMS = (Stream("exp_avg"), Stream("exp_avg_sq"), Stream("max_exp_avg_sq", when=lambda g: bool(g["amsgrad"])))
_SPARSE = "Adam does not support sparse gradients, please consider SparseAdam instead"
_SPARSE_ADAMW = "AdamW does not support sparse gradients"  # torch's AdamW before 2.6, its own class
#: Adam: L2 weight decay unless the group says ``decoupled_weight_decay``.
ADAM = Spec("Adam", "adam", _STREAMS, adam_hyper, _traced_step, torch_step=True, sparse_error=_SPARSE)
#: AdamW: always decoupled weight decay.
ADAMW = Spec("AdamW", "adam", _STREAMS, functools.partial(adam_hyper, decoupled=True), _traced_step,
             torch_step=True, sparse_error=_SPARSE if compat.ADAMW_IS_ADAM else _SPARSE_ADAMW)


class Adam(FusedOptimizer, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` with a fused multi-tensor step.

    Takes exactly torch's arguments and defaults, validates them as torch
    does and keeps torch's ``state_dict`` layout, so checkpoints move freely
    between the two. Dense fp32/bf16/fp16 CPU params are updated by one native
    call per param group and dtype (AVX-512, AVX2 or scalar, chosen at run
    time), CUDA params by multi-tensor launches when the wheel has the CUDA
    backend; everything else (other devices and dtypes, complex, strided
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
        capturable: CUDA params keep their step counters on the device and
            the kernels count them (no host sync); CPU steps need no capture
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
        state_bits: ``8`` keeps the moments of every tensor with at least
            ``min_quantized_numel`` elements as 8-bit codes, one fp32 scale
            per block of ``state_block_size`` elements (2.03 instead of 8
            bytes per param, Note [8-bit states]): ``exp_avg_codes``,
            ``exp_avg_scale``, ``exp_avg_sq_codes`` (of the root of
            ``exp_avg_sq``, rounded at random so that its small changes per
            step survive in expectation) and ``exp_avg_sq_scale``. CPU and
            CUDA params; not with ``amsgrad`` or ``state_dtype``.
            :meth:`torch_state_dict` exports dequantized fp32 moments.
        state_block_size: elements per scale, a power of two from 64 to
            4096 (default: 256).
        min_quantized_numel: smaller tensors (biases, norms) keep full
            states (default: 4096).

    The precision options are off by default (torch's results). They need
    params the fused kernels take (dense, contiguous, CPU or GPU) and raise
    otherwise; bad combinations raise ValueError.

    Threads default to :func:`torch.get_num_threads`; set
    :func:`fusedoptim.set_num_threads` or the ``num_threads`` attribute to
    change it. :attr:`last_backends` tells which backend each group took.
    """

    _torch_cls = torch.optim.Adam
    _spec = ADAM

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False, stochastic_rounding: bool = False, kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
        state_bits: Optional[int] = None, state_block_size: int = 256, min_quantized_numel: int = 4096,
    ) -> None:
        kwargs: Dict[str, Any] = dict(
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable, fused=None
        )
        if compat.accepts(torch.optim.Adam, "decoupled_weight_decay"):
            kwargs["decoupled_weight_decay"] = decoupled_weight_decay
        elif decoupled_weight_decay:
            raise TypeError(
                f"torch {torch.__version__} has no Adam(decoupled_weight_decay=...); use fusedoptim.AdamW"
            )
        torch.optim.Adam.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._fo_init(fused, foreach, differentiable, precision_options(
            master_weights, stochastic_rounding, kahan_summation, state_dtype, max_grad_norm,
            state_bits, state_block_size, min_quantized_numel))


class AdamW(FusedOptimizer, torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` with a fused multi-tensor step.

    Same arguments, defaults, validation and ``state_dict`` as torch's AdamW,
    so checkpoints move freely between the two. Dense fp32/bf16/fp16 CPU
    params are updated by one native call per param group and dtype, CUDA
    params by multi-tensor launches when the wheel has the CUDA backend;
    everything else runs torch's own implementation (see
    :class:`fusedoptim.Adam`).

    Args:
        params: iterable of parameters or param groups to optimize.
        lr: learning rate (default: 1e-3); a 1-element tensor is accepted.
        betas: coefficients of the running averages of the gradient and its
            square (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay: each step multiplies the param
            by ``1 - lr * weight_decay`` (default: 1e-2).
        amsgrad: use the AMSGrad variant (default: False).
        maximize: maximize the objective (default: False).
        foreach: passed to torch's implementation when it runs (fallback).
        capturable: CUDA params keep their step counters on the device and
            the kernels count them (no host sync); CPU steps need no capture
            support.
        differentiable: run torch's differentiable implementation.
        fused: accepted; the CPU step is always fused. ``True`` also lets
            ``torch.amp.GradScaler`` hand the unscaling to the step.
        master_weights, stochastic_rounding, kahan_summation, state_dtype,
            max_grad_norm: the precision options, off by default (torch's
            results); see :class:`fusedoptim.Adam` and the README.
        state_bits, state_block_size, min_quantized_numel: ``state_bits=8``
            keeps the moments of tensors with at least ``min_quantized_numel``
            elements as uint8 codes with one fp32 scale per block of
            ``state_block_size`` elements (2.03 bytes per param instead of 8);
            see the README's section on 8-bit states.

    Threads default to :func:`torch.get_num_threads`; set
    :func:`fusedoptim.set_num_threads` or the ``num_threads`` attribute to
    change it. :attr:`last_backends` tells which backend each group took.
    """

    _torch_cls = torch.optim.AdamW
    _spec = ADAMW

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
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        master_weights: bool = False, stochastic_rounding: bool = False, kahan_summation: bool = False,
        state_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
        state_bits: Optional[int] = None, state_block_size: int = 256, min_quantized_numel: int = 4096,
    ) -> None:
        torch.optim.AdamW.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=None,
        )
        self._fo_init(fused, foreach, differentiable, precision_options(
            master_weights, stochastic_rounding, kahan_summation, state_dtype, max_grad_norm,
            state_bits, state_block_size, min_quantized_numel))
