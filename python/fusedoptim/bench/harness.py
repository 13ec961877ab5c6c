"""Timing, the memory-bandwidth limit, result rows, machine facts and output.

What one run measures, for every (case, dtype) and optimizer:

* each implementation (fusedoptim, torch.optim's fused, foreach and for-loop
  steps, DeepSpeed's CPU Adam when importable) at each thread count: one
  untimed first step per optimizer (it creates the state), warm-up steps at
  each thread count, then the median (and quartiles) of many timed
  ``step()`` calls, the implementations side by side in alternating blocks
  (:func:`time_interleaved`); in the loop mode torch's work
  (:class:`LoopWork`) runs untimed before every step, and fusedoptim and
  torch fused are timed back to back as well;
* **the limit**: :func:`fusedoptim._C.stream_probe`, which does ``x += read``
  over the same number of read-write streams as the optimizer plus one read
  stream (the grad), with the same ISA and thread split, on the same number
  of elements (for a many-tensor case: one tensor of the same total size).
  It moves exactly the bytes of a step. Its timed repeats are taken in a
  block before the implementations' blocks and one after them, so that drift
  of a shared machine hits the limit and the optimizers alike;
* once per thread count, STREAM triad (``a = b + s * c``, fp32) for reference.

GB/s is the bytes a step must move (each stream read once, each read-write
stream written once) divided by the median time; "% of limit" compares it
with the probe's GB/s on the same case, dtype and thread count.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
from torch import Tensor

import fusedoptim
from fusedoptim import _C, _torch_compat

from .cases import Case, build_tensors

__all__ = [
    "BenchError",
    "Config",
    "OptimizerSpec",
    "OPTIMIZERS",
    "IMPLEMENTATIONS",
    "Row",
    "Report",
    "run",
    "machine_facts",
    "format_table",
    "write_json",
    "write_csv",
    "write_plot",
    "write_markdown",
    "machine_markdown",
]


class BenchError(Exception):
    """A usage or environment error reported to the user without a traceback."""


class Unsupported(Exception):
    """An implementation that cannot run a given optimizer/dtype."""


# --------------------------------------------------------------------------------------------
# optimizers and implementations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer configuration and the memory streams its step touches."""

    name: str
    family: str  # "Adam", "AdamW" or "SGD": the class name in torch.optim and fusedoptim
    kwargs: Tuple[Tuple[str, Any], ...]
    rw_streams: int  # param and state tensors, each read and written once per step
    description: str

    def bytes_per_param(self, elem_size: int) -> int:
        """Bytes a step moves per param: each rw stream read and written, the grad read."""
        return (2 * self.rw_streams + 1) * elem_size

    @property
    def options(self) -> Dict[str, Any]:
        return dict(self.kwargs)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("adam", "Adam", (("lr", 1e-3),), 3, "Adam(lr=1e-3)"),
        OptimizerSpec("adamw", "AdamW", (("lr", 1e-3), ("weight_decay", 1e-2)), 3, "AdamW(lr=1e-3, weight_decay=1e-2)"),
        OptimizerSpec("sgd", "SGD", (("lr", 1e-2), ("momentum", 0.9)), 2, "SGD(lr=1e-2, momentum=0.9)"),
        OptimizerSpec(
            "sgd-nesterov", "SGD", (("lr", 1e-2), ("momentum", 0.9), ("nesterov", True)), 2,
            "SGD(lr=1e-2, momentum=0.9, nesterov=True)",
        ),
        OptimizerSpec("sgd-plain", "SGD", (("lr", 1e-2),), 1, "SGD(lr=1e-2), no momentum"),
    )
}

#: Implementation id -> label used in tables and charts, in display order.
IMPLEMENTATIONS: Dict[str, str] = {
    "fusedoptim": "fusedoptim",
    "torch-fused": "torch fused",
    "torch-foreach": "torch foreach",
    "torch-forloop": "torch for-loop",
    "deepspeed": "DeepSpeed",
}
#: Names accepted by ``--impls``.
IMPL_ALIASES: Dict[str, str] = {
    "fusedoptim": "fusedoptim",
    "fo": "fusedoptim",
    "fused": "torch-fused",
    "torch-fused": "torch-fused",
    "foreach": "torch-foreach",
    "torch-foreach": "torch-foreach",
    "for-loop": "torch-forloop",
    "forloop": "torch-forloop",
    "loop": "torch-forloop",
    "torch-forloop": "torch-forloop",
    "deepspeed": "deepspeed",
}
#: Implementations skipped on huge cases unless ``full``.
SLOW_IMPLS = ("torch-foreach", "torch-forloop")

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: _C.DTYPE_FLOAT32, torch.bfloat16: _C.DTYPE_BFLOAT16}


def deepspeed_available() -> bool:
    """Whether DeepSpeed's CPU Adam can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def make_optimizer(spec: OptimizerSpec, impl: str, params: List[Tensor]) -> Any:
    """A fresh optimizer for ``params``; raises :class:`Unsupported` if ``impl`` can't run ``spec``."""
    kw = spec.options
    if impl == "fusedoptim":
        return getattr(fusedoptim, spec.family)(params, **kw)
    torch_cls = getattr(torch.optim, spec.family)
    if impl == "torch-fused":
        try:
            return torch_cls(params, fused=True, **kw)
        except (TypeError, RuntimeError) as e:  # SGD before torch 2.3, CPU params before 2.4
            raise Unsupported(f"torch {torch.__version__} has no fused=True {spec.family} for these params ({e})") \
                from None
    if impl == "torch-foreach":
        return torch_cls(params, foreach=True, **kw)
    if impl == "torch-forloop":
        return torch_cls(params, foreach=False, **kw)
    if impl == "deepspeed":
        if spec.family not in ("Adam", "AdamW"):
            raise Unsupported("DeepSpeed's CPU optimizer is Adam only")
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            raise Unsupported(f"DeepSpeedCPUAdam not importable: {exc}") from None
        try:
            return DeepSpeedCPUAdam(
                params, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0), adamw_mode=spec.family == "AdamW"
            )
        except Exception as exc:  # noqa: BLE001
            raise Unsupported(f"DeepSpeedCPUAdam: {exc}") from None
    raise ValueError(f"unknown implementation {impl!r}")


_FUSED_CHECKED: Dict[Tuple[str, str], str] = {}


def torch_fused_wrong(spec: OptimizerSpec, dtype_name: str) -> str:
    """Why torch's ``fused=True`` CPU step of ``spec`` on ``dtype_name`` params is no fair
    target, or "" when it is one.

    Two steps of torch's fused and for-loop steps on the same 1000 params: where
    more than a tenth of the params the for-loop moves end farther than a
    tenth of their update from the for-loop's, the fused step does less than
    the step it is timed against. (torch 2.12-2.13's fused SGD leaves bf16 and
    fp16 params of whole vectors unchanged on the CPU, pytorch/pytorch#191763:
    it writes 4 of the 5 streams of a correct step.) Checked once per
    (optimizer, dtype) and run.
    """
    key = (spec.name, dtype_name)
    if key in _FUSED_CHECKED:
        return _FUSED_CHECKED[key]
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    # Params near 0.01: two updates span many ulps even in bf16, so a step
    # that rounds otherwise stays within a tenth of the update.
    p0 = ((torch.rand(1000, generator=g) + 0.5) * 0.01).to(dtype)
    grad = (torch.rand(1000, generator=g) - 0.5).to(dtype)
    out = {}
    for impl in ("torch-fused", "torch-forloop"):
        p = p0.clone().requires_grad_()
        p.grad = grad.clone()
        try:
            opt = make_optimizer(spec, impl, [p])
            opt.step()
            opt.step()
        except Unsupported:
            _FUSED_CHECKED[key] = ""
            return ""
        out[impl] = p.detach().float()
    start = p0.float()
    moved = (out["torch-forloop"] - start).abs()
    off = (out["torch-fused"] - out["torch-forloop"]).abs() > 0.1 * moved
    why = ""
    # A few params off (a step computed at another precision, rounding to the
    # other side in bf16) is a fair step; a tenth of them is not.
    if int(off.sum()) > 0.1 * int((moved > 0).sum()):
        what = f"torch {torch.__version__} fused=True {spec.family} on CPU {dtype_name} params"
        still = int((off & (out["torch-fused"] == start)).sum())
        if still:
            why = (f"{what} leaves {still} of the {int((moved > 0).sum())} params its for-loop step moves (of "
                   f"1000) unchanged (pytorch/pytorch#191763)")
        else:
            why = f"{what} puts {int(off.sum())} of 1000 params off its for-loop step"
    _FUSED_CHECKED[key] = why
    return why


def set_threads(opt: Any, impl: str, threads: int) -> None:
    """torch's intra-op threads, and fusedoptim's own ``num_threads``."""
    torch.set_num_threads(threads)
    if impl == "fusedoptim":
        opt.num_threads = threads


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of a timed function."""

    samples: List[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> Tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


@dataclass
class Config:
    """What to run. ``repeats=None`` picks repeats per measurement from ``min_time``."""

    optimizers: List[str] = field(default_factory=lambda: ["adam", "sgd"])
    impls: List[str] = field(default_factory=lambda: list(IMPLEMENTATIONS))
    cases: List[Case] = field(default_factory=list)
    dtypes: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    threads: List[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: Optional[int] = None
    min_time: float = 0.25
    min_repeats: int = 5
    max_repeats: int = 100
    max_time: float = 1.0
    full: bool = False
    triad_numel: int = 2**25
    seed: int = 0
    mode: str = "loop"  # "loop": torch's work before every timed step; "back-to-back": steps alone
    blocks: int = 5  # interleaved blocks per measurement


def time_calls(fn: Callable[[], Any], warmup: int, repeats: Optional[int], min_repeats: int = 5,
               min_time: float = 0.25, max_repeats: int = 100, max_time: float = math.inf) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then time it, with the GC off.

    ``repeats`` timed calls if given; else at least ``min_repeats`` and until
    ``min_time`` seconds of timed calls or ``max_repeats`` calls. Either way
    timing stops once ``max_time`` seconds of timed calls are reached (after
    at least one call), and a last warm-up call slower than ``max_time`` is
    the only sample: that bounds a pathologically slow implementation. Such
    cut measurements say so in :attr:`Timing.note`.
    """
    gc_was = gc.isenabled()
    gc.disable()
    try:
        last = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
        if warmup and last >= max_time:
            return Timing([last], note=f"one warm-up step only: slower than --max-time {max_time:g} s")
        samples: List[float] = []
        total = 0.0
        wanted = repeats if repeats is not None else min_repeats
        while True:
            if samples and total >= max_time:
                break
            if repeats is not None:
                if len(samples) >= repeats:
                    break
            elif len(samples) >= max_repeats or (len(samples) >= min_repeats and total >= min_time):
                break
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            samples.append(dt)
            total += dt
        note = "" if len(samples) >= wanted else f"{len(samples)} steps: stopped at --max-time {max_time:g} s"
        return Timing(samples, note=note)
    finally:
        if gc_was:
            gc.enable()


def _time_steps(cfg: Config, fn: Callable[[], Any]) -> Timing:
    return time_calls(fn, cfg.warmup, cfg.repeats, cfg.min_repeats, cfg.min_time, cfg.max_repeats, cfg.max_time)


class LoopWork:
    """torch's work before a step in training, run untimed before every timed step of the loop mode.

    The grads are rewritten by a torch op (as backward writes them) and torch
    runs one parallel op on a 1M-element tensor (as the forward's ops run):
    the step then starts where torch's OpenMP workers have just been busy and
    the grads are as warm in cache as after a backward.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.grads = [p.grad for p in params if p.grad is not None]
        self.a = torch.rand(1 << 20)
        self.out = torch.empty_like(self.a)

    def __call__(self) -> None:
        _torch_compat.foreach_mul_(self.grads, 1.0)
        torch.mul(self.a, 1.0001, out=self.out)


def time_interleaved(cfg: Config, steps: Dict[str, Callable[[], Any]],
                     before: Optional[Callable[[], Any]] = None) -> Dict[str, Timing]:
    """Time several step functions side by side: ``cfg.blocks`` blocks alternating A B C, C B A, ...

    Each function first runs ``cfg.warmup`` untimed steps (at least one: it
    sizes the blocks); a block gives each
    about ``min_time / blocks`` seconds of steps (``repeats / blocks`` steps
    when ``cfg.repeats`` is set), and a function stops taking part once its
    timed steps reach ``max_time`` seconds. ``before`` runs untimed before
    every step. Drift of a shared machine then hits every function alike.
    """
    names = list(steps)
    est: Dict[str, float] = {}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for n in names:
            dt = 0.0
            for _ in range(max(cfg.warmup, 1)):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                steps[n]()
                dt = time.perf_counter() - t0
            est[n] = dt
        blocks = max(1, cfg.blocks)
        per_block: Dict[str, int] = {}
        for n in names:
            if cfg.repeats is not None:
                per_block[n] = max(1, math.ceil(cfg.repeats / blocks))
            else:
                want = max(cfg.min_repeats, min(cfg.max_repeats, math.ceil(cfg.min_time / max(est[n], 1e-9))))
                per_block[n] = max(1, math.ceil(want / blocks))
        samples: Dict[str, List[float]] = {n: [] for n in names}
        spent = {n: 0.0 for n in names}
        for b in range(blocks):
            for n in (names if b % 2 == 0 else names[::-1]):
                for _ in range(per_block[n]):
                    if samples[n] and spent[n] >= cfg.max_time:
                        break
                    if before is not None:
                        before()
                    t0 = time.perf_counter()
                    steps[n]()
                    dt = time.perf_counter() - t0
                    samples[n].append(dt)
                    spent[n] += dt
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for n in names:
        wanted = per_block[n] * blocks
        note = "" if len(samples[n]) >= min(wanted, cfg.min_repeats) else (
            f"{len(samples[n])} steps: stopped at --max-time {cfg.max_time:g} s")
        out[n] = Timing(samples[n], note=note)
    return out


#: A measurement is trusted when its interquartile range is at most this
#: fraction of its median and it has at least ``TRUST_MIN_SAMPLES`` steps.
TRUST_SPREAD = 0.25
TRUST_MIN_SAMPLES = 5


def trusted(t: "Row") -> bool:
    """Whether a row's median is steady enough to compare with another's."""
    return t.repeats >= TRUST_MIN_SAMPLES and (t.q3_ms - t.q1_ms) <= TRUST_SPREAD * t.median_ms


class _ProbeArena:
    """The probe's buffers, allocated once per run at the largest size it needs.

    Every (case, dtype) takes zeroed views of them, so the run pays the page
    faults of the probe's gigabytes once rather than at every case.
    """

    def __init__(self, streams: int, stream_bytes: int, read_bytes: int) -> None:
        self.rw = [torch.empty(stream_bytes, dtype=torch.uint8) for _ in range(streams)]
        self.read = torch.empty(read_bytes, dtype=torch.uint8) if read_bytes else None

    @staticmethod
    def _view(buf: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return buf[:nbytes].view(dtype)

    def probe(self, numel: int, dtype: torch.dtype, grad: Optional[Tensor]) -> "_Probe":
        """Zeroed read-write streams; ``grad`` (a one-tensor case's grad) or a filled buffer as the read stream."""
        rw = [self._view(b, numel, dtype).zero_() for b in self.rw]
        if grad is None:
            assert self.read is not None
            grad = self._view(self.read, numel, dtype).fill_(0.01)
        return _Probe(numel, dtype, rw, grad)


class _Probe:
    """:func:`fusedoptim._C.stream_probe` on one (case, dtype)."""

    def __init__(self, numel: int, dtype: torch.dtype, rw: List[Tensor], read: Tensor) -> None:
        self.numel = numel
        self.code = DTYPE_CODES[dtype]
        self.rw = rw
        self.read = read
        self.rw_ptrs = [t.data_ptr() for t in rw]
        self.warm: set = set()

    def call(self, streams: int, threads: int, nontemporal: bool = False) -> None:
        _C.stream_probe(self.rw_ptrs[:streams], self.read.data_ptr(), self.numel, self.code, threads,
                        nontemporal=nontemporal)

    def block(self, cfg: Config, streams: int, threads: int) -> "ProbeSamples":
        """One block of timed calls of each probe (streaming stores, then plain
        stores): each a third of ``min_time``, at least 2 calls.

        The first block at a (streams, threads) pair warms up with one call.
        """
        torch.set_num_threads(threads)
        key = (streams, threads)
        warmup = 0 if key in self.warm else 1
        self.warm.add(key)
        repeats = None if cfg.repeats is None else max(1, math.ceil(cfg.repeats / 2))
        out = ProbeSamples()
        for kind, nt in PROBE_KINDS.items():
            # Streaming stores leave the streams out of the cache: the plain probe, which
            # runs after them, warms up with one untimed call as it did when it ran alone.
            t = time_calls(lambda: self.call(streams, threads, nt), warmup if nt else 1, repeats, 2,
                           cfg.min_time / 3, cfg.max_repeats, cfg.max_time)
            out.samples[kind] = t.samples
        return out


#: The probes whose best is the limit: the step's streams written with plain
#: stores, or with streaming (non-temporal) stores, which skip the cache's
#: write-back on some machines and are far slower on others.
PROBE_KINDS: Dict[str, bool] = {"non-temporal": True, "plain": False}


@dataclass
class ProbeSamples:
    """Seconds per probe call, per probe kind, over the blocks of one limit."""

    samples: Dict[str, List[float]] = field(default_factory=dict)

    def __iadd__(self, other: "ProbeSamples") -> "ProbeSamples":
        for kind, xs in other.samples.items():
            self.samples.setdefault(kind, []).extend(xs)
        return self

    def best(self) -> Tuple[str, List[float]]:
        """The kind with the lowest median time (the highest bandwidth), and its samples."""
        return min(self.samples.items(), key=lambda kv: statistics.median(kv[1]))


def measure_triad(cfg: Config, threads: int) -> Timing:
    """STREAM triad over three fp32 arrays of ``cfg.triad_numel`` elements."""
    n = cfg.triad_numel
    a, b, c = torch.zeros(n), torch.full((n,), 1.0), torch.full((n,), 2.0)
    torch.set_num_threads(threads)
    pa, pb, pc = a.data_ptr(), b.data_ptr(), c.data_ptr()
    return time_calls(lambda: _C.triad(pa, pb, pc, 3.0, n, threads), max(cfg.warmup, 1), cfg.repeats,
                      cfg.min_repeats, cfg.min_time, cfg.max_repeats, cfg.max_time)


# --------------------------------------------------------------------------------------------
# rows and the run
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One tidy result: an implementation (or the limit) on one case, dtype and thread count."""

    optimizer: str
    implementation: str
    case: str
    dtype: str
    threads: int
    tensors: int
    numel: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    bytes_per_step: int
    gb_per_s: float
    pct_of_limit: Optional[float] = None
    speedup_vs_torch_fused: Optional[float] = None
    note: str = ""
    option: str = ""  # precision option of the precision suite ("" in the default suite)
    mode: str = "back-to-back"  # "loop": torch's work ran before every timed step
    speedup_back_to_back: Optional[float] = None  # torch fused / fusedoptim, both timed back to back
    comparable: Optional[bool] = None  # both medians of the speedup were steady (see trusted())
    torch_fused_wrong: str = ""  # why torch's fused step is no fair target here (torch_fused_wrong())
    probe: str = ""  # limit rows: the probe kind that was fastest (PROBE_KINDS)


@dataclass
class Report:
    """Everything one run produced."""

    machine: Dict[str, Any]
    config: Dict[str, Any]
    rows: List[Row] = field(default_factory=list)
    triad: List[Row] = field(default_factory=list)
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    complete: bool = False
    comparisons: List[Dict[str, Any]] = field(default_factory=list)  # targets checked (precision suite)



def triad_row(cfg: "Config", threads: int) -> "Row":
    """The STREAM triad's row: fp32 a = b + s*c over cfg.triad_numel elements."""
    t = measure_triad(cfg, threads)
    nbytes = 3 * 4 * cfg.triad_numel
    q1, q3 = t.quartiles
    return Row(optimizer="stream", implementation="triad", case=f"triad {_human(cfg.triad_numel)}",
               dtype="fp32", threads=threads, tensors=3, numel=cfg.triad_numel, median_ms=t.median * 1e3,
               q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, repeats=len(t.samples), bytes_per_step=nbytes,
               gb_per_s=nbytes / t.median / 1e9, note="STREAM triad a = b + s*c, 12 B/element")

def _row(spec_name: str, impl: str, case: Case, dtype: str, threads: int, t: Timing, nbytes: int,
         note: str = "") -> Row:
    med = t.median
    q1, q3 = t.quartiles
    return Row(
        optimizer=spec_name, implementation=impl, case=case.name, dtype=dtype, threads=threads,
        tensors=case.num_tensors, numel=case.numel, median_ms=med * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
        repeats=len(t.samples), bytes_per_step=nbytes, gb_per_s=nbytes / med / 1e9, note=note,
    )


def planned_measurements(cfg: Config) -> int:
    """How many progress lines a run prints (measurements, limits and triads)."""
    n = len(cfg.threads)  # triads
    impls = _usable_impls(cfg)
    for case in cfg.cases:
        for _ in cfg.dtypes:
            for name in cfg.optimizers:
                spec = OPTIMIZERS[name]
                k = sum(1 for i in impls if _applicable(cfg, spec, i, case) is None)
                n += (k + 1) * len(cfg.threads)
    return n


def _usable_impls(cfg: Config) -> List[str]:
    impls = list(cfg.impls)
    if "deepspeed" in impls and not deepspeed_available():
        impls.remove("deepspeed")  # optional: skipped silently
    return impls


def _applicable(cfg: Config, spec: OptimizerSpec, impl: str, case: Case) -> Optional[str]:
    """None if ``impl`` runs here, else why not."""
    if impl in SLOW_IMPLS and case.huge and not cfg.full:
        return "skipped on huge cases by default (use --full)"
    if impl == "deepspeed" and spec.family not in ("Adam", "AdamW"):
        return "DeepSpeed's CPU optimizer is Adam only"
    return None


class _Progress:
    def __init__(self, total: int, stream: Optional[TextIO]) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.t0 = time.perf_counter()

    def __call__(self, what: str, result: str) -> None:
        self.done += 1
        if self.stream is None:
            return
        width = len(str(self.total))
        elapsed = time.perf_counter() - self.t0
        print(f"[{self.done:>{width}}/{self.total}] {what:<44} {result}  ({elapsed:.0f} s)",
              file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.stream is not None:
            print(f"  {text}", file=self.stream, flush=True)


def run(cfg: Config, progress: Optional[TextIO] = sys.stderr, report: Optional[Report] = None) -> Report:
    """Run every measurement of ``cfg``; rows are appended to ``report`` as they finish.

    Params and grads are built once per (case, dtype) and shared by every
    optimizer and implementation; each optimizer object (and so its state)
    lives only while it is measured.
    """
    t_start = time.perf_counter()
    if report is None:
        report = Report(machine=machine_facts(), config=config_dict(cfg))
    prog = _Progress(planned_measurements(cfg), progress)
    busy = other_cpu_load()
    report.machine["other_cpu_load_at_start_pct"] = None if busy is None else round(busy, 1)
    if busy is not None and busy > 10 and progress is not None:
        print(f"warning: other processes are using {busy:.0f}% of the CPUs: timings, and torch's multi-thread "
              "(OpenMP) steps above all, will be off", file=progress, flush=True)
    load = CpuLoad()
    load.start()
    impls = _usable_impls(cfg)
    saved_threads = torch.get_num_threads()
    try:
        for threads in cfg.threads:
            row = triad_row(cfg, threads)
            report.triad.append(row)
            prog(f"STREAM triad fp32 {_human(cfg.triad_numel)} {_thr(threads)}", f"{row.gb_per_s:6.1f} GB/s")

        arena = _make_arena(cfg)
        for case in cfg.cases:
            for dtype_name in cfg.dtypes:
                _run_case(cfg, case, dtype_name, impls, report, prog, arena)
                gc.collect()
        del arena
        report.complete = True
    finally:
        torch.set_num_threads(saved_threads)
        report.wall_s = time.perf_counter() - t_start
        during = load.stop()
        report.machine["other_cpu_load_during_run_pct"] = None if during is None else round(during, 1)
    return report


def _elem_size(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def _make_arena(cfg: Config) -> _ProbeArena:
    streams = max(OPTIMIZERS[o].rw_streams for o in cfg.optimizers)
    es = max((_elem_size(d) for d in cfg.dtypes), default=4)
    stream_bytes = max((c.numel for c in cfg.cases), default=0) * es
    read_bytes = max((c.numel for c in cfg.cases if c.num_tensors > 1), default=0) * es
    return _ProbeArena(streams, stream_bytes, read_bytes)


def _run_case(cfg: Config, case: Case, dtype_name: str, impls: List[str], report: Report, prog: _Progress,
              arena: _ProbeArena) -> None:
    """Every optimizer and implementation on one (case, dtype): the implementations of an
    optimizer are timed side by side (:func:`time_interleaved`), in a loop or back to back."""
    dtype = DTYPES[dtype_name]
    es = torch.empty((), dtype=dtype).element_size()
    params = build_tensors(case, dtype, cfg.seed)
    single = case.num_tensors == 1
    grad0 = params[0].grad
    probe = arena.probe(case.numel, dtype, grad0.view(-1) if single and grad0 is not None else None)
    limit_note = "" if single else "limit measured on one tensor of the same total size"
    before = LoopWork(params) if cfg.mode == "loop" else None
    try:
        for opt_name in cfg.optimizers:
            spec = OPTIMIZERS[opt_name]
            nbytes = spec.bytes_per_param(es) * case.numel
            opts: Dict[str, Any] = {}
            try:
                for impl in impls:
                    opt = _ready_optimizer(cfg, spec, opt_name, impl, case, dtype_name, params, report, prog)
                    if opt is not None:
                        opts[impl] = opt
                start = len(report.rows)  # the limits go first; rows are reported as they are measured
                limits: List[Row] = []
                for threads in cfg.threads:
                    probe_samples = probe.block(cfg, spec.rw_streams, threads)
                    for impl, opt in opts.items():
                        set_threads(opt, impl, threads)
                    timings = time_interleaved(cfg, {i: o.step for i, o in opts.items()}, before)
                    rows: Dict[str, Row] = {}
                    for impl, t in timings.items():
                        row = _row(opt_name, impl, case, dtype_name, threads, t, nbytes, note=t.note)
                        row.mode = cfg.mode
                        rows[impl] = row
                        report.rows.append(row)
                        prog(f"{opt_name} {impl} {case.name} {dtype_name} {_thr(threads)}", _fmt_result(row))
                    pair = {i: opts[i] for i in ("fusedoptim", "torch-fused") if i in opts}
                    if before is not None and len(pair) == 2:
                        b2b = time_interleaved(cfg, {i: o.step for i, o in pair.items()})
                        if all(len(t.samples) >= TRUST_MIN_SAMPLES for t in b2b.values()):
                            rows["fusedoptim"].speedup_back_to_back = b2b["torch-fused"].median / b2b["fusedoptim"].median
                    probe_samples += probe.block(cfg, spec.rw_streams, threads)
                    kind, best = probe_samples.best()
                    limit = _row(opt_name, "limit", case, dtype_name, threads, Timing(best), nbytes,
                                 note=limit_note)
                    limit.probe = kind
                    fused = rows.get("torch-fused")
                    wrong = torch_fused_wrong(spec, dtype_name) if fused is not None else ""
                    for r in list(rows.values()) + [limit]:
                        r.pct_of_limit = 100.0 * r.gb_per_s / limit.gb_per_s
                        if fused is not None and r is not limit:
                            r.speedup_vs_torch_fused = fused.median_ms / r.median_ms
                            r.comparable = trusted(r) and trusted(fused)
                            r.torch_fused_wrong = wrong
                    limits.append(limit)
                    prog(f"{opt_name} limit {case.name} {dtype_name} {_thr(threads)}",
                         _fmt_result(limit) + (" (one tensor)" if not single else ""))
                report.rows[start:start] = limits
            finally:
                opts.clear()
                gc.collect()
    finally:
        del params, probe, before
        gc.collect()


def _ready_optimizer(cfg: Config, spec: OptimizerSpec, opt_name: str, impl: str, case: Case, dtype_name: str,
                     params: List[Tensor], report: Report, prog: _Progress) -> Any:
    """An optimizer of ``impl`` that has taken its first step (which creates the state), or None
    (skipped, with the reason in the report)."""
    why = _applicable(cfg, spec, impl, case)
    if why is not None:
        report.skipped.append(dict(optimizer=opt_name, implementation=impl, case=case.name, dtype=dtype_name,
                                   reason=why))
        return None
    what = f"{opt_name} {impl} {case.name} {dtype_name}"
    try:
        opt = make_optimizer(spec, impl, params)
        set_threads(opt, impl, cfg.threads[0])
        opt.step()  # never timed, and not a warm-up step
    except Unsupported as exc:
        report.skipped.append(dict(optimizer=opt_name, implementation=impl, case=case.name, dtype=dtype_name,
                                   reason=str(exc)))
        for threads in cfg.threads:
            prog(f"{what} {_thr(threads)}", f"skipped: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - an implementation that fails here is skipped
        report.skipped.append(dict(optimizer=opt_name, implementation=impl, case=case.name, dtype=dtype_name,
                                   reason=f"{type(exc).__name__}: {exc}"))
        for threads in cfg.threads:
            prog(f"{what} {_thr(threads)}", f"failed: {type(exc).__name__}: {exc}")
        return None
    return opt


def _fmt_result(r: Row) -> str:
    out = (f"{r.median_ms:9.3f} ms/step (quartiles {r.q1_ms:.3f}-{r.q3_ms:.3f})  {r.gb_per_s:6.1f} GB/s  "
           f"{r.repeats} steps")
    return out + (f" ({r.note})" if r.note and r.implementation != "limit" else "")


def _thr(threads: int) -> str:
    return f"{threads} thread" + ("" if threads == 1 else "s")


def _human(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------


class CpuLoad:
    """CPU time used by *other* processes between :meth:`start` and :meth:`stop`, from /proc/stat.

    A benchmark of multi-threaded steps is only as good as the idle cores it
    runs on; this tells the reader whether it had them.
    """

    def __init__(self) -> None:
        self._t0: Optional[Tuple[float, float, float]] = None

    @staticmethod
    def _snapshot() -> Optional[Tuple[float, float, float]]:
        text = _read("/proc/stat")
        if not text or not text.startswith("cpu "):
            return None
        vals = [int(x) for x in text.splitlines()[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = sum(vals[:8]) / hz  # user nice system idle iowait irq softirq steal
        idle = (vals[3] + vals[4]) / hz
        ru = os.times()
        return total, total - idle, ru.user + ru.system

    def start(self) -> None:
        self._t0 = self._snapshot()

    def stop(self) -> Optional[float]:
        """Percent of all CPUs' time that other processes used since :meth:`start` (None if unknown)."""
        t1 = self._snapshot()
        if self._t0 is None or t1 is None:
            return None
        total = t1[0] - self._t0[0]
        if total <= 0:
            return None
        others = (t1[1] - self._t0[1]) - (t1[2] - self._t0[2])
        return max(0.0, min(100.0, 100.0 * others / total))


def other_cpu_load(seconds: float = 0.5) -> Optional[float]:
    """Percent of the CPUs that other processes use, sampled for ``seconds`` while we sleep."""
    load = CpuLoad()
    load.start()
    time.sleep(seconds)
    return load.stop()


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def source_revision() -> Optional[str]:
    """The git commit of fusedoptim's source (``+dirty`` with local changes to it), when it is a checkout."""
    import subprocess

    where = os.path.dirname(os.path.abspath(fusedoptim.__file__))
    try:
        rev = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return None
        # Local changes to the optimizer's sources (the benchmark's own files don't count).
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--",
                                ":/csrc", ":/python", ":/CMakeLists.txt", ":(exclude,top)python/fusedoptim/bench"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts() -> Dict[str, Any]:
    """CPU model, cores, memory, the ISA fusedoptim uses, versions and the date."""
    info = fusedoptim.backend_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    mem = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = round(int(line.split()[1]) / 2**20, 1)
    l3 = (_read("/sys/devices/system/cpu/cpu0/cache/index3/size") or "").strip() or None
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp[thp.find("[") + 1 : thp.find("]")] if thp and "[" in thp else None
    ds = None
    if deepspeed_available():
        try:
            from importlib.metadata import version

            ds = version("deepspeed")
        except Exception:  # noqa: BLE001
            ds = "unknown"
    return {
        "cpu_model": cpu_model(),
        "isa": info["isa"],
        "threading": info.get("threading"),
        "vector_width": info.get("vector_width"),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem,
        "l3_cache": l3,
        "transparent_hugepages": thp,
        "torch_version": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "fusedoptim_version": fusedoptim.__version__,
        "fusedoptim_compiler": info.get("compiler"),
        "fusedoptim_git": source_revision(),
        "deepspeed_version": ds,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def config_dict(cfg: Config) -> Dict[str, Any]:
    """The configuration as plain JSON values."""
    d = asdict(cfg)
    d["cases"] = [
        {"name": c.name, "tensors": c.num_tensors, "numel": c.numel, "description": c.description} for c in cfg.cases
    ]
    d["optimizers"] = {n: OPTIMIZERS[n].description for n in cfg.optimizers}
    d["command"] = shlex.join([os.path.basename(sys.argv[0]) or "fusedoptim-bench"] + sys.argv[1:])
    return d


# --------------------------------------------------------------------------------------------
# output: table, JSON, CSV, chart
# --------------------------------------------------------------------------------------------

_MACHINE_COLUMNS = ("cpu_model", "isa", "cores", "torch_version", "fusedoptim_version", "date")


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


#: Table headers: torch.optim's implementations without the "torch" (the notes say whose they are).
_SHORT = {"torch-fused": "fused", "torch-foreach": "foreach", "torch-forloop": "for-loop"}


def _limit_noise(lim: Row) -> float:
    """The limit's relative spread (at least 5%): how far a row may beat it by chance."""
    return max(0.05, (lim.q3_ms - lim.q1_ms) / lim.median_ms)


def _fmt_pct(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.0f}%"


def _probe_wins(rows: Sequence[Row]) -> str:
    """Which probe kind gave how many of the limits, e.g. " (plain: 8 of 8 limits)"."""
    kinds = [r.probe for r in rows if r.implementation == "limit" and r.probe]
    if not kinds:
        return ""
    return " (" + ", ".join(f"{k}: {kinds.count(k)} of {len(kinds)} limits" for k in dict.fromkeys(kinds)) + ")"


def format_table(report: Report) -> str:
    """The one table: per (optimizer, case, dtype, threads) the limit and every implementation side by side."""
    rows = report.rows
    impls = [i for i in IMPLEMENTATIONS if any(r.implementation == i for r in rows)]
    order: Dict[Tuple[str, Any], int] = {}
    for r in rows:
        for field_name in ("optimizer", "case", "dtype"):
            order.setdefault((field_name, getattr(r, field_name)), len(order))
    by_key: Dict[Tuple[str, str, str, int], Dict[str, Row]] = {}
    for r in sorted(rows, key=lambda r: (order[("optimizer", r.optimizer)], order[("case", r.case)],
                                         order[("dtype", r.dtype)], r.threads)):
        by_key.setdefault((r.optimizer, r.case, r.dtype, r.threads), {})[r.implementation] = r

    header1 = ["", "", "", "", "limit"]
    header2 = ["optimizer", "case", "dtype", "thr", "GB/s"]
    for i in impls:
        label = _SHORT.get(i, IMPLEMENTATIONS[i])
        if i == "fusedoptim":
            header1 += [label, "", ""]
            header2 += ["ms", "GB/s", "%lim"]
        else:
            header1 += [label, ""]
            header2 += ["ms", "%lim"]
    loop = any(r.mode == "loop" for r in rows)
    header1 += ["fusedoptim vs fused", ""] if loop else ["fusedoptim", ""]
    header2 += ["loop", "b2b"] if loop else ["vs fused", ""]

    body: List[List[str]] = []
    seps: List[int] = []
    last_opt = None
    multi = set()
    cuts = False
    over = 0
    unsteady: List[str] = []
    wrong_fused: Dict[str, None] = {}  # the reasons, in order
    for key, cells in by_key.items():
        opt, case, dtype, threads = key
        if last_opt is not None and opt != last_opt:
            seps.append(len(body))
        last_opt = opt
        lim = cells.get("limit")
        if lim is not None and lim.note:
            multi.add(case)
        line = [opt, case + ("*" if lim is not None and lim.note else ""), dtype, str(threads),
                f"{lim.gb_per_s:.1f}" if lim else "-"]
        slack = _limit_noise(lim) if lim is not None else 0.0
        for i in impls:
            cell = cells.get(i)
            cut = cell is not None and bool(cell.note)
            cuts |= cut
            line.append(_fmt_ms(cell.median_ms if cell else None) + ("~" if cut else ""))
            if i == "fusedoptim":
                line.append(f"{cell.gb_per_s:.1f}" if cell else "-")
            if cell is not None and cell.pct_of_limit is not None and cell.pct_of_limit > 100.0 * (1 + slack):
                over += 1
                line.append(">lim")
            else:
                line.append(_fmt_pct(cell.pct_of_limit if cell else None))
        fo = cells.get("fusedoptim")
        if fo is None or fo.speedup_vs_torch_fused is None:
            line.append("-")
        elif fo.comparable is False:
            unsteady.append(f"{opt} {case} {dtype} {threads}t")
            line.append("?")
        else:
            line.append(f"{fo.speedup_vs_torch_fused:.2f}x" + ("!" if fo.torch_fused_wrong else ""))
        if fo is not None and fo.torch_fused_wrong:
            wrong_fused.setdefault(fo.torch_fused_wrong, None)
        line.append(f"{fo.speedup_back_to_back:.2f}x" if fo is not None and fo.speedup_back_to_back else
                    ("-" if loop else ""))
        body.append(line)

    ncol = len(header2)
    widths = [max(len(x[c]) for x in [header1, header2] + body) for c in range(ncol)]
    # group separators: a "|" before the limit and before each implementation
    group_starts = {4}
    c = 5
    for i in impls:
        group_starts.add(c)
        c += 3 if i == "fusedoptim" else 2
    group_starts.add(c)

    def fmt(cells: List[str], left: int = 4) -> str:
        out = []
        for k, (cell, w) in enumerate(zip(cells, widths)):
            if k in group_starts:
                out.append("|")
            out.append(cell.ljust(w) if k < left and k != 3 else cell.rjust(w))
        return " ".join(out).rstrip()

    # header1 labels span their group: left-align them at the group's first column
    def fmt_h1() -> str:
        out = []
        starts = sorted(group_starts)
        spans = [(s, (starts[j + 1] if j + 1 < len(starts) else ncol)) for j, s in enumerate(starts)]
        out.append(" ".join("".ljust(widths[x]) for x in range(4)))
        for s, e in spans:
            width = sum(widths[s:e]) + (e - s - 1)
            out.append("| " + header1[s].ljust(width))
        return " ".join(out).rstrip()

    lines = [fmt_h1(), fmt(header2)]
    rule = "-" * max(len(lines[0]), len(lines[1]))
    lines.insert(0, rule)
    lines.append(rule)
    for n, line in enumerate(body):
        if n in seps:
            lines.append(rule)
        lines.append(fmt(line))
    lines.append(rule)

    m = report.machine
    notes = [
        f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m.get('memory_gib')} GiB, "
        f"fusedoptim {m['fusedoptim_version']} ({m['isa']}), torch {m['torch_version']}, {m['date']}",
        "fused, foreach, for-loop = torch.optim's steps (fused=True, foreach=True, foreach=False).",
        "ms = median ms/step; GB/s = bytes a step moves / median time "
        "(Adam 7 x dtype size per param, SGD momentum 5 x, plain SGD 3 x).",
        "limit = fusedoptim._C.stream_probe (x += grad over the same read-write streams, same ISA and thread "
        "split), the faster of its plain and non-temporal stores" + _probe_wins(rows) + "; %lim = GB/s / limit GB/s.",
    ]
    if loop:
        notes.append("Steps timed in a loop: torch's work (grads rewritten, one parallel op) runs untimed before "
                     "every step, and the implementations alternate in blocks (A B, B A, ...).")
        notes.append("vs fused = torch fused time / fusedoptim time (>1: fusedoptim is faster): in the loop, and "
                     "b2b = with steps back to back.")
    else:
        notes.append("vs fused = torch fused time / fusedoptim time (>1: fusedoptim is faster), steps back to back.")
    if unsteady:
        notes.append(f"? = no ratio: a median too unsteady to compare (quartiles wider than {TRUST_SPREAD:.0%} of "
                     f"it, or under {TRUST_MIN_SAMPLES} steps): {', '.join(unsteady)}; the other rows can be "
                     "trusted.")
    if over:
        notes.append(">lim = faster than the limit by more than the limit's own noise: that limit was measured "
                     "low (a disturbed probe), so no percentage is given.")
    if multi:
        notes.append("* limit measured on one tensor of the same total size.")
    for why in wrong_fused:
        notes.append(f"! = torch's fused step does less than the step it is compared with: {why}.")
    if cuts:
        notes.append("~ = fewer timed steps than asked: the steps hit --max-time (see the rows' note).")
    skipped = {(s["implementation"], s["reason"]) for s in report.skipped}
    if any("--full" in reason for _, reason in skipped):
        notes.append("- = not run: torch for-loop/foreach are skipped on cases of >= 64M params by default "
                     "(--full runs them).")
    triad = ", ".join(f"{_thr(r.threads)} {r.gb_per_s:.1f} GB/s" for r in report.triad)
    if triad:
        notes.append(f"STREAM triad (fp32, {report.triad[0].case.split()[-1]} elements): {triad}.")
    during = m.get("other_cpu_load_during_run_pct")
    if during is not None:
        notes.append(f"Other processes used {during:.0f}% of the CPUs' time during the run"
                     + (" (timings disturbed; rerun on an idle machine)." if during > 10 else "."))
    if not report.complete:
        notes.append("(interrupted: partial results)")
    return "\n".join(lines + notes)


def machine_markdown(m: Dict[str, Any]) -> List[str]:
    """The machine facts as a markdown table (lines)."""
    return [
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {m['cpu_model']}, {m['usable_cores']} cores, L3 {m.get('l3_cache') or '?'}, "
        f"{m.get('memory_gib')} GiB RAM |",
        f"| fusedoptim | {m['fusedoptim_version']}"
        + (f" (git {m['fusedoptim_git']})" if m.get("fusedoptim_git") else "")
        + f", ISA {m['isa']} (vector width {m.get('vector_width')}), {m.get('fusedoptim_compiler')} |",
        f"| torch | {m['torch_version']} |",
        f"| Python, OS | {m['python_version']}, {m['platform']} |",
        f"| date (UTC) | {m['date']} |",
        f"| other processes' CPU load | {m.get('other_cpu_load_at_start_pct')}% at start, "
        f"{m.get('other_cpu_load_during_run_pct')}% during the run |",
    ]


def write_markdown(report: Report, path: str, files: Sequence[str] = ()) -> None:
    """A results page: the machine, the command, the table, and links to ``files`` (JSON, CSV, chart)."""
    cfg = report.config
    out = [
        "# fusedoptim benchmark results",
        "",
        f"Command: `{cfg.get('command', 'fusedoptim-bench')}` ({report.wall_s:.0f} s of measuring"
        + ("" if report.complete else ", interrupted") + ").",
        "",
    ] + machine_markdown(report.machine) + [""]
    pngs = [f for f in files if f.endswith(".png")]
    for png in pngs:
        out += [f"![GB/s per case and implementation]({png})", ""]
    out += ["```", format_table(report), "```", ""]
    data = [f for f in files if not f.endswith(".png")]
    if data:
        out += ["Tidy rows: " + ", ".join(f"[{f}]({f})" for f in data) + ".", ""]
    _ensure_dir(path)
    with open(path, "w") as f:
        f.write("\n".join(out))


def _row_dicts(report: Report) -> List[Dict[str, Any]]:
    return [asdict(r) for r in report.triad + report.rows]


def write_json(report: Report, path: str) -> None:
    """Rows, triad, skipped measurements, machine facts and config as one JSON document."""
    doc = {
        "machine": report.machine,
        "config": report.config,
        "wall_s": round(report.wall_s, 2),
        "complete": report.complete,
        "triad": [asdict(r) for r in report.triad],
        "rows": [asdict(r) for r in report.rows],
        "skipped": report.skipped,
    }
    if report.comparisons:
        doc["comparisons"] = report.comparisons
    _ensure_dir(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def write_csv(report: Report, path: str) -> None:
    """One tidy row per measurement (triad, limit and implementations) with the machine facts as columns."""
    rows = _row_dicts(report)
    fields = list(Row.__dataclass_fields__) + list(_MACHINE_COLUMNS)
    _ensure_dir(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            for k in _MACHINE_COLUMNS:
                r[k] = report.machine.get(k)
            for k in ("median_ms", "q1_ms", "q3_ms"):
                r[k] = f"{r[k]:.4f}"
            r["gb_per_s"] = f"{r['gb_per_s']:.3f}"
            for k in ("pct_of_limit", "speedup_vs_torch_fused", "speedup_back_to_back"):
                r[k] = "" if r[k] is None else f"{r[k]:.2f}"
            w.writerow(r)


def check_plot_available() -> None:
    """Raise :class:`BenchError` with an install hint when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'fusedoptim[bench]' "
                         "(or pip install matplotlib)")


_COLORS = {
    "fusedoptim": "#d62728",
    "torch-fused": "#1f77b4",
    "torch-foreach": "#7fb2e5",
    "torch-forloop": "#c7dcef",
    "deepspeed": "#2ca02c",
}


def write_plot(report: Report, path: str) -> None:
    """Bar chart of GB/s per case and implementation, one panel per (optimizer, dtype) and thread count.

    The limit of each case is a black line across its group of bars, with
    fusedoptim's % of limit written above its bar; STREAM triad is a dashed
    line across each panel.
    """
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = report.rows
    if not rows:
        raise BenchError("nothing to plot: no results")
    panels = list(dict.fromkeys((r.optimizer, r.dtype) for r in rows))
    threads = sorted({r.threads for r in rows})
    cases = list(dict.fromkeys(r.case for r in rows))
    impls = [i for i in IMPLEMENTATIONS if any(r.implementation == i for r in rows)]
    triad = {r.threads: r.gb_per_s for r in report.triad}
    index = {(r.optimizer, r.dtype, r.threads, r.case, r.implementation): r for r in rows}

    fig, axes = plt.subplots(len(panels), len(threads), figsize=(6.4 * len(threads), 3.5 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(len(impls), 1)
    any_cut = False
    for pi, (opt, dtype) in enumerate(panels):
        for ti, th in enumerate(threads):
            ax = axes[pi][ti]
            pcases = [c for c in cases if (opt, dtype, th, c, "limit") in index]
            for k, impl in enumerate(impls):
                xs, ys, cut = [], [], []
                for ci, c in enumerate(pcases):
                    r = index.get((opt, dtype, th, c, impl))
                    if r is not None:
                        xs.append(ci - 0.4 + width * (k + 0.5))
                        ys.append(r.gb_per_s)
                        cut.append(bool(r.note))
                        any_cut |= bool(r.note)
                        if impl == "fusedoptim" and r.pct_of_limit is not None:
                            ax.annotate(f"{r.pct_of_limit:.0f}%", (xs[-1], ys[-1]), xytext=(0, 2),
                                        textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                        color=_COLORS["fusedoptim"])
                bars = ax.bar(xs, ys, width=width * 0.92, color=_COLORS.get(impl, None), edgecolor="none", zorder=2)
                for bar, was_cut in zip(bars.patches, cut):
                    if was_cut:
                        bar.set_hatch("///")
                        bar.set_edgecolor("0.3")
            for ci, c in enumerate(pcases):
                lim = index[(opt, dtype, th, c, "limit")]
                ax.hlines(lim.gb_per_s, ci - 0.45, ci + 0.45, colors="black", linewidth=2.2, zorder=3)
            if th in triad:
                ax.axhline(triad[th], color="0.45", linestyle="--", linewidth=1, zorder=1)
            ax.set_xticks(range(len(pcases)))
            ax.set_xticklabels(pcases, fontsize=8)
            ax.set_title(f"{opt} {dtype}, {_thr(th)}", fontsize=10)
            ax.set_ylabel("GB/s")
            ax.grid(axis="y", color="0.9", zorder=0)
            ax.set_axisbelow(True)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.08)

    handles: List[Any] = [Patch(color=_COLORS.get(i), label=IMPLEMENTATIONS[i]) for i in impls]
    handles.append(Line2D([], [], color="black", linewidth=2.2, label="limit (stream probe, same streams)"))
    if triad:
        handles.append(Line2D([], [], color="0.45", linestyle="--", label="STREAM triad (fp32)"))
    if any_cut:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="< 5 steps (hit --max-time)"))
    m = report.machine
    fig.suptitle(
        f"Optimizer step bandwidth (bytes moved / median step time); % = fusedoptim of limit\n"
        f"{m['cpu_model']}, {m['usable_cores']} cores, fusedoptim {m['fusedoptim_version']} ({m['isa']}), "
        f"torch {m['torch_version']}",
        fontsize=11,
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    _ensure_dir(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
