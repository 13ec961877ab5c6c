"""8-bit optimizer states: step time against torch's fused fp32 step, and
against the byte limit of each step.

One fp32 param of N elements (default 16M), AdamW; for each thread count the
three steps are timed interleaved in one process (torch fused, fusedoptim
with fp32 states, fusedoptim with ``state_bits=8``; A B C A B C ...), each
step preceded by torch work as in training (a matmul on torch's threads),
and the medians are compared. The limit of a step is its bytes over the
bandwidth of a probe that moves the fp32 step's bytes (``_C.stream_probe``,
3 read-write streams and the grad, 28 B/param) on the same thread split:
fp32 states move 28 B/param, 8-bit states 16 (param 8, grad 4, codes 4).

Where bitsandbytes is installed, its ``AdamW8bit`` (the same 16 B/param:
blockwise 8-bit states with one fp32 absmax per 256 elements; on the CPU
its unfused reference path) is timed in the same rounds.

    python bench/bench_state_bits.py [--numel 16777216] [--threads 1,2] [--reps 15] [--no-bnb]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import torch

import fusedoptim
from fusedoptim import _C


BNB = "bitsandbytes 8-bit"


def have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or no backend for this machine
        return False
    return True


def make(kind: str, n: int) -> Callable[[], None]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n) * 1e-2
    if kind == "torch fused fp32":
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    elif kind == "fusedoptim fp32":
        opt = fusedoptim.AdamW([p], lr=1e-4)
    elif kind == BNB:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit([p], lr=1e-4)
    else:
        opt = fusedoptim.AdamW([p], lr=1e-4, state_bits=8)
    opt.step()  # states created
    return opt.step


def probe(n: int, threads: int, reps: int) -> float:
    """Median seconds of the bandwidth probe over the fp32 step's 28 B/param."""
    rw = [torch.zeros(n) for _ in range(3)]
    r = torch.ones(n)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _C.stream_probe([x.data_ptr() for x in rw], r.data_ptr(), n, _C.DTYPE_FLOAT32, threads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out even where it is installed")
    args = ap.parse_args()
    n = args.numel
    kinds = ["torch fused fp32", "fusedoptim fp32", "fusedoptim 8-bit"]
    bytes_per = {"torch fused fp32": 28, "fusedoptim fp32": 28, "fusedoptim 8-bit": 16, BNB: 16}
    if not args.no_bnb and have_bnb():
        kinds.append(BNB)
    work_a, work_b = torch.randn(512, 512), torch.randn(512, 512)
    out: List[Dict[str, object]] = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        fusedoptim.set_num_threads(threads)
        steps = {k: make(k, n) for k in kinds}
        times: Dict[str, List[float]] = {k: [] for k in kinds}
        for rep in range(args.reps + 2):
            for k in kinds:
                torch.mm(work_a, work_b)  # torch's threads ran just before the step, as in training
                t0 = time.perf_counter()
                steps[k]()
                dt = time.perf_counter() - t0
                if rep >= 2:
                    times[k].append(dt)
        t_probe = probe(n, threads, args.reps)
        bw = 28 * n / t_probe
        base = statistics.median(times["torch fused fp32"])
        print(f"\n{n} fp32 params, AdamW, {threads} thread(s), medians of {args.reps} interleaved steps "
              f"(probe: {bw / 1e9:.1f} GB/s)")
        print(f"{'step':20s} {'ms':>8s} {'vs torch fused':>15s} {'B/param':>8s} {'% of limit':>11s}")
        for k in kinds:
            med = statistics.median(times[k])
            limit = bytes_per[k] * n / bw
            print(f"{k:20s} {med * 1e3:8.2f} {base / med:14.2f}x {bytes_per[k]:8d} {100 * limit / med:10.0f}%")
            out.append({"threads": threads, "step": k, "ms": med * 1e3, "speedup_vs_torch_fused": base / med,
                        "bytes_per_param": bytes_per[k], "pct_of_limit": 100 * limit / med,
                        "times_ms": [t * 1e3 for t in times[k]]})
        del steps
    if args.json:
        with open(args.json, "w") as f:
            peers = {}
            if BNB in kinds:
                import bitsandbytes

                peers["bitsandbytes"] = bitsandbytes.__version__
            json.dump({"numel": n, "isa": fusedoptim.backend_info()["isa"], "torch": torch.__version__,
                       "peers": peers, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
