"""The benchmark command runs from the installed package and writes tidy rows."""

import json
import subprocess
import sys


def test_bench_smoke_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable, "-m", "fusedoptim.bench", "--quiet",
        "--optimizers", "adam,sgd", "--impls", "fusedoptim,fused", "--cases", "64x1024,1x64K",
        "--dtypes", "fp32", "--threads", "1", "--warmup", "1", "--repeats", "3", "--triad-size", "65536",
        "--json", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fusedoptim" in done.stdout  # the table
    data = json.loads(out.read_text())
    assert {"machine", "rows"} <= set(data)
    rows = data["rows"]
    impls = {r["implementation"] for r in rows}
    assert {"limit", "fusedoptim", "torch-fused"} <= impls, impls
    per_param = {"adam": 28, "sgd": 20}  # fp32: Adam 4 reads + 3 writes, SGD-momentum 3 + 2
    for r in rows:
        assert r["median_ms"] > 0 and r["gb_per_s"] > 0, r
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"], r
        assert r["bytes_per_step"] == r["numel"] * per_param[r["optimizer"]], r
    cases = {(r["optimizer"], r["case"]) for r in rows}
    assert cases == {(o, c) for o in ("adam", "sgd") for c in ("64x1024", "1x64K")}


def test_precision_suite_smoke(tmp_path):
    """--suite precision on a tiny case: every option's row, its limit and the bytes each must move."""
    out = tmp_path / "precision.json"
    cmd = [
        sys.executable, "-m", "fusedoptim.bench", "--suite", "precision", "--quiet", "--cases", "1x64K",
        "--threads", "1", "--warmup", "1", "--repeats", "3", "--triad-size", "65536", "--json", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stochastic_rounding" in done.stdout  # the table
    rows = json.loads(out.read_text())["rows"]
    # Adam, bytes per param: bf16 params 2 B, fp32 4 B (see fusedoptim.bench.precision)
    per_param = {
        ("none", "bf16"): 14, ("master_weights", "bf16"): 28, ("stochastic_rounding", "bf16"): 14,
        ("kahan_summation", "bf16"): 18, ("none", "fp32"): 28, ("state_dtype=bf16", "fp32"): 20,
        ("max_grad_norm", "fp32"): 32,
    }
    seen = {(r["option"], r["dtype"], r["implementation"]) for r in rows}
    for option, dtype in per_param:
        assert {(option, dtype, "limit"), (option, dtype, "fusedoptim")} <= seen, (option, dtype)
    refs = ("torch-fused+clip", "fusedoptim+clip", "grad-norm", "grad-read")
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
                   "max_grad_norm/fp32": 24}
    assert probe_shape(28, "bf16") == ("fp32", 3, True)  # master weights: 7 fp32 streams' worth
    assert probe_shape(18, "bf16") == ("bf16", 4, True)  # Kahan
    assert probe_shape(20, "fp32") == ("fp32", 2, True)  # bf16 states
    assert probe_shape(32, "fp32", 28) == ("fp32", 3, False)  # max_grad_norm: the step's probe, converted
