"""The precision suite (``fusedoptim-bench --suite precision``): each precision option's step against its byte limit.

For every (option, case, threads) it measures:

* **fusedoptim** with the option (``master_weights``, ``stochastic_rounding``,
  ``kahan_summation`` on bf16 params; ``state_dtype=torch.bfloat16`` and
  ``max_grad_norm`` on fp32 params; ``state_bits=8`` on both; ``none`` = the
  plain step of that dtype);
* the comparisons the option is judged by: torch's fused step on the same
  params (plain rows; the ``state_dtype`` rows compare with the plain fp32
  row's torch fused time), and for ``max_grad_norm``
  ``torch.nn.utils.clip_grad_norm_`` followed by torch's fused step, the same
  followed by fusedoptim's plain step, ``_C.grad_norm_sq`` alone (the
  read-only pass over the grads that clipping adds) and ``torch.sum`` over the
  grads (a read-only pass at this machine's read bandwidth, for reference);
* **the limit**: the bytes the option's step must move per param (below),
  timed as :func:`fusedoptim._C.stream_probe` on the same number of
  elements with the same threads. The probe moves one dtype (1-4 read-write
  streams plus one read stream, ``(2 * rw + 1) * size`` bytes per element);
  the shape used is the one whose bytes equal the step's (the params' dtype
  first). Where none does (``max_grad_norm``: the step plus one grad read),
  the probe of the step without the extra bytes runs and its GB/s converts
  the option's bytes to time: limit ms = bytes / probe GB/s. The table says
  which probe each limit comes from.

Bytes per param (P = the param's size, S = a state's size, k = the number of
state tensors: Adam 2, SGD with momentum 1, plain SGD 0):

=====================  ===========================  ==============================
option                 streams                      Adam bf16 / fp32 params
=====================  ===========================  ==============================
none                   p rw, g r, k states rw        14 / 28 (3P + 2kS)
master_weights         master fp32 rw, g r, p w,     28 (2P + 8 + 8k)
                       k fp32 states rw
stochastic_rounding    as none                       14
kahan_summation        as none + comp rw (P)         18 (5P + 2kS)
state_dtype=bf16       states bf16 (S = 2)           20 (fp32 params)
max_grad_norm          the step + one grad read      32 (fp32 params)
state_bits=8           states uint8 codes (S = 1)    10 / 16
=====================  ===========================  ==============================

(``state_bits=8``: the per-block fp32 scales add 2 * 4 / 256 bytes per param,
0.2% of the fp32 step's 16, and are not counted.)

The param of ``master_weights`` is written without being read: with ordinary
stores the CPU reads its cache lines first (write-allocate), so DRAM moves
2 more bytes per param than the 28 counted here.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
from torch import Tensor

import fusedoptim
from fusedoptim import _C

from .cases import CASES, Case, build_tensors
from .harness import (
    DTYPE_CODES,
    DTYPES,
    OPTIMIZERS,
    BenchError,
    Config,
    CpuLoad,
    OptimizerSpec,
    ProbeSamples,
    Report,
    Row,
    Timing,
    _fmt_ms,
    _fmt_result,
    _human,
    _ProbeArena,
    _Progress,
    _thr,
    _time_steps,
    check_plot_available,
    machine_markdown,
    other_cpu_load,
    triad_row,
)

__all__ = [
    "OPTIONS",
    "DEFAULT_PRECISION_OPTIMIZERS",
    "PrecisionOption",
    "plan",
    "run_precision",
    "format_precision_table",
    "write_precision_markdown",
    "write_precision_plot",
    "step_bytes",
    "probe_shape",
]

#: ``max_grad_norm`` of the benchmark: far below the norm of the random grads, so every step clips.
MAX_GRAD_NORM = 1.0

DEFAULT_PRECISION_OPTIMIZERS = ("adam",)

#: Cases at least this large are checked against the speed targets of the precision options.
TARGET_NUMEL = 16 * 2**20


@dataclass(frozen=True)
class PrecisionOption:
    """One option of the suite and the params it runs on."""

    name: str
    dtype: str  # param dtype name
    kwargs: Tuple[Tuple[str, Any], ...]
    references: Tuple[str, ...] = ()  # comparison implementations measured with it

    @property
    def options(self) -> Dict[str, Any]:
        return dict(self.kwargs)


#: Every option, in table order. ``none`` rows are the plain steps the options are compared with.
OPTIONS: Dict[str, PrecisionOption] = {
    o.name + "/" + o.dtype: o
    for o in (
        PrecisionOption("none", "bf16", (), ("torch-fused",)),
        PrecisionOption("master_weights", "bf16", (("master_weights", True),)),
        PrecisionOption("stochastic_rounding", "bf16", (("stochastic_rounding", True),)),
        PrecisionOption("kahan_summation", "bf16", (("kahan_summation", True),)),
        PrecisionOption("none", "fp32", (), ("torch-fused",)),
        PrecisionOption("state_dtype=bf16", "fp32", (("state_dtype", torch.bfloat16),)),
        PrecisionOption("max_grad_norm", "fp32", (("max_grad_norm", MAX_GRAD_NORM),),
                        ("torch-fused+clip", "fusedoptim+clip", "grad-norm", "grad-read")),
        PrecisionOption("state_bits=8", "fp32", (("state_bits", 8),)),
        PrecisionOption("state_bits=8", "bf16", (("state_bits", 8),)),
    )
}
#: Names accepted by ``--options`` (each selects the option on its param dtype; ``none`` the plain rows).
OPTION_NAMES = ("none", "master_weights", "stochastic_rounding", "kahan_summation", "state_dtype", "max_grad_norm",
                "state_bits")

IMPL_LABELS: Dict[str, str] = {
    "limit": "limit",
    "fusedoptim": "fusedoptim",
    "torch-fused": "torch fused",
    "torch-fused+clip": "clip_grad_norm_ + torch fused",
    "fusedoptim+clip": "clip_grad_norm_ + fusedoptim",
    "grad-norm": "_C.grad_norm_sq alone",
    "grad-read": "read grads once (torch.sum)",
}

#: The default grid: every option on 1x16M; on one 2**27-param tensor the plain fp32 step
#: (with torch fused, the comparison of the bf16-states target) and fp32 params with bf16 states.
DEFAULT_PLAN: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("1x16M", tuple(OPTIONS)),
    ("1x128M", ("none/fp32", "state_dtype=bf16/fp32")),
)


def _size(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def step_bytes(spec: OptimizerSpec, option: PrecisionOption) -> int:
    """Bytes per param that one step of ``spec`` with ``option`` must move (see the module's table)."""
    p = _size(option.dtype)
    k = spec.rw_streams - 1  # state tensors
    opts = option.options
    s = _size("bf16") if opts.get("state_dtype") == torch.bfloat16 else p
    if opts.get("state_bits") == 8:
        s = 1  # the codes (the fp32 scales, 8 B per 256 params, are not counted)
    if opts.get("master_weights"):
        return 2 * p + 8 + 8 * k
    base = 3 * p + 2 * k * s
    if opts.get("kahan_summation"):
        base += 2 * p
    if opts.get("max_grad_norm") is not None:
        base += p
    return base


def probe_shape(nbytes: int, param_dtype: str, fallback_bytes: Optional[int] = None) -> Tuple[str, int, bool]:
    """(dtype, read-write streams, exact) of the probe for a step of ``nbytes`` per param.

    Exact when ``(2 * rw + 1) * size == nbytes`` for some rw in 1..4 (the
    param's dtype first). Otherwise the exact shape of ``fallback_bytes`` (the
    step without its extra bytes), else the param dtype's shape closest in
    bytes; the caller converts with the probe's GB/s.
    """
    order = [param_dtype] + [d for d in DTYPES if d != param_dtype]
    for want in (nbytes, fallback_bytes):
        if want is None:
            continue
        for d in order:
            for rw in range(1, 5):
                if (2 * rw + 1) * _size(d) == want:
                    return d, rw, want == nbytes
    es = _size(param_dtype)
    rw = min(range(1, 5), key=lambda r: abs((2 * r + 1) * es - nbytes))
    return param_dtype, rw, False


def plan(cases: Optional[Sequence[Case]], dtypes: Sequence[str], options: Optional[Sequence[str]]
         ) -> List[Tuple[Case, List[PrecisionOption]]]:
    """(case, options) to measure: the default plan, or every selected option on each given case."""
    keys = [k for k, o in OPTIONS.items() if o.dtype in dtypes
            and (options is None or o.name.split("=")[0] in options)]
    if cases is None:
        out = [(CASES[c], [OPTIONS[k] for k in ks if k in keys]) for c, ks in DEFAULT_PLAN]
    else:
        out = [(c, [OPTIONS[k] for k in keys]) for c in cases]
    return [(c, opts) for c, opts in out if opts]


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------


class _Impl:
    """A callable step of one implementation, with its thread setting and its own bytes per param."""

    def __init__(self, step: Callable[[], Any], set_threads: Callable[[int], None], bytes_per_param: int,
                 keep: Any = None) -> None:
        self.step = step
        self.set_threads = set_threads
        self.bytes_per_param = bytes_per_param
        self.keep = keep


def _make_impl(impl: str, spec: OptimizerSpec, option: PrecisionOption, params: List[Tensor],
               option_bytes: int) -> _Impl:
    kw = spec.options
    p = _size(option.dtype)

    def torch_threads(n: int) -> None:
        torch.set_num_threads(n)

    if impl in ("fusedoptim", "fusedoptim+clip"):
        extra = option.options if impl == "fusedoptim" else {}
        opt = getattr(fusedoptim, spec.family)(params, **kw, **extra)

        def fo_threads(n: int) -> None:
            torch.set_num_threads(n)
            opt.num_threads = n

        if impl == "fusedoptim":
            return _Impl(opt.step, fo_threads, option_bytes, opt)
        return _Impl(_with_clip(params, opt), fo_threads, option_bytes - p + 3 * p, opt)
    if impl in ("torch-fused", "torch-fused+clip"):
        opt = getattr(torch.optim, spec.family)(params, fused=True, **kw)
        if impl == "torch-fused":
            return _Impl(opt.step, torch_threads, option_bytes, opt)
        return _Impl(_with_clip(params, opt), torch_threads, option_bytes - p + 3 * p, opt)
    if impl == "grad-norm":
        grads = [q.grad for q in params]
        ptrs = [g.data_ptr() for g in grads]
        numels = [g.numel() for g in grads]
        codes = [DTYPE_CODES[g.dtype] for g in grads]
        state = {"threads": 1}

        def norm() -> None:
            _C.grad_norm_sq(ptrs, numels, codes, state["threads"])

        def norm_threads(n: int) -> None:
            torch.set_num_threads(n)
            state["threads"] = n

        return _Impl(norm, norm_threads, p, grads)
    if impl == "grad-read":
        grads = [q.grad for q in params]

        def read() -> None:
            for g in grads:
                torch.sum(g)

        return _Impl(read, torch_threads, p, grads)
    raise ValueError(f"unknown implementation {impl!r}")


def _with_clip(params: List[Tensor], opt: Any) -> Callable[[], None]:
    clip = torch.nn.utils.clip_grad_norm_

    def step() -> None:
        clip(params, MAX_GRAD_NORM)
        opt.step()

    return step


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """The rows of one (optimizer, option, case, threads)."""

    limit: Optional[Row] = None
    rows: Dict[str, Row] = field(default_factory=dict)


def planned(cfg: Config, grid: List[Tuple[Case, List[PrecisionOption]]]) -> int:
    n = len(cfg.threads)  # triads
    for _case, opts in grid:
        for _ in cfg.optimizers:
            for o in opts:
                n += (2 + len(o.references)) * len(cfg.threads)  # fusedoptim, references, limit
    return n


def run_precision(cfg: Config, grid: List[Tuple[Case, List[PrecisionOption]]], progress: Optional[TextIO] = sys.stderr,
                  report: Optional[Report] = None) -> Report:
    """Measure every (optimizer, case, option) of ``grid``; rows go to ``report`` as they finish."""
    from .harness import config_dict, machine_facts

    t_start = time.perf_counter()
    if report is None:
        report = Report(machine=machine_facts(), config=config_dict(cfg))
    prog = _Progress(planned(cfg, grid), progress)
    busy = other_cpu_load()
    report.machine["other_cpu_load_at_start_pct"] = None if busy is None else round(busy, 1)
    if busy is not None and busy > 10 and progress is not None:
        print(f"warning: other processes are using {busy:.0f}% of the CPUs: timings will be off", file=progress,
              flush=True)
    load = CpuLoad()
    load.start()
    saved_threads = torch.get_num_threads()
    try:
        for threads in cfg.threads:
            row = triad_row(cfg, threads)
            report.triad.append(row)
            prog(f"STREAM triad fp32 {_human(cfg.triad_numel)} {_thr(threads)}", f"{row.gb_per_s:6.1f} GB/s")
        biggest = max((c.numel for c, _ in grid), default=0)
        arena = _ProbeArena(4, biggest * 4, biggest * 4)  # untouched pages cost nothing
        for case, opts in grid:
            for dtype_name in [d for d in DTYPES if any(o.dtype == d for o in opts)]:
                params = build_tensors(case, DTYPES[dtype_name], cfg.seed)
                try:
                    for opt_name in cfg.optimizers:
                        for option in [o for o in opts if o.dtype == dtype_name]:
                            _run_option(cfg, OPTIMIZERS[opt_name], option, case, params, arena, report, prog)
                finally:
                    del params
                    gc.collect()
        del arena
        _compare(report)
        report.complete = True
    finally:
        torch.set_num_threads(saved_threads)
        report.wall_s = time.perf_counter() - t_start
        during = load.stop()
        report.machine["other_cpu_load_during_run_pct"] = None if during is None else round(during, 1)
    return report


def _run_option(cfg: Config, spec: OptimizerSpec, option: PrecisionOption, case: Case, params: List[Tensor],
                arena: _ProbeArena, report: Report, prog: _Progress) -> None:
    nbytes = step_bytes(spec, option)
    p = _size(option.dtype)
    fallback = nbytes - p if option.options.get("max_grad_norm") is not None else None
    pdtype, rw, exact = probe_shape(nbytes, option.dtype, fallback)
    probe_bytes = (2 * rw + 1) * _size(pdtype)
    single = case.num_tensors == 1
    grad0 = params[0].grad
    read = grad0.view(-1) if single and pdtype == option.dtype and grad0 is not None else None
    probe = arena.probe(case.numel, DTYPES[pdtype], read)
    how = f"stream_probe {pdtype} {rw} rw + 1 read ({probe_bytes} B/param)"
    if not exact:
        how += f", converted to {nbytes} B/param at its GB/s"
    if not single:
        how += ", on one tensor of the same total size"
    label = f"{spec.name} {option.name} {case.name} {option.dtype}"
    samples: Dict[int, ProbeSamples] = {t: ProbeSamples() for t in cfg.threads}
    rows: List[Row] = []
    saved_grads: Optional[List[Tensor]] = None
    for impl in ("fusedoptim",) + option.references:
        if impl.endswith("+clip") and saved_grads is None:
            saved_grads = [q.grad.clone() for q in params]  # clip_grad_norm_ scales the shared grads
        try:
            try:
                runner = _make_impl(impl, spec, option, params, nbytes)
                runner.set_threads(cfg.threads[0])
                runner.step()  # the first step creates the state: never timed
            except Exception as exc:  # noqa: BLE001 - an implementation that fails is reported and skipped
                report.skipped.append(dict(optimizer=spec.name, option=option.name, implementation=impl,
                                           case=case.name, dtype=option.dtype, reason=f"{type(exc).__name__}: {exc}"))
                for threads in cfg.threads:
                    prog(f"{label} {impl} {_thr(threads)}", f"failed: {type(exc).__name__}: {exc}")
                continue
            for threads in cfg.threads:
                samples[threads] += probe.block(cfg, rw, threads)
                runner.set_threads(threads)
                t = _time_steps(cfg, runner.step)
                row = _prow(spec.name, option, impl, case, threads, t, runner.bytes_per_param * case.numel, t.note)
                rows.append(row)
                prog(f"{label} {impl} {_thr(threads)}", _fmt_result(row))
            del runner
        finally:
            if saved_grads is not None and impl.endswith("+clip"):
                for q, g in zip(params, saved_grads):
                    q.grad.copy_(g)
            gc.collect()
    limits = []
    for threads in cfg.threads:
        samples[threads] += probe.block(cfg, rw, threads)
        kind, best = samples[threads].best()
        t = Timing([s * nbytes / probe_bytes for s in best])
        limit = _prow(spec.name, option, "limit", case, threads, t, nbytes * case.numel, how)
        limit.probe = kind
        limit.pct_of_limit = 100.0
        limits.append(limit)
        for r in rows:
            if r.threads == threads and r.bytes_per_step == limit.bytes_per_step:
                r.pct_of_limit = 100.0 * limit.median_ms / r.median_ms
        prog(f"{label} limit {_thr(threads)}", _fmt_result(limit) + f" ({how})")
    report.rows += limits + rows
    del probe


def _prow(opt: str, option: PrecisionOption, impl: str, case: Case, threads: int, t: Timing, nbytes: int,
          note: str = "") -> Row:
    q1, q3 = t.quartiles
    med = t.median
    return Row(optimizer=opt, implementation=impl, case=case.name, dtype=option.dtype, threads=threads,
               tensors=case.num_tensors, numel=case.numel, median_ms=med * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
               repeats=len(t.samples), bytes_per_step=nbytes, gb_per_s=nbytes / med / 1e9, note=note,
               option=option.name)


def _find(report: Report, **want: Any) -> Optional[Row]:
    for r in report.rows:
        if all(getattr(r, k) == v for k, v in want.items()):
            return r
    return None


def _compare(report: Report) -> None:
    """Speed-ups vs torch fused, and the speed targets, as ``report.comparisons``."""
    comps: List[Dict[str, Any]] = []
    for r in report.rows:
        if r.implementation != "fusedoptim":
            continue
        key = dict(optimizer=r.optimizer, case=r.case, threads=r.threads)
        fused = _find(report, option="none", implementation="torch-fused", dtype=r.dtype, **key)
        if fused is not None:
            r.speedup_vs_torch_fused = fused.median_ms / r.median_ms
        if r.numel < TARGET_NUMEL:
            continue  # the targets are for the large cases; small ones live in the caches
        what = f"{r.optimizer} {r.option} {r.dtype} {r.case} {_thr(r.threads)}"
        if r.option != "none" and r.pct_of_limit is not None:
            comps.append(dict(what=what, measure="% of its byte limit", value=round(r.pct_of_limit, 1), target=">= 90",
                              met=r.pct_of_limit >= 90))
        if r.option == "state_dtype=bf16" and fused is not None:
            comps.append(dict(what=what, measure="speed-up vs torch fused fp32 (fp32 states)",
                              value=round(fused.median_ms / r.median_ms, 2), target=">= 1.3",
                              met=fused.median_ms / r.median_ms >= 1.3))
        if r.option == "state_bits=8" and r.dtype == "fp32" and fused is not None:
            comps.append(dict(what=what, measure="speed-up vs torch fused fp32 (fp32 states)",
                              value=round(fused.median_ms / r.median_ms, 2), target=">= 1.5",
                              met=fused.median_ms / r.median_ms >= 1.5))
        if r.option == "max_grad_norm":
            plain = _find(report, option="none", implementation="fusedoptim", dtype=r.dtype, **key)
            limit = _find(report, option="max_grad_norm", implementation="limit", dtype=r.dtype, **key)
            norm = _find(report, option="max_grad_norm", implementation="grad-norm", dtype=r.dtype, **key)
            read = _find(report, option="max_grad_norm", implementation="grad-read", dtype=r.dtype, **key)
            if plain is not None and limit is not None:
                read_ms = limit.median_ms * _size(r.dtype) / (limit.bytes_per_step / limit.numel)
                extra = r.median_ms - plain.median_ms
                comps.append(dict(
                    what=what, measure="extra ms over the plain step / one grad read at the limit's GB/s",
                    value=round(extra / read_ms, 2), target="<= 1", met=extra <= read_ms,
                    detail=f"{extra:.2f} ms extra vs {read_ms:.2f} ms"
                    + (f"; grad_norm_sq alone {norm.median_ms:.2f} ms ({norm.gb_per_s:.1f} GB/s)" if norm else "")
                    + (f"; a read-only pass over the grads (torch.sum) {read.median_ms:.2f} ms "
                       f"({read.gb_per_s:.1f} GB/s): extra / that = {extra / read.median_ms:.2f}" if read else "")))
            for ref in ("torch-fused+clip", "fusedoptim+clip"):
                other = _find(report, option="max_grad_norm", implementation=ref, dtype=r.dtype, **key)
                if other is not None:
                    comps.append(dict(what=what, measure=f"speed-up vs {IMPL_LABELS[ref]}",
                                      value=round(other.median_ms / r.median_ms, 2), target="> 1",
                                      met=other.median_ms > r.median_ms))
    report.comparisons = comps


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def format_precision_table(report: Report) -> str:
    """One line per measurement, grouped by (optimizer, option, case); the targets below."""
    head = ["optimizer", "option", "params", "case", "thr", "implementation", "B/param", "ms", "q1-q3",
            "GB/s", "%lim", "vs fused"]
    body: List[List[str]] = []
    seps: List[int] = []
    last = None
    for r in report.rows:
        key = (r.optimizer, r.option, r.dtype, r.case)
        if last is not None and key != last:
            seps.append(len(body))
        last = key
        body.append([
            r.optimizer, r.option, r.dtype, r.case, str(r.threads), IMPL_LABELS.get(r.implementation, r.implementation),
            f"{r.bytes_per_step / r.numel:.0f}", _fmt_ms(r.median_ms) + ("~" if r.note and r.implementation != "limit"
                                                                          else ""),
            f"{_fmt_ms(r.q1_ms)}-{_fmt_ms(r.q3_ms)}", f"{r.gb_per_s:.1f}",
            "-" if r.pct_of_limit is None else f"{r.pct_of_limit:.0f}%",
            "-" if r.speedup_vs_torch_fused is None else f"{r.speedup_vs_torch_fused:.2f}x",
        ])
    widths = [max(len(x[c]) for x in [head] + body) for c in range(len(head))]
    right = {4, 6, 7, 8, 9, 10, 11}

    def fmt(cells: List[str]) -> str:
        return "  ".join(c.rjust(w) if k in right else c.ljust(w)
                         for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(fmt(head))
    lines = [rule, fmt(head), rule]
    for n, line in enumerate(body):
        if n in seps:
            lines.append("")
        lines.append(fmt(line))
    lines.append(rule)
    m = report.machine
    probes = sorted({r.note for r in report.rows if r.implementation == "limit"})
    notes = [
        f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m.get('memory_gib')} GiB, "
        f"fusedoptim {m['fusedoptim_version']} ({m['isa']}), torch {m['torch_version']}, {m['date']}",
        "B/param = bytes the step must move per param (read + written, each stream once); GB/s = those bytes / "
        "median time; %lim = limit time / time (rows moving the option's bytes).",
        "limit = fusedoptim._C.stream_probe (x += read over read-write streams of one dtype + one read stream, the "
        "faster of its plain and non-temporal stores, same "
        "threads) on the same number of elements; probe shapes used: " + "; ".join(probes) + ".",
        "vs fused = torch fused time of the plain step on the same params and threads / this row's time "
        "(state_dtype=bf16: vs torch fused with fp32 states).",
        f"max_grad_norm = {MAX_GRAD_NORM:g} (every step clips); clip_grad_norm_ rows also read the grads and scale "
        "them in place (3 more grad accesses per param).",
    ]
    triad = ", ".join(f"{_thr(r.threads)} {r.gb_per_s:.1f} GB/s" for r in report.triad)
    if triad:
        notes.append(f"STREAM triad (fp32, {report.triad[0].case.split()[-1]} elements): {triad}.")
    during = m.get("other_cpu_load_during_run_pct")
    if during is not None:
        notes.append(f"Other processes used {during:.0f}% of the CPUs' time during the run"
                     + (" (timings disturbed; rerun on an idle machine)." if during > 10 else "."))
    if report.skipped:
        notes.append("Failed: " + "; ".join(f"{s['option']} {s['implementation']} {s['case']}: {s['reason']}"
                                            for s in report.skipped))
    comps = getattr(report, "comparisons", [])
    if comps:
        notes += ["", "Targets (cases of 16M+ params):"]
        for c in comps:
            notes.append(f"  {'met   ' if c['met'] else 'MISSED'} {c['what']}: {c['measure']} = {c['value']} "
                         f"(target {c['target']})" + (f"; {c['detail']}" if c.get("detail") else ""))
    if not report.complete:
        notes.append("(interrupted: partial results)")
    return "\n".join(lines + notes)


def write_precision_markdown(report: Report, path: str, files: Sequence[str] = ()) -> None:
    """A results page: machine, command, the table and targets, links to ``files``."""
    cfg = report.config
    out = ["# fusedoptim precision options: speed", "",
           f"Command: `{cfg.get('command', 'fusedoptim-bench --suite precision')}` ({report.wall_s:.0f} s of measuring"
           + ("" if report.complete else ", interrupted") + ").", ""]
    out += machine_markdown(report.machine) + [""]
    for png in [f for f in files if f.endswith(".png")]:
        out += [f"![precision options: GB/s against the byte limit]({png})", ""]
    out += ["```", format_precision_table(report), "```", ""]
    data = [f for f in files if not f.endswith(".png")]
    if data:
        out += ["Tidy rows: " + ", ".join(f"[{f}]({f})" for f in data) + ".", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_precision_plot(report: Report, path: str) -> None:
    """GB/s of fusedoptim per option with the limit as a black line, one panel per thread count."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fo = [r for r in report.rows if r.implementation == "fusedoptim"]
    if not fo:
        raise BenchError("nothing to plot: no fusedoptim rows")
    threads = sorted({r.threads for r in fo})
    labels = list(dict.fromkeys(f"{r.optimizer} {r.option}\n{r.dtype} {r.case}" for r in fo))
    fig, axes = plt.subplots(1, len(threads), figsize=(max(6.0, 1.1 * len(labels)) * len(threads) / 1.4, 4.2),
                             squeeze=False)
    for ax, th in zip(axes[0], threads):
        for i, lab in enumerate(labels):
            r = next((x for x in fo
                      if x.threads == th and f"{x.optimizer} {x.option}\n{x.dtype} {x.case}" == lab), None)
            if r is None:
                continue
            lim = _find(report, optimizer=r.optimizer, option=r.option, dtype=r.dtype, case=r.case, threads=th,
                        implementation="limit")
            ax.bar(i, r.gb_per_s, width=0.6, color="#d62728" if r.option != "none" else "#f4a3a3", zorder=2)
            if lim is not None:
                ax.hlines(lim.gb_per_s, i - 0.4, i + 0.4, colors="black", linewidth=2.2, zorder=3)
            if r.pct_of_limit is not None:
                ax.annotate(f"{r.pct_of_limit:.0f}%", (i, r.gb_per_s), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("GB/s (bytes the step must move / time)")
        ax.set_title(_thr(th), fontsize=10)
        ax.grid(axis="y", color="0.9", zorder=0)
        ax.set_axisbelow(True)
    m = report.machine
    fig.suptitle(f"Precision options: fusedoptim step bandwidth and its byte limit\n{m['cpu_model']}, "
                 f"{m['usable_cores']} cores, fusedoptim {m['fusedoptim_version']} ({m['isa']})", fontsize=10)
    fig.legend(handles=[Patch(color="#d62728", label="fusedoptim, option on"),
                        Patch(color="#f4a3a3", label="fusedoptim, plain step"),
                        Line2D([], [], color="black", linewidth=2.2, label="limit (stream probe, same bytes)")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.92))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
