"""The CUDA path: which params it takes, and the launches.

CUDA params of the drop-in classes go to the multi-tensor kernels of
``csrc/cuda/mta_kernels.h`` (one launch per up to ~450 tensors of one device and
dtype, on torch's current stream of that device) when this build has the
CUDA backend and a GPU is usable; otherwise torch's own implementation runs
them, with one warning that says why.

The same kernels are also compiled for the CPU (``_C.cuda_emulation``, see
Note [CUDA emulation] in csrc/cuda/emulation.h). :func:`emulate` makes the
optimizers send CPU params through this whole path (state layout, AMP
pointers, device step counters, launch packing) with those emulated
kernels, so the CUDA path is tested on machines without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = ["emulate", "emulating", "info", "available"]

_INFO: Optional[Dict[str, Any]] = None
_emulate: bool = False
_param_space: str = "auto"
_warned: bool = False
#: Statistics of the most recent backend calls (launches, blocks, tensors per
#: launch, capacity, parameter bytes), newest last; for tests and benchmarks.
last_stats: "collections.deque[Dict[str, Any]]" = collections.deque(maxlen=64)


def _info() -> Dict[str, Any]:
    # Asked on first use, never at import: asking initialises the CUDA
    # driver, after which a forked child process could not use CUDA (torch
    # defers its own initialisation for the same reason).
    global _INFO
    if _INFO is None:
        _INFO = dict(_C.cuda_info())
    return _INFO


def info() -> Dict[str, Any]:
    """What the CUDA backend is: compiled, usable here and why not, archs, versions."""
    out = dict(_info())
    out["emulating"] = _emulate
    return out


def available() -> bool:
    """Whether CUDA params can run on fusedoptim's kernels in this process."""
    return bool(_info()["available"])


@contextlib.contextmanager
def emulate(enabled: bool = True, param_space: str = "auto") -> Iterator[None]:
    """Run CPU params through the CUDA path with the host-compiled kernels.

    For tests: inside the block, fusedoptim's optimizers treat CPU params as
    if they were on a GPU (``param_space`` ``"small"`` forces the 4 KB
    kernel parameter block, ``"large"`` the 32 KB one).
    """
    global _emulate, _param_space
    if param_space not in ("auto", "large", "small"):
        raise ValueError(f"param_space must be 'auto', 'large' or 'small', got {param_space!r}")
    saved = (_emulate, _param_space)
    _emulate, _param_space = enabled, param_space
    try:
        yield
    finally:
        _emulate, _param_space = saved


def clip_on_device(opt: Any, grads: List[Tensor], max_norm: float, grad_scale: Optional[Tensor]) -> Tensor:
    """max_grad_norm over grads on one GPU, with no host sync: two launches
    (per-block partial sums in float64, then a fixed-order total) write
    ``[total_norm, coefficient]`` to a float32 tensor on the device, which
    the update kernels read. Sets ``opt._fo_last_norm`` (a 0-d view)."""
    from ._backend import DTYPE_CODES, _local

    devices = {g.device for g in grads}
    if len(devices) != 1:
        raise RuntimeError(
            f"max_grad_norm needs every grad of the optimizer on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    gs, _ = contiguous_grads(grads)
    locals_ = [_local(g) for g in gs]
    numels = [g.numel() for g in locals_]
    codes = [DTYPE_CODES[g.dtype] for g in locals_]
    m = _module()
    n_scratch = max(1, int(m.grad_norm_scratch(numels, codes)))
    scratch = torch.empty(n_scratch, dtype=torch.float64, device=device)
    out = torch.empty(2, dtype=torch.float32, device=device)
    keep: List[Tensor] = []
    index, stream = _where(device)
    stats = m.grad_norm(
        [g.data_ptr() for g in locals_], numels, codes, scratch.data_ptr(), n_scratch, out.data_ptr(),
        float(max_norm), grad_scale=_on(grad_scale, device, keep), device=index, stream=stream,
        param_space=_param_space,
    )
    last_stats.append(stats)
    del keep, scratch  # the caching allocator reuses the block only after the stream's work
    opt._fo_last_norm = out[0]
    return out


def clip_ptr(clip: Any) -> int:
    """Address of the device clip coefficient ([norm, coef] from clip_on_device), or 0."""
    return clip.data_ptr() + 4 if isinstance(clip, Tensor) else 0


def emulating() -> bool:
    return _emulate


def takes(p: Tensor) -> bool:
    """Whether param ``p`` is routed to the CUDA kernels (real or emulated)."""
    if _emulate:
        return p.device.type == "cpu"
    return p.device.type == "cuda" and bool(_info()["available"])


def warn_unavailable(p: Tensor) -> None:
    """Once per process: a CUDA param meets a build or machine without the CUDA backend."""
    global _warned
    if _warned or p.device.type != "cuda" or _info()["available"]:
        return
    _warned = True
    warnings.warn(
        f"fusedoptim: CUDA params run torch's own implementation because {_info()['reason']}. "
        "Install a fusedoptim wheel built with the CUDA backend (see README, 'CUDA') to use its kernels.",
        RuntimeWarning,
        stacklevel=4,
    )


def _module() -> Any:
    return _C.cuda_emulation if _emulate else _C.cuda  # type: ignore[attr-defined]


def _where(device: torch.device) -> Tuple[int, int]:
    """(device index, stream handle) of a launch on ``device``."""
    if _emulate:
        return 0, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(device).cuda_stream


def _on(t: Optional[Tensor], device: torch.device, keep: List[Tensor]) -> int:
    """Address of a float32 scalar (AMP scale, inf flag, lr) on ``device``; 0 for None."""
    if t is None:
        return 0
    if t.device != device or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
    keep.append(t)
    return t.data_ptr()


def contiguous_grads(grads: List[Tensor]) -> Tuple[List[Tensor], List[Tuple[Tensor, Tensor]]]:
    """Grads the kernels can read: a strided grad is read through a
    contiguous copy. Returns the list and the (grad, copy) pairs; with AMP the
    kernel unscales the copy (or leaves it alone with found_inf), and
    :func:`write_back` then copies it into the grad, on the same stream and
    without a host sync."""
    from ._backend import _local

    if all(_local(g).is_contiguous() for g in grads):
        return grads, []
    out, pairs = [], []
    for g in grads:
        if _local(g).is_contiguous():
            out.append(g)
        else:
            c = g.contiguous()
            out.append(c)
            pairs.append((g, c))
    return out, pairs


def write_back(pairs: List[Tuple[Tensor, Tensor]], grad_scale: Optional[Tensor]) -> None:
    if grad_scale is not None:
        for g, c in pairs:
            g.copy_(c)


class Batch:
    """One backend call: params of one device and dtype (and, for Adam, one
    step-counter location), with the addresses that stay valid between steps.

    A cached CUDA plan (see ``FusedOptimizerMixin._fo_build_cuda``) keeps one
    per call and only reads the grads' addresses each step.
    """

    __slots__ = ("device", "code", "device_steps", "lo", "hi", "pptrs", "streams", "steps", "numels", "opts", "ids")

    def __init__(self, device: torch.device, code: int, device_steps: bool = False) -> None:
        self.device = device
        self.code = code
        self.device_steps = device_steps
        self.opts: Any = None  # the group's precision options (fusedoptim._precision.Options)
        self.ids: List[int] = []  # stochastic rounding: the params' positions in the optimizer
        self.lo = self.hi = 0  # this batch's slice of the plan's grad addresses
        self.pptrs: List[int] = []
        self.streams: List[List[int]] = []  # one address list per state key, in key order
        self.steps: List[int] = []
        self.numels: List[int] = []


def batch_of(device: torch.device, code: int, params: List[Tensor], states: List[Dict[str, Any]],
             keys: Tuple[str, ...], device_steps: bool = False, with_steps: bool = False,
             opts: Any = None, ids: Optional[List[int]] = None) -> Batch:
    from ._backend import _local  # DTensor params: their local shards

    b = Batch(device, code, device_steps)
    b.opts = opts
    b.ids = list(ids) if ids is not None else []
    b.pptrs = [_local(p).data_ptr() for p in params]
    b.numels = [_local(p).numel() for p in params]
    b.streams = [[_local(s[k]).data_ptr() for s in states] for k in keys]
    if with_steps:
        b.steps = [s["step"].data_ptr() for s in states]
    return b


def _precision_kwargs(b: Batch, clip: Any) -> Dict[str, Any]:
    """Keyword arguments of a launch for the batch's precision options."""
    o = b.opts
    if o is None or not o.active:
        return {}
    kw: Dict[str, Any] = {"state_dtype": o.state_code, "store": o.store, "clip_coef": clip_ptr(clip)}
    if o.extra_key is not None:
        kw["extras"] = b.streams[-1]
    if o.stochastic_rounding:
        kw["tensor_ids"] = b.ids
        kw["seed"] = o.seed
    return kw


def adam_call(b: Batch, gptrs: List[int], hyper: Tuple[Any, ...], grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor], clip: Any = None) -> None:
    """Adam/AdamW launches for batch ``b`` with these grads."""
    lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize = hyper
    keep: List[Tensor] = []
    lr_ptr = 0
    if isinstance(lr, Tensor):
        if b.device_steps and lr.device == b.device and lr.dtype == torch.float32 and lr.numel() == 1:
            lr_ptr = lr.data_ptr()  # read on the device: capturable, no sync
            keep.append(lr)
            lr_value = 0.0
        else:
            lr_value = float(lr.item())
    else:
        lr_value = float(lr)
    index, stream = _where(b.device)
    stats = _module().adam_step(
        b.pptrs, gptrs, b.streams[0], b.streams[1], b.streams[2] if amsgrad else None, b.steps, b.numels,
        b.code, lr_value, beta1, beta2, eps, wd, decoupled, amsgrad, maximize,
        device_steps=b.device_steps,
        lr_ptr=lr_ptr,
        grad_scale=_on(grad_scale, b.device, keep),
        found_inf=_on(found_inf, b.device, keep),
        device=index,
        stream=stream,
        param_space=_param_space,
        **_precision_kwargs(b, clip),
    )
    last_stats.append(stats)
    del keep


def sgd_call(b: Batch, gptrs: List[int], first: Optional[List[bool]], hyper: Tuple[Any, ...],
             grad_scale: Optional[Tensor], found_inf: Optional[Tensor], clip: Any = None) -> None:
    """SGD launches for batch ``b`` with these grads (``first``: buffers this step initialises)."""
    lr, momentum, dampening, wd, nesterov, maximize = hyper
    keep: List[Tensor] = []
    index, stream = _where(b.device)
    kw = _precision_kwargs(b, clip)
    if b.opts is not None and b.opts.stochastic_rounding:
        kw["steps"] = b.steps
    stats = _module().sgd_step(
        b.pptrs, gptrs, b.streams[0] if momentum != 0 else None, first if momentum != 0 else None, b.numels,
        b.code, float(lr), wd, momentum, dampening, nesterov, maximize,
        grad_scale=_on(grad_scale, b.device, keep),
        found_inf=_on(found_inf, b.device, keep),
        device=index,
        stream=stream,
        param_space=_param_space,
        **kw,
    )
    last_stats.append(stats)
    del keep


def grad_ptrs(grads: List[Tensor]) -> Tuple[List[int], List[Tuple[Tensor, Tensor]], List[Tensor]]:
    """Grad addresses for the general path: (addresses, strided copies to write back, tensors to keep alive)."""
    from ._backend import _local

    gs, copies = contiguous_grads(grads)
    return [_local(g).data_ptr() for g in gs], copies, gs
