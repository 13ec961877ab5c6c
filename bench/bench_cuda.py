#!/usr/bin/env python
"""fusedoptim's CUDA kernels on a GPU: the GPU tests, then the timings.

    python bench/bench_cuda.py [--json out.json] [--quick] [--skip-tests] ...

1. Runs ``pytest tests/test_cuda.py tests/test_cuda_emulation.py -q``
   (``--skip-tests`` skips it). Failures are reported and the timings still
   run; the exit status is then 1.
2. Times ``optimizer.step()`` of fusedoptim against torch.optim's fused,
   foreach and for-loop steps on the GPU, for Adam, AdamW, SGD with momentum
   and SGD Nesterov, fp32 and bf16, on the cases of ``fusedoptim-bench``
   (1 x 16M, 1 x 128M, GPT-2 small's 148 tensors, 2000 x 1024).

How a step is timed: the params and random non-zero grads of a (case,
dtype) are built once on the GPU and shared by every implementation; each
optimizer takes one untimed first step (it creates the state), ``--warmup``
more, then ``--repeats`` steps, each between two CUDA events on the current
stream, with no synchronisation between steps. The median (and quartiles)
of those event intervals is the step time: the GPU time of the step's
kernels plus any time the GPU waited for the host to launch them (per-tensor
launch overhead counts, as it does in training).

Bandwidth: the bytes a step must move (each read-write stream read and
written once, the grad read once: Adam/AdamW 7 x the dtype size per param,
i.e. 16 B read + 12 B written in fp32; SGD with momentum 5 x) over the step
time, as a percentage of the device-to-device copy bandwidth measured in the
same run (``dst.copy_(src)`` on a large buffer, 2 x its size moved per copy).

Exit status: 0, 1 when tests failed, 2 when there is no GPU or fusedoptim
has no usable CUDA backend (with the reason).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import fusedoptim
from fusedoptim.backends import cuda as _cuda
from fusedoptim.bench.cases import Case, parse_case
from fusedoptim.bench.harness import OPTIMIZERS, OptimizerSpec, source_revision

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
TEST_FILES = ("tests/test_cuda.py", "tests/test_cuda_emulation.py")

DEFAULT_CASES = ("1x16M", "1x128M", "gpt2-small", "2000x1024")
QUICK_CASES = ("1x16M", "gpt2-small", "2000x1024")
DEFAULT_OPTIMIZERS = ("adam", "adamw", "sgd", "sgd-nesterov")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Implementation id -> table label, in display order.
IMPLS: Dict[str, str] = {
    "fusedoptim": "fusedoptim",
    "torch-fused": "torch fused",
    "torch-foreach": "torch foreach",
    "torch-forloop": "torch for-loop",
}


class NoGPU(Exception):
    """No GPU, or no CUDA backend in this fusedoptim: nothing to time."""


# ----------------------------------------------------------------------------- environment
def check_gpu() -> None:
    if not torch.cuda.is_available():
        raise NoGPU(f"no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                    f"built for CUDA {torch.version.cuda or 'none: a CPU-only build'}). "
                    "Without a GPU, `python -m pytest tests/test_cuda_emulation.py` runs the same kernels "
                    "on the CPU.")
    if not _cuda.available():
        raise NoGPU(f"fusedoptim's CUDA backend cannot run here: {_cuda.info()['reason']}. "
                    "Build fusedoptim with its CUDA kernels: pip install . -C cmake.define.FUSEDOPTIM_CUDA=ON "
                    "(see README, 'CUDA').")


def machine_facts() -> Dict[str, Any]:
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    cuda = fusedoptim.backend_info()["cuda"]
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
        "cuda_driver_version": cuda["driver_version"],
        "cuda_runtime_version": cuda["runtime_version"],
        "fusedoptim_archs": cuda["archs"],
        "large_param_space": cuda["large_param_space"],
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fusedoptim_version": fusedoptim.__version__,
        "fusedoptim_git": source_revision(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- tests
def run_tests(extra: Sequence[str]) -> Dict[str, Any]:
    """pytest on the CUDA test files, output passed through; returns rc and the summary line."""
    missing = [f for f in TEST_FILES if not (REPO / f).exists()]
    if missing:
        print(f"bench_cuda: {', '.join(missing)} not found under {REPO}: tests skipped", file=sys.stderr)
        return {"returncode": None, "summary": "not run: test files not found", "seconds": 0.0}
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", *extra]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        if line.strip():
            last = line.strip()
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    print(f"bench_cuda: tests {'passed' if rc == 0 else 'FAILED'} (exit status {rc}, {seconds:.0f} s): {last}",
          file=sys.stderr, flush=True)
    return {"returncode": rc, "summary": last, "seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    samples_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def quartiles(self) -> Tuple[float, float]:
        if len(self.samples_ms) < 2:
            return self.samples_ms[0], self.samples_ms[0]
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[0], q[2]


def time_cuda(fn, warmup: int, repeats: int) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` calls each between two CUDA
    events on the current stream; one synchronisation at the end."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    finally:
        if gc_was:
            gc.enable()
    return Timing([start.elapsed_time(end) for start, end in events])


def copy_bandwidth(warmup: int, repeats: int) -> Dict[str, Any]:
    """Device-to-device copy GB/s: ``dst.copy_(src)`` reads and writes ``nbytes`` each."""
    free, _ = torch.cuda.mem_get_info()
    nbytes = int(min(2 ** 30, free // 8)) // 4096 * 4096
    t = _time_copy(nbytes, max(warmup, 3), max(repeats, 20))
    torch.cuda.empty_cache()
    moved = 2 * nbytes
    return {"bytes": nbytes, "bytes_moved": moved, "median_ms": t.median, "gb_per_s": moved / (t.median * 1e-3) / 1e9}


def _time_copy(nbytes: int, warmup: int, repeats: int) -> Timing:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), warmup, repeats)


def build_params(case: Case, dtype: torch.dtype, seed: int) -> List[torch.Tensor]:
    """The case's params on the GPU, each its own allocation, values about
    +-0.02, with grads of about +-1 (set once, never zero)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.empty(shape, dtype=torch.float32, device=DEVICE).uniform_(-0.02, 0.02, generator=gen).to(dtype)
        g = torch.empty(shape, dtype=torch.float32, device=DEVICE).uniform_(0.05, 1.0, generator=gen)
        sign = torch.empty(shape, device=DEVICE).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        p.requires_grad_(True)
        p.grad = g.mul_(sign).to(dtype)
        params.append(p)
    return params


def make_optimizer(spec: OptimizerSpec, impl: str, params: List[torch.Tensor]):
    kw = spec.options
    if impl == "fusedoptim":
        return getattr(fusedoptim, spec.family)(params, **kw)
    cls = getattr(torch.optim, spec.family)
    if impl == "torch-fused":
        return cls(params, fused=True, **kw)
    if impl == "torch-foreach":
        return cls(params, foreach=True, **kw)
    if impl == "torch-forloop":
        return cls(params, foreach=False, **kw)
    raise ValueError(impl)


@dataclass
class Row:
    optimizer: str
    implementation: str
    case: str
    dtype: str
    tensors: int
    numel: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    bytes_per_step: int
    gb_per_s: float
    pct_of_copy: float
    speedup_vs_torch_fused: Optional[float] = None
    launches: Optional[int] = None
    blocks: Optional[int] = None
    note: str = ""


def bench_case(case: Case, dtype_name: str, optimizers: Sequence[str], impls: Sequence[str], warmup: int,
               repeats: int, copy_gbps: float, seed: int, log) -> Tuple[List[Row], List[Dict[str, Any]]]:
    dtype = DTYPES[dtype_name]
    es = torch.empty((), dtype=dtype).element_size()
    rows: List[Row] = []
    skipped: List[Dict[str, Any]] = []
    params = build_params(case, dtype, seed)
    try:
        for name in optimizers:
            spec = OPTIMIZERS[name]
            nbytes = spec.bytes_per_param(es) * case.numel
            group: List[Row] = []
            for impl in impls:
                what = f"{name} {impl} {case.name} {dtype_name}"
                opt = None
                try:
                    opt = make_optimizer(spec, impl, params)
                    _cuda.last_stats.clear()
                    opt.step()  # creates the state: never timed
                    note, launches, blocks = "", None, None
                    if impl == "fusedoptim":
                        expected = "native-cuda" + ("-emulated" if _cuda.emulating() else "")
                        if opt.last_backends != [expected]:
                            note = f"not fusedoptim's kernels: {opt.last_backends}"
                        elif _cuda.last_stats:
                            launches = sum(s["launches"] for s in _cuda.last_stats)
                            blocks = sum(s["blocks"] for s in _cuda.last_stats)
                    t = time_cuda(opt.step, warmup, repeats)
                except Exception as exc:  # noqa: BLE001 - an implementation that cannot run is reported and skipped
                    skipped.append(dict(optimizer=name, implementation=impl, case=case.name, dtype=dtype_name,
                                        reason=f"{type(exc).__name__}: {exc}"))
                    log(f"{what:<48} skipped: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    del opt
                    _cuda.last_stats.clear()
                    gc.collect()
                    torch.cuda.empty_cache()
                q1, q3 = t.quartiles
                gbps = nbytes / (t.median * 1e-3) / 1e9
                row = Row(optimizer=name, implementation=impl, case=case.name, dtype=dtype_name,
                          tensors=case.num_tensors, numel=case.numel, median_ms=t.median, q1_ms=q1, q3_ms=q3,
                          repeats=len(t.samples_ms), bytes_per_step=nbytes, gb_per_s=gbps,
                          pct_of_copy=100.0 * gbps / copy_gbps, launches=launches, blocks=blocks, note=note)
                group.append(row)
                log(f"{what:<48} {t.median:9.3f} ms [{q1:.3f}, {q3:.3f}] {gbps:8.1f} GB/s "
                    f"{row.pct_of_copy:5.1f}% of copy" + (f"  ({note})" if note else ""))
            fused = next((r for r in group if r.implementation == "torch-fused"), None)
            for r in group:
                if fused is not None:
                    r.speedup_vs_torch_fused = fused.median_ms / r.median_ms
            rows += group
    finally:
        del params
        gc.collect()
        torch.cuda.empty_cache()
    return rows, skipped


# ----------------------------------------------------------------------------- output
def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def format_table(rows: List[Row], impls: Sequence[str], machine: Dict[str, Any], copy: Dict[str, Any]) -> str:
    by_key: Dict[Tuple[str, str, str], Dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.optimizer, r.case, r.dtype), {})[r.implementation] = r
    head = ["optimizer", "case", "dtype"]
    for i in impls:
        head += [f"{IMPLS[i]} ms", "GB/s", "%copy"] if i == "fusedoptim" else [f"{IMPLS[i]} ms", "%copy"]
    head.append("fo vs fused")
    body = []
    for (opt, case, dtype), cells in by_key.items():
        line = [opt, case, dtype]
        for i in impls:
            c = cells.get(i)
            line.append(_fmt_ms(c.median_ms if c else None) + ("!" if c is not None and c.note else ""))
            if i == "fusedoptim":
                line.append(f"{c.gb_per_s:.0f}" if c else "-")
            line.append(f"{c.pct_of_copy:.0f}%" if c else "-")
        fo = cells.get("fusedoptim")
        line.append(f"{fo.speedup_vs_torch_fused:.2f}x" if fo and fo.speedup_vs_torch_fused else "-")
        body.append(line)
    widths = [max(len(x[k]) for x in [head] + body) for k in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    lines = [rule, fmt(head), rule] + [fmt(b) for b in body] + [rule]
    lines += [
        f"GPU: {machine['gpu']} (sm_{machine['compute_capability'].replace('.', '')}, {machine['sm_count']} SMs, "
        f"{machine['gpu_memory_gib']} GiB), driver {machine['cuda_driver_version']}, "
        f"fusedoptim {machine['fusedoptim_version']}, torch {machine['torch_version']} (CUDA {machine['torch_cuda']}), "
        f"{machine['date']}",
        "ms = median of per-step CUDA-event times; GB/s = bytes a step moves (Adam 7 x dtype size per param, "
        "SGD momentum 5 x) / median time.",
        f"%copy = GB/s / device-to-device copy bandwidth measured in this run: {copy['gb_per_s']:.0f} GB/s "
        f"(dst.copy_(src), {copy['bytes'] / 2 ** 20:.0f} MiB).",
        "fo vs fused = torch fused time / fusedoptim time (>1: fusedoptim is faster).",
    ]
    if any(r.note for r in rows):
        lines.append("! = see the row's note (e.g. fusedoptim did not run its CUDA kernels).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def _csv(choices: Optional[Sequence[str]] = None):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if choices is not None:
            if items == ["all"]:
                return list(choices)
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} (choose from {', '.join(choices)})")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/bench_cuda.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=_csv(), default=None,
                    help=f"comma-separated cases (default {','.join(DEFAULT_CASES)}; any COUNTxSIZE works)")
    ap.add_argument("--optimizers", type=_csv(list(OPTIMIZERS)), default=list(DEFAULT_OPTIMIZERS),
                    help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default {','.join(DEFAULT_OPTIMIZERS)})")
    ap.add_argument("--dtypes", type=_csv(list(DTYPES)), default=["fp32", "bf16"], help="fp32, bf16, fp16")
    ap.add_argument("--impls", type=_csv(list(IMPLS)), default=list(IMPLS), help=", ".join(IMPLS))
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first (default 5)")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per measurement (default 30)")
    ap.add_argument("--quick", action="store_true", help="fewer cases and steps: a smoke run")
    ap.add_argument("--skip-tests", action="store_true", help="time only, without running the tests first")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x -k graph'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write machine facts, test result, copy bandwidth and rows")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        print("bench_cuda: --warmup must be >= 0 and --repeats >= 1", file=sys.stderr)
        return 2
    try:
        cases = [parse_case(c) for c in (args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES))]
    except ValueError as exc:
        print(f"bench_cuda: {exc}", file=sys.stderr)
        return 2
    try:
        check_gpu()
    except NoGPU as exc:
        print(f"bench_cuda: nothing to do: {exc}", file=sys.stderr)
        return 2
    warmup, repeats = (min(args.warmup, 2), min(args.repeats, 10)) if args.quick else (args.warmup, args.repeats)

    tests = {"returncode": None, "summary": "skipped (--skip-tests)", "seconds": 0.0}
    if not args.skip_tests:
        tests = run_tests(args.pytest_args.split())

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    machine = machine_facts()
    copy = copy_bandwidth(warmup, repeats)
    log(f"device-to-device copy: {copy['gb_per_s']:.0f} GB/s ({copy['bytes'] / 2 ** 20:.0f} MiB, "
        f"{copy['median_ms']:.3f} ms)")
    rows: List[Row] = []
    skipped: List[Dict[str, Any]] = []
    for case in cases:
        for dtype_name in args.dtypes:
            r, s = bench_case(case, dtype_name, args.optimizers, args.impls, warmup, repeats, copy["gb_per_s"],
                              args.seed, log)
            rows += r
            skipped += s
    wall = time.perf_counter() - t0
    print(format_table(rows, args.impls, machine, copy))
    if tests["returncode"] not in (None, 0):
        print(f"\nWARNING: the GPU tests failed ({tests['summary']}): check correctness before trusting these timings.")
    if args.json:
        doc = {
            "machine": machine,
            "config": {"cases": [{"name": c.name, "tensors": c.num_tensors, "numel": c.numel} for c in cases],
                       "optimizers": {o: OPTIMIZERS[o].description for o in args.optimizers},
                       "dtypes": args.dtypes, "impls": args.impls, "warmup": warmup, "repeats": repeats,
                       "seed": args.seed, "command": " ".join([os.path.basename(sys.argv[0])] + list(argv or sys.argv[1:]))},
            "tests": tests,
            "copy_bandwidth": copy,
            "rows": [asdict(r) for r in rows],
            "skipped": skipped,
            "wall_s": round(wall, 1),
        }
        path = Path(args.json)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"wrote {path}")
    return 1 if tests["returncode"] not in (None, 0) else 0


if __name__ == "__main__":
    sys.exit(main())
