"""fusedoptim-bench: optimizer step time and bandwidth against the machine's limit.

Run ``fusedoptim-bench`` (or ``python -m fusedoptim.bench``) with no
arguments for the default grid (Adam and SGD with momentum; every case;
fp32 and bf16; 1 thread and all cores; fusedoptim against torch.optim's
fused, foreach and for-loop steps, timed side by side in a training loop's
conditions, and fusedoptim against torch fused back to back), a few minutes
on a 2-core machine. ``--suite sweep`` compares fusedoptim with torch's fused
step over sizes from 2^10 to 2^27 elements (:mod:`fusedoptim.bench.sweep`).
Progress goes to stderr, the table to stdout. ``--suite precision`` runs the
precision options instead (see :mod:`fusedoptim.bench.precision`, about 1-2
minutes). ``--quick`` is a smoke run of a few seconds; ``--full`` runs every implementation on every case and, unless
``--optimizers`` says otherwise, every optimizer. ``--json``/``--csv`` write
tidy rows with the machine facts; ``--plot`` draws a chart (needs
matplotlib: ``pip install 'fusedoptim[bench]'``).

See :mod:`fusedoptim.bench.harness` for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable, List, Optional, Sequence, TypeVar

from .cases import CASES, DEFAULT_CASES, QUICK_CASES, parse_case
from .precision import (
    DEFAULT_PRECISION_OPTIMIZERS,
    OPTION_NAMES,
    format_precision_table,
    plan,
    run_precision,
    write_precision_markdown,
    write_precision_plot,
)
from .sweep import (
    SweepConfig,
    SweepReport,
    format_sweep_table,
    parse_sizes,
    sweep_config_dict,
    sweep_main,
    write_sweep_csv,
    write_sweep_json,
    write_sweep_markdown,
    write_sweep_plot,
)
from .harness import (
    DTYPES,
    IMPL_ALIASES,
    IMPLEMENTATIONS,
    OPTIMIZERS,
    BenchError,
    Config,
    Report,
    check_plot_available,
    config_dict,
    format_table,
    machine_facts,
    run,
    write_csv,
    write_json,
    write_markdown,
    write_plot,
)

__all__ = ["main", "build_parser", "config_from_args", "run", "Config", "Report", "format_table"]

T = TypeVar("T")

#: Optimizers of a run without ``--optimizers``.
DEFAULT_OPTIMIZERS = ("adam", "sgd")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _list_of(parse: Callable[[str], T], choices: Optional[Sequence[str]] = None) -> Callable[[str], List[T]]:
    """An argparse type for comma-separated values (``all`` = every choice)."""

    def convert(text: str) -> List[T]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if choices is not None and items == ["all"]:
            items = list(choices)
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        out: List[T] = []
        for x in items:
            try:
                value = parse(x)
            except (ValueError, KeyError) as exc:
                raise argparse.ArgumentTypeError(str(exc).strip("'\"")) from None
            if value not in out:
                out.append(value)
        return out

    return convert


def _choice(choices: Sequence[str], what: str) -> Callable[[str], str]:
    def parse(x: str) -> str:
        x = x.lower()
        if x not in choices:
            raise ValueError(f"unknown {what} {x!r}; choose from {', '.join(choices)}")
        return x

    return parse


def _impl(x: str) -> str:
    key = x.lower()
    if key not in IMPL_ALIASES:
        raise ValueError(f"unknown implementation {x!r}; choose from fusedoptim, fused, foreach, for-loop, deepspeed")
    return IMPL_ALIASES[key]


def _threads(x: str) -> int:
    if x.lower() == "all":
        return _usable_cores()
    n = int(x)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    return n


def _sizes(x: str) -> List[int]:
    try:
        return parse_sizes(x)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(x: str) -> int:
    n = int(x)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _nonneg_int(x: str) -> int:
    n = int(x)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line of fusedoptim-bench."""
    cores = _usable_cores()
    p = argparse.ArgumentParser(
        prog=prog or "fusedoptim-bench",
        description=(
            "Time fusedoptim's Adam/AdamW/SGD steps against torch.optim (fused, foreach, for-loop) and against "
            "the memory-bandwidth limit measured in the same run. Progress goes to stderr, one table to stdout."
        ),
        epilog=(
            "cases: " + ", ".join(f"{c.name} ({c.description})" for c in CASES.values())
            + "; or COUNTxSIZE such as 64x256K. Lists are comma-separated; 'all' selects every choice."
        ),
    )
    sel = p.add_argument_group("what to run")
    sel.add_argument("--suite", choices=("default", "precision", "sweep"), default="default",
                     help="default: the optimizers against torch.optim; precision: each precision option "
                     "(master_weights, stochastic_rounding, kahan_summation, state_dtype=bf16, max_grad_norm, state_bits=8) "
                     "against its byte limit, on 1x16M and (state_dtype) 1x128M unless --cases; --impls is ignored; "
                     "sweep: fusedoptim against torch fused=True on one tensor of 2^10 to 2^27 elements and the "
                     "many-tensor cases (--cases), adam, adamw and sgd, timed interleaved, the ratio plotted against "
                     "size (--plot)")
    sel.add_argument("--sizes", type=_sizes, metavar="EXPONENTS",
                     help="sweep: one tensor of 2^E elements for each E, as 10-27 (default) or 10,16,20")
    sel.add_argument("--mode", choices=("loop", "back-to-back"), default="loop",
                     help="default and sweep suites: 'loop' (default) runs torch's work untimed before every timed "
                     "step (the grads rewritten, one parallel op), as backward and the forward's ops come before a "
                     "step in training; the default suite then also times fusedoptim and torch fused back to back "
                     "(the b2b column). 'back-to-back' times steps alone")
    sel.add_argument("--contended", action="store_true",
                     help="sweep: keep one core busy with a spinning process for the whole run")
    sel.add_argument("--options", type=_list_of(_choice(list(OPTION_NAMES), "option"), list(OPTION_NAMES)),
                     metavar="LIST", help=f"precision suite: of {', '.join(OPTION_NAMES)} (default: all; none = "
                     "the plain steps they are compared with)")
    sel.add_argument("--optimizers", "-o", type=_list_of(_choice(list(OPTIMIZERS), "optimizer"), list(OPTIMIZERS)),
                     metavar="LIST", help=f"of {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_OPTIMIZERS)}; "
                     "--full: all)")
    sel.add_argument("--impls", "-i", type=_list_of(_impl, list(IMPLEMENTATIONS)), metavar="LIST",
                     help="of fusedoptim, fused, foreach, for-loop, deepspeed (default: all; deepspeed only when "
                     "importable)")
    sel.add_argument("--cases", "-c", type=_list_of(parse_case, list(CASES)), metavar="LIST",
                     help=f"default: {','.join(DEFAULT_CASES)} (--quick: {','.join(QUICK_CASES)})")
    sel.add_argument("--dtypes", "-d", type=_list_of(_choice(list(DTYPES), "dtype"), list(DTYPES)), metavar="LIST",
                     help="of fp32, bf16 (default: fp32,bf16; --quick: fp32)")
    sel.add_argument("--threads", "-t", type=_list_of(_threads), metavar="LIST",
                     help=f"thread counts, 'all' = {cores} (default: 1,{cores}); sets torch.set_num_threads and "
                     "fusedoptim's num_threads")
    sel.add_argument("--full", action="store_true",
                     help="the full grid: torch for-loop/foreach also on cases >= 64M params (skipped by default, "
                     "~10x slower), and every optimizer unless --optimizers is given (takes tens of minutes)")
    sel.add_argument("--quick", action="store_true",
                     help="smoke run in seconds: small cases, fp32, 1 warm-up and 3 repeats (options given "
                     "explicitly still win)")
    tim = p.add_argument_group("timing")
    tim.add_argument("--warmup", "-w", type=_nonneg_int, metavar="N", help="untimed steps before timing (default: 1; the first step creates the state)")
    tim.add_argument("--repeats", "-r", type=_positive_int, metavar="N",
                     help="timed steps per measurement (default: enough for --min-time, at least 5)")
    tim.add_argument("--min-time", type=float, metavar="S",
                     help="seconds of timed steps per measurement when --repeats is not given (default: 0.25)")
    tim.add_argument("--max-repeats", type=_positive_int, metavar="N", help="cap on automatic repeats (default: 100)")
    tim.add_argument("--max-time", type=float, metavar="S",
                     help="stop timing a measurement after S seconds of timed steps, even below --repeats or 5 "
                     "steps (default: 1, --full: 10; bounds pathologically slow cases)")
    tim.add_argument("--blocks", type=_positive_int, metavar="N",
                     help="blocks each measurement's steps are split into, the implementations alternating "
                     "A B, B A, ... (default: 5; sweep: 9)")
    tim.add_argument("--triad-size", type=_positive_int, metavar="N",
                     help="elements per STREAM triad array (default: 2**25 = 32M)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write rows, machine facts and config as JSON")
    out.add_argument("--csv", metavar="PATH", help="write tidy rows (with machine-fact columns) as CSV")
    out.add_argument("--plot", metavar="PNG", help="draw GB/s per case and implementation with the limit (matplotlib)")
    out.add_argument("--markdown", metavar="PATH",
                     help="write a results page: machine, command, the table, links to the --json/--csv/--plot "
                     "files (relative to the page)")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed arguments: explicit options, then --quick/--full, then defaults."""
    cores = _usable_cores()
    cfg = Config()
    if args.optimizers:
        cfg.optimizers = args.optimizers
    elif args.full:
        cfg.optimizers = list(OPTIMIZERS)
    else:
        cfg.optimizers = list(DEFAULT_OPTIMIZERS)
    cfg.impls = args.impls or list(IMPLEMENTATIONS)
    cfg.cases = args.cases or [CASES[n] for n in (QUICK_CASES if args.quick else DEFAULT_CASES)]
    cfg.dtypes = args.dtypes or (["fp32"] if args.quick else list(DTYPES))
    cfg.threads = args.threads or sorted({1, cores})
    cfg.full = bool(args.full)
    if args.full:
        cfg.max_time = 10.0  # the slow implementations on huge cases get their 5 steps
    if args.quick:
        cfg.warmup, cfg.repeats, cfg.triad_numel = 1, 3, 2**22
    if args.warmup is not None:
        cfg.warmup = args.warmup
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.min_time is not None:
        if args.min_time <= 0:
            raise BenchError("--min-time must be positive")
        cfg.min_time = args.min_time
    if args.max_time is not None:
        if args.max_time <= 0:
            raise BenchError("--max-time must be positive")
        cfg.max_time = args.max_time
    if args.max_repeats is not None:
        cfg.max_repeats = args.max_repeats
    if args.triad_size is not None:
        cfg.triad_numel = args.triad_size
    cfg.mode = args.mode
    if args.blocks is not None:
        cfg.blocks = args.blocks
    elif args.quick:
        cfg.blocks = 3
    return cfg


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of ``fusedoptim-bench``: run, print the table, write the files asked for.

    Returns the process exit status (0 ok, 2 usage error, 130 interrupted).
    """
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.plot:
            check_plot_available()  # before minutes of measuring
    except BenchError as exc:
        parser.error(str(exc))
    if args.suite == "sweep":
        try:
            return _sweep(parser, args, argv, cfg)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    precision = args.suite == "precision"
    grid = None
    if precision:
        if not args.optimizers:
            cfg.optimizers = list(DEFAULT_PRECISION_OPTIMIZERS)
        cases = args.cases or ([parse_case("1x2M")] if args.quick else None)
        grid = plan(cases, cfg.dtypes, args.options)
        if not grid:
            parser.error("the precision suite has nothing to run with these --options/--dtypes")
        cfg.cases = list(dict.fromkeys(c for c, _ in grid))
    report = Report(machine=machine_facts(), config=config_dict(cfg))
    report.config["command"] = " ".join([parser.prog, shlex.join(argv)]).strip()
    if grid is not None:
        report.config["suite"] = "precision"
        report.config["plan"] = [{"case": c.name, "options": [f"{o.name} ({o.dtype})" for o in opts]}
                                 for c, opts in grid]
    progress = None if args.quiet else sys.stderr
    status = 0
    try:
        if grid is not None:
            run_precision(cfg, grid, progress=progress, report=report)
        else:
            run(cfg, progress=progress, report=report)
    except KeyboardInterrupt:
        print("interrupted: printing what was measured", file=sys.stderr)
        status = 130
    if progress is not None:
        print(f"done in {report.wall_s:.0f} s", file=sys.stderr)
    print(format_precision_table(report) if precision else format_table(report))
    writers = (write_json, write_csv, write_precision_plot if precision else write_plot,
               write_precision_markdown if precision else write_markdown)
    return _write_outputs(args, report, *writers) or status


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str], cfg: Config) -> int:
    """``--suite sweep``: see :mod:`fusedoptim.bench.sweep`."""
    sc = SweepConfig(threads=cfg.threads)
    if args.optimizers:
        sc.optimizers = args.optimizers
    if args.dtypes:
        sc.dtypes = args.dtypes
    if args.sizes:
        sc.exponents = args.sizes
    if args.cases is not None:
        sc.cases = [c for c in args.cases if c.num_tensors > 1]
    elif args.quick:
        sc.cases = []
    if args.quick:
        sc.exponents = args.sizes or [10, 16, 20]
        sc.blocks, sc.block_time = 3, 0.005
    if args.blocks:
        sc.blocks = args.blocks
    sc.mode = args.mode
    sc.contended = args.contended
    report = SweepReport(machine=machine_facts(), config=sweep_config_dict(sc))
    report.config["command"] = " ".join([parser.prog, shlex.join(argv)]).strip()
    progress = None if args.quiet else sys.stderr
    status = sweep_main(sc, report, progress)
    if progress is not None:
        print(f"done in {report.wall_s:.0f} s", file=sys.stderr)
    print(format_sweep_table(report))
    return _write_outputs(args, report, write_sweep_json, write_sweep_csv, write_sweep_plot,
                          write_sweep_markdown) or status


def _write_outputs(args: argparse.Namespace, report: Any, write_json_: Callable, write_csv_: Callable,
                   write_plot_: Callable, write_markdown_: Callable) -> int:
    """Write the --json/--csv/--plot/--markdown files asked for and say which; 1 on an error, else 0."""
    written = []
    try:
        for path, write in ((args.json, write_json_), (args.csv, write_csv_), (args.plot, write_plot_)):
            if path:
                write(report, path)
                written.append(path)
        if args.markdown:
            base = os.path.dirname(os.path.abspath(args.markdown))
            files = [os.path.relpath(os.path.abspath(p), base) for p in (args.plot, args.json, args.csv) if p]
            write_markdown_(report, args.markdown, files)
            written.append(args.markdown)
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if written:
        print("wrote " + ", ".join(written), file=sys.stderr)
    return 0
