"""The native backends: the only modules that call the compiled kernels.

- :mod:`.cpu`: the CPU kernels (one call per param group and dtype, or one
  cached :class:`fusedoptim._C.StepPlan` per group) and the grad norm.
- :mod:`.cuda`: the CUDA kernels (multi-tensor launches on torch's current
  stream), the device grad norm, and the CUDA emulation used by tests on
  machines without a GPU.

Both take the same :class:`Tables` (addresses of one call) and
:class:`StepArgs` (what one step hands every call).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["StepArgs", "Tables"]


class Tables:
    """Addresses of one native call: the params of one device and dtype (and,
    for the CUDA kernels, one step-counter location), with their state.

    ``streams`` holds one address list per state key, keyed by the key, in
    the order of the optimizer's spec (see :mod:`fusedoptim._spec`).
    """

    __slots__ = ("code", "step_code", "device", "device_steps", "index", "params", "numels", "pptrs", "streams",
                 "steps", "first", "ids", "opts", "lo", "hi", "quant")

    def __init__(self, code: int, opts: Any, device: Optional[torch.device] = None, device_steps: bool = False,
                 step_code: int = 0) -> None:
        self.code = code
        self.step_code = step_code  # dtype code of the step counters (float32, or float64 on the host)
        self.opts = opts  # the group's precision options (fusedoptim._precision.Options)
        self.device = device
        self.device_steps = device_steps  # step counters on the device (CUDA, capturable or fused)
        self.index: List[int] = []  # positions in the group's params-with-grad list
        self.params: List[Tensor] = []
        self.numels: List[int] = []
        self.pptrs: List[int] = []
        self.streams: Dict[str, List[int]] = {}
        self.steps: List[int] = []  # float32 step counters
        self.first: List[bool] = []  # SGD: buffers this call initialises from the grad
        self.ids: List[int] = []  # stochastic rounding: the params' positions in the optimizer
        self.lo = self.hi = 0  # this call's slice of a cached plan's grad addresses
        self.quant = False  # 8-bit states: streams are <moment>_codes and <moment>_scale


class StepArgs:
    """What one ``step()`` hands every backend call, as arguments rather than
    through the optimizer: threads, AMP's scale and (device) inf flag, and the
    clip coefficient of ``max_grad_norm`` (a float for the CPU kernels, a
    device tensor ``[norm, coef]`` for the CUDA kernels, or None)."""

    __slots__ = ("threads", "grad_scale", "found_inf", "clip")

    def __init__(self, threads: int, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                 clip: Any = None) -> None:
        self.threads = threads
        self.grad_scale = grad_scale
        self.found_inf = found_inf  # only when read on the device (else the step checked it)
        self.clip = clip
