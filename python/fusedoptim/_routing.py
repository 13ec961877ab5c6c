"""Who updates each param of a group: the CPU kernels, the CUDA kernels, or torch.

:func:`route` checks every (param, grad, state) of a group and decides;
it writes nothing (a CUDA param on a build or machine without the CUDA
backend only warns once), so a step can route every group before it
touches any.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from . import _precision
from ._precision import Options
from ._spec import Spec
from ._tensors import DTYPE_CODES, STEP_CODES, disjoint, local, plain, same_sharding
from .backends import cuda

__all__ = ["Route", "route"]


class Route:
    """A group's routing: positions in its params-with-grad list."""

    __slots__ = ("keys", "opts", "cpu", "cuda", "torch")

    def __init__(self, keys: Tuple[str, ...], opts: Options) -> None:
        self.keys = keys  # the group's state streams, in kernel order
        self.opts = opts
        # (dtype code, step counter's dtype code, 8-bit states) -> positions, one CPU kernel call each
        self.cpu: Dict[Tuple[int, int, bool], List[int]] = {}
        self.cuda: List[int] = []  # positions the CUDA kernels update (real or emulated)
        self.torch: List[int] = []  # positions torch's own implementation updates


def route(spec: Spec, group: Dict[str, Any], ps: List[Tensor], gs: List[Tensor], state_all: Any,
          opts: Options, gi: int, owner: str) -> Route:
    """Check every (param, grad, state) of group ``gi`` of optimizer class
    ``owner`` and decide who updates it.

    Raises before anything is written: torch's exception types for bad
    grads, StateMismatchError (a RuntimeError, as torch's, and a ValueError)
    or TypeError for state that does not fit its param, and RuntimeError
    when the precision options meet a param the kernels cannot take (torch
    has no implementation of them).
    """
    r = Route(spec.keys(group, opts), opts)
    native_ok = not group.get("differentiable", False)
    new_step = spec.step_dtype(group)
    # Counters a CUDA kernel increments on the device are float32 (torch's
    # capturable layout under a float64 default dtype keeps float64 ones).
    cuda_ok = not (spec.torch_step and group.get("capturable") and not group.get("fused")
                   and new_step != torch.float32)
    for i, (p, g) in enumerate(zip(ps, gs)):
        spec.check_grad(i, p, g, gi)
        state = state_all.get(p)
        keys = opts.param_keys(p, r.keys) if opts.state_bits is not None else r.keys
        if state:
            spec.check_state(i, p, state, keys, opts)
        lp, lg = local(p), local(g)
        kernel_ok = (
            native_ok
            and p.layout == torch.strided
            and g.layout == torch.strided
            and same_sharding(p, g)
            and plain(lp)
            and plain(lg)
            and p.dtype in DTYPE_CODES
            and g.dtype == p.dtype
            and lp.is_contiguous()
        )
        if kernel_ok and cuda.takes(p):
            usable = cuda_ok and (not state or spec.state_usable(p, state, keys, opts, cuda=True))
            (r.cuda if usable else r.torch).append(i)
            continue
        if p.device.type == "cuda":
            cuda.warn_unavailable(p)
        if kernel_ok and p.device.type == "cpu" and (not state or spec.state_usable(p, state, keys, opts)):
            step = state.get("step") if state else None
            step_code = STEP_CODES[step.dtype if step is not None else new_step]
            r.cpu.setdefault((DTYPE_CODES[p.dtype], step_code, keys != r.keys), []).append(i)
        else:
            r.torch.append(i)
    # Calls of one dtype side by side (a C plan's buckets are runs of one dtype),
    # dtypes in the order they first appear.
    codes = list(dict.fromkeys(k[0] for k in r.cpu))
    r.cpu = {k: r.cpu[k] for c in codes for k in r.cpu if k[0] == c}
    native = [i for idx in r.cpu.values() for i in idx] + r.cuda
    if native and not disjoint([ps[i] for i in native]):
        # Params that share memory are updated one after the other by
        # torch, never by threads that would race on the shared bytes.
        r.torch = sorted(r.torch + native)
        r.cpu, r.cuda = {}, []
    if opts.active:
        _check_precision(group, r, ps, gs, gi, owner)
    for i in r.torch:
        state = state_all.get(ps[i])
        if state:
            spec.check_torch_state(i, ps[i], gs[i], state, r.keys)
    return r


def _check_precision(group: Dict[str, Any], r: Route, ps: List[Tensor], gs: List[Tensor], gi: int,
                     name: str) -> None:
    """A group with precision options: every param must be one the kernels take."""
    for i, p in enumerate(ps):
        _precision.check_param(r.opts, p, f"param {i} of group {gi}")
    if r.torch:
        i = r.torch[0]
        p = ps[i]
        why = f"a {p.layout} {p.dtype} tensor on {p.device}"
        if not local(p).is_contiguous():
            why += ", not contiguous"
        if gs[i].dtype != p.dtype:
            why += f", with a {gs[i].dtype} grad"
        if group.get("differentiable"):
            why += ", with differentiable=True"
        raise RuntimeError(
            f"{name}: the precision options (master_weights, stochastic_rounding, "
            f"kahan_summation, state_dtype, max_grad_norm) need params the fused kernels take: dense, "
            f"contiguous, not sharing memory, float32/bfloat16/float16 on the CPU (or a usable GPU), "
            f"with state in the options' layout; param {i} of group {gi} ({why}) is not one. "
            f"Nothing was updated."
        )
