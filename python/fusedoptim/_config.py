"""Process-wide settings: CPU threads, the CPU variant, and what the build is."""

from __future__ import annotations

import os
import textwrap
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _C
from . import _torch_compat as compat
from .backends import cuda

__all__ = [
    "BackendInfo",
    "backend_info",
    "get_cpu_isa",
    "get_num_threads",
    "get_q8_passes",
    "get_threads_backend",
    "set_cpu_isa",
    "set_num_threads",
    "set_q8_passes",
    "set_threads_backend",
    "threads_of",
]

_num_threads: Optional[int] = None
#: The CPU variants' names (FUSEDOPTIM_CPU_ISA and set_cpu_isa take them in any case).
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512bf16")
#: Where the CPU kernels' threads come from (FUSEDOPTIM_THREADS and set_threads_backend).
THREADS_BACKENDS = ("auto", "openmp", "pool")
#: Arrangements of the passes over a block of 8-bit Adam states (FUSEDOPTIM_Q8_PASSES and set_q8_passes).
Q8_PASSES = ("auto", "overlap", "separate")


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
    """Force a CPU variant: ``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"avx512bf16"`` (any case).

    Raises ValueError for an unknown name and RuntimeError for a variant this
    build or this CPU cannot run. The environment variable
    ``FUSEDOPTIM_CPU_ISA`` does the same at import time.
    """
    _C.set_cpu_isa(name)


def get_cpu_isa() -> str:
    """The CPU variant in use (``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"avx512bf16"``)."""
    return _C.get_cpu_isa()


def set_q8_passes(name: str) -> None:
    """Choose how the CPU kernels arrange their passes over a block of 8-bit Adam states.

    Args:
        name: ``"overlap"``: one pass decodes the codes, updates and writes
            the previous block's codes; ``"separate"``: a decode pass, the
            update, then an encode pass. ``"auto"`` (the default): separate
            for the AVX2 variant on AMD CPUs (faster on Zen 3), overlap for
            every other vector variant (faster on Intel, with AVX2 and
            AVX-512 lanes). The scalar variant always runs separate passes.
            The environment variable ``FUSEDOPTIM_Q8_PASSES`` sets it at import.

    Raises:
        ValueError: for another name.

    A tuning choice only: the codes, scales and params are bit-identical
    either way.
    """
    if name not in Q8_PASSES:
        raise ValueError(f"unknown 8-bit passes {name!r}: the names are {', '.join(Q8_PASSES)}")
    _C.set_q8_passes(name)


def get_q8_passes() -> str:
    """The arrangement the CPU variant in use runs: ``"overlap"`` or ``"separate"``."""
    return _C.q8_passes().split(" ", 1)[0]


#: Keys this dict had before the CUDA facts lived under ``cuda`` alone: old key -> key of ``cuda``.
_MOVED_TO_CUDA = {"cuda_compiled": "compiled", "cuda_available": "available", "cuda_reason": "reason"}


class BackendInfo(Dict[str, Any]):
    """The dict :func:`backend_info` returns; ``str()`` (and ``python -m
    fusedoptim``) lays it out one fact a line."""

    def __missing__(self, key: str) -> Any:
        if key in _MOVED_TO_CUDA and "cuda" in self:
            new = _MOVED_TO_CUDA[key]
            warnings.warn(f"backend_info()[{key!r}] is backend_info()['cuda'][{new!r}]", DeprecationWarning,
                          stacklevel=2)
            value = self["cuda"][new]
            return (value or None) if new == "reason" else value
        raise KeyError(key)

    def __str__(self) -> str:
        feats = self.get("cpu_features", {})
        request = self.get("isa_request")
        if request is None:
            chosen = "the best this CPU supports; FUSEDOPTIM_CPU_ISA not set"
        elif self.get("isa_request_honored"):
            chosen = f"FUSEDOPTIM_CPU_ISA={request}"
        else:
            chosen = f"FUSEDOPTIM_CPU_ISA={request} could not be honoured"
        workers = self.get("thread_pool_size")
        pool = f"; started: {workers} worker(s) + the calling thread" if workers else ""
        rows = [
            ("fusedoptim", f"{self.get('version')} (torch {self.get('torch_version')}; "
                           f"supported: torch{self.get('torch_supported')})"),
            ("torch.compile", str(self.get("torch_compile"))),
            ("CPU variant", f"{self.get('isa')}, {self.get('vector_width')} float lanes ({chosen})"),
            ("variants here", ", ".join(self.get("supported_isas", []))),
            ("variants built", ", ".join(self.get("compiled_isas", []))),
            ("CPU features", " ".join(k for k, v in feats.items() if v) or "none"),
            ("threads", f"{self.get('num_threads')} per step ({self.get('num_threads_from')})"),
            ("threading", f"{_threading_row(str(self.get('threading')))}{pool}"),
            ("8-bit passes", f"{self.get('q8_passes')} (Adam with state_bits=8 on the CPU)"),
            ("compiler", str(self.get("compiler"))),
        ]
        rows += _cuda_rows(self.get("cuda") or {})
        width = max(len(k) for k, _ in rows)
        indent = " " * (width + 2)
        return "\n".join(f"{k:<{width}}  " + f"\n{indent}".join(
            textwrap.wrap(v, 100 - len(indent), break_on_hyphens=False) or [""]) for k, v in rows)


def _threading_row(value: str) -> str:
    """``threading`` as printed: the OpenMP runtime by its file name (the dict has its path)."""
    if value.startswith("openmp (") and value.endswith(")"):
        return f"openmp: torch's OpenMP team ({os.path.basename(value[len('openmp ('):-1])})"
    if value == "pool":
        return "pool: fusedoptim's own threads"
    return value


def _cuda_rows(c: Dict[str, Any]) -> List[Tuple[str, str]]:
    if not c.get("compiled"):
        return [("CUDA", f"no: {c.get('reason')}")]
    archs = ", ".join(f"sm_{a}" for a in c.get("archs", [])) or "none"
    state = "available" if c.get("available") else f"not available: {c.get('reason')}"
    driver = c.get("driver_version") or "none"
    rows = [("CUDA", f"{state} ({c.get('device_count', 0)} device(s))"),
            ("CUDA archs", archs),
            ("CUDA versions", f"runtime {c.get('runtime_version')}, driver {driver}")]
    if c.get("emulating"):
        rows.append(("CUDA emulation", "on (CPU params run the CUDA path)"))
    return rows


def backend_info() -> BackendInfo:
    """What was compiled, what this machine offers and what is in use.

    A dict (``print()`` it, or run ``python -m fusedoptim``, for one fact a
    line) with the keys:

    - ``version``: fusedoptim's version; ``torch_version``: torch's;
      ``torch_supported``: the torch versions this package supports
      (``">=2.2"``, as ``pyproject.toml`` says); ``torch_compile``: how a
      compiled ``step()`` runs on this torch (traced from 2.6, else
      eagerly outside the graph; see ``_torch_compat.TRACE_STEP``).
    - ``compiled_isas``: the CPU variants in this build; ``supported_isas``:
      those this CPU and OS can run; ``isa``: the one in use;
      ``vector_width``: its float lanes.
    - ``cpu_features``: the CPU features found (CPUID, and XGETBV for what
      the OS enables), name -> bool.
    - ``isa_request``: the value of ``FUSEDOPTIM_CPU_ISA``, or None;
      ``isa_request_honored``: whether the variant in use is the one asked for.
    - ``num_threads``: the threads a step uses unless an optimizer sets its
      own; ``num_threads_from``: where that number comes from
      (:func:`torch.get_num_threads` or :func:`set_num_threads`).
    - ``threading``: what runs the threads: ``"openmp (<runtime file>)"``
      (torch's own OpenMP team) or ``"pool"`` (see
      :func:`set_threads_backend`); ``thread_pool_size``: worker
      threads fusedoptim's pool has started besides the calling thread,
      present only once the pool has started (the first step on more than
      one thread starts it).
    - ``q8_passes``: how the CPU kernels arrange the passes over a block of
      8-bit Adam states, ``"overlap"`` or ``"separate"``, with ``" (auto)"``
      unless forced (see :func:`set_q8_passes`).
    - ``compiler``: the C++ compiler of this build.
    - ``cuda``: the CUDA backend: ``compiled``, ``available`` and, if not,
      ``reason``; ``device_count``, ``driver_version`` (0: no driver),
      ``runtime_version``, ``archs`` (SM versions with SASS; the highest
      also as PTX), ``large_param_space`` (32 KB kernel parameters) and
      ``emulating``.
    """
    info = BackendInfo(_C.backend_info())
    info.pop("cuda_compiled", None)
    if not info.get("thread_pool_size"):
        info.pop("thread_pool_size", None)
    request = os.environ.get("FUSEDOPTIM_CPU_ISA") or None
    info["isa_request"] = request
    info["isa_request_honored"] = request is None or request.lower() == info["isa"]
    info["num_threads"] = get_num_threads()
    info["num_threads_from"] = "torch.get_num_threads()" if _num_threads is None else "fusedoptim.set_num_threads"
    info["cuda"] = cuda.info()
    info["torch_version"] = torch.__version__
    info["torch_supported"] = compat.supported_range()
    info["torch_compile"] = ("traced (the native step as custom ops in the graph)" if compat.TRACE_STEP else
                             f"eager (a traced step needs torch {'.'.join(map(str, compat.TRACED_STEP_MIN))}+)")
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
    passes = os.environ.get("FUSEDOPTIM_Q8_PASSES")
    if passes and passes.lower() not in Q8_PASSES:
        warnings.warn(f"FUSEDOPTIM_Q8_PASSES={passes!r} is not an arrangement of 8-bit passes: the names are "
                      f"{', '.join(Q8_PASSES)}; using {get_q8_passes()!r}", RuntimeWarning, stacklevel=3)
    request = os.environ.get("FUSEDOPTIM_CPU_ISA")
    active = _C.get_cpu_isa()
    if request and request.lower() != active:
        if request.lower() not in ISA_NAMES:
            why = f"is not a CPU variant: the names are {', '.join(ISA_NAMES)} (any case)"
        else:
            why = f"cannot be used here (supported: {', '.join(_C.backend_info()['supported_isas'])})"
        warnings.warn(f"FUSEDOPTIM_CPU_ISA={request!r} {why}; using {active!r}", RuntimeWarning, stacklevel=3)
