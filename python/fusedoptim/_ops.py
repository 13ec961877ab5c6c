"""torch.compile support: the native steps as ``torch.library`` custom ops.

Dynamo cannot trace into :mod:`fusedoptim._C` (a pybind11 module that takes
data addresses), so without this module a compiled ``optimizer.step()``
breaks the graph at the first native call. Here the two native steps become
custom ops that the compiler treats as opaque calls with known side effects:

- ``fusedoptim::adam_step_`` (Adam and AdamW),
- ``fusedoptim::sgd_step_`` (SGD, with or without momentum).

Both take lists of tensors and plain hyperparameters, declare every tensor
they write (``mutates_args``) and have a no-op fake implementation, so the
compiler sees what changes without running anything. Their real
implementation checks the tensors, then calls ``_C.adam_step`` /
``_C.sgd_step`` exactly as the eager step does: compiled and eager steps give
the same bits, and no update math lives in Python.

While Dynamo traces, :meth:`FusedOptimizerMixin.step` runs
:func:`compiled_step` instead of the eager step (see :func:`compile_aware`).
It routes each param at trace time as the eager step does: dense
fp32/bf16/fp16 contiguous CPU params go to one custom op call per param
group; everything else (other devices and dtypes, complex, strided params,
tensor subclasses, ``differentiable=True``, tensor ``betas`` / ``eps`` /
``weight_decay``) goes to torch's functional for-loop implementation
(``torch.optim.adam.adam`` / ``torch.optim.sgd.sgd``), which Dynamo traces.
"""

import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import adam as _torch_adam
from torch.optim import sgd as _torch_sgd

from . import _C

__all__ = ["adam_step_", "sgd_step_", "compiled_step", "compile_aware"]

#: torch dtype -> dtype code of the compiled module (the native dtypes).
_CODES: Dict[torch.dtype, int] = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.float16: _C.DTYPE_FLOAT16,
}
#: Tensor types whose storage is their own memory (not wrapper subclasses
#: such as FSDP2's DTensor); checked on the traced tensors' types.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

_HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.compiler, "is_compiling")
_ADAM_DECOUPLED_ARG = "decoupled_weight_decay" in inspect.signature(_torch_adam.adam).parameters


# --------------------------------------------------------------------------- the ops' real implementation
def _check_cpu(name: str, i: int, t: Tensor, dtype: torch.dtype, numel: int, contiguous: bool = True) -> None:
    if not (
        isinstance(t, Tensor)
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.dtype == dtype
        and t.numel() == numel
        and (not contiguous or t.is_contiguous())
    ):
        what = "a contiguous" if contiguous else "a strided"
        got = f"{t.dtype} {t.layout} on {t.device}, {t.numel()} elements" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}[{i}] must be {what} CPU {dtype} tensor of {numel} elements, got {got}")


def _check_lengths(n: int, **lists: Optional[List[Any]]) -> None:
    for name, xs in lists.items():
        if xs is not None and len(xs) != n:
            raise ValueError(f"{name} has {len(xs)} entries, params has {n}")


def _batches(params: List[Tensor]) -> List[List[int]]:
    """Index lists, one native call each: the params of one dtype together,
    or one param per call where params share memory (updated one after the
    other, as torch does, never by threads racing on the shared bytes)."""
    from ._backend import _disjoint

    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, p in enumerate(params):
        if p.dtype not in _CODES:
            raise ValueError(f"params[{i}] has dtype {p.dtype}; the native step takes {list(_CODES)}")
        by_dtype.setdefault(p.dtype, []).append(i)
    if _disjoint(params, list(range(len(params)))):
        return list(by_dtype.values())
    return [[i] for i in range(len(params))]


def _grad_ptrs(grads: List[Tensor], params: List[Tensor], index: List[int], keep: List[Tensor]) -> List[int]:
    """Grad addresses; a strided grad is read through a contiguous copy (kept alive in ``keep``)."""
    ptrs = []
    for i in index:
        g, p = grads[i], params[i]
        _check_cpu("grads", i, g, p.dtype, p.numel(), contiguous=False)
        if g.shape != p.shape:  # the copy pairs elements by position in the param's shape
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        if not g.is_contiguous():
            g = g.contiguous()
            keep.append(g)
        ptrs.append(g.data_ptr())
    return ptrs


def _ptrs(name: str, tensors: List[Tensor], params: List[Tensor], index: List[int]) -> List[int]:
    ptrs = []
    for i in index:
        _check_cpu(name, i, tensors[i], params[i].dtype, params[i].numel())
        ptrs.append(tensors[i].data_ptr())
    return ptrs


def _lr(lr: float, lr_tensor: Optional[Tensor]) -> float:
    if lr_tensor is None:
        return lr
    if lr_tensor.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    return float(lr_tensor.item())


def _threads(num_threads: int) -> int:
    if num_threads > 0:
        return num_threads
    from ._backend import get_num_threads

    return get_num_threads()


if _HAVE_CUSTOM_OP:

    @torch.library.custom_op(
        "fusedoptim::adam_step_",
        mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
        device_types="cpu",
    )
    def adam_step_(
        params: List[Tensor],
        grads: List[Tensor],
        exp_avgs: List[Tensor],
        exp_avg_sqs: List[Tensor],
        max_exp_avg_sqs: List[Tensor],
        state_steps: List[Tensor],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
        lr_tensor: Optional[Tensor] = None,
        num_threads: int = 0,
    ) -> None:
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
        n = len(params)
        _check_lengths(n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None, state_steps=state_steps)
        lr = _lr(lr, lr_tensor)
        threads = _threads(num_threads)
        calls = []
        for index in _batches(params):
            keep: List[Tensor] = []
            for i in index:
                _check_cpu("params", i, params[i], params[i].dtype, params[i].numel())
                _check_cpu("state_steps", i, state_steps[i], torch.float32, 1)
            calls.append((
                [params[i].data_ptr() for i in index],
                _grad_ptrs(grads, params, index, keep),
                _ptrs("exp_avgs", exp_avgs, params, index),
                _ptrs("exp_avg_sqs", exp_avg_sqs, params, index),
                _ptrs("max_exp_avg_sqs", max_exp_avg_sqs, params, index) if amsgrad else None,
                [state_steps[i].data_ptr() for i in index],
                [params[i].numel() for i in index],
                _CODES[params[index[0]].dtype],
                keep,
            ))
        # Everything was checked: now write (`keep` holds the grads' contiguous copies).
        for pp, gp, mp, vp, vmaxp, sp, numels, code, keep in calls:
            _C.adam_step(pp, gp, mp, vp, vmaxp, sp, numels, code, lr, beta1, beta2, eps, weight_decay,
                         decoupled, amsgrad, maximize, threads)

    @adam_step_.register_fake
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, lr_tensor=None, num_threads=0) -> None:
        return None

    @torch.library.custom_op("fusedoptim::sgd_step_", mutates_args=("params", "momentum_buffers"), device_types="cpu")
    def sgd_step_(
        params: List[Tensor],
        grads: List[Tensor],
        momentum_buffers: List[Tensor],
        first_step: List[bool],
        lr: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        lr_tensor: Optional[Tensor] = None,
        num_threads: int = 0,
    ) -> None:
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
        n = len(params)
        use_momentum = momentum != 0.0
        _check_lengths(n, grads=grads, momentum_buffers=momentum_buffers if use_momentum else None,
                       first_step=first_step if use_momentum else None)
        lr = _lr(lr, lr_tensor)
        threads = _threads(num_threads)
        calls = []
        for index in _batches(params):
            keep: List[Tensor] = []
            for i in index:
                _check_cpu("params", i, params[i], params[i].dtype, params[i].numel())
            calls.append((
                [params[i].data_ptr() for i in index],
                _grad_ptrs(grads, params, index, keep),
                _ptrs("momentum_buffers", momentum_buffers, params, index) if use_momentum else None,
                [bool(first_step[i]) for i in index] if use_momentum else None,
                [params[i].numel() for i in index],
                _CODES[params[index[0]].dtype],
                keep,
            ))
        for pp, gp, bp, first, numels, code, keep in calls:
            _C.sgd_step(pp, gp, bp, first, numels, code, lr, weight_decay, momentum, dampening, nesterov,
                        maximize, threads)

    @sgd_step_.register_fake
    def _sgd_step_fake(params, grads, momentum_buffers, first_step, lr, weight_decay, momentum, dampening,
                       nesterov, maximize, lr_tensor=None, num_threads=0) -> None:
        return None

else:  # torch < 2.4: no custom_op; compiled steps trace the eager step (with graph breaks).
    adam_step_ = sgd_step_ = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- the traced step
def compile_aware(eager_step: Callable) -> Callable:
    """Wrap an optimizer's eager ``step`` so that Dynamo traces :func:`compiled_step` instead.

    Outside ``torch.compile`` the wrapper only asks
    :func:`torch.compiler.is_compiling` and calls ``eager_step``.
    """
    if not _HAVE_CUSTOM_OP:
        return eager_step

    @functools.wraps(eager_step)
    def step(self: Any, closure: Optional[Callable[[], Any]] = None) -> Any:
        if torch.compiler.is_compiling():
            return compiled_step(self, closure, eager_step)
        return eager_step(self, closure)

    return step


def _run_eager(eager_step: Callable, opt: Any, closure: Optional[Callable[[], Any]]) -> Any:
    return eager_step(opt, closure)


def compiled_step(opt: Any, closure: Optional[Callable[[], Any]] = None, eager_step: Optional[Callable] = None) -> Any:
    """The optimizer step as Dynamo traces it: no graph break on the CPU paths.

    Per param group, missing state is created by torch's own ``_init_group``
    (which Dynamo runs eagerly at trace time, so the state has torch's
    layout), each param is routed as the eager step routes it, the native
    params go through one custom op call and the rest through torch's
    functional for-loop implementation. Hyperparameters are read from the
    param groups when tracing; see Note [hyperparameters under Dynamo] for
    what a changed value recompiles.

    Args:
        opt: a fusedoptim Adam, AdamW or SGD.
        closure: evaluated first, with grad enabled (its backward graph-breaks
            as any ``backward()`` does under Dynamo).
        eager_step: the eager step, run (outside the graph) for the cases
            traced here not at all: AMP with ``fused=True``, where
            ``torch.amp.GradScaler`` hands the step ``grad_scale`` and
            ``found_inf`` and the step must read the inf flag, and the
            precision options (master weights, stochastic rounding, Kahan
            summation, bf16 states, max_grad_norm), whose state layout
            torch's ``_init_group`` does not create.
    """
    if eager_step is not None and (
        getattr(opt, "grad_scale", None) is not None
        or getattr(opt, "found_inf", None) is not None
        or any(opt._fo_opts(group).active for group in opt.param_groups)
    ):
        # Wrapped here, not at import: torch.compiler.disable imports Dynamo.
        return torch.compiler.disable(_run_eager)(eager_step, opt, closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    group_step = _sgd_group if isinstance(opt, torch.optim.SGD) else _adam_group
    with torch.set_grad_enabled(bool(opt.defaults["differentiable"])):
        for group in opt.param_groups:
            group_step(opt, group)
    return loss


def _kernel_ok(p: Tensor, g: Tensor) -> bool:
    """What the custom ops take, known at trace time (the op checks it again)."""
    return (
        type(p) in _PLAIN_TYPES
        and type(g) in _PLAIN_TYPES
        and p.layout == torch.strided
        and g.layout == torch.strided
        and p.device.type == "cpu"
        and p.dtype in _CODES
        and p.is_contiguous()
    )


# Note [hyperparameters under Dynamo]
# A float hyperparameter is a constant in the first graph. When its value
# changes, Dynamo recompiles and first tries it as a symbolic float, so the
# traced code must work on both. The lr reaches the op as a float64 0-d
# tensor holding exactly the Python float, and nothing in the trace compares
# it: a float lr that an LR schedule changes every step then becomes a graph
# input after one recompile (as with torch's Adam) instead of a recompile per
# step; the op checks it when it runs (finite, >= 0). The other
# hyperparameters are checked here as the eager step checks them (same
# messages), with plain comparisons that Dynamo turns into guards
# (math.isfinite or float() on a symbolic float would break the graph), and
# passed as floats: when one changes, Dynamo specializes it on the new value
# and recompiles.


def _checked(value: Any, name: str, upper: float = math.inf) -> Any:
    if not 0.0 <= value < upper:  # also rejects NaN
        raise ValueError(f"Invalid {name}: {value}")
    return value


def _lr_arg(lr: Any) -> Tensor:
    # Checked when the op reads it (one element, finite, >= 0). `zeros + lr`
    # (exact) rather than torch.tensor(lr): an addition is what Dynamo can turn
    # into a graph input when lr is a symbolic float. On the CPU, where the op
    # runs, whatever the default device.
    if isinstance(lr, Tensor):
        return lr if lr.device.type == "cpu" else lr.to("cpu")
    return torch.zeros((), dtype=torch.float64, device="cpu") + lr


def _threads_arg(opt: Any) -> int:
    return opt.num_threads if opt.num_threads is not None else 0


# Note [state under Dynamo]
# Dynamo runs `optimizer._init_group(...)` for real while tracing (torch's
# OptimizerVariable does this so that state creation is never traced) and
# hands back the lists it filled, wrapped as graph inputs. Its view of
# `optimizer.state` itself is taken once, at the first group: entries that a
# later group's _init_group creates are invisible there, and when Dynamo
# restarts an analysis (see Note [hyperparameters under Dynamo]) they are
# visible the second time. So the traced step reads the state only from
# those lists, as torch's own step does, and never looks up `opt.state[p]`
# (a defaultdict lookup whose path would differ between the two traces); a
# new SGD momentum buffer is stored with one assignment, _store_buffer.


def _store_buffer(opt: Any, p: Tensor, buf: Tensor) -> None:
    opt.state[p] = dict(opt.state.get(p, {}), momentum_buffer=buf)


def _adam_group(opt: Any, group: Dict[str, Any]) -> None:
    params: List[Tensor] = []
    grads: List[Tensor] = []
    exp_avgs: List[Tensor] = []
    exp_avg_sqs: List[Tensor] = []
    max_exp_avg_sqs: List[Tensor] = []
    state_steps: List[Tensor] = []
    has_complex = opt._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if not params:
        return
    amsgrad = bool(group["amsgrad"])
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    decoupled = opt._fo_always_decoupled or bool(group.get("decoupled_weight_decay", False))
    native_ok = not group["differentiable"] and not any(isinstance(v, Tensor) for v in (beta1, beta2, eps, wd))
    native: List[int] = []
    fallback: List[int] = []
    for i in range(len(params)):
        p, g = params[i], grads[i]
        opt._fo_check_grad(i, p, g)
        state = {"step": state_steps[i], "exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i]}
        if amsgrad:
            state["max_exp_avg_sq"] = max_exp_avg_sqs[i]
        opt._fo_check_state(i, p, state, group)
        if native_ok and _kernel_ok(p, g) and opt._fo_state_usable(p, state, group):
            native.append(i)
        else:
            fallback.append(i)

    if native:
        torch.ops.fusedoptim.adam_step_(
            [params[i] for i in native],
            [grads[i] for i in native],
            [exp_avgs[i] for i in native],
            [exp_avg_sqs[i] for i in native],
            [max_exp_avg_sqs[i] for i in native] if amsgrad else [],
            [state_steps[i] for i in native],
            0.0,
            _checked(beta1, "beta parameter at index 0", upper=1.0),
            _checked(beta2, "beta parameter at index 1", upper=1.0),
            _checked(eps, "epsilon value"),
            _checked(wd, "weight_decay value"),
            decoupled,
            amsgrad,
            bool(group["maximize"]),
            _lr_arg(group["lr"]),
            _threads_arg(opt),
        )
    if fallback:
        kwargs = dict(
            foreach=False,
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=has_complex,
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=wd,
            eps=eps,
            maximize=group["maximize"],
        )
        functional = _torch_adam.adam
        if _ADAM_DECOUPLED_ARG:
            kwargs["decoupled_weight_decay"] = decoupled
        elif decoupled:  # torch < 2.6 keeps AdamW's functional form apart
            from torch.optim.adamw import adamw as functional
        functional(
            [params[i] for i in fallback],
            [grads[i] for i in fallback],
            [exp_avgs[i] for i in fallback],
            [exp_avg_sqs[i] for i in fallback],
            [max_exp_avg_sqs[i] for i in fallback] if amsgrad else [],
            [state_steps[i] for i in fallback],
            **kwargs,
        )


def _sgd_group(opt: Any, group: Dict[str, Any]) -> None:
    params: List[Tensor] = []
    grads: List[Tensor] = []
    bufs: List[Optional[Tensor]] = []
    has_sparse_grad = opt._init_group(group, params, grads, bufs)
    if not params:
        return
    momentum, dampening, wd = group["momentum"], group["dampening"], group["weight_decay"]
    use_momentum = momentum != 0
    native_ok = not group["differentiable"] and not any(isinstance(v, Tensor) for v in (momentum, dampening, wd))
    native: List[int] = []
    fallback: List[int] = []
    for i in range(len(params)):
        p, g = params[i], grads[i]
        opt._fo_check_grad(i, p, g)
        state = {"momentum_buffer": bufs[i]} if use_momentum and bufs[i] is not None else {}
        if state:
            opt._fo_check_state(i, p, state, group)
        if native_ok and _kernel_ok(p, g) and opt._fo_state_usable(p, state, group):
            native.append(i)
        else:
            fallback.append(i)

    if native:
        nesterov = bool(group["nesterov"])
        _checked(momentum, "momentum value")
        _checked(wd, "weight_decay value")
        if not -math.inf < dampening < math.inf:  # torch allows any finite value
            raise ValueError(f"Invalid dampening value: {dampening}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        native_bufs: List[Tensor] = []
        first: List[bool] = []
        if use_momentum:
            for i in native:
                buf = bufs[i]
                # A missing buffer is filled by the op with the (decayed) grad
                # (torch's buf = grad); whether it existed is known when tracing.
                first.append(buf is None)
                if buf is None:
                    buf = torch.empty_like(params[i], memory_format=torch.preserve_format)
                    _store_buffer(opt, params[i], buf)
                native_bufs.append(buf)
        torch.ops.fusedoptim.sgd_step_(
            [params[i] for i in native],
            [grads[i] for i in native],
            native_bufs,
            first,
            0.0,
            wd,
            momentum,
            dampening,
            nesterov,
            bool(group["maximize"]),
            _lr_arg(group["lr"]),
            _threads_arg(opt),
        )
    if fallback:
        fb_params = [params[i] for i in fallback]
        fb_bufs = [bufs[i] for i in fallback] if use_momentum else []
        new = [buf is None for buf in fb_bufs]
        _torch_sgd.sgd(
            fb_params,
            [grads[i] for i in fallback],
            fb_bufs,
            has_sparse_grad=has_sparse_grad,
            foreach=False,
            fused=False,
            grad_scale=None,
            found_inf=None,
            weight_decay=wd,
            momentum=momentum,
            lr=group["lr"],
            dampening=dampening,
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        # torch's step stores the buffers its functional form created.
        for k in range(len(new)):
            if new[k]:
                _store_buffer(opt, fb_params[k], fb_bufs[k])
