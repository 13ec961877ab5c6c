"""torch.compile support: the native steps as ``torch.library`` custom ops.

Dynamo cannot trace into :mod:`fusedoptim._C` (a pybind11 module that takes
data addresses), so without this module a compiled ``optimizer.step()``
breaks the graph at the first native call. Each optimizer's functional
layer (``fusedoptim.adam.adam``, ``fusedoptim.sgd.sgd``) registers its
native step here as a custom op (``fusedoptim::adam_step_``,
``fusedoptim::sgd_step_``) that the compiler treats as an opaque call with
known side effects: every tensor it writes is declared (``mutates_args``)
and its fake implementation does nothing, so the compiler sees what
changes without running anything. The op's real implementation is the
functional layer's native path, exactly as the eager step runs it: compiled
and eager steps give the same bits.

While Dynamo traces, ``step()`` runs :func:`compiled_step` instead of the
eager step (see :func:`compile_aware`): per param group, the optimizer's
``traced_step`` (declared in its spec) routes each param at trace time as
the eager step does, the native params to one custom-op call and the rest
to torch's functional for-loop implementation, which Dynamo traces.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _torch_compat as compat
from ._tensors import DTYPE_CODES

__all__ = ["HAVE_CUSTOM_OP", "compile_aware", "compiled_step", "custom_op", "kernel_ok", "lr_arg", "store_state",
           "threads_arg"]

HAVE_CUSTOM_OP = compat.HAVE_CUSTOM_OP
TRACE_STEP = compat.TRACE_STEP
is_compiling = compat.is_compiling

#: Tensor types whose storage is their own memory (not wrapper subclasses
#: such as FSDP2's DTensor); checked on the traced tensors' types.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str, mutates_args: Sequence[str]) -> Callable[[Callable], Optional[Callable]]:
    """Register ``fn`` as the CPU custom op ``fusedoptim::<name>`` with a
    no-op fake; None on a torch without ``torch.library.custom_op`` (< 2.4),
    where a compiled step traces the eager step instead."""
    def register(fn: Callable) -> Optional[Callable]:
        if not HAVE_CUSTOM_OP:
            return None
        op = torch.library.custom_op(f"fusedoptim::{name}", mutates_args=tuple(mutates_args),
                                     device_types="cpu")(fn)
        op.register_fake(_fake)
        return op

    return register


def _fake(*args: Any, **kwargs: Any) -> None:
    return None


def compile_aware(eager_step: Callable) -> Callable:
    """Wrap an optimizer's eager ``step`` so that Dynamo traces :func:`compiled_step` instead.

    Outside ``torch.compile`` the wrapper only asks whether Dynamo is
    tracing and calls ``eager_step``. On a torch whose Dynamo cannot trace
    the step (``_torch_compat.TRACE_STEP``: no custom ops before 2.4, state
    stores lost before 2.6) a compiled step runs ``eager_step`` outside the
    graph, with one warning: the native calls are never traced.
    """

    @functools.wraps(eager_step)
    def step(self: Any, closure: Optional[Callable[[], Any]] = None) -> Any:
        if is_compiling():
            if not TRACE_STEP:
                return _eager_outside_graph(eager_step, self, closure)
            if any(g.get("state_bits") is not None for g in self.param_groups):
                # 8-bit states have no traced op: the step runs outside the graph.
                return _eager_untraced(eager_step, self, closure)
            return compiled_step(self, closure, eager_step)
        return eager_step(self, closure)

    return step


_warned_eager = False


def _run_eager_warn(eager_step: Callable, opt: Any, closure: Optional[Callable[[], Any]]) -> Any:
    global _warned_eager
    if not _warned_eager:
        _warned_eager = True
        need = ".".join(map(str, compat.TRACED_STEP_MIN))
        warnings.warn(
            f"fusedoptim: a compiled optimizer.step() is traced from torch {need} on; with torch "
            f"{torch.__version__} it runs eagerly, outside the graph (same results, a graph break at the step).",
            RuntimeWarning,
            stacklevel=4,
        )
    return eager_step(opt, closure)


# Made here, at import, because the torch.compiler.disable of torch 2.2
# cannot be called while Dynamo traces (it is on Dynamo's skip list).
_eager_outside_graph = _run_eager_warn if TRACE_STEP else compat.compiler_disable(_run_eager_warn)


def _run_eager(eager_step: Callable, opt: Any, closure: Optional[Callable[[], Any]]) -> Any:
    return eager_step(opt, closure)


_eager_untraced = compat.compiler_disable(_run_eager)


def compiled_step(opt: Any, closure: Optional[Callable[[], Any]] = None, eager_step: Optional[Callable] = None) -> Any:
    """The optimizer step as Dynamo traces it: no graph break on the CPU paths.

    Per param group, the spec's ``traced_step`` creates missing state with
    torch's own ``_init_group`` (which Dynamo runs eagerly at trace time,
    so the state has torch's layout), routes each param as the eager step
    routes it, and sends the native params through one custom-op call and
    the rest through torch's functional for-loop implementation.
    Hyperparameters are read from the param groups when tracing; see Note
    [hyperparameters under Dynamo] for what a changed value recompiles.

    Args:
        opt: a fusedoptim Adam, AdamW or SGD.
        closure: evaluated first, with grad enabled (its backward graph-breaks
            as any ``backward()`` does under Dynamo).
        eager_step: the eager step, run (outside the graph) for the cases
            traced here not at all: AMP with ``fused=True``, where
            ``torch.amp.GradScaler`` hands the step ``grad_scale`` and
            ``found_inf`` and the step must read the inf flag, and the
            precision options, whose state layout torch's ``_init_group``
            does not create.
    """
    if eager_step is not None and (
        getattr(opt, "grad_scale", None) is not None
        or getattr(opt, "found_inf", None) is not None
        or any(_options_active(group) for group in opt.param_groups)
    ):
        # Wrapped here, not at import: torch.compiler.disable imports Dynamo.
        return compat.compiler_disable(_run_eager)(eager_step, opt, closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.set_grad_enabled(bool(opt.defaults["differentiable"])):
        for group in opt.param_groups:
            opt._spec.traced_step(opt, group)
    return loss


def _options_active(group: Any) -> bool:
    # Plain reads and comparisons only: a tracer branches on them.
    return bool(group.get("master_weights", False) or group.get("stochastic_rounding", False)
                or group.get("kahan_summation", False) or group.get("state_dtype") is not None
                or group.get("max_grad_norm") is not None)


def kernel_ok(p: Tensor, g: Tensor) -> bool:
    """What the custom ops take, known at trace time (the op checks it again)."""
    return (
        type(p) in PLAIN_TYPES
        and type(g) in PLAIN_TYPES
        and p.layout == torch.strided
        and g.layout == torch.strided
        and p.device.type == "cpu"
        and p.dtype in DTYPE_CODES
        and g.dtype == p.dtype
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
# hyperparameters are checked by the specs' rules (fusedoptim._spec.in_range,
# plain comparisons that Dynamo turns into guards; math.isfinite or float()
# on a symbolic float would break the graph) and passed as floats: when one
# changes, Dynamo specializes it on the new value and recompiles.


def lr_arg(lr: Any) -> Tensor:
    """The lr as the ops take it. ``zeros + lr`` (exact) rather than
    torch.tensor(lr): an addition is what Dynamo can turn into a graph input
    when lr is a symbolic float. On the CPU, where the op runs, whatever the
    default device."""
    if isinstance(lr, Tensor):
        return lr if lr.device.type == "cpu" else lr.to("cpu")
    return torch.zeros((), dtype=torch.float64, device="cpu") + lr


def threads_arg(opt: Any) -> int:
    """The optimizer's own thread count for an op (0: the process's)."""
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
# new SGD momentum buffer is stored with one assignment (store_state).


def store_state(opt: Any, p: Tensor, key: str, t: Tensor) -> None:
    """Add one state tensor with one assignment; see Note [state under Dynamo]."""
    new = dict(opt.state.get(p, {}))  # (torch 2.5's tracer has no dict(mapping, **kwargs))
    new[key] = t
    opt.state[p] = new
