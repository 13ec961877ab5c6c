"""Benchmark cases: lists of parameter shapes, and the tensors built from them.

A case is a named list of shapes. The harness builds the params (leaf tensors
with ``requires_grad``, each its own allocation as in an ``nn.Module``) and
their grads (random, non-zero, set once) in the dtype under test.

Built-in cases (``CASES``):

* ``1x16M`` and ``1x128M``: one tensor of 16M / 128M params.
* ``gpt2-small``: the 148 parameter tensors of GPT-2 small (124M params:
  token and position embeddings, 12 blocks of layer norms, attention and MLP,
  the final layer norm; 85M of them in the 12 blocks).
* ``2000x1024``: 2000 tensors of 1024 params (per-tensor overhead).
* ``1x2M``: the same 2M params as one tensor.

Any ``COUNTxSIZE`` spec (``"64x256K"``, ``"1x32M"``) names a case too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "Case",
    "CASES",
    "DEFAULT_CASES",
    "QUICK_CASES",
    "HUGE_NUMEL",
    "gpt2_small_shapes",
    "parse_case",
    "build_tensors",
]

Shape = Tuple[int, ...]

#: Cases at least this large skip torch's for-loop and foreach
#: implementations unless ``--full`` is given (they are ~10x slower).
HUGE_NUMEL: int = 64 * 2**20


@dataclass(frozen=True)
class Case:
    """A named list of parameter shapes."""

    name: str
    shapes: Tuple[Shape, ...]
    description: str = ""

    @property
    def numel(self) -> int:
        """Total number of params."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        """Number of param tensors."""
        return len(self.shapes)

    @property
    def huge(self) -> bool:
        """Whether the slow torch implementations are skipped by default."""
        return self.numel >= HUGE_NUMEL


def gpt2_small_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> List[Shape]:
    """The parameter shapes of GPT-2 small (``transformers`` layout, lm_head tied).

    Embeddings ``vocab x d`` and ``ctx x d``; per block: ln_1 (w, b), attention
    ``c_attn`` (``d x 3d`` weight, ``3d`` bias), ``c_proj`` (``d x d``, ``d``),
    ln_2 (w, b), MLP ``c_fc`` (``d x 4d``, ``4d``) and ``c_proj`` (``4d x d``,
    ``d``); then ln_f (w, b). 148 tensors, 124,439,808 params.
    """
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def _uniform(name: str, count: int, size: int, description: str) -> Case:
    return Case(name, tuple((size,) for _ in range(count)), description)


CASES: Dict[str, Case] = {
    c.name: c
    for c in (
        _uniform("1x16M", 1, 16 * 2**20, "one tensor of 16M params"),
        _uniform("1x128M", 1, 128 * 2**20, "one tensor of 128M params"),
        Case("gpt2-small", tuple(gpt2_small_shapes()), "GPT-2 small: 148 tensors, 124M params"),
        _uniform("2000x1024", 2000, 1024, "2000 tensors of 1024 params"),
        _uniform("1x2M", 1, 2000 * 1024, "the params of 2000x1024 as one tensor"),
    )
}

#: Every built-in case, in table order.
DEFAULT_CASES: Tuple[str, ...] = tuple(CASES)
#: The smoke run's cases.
QUICK_CASES: Tuple[str, ...] = ("2000x1024", "1x2M")

_ALIASES = {"gpt2": "gpt2-small", "transformer": "gpt2-small"}
_SPEC = re.compile(r"^(\d+)x(\d+)([kKmMgG]?)$")
_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_case(spec: str) -> Case:
    """A built-in case by name, or a ``COUNTxSIZE`` spec (SIZE may end in K, M or G).

    Raises ValueError for anything else.
    """
    spec = spec.strip()
    name = _ALIASES.get(spec.lower(), spec)
    if name in CASES:
        return CASES[name]
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(
            f"unknown case {spec!r}: use one of {', '.join(CASES)} or COUNTxSIZE such as 64x256K"
        )
    count, size = int(m.group(1)), int(m.group(2)) * _SUFFIX[m.group(3).lower()]
    if count < 1 or size < 1:
        raise ValueError(f"case {spec!r} has no params")
    return _uniform(spec, count, size, f"{count} tensor(s) of {size} params")


_BASE_NUMEL = 1 << 20


def _base_block(seed: int) -> Tensor:
    """1M random fp32 values in +-[0.05, 1.05): never zero, never denormal."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(_BASE_NUMEL, generator=g) + 0.05
    sign = torch.randint(0, 2, (_BASE_NUMEL,), generator=g).mul_(2).sub_(1)
    return mag.mul_(sign)


def _fill(ts: Sequence[Tensor], base: Tensor, scale: float) -> None:
    """Fill tensors from a random block, cheaply (memory-bound copies, no RNG per element)."""
    block = base.mul(scale)
    offset = 0
    nb = block.numel()
    for t in ts:
        flat = t.view(-1)
        n = flat.numel()
        pos = 0
        while pos < n:
            start = offset % nb
            k = min(n - pos, nb - start)
            flat[pos : pos + k].copy_(block[start : start + k])
            pos += k
            offset += k + 7919  # shift the pattern between chunks and tensors


def build_tensors(case: Case, dtype: torch.dtype, seed: int = 0) -> List[Tensor]:
    """The params of ``case`` in ``dtype``, each with a random non-zero ``.grad``.

    Params are separate leaf tensors with ``requires_grad=True``; values are
    about +-0.02 for params and +-1 for grads.
    """
    params = [torch.empty(s, dtype=dtype) for s in case.shapes]
    grads = [torch.empty(s, dtype=dtype) for s in case.shapes]
    _fill(params, _base_block(seed), 0.02)
    _fill(grads, _base_block(seed + 1), 1.0)
    for p, g in zip(params, grads):
        p.requires_grad_(True)
        p.grad = g
    return params
