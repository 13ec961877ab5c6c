"""The benchmark command runs from the installed package and writes tidy rows."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import fusedoptim
from fusedoptim.bench.cases import gpt2_small_shapes

from subprocesses import run_at_once
from torch_versions import CPU_FUSED_ADAM, CPU_FUSED_SGD, NO_CPU_FUSED_ADAM, NO_CPU_FUSED_SGD

#: Whether torch has the fused=True CPU step the benchmark compares with
#: (torch 2.4+); where it has none, the benchmark leaves its rows out.
TORCH_FUSED = {"adam": CPU_FUSED_ADAM, "adamw": CPU_FUSED_ADAM, "sgd": CPU_FUSED_SGD}


#: The command-line runs the smoke tests check, by name: ``fusedoptim.bench``'s
#: arguments, less ``--json``.
_RUNS = {
    "default": ["--quiet", "--optimizers", "adam,sgd", "--impls", "fusedoptim,fused", "--cases", "64x1024,1x64K",
                "--dtypes", "fp32", "--threads", "1", "--warmup", "1", "--repeats", "3", "--triad-size", "65536"],
    "precision": ["--suite", "precision", "--quiet", "--cases", "1x64K", "--threads", "1", "--warmup", "1",
                  "--repeats", "3", "--triad-size", "65536"],
    "loop": ["--quiet", "--optimizers", "sgd", "--impls", "fusedoptim,fused", "--cases", "1x64K", "--dtypes", "fp32",
             "--threads", "1", "--repeats", "10", "--triad-size", "65536"],
    "sweep": ["--suite", "sweep", "--quick", "--quiet", "--sizes", "10,14", "--optimizers", "sgd,adamw",
              "--dtypes", "bf16", "--threads", "1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each of ``_RUNS`` as ``python -m fusedoptim.bench ... --json out``, all
    started at once (each spends seconds importing torch; the smoke tests
    check what they write, not their times): name -> (completed process,
    the JSON file)."""
    tmp = tmp_path_factory.mktemp("bench")
    names = [n for n in _RUNS if n != "sweep" or (CPU_FUSED_SGD and CPU_FUSED_ADAM)]  # (the sweep times
    # torch's fused step, which a torch before 2.4 lacks; its test skips there)
    done = run_at_once({n: ([sys.executable, "-m", "fusedoptim.bench", *_RUNS[n], "--json", str(tmp / f"{n}.json")],
                            {}) for n in names})
    return {n: (done[n], tmp / f"{n}.json") for n in names}


def test_bench_smoke_writes_rows(runs):
    done, out = runs["default"]
    assert done.returncode == 0, done.stderr
    assert "fusedoptim" in done.stdout  # the table
    assert f"wrote {out}" in done.stderr
    data = json.loads(out.read_text())
    assert {"machine", "rows"} <= set(data)
    rows = data["rows"]
    for opt in ("adam", "sgd"):
        impls = {r["implementation"] for r in rows if r["optimizer"] == opt}
        # torch's fused rows where torch has a fused CPU step (2.4+); none before
        assert {"limit", "fusedoptim"} <= impls and ("torch-fused" in impls) == TORCH_FUSED[opt], (opt, impls)
    per_param = {"adam": 28, "sgd": 20}  # fp32: Adam 4 reads + 3 writes, SGD-momentum 3 + 2
    for r in rows:
        assert r["median_ms"] > 0 and r["gb_per_s"] > 0, r
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"], r
        assert r["bytes_per_step"] == r["numel"] * per_param[r["optimizer"]], r
    cases = {(r["optimizer"], r["case"]) for r in rows}
    assert cases == {(o, c) for o in ("adam", "sgd") for c in ("64x1024", "1x64K")}


def test_precision_suite_smoke(runs):
    """--suite precision on a tiny case: every option's row, its limit and the bytes each must move."""
    done, out = runs["precision"]
    assert done.returncode == 0, done.stderr
    assert "stochastic_rounding" in done.stdout  # the table
    rows = json.loads(out.read_text())["rows"]
    # Adam, bytes per param: bf16 params 2 B, fp32 4 B (see fusedoptim.bench.precision)
    per_param = {
        ("none", "bf16"): 14, ("master_weights", "bf16"): 28, ("stochastic_rounding", "bf16"): 14,
        ("kahan_summation", "bf16"): 18, ("none", "fp32"): 28, ("state_dtype=bf16", "fp32"): 20,
        ("max_grad_norm", "fp32"): 32, ("state_bits=8", "fp32"): 16, ("state_bits=8", "bf16"): 10,
    }
    seen = {(r["option"], r["dtype"], r["implementation"]) for r in rows}
    for option, dtype in per_param:
        assert {(option, dtype, "limit"), (option, dtype, "fusedoptim")} <= seen, (option, dtype)
    # (torch's fused step, clipped: where torch has a fused CPU Adam, 2.4+)
    refs = ("torch-fused+clip",) * CPU_FUSED_ADAM + ("fusedoptim+clip", "grad-norm", "grad-read")
    assert {("max_grad_norm", "fp32", i) for i in refs} <= seen
    for r in rows:
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"], r
        if r["implementation"] in ("limit", "fusedoptim", "torch-fused"):
            assert r["bytes_per_step"] == r["numel"] * per_param[(r["option"], r["dtype"])], r
        if r["implementation"] == "limit":
            assert r["note"].startswith("stream_probe"), r
    assert not any("failed" in line for line in done.stderr.splitlines()), done.stderr


def test_precision_byte_model():
    """Bytes per param of each option, and the probe shape that moves them."""
    from fusedoptim.bench.harness import OPTIMIZERS
    from fusedoptim.bench.precision import OPTIONS, probe_shape, step_bytes

    sgd = {k: step_bytes(OPTIMIZERS["sgd"], o) for k, o in OPTIONS.items()}
    assert sgd == {"none/bf16": 10, "master_weights/bf16": 20, "stochastic_rounding/bf16": 10,
                   "kahan_summation/bf16": 14, "none/fp32": 20, "state_dtype=bf16/fp32": 16,
                   "max_grad_norm/fp32": 24, "state_bits=8/fp32": 14, "state_bits=8/bf16": 8}
    assert probe_shape(28, "bf16") == ("fp32", 3, True)  # master weights: 7 fp32 streams' worth
    assert probe_shape(18, "bf16") == ("bf16", 4, True)  # Kahan
    assert probe_shape(20, "fp32") == ("fp32", 2, True)  # bf16 states
    assert probe_shape(32, "fp32", 28) == ("fp32", 3, False)  # max_grad_norm: the step's probe, converted
    assert probe_shape(10, "bf16") == ("bf16", 2, True)  # 8-bit states, bf16 params
    assert probe_shape(16, "fp32") == ("fp32", 1, False)  # 8-bit states, fp32 params: converted from 12 B


def test_bench_times_in_a_loop_and_back_to_back(runs):
    done, out = runs["loop"]
    assert done.returncode == 0, done.stderr
    rows = [r for r in json.loads(out.read_text())["rows"] if r["implementation"] != "limit"]
    assert {r["mode"] for r in rows} == {"loop"}
    fo = next(r for r in rows if r["implementation"] == "fusedoptim")
    assert fo["repeats"] == 10
    if TORCH_FUSED["sgd"]:
        assert fo["speedup_vs_torch_fused"] > 0 and fo["speedup_back_to_back"] > 0, fo
    else:  # no fused CPU SGD in torch before 2.4: nothing to compare with
        assert fo["speedup_vs_torch_fused"] is None and fo["speedup_back_to_back"] is None, fo
    assert "loop" in done.stdout and "b2b" in done.stdout


def test_time_interleaved_alternates_and_runs_work_before_every_step():
    from fusedoptim.bench.harness import Config, time_interleaved

    calls = []
    cfg = Config(warmup=1, repeats=4, blocks=4)
    t = time_interleaved(cfg, {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         before=lambda: calls.append("-"))
    assert len(t["a"].samples) == 4 and len(t["b"].samples) == 4
    assert calls[:4] == ["-", "a", "-", "b"]  # warm-up steps
    steps = [c for c in calls[4:] if c != "-"]
    assert steps == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert calls[4:] == [x for s in steps for x in ("-", s)]


def test_sweep_interleaved_takes_a_step_count_per_side():
    """A contended sweep gives each side its own steps per block (a side a
    hundred times slower must not leave the others one step a block); the
    blocks still alternate A B, B A, with the work before every step."""
    from fusedoptim.bench.sweep import interleaved

    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                    lambda: calls.append("-"), 3, {"a": 3, "b": 1})
    assert [len(t["a"]), len(t["b"])] == [3, 3]
    steps = [c for c in calls if c != "-"]
    assert steps == ["a"] * 3 + ["b"] + ["b"] + ["a"] * 3 + ["a"] * 3 + ["b"]
    assert calls == [x for s in steps for x in ("-", s)]
    calls.clear()
    interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, None, 2, 2)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]


def _report(fused_q=(0.9, 1.1), fo_pct=90.0):
    from fusedoptim.bench.harness import Report, Row, trusted

    def row(impl, ms, q, pct):
        return Row(optimizer="adam", implementation=impl, case="1x1M", dtype="fp32", threads=1, tensors=1,
                   numel=1 << 20, median_ms=ms, q1_ms=q[0], q3_ms=q[1], repeats=20, bytes_per_step=28 << 20,
                   gb_per_s=1.0, pct_of_limit=pct, mode="loop")

    lim = row("limit", 1.0, (0.98, 1.02), 100.0)
    fo = row("fusedoptim", 1.0, (0.95, 1.05), fo_pct)
    fused = row("torch-fused", 1.0, fused_q, 90.0)
    fo.speedup_vs_torch_fused = 1.0
    fo.comparable = trusted(fo) and trusted(fused)
    fo.speedup_back_to_back = 1.1
    return Report(machine={"cpu_model": "x", "usable_cores": 2, "fusedoptim_version": "0", "isa": "avx2",
                           "torch_version": "2", "date": "d"}, config={}, rows=[lim, fo, fused], complete=True)


def test_table_gives_no_ratio_for_an_unsteady_row_and_no_percentage_over_the_limit():
    from fusedoptim.bench.harness import format_table

    steady = format_table(_report())
    assert "1.00x" in steady and "1.10x" in steady and "? = no ratio" not in steady
    unsteady = format_table(_report(fused_q=(0.5, 2.0)))
    assert "1.00x" not in unsteady and "? = no ratio" in unsteady and "adam 1x1M fp32 1t" in unsteady
    over = format_table(_report(fo_pct=130.0))
    assert ">lim" in over and "130%" not in over
    within = format_table(_report(fo_pct=103.0))  # inside the limit's 5% noise
    assert "103%" in within and ">lim" not in within


@pytest.mark.skipif(not (CPU_FUSED_SGD and CPU_FUSED_ADAM), reason=f"the sweep times torch's fused=True step: "
                    f"{NO_CPU_FUSED_SGD if not CPU_FUSED_SGD else NO_CPU_FUSED_ADAM}")
def test_sweep_suite_smoke(runs):
    done, out = runs["sweep"]
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["optimizer"], r["numel"]) for r in rows} == {(o, n) for o in ("sgd", "adamw") for n in (1024, 16384)}
    for r in rows:
        assert r["fusedoptim_ms"] > 0 and r["torch_fused_ms"] > 0 and r["mode"] == "loop", r
        assert r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"], r
    assert "2^10" in done.stdout and "2^14" in done.stdout and "ratio = torch fused" in done.stdout
    assert f"wrote {out}" in done.stderr


@pytest.mark.skipif(not CPU_FUSED_SGD, reason=NO_CPU_FUSED_SGD)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_fused_wrong_says_whether_torch_fused_sgd_updates_the_params(dtype):
    import torch

    from fusedoptim.bench.harness import DTYPES, OPTIMIZERS, torch_fused_wrong

    # Straight from torch: 64 params of 1.0 (8 whole vectors of any SIMD width), one fused step.
    p = torch.ones(64, dtype=DTYPES[dtype], requires_grad=True)
    p.grad = torch.full_like(p, 0.5)
    torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
    skips = bool((p.detach() == 1.0).all())
    why = torch_fused_wrong(OPTIMIZERS["sgd"], dtype)
    assert bool(why) == skips, why
    if skips:
        assert "unchanged" in why and dtype in why
    assert torch_fused_wrong(OPTIMIZERS["adamw"], dtype) == ""


def test_tables_mark_a_ratio_against_a_torch_step_that_does_less():
    from fusedoptim.bench.harness import format_table
    from fusedoptim.bench.sweep import SweepReport, SweepRow, format_sweep_table

    report = _report()
    fair = format_table(report)
    assert "1.00x!" not in fair and "! = torch's fused step" not in fair
    report.rows[1].torch_fused_wrong = "leaves 9 of 10 params unchanged"
    marked = format_table(report)
    assert "1.00x!" in marked and "! = torch's fused step does less" in marked and "9 of 10" in marked

    def cell(numel, ratio, wrong):
        return SweepRow(optimizer="sgd", dtype="bf16", threads=1, case=f"1x{numel}", tensors=1, numel=numel,
                        mode="loop", contended=False, fusedoptim_ms=1.0, torch_fused_ms=ratio, ratio=ratio,
                        ratio_q1=ratio, ratio_q3=ratio, blocks=9, steps_per_block=4, torch_fused_wrong=wrong)

    sweep = SweepReport(machine={}, config={}, rows=[cell(1024, 0.8, "skips params"), cell(2048, 1.2, "")])
    table = format_sweep_table(sweep)
    assert "0.80!" in table and "1.20" in table and "skips params" in table
    assert "lowest trusted ratio: 1.20" in table  # a marked cell is no verdict


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("streams", [1, 3, 4])
def test_stream_probe_with_streaming_stores_adds_as_the_plain_probe(dtype_name, streams):
    import torch

    from fusedoptim import _C
    from fusedoptim.bench.harness import DTYPES

    dtype = DTYPES[dtype_name]
    code = {"fp32": _C.DTYPE_FLOAT32, "bf16": _C.DTYPE_BFLOAT16}[dtype_name]
    g = torch.Generator().manual_seed(1)
    # Odd sizes and element offsets: heads and tails that are not 32-byte aligned, and one
    # stream out of step with the others (plain stores all the way).
    for n, offsets in ((100_003, [0] * streams), (70_001, [1] * streams), (5_000, [0] * (streams - 1) + [3])):
        base = [torch.randn(n + 8, generator=g).to(dtype) for _ in range(streams)]
        read = torch.randn(n + 8, generator=g).to(dtype)
        for threads in (1, 2):
            out = {}
            for nt in (False, True):
                xs = [b.clone()[o:o + n] for b, o in zip(base, offsets)]
                _C.stream_probe([x.data_ptr() for x in xs], read.data_ptr(), n, code, threads, nontemporal=nt)
                out[nt] = xs
            for plain, streamed, b, o in zip(out[False], out[True], base, offsets):
                assert torch.equal(plain.view(torch.int16 if dtype_name == "bf16" else torch.int32),
                                   streamed.view(torch.int16 if dtype_name == "bf16" else torch.int32))
                assert not torch.equal(plain, b[o:o + n])  # the probe did write


def test_the_limit_is_the_faster_probe():
    from fusedoptim.bench.harness import ProbeSamples

    s = ProbeSamples({"plain": [2.0, 2.0, 3.0], "non-temporal": [1.0, 9.0, 1.5]})
    s += ProbeSamples({"plain": [2.0], "non-temporal": [1.2]})
    kind, samples = s.best()
    assert kind == "non-temporal" and samples == [1.0, 9.0, 1.5, 1.2]


# ----------------------------------------------------- bench/in_loop.py's models
def _in_loop():
    """``bench/in_loop.py`` of this checkout, as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "in_loop.py"
    spec = importlib.util.spec_from_file_location("in_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_loop_gpt2_has_the_tensors_of_gpt2_small():
    """The in-loop GPT-2 steps the tensors the sweep's gpt2-small case times
    (nn.Linear keeps its weights transposed against transformers' Conv1D:
    the same sizes)."""
    with torch.device("meta"):
        model = _in_loop().GPT2()
    got = sorted(p.numel() for p in model.parameters())
    assert got == sorted(math.prod(s) for s in gpt2_small_shapes())
    assert sum(got) == 124_439_808 and len(got) == 148


def test_in_loop_gpt2_trains_every_tensor():
    """A small GPT-2 of the same code: a finite language-model loss, a grad
    for every tensor (the embedding's from both its uses), and steps that
    lower the loss under fusedoptim's AdamW."""
    torch.manual_seed(0)
    model = _in_loop().GPT2(vocab=97, ctx=16, d=32, layers=2, heads=4)
    idx = torch.randint(0, 97, (2, 16))
    opt = fusedoptim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(idx)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(97.0)).item()) < 0.5, losses  # near uniform at the start
    assert losses[-1] < losses[0] - 0.5, losses


def test_contended_summary_splits_torchs_share_from_fusedoptims():
    """A contended sweep's verdict: fusedoptim's 2-thread / 1-thread time per
    cell, and, where the cell also timed fusedoptim on one thread beside
    torch's two, how much of that is torch's workers and how much
    fusedoptim's own threads."""
    from fusedoptim.bench.sweep import SweepReport, SweepRow, contended_summary, contended_times, format_sweep_table

    def cell(case, threads, ms, one_thread_ms=None):
        return SweepRow(optimizer="sgd", dtype="fp32", threads=threads, case=case, tensors=1, numel=1024,
                        mode="loop", contended=True, fusedoptim_ms=ms, torch_fused_ms=2 * ms, ratio=2.0,
                        ratio_q1=2.0, ratio_q3=2.0, blocks=9, steps_per_block=4,
                        fusedoptim_one_thread_ms=one_thread_ms)

    rows = [cell("1x1024", 1, 1.0), cell("1x1024", 2, 1.6, one_thread_ms=1.5),
            cell("1x4096", 1, 2.0), cell("1x4096", 2, 2.4, one_thread_ms=2.0)]
    report = SweepReport(machine={}, config={}, rows=rows)
    assert contended_times(report) == [("sgd fp32 1x1024", 1.6, 1.0, 1.5), ("sgd fp32 1x4096", 2.4, 2.0, 2.0)]
    lines = contended_summary(report)
    assert lines[0] == "fusedoptim 2+ threads / 1 thread under contention: worst 1.60x (sgd fp32 1x1024)"
    assert "up to 1.50x (sgd fp32 1x1024): torch's OpenMP workers" in lines[1]
    assert "worst 1.20x (sgd fp32 1x4096)" in lines[2]
    assert all(line in format_sweep_table(report) for line in lines)
    # Without the one-thread side (an older run's json), only the first line.
    for r in rows:
        r.fusedoptim_one_thread_ms = None
    assert contended_summary(report) == lines[:1]
