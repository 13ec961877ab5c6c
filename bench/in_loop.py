#!/usr/bin/env python
"""The optimizer step inside a training loop, against torch's fused step.

    python bench/in_loop.py [adamw|sgd] [THREADS] [--model mlp|gpt2-small] [--iters N] [--rounds R]
                            [--dtype fp32|bf16] [--seq T]

Two models, each iteration zero_grad, forward, backward and step, so every
step follows torch's own parallel work as in training:

* ``mlp`` (default): a 3 x Linear(2048, 2048) MLP, 12.6M params, a batch of 64;
* ``gpt2-small``: GPT-2 small's 148 tensors (124M params: 12 blocks of
  width 768, 12 heads, a 50257-token embedding tied to the output layer),
  a causal language-model loss on one sequence of ``--seq`` random tokens
  (default 64: the step, 124M params, weighs as much in the iteration as in
  training with a larger batch spread over more cores).

fusedoptim and torch fused=True alternate (A B A B) in one process, each on
its own copy of the same model.

Where a model's tensors land in memory changes the speed of its forward and
backward by up to a quarter on some machines, whichever optimizer steps it
(the two copies' params stay bit-identical under AdamW). So the run is in
rounds: each round makes two fresh copies of one model and gives the first
to fusedoptim in even rounds and to torch in odd ones. Prints the median
step, forward + backward and iteration times over all rounds, and each
round's iteration medians (after WARMUP untimed iterations per round).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import fusedoptim

NAMES = ("fusedoptim", "torch fused")
# Untimed iterations per round: the first few zero_grad/backward pairs of a
# new model free and map its grads afresh (glibc's malloc raises its mmap
# threshold only as large blocks come back), which slows backward by a
# quarter for a handful of iterations, on one side or the other.
WARMUP = 10


class Block(nn.Module):
    """A GPT-2 block: pre-norm causal self-attention and a 4x GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 small's shapes: 148 tensors, 124,439,808 params."""

    def __init__(self, vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12, heads: int = 12) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for m in self.modules():  # GPT-2's initialization
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # the output layer tied to the embedding
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", nargs="?", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("threads", nargs="?", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", choices=("mlp", "gpt2-small"), default="mlp",
                    help="mlp: 3 x Linear(2048, 2048); gpt2-small: GPT-2 small, 124M params (default: mlp)")
    ap.add_argument("--seq", type=int, default=64, help="gpt2-small: tokens per iteration (default: 64)")
    ap.add_argument("--warmup", type=int, default=WARMUP,
                    help=f"untimed iterations per optimizer and round (default: {WARMUP})")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per optimizer and round (default: 20)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds with fresh model copies, the pairing swapped each round (default: 4)")
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
    if args.model == "mlp":
        x = torch.randn(64, 2048, dtype=dtype)
        base = mlp().to(dtype)

        def loss(model: torch.nn.Module) -> torch.Tensor:
            return model(x).square().mean()
    else:
        if not 2 <= args.seq <= 1024:
            ap.error("--seq must be in 2..1024")
        idx = torch.randint(0, 50257, (1, args.seq))
        base = GPT2().to(dtype)

        def loss(model: torch.nn.Module) -> torch.Tensor:
            return model(idx)
    nparams = sum(p.numel() for p in base.parameters())
    step_s: Dict[str, List[float]] = {n: [] for n in NAMES}
    fwd_s: Dict[str, List[float]] = {n: [] for n in NAMES}
    iter_s: Dict[str, List[float]] = {n: [] for n in NAMES}
    per_round: List[Dict[str, float]] = []
    for r in range(args.rounds):
        copies = [copy.deepcopy(base) for _ in NAMES]
        order = NAMES if r % 2 == 0 else NAMES[::-1]
        models = {n: m for n, m in zip(order, copies)}
        opts = {n: optimizer(n, models[n]) for n in NAMES}
        its: Dict[str, List[float]] = {n: [] for n in NAMES}
        for k in range(args.iters + args.warmup):
            for n in NAMES if k % 2 == 0 else NAMES[::-1]:
                t0 = time.perf_counter()
                opts[n].zero_grad()
                loss(models[n]).backward()
                t1 = time.perf_counter()
                opts[n].step()
                t2 = time.perf_counter()
                if k >= args.warmup:
                    fwd_s[n].append(t1 - t0)
                    step_s[n].append(t2 - t1)
                    iter_s[n].append(t2 - t0)
                    its[n].append(t2 - t0)
        per_round.append({n: statistics.median(its[n]) * 1e3 for n in NAMES})
        del opts, models, copies

    def med(xs: List[float]) -> float:
        return statistics.median(xs) * 1e3

    print(f"{args.model} ({nparams / 1e6:.1f}M params), {args.kind} {args.dtype}, {args.threads} thread(s), "
          f"fusedoptim {fusedoptim.__version__} ({fusedoptim.get_cpu_isa()}), torch {torch.__version__}, medians of {args.rounds} rounds x "
          f"{args.iters} interleaved iterations")
    for n in NAMES:
        print(f"  {n:12s} step {med(step_s[n]):7.2f} ms   forward+backward {med(fwd_s[n]):7.2f} ms   "
              f"iteration {med(iter_s[n]):7.2f} ms")
    print(f"  torch fused / fusedoptim: step {med(step_s['torch fused']) / med(step_s['fusedoptim']):.2f}, "
          f"iteration {med(iter_s['torch fused']) / med(iter_s['fusedoptim']):.2f}")
    print("  iteration medians per round (fusedoptim / torch fused, ms): "
          + ", ".join(f"{p['fusedoptim']:.1f} / {p['torch fused']:.1f}" for p in per_round))


if __name__ == "__main__":
    main()
