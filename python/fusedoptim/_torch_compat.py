"""Every use of torch beyond its stable public API, in one module.

A drop-in optimizer has to lean on some of torch.optim's internals (the
grad-mode decorator of ``step``, ``_init_group``, the hook wrapper of
``step``, the AMP handshake attribute) and on APIs newer than the oldest
supported torch (custom ops, constructor keywords). Each use lives here,
with the torch versions it was checked on and what happens where it is
missing, so that a torch release that changes one breaks this module,
loudly, and nothing else.

Checked on torch 2.2.2, 2.13.0 and 2.15.0 (the suite's CI versions), and
read against 2.5.1 (AdamW's own ``_init_group``).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import sys
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.autograd.profiler
import torch.optim.optimizer

__all__ = [
    "AMP_SCALING_ATTR",
    "HAVE_CUSTOM_OP",
    "TRACED_STEP_MIN",
    "TRACE_STEP",
    "ADAMW_IS_ADAM",
    "MIN_TORCH",
    "SGD_STATE_ONLY_WITH_MOMENTUM",
    "STEP_FOLLOWS_DEFAULT_DTYPE",
    "TORCH_VERSION",
    "accepts",
    "compiler_disable",
    "foreach_div_",
    "foreach_mul_",
    "init_group",
    "is_compiling",
    "local_shard",
    "profiling",
    "step_runner",
    "supported_range",
    "unhooked",
    "use_grad_for_differentiable",
    "zero_grad_runs_bare",
]


def _version(text: str) -> Tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return (0, 0, 0)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


#: The running torch as (major, minor, patch).
TORCH_VERSION: Tuple[int, int, int] = _version(torch.__version__)
#: The oldest torch this package supports (pyproject.toml says the same).
MIN_TORCH: Tuple[int, int] = (2, 2)


def supported_range() -> str:
    """The supported torch versions, as ``backend_info()`` and the README state them."""
    return f">={MIN_TORCH[0]}.{MIN_TORCH[1]}"


# -- torch.compile ------------------------------------------------------------
# torch.library.custom_op: 2.4 and later. Without it the native step cannot be
# an opaque op in a graph, so a compiled step() runs eagerly (compiler_disable).
HAVE_CUSTOM_OP: bool = hasattr(torch.library, "custom_op")

#: The oldest torch whose Dynamo traces fusedoptim's step correctly (custom
#: ops, and optimizer state stored from traced code): torch 2.5.1 drops a
#: momentum buffer that a traced SGD step stores (every step would then be a
#: first step: wrong results), and its tracer lacks dict(mapping, **kwargs).
TRACED_STEP_MIN: Tuple[int, int] = (2, 6)
#: Whether a compiled ``step()`` is traced (else it runs eagerly outside the graph).
TRACE_STEP: bool = HAVE_CUSTOM_OP and TORCH_VERSION[:2] >= TRACED_STEP_MIN


if hasattr(torch.compiler, "is_compiling"):  # 2.3+
    is_compiling: Callable[[], bool] = torch.compiler.is_compiling
else:  # 2.2: Dynamo's own, which it folds to True while tracing
    import torch._dynamo

    is_compiling = torch._dynamo.is_compiling


def compiler_disable(fn: Callable) -> Callable:
    """``fn`` run outside any graph: ``torch.compiler.disable`` (2.1+)."""
    return torch.compiler.disable(fn)


# -- torch.optim internals ----------------------------------------------------
def _own_use_grad_for_differentiable(func: Callable) -> Callable:
    @functools.wraps(func)
    def use_grad(self: Any, *args: Any, **kwargs: Any) -> Any:
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return func(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    return use_grad


try:
    # The decorator of every torch.optim step (grad enabled only with
    # differentiable=True; Dynamo knows it). 2.0 to 2.15.
    from torch.optim.optimizer import _use_grad_for_differentiable as use_grad_for_differentiable
except ImportError:  # pragma: no cover - the same behaviour, without Dynamo's special case
    use_grad_for_differentiable = _own_use_grad_for_differentiable


# Note [step runner]
# ~~~~~~~~~~~~~~~~~~
# torch.optim.Optimizer wraps each class's ``step`` in its hook runner
# (``profile_hook_step``, 2.0 to 2.15; installed as the class's ``step`` by
# ``_patch_step_function`` unless the function says ``hooked``): the global
# and the optimizer's step pre-hooks (which may replace the arguments), the
# step, ``_optimizer_step_code()``, the post-hooks, all inside a profiler
# range ``Optimizer.step#<class>.step``; under it, ``_use_grad`` sets the
# grad mode and marks graph breaks for Dynamo. The range is what costs:
# entering and leaving it right after torch's own work (forward, backward,
# any op that leaves the caches full of its data) took 44-48 us on a
# 2-core Xeon, a whole small step (SGD on 2^16 elements: 120 us, 55 of
# them in the wrappers). With torch 2.6 and later (``TRACE_STEP``; before,
# where Dynamo cannot trace the step anyway, torch's runner stays: torch
# 2.2's Dynamo traced into a runner of ours, its is_compiling() false, and
# on into the step) fusedoptim's ``step`` is therefore its own runner:
# the same hooks, in the same order, with the same arguments and results,
# the same grad mode, and torch's whole runner whenever a profiler records
# (torch's Python flag or the profiler's state in C) or Dynamo traces. What
# it leaves out, with no profiler on, is a range nobody records (an
# execution-trace observer without a profiler would miss it) and Dynamo's
# graph-break markers, which do nothing outside a trace.
# (By sys.modules: torch.optim's package deletes its ``optimizer`` attribute.)
_optim_module = sys.modules["torch.optim.optimizer"]
_profiler_module = sys.modules["torch.autograd.profiler"]
_profiler_enabled: Optional[Callable[[], bool]] = getattr(torch.autograd, "_profiler_enabled", None)
_torch_runner: Optional[Callable[[Callable], Callable]] = getattr(torch.optim.Optimizer, "profile_hook_step", None)
_HOOK_DICTS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
# The grad mode's own switch, without torch.set_grad_enabled's object.
_set_grad_enabled: Callable[[bool], None] = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)
if not hasattr(_profiler_module, "_is_profiler_enabled"):  # (2.1+) the C state alone
    _profiler_module = types.SimpleNamespace(_is_profiler_enabled=False)


def profiling() -> bool:
    """Whether a torch profiler records (or whether that cannot be told)."""
    if _profiler_enabled is None:
        return True
    return bool(_profiler_module._is_profiler_enabled) or _profiler_enabled()


def step_runner(traced: Callable, body: Callable[..., Any]) -> Callable:
    """An optimizer's ``step``: ``traced`` (the step with its grad-mode and
    Dynamo wrappers) inside torch's hook runner when a profiler records or
    Dynamo traces, else ``body`` with the hooks and grad mode of that runner
    and no profiler range (Note [step runner]). On a torch before 2.6
    (``TRACE_STEP`` false), or where torch's runner or its global hook
    registries are missing, ``traced`` itself, which torch wraps as usual."""
    if (not TRACE_STEP or _torch_runner is None or _profiler_enabled is None
            or not all(hasattr(_optim_module, d) for d in _HOOK_DICTS)):
        # (Before 2.6 torch's runner stays: Dynamo there would trace this
        # runner's step without seeing that it compiles.)
        return traced
    full = _torch_runner(traced)

    @functools.wraps(traced)
    def step(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if type(self).step is not step:
            # Reached through a subclass's own step, which torch's runner
            # wraps (its hooks ran there): the step alone, as torch's own
            # classes run their inner steps.
            return traced(*args, **kwargs)
        if is_compiling() or profiling():
            return full(*args, **kwargs)
        pre, own_pre = _optim_module._global_optimizer_pre_hooks, self._optimizer_step_pre_hooks
        if pre or own_pre:
            for hook in itertools.chain(pre.values(), own_pre.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{traced} must return None or a tuple of (new_args, new_kwargs), "
                                           f"but got {result}.")
        prev = torch.is_grad_enabled()
        _set_grad_enabled(self.defaults["differentiable"])
        try:
            out = body(*args, **kwargs)
        finally:
            _set_grad_enabled(prev)
        self._optimizer_step_code()
        post, own_post = _optim_module._global_optimizer_post_hooks, self._optimizer_step_post_hooks
        if post or own_post:
            for hook in itertools.chain(own_post.values(), post.values()):
                hook(self, args, kwargs)
        return out

    step.hooked = True  # type: ignore[attr-defined]  # torch's _patch_step_function leaves it as it is
    return step


def zero_grad_runs_bare(opt: Any, set_to_none: bool) -> bool:
    """Whether ``opt.zero_grad(set_to_none)`` may run without torch's profiler
    range (Note [step runner]): setting grads to None, on the torch versions
    whose step runs without it, no profiler, no trace. What torch's
    ``zero_grad`` does then is ``p.grad = None`` for every param with a grad."""
    return (set_to_none and TRACE_STEP and not is_compiling() and not profiling()
            and hasattr(opt, "_zero_grad_profile_name"))


def unhooked(fn: Callable) -> Callable:
    """The inner step of a torch.optim class: torch wraps ``step`` with its
    hook runner (``hooked`` and ``__wrapped__`` set by functools.wraps, 2.0
    to 2.15); a step without the wrapper is returned as it is."""
    while getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _amsgrad_position(cls: type) -> Optional[int]:
    """Where ``cls._init_group`` takes ``amsgrad`` among its lists, or None."""
    names = list(inspect.signature(cls._init_group).parameters)  # type: ignore[attr-defined]
    return names.index("amsgrad") - 2 if "amsgrad" in names else None  # after self and group


# Read once, here: Dynamo traces init_group, and inspect would break its graph.
_ADAMW_AMSGRAD = _amsgrad_position(torch.optim.AdamW)


def init_group(opt: Any, group: Any, *lists: Any) -> Any:
    """``opt._init_group(group, *lists)``: torch's state creation for one
    group. Adam's and SGD's signatures are the same on every version
    (Adam: group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    state_steps); AdamW before 2.6 is its own class whose ``_init_group``
    takes ``amsgrad`` after the grads, filled in here from the group."""
    k = _ADAMW_AMSGRAD
    if k is not None and isinstance(opt, torch.optim.AdamW):
        lists = lists[:k] + (group["amsgrad"],) + lists[k:]
    return opt._init_group(group, *lists)


def _adam_follows_default_dtype() -> bool:
    # torch.optim.adam imports _get_scalar_dtype where its step counter follows
    # a float64 default dtype (2.3+); before, the counter is always float32.
    import importlib

    return hasattr(importlib.import_module("torch.optim.adam"), "_get_scalar_dtype")


#: Whether torch's Adam keeps ``step`` in float64 under a float64 default
#: dtype (without ``fused``): 2.3+ (checked: 2.2.2 no; 2.5.1, 2.6.0, 2.13.0 yes).
STEP_FOLLOWS_DEFAULT_DTYPE: bool = _adam_follows_default_dtype()

def _sgd_state_only_with_momentum() -> bool:
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.step()
    return len(opt.state) == 0


#: Whether torch's SGD keeps no state without momentum (2.3+; before, it
#: stores ``momentum_buffer=None`` for every param with a grad). Found by one
#: step of torch's SGD on a 1-element tensor.
SGD_STATE_ONLY_WITH_MOMENTUM: bool = _sgd_state_only_with_momentum()

#: Whether torch's AdamW is a subclass of its Adam (2.6+); before, AdamW is
#: its own class, with its own sparse-grad message.
ADAMW_IS_ADAM: bool = issubclass(torch.optim.AdamW, torch.optim.Adam)


#: The attribute that tells torch.amp.GradScaler the step unscales the grads
#: itself (it then sets ``grad_scale`` and ``found_inf`` on the optimizer);
#: read by every GradScaler from 1.13 to 2.15.
AMP_SCALING_ATTR = "_step_supports_amp_scaling"


def accepts(fn: Any, name: str) -> bool:
    """Whether torch's function ``fn`` (a class: its ``__init__``) takes the
    keyword ``name`` (e.g. SGD's ``fused``: 2.3+; Adam's and
    ``torch.optim.adam.adam``'s ``decoupled_weight_decay``: 2.6+)."""
    return name in inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters


# -- tensors --------------------------------------------------------------------
def _foreach(op: str, tensors: List[torch.Tensor], other: Any) -> None:
    """``torch._foreach_<op>_(tensors, other)`` (2.0 to 2.15), else
    ``t.<op>_(other)`` for each tensor."""
    f = getattr(torch, f"_foreach_{op}_", None)
    if f is not None:
        f(tensors, other)
        return
    for t in tensors:  # pragma: no cover
        getattr(t, f"{op}_")(other)


def foreach_div_(tensors: List[torch.Tensor], divisor: torch.Tensor) -> None:
    """Divide every tensor by the 0-d ``divisor`` in place."""
    _foreach("div", tensors, divisor)


def foreach_mul_(tensors: List[torch.Tensor], factor: float) -> None:
    """Multiply every tensor by ``factor`` in place."""
    _foreach("mul", tensors, factor)


def local_shard(t: Any) -> Any:
    """A DTensor's local shard, else None: ``_local_tensor`` (2.2 to 2.15),
    which unlike ``to_local()`` adds no autograd node, else ``to_local()``."""
    if type(t).__name__ != "DTensor":
        return None
    shard = getattr(t, "_local_tensor", None)
    if isinstance(shard, torch.Tensor):
        return shard
    to_local = getattr(t, "to_local", None)  # pragma: no cover
    return to_local() if to_local is not None else None
