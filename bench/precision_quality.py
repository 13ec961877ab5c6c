#!/usr/bin/env python
"""Training quality of the precision options: a small model in fp32, pure bf16, and bf16 with each option.

    python bench/precision_quality.py [--plot] [--steps N] [--lr LR] [--out PATH]

A teacher-student regression on generated data: a fixed random MLP (the
teacher, 16 -> 32 -> 1, tanh) labels fresh Gaussian inputs every step; a
student MLP (16 -> 64 -> 64 -> 1, tanh) learns it with ``fusedoptim.AdamW``
(constant lr, weight decay 0.01, batch 256). Every run starts from the same
initial values (drawn in fp32 and rounded to the run's param dtype) and sees
the same batches.

The runs: fp32; bf16 params with the plain optimizer ("pure bf16": params,
grads and optimizer states bf16); bf16 with ``stochastic_rounding``,
``kahan_summation`` or ``master_weights``; fp32 with
``state_dtype=torch.bfloat16``; fp32 with ``max_grad_norm``; 8-bit states
(``state_bits=8``: by default on the one tensor of at least 4096 elements,
and on every tensor with ``min_quantized_numel=1``), fp32 params and bf16
params with stochastic rounding. The model's
arithmetic is fp32 (``--compute bf16`` makes it bf16 too): the params are
upcast for the forward pass and the grads come back in the params' dtype, so
the runs differ only in what the optimizer stores, which is what the options
change.

The default lr (3e-4) puts most of Adam's updates (at most about lr per
element) below half a bf16 ulp of the weights (half an ulp is 2.4e-4 at 0.1,
1.2e-4 at 0.05), so plain bf16 rounds most updates away and stagnates; the
"unchanged" column counts the param elements that the last step left
exactly as they were.

Where bitsandbytes imports, its ``AdamW8bit`` runs too (default
``min_8bit_size`` and 0), the peer of 8-bit states; ``--no-bnb`` leaves it
out.

A second table sweeps the lr (``--sweep-lrs``, two seeds each) for fp32
states, bf16 states and 8-bit states on every tensor: a precision option is
faithful when it ends where fp32 ends at every lr, not merely at one.

Writes a markdown table (final eval loss, its ratio to fp32, optimizer state
and param bytes per param measured from the tensors) to
``bench/results/precision_quality.md``; ``--plot`` draws the loss curves
(log scale) and the sweep's ratios to fp32 against the lr to
``bench/results/precision_quality.png`` (needs matplotlib). Runs in 2-3
minutes on one core (with bitsandbytes: about 2.5).
"""

from __future__ import annotations

import argparse
import itertools
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fusedoptim

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

IN, TEACHER_HIDDEN, HIDDEN, BATCH, EVAL = 16, 32, 64, 256, 4096


@dataclass(frozen=True)
class RunSpec:
    name: str
    dtype: torch.dtype
    options: Dict[str, Any] = field(default_factory=dict)
    peer: Optional[str] = None  # "bitsandbytes": its AdamW8bit with these options instead of fusedoptim's


def have_bnb() -> bool:
    """Whether bitsandbytes imports here (its 8-bit AdamW is the peer of 8-bit states)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or no backend for this machine
        return False
    return True


def run_specs(max_grad_norm: float, bnb: bool = False) -> List[RunSpec]:
    """The runs, fp32 first (the reference of the gap column)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    peers = [RunSpec("bitsandbytes AdamW8bit", fp32, {}, "bitsandbytes"),
             RunSpec("bitsandbytes AdamW8bit (every tensor)", fp32, {"min_8bit_size": 0}, "bitsandbytes")] if bnb else []
    return [
        RunSpec("fp32", fp32),
        RunSpec("bf16 (plain)", bf16),
        RunSpec("bf16 + stochastic_rounding", bf16, {"stochastic_rounding": True}),
        RunSpec("bf16 + kahan_summation", bf16, {"kahan_summation": True}),
        RunSpec("bf16 + master_weights", bf16, {"master_weights": True}),
        RunSpec("fp32 + state_dtype=bf16", fp32, {"state_dtype": torch.bfloat16}),
        RunSpec(f"fp32 + max_grad_norm={max_grad_norm:g}", fp32, {"max_grad_norm": max_grad_norm}),
        RunSpec("fp32 + state_bits=8", fp32, {"state_bits": 8}),
        RunSpec("fp32 + state_bits=8 (every tensor)", fp32, {"state_bits": 8, "min_quantized_numel": 1}),
        RunSpec("bf16 + stochastic_rounding + state_bits=8 (every tensor)", bf16,
                {"stochastic_rounding": True, "state_bits": 8, "min_quantized_numel": 1}),
    ] + peers


class Teacher:
    """A fixed random MLP whose outputs (variance about 0.5) are the targets."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(IN, TEACHER_HIDDEN, generator=g) * (2.0 / IN**0.5)
        self.w2 = torch.randn(TEACHER_HIDDEN, 1, generator=g) / TEACHER_HIDDEN**0.5

    def __call__(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1) @ self.w2


def student(seed: int, dtype: torch.dtype) -> nn.Module:
    """The student, initialised in fp32 from ``seed`` (the same values for every run), then cast."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                          nn.Linear(HIDDEN, 1))
    return model.to(dtype)


def tensor_bytes(ts: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class Result:
    spec: RunSpec
    steps: List[int]
    losses: List[float]
    final: float
    state_bytes: int
    state_keys: Dict[str, str]
    param_bytes: int
    numel: int
    unchanged_pct: float
    clipped_pct: Optional[float]
    seconds: float


def train(spec: RunSpec, args: argparse.Namespace, teacher: Teacher, ev_x: Tensor, ev_y: Tensor) -> Result:
    model = student(args.seed, spec.dtype)
    params = list(model.parameters())
    # The SR seed is drawn from torch's default generator at construction: fix it per run.
    torch.manual_seed(args.seed + 1)
    if spec.peer == "bitsandbytes":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay, **spec.options)
    else:
        opt = fusedoptim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **spec.options)
        opt.num_threads = args.threads
    compute = torch.bfloat16 if args.compute == "bf16" else torch.float32
    data = torch.Generator().manual_seed(args.seed + 2)
    names = [n for n, _ in model.named_parameters()]

    def forward(x: Tensor) -> Tensor:
        return functional_call(model, {n: p.to(compute) for n, p in zip(names, params)}, (x.to(compute),)).float()

    def evaluate() -> float:
        with torch.no_grad():
            return F.mse_loss(forward(ev_x), ev_y).item()

    max_norm = spec.options.get("max_grad_norm")
    clipped = 0
    steps: List[int] = [0]
    losses: List[float] = [evaluate()]
    every = max(1, args.steps // args.points)
    before: List[Tensor] = []
    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
        x = torch.randn(BATCH, IN, generator=data)
        loss = F.mse_loss(forward(x), teacher(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s == args.steps:
            before = [p.detach().clone() for p in params]
        opt.step()
        if max_norm is not None and getattr(opt, "last_grad_norm", None) is not None and float(opt.last_grad_norm) > max_norm:
            clipped += 1
        if s % every == 0 or s == args.steps:
            steps.append(s)
            losses.append(evaluate())
    seconds = time.perf_counter() - t0
    numel = sum(p.numel() for p in params)
    unchanged = sum(int((b == p.detach()).sum()) for b, p in zip(before, params))
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    keys: Dict[str, str] = {}
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                keys[k] = str(v.dtype).replace("torch.", "")
    return Result(spec, steps, losses, losses[-1], tensor_bytes(state), keys, tensor_bytes(params), numel,
                  100.0 * unchanged / numel, None if max_norm is None else 100.0 * clipped / args.steps, seconds)


SWEEP_RUNS = (("fp32", {}), ("bf16 states", {"state_dtype": torch.bfloat16}),
              ("8-bit states", {"state_bits": 8, "min_quantized_numel": 1}))


@dataclass
class SweepRow:
    lr: float
    finals: Dict[str, List[float]]  # run name -> per seed, the mean eval loss over the last 10% of the steps


def sweep_runs(bnb: bool) -> List[RunSpec]:
    runs = [RunSpec(name, torch.float32, opts) for name, opts in SWEEP_RUNS]
    if bnb:
        runs.append(RunSpec("bitsandbytes 8-bit", torch.float32, {"min_8bit_size": 0}, "bitsandbytes"))
    return runs


def lr_sweep(args: argparse.Namespace, lrs: Sequence[float], seeds: Sequence[int],
             bnb: bool = False) -> List[SweepRow]:
    """fp32, bf16 and 8-bit states at each lr and seed (fp32 params, the same batches per seed).

    A run's figure is its mean eval loss over the last 10% of the steps (10
    evaluations): at the larger lrs one evaluation moves by tens of percent
    from one to the next."""
    rows = []
    for lr in lrs:
        runs = sweep_runs(bnb)
        finals: Dict[str, List[float]] = {r.name: [] for r in runs}
        for seed in seeds:
            a = argparse.Namespace(**{**vars(args), "lr": lr, "seed": seed, "points": 100})
            teacher = Teacher(seed + 100)
            ev_x = torch.randn(EVAL, IN, generator=torch.Generator().manual_seed(seed + 3))
            ev_y = teacher(ev_x)
            for spec in runs:
                r = train(spec, a, teacher, ev_x, ev_y)
                tail = [x for st, x in zip(r.steps, r.losses) if st > 0.9 * args.steps]
                finals[spec.name].append(sum(tail) / len(tail))
        rows.append(SweepRow(lr, finals))
        print(f"lr {lr:g}: " + "  ".join(f"{n} {' / '.join(f'{v:.3e}' for v in vs)}" for n, vs in finals.items()),
              file=sys.stderr, flush=True)
    return rows


def _ratios(r: SweepRow, name: str) -> List[float]:
    return [a / b for a, b in zip(r.finals[name], r.finals["fp32"])]


def sweep_table(rows: List[SweepRow]) -> List[str]:
    names = list(rows[0].finals)
    out = ["| lr | " + " | ".join(f"{n}: eval loss per seed" for n in names)
           + " | " + " | ".join(f"{n} / fp32 per seed" for n in names[1:]) + " |",
           "| ---: |" + " ---: |" * (2 * len(names) - 1)]
    for r in rows:
        cells = [" / ".join(f"{v:.3e}" for v in r.finals[n]) for n in names]
        ratios = [" / ".join(f"{x:.3f}x" for x in _ratios(r, n)) for n in names[1:]]
        out.append(f"| {r.lr:g} | " + " | ".join(cells + ratios) + " |")
    return out


def sweep_observations(rows: List[SweepRow]) -> List[str]:
    out = []
    for name in list(rows[0].finals)[1:]:
        ratios = [x for r in rows for x in _ratios(r, name)]
        worst = max(ratios, key=lambda x: abs(x - 1))
        out.append(f"* {name}: eval loss {min(ratios):.3f}x to {max(ratios):.3f}x fp32's over the {len(rows)} lrs "
                   f"and seeds (furthest from 1: {worst:.3f}x, {100 * abs(worst - 1):.1f}% apart).")
    return out


def fmt_bytes(b: float) -> str:
    return f"{b:.2f}".rstrip("0").rstrip(".")


def table(results: List[Result]) -> List[str]:
    ref = results[0].final
    out = [
        "| run | final eval loss | vs fp32 | param bytes/param | optimizer state bytes/param | state tensors "
        "| unchanged by last step |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        states = ", ".join(f"{k} {v}" for k, v in r.state_keys.items())
        out.append(
            f"| {r.spec.name} | {r.final:.3e} | {r.final / ref:.2f}x | {fmt_bytes(r.param_bytes / r.numel)} "
            f"| {fmt_bytes(r.state_bytes / r.numel)} | {states} | {r.unchanged_pct:.1f}% |"
        )
    return out


def observations(results: List[Result], args: argparse.Namespace) -> List[str]:
    """What the numbers say, computed from them (so the text can't drift from the table)."""
    by = {r.spec.name: r for r in results}
    fp32 = results[0]
    plain = by["bf16 (plain)"]
    bf16_runs = [r for r in results if r.spec.dtype == torch.bfloat16]
    worst = max(results, key=lambda r: r.final)
    out = [
        f"* Worst final loss: **{worst.spec.name}** ({worst.final:.3e}, {worst.final / fp32.final:.2f}x fp32)"
        + ("; plain bf16 is clearly worst, as expected." if worst is plain else
           "; NOT plain bf16: this contradicts the expectation, see the curves."),
        f"* Plain bf16 stagnates: its last step left {plain.unchanged_pct:.1f}% of the param elements unchanged "
        f"(fp32: {fp32.unchanged_pct:.1f}%): those updates were below half a bf16 ulp and rounded away (with the "
        f"options the bf16 param also stays put on most steps, but the update is kept: in the master copy, the "
        f"Kahan compensation, or in expectation with stochastic rounding). Its loss "
        f"went from {plain.losses[0]:.3e} to {plain.final:.3e} (fp32: to {fp32.final:.3e}).",
    ]
    for r in bf16_runs:
        if r is plain or r.spec.options.get("state_bits"):
            continue
        share = (plain.final - r.final) / (plain.final - fp32.final) if plain.final != fp32.final else float("nan")
        out.append(f"* {r.spec.name}: {r.final / fp32.final:.2f}x fp32's loss, {100 * share:.0f}% of plain bf16's "
                   f"gap to fp32 closed; {fmt_bytes(r.state_bytes / r.numel)} B/param of optimizer state "
                   f"(plain bf16: {fmt_bytes(plain.state_bytes / plain.numel)}).")
    states = next((r for r in results if r.spec.options.get("state_dtype") == torch.bfloat16), None)
    near = [r for r in bf16_runs if r is not plain and r.state_keys.get("exp_avg") == "bfloat16"]
    if states is not None and near and all(abs(r.final / states.final - 1) < 0.1 for r in near):
        out.append(f"* The bf16-state runs end together: fp32 params with bf16 states reach {states.final:.3e}, "
                   + ", ".join(f"{r.spec.name} {r.final:.3e}" for r in near)
                   + " (within 10%), while master weights (fp32 states) match fp32: what remains of their gap "
                   "to fp32 comes from the bf16 moments, not from the param storage.")
    for r in results[1:]:
        if r.spec.options.get("state_bits") or r.spec.peer:
            continue  # their own lines below
        if r.spec.dtype == torch.float32:
            extra = (f"; clipping was active on {r.clipped_pct:.0f}% of the steps (clipping changes the update "
                     "itself, so its loss is no precision comparison: the row shows the option at work in a "
                     "training loop)") if r.clipped_pct is not None else ""
            out.append(f"* {r.spec.name}: {r.final / fp32.final:.2f}x fp32's loss with "
                       f"{fmt_bytes(r.state_bytes / r.numel)} B/param of state (fp32: "
                       f"{fmt_bytes(fp32.state_bytes / fp32.numel)}){extra}.")
    for r in results:
        if r.spec.peer:
            out.append(f"* {r.spec.name} (bitsandbytes {_bnb_version()}): {r.final / fp32.final:.2f}x fp32's "
                       f"loss with {fmt_bytes(r.state_bytes / r.numel)} B/param of state (its per-tensor code "
                       "maps, 2 KB per param tensor, included).")
            continue
        if r.spec.options.get("state_bits"):
            base = by["bf16 + stochastic_rounding"] if r.spec.dtype == torch.bfloat16 else fp32
            out.append(f"* {r.spec.name}: {r.final / base.final:.2f}x the loss of {base.spec.name} with "
                       f"{fmt_bytes(r.state_bytes / r.numel)} B/param of state ({base.spec.name}: "
                       f"{fmt_bytes(base.state_bytes / base.numel)})"
                       + ("; the tensors under min_quantized_numel (4096) keep full states." if
                          "min_quantized_numel" not in r.spec.options else "."))
    return out


def _bnb_version() -> str:
    import bitsandbytes

    return str(bitsandbytes.__version__)


def machine() -> Dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = fusedoptim.backend_info()
    return {"cpu": model, "cores": os.cpu_count(), "isa": info["isa"], "torch": torch.__version__,
            "fusedoptim": fusedoptim.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_markdown(path: str, results: List[Result], args: argparse.Namespace, command: str, plot: Optional[str],
                   wall: float, sweep: Sequence[SweepRow] = ()) -> None:
    m = machine()
    numel = results[0].numel
    lines = [
        "# Precision options: training quality",
        "",
        f"Command: `{command}` ({wall:.0f} s). Machine: {m['cpu']}, {m['cores']} cores, fusedoptim "
        f"{m['fusedoptim']} ({m['isa']}), torch {m['torch']}, Python {m['python']}, {m['date']}.",
        "",
        f"Task: teacher-student regression on generated data (teacher MLP {IN}-{TEACHER_HIDDEN}-1, student MLP "
        f"{IN}-{HIDDEN}-{HIDDEN}-1 with tanh, {numel} params; fresh N(0, 1) inputs, batch {BATCH}; eval MSE on "
        f"{EVAL} fixed inputs). `fusedoptim.AdamW(lr={args.lr:g}, weight_decay={args.weight_decay:g})`, "
        f"{args.steps} steps, seed {args.seed}, every run from the same initial values and batches. Model "
        f"arithmetic in {args.compute}; the runs differ in what the optimizer stores.",
        "",
        "Bytes per param are measured from the tensors (`optimizer.state` values, including the 4-byte step "
        "counter of each param tensor, and the params), divided by the number of params. \"unchanged by last "
        "step\" is the share of param elements the final step left bit-identical.",
        "",
    ]
    lines += table(results)
    lines += ["", "## What was seen", ""] + observations(results, args) + [""]
    if plot:
        lines += [f"![eval loss per step]({os.path.relpath(plot, os.path.dirname(os.path.abspath(path)))})", ""]
    if sweep:
        lines += ["## The lr sweep", "",
                  f"The same task and {args.steps} steps, fp32 params, at each lr with seeds "
                  f"{args.seed} and {args.seed + 1} (the seed draws the teacher, the initial values, the batches "
                  "and the eval inputs); 8-bit states on every tensor (bitsandbytes: `min_8bit_size=0`). Eval "
                  "loss: the mean of the 10 evaluations in the last 10% of the steps.", ""]
        lines += sweep_table(list(sweep)) + [""] + sweep_observations(list(sweep)) + [""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, results: List[Result], args: argparse.Namespace, sweep: Sequence[SweepRow] = ()) -> None:
    """The loss curves; with a sweep, a second panel: each state type's eval loss over fp32's against the lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 + 5 * (panels - 1), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [8, 5][:panels]})
    ax = axes[0][0]
    colors = list(plt.get_cmap("tab10").colors) + ["black", "darkgoldenrod"]
    styles = ["-", "-", "--", "-.", ":", "--", ":", "-", "--", "-.", "-", "--"]
    for k, (r, ls) in enumerate(zip(results, itertools.cycle(styles))):
        ax.plot(r.steps, r.losses, ls, color=colors[k % len(colors)], label=f"{r.spec.name} ({r.final:.2e})",
                linewidth=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("eval MSE (log scale)")
    ax.set_title(f"fusedoptim.AdamW lr={args.lr:g}, teacher-student MLP: fp32, pure bf16 and the precision options",
                 fontsize=9)
    ax.grid(True, which="both", color="0.9")
    ax.legend(fontsize=7)
    if sweep:
        bx = axes[0][1]
        lrs = [r.lr for r in sweep]
        for k, name in enumerate(list(sweep[0].finals)[1:]):
            per_seed = [_ratios(r, name) for r in sweep]
            for s_i in range(len(per_seed[0])):
                bx.plot(lrs, [p[s_i] for p in per_seed], "o-" if s_i == 0 else "s--", color=plt.get_cmap("tab10")(k),
                        label=f"{name}, seed {args.seed + s_i}", linewidth=1.2, markersize=4)
        bx.axhline(1.0, color="0.3", linewidth=1)
        bx.set_xscale("log")
        bx.set_xlabel("lr")
        bx.set_ylabel("eval loss / fp32's (last 10% of steps)")
        bx.set_title("lr sweep, fp32 params: a faithful copy stays on 1", fontsize=9)
        bx.grid(True, which="both", color="0.9")
        bx.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/precision_quality.py",
                                description="Train a small model with each precision option; report the loss gap "
                                "to fp32 and the bytes per param.")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (default 3000)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW lr (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=0.1,
                   help="the max_grad_norm run's threshold (default 0.1: clips part of the steps)")
    p.add_argument("--compute", choices=("fp32", "bf16"), default="fp32",
                   help="the model's arithmetic (default fp32: only the optimizer's storage differs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch and fusedoptim threads (default 1: the model is too small to gain from more)")
    p.add_argument("--points", type=int, default=100, help="eval points per curve")
    p.add_argument("--sweep-lrs", default="3e-4,1e-3,3e-3,1e-2",
                   help="comma-separated lrs of the sweep of fp32, bf16 and 8-bit states, two seeds each "
                   "(default 3e-4,1e-3,3e-3,1e-2; empty: no sweep)")
    p.add_argument("--no-bnb", action="store_true",
                   help="leave out bitsandbytes' AdamW8bit (run as the peer of 8-bit states where it imports)")
    p.add_argument("--out", default=os.path.join(RESULTS, "precision_quality.md"), help="markdown results file")
    p.add_argument("--plot", nargs="?", const=os.path.join(RESULTS, "precision_quality.png"), default=None,
                   metavar="PNG", help="draw the loss curves (default path bench/results/precision_quality.png)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    try:
        args.sweep_lrs = [float(x) for x in args.sweep_lrs.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sweep-lrs: expected comma-separated numbers, got {args.sweep_lrs!r}")
    if any(not lr > 0 for lr in args.sweep_lrs):
        p.error("--sweep-lrs: every lr must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = Teacher(args.seed + 100)
    ev_x = torch.randn(EVAL, IN, generator=torch.Generator().manual_seed(args.seed + 3))
    ev_y = teacher(ev_x)
    t0 = time.perf_counter()
    results: List[Result] = []
    bnb = not args.no_bnb and have_bnb()
    for spec in run_specs(args.max_grad_norm, bnb):
        r = train(spec, args, teacher, ev_x, ev_y)
        results.append(r)
        print(f"{spec.name:<32} final eval loss {r.final:.3e}  ({r.final / results[0].final:.2f}x fp32)  "
              f"state {fmt_bytes(r.state_bytes / r.numel)} B/param  unchanged {r.unchanged_pct:.1f}%  "
              f"({r.seconds:.1f} s)", file=sys.stderr, flush=True)
    sweep = lr_sweep(args, args.sweep_lrs, (args.seed, args.seed + 1), bnb) if args.sweep_lrs else []
    wall = time.perf_counter() - t0
    command = " ".join(["python bench/precision_quality.py"] + argv)
    if args.plot:
        write_plot(args.plot, results, args, sweep)
    write_markdown(args.out, results, args, command, args.plot, wall, sweep)
    print("\n".join(table(results)))
    if sweep:
        print("\n".join([""] + sweep_table(sweep)))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
