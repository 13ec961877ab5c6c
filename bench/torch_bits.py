#!/usr/bin/env python
"""How many elements of fp32 params differ from torch.optim's for-loop step,
for fusedoptim and for torch's own fused=True step, in one run.

    python bench/torch_bits.py [--numel N] [--steps K]

Prints a Markdown table (10 steps of a 100,003-element param by default).
See Note [torch's rounding order] in csrc/common/update_math.h.
"""

from __future__ import annotations

import argparse

import torch

import fusedoptim

ROWS = [
    ("AdamW(weight_decay=1e-2)", "AdamW", dict(weight_decay=1e-2)),
    ("Adam()", "Adam", {}),
    ("Adam(amsgrad=True, weight_decay=1e-3)", "Adam", dict(amsgrad=True, weight_decay=1e-3)),
    ("SGD(momentum=0.9)", "SGD", dict(lr=0.01, momentum=0.9)),
    ("SGD(momentum=0.9, nesterov=True, weight_decay=5e-4)", "SGD",
     dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("SGD(momentum=0.9, dampening=0.1, weight_decay=1e-4)", "SGD",
     dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-4)),
]


def _run(cls, kw, p0, grads):
    p = torch.nn.Parameter(p0.clone())
    opt = cls([p], **kw)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def _differing(a, b) -> int:
    return sum(int((x.view(torch.int32) != y.view(torch.int32)).sum()) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=100_003, help="elements of the param (default: 100003)")
    ap.add_argument("--steps", type=int, default=10, help="steps (default: 10)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, fusedoptim {fusedoptim.__version__} ({fusedoptim.get_cpu_isa()}); "
          f"{args.steps} steps of a {args.numel:,}-element fp32 param, elements that differ from the for-loop\n")
    print("| optimizer | fusedoptim | torch fused=True | fusedoptim vs fused |\n|---|---|---|---|")
    for name, cls_name, kw in ROWS:
        gen = torch.Generator().manual_seed(0)
        p0 = torch.randn(args.numel, generator=gen)
        grads = [torch.randn(args.numel, generator=gen) for _ in range(args.steps)]
        loop = _run(getattr(torch.optim, cls_name), dict(kw, foreach=False), p0, grads)
        fused = _run(getattr(torch.optim, cls_name), dict(kw, fused=True), p0, grads)
        ours = _run(getattr(fusedoptim, cls_name), kw, p0, grads)
        print(f"| {name} | {_differing(ours, loop):,} | {_differing(fused, loop):,} | {_differing(ours, fused):,} |")


if __name__ == "__main__":
    main()
