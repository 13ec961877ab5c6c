"""Train a small model with fusedoptim, side by side with torch.optim.

Everything a real training loop uses, on data generated here (no download):

* ``fusedoptim.AdamW`` as a drop-in for ``torch.optim.AdamW``, with a
  warm-up + cosine LR schedule (a dynamic learning rate), gradient clipping,
  and bf16 autocast on the CPU (mixed precision);
* weight decay as L2 regularisation via ``fusedoptim.SGD(weight_decay=...)``
  in the second run (``--optimizer sgd``);
* a checkpoint saved mid-run and the run resumed from it (model, optimizer,
  scheduler), proving the resumed trajectory equals the uninterrupted one;
* early stopping on a validation loss.

The same loop runs with torch.optim and with fusedoptim from the same seed,
and the script prints both loss curves, the median time of a training step
and of ``optimizer.step()`` alone for each, and which backend fusedoptim's
step ran on (``optimizer.last_backends``).

    python examples/train.py --steps 300
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

import fusedoptim


def make_data(n: int, dim: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A noisy nonlinear regression problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g) / math.sqrt(dim)
    y = torch.sin(x @ w) + 0.5 * (x[:, :1] * x[:, 1:2]) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def make_model(dim: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 1))


def make_optimizer(kind: str, impl: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    lib = fusedoptim if impl == "fusedoptim" else torch.optim
    if kind == "adamw":
        return lib.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    return lib.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def make_scheduler(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(impl: str, args: argparse.Namespace, resume_at: int = -1) -> Dict[str, Any]:
    """Run the loop; with ``resume_at`` >= 0, checkpoint there and resume from it.

    Returns the train and validation losses, the seconds of each training
    step and of each ``opt.step()``, and the optimizer's ``last_backends``
    (fusedoptim only; None for torch.optim).
    """
    xs, ys = make_data(5120, args.dim, seed=1)
    x, y, xv, yv = xs[:4096], ys[:4096], xs[4096:], ys[4096:]  # one function, held-out points
    model = make_model(args.dim, args.width, seed=3)
    opt = make_optimizer(args.optimizer, impl, model, args.lr)
    sched = make_scheduler(opt, args.steps)
    gen = torch.Generator().manual_seed(4)
    losses: List[float] = []
    val: List[float] = []
    step_s: List[float] = []
    opt_s: List[float] = []
    best, patience = math.inf, 0
    step = 0
    while step < args.steps:
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=False)
            model = make_model(args.dim, args.width, seed=99)  # fresh objects, as after a restart
            opt = make_optimizer(args.optimizer, impl, model, args.lr)
            sched = make_scheduler(opt, args.steps)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            gen.set_state(ckpt["gen"])
        t0 = time.perf_counter()
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = nn.functional.mse_loss(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        sched.step()
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
        opt_s.append(t2 - t1)
        step += 1
        if step % args.eval_every == 0:
            with torch.no_grad():
                v = nn.functional.mse_loss(model(xv), yv).item()
            val.append(v)
            if v < best - 1e-5:
                best, patience = v, 0
            else:
                patience += 1
                if patience >= args.patience:  # early stopping
                    break
    return {"train": losses, "val": val, "step_s": step_s, "opt_step_s": opt_s,
            "backends": getattr(opt, "last_backends", None)}


def _ms(seconds: List[float]) -> str:
    return f"{1e3 * statistics.median(seconds):.3f} ms"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each option's default
    (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default:" in text else super()._get_help_string(action)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="AdamW (weight_decay=0.1), or SGD with Nesterov momentum 0.9 and weight decay 1e-4 "
                         "as L2 regularisation")
    ap.add_argument("--steps", type=int, default=300, help="training steps (fewer if early stopping ends the run)")
    ap.add_argument("--batch", type=int, default=128, help="examples per step")
    ap.add_argument("--dim", type=int, default=32, help="input features of the generated regression problem")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the 3-layer MLP")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of the warm-up + cosine schedule (default: 3e-3 for adamw, "
                         "3e-2 for sgd)")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between validation losses")
    ap.add_argument("--patience", type=int, default=4,
                    help="stop after this many validations without improvement (early stopping)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="train in fp32 (default: bf16 autocast on the CPU)")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 3e-3 if args.optimizer == "adamw" else 3e-2

    ref = train("torch", args)
    ours = train("fusedoptim", args)
    resumed = train("fusedoptim", args, resume_at=len(ours["train"]) // 2)

    print(f"{args.optimizer}, {len(ours['train'])} steps, bf16 autocast: {args.bf16}")
    print(f"{'step':>6} {'torch.optim':>12} {'fusedoptim':>12}")
    n = min(len(ref["train"]), len(ours["train"]))
    for i in list(range(0, n, max(1, n // 10))) + [n - 1]:
        print(f"{i + 1:>6} {ref['train'][i]:>12.5f} {ours['train'][i]:>12.5f}")
    print(f"validation: torch.optim {ref['val'][-1]:.5f}, fusedoptim {ours['val'][-1]:.5f}")
    for what, key in (("training step", "step_s"), ("optimizer.step()", "opt_step_s")):
        print(f"{what}, median of {len(ours[key])} steps: torch.optim {_ms(ref[key])}, fusedoptim {_ms(ours[key])}")
    print(f"fusedoptim ran on: {', '.join(ours['backends'])} (optimizer.last_backends), "
          f"{torch.get_num_threads()} threads; fusedoptim {fusedoptim.__version__}, torch {torch.__version__}")
    same = resumed["train"] == ours["train"]
    print(f"checkpoint at step {len(ours['train']) // 2} and resume: "
          f"{'identical losses' if same else 'DIFFERENT losses'} to the uninterrupted run")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
