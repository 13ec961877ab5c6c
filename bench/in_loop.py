#!/usr/bin/env python
"""The optimizer step inside a training loop, against torch's fused step.

    python bench/in_loop.py [adamw|sgd] [THREADS] [--iters N] [--dtype fp32|bf16]

A 3 x Linear(2048, 2048) MLP (12.6M params, batch 64): each iteration is
zero_grad, forward, backward and step, so every step follows torch's own
parallel work as in training. fusedoptim and torch fused=True alternate
(A B A B) in one process; prints the median step and iteration times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedoptim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", nargs="?", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("threads", nargs="?", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per optimizer (default: 40)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="the model's params and activations (default: fp32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                   torch.nn.ReLU(), torch.nn.Linear(2048, 2048))

    def optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
        extra = {} if name == "fusedoptim" else {"fused": True}
        if args.kind == "adamw":
            cls = fusedoptim.AdamW if name == "fusedoptim" else torch.optim.AdamW
            return cls(model.parameters(), lr=1e-4, **extra)
        cls = fusedoptim.SGD if name == "fusedoptim" else torch.optim.SGD
        return cls(model.parameters(), lr=1e-3, momentum=0.9, **extra)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(64, 2048, dtype=dtype)
    names = ("fusedoptim", "torch fused")
    models = {n: mlp().to(dtype) for n in names}
    opts = {n: optimizer(n, models[n]) for n in names}
    step_s = {n: [] for n in names}
    iter_s = {n: [] for n in names}
    for k in range(args.iters + 5):
        for n in names if k % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            opts[n].zero_grad()
            models[n](x).square().mean().backward()
            t1 = time.perf_counter()
            opts[n].step()
            t2 = time.perf_counter()
            if k >= 5:  # warm-up
                step_s[n].append(t2 - t1)
                iter_s[n].append(t2 - t0)
    med = {n: (statistics.median(step_s[n]) * 1e3, statistics.median(iter_s[n]) * 1e3) for n in names}
    print(f"{args.kind} {args.dtype}, {args.threads} thread(s), fusedoptim {fusedoptim.__version__} ({fusedoptim.get_cpu_isa()}), "
          f"torch {torch.__version__}, medians of {args.iters} interleaved iterations")
    for n in names:
        print(f"  {n:12s} step {med[n][0]:7.2f} ms   iteration {med[n][1]:7.2f} ms")
    print(f"  torch fused step / fusedoptim step: {med['torch fused'][0] / med['fusedoptim'][0]:.2f}")


if __name__ == "__main__":
    main()
