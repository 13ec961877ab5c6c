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
