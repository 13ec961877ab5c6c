"""The size sweep: fusedoptim against torch's fused step, one tensor of 2^10 to
2^27 elements and the many-tensor cases, timed interleaved.

``fusedoptim-bench --suite sweep`` runs it. For every (optimizer, dtype,
thread count, size) cell both optimizers step the same params:

* **interleaved**: blocks of steps alternate A B B A A B ... in one process,
  so drift of a shared machine hits both alike; a cell's time is the median
  of its block medians and its ratio the median of the per-block ratios
  (torch fused time / fusedoptim time: above 1, fusedoptim is faster);
* **in a loop** (``--mode loop``, the default): before every timed step the
  grads are rewritten by a torch op and torch runs one parallel op on a 1M
  element tensor, untimed, as backward and the forward's ops run before a
  step in training, so the step starts where torch's OpenMP workers have just
  been busy. ``--mode back-to-back`` times steps alone;
* ``--contended``: a process spinning on one core (started and stopped by the
  benchmark) runs beside the whole sweep, as a data-loader worker or a second
  job would.

A cell whose per-block ratios spread widely (interquartile range above a
fifth of the median) is marked untrusted and prints no ratio.
"""

from __future__ import annotations

import csv
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple, Union

import torch
from torch import Tensor

from .cases import Case, build_tensors, parse_case
from .harness import DTYPES, OPTIMIZERS, BenchError, CpuLoad, LoopWork, Unsupported, make_optimizer, torch_fused_wrong

__all__ = ["SweepConfig", "SweepRow", "SweepReport", "parse_sizes", "run_sweep", "format_sweep_table",
           "write_sweep_json", "write_sweep_csv", "write_sweep_plot", "write_sweep_markdown", "interleaved"]

#: Optimizers, dtypes and many-tensor cases of a sweep without options.
SWEEP_OPTIMIZERS = ("adam", "adamw", "sgd")
SWEEP_CASES = ("2000x1024", "gpt2-small")
#: The two sides of every cell.
SIDES = ("fusedoptim", "torch-fused")
#: The third side of a contended cell with threads: fusedoptim on one thread (SweepRow.fusedoptim_one_thread_ms).
ONE_THREAD = "fusedoptim-1-thread"
#: A cell is trusted when the interquartile range of its per-block ratios is
#: at most this fraction of their median.
TRUST_SPREAD = 0.2


@dataclass
class SweepConfig:
    """What a sweep runs."""

    optimizers: List[str] = field(default_factory=lambda: list(SWEEP_OPTIMIZERS))
    dtypes: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    threads: List[int] = field(default_factory=lambda: [1])
    exponents: List[int] = field(default_factory=lambda: list(range(10, 28)))
    cases: List[Case] = field(default_factory=lambda: [parse_case(c) for c in SWEEP_CASES])
    mode: str = "loop"
    contended: bool = False
    blocks: int = 9
    block_time: float = 0.02  # seconds of steps per side and block
    max_per_block: int = 64


@dataclass
class SweepRow:
    """One cell: both sides' medians and the ratio."""

    optimizer: str
    dtype: str
    threads: int
    case: str
    tensors: int
    numel: int
    mode: str
    contended: bool
    fusedoptim_ms: float
    torch_fused_ms: float
    ratio: float  # median of per-block torch fused / fusedoptim
    ratio_q1: float
    ratio_q3: float
    blocks: int
    steps_per_block: int  # fusedoptim's steps in each block
    torch_fused_wrong: str = ""  # why torch's fused step is no fair target here (harness.torch_fused_wrong)
    # Contended cells with more than one thread: fusedoptim's step on one
    # thread, timed in the same blocks while torch keeps its threads, which
    # tells torch's share of a slowdown (its OpenMP workers) from fusedoptim's.
    fusedoptim_one_thread_ms: Optional[float] = None
    torch_fused_steps_per_block: Optional[int] = None

    @property
    def trusted(self) -> bool:
        return (self.ratio_q3 - self.ratio_q1) <= TRUST_SPREAD * self.ratio


@dataclass
class SweepReport:
    machine: Dict[str, Any]
    config: Dict[str, Any]
    rows: List[SweepRow] = field(default_factory=list)
    wall_s: float = 0.0
    complete: bool = False


def parse_sizes(text: str) -> List[int]:
    """Exponents of two from ``"10-27"``, ``"10,16,20"`` or a mix (``"10-14,20"``)."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if not (0 <= a <= b <= 32):
            raise ValueError(f"size exponents must satisfy 0 <= a <= b <= 32, got {part!r}")
        out += [e for e in range(a, b + 1) if e not in out]
    if not out:
        raise ValueError("no sizes")
    return out


# --------------------------------------------------------------------------------------------
# interleaved timing
# --------------------------------------------------------------------------------------------


def interleaved(steps: Dict[str, Callable[[], Any]], before: Optional[Callable[[], Any]], blocks: int,
                per_block: Union[int, Mapping[str, int]]) -> Dict[str, List[float]]:
    """Block medians (seconds per step) of each step function, blocks alternating A B B A ...

    ``per_block``: steps per block, one count for all or one per step
    function. ``before`` runs untimed before every timed step. The GC is off
    while timing.
    """
    names = list(steps)
    counts = {n: per_block if isinstance(per_block, int) else per_block[n] for n in names}
    out: Dict[str, List[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for b in range(blocks):
            for n in (names if b % 2 == 0 else names[::-1]):
                fn = steps[n]
                samples = []
                for _ in range(counts[n]):
                    if before is not None:
                        before()
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                out[n].append(statistics.median(samples))
    finally:
        if gc_was:
            gc.enable()
    return out


def _quartiles(xs: Sequence[float]) -> Tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


class Spinner:
    """A process that keeps one core busy while it lives."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Spinner":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def sweep_cases(cfg: SweepConfig) -> List[Case]:
    """One tensor per exponent, then the many-tensor cases."""
    return [parse_case(f"1x{1 << e}") for e in cfg.exponents] + list(cfg.cases)


def _cell(cfg: SweepConfig, spec_name: str, dtype: str, threads: int, case: Case, params: List[Tensor]) -> SweepRow:
    spec = OPTIMIZERS[spec_name]
    torch.set_num_threads(threads)
    try:
        opts = {side: make_optimizer(spec, side, params) for side in SIDES}
    except Unsupported as e:
        raise BenchError(f"the sweep compares with torch's fused=True CPU step: {e}") from None
    if cfg.contended and threads > 1:
        opts[ONE_THREAD] = make_optimizer(spec, "fusedoptim", params)
        opts[ONE_THREAD].num_threads = 1
    before = LoopWork(params) if cfg.mode == "loop" else None
    try:
        for opt in opts.values():  # the first steps create the state
            opt.step()
            opt.step()
        # Steps per block: about block_time of the slower side, so that each
        # step follows the other side's as in a loop whose state is cold when
        # the step comes. Contended, each side fills block_time with its own
        # steps: torch's fused step on two threads then takes up to a hundred
        # times as long, and a shared count would leave fusedoptim's two-thread
        # cell one step per block (a cold step's time) where its one-thread cell
        # has several, which is no comparison of the two.
        probe = interleaved({s: o.step for s, o in opts.items()}, before, 1, 1)
        slow = max(v[0] for v in probe.values())
        pace = {s: v[0] if cfg.contended else slow for s, v in probe.items()}
        per_block = {s: max(1, min(cfg.max_per_block, int(cfg.block_time / max(t, 1e-7)))) for s, t in pace.items()}
        t = interleaved({s: o.step for s, o in opts.items()}, before, cfg.blocks, per_block)
    finally:
        del opts
    ratios = [f / o for f, o in zip(t["torch-fused"], t["fusedoptim"])]
    q1, q3 = _quartiles(ratios)
    return SweepRow(optimizer=spec_name, dtype=dtype, threads=threads, case=case.name, tensors=case.num_tensors,
                    numel=case.numel, mode=cfg.mode, contended=cfg.contended,
                    fusedoptim_ms=statistics.median(t["fusedoptim"]) * 1e3,
                    torch_fused_ms=statistics.median(t["torch-fused"]) * 1e3, ratio=statistics.median(ratios),
                    ratio_q1=q1, ratio_q3=q3, blocks=cfg.blocks, steps_per_block=per_block["fusedoptim"],
                    torch_fused_steps_per_block=per_block["torch-fused"],
                    torch_fused_wrong=torch_fused_wrong(spec, dtype),
                    fusedoptim_one_thread_ms=statistics.median(t[ONE_THREAD]) * 1e3 if ONE_THREAD in t else None)


def run_sweep(cfg: SweepConfig, report: SweepReport, progress: Optional[TextIO] = sys.stderr) -> SweepReport:
    """Every cell of ``cfg``; rows are appended to ``report`` as they finish."""
    t_start = time.perf_counter()
    cases = sweep_cases(cfg)
    total = len(cases) * len(cfg.dtypes) * len(cfg.optimizers) * len(cfg.threads)
    done = 0
    saved = torch.get_num_threads()
    load = CpuLoad()
    spinner = Spinner() if cfg.contended else None
    try:
        if spinner is not None:
            spinner.__enter__()
        load.start()
        for case in cases:
            for dtype in cfg.dtypes:
                params = build_tensors(case, DTYPES[dtype])
                try:
                    for spec_name in cfg.optimizers:
                        for threads in cfg.threads:
                            row = _cell(cfg, spec_name, dtype, threads, case, params)
                            report.rows.append(row)
                            done += 1
                            if progress is not None:
                                mark = "" if row.trusted else "  (untrusted: blocks disagree)"
                                print(f"[{done:>{len(str(total))}}/{total}] {spec_name:<6} {dtype} {case.name:<10} "
                                      f"{threads} thr  fusedoptim {row.fusedoptim_ms:9.4f} ms  torch fused "
                                      f"{row.torch_fused_ms:9.4f} ms  ratio {row.ratio:5.2f} (block quartiles "
                                      f"{row.ratio_q1:.2f}-{row.ratio_q3:.2f}){mark}  "
                                      f"({time.perf_counter() - t_start:.0f} s)", file=progress, flush=True)
                finally:
                    del params
                    gc.collect()
        report.complete = True
    finally:
        during = load.stop()
        if spinner is not None:
            spinner.__exit__(None, None, None)
        torch.set_num_threads(saved)
        report.wall_s = time.perf_counter() - t_start
        report.machine["other_cpu_load_during_run_pct"] = None if during is None else round(during, 1)
    return report


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _size_label(row: SweepRow) -> str:
    if row.tensors == 1 and row.numel & (row.numel - 1) == 0:
        return f"2^{row.numel.bit_length() - 1}"
    return row.case


def format_sweep_table(report: SweepReport) -> str:
    """Ratios (torch fused / fusedoptim) per size, one column per (optimizer, dtype, threads)."""
    rows = report.rows
    if not rows:
        return "no cells were measured"
    cols: List[Tuple[str, str, int]] = []
    sizes: List[str] = []
    cell: Dict[Tuple[str, Tuple[str, str, int]], SweepRow] = {}
    for r in rows:
        key = (r.optimizer, r.dtype, r.threads)
        if key not in cols:
            cols.append(key)
        label = _size_label(r)
        if label not in sizes:
            sizes.append(label)
        cell[(label, key)] = r
    heads = [f"{o} {d} {t}t" for o, d, t in cols]
    width = max(8, *(len(h) for h in heads))
    lines = ["size".ljust(10) + " ".join(h.rjust(width) for h in heads)]
    lines.append("-" * len(lines[0]))
    worst: Optional[SweepRow] = None
    untrusted = 0
    wrong: Dict[str, None] = {}  # why torch's fused step is no fair target, in order
    for s in sizes:
        out = []
        for key in cols:
            r = cell.get((s, key))
            if r is None:
                out.append("-".rjust(width))
            elif not r.trusted:
                untrusted += 1
                out.append("?".rjust(width))
            elif r.torch_fused_wrong:
                wrong.setdefault(r.torch_fused_wrong, None)
                out.append(f"{r.ratio:.2f}!".rjust(width))
            else:
                out.append(f"{r.ratio:.2f}".rjust(width))
                if worst is None or r.ratio < worst.ratio:
                    worst = r
        lines.append(s.ljust(10) + " ".join(out))
    m = report.machine
    lines.append("")
    lines.append(f"ratio = torch fused step time / fusedoptim step time, median of {rows[0].blocks} interleaved "
                 f"blocks (>1: fusedoptim is faster); mode: {rows[0].mode}"
                 + (", one core kept busy by another process" if rows[0].contended else ""))
    if untrusted:
        lines.append(f"? = {untrusted} cell(s) untrusted: their per-block ratios spread by more than "
                     f"{TRUST_SPREAD:.0%} of the median (a disturbed machine); rerun them with --sizes")
    for why in wrong:
        lines.append(f"! = torch's fused step does less than fusedoptim's, so the ratio is no verdict: {why}")
    if worst is not None:
        lines.append(f"lowest trusted ratio: {worst.ratio:.2f} ({worst.optimizer} {worst.dtype} {worst.case} "
                     f"{worst.threads} thread(s))" + (", cells marked ! aside" if wrong else ""))
    if report.rows and rows[0].contended:
        lines += contended_summary(report)
    lines.append(f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} cores, fusedoptim "
                 f"{m.get('fusedoptim_version')} ({m.get('isa')}, {m.get('threading', '?')}), torch "
                 f"{m.get('torch_version')}, {m.get('date')}")
    during = m.get("other_cpu_load_during_run_pct")
    if during is not None and not rows[0].contended:
        lines.append(f"Other processes used {during:.0f}% of the CPUs' time during the run"
                     + (" (timings disturbed)." if during > 10 else "."))
    return "\n".join(lines)


def contended_times(report: SweepReport) -> List[Tuple[str, float, float, Optional[float]]]:
    """Per cell of a contended sweep: fusedoptim's step with the most threads,
    with 1 thread (torch on 1 thread too), and on 1 thread while torch keeps
    the most (None where not timed), in ms."""
    one = {(r.optimizer, r.dtype, r.case): r for r in report.rows if r.threads == 1}
    most = max((r.threads for r in report.rows), default=1)
    out = []
    for r in report.rows:
        if r.threads == most and most > 1:
            base = one.get((r.optimizer, r.dtype, r.case))
            if base is not None:
                out.append((f"{r.optimizer} {r.dtype} {r.case}", r.fusedoptim_ms, base.fusedoptim_ms,
                            r.fusedoptim_one_thread_ms))
    return out


def contended_summary(report: SweepReport) -> List[str]:
    """The contended sweep's verdict lines: fusedoptim's slowdown with threads,
    split into what torch's threads cost a one-thread step and what
    fusedoptim's own threads add to that."""
    times = contended_times(report)
    if not times:
        return []
    name, most, one, _ = max(times, key=lambda x: x[1] / x[2])
    lines = [f"fusedoptim 2+ threads / 1 thread under contention: worst {most / one:.2f}x ({name})"]
    split = [(n, m, o, s) for n, m, o, s in times if s is not None]
    if split:
        env = max(split, key=lambda x: x[3] / x[2])
        own = max(split, key=lambda x: x[1] / x[3])
        lines.append(f"  its step on 1 thread while torch keeps its threads / with torch on 1 thread: up to "
                     f"{env[3] / env[2]:.2f}x ({env[0]}): torch's OpenMP workers, not fusedoptim's threads")
        lines.append(f"  its threads / its step on 1 thread, both beside torch's threads: worst "
                     f"{own[1] / own[3]:.2f}x ({own[0]})")
    return lines


def _dicts(report: SweepReport) -> List[Dict[str, Any]]:
    return [dict(asdict(r), trusted=r.trusted) for r in report.rows]


def write_sweep_json(report: SweepReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"machine": report.machine, "config": report.config, "rows": _dicts(report),
                   "wall_s": round(report.wall_s, 1), "complete": report.complete}, f, indent=1)


def write_sweep_csv(report: SweepReport, path: str) -> None:
    rows = _dicts(report)
    if not rows:
        raise BenchError("no rows to write")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_sweep_plot(report: SweepReport, path: str) -> None:
    """Ratio against size, one panel per thread count, a line per (optimizer, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r.threads for r in report.rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.6), sharey=True, squeeze=False)
    series = list(dict.fromkeys((r.optimizer, r.dtype) for r in report.rows))
    many = list(dict.fromkeys(r.case for r in report.rows if r.tensors > 1))
    markers = "sDv^<>"
    for ax, t in zip(axes[0], threads):
        for k, (o, d) in enumerate(series):
            pts = sorted((r.numel, r.ratio, r.trusted) for r in report.rows
                         if r.threads == t and r.optimizer == o and r.dtype == d and r.tensors == 1)
            if not pts:
                continue
            wrong = any(r.torch_fused_wrong for r in report.rows if r.optimizer == o and r.dtype == d)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2,
                            ls="-" if d == "fp32" else "--",
                            label=f"{o} {d}" + (" (torch fused skips work: no verdict)" if wrong else ""),
                            alpha=0.45 if wrong else 1.0)
            bad = [p for p in pts if not p[2]]
            if bad:
                ax.plot([p[0] for p in bad], [p[1] for p in bad], "x", color=line.get_color(), ms=8)
            for j, case in enumerate(many):
                r = next((r for r in report.rows if r.threads == t and r.optimizer == o and r.dtype == d
                          and r.case == case), None)
                if r is not None:
                    ax.plot([r.numel], [r.ratio], markers[j % len(markers)], color=line.get_color(), ms=7,
                            mfc="none")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.95, color="red", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements (one tensor; hollow markers: " + ", ".join(
            f"{markers[j % len(markers)]} {c}" for j, c in enumerate(many)) + ")")
        ax.set_title(f"{t} thread" + ("" if t == 1 else "s"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("torch fused time / fusedoptim time")
    axes[0][-1].legend(fontsize=8, loc="best")
    m = report.machine
    rows = report.rows
    mode = rows[0].mode if rows else ""
    fig.suptitle(f"fusedoptim vs torch fused=True ({mode}{', contended' if rows and rows[0].contended else ''}): "
                 f"{m.get('cpu_model')}, {m.get('isa')}, torch {m.get('torch_version')}. Above 1: fusedoptim "
                 "faster; x: untrusted cell", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_markdown(report: SweepReport, path: str, files: Sequence[str] = ()) -> None:
    m = report.machine
    lines = [f"# Size sweep: fusedoptim vs torch fused ({report.rows[0].mode if report.rows else ''})", "",
             f"Command: `{report.config.get('command', '')}` ({report.wall_s:.0f} s)", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} cores, {m.get('isa')}, "
             f"threads: {m.get('threading')}, torch {m.get('torch_version')}, fusedoptim "
             f"{m.get('fusedoptim_version')} ({m.get('fusedoptim_git')}), {m.get('date')}", ""]
    for f in files:
        lines.append(f"![sweep]({f})" if f.endswith(".png") else f"- [{f}]({f})")
    lines += ["", "```", format_sweep_table(report), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def sweep_config_dict(cfg: SweepConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    d["cases"] = [c.name for c in cfg.cases]
    return d


def sweep_main(cfg: SweepConfig, report: SweepReport, progress: Optional[TextIO]) -> int:
    """Run, returning 130 when interrupted (the rows so far are kept)."""
    try:
        run_sweep(cfg, report, progress)
    except KeyboardInterrupt:
        print("interrupted: printing what was measured", file=sys.stderr)
        return 130
    return 0

