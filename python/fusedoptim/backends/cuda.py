"""The CUDA backend: which params it takes, device policy, the launches.

CUDA params of the drop-in classes go to the multi-tensor kernels (one launch
per up to ~450 tensors of one device and dtype, on torch's current stream of
that device) when this build has the CUDA backend and a GPU is usable;
otherwise torch's own implementation runs them, with one warning that says
why.

The same kernels are also compiled for the CPU (``_C.cuda_emulation``, see
Note [CUDA emulation] in csrc/cuda/emulation.h). :func:`emulate` makes the
optimizers send CPU params through this whole path (state layout, AMP
pointers, device step counters, launch packing) with those emulated
kernels, so the CUDA path is tested on machines without a GPU. The switch
is read in this module only: the rest of the package asks :func:`takes`,
:func:`on_device`, :func:`mode` and :func:`name`.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _C
from .._tensors import DTYPE_CODES, address, grad_addresses, local
from . import StepArgs, Tables

__all__ = ["available", "clip_on_device", "emulate", "emulating", "info", "launch", "last_stats", "mode", "name",
           "on_device", "takes", "warn_unavailable"]

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
        info = dict(_C.cuda_info())
        if info["compiled"] and not info["available"] and not info["driver_version"]:
            # The runtime reports a missing libcuda as an insufficient driver.
            info["reason"] = "no CUDA driver found"
        _INFO = info
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


def emulating() -> bool:
    """Whether :func:`emulate` is on."""
    return _emulate


def mode() -> bool:
    """The mode cached plans are built in (emulated or not): a plan holds to its mode."""
    return _emulate


def name() -> str:
    """This backend's name in ``optimizer.last_backends``."""
    return "native-cuda-emulated" if _emulate else "native-cuda"


def takes(p: Tensor) -> bool:
    """Whether param ``p`` is routed to the CUDA kernels (real or emulated)."""
    if _emulate:
        return p.device.type == "cpu"
    return p.device.type == "cuda" and bool(_info()["available"])


def on_device(t: Tensor) -> bool:
    """Whether ``t`` (an lr, a step counter, an inf flag) is memory the CUDA
    kernels read on the device rather than a value the host reads
    (under emulation the "device" is the CPU)."""
    return t.device.type != "cpu" or _emulate


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
        stacklevel=5,
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
    return address(t.reshape(()) if t.numel() == 1 else t, "a scalar of the step", torch.float32, 1, device)


def clip_on_device(grads: Sequence[Tensor], max_norm: float, grad_scale: Optional[Tensor]) -> Tensor:
    """max_grad_norm over grads on one GPU, with no host sync: two launches
    (per-block partial sums in float64, then a fixed-order total) write
    ``[total_norm, coefficient]`` to a float32 tensor on the device, which
    the update kernels read (``StepArgs.clip``)."""
    devices = {g.device for g in grads}
    if len(devices) != 1:
        raise RuntimeError(
            f"max_grad_norm needs every grad of the optimizer on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    addr = grad_addresses(grads)
    numels = [local(g).numel() for g in grads]
    codes = [DTYPE_CODES[g.dtype] for g in grads]
    m = _module()
    n_scratch = max(1, int(m.grad_norm_scratch(numels, codes)))
    scratch = torch.empty(n_scratch, dtype=torch.float64, device=device)
    out = torch.empty(2, dtype=torch.float32, device=device)
    keep: List[Tensor] = []
    index, stream = _where(device)
    stats = m.grad_norm(
        addr.ptrs, numels, codes, scratch.data_ptr(), n_scratch, out.data_ptr(), float(max_norm),
        grad_scale=_on(grad_scale, device, keep), device=index, stream=stream, param_space=_param_space,
    )
    last_stats.append(stats)
    del keep, scratch, addr  # the caching allocator reuses the blocks only after the stream's work
    return out


def _options(t: Tables, clip: Any) -> Dict[str, Any]:
    """Keyword arguments of a launch for the call's precision options."""
    o = t.opts
    if o is None or not o.active:
        return {}
    kw: Dict[str, Any] = {"state_dtype": o.state_code, "store": o.store,
                          "clip_coef": clip.data_ptr() + 4 if isinstance(clip, Tensor) else 0}
    if o.extra_key is not None:
        kw["extras"] = t.streams[o.extra_key]
    if o.stochastic_rounding:
        kw["tensor_ids"] = t.ids
        kw["seed"] = o.seed
    if t.quant:  # Note [8-bit states]: codes in place of the moments, plus their scales
        kw["state_dtype"] = _C.DTYPE_QUANT8
        kw["block_size"] = o.block
    return kw


def _moments(t: Tables) -> Tuple[str, str, str]:
    """The state keys a launch passes as exp_avg, exp_avg_sq and momentum_buffer."""
    if t.quant:
        return "exp_avg_codes", "exp_avg_sq_codes", "momentum_buffer_codes"
    return "exp_avg", "exp_avg_sq", "momentum_buffer"


def _adam(t: Tables, gptrs: List[int], h: Any, args: StepArgs, found_inf: Optional[Tensor], keep: List[Tensor]) -> Any:
    lr, lr_ptr = h.lr, 0
    if isinstance(lr, Tensor):
        if t.device_steps and lr.device == t.device and lr.dtype == torch.float32 and lr.numel() == 1:
            lr_ptr, lr = address(lr.reshape(()), "lr", torch.float32, 1, t.device), 0.0  # read on the device: no sync
            keep.append(h.lr)
        else:
            lr = lr.item()
    index, stream = _where(t.device)  # type: ignore[arg-type]
    s = t.streams
    kw = _options(t, args.clip)
    if t.step_code != _C.DTYPE_FLOAT32:
        kw["step_dtype"] = t.step_code  # torch's float64 host counters
    m, v, _ = _moments(t)
    if t.quant:
        kw["exp_avg_scales"] = s["exp_avg_scale"]
        kw["exp_avg_sq_scales"] = s["exp_avg_sq_scale"]
    return _module().adam_step(
        t.pptrs, gptrs, s[m], s[v], s["max_exp_avg_sq"] if h.amsgrad else None, t.steps,
        t.numels, t.code, float(lr), h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.amsgrad, h.maximize,
        device_steps=t.device_steps, lr_ptr=lr_ptr, grad_scale=_on(args.grad_scale, t.device, keep),
        found_inf=_on(found_inf, t.device, keep), device=index, stream=stream, param_space=_param_space, **kw,
    )


def _sgd(t: Tables, gptrs: List[int], h: Any, args: StepArgs, found_inf: Optional[Tensor], keep: List[Tensor]) -> Any:
    index, stream = _where(t.device)  # type: ignore[arg-type]
    kw = _options(t, args.clip)
    if t.opts is not None and t.opts.stochastic_rounding:
        kw["steps"] = t.steps
    momentum = h.momentum != 0
    b = _moments(t)[2]
    if t.quant and momentum:
        kw["momentum_scales"] = t.streams["momentum_buffer_scale"]
    return _module().sgd_step(
        t.pptrs, gptrs, t.streams[b] if momentum else None, t.first if momentum else None,
        t.numels, t.code, float(h.lr), h.weight_decay, h.momentum, h.dampening, h.nesterov, h.maximize,
        grad_scale=_on(args.grad_scale, t.device, keep), found_inf=_on(found_inf, t.device, keep),
        device=index, stream=stream, param_space=_param_space, **kw,
    )


_LAUNCHERS = {"adam": _adam, "sgd": _sgd}


def launch(kernel: str, t: Tables, gptrs: List[int], hyper: Any, args: StepArgs) -> None:
    """The launches of one call of ``kernel`` ("adam" or "sgd") for tables ``t``.

    Host step counters must not count a skipped step: with an inf flag on
    the device and counters on the host, the flag is read first (one sync).
    """
    found_inf = args.found_inf
    if found_inf is not None and t.steps and not t.device_steps:
        if bool(found_inf.item()):
            return
        found_inf = None
    keep: List[Tensor] = []
    last_stats.append(_LAUNCHERS[kernel](t, gptrs, hyper, args, found_inf, keep))
    del keep
