"""What the installed torch can do, for the tests that key their expectations on it.

fusedoptim supports torch 2.2 and later and follows the installed torch:
where torch.optim lacks a keyword or a kernel, so does the drop-in (or it
says so). The suite was written against torch 2.13; the facts below are
where older versions differ. Each is found by trying the feature (a
signature, an attribute, one tiny step), not by comparing version numbers;
the torch version a fact appeared in is only named in skip reasons
(``needs(...)``). The one fact that is fusedoptim's own choice per torch
version is COMPILE_TRACES_STEP (read from fusedoptim._compile). Nothing
here changes what a test checks on a torch that has the feature.
"""

from __future__ import annotations

import inspect
import io
import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch


def _version(text: str) -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


#: The installed torch as (major, minor): for messages only.
TORCH: Tuple[int, int] = _version(torch.__version__)


def needs(what: str, version: str) -> str:
    """A skip reason: ``"<what> needs torch <version>+ (installed: <torch>)"``."""
    return f"{what} needs torch {version}+ (installed: {torch.__version__})"


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


#: ``torch.optim.Adam(decoupled_weight_decay=...)`` (torch 2.6+). Without it
#: fusedoptim.Adam raises TypeError for the keyword, as torch's Adam does,
#: and Adam's param_groups have no "decoupled_weight_decay" key.
ADAM_HAS_DECOUPLED: bool = _accepts(torch.optim.Adam, "decoupled_weight_decay")
NO_DECOUPLED = needs("Adam(decoupled_weight_decay=True)", "2.6")

#: ``torch.optim.SGD(fused=...)`` (torch 2.3+). Without it fusedoptim.SGD
#: raises TypeError for any ``fused`` but None, and SGD's groups have no "fused" key.
SGD_HAS_FUSED: bool = _accepts(torch.optim.SGD, "fused")
NO_SGD_FUSED = needs("SGD(fused=...)", "2.3")


def _takes_named_parameters() -> bool:
    try:
        torch.optim.SGD([("w", torch.zeros(1, requires_grad=True))], lr=0.1)
    except TypeError:  # "optimizer can only optimize Tensors, but one of the params is tuple"
        return False
    return True


#: torch.optim takes ``model.named_parameters()`` and keeps ``param_names``
#: in the groups (torch 2.6+; before, a TypeError).
NAMED_PARAMS: bool = _takes_named_parameters()


def _cpu_fused_step(cls: type) -> bool:
    """Whether torch's ``cls(..., fused=True)`` steps a CPU fp32 param."""
    if not _accepts(cls, "fused"):
        return False
    p = torch.zeros(3, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([p], lr=0.1, fused=True)
            p.grad = torch.ones(3)
            opt.step()
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return False
    return True


#: torch's fused CPU kernels for Adam/AdamW and SGD (torch 2.4+; before, CUDA only).
CPU_FUSED_ADAM: bool = _cpu_fused_step(torch.optim.Adam) and _cpu_fused_step(torch.optim.AdamW)
CPU_FUSED_SGD: bool = _cpu_fused_step(torch.optim.SGD)
NO_CPU_FUSED_ADAM = needs("torch's CPU fused Adam/AdamW (fused=True on CPU params)", "2.4")
NO_CPU_FUSED_SGD = needs("torch's CPU fused SGD (fused=True on CPU params)", "2.4")


def cpu_fused(kind: str) -> bool:
    """Whether torch has a CPU ``fused=True`` step for an optimizer kind ("adam", "adamw" or "sgd")."""
    return CPU_FUSED_SGD if kind == "sgd" else CPU_FUSED_ADAM


def no_cpu_fused(kind: str) -> str:
    return NO_CPU_FUSED_SGD if kind == "sgd" else NO_CPU_FUSED_ADAM


#: ``torch.library.custom_op`` (torch 2.4+; ``torch.library.opcheck`` comes
#: with it): fusedoptim registers its custom ops ``fusedoptim::adam_step_`` /
#: ``sgd_step_`` only there (fusedoptim._compile.HAVE_CUSTOM_OP).
HAVE_CUSTOM_OP: bool = hasattr(torch.library, "custom_op") and hasattr(torch.library, "opcheck")
NO_CUSTOM_OP = needs("torch.library.custom_op and opcheck (fusedoptim's custom ops)", "2.4")


def _traced_step() -> Tuple[bool, str]:
    import fusedoptim._compile as fo_compile
    from fusedoptim import _torch_compat as compat

    traced = getattr(fo_compile, "TRACE_STEP", fo_compile.HAVE_CUSTOM_OP)
    since = ".".join(map(str, getattr(compat, "TRACED_STEP_MIN", (2, 4))))
    return bool(traced), since


#: Whether fusedoptim traces a compiled ``optimizer.step()`` into the graph
#: (the native step as its custom ops, no graph break). fusedoptim's own
#: choice per torch (``fusedoptim._compile.TRACE_STEP``): it needs the custom
#: ops (2.4+) and a Dynamo that keeps optimizer state stored by traced code
#: (2.6+); before, a compiled step runs eagerly outside the graph, with one
#: RuntimeWarning (tests/test_torch_compat.py checks that).
COMPILE_TRACES_STEP, _TRACED_SINCE = _traced_step()
NO_TRACED_STEP = needs("a compiled step() traced into the graph (fusedoptim._compile.TRACE_STEP)", _TRACED_SINCE)

#: ``torch.amp.GradScaler`` (torch 2.3+; it takes "cpu"), or None.
GRAD_SCALER: Optional[type] = getattr(torch.amp, "GradScaler", None)
NO_GRAD_SCALER = needs("torch.amp.GradScaler (a GradScaler for CPU tensors)", "2.3")


def _weights_only_loads_bfloat16_dtype() -> bool:
    buf = io.BytesIO()
    torch.save({"state_dtype": torch.bfloat16, "t": torch.zeros(2, dtype=torch.bfloat16)}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception:  # pickle.UnpicklingError: "Unsupported class torch.bfloat16"
        return False
    return True


#: ``torch.load(..., weights_only=True)`` of the dtype object ``torch.bfloat16``
#: (e.g. a group's ``state_dtype``) works from torch 2.3; 2.2's weights-only
#: unpickler rejects the class (bfloat16 tensors, and the other dtypes, load).
WEIGHTS_ONLY_BF16: bool = _weights_only_loads_bfloat16_dtype()


def _sgd_stores_none_buffers() -> bool:
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, foreach=False)
    p.grad = torch.ones(2)
    opt.step()
    return bool(opt.state) and opt.state[p].get("momentum_buffer", 0) is None


#: torch 2.2's SGD stores ``state[p]["momentum_buffer"] = None`` for every
#: param with a grad when momentum is 0 (newer torch stores nothing).
#: fusedoptim's SGD stores nothing on every version (the None carries no
#: information, and checkpoints load both ways), so tests compare torch's
#: state through :func:`without_none`.
SGD_STORES_NONE_BUFFERS: bool = _sgd_stores_none_buffers()


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except Exception:  # ImportError; or no torch.distributed in this build
        return False
    return True


#: FSDP2, ``torch.distributed.fsdp.fully_shard`` (DTensor params; public in torch 2.6).
FSDP2: bool = _has_fsdp2()
NO_FSDP2 = needs("FSDP2 (torch.distributed.fsdp.fully_shard)", "2.6")


def _adam_step_dtype_under_float64_default() -> torch.dtype:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.zeros(2, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([p], lr=0.1, foreach=False)
        p.grad = torch.ones(2, dtype=torch.float32)
        opt.step()
        return opt.state[p]["step"].dtype
    finally:
        torch.set_default_dtype(saved)


#: The dtype of torch's Adam ``step`` counters (not fused, not capturable)
#: under ``torch.set_default_dtype(torch.float64)``: float64 on newer torch
#: (``torch.optim.optimizer._get_scalar_dtype``), float32 on torch 2.2.
ADAM_STEP_DTYPE_UNDER_FLOAT64_DEFAULT: torch.dtype = _adam_step_dtype_under_float64_default()


def without_none(state: Mapping[Any, Any]) -> Dict[Any, Any]:
    """A param's state, or a whole state (param -> state), without None
    entries, and without the params that had only None entries: torch 2.2's
    SGD ``momentum_buffer = None`` (see :data:`SGD_STORES_NONE_BUFFERS`).
    Everything else is kept as it is, empty entries too (a lookup in
    ``opt.state``, a defaultdict, creates one on either library)."""
    out: Dict[Any, Any] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            kept = {kk: vv for kk, vv in v.items() if vv is not None}
            if v and not kept:
                continue
            v = kept
        elif v is None:
            continue
        out[k] = v
    return out
