"""Process-wide settings: CPU threads, the CPU variant, and what the build is."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

from . import _C
from .backends import cuda

__all__ = ["backend_info", "get_cpu_isa", "get_num_threads", "set_cpu_isa", "set_num_threads", "threads_of"]

_num_threads: Optional[int] = None
#: The CPU variants' names (FUSEDOPTIM_CPU_ISA and set_cpu_isa take them in any case).
ISA_NAMES = ("scalar", "avx2", "avx512")


def set_num_threads(num_threads: Optional[int]) -> None:
    """Set the number of threads of the CPU kernels (all optimizers).

    ``None`` (the default) follows :func:`torch.get_num_threads` at every step.
    An optimizer's own ``num_threads`` attribute, when set, takes precedence.
    """
    global _num_threads
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    _num_threads = num_threads


def get_num_threads() -> int:
    """Threads the CPU kernels use when an optimizer sets none of its own."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def threads_of(own: Optional[int]) -> int:
    """An optimizer's threads: its own ``num_threads`` when set, else the process's."""
    return own if own is not None else get_num_threads()


def set_cpu_isa(name: str) -> None:
    """Force a CPU variant: ``"scalar"``, ``"avx2"`` or ``"avx512"`` (any case).

    Raises ValueError for an unknown name and RuntimeError for a variant this
    build or this CPU cannot run. The environment variable
    ``FUSEDOPTIM_CPU_ISA`` does the same at import time.
    """
    _C.set_cpu_isa(name)


def get_cpu_isa() -> str:
    """The CPU variant in use (``"scalar"``, ``"avx2"`` or ``"avx512"``)."""
    return _C.get_cpu_isa()


def backend_info() -> Dict[str, Any]:
    """What was compiled, the CPU features found and the variant in use.

    Keys: ``version``, ``compiled_isas``, ``supported_isas``, ``isa``,
    ``vector_width``, ``cpu_features``, ``isa_request`` (the value of
    ``FUSEDOPTIM_CPU_ISA``, or None) and ``isa_request_honored``,
    ``num_threads``, ``threading``, ``compiler``, ``cuda_compiled``,
    ``cuda_available`` with ``cuda_reason``, ``cuda`` (the CUDA backend's
    facts: compiled, available, reason, archs, versions) and
    ``torch_version``.
    """
    info = dict(_C.backend_info())
    request = os.environ.get("FUSEDOPTIM_CPU_ISA") or None
    info["isa_request"] = request
    info["isa_request_honored"] = request is None or request.lower() == info["isa"]
    info["num_threads"] = get_num_threads()
    facts = cuda.info()
    info["cuda_available"] = bool(facts["available"])
    info["cuda_reason"] = facts["reason"] or None
    info["cuda"] = facts
    info["torch_version"] = torch.__version__
    return info


def warn_ignored_isa_request() -> None:
    """Warn when ``FUSEDOPTIM_CPU_ISA`` names a variant that is not in use."""
    request = os.environ.get("FUSEDOPTIM_CPU_ISA")
    active = _C.get_cpu_isa()
    if request and request.lower() != active:
        if request.lower() not in ISA_NAMES:
            why = f"is not a CPU variant: the names are {', '.join(ISA_NAMES)} (any case)"
        else:
            why = f"cannot be used here (supported: {', '.join(_C.backend_info()['supported_isas'])})"
        warnings.warn(f"FUSEDOPTIM_CPU_ISA={request!r} {why}; using {active!r}", RuntimeWarning, stacklevel=3)
