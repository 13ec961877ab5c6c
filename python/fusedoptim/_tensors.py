"""Leaf facts about tensors, written once for every path.

What the compiled module is told about a tensor is a dtype code and a data
address; this module is where those come from: the dtype codes, the memory
a (possibly sharded) tensor really owns, whether tensors overlap, and the
grads' addresses (a strided grad is read through a contiguous copy).
It imports nothing of the package but the compiled module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = [
    "DTYPE_CODES",
    "STEP_CODES",
    "check_cpu",
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
    if type(t).__name__ == "DTensor":
        shard = getattr(t, "_local_tensor", None)
        if isinstance(shard, Tensor):
            return shard
    return t


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
    else float32 unless the default dtype is float64."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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

    def __init__(self, grads: Sequence[Tensor]) -> None:
        self.ptrs: List[int] = []
        self.copies: List[Tuple[Tensor, Tensor]] = []  # (grad, its contiguous copy)
        for g in grads:
            shard = local(g)
            if not shard.is_contiguous():
                c = shard.contiguous()
                self.copies.append((shard, c))
                shard = c
            self.ptrs.append(shard.data_ptr())

    def write_back(self) -> None:
        for g, c in self.copies:
            g.copy_(c)


def grad_addresses(grads: Sequence[Tensor]) -> GradAddresses:
    """Addresses of ``grads`` for the kernels; see :class:`GradAddresses`."""
    return GradAddresses(grads)


def check_cpu(name: str, i: int, t: Any, dtype: torch.dtype, numel: int, contiguous: bool = True) -> None:
    """ValueError unless ``t`` is a dense CPU tensor of ``dtype`` with ``numel``
    elements (and contiguous): what a kernel reads and writes through its address."""
    if not (
        isinstance(t, Tensor)
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.dtype == dtype
        and t.numel() == numel
        and (not contiguous or t.is_contiguous())
    ):
        what = "a contiguous" if contiguous else "a strided"
        got = f"{t.dtype} {t.layout} on {t.device}, {t.numel()} elements" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}[{i}] must be {what} CPU {dtype} tensor of {numel} elements, got {got}")
