"""Process-wide settings: CPU threads, the CPU variant, and what the build is."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

from . import _C
from .backends import cuda

__all__ = [
    "backend_info",
    "get_cpu_isa",
    "get_num_threads",
    "get_threads_backend",
    "set_cpu_isa",
    "set_num_threads",
    "set_threads_backend",
    "threads_of",
]

_num_threads: Optional[int] = None
#: The CPU variants' names (FUSEDOPTIM_CPU_ISA and set_cpu_isa take them in any case).
ISA_NAMES = ("scalar", "avx2", "avx512")
#: Where the CPU kernels' threads come from (FUSEDOPTIM_THREADS and set_threads_backend).
THREADS_BACKENDS = ("auto", "openmp", "pool")


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


def set_threads_backend(name: str) -> None:
    """Choose the threads the CPU kernels run on (all optimizers).

    Args:
        name: ``"openmp"``: torch's own OpenMP team, the runtime torch loaded,
            found in the process at run time (never linked); its workers are
            often still spinning from torch's last parallel op, so the step
            starts at once and competes with no other threads.
            ``"pool"``: fusedoptim's own threads. ``"auto"`` (the default):
            ``"openmp"`` where an OpenMP runtime is loaded, else ``"pool"``.
            The environment variable ``FUSEDOPTIM_THREADS`` sets it at import.

    Raises:
        ValueError: for another name.
        RuntimeError: for ``"openmp"`` where no OpenMP runtime is loaded
            (a torch built without OpenMP).

    Results are bit-identical whichever threads run the step.
    """
    if name not in THREADS_BACKENDS:
        raise ValueError(f"unknown threads backend {name!r}: the names are {', '.join(THREADS_BACKENDS)}")
    _C.set_threads_backend(name)


def get_threads_backend() -> str:
    """The threads the CPU kernels run on: ``"openmp"`` or ``"pool"``.

    ``backend_info()["threading"]`` also names the OpenMP runtime's file.
    """
    return _C.threads_backend().split(" ", 1)[0]


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
    ``num_threads``, ``threading`` (``"openmp (<runtime file>)"`` or
    ``"pool"``: see :func:`set_threads_backend`), ``compiler``, ``cuda_compiled``,
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


def warn_ignored_requests() -> None:
    """Warn when ``FUSEDOPTIM_CPU_ISA`` names a variant that is not in use, or
    ``FUSEDOPTIM_THREADS`` a threads backend that does not exist."""
    threads = os.environ.get("FUSEDOPTIM_THREADS")
    if threads and threads not in THREADS_BACKENDS:
        warnings.warn(f"FUSEDOPTIM_THREADS={threads!r} is not a threads backend: the names are "
                      f"{', '.join(THREADS_BACKENDS)}; using {get_threads_backend()!r}", RuntimeWarning, stacklevel=3)
    elif threads == "openmp" and get_threads_backend() != "openmp":
        warnings.warn("FUSEDOPTIM_THREADS='openmp', but no OpenMP runtime is loaded in this process (torch was "
                      "built without OpenMP); using fusedoptim's own threads", RuntimeWarning, stacklevel=3)
    request = os.environ.get("FUSEDOPTIM_CPU_ISA")
    active = _C.get_cpu_isa()
    if request and request.lower() != active:
        if request.lower() not in ISA_NAMES:
            why = f"is not a CPU variant: the names are {', '.join(ISA_NAMES)} (any case)"
        else:
            why = f"cannot be used here (supported: {', '.join(_C.backend_info()['supported_isas'])})"
        warnings.warn(f"FUSEDOPTIM_CPU_ISA={request!r} {why}; using {active!r}", RuntimeWarning, stacklevel=3)
