"""Leaf facts about tensors, written once for every path.

What the compiled module is told about a tensor is a dtype code and a data
address; this module is where those come from: the dtype codes, the memory
a (possibly sharded) tensor really owns, whether tensors overlap, and the
grads' addresses (a strided grad is read through a contiguous copy).
It imports nothing of the package but the compiled module and the torch
compatibility layer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C
from ._torch_compat import STEP_FOLLOWS_DEFAULT_DTYPE, local_shard

__all__ = [
    "DTYPE_CODES",
    "STEP_CODES",
    "address",
    "GradAddresses",
    "disjoint",
    "grad_addresses",
    "grads_of",
    "local",
    "plain",
    "same_sharding",
    "step_dtype",
]

#: torch dtype -> dtype code of the compiled module: the dtypes the kernels take.
DTYPE_CODES: Dict[torch.dtype, int] = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.float16: _C.DTYPE_FLOAT16,
}

_TENSOR_DISPATCH = torch.Tensor.__torch_dispatch__


def plain(t: Tensor) -> bool:
    """A tensor whose storage is its own memory: not a wrapper subclass such
    as FSDP2's DTensor (whose data lives in a local shard), a fake or a
    functional tensor. Only these have a data pointer the kernels can use."""
    return type(t).__torch_dispatch__ is _TENSOR_DISPATCH and (t.numel() == 0 or t.data_ptr() != 0)


def local(t: Tensor) -> Tensor:
    """The memory the kernels update: a DTensor's local shard (FSDP2 and
    other sharded params, whose optimizer state is sharded alike), else the
    tensor itself. The update is element-wise, so a shard updates like a
    whole tensor."""
    shard = local_shard(t)
    return shard if shard is not None else t


def same_sharding(p: Tensor, g: Tensor) -> bool:
    """A DTensor param and its grad must be laid out alike for their shards to match."""
    if p is local(p) and g is local(g):
        return True
    if p is local(p) or g is local(g):
        return False
    try:
        return (p.placements == g.placements and p.device_mesh == g.device_mesh  # type: ignore[attr-defined]
                and local(p).shape == local(g).shape)
    except Exception:
        return False


def disjoint(tensors: Sequence[Tensor]) -> bool:
    """Whether no two of the tensors share a byte (each is contiguous)."""
    spans = []
    for t in tensors:
        t = local(t)
        n = t.numel() * t.element_size()
        if n:
            start = t.data_ptr()
            spans.append((start, start + n))
    spans.sort()
    return all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1))


def grads_of(params: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """The params that have a grad, and their grads."""
    ps, gs = [], []
    for p in params:
        g = p.grad
        if g is not None:
            ps.append(p)
            gs.append(g)
    return ps, gs


#: dtype of a step counter -> its code for the compiled module.
STEP_CODES: Dict[torch.dtype, int] = {torch.float32: _C.DTYPE_FLOAT32, torch.float64: _C.DTYPE_FLOAT64}


def step_dtype(fused: bool = False) -> torch.dtype:
    """The dtype torch.optim keeps ``step`` in: float32 with ``fused=True``,
    else float32 unless the default dtype is float64 (from torch 2.3; before,
    always float32)."""
    if fused or not STEP_FOLLOWS_DEFAULT_DTYPE:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# Note [addresses]
# The compiled module is told where tensors live and how many elements of
# which dtype it may read and write there; it cannot check that itself. So
# no data address goes to a kernel except through `address` (params, state
# tensors, step counters) or `GradAddresses` (grads), which check the tensor
# against exactly what the kernel will touch: a plain (not fake, meta or
# wrapper) dense tensor, contiguous, of that dtype, element count and
# device. They are called while a step fills its tables, before any kernel
# runs, so a tensor that does not fit (state created wrong, a state tensor
# resized or re-pointed in place, a grad that changed) is a ValueError with
# nothing written. The cached C plans (csrc/bindings/step_plan.cpp) hold
# addresses checked here once, and from then on re-check each step that
# every tensor still has the address and size it had.


def _describe(t: Any) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    kind = "" if type(t) in (Tensor, torch.nn.Parameter) else f"{type(t).__name__} "
    contiguous = "contiguous" if t.layout == torch.strided and t.is_contiguous() else "non-contiguous"
    return f"a {contiguous} {kind}{t.dtype} {t.layout} tensor of {t.numel()} elements on {t.device}"


def address(t: Any, what: str, dtype: torch.dtype, numel: int, device: Any) -> int:
    """The data address of ``t`` for a kernel that reads and writes ``numel``
    contiguous elements of ``dtype`` there, on ``device``; ValueError naming
    ``what`` unless that is exactly what ``t`` holds (Note [addresses]).
    A DTensor stands for its local shard."""
    s = local(t) if isinstance(t, Tensor) else t
    if not (
        isinstance(s, Tensor)
        and s.layout == torch.strided
        and s.dtype == dtype
        and s.numel() == numel
        and s.device == torch.device(device)
        and s.is_contiguous()
        and plain(s)
    ):
        raise ValueError(f"{what} must be a contiguous {dtype} tensor of {numel} elements on {device} "
                         f"(what the kernel reads and writes), got {_describe(s)}")
    return s.data_ptr()


class GradAddresses:
    """The addresses the kernels read grads from.

    A grad whose strides differ from its (contiguous) param is read through a
    contiguous copy; the grad itself is never written, except by
    :meth:`write_back` (AMP: the kernels unscale the copy, and the unscaled
    values are copied into the grad on the same stream, as torch's fused
    step leaves unscaled grads behind). Keep the object alive until the
    kernels have run: it owns the copies.
    """

    __slots__ = ("ptrs", "copies")

    def __init__(self, grads: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None) -> None:
        self.ptrs: List[int] = []
        self.copies: List[Tuple[Tensor, Tensor]] = []  # (grad, its contiguous copy)
        for i, g in enumerate(grads):
            shard = local(g)
            # What the kernel reads: the param's element count and dtype on its
            # device (or, for a grad norm, the grad's own, in a dtype it takes).
            ref = local(params[i]) if params is not None else shard
            if not (isinstance(shard, Tensor) and shard.layout == torch.strided and plain(shard)
                    and isinstance(ref, Tensor) and ref.dtype in DTYPE_CODES):
                raise ValueError(f"grad {i} must be a dense tensor of {list(DTYPE_CODES)}, got {_describe(shard)}")
            if shard.shape != ref.shape:  # a strided grad's copy pairs elements by position in the shape
                raise ValueError(f"grad {i} has shape {tuple(shard.shape)} but its param has {tuple(ref.shape)}")
            if not shard.is_contiguous():
                c = shard.contiguous()
                self.copies.append((shard, c))
                shard = c
            self.ptrs.append(address(shard, f"grad {i}", ref.dtype, ref.numel(), ref.device))

    def write_back(self) -> None:
        for g, c in self.copies:
            g.copy_(c)


def grad_addresses(grads: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None) -> GradAddresses:
    """Addresses of ``grads`` for the kernels, each checked against its param
    (same element count, dtype and device) when ``params`` is given; see
    :class:`GradAddresses` and Note [addresses]."""
    return GradAddresses(grads, params)
