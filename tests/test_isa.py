"""CPU variants and threads: every ISA this machine supports, and every
thread count, must produce exactly the bits of the scalar variant on one
thread, for every dtype and flag combination, including NaN, inf, -0.0 and
subnormal inputs. Also the FUSEDOPTIM_CPU_ISA environment variable
(tested in subprocesses, since it is read at import)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Dict

import pytest
import torch

import fusedoptim
from cases import (ALL_CASES, DTYPE_IDS, DTYPES, INT_VIEW, assert_same_bits, param_groups,
                   special_problem, supported_isas)
from torch_versions import COMPILE_TRACES_STEP
from subprocesses import run_at_once

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512bf16")  # worst first, as fusedoptim._config.ISA_NAMES
BEST_FIRST = ALL_ISAS[::-1]
WIDTH = {"scalar": 1, "avx2": 8, "avx512": 16, "avx512bf16": 16}


def run_special(case, dtype, isa=None, threads=None, steps=4, **extra):
    """Run ``case`` on the special-value problem; returns params, state and grads, all cloned."""
    if isa is not None:
        fusedoptim.set_cpu_isa(isa)
    init, grads = special_problem(dtype, steps)
    groups = param_groups(case, init)
    opt = case.make("ours", groups, **extra)
    if threads is not None:
        opt.num_threads = threads
    flat = [p for g in groups for p in g["params"]]
    used_grads = []
    for row in grads:
        gs = [g.clone() for r in row for g in r]
        for p, g in zip(flat, gs):
            p.grad = g
        opt.step()
        used_grads.append(gs)
        assert all(b.startswith("native-cpu/") for b in opt.last_backends), opt.last_backends
    state = {k: [opt.state[p][k].detach().clone() for p in flat] for k in opt.state[flat[0]]} if opt.state else {}
    return [p.detach().clone() for p in flat], state, used_grads, grads, opt


# ---------------------------------------------------------------- backend_info, set_cpu_isa
def test_backend_info_is_consistent():
    info = fusedoptim.backend_info()
    for key in ("version", "compiled_isas", "supported_isas", "isa", "vector_width", "cpu_features",
                "isa_request", "isa_request_honored", "num_threads", "num_threads_from", "threading", "compiler",
                "cuda", "torch_version", "torch_supported", "torch_compile"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__ and info["torch_supported"].startswith(">=")
    # how a compiled step() runs: traced into the graph where this torch allows it, else eagerly
    assert info["torch_compile"].startswith("traced" if COMPILE_TRACES_STEP else "eager"), info["torch_compile"]
    assert info["version"] == fusedoptim.__version__
    assert "scalar" in info["compiled_isas"] and "scalar" in info["supported_isas"]
    assert set(info["supported_isas"]) <= set(info["compiled_isas"]) <= set(ALL_ISAS)
    assert info["isa"] in info["supported_isas"]
    assert info["isa"] == fusedoptim.get_cpu_isa()
    assert info["vector_width"] == WIDTH[info["isa"]]
    assert info["num_threads"] == fusedoptim.get_num_threads() == torch.get_num_threads()
    feats = info["cpu_features"]
    if "avx2" in info["supported_isas"]:
        assert feats["avx2"] and feats["fma"] and feats["f16c"]
    if "avx512" in info["supported_isas"]:
        assert feats["avx512f"] and feats["avx512bw"] and feats["avx512vl"]
    if "avx512bf16" in info["supported_isas"]:
        assert "avx512" in info["supported_isas"] and feats["avx512dq"] and feats["avx512_bf16"]
    if "avx512" in info["compiled_isas"] and not feats.get("avx512f"):
        assert "avx512" not in info["supported_isas"]
    if os.environ.get("FUSEDOPTIM_CPU_ISA") is None:
        # By default the best supported variant is in use.
        best = [isa for isa in BEST_FIRST if isa in info["supported_isas"]][0]
        assert info["isa"] == best
        assert info["isa_request"] is None and info["isa_request_honored"] is True


def test_backend_info_docstring_names_every_key():
    info = fusedoptim.backend_info()
    doc = fusedoptim.backend_info.__doc__
    keys = set(info) | {"thread_pool_size"} | {f"cuda.{k}" for k in info["cuda"]}
    missing = [k for k in sorted(keys) if f"``{k.split('.')[-1]}``" not in doc]
    assert not missing, f"backend_info's docstring does not name {missing}"


def test_backend_info_prints_one_fact_a_line(monkeypatch):
    monkeypatch.delenv("FUSEDOPTIM_CPU_ISA", raising=False)
    info = fusedoptim.backend_info()
    lines = str(info).splitlines()
    rows: Dict[str, str] = {}
    for line in lines:  # a long value goes on over indented lines
        if line.startswith(" "):
            rows[key] += " " + line.strip()
        else:
            key, value = line.split("  ", 1)
            rows[key] = value.strip()
    assert rows["fusedoptim"] == (f"{fusedoptim.__version__} (torch {torch.__version__}; "
                                  f"supported: torch{info['torch_supported']})")
    assert list(rows)[:2] == ["fusedoptim", "torch.compile"], list(rows)
    assert rows["torch.compile"] == info["torch_compile"]
    assert rows["torch.compile"].startswith("traced" if COMPILE_TRACES_STEP else "eager"), rows["torch.compile"]
    assert rows["CPU variant"].startswith(f"{info['isa']}, {info['vector_width']} float lanes")
    assert rows["variants here"] == ", ".join(info["supported_isas"])
    assert rows["threads"] == f"{fusedoptim.get_num_threads()} per step (torch.get_num_threads())"
    assert rows["CUDA"].startswith("no: " if not info["cuda"]["compiled"] else
                                   ("available" if info["cuda"]["available"] else "not available: "))
    assert all(len(line) <= 100 for line in lines), lines
    # thread_pool_size is reported once the pool has started, never as 0.
    started = fusedoptim._C.backend_info()["thread_pool_size"]
    assert ("thread_pool_size" in info) == (started > 0) and info.get("thread_pool_size", 1) > 0
    threading_ = info["threading"]
    shown = (f"openmp: torch's OpenMP team ({os.path.basename(threading_[len('openmp ('):-1])})"
             if threading_.startswith("openmp (") else "pool: fusedoptim's own threads")
    assert rows["threading"] == shown + (f"; started: {started} worker(s) + the calling thread" if started else "")
    fusedoptim.set_num_threads(1)
    try:
        assert fusedoptim.backend_info()["num_threads_from"] == "fusedoptim.set_num_threads"
        assert "1 per step (fusedoptim.set_num_threads)" in str(fusedoptim.backend_info())
    finally:
        fusedoptim.set_num_threads(None)
    assert fusedoptim.backend_info()["num_threads_from"] == "torch.get_num_threads()"


def test_python_m_fusedoptim_prints_backend_info():
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPTIM_CPU_ISA"}
    # Both started at once: each spends seconds importing torch.
    done = run_at_once({args: ([sys.executable, "-m", "fusedoptim", *args], {"env": env}) for args in ((), ("--json",))},
                       timeout=180)
    assert [d.returncode for d in done.values()] == [0, 0], [d.stderr for d in done.values()]
    text, raw = done[()].stdout, done[("--json",)].stdout
    info = fusedoptim.backend_info()
    assert text.startswith(f"fusedoptim      {fusedoptim.__version__} (torch {torch.__version__}; "
                           f"supported: torch{info['torch_supported']})\n"
                           f"torch.compile   {info['torch_compile']}\n"), text
    assert f"CPU variant     {info['isa']}," in text and "\nCUDA " in text, text
    parsed = json.loads(raw)
    assert parsed["isa"] == info["isa"] and parsed["cuda"]["compiled"] == info["cuda"]["compiled"]
    assert parsed["torch_supported"] == info["torch_supported"] and parsed["torch_compile"] == info["torch_compile"]


def test_set_cpu_isa_round_trip_and_reported_backend(restore_isa):
    for isa in supported_isas():
        restore_isa(isa)
        assert fusedoptim.backend_info()["vector_width"] == WIDTH[isa]
        p = torch.zeros(5, requires_grad=True)
        opt = fusedoptim.Adam([p])
        p.grad = torch.ones(5)
        opt.step()
        assert opt.last_backends == [f"native-cpu/{isa}"]


def test_set_cpu_isa_rejects_unknown_name(restore_isa):
    before = fusedoptim.get_cpu_isa()
    for bad in ("avx9000", "", "AVX2 ", "sse"):
        with pytest.raises(ValueError):
            fusedoptim.set_cpu_isa(bad)
        assert fusedoptim.get_cpu_isa() == before


def test_set_cpu_isa_rejects_unsupported_variant(restore_isa):
    unsupported = [isa for isa in ALL_ISAS if isa not in supported_isas()]
    if not unsupported:
        pytest.skip("this CPU supports every variant: nothing unsupported to request")
    before = fusedoptim.get_cpu_isa()
    for isa in unsupported:
        with pytest.raises(RuntimeError):
            fusedoptim.set_cpu_isa(isa)
        assert fusedoptim.get_cpu_isa() == before


# ---------------------------------------------------------------- bit identity across ISAs
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_vector_isa_bit_identical_to_scalar(case, dtype, vector_isa):
    ref_p, ref_s, _, _, _ = run_special(case, dtype, isa="scalar")
    got_p, got_s, used, grads, _ = run_special(case, dtype, isa=vector_isa)
    assert_same_bits(got_p, ref_p, f"{case.id} {DTYPE_IDS[dtype]} params {vector_isa} vs scalar")
    assert ref_s.keys() == got_s.keys()
    for key in ref_s:
        assert_same_bits(got_s[key], ref_s[key], f"{case.id} {DTYPE_IDS[dtype]} state[{key!r}] {vector_isa} vs scalar")
    # The problem does contain non-finite results, so NaN handling was exercised.
    assert any(torch.isnan(p).any() for p in ref_p)
    # Grads are read only.
    for step, (row, gs) in enumerate(zip(grads, used)):
        flat = [g for r in row for g in r]
        for k, (a, b) in enumerate(zip(gs, flat)):
            assert torch.equal(a.view(INT_VIEW[dtype]), b.view(INT_VIEW[dtype])), f"grad {k} of step {step} was written"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_vector_isa_bit_identical_on_finite_values_many_steps(dtype, vector_isa):
    """Long runs on ordinary values across all Adam and SGD flag paths: the
    same bits, step after step (a rounding difference would compound)."""
    from cases import SMALL_GROUP_SHAPES, make_problem, run_case

    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=9, steps=30)
    for case in ALL_CASES[::3]:
        fusedoptim.set_cpu_isa("scalar")
        ref, _ = run_case(case, "ours", problem)
        fusedoptim.set_cpu_isa(vector_isa)
        got, _ = run_case(case, "ours", problem)
        assert_same_bits(got, ref, f"{case.id} {DTYPE_IDS[dtype]} {vector_isa} vs scalar, 30 steps")


# ---------------------------------------------------------------- threads
THREAD_SHAPES = [[(70001,), (33,)], [(40003,), (3, 17)]]


def _thread_run(case, dtype, threads=None, global_threads=None, torch_threads=None, steps=3):
    from cases import make_problem

    problem = make_problem(THREAD_SHAPES, dtype, seed=12, steps=steps)
    if global_threads is not None:
        fusedoptim.set_num_threads(global_threads)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups)
    if threads is not None:
        opt.num_threads = threads
    flat = [p for g in groups for p in g["params"]]
    for step in range(steps):
        for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.step()
    fusedoptim.set_num_threads(None)
    return [p.detach().clone() for p in flat], [t.clone() for p in flat for t in opt.state[p].values()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_thread_counts_give_identical_bits(case, dtype):
    ref_p, ref_s = _thread_run(case, dtype, threads=1)
    for kwargs in (dict(threads=2), dict(global_threads=2), dict(torch_threads=2), dict(threads=3)):
        got_p, got_s = _thread_run(case, dtype, **kwargs)
        assert_same_bits(got_p, ref_p, f"{case.id} {DTYPE_IDS[dtype]} params {kwargs} vs 1 thread")
        assert_same_bits(got_s, ref_s, f"{case.id} {DTYPE_IDS[dtype]} state {kwargs} vs 1 thread")


def test_thread_settings_api():
    assert fusedoptim.get_num_threads() == torch.get_num_threads()
    fusedoptim.set_num_threads(1)
    assert fusedoptim.get_num_threads() == 1
    assert fusedoptim.backend_info()["num_threads"] == 1
    fusedoptim.set_num_threads(None)
    torch.set_num_threads(1)
    assert fusedoptim.get_num_threads() == 1  # follows torch
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            fusedoptim.set_num_threads(bad)
    assert fusedoptim.get_num_threads() == 1


def test_thread_counts_identical_with_flush_denormal():
    """With torch.set_flush_denormal(True) (FTZ/DAZ on the calling thread),
    the result must not depend on how many threads split the work."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    n = 200_000
    out = []
    for threads in (1, 2):
        p = torch.full((n,), 1e-39).requires_grad_()
        g = torch.full((n,), 1e-39)
        opt = fusedoptim.SGD([p], lr=0.5, momentum=0.9)
        opt.num_threads = threads
        p.grad = g
        torch.set_flush_denormal(True)
        try:
            opt.step()
            opt.step()
        finally:
            torch.set_flush_denormal(False)
        out.append(p.detach().clone())
    differ = int((out[0].view(torch.int32) != out[1].view(torch.int32)).sum())
    assert differ == 0, (f"{differ} of {n} elements differ between 1 and 2 threads under flush-denormal "
                         f"(1 thread: {out[0][-1].item()!r}, 2 threads: {out[1][-1].item()!r} at the last element)")


# ---------------------------------------------------------------- FUSEDOPTIM_CPU_ISA (subprocess)
_PROBE = textwrap.dedent("""
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fusedoptim
    import torch
    info = fusedoptim.backend_info()
    p = torch.linspace(-3, 3, 37).requires_grad_()
    opt = fusedoptim.Adam([p], lr=0.1, amsgrad=True, weight_decay=0.1)
    for k in range(3):
        p.grad = torch.cos(torch.arange(37.0) * (k + 1))
        opt.step()
    print(json.dumps(dict(
        isa=info["isa"], supported=info["supported_isas"], request=info["isa_request"],
        honored=info["isa_request_honored"], backends=opt.last_backends,
        bits=p.detach().view(torch.int32).tolist(), module=fusedoptim.__file__,
        warnings=[(w.category.__name__, str(w.message)) for w in caught])))
""")


def _unsupported_isa():
    candidates = [isa for isa in ALL_ISAS if isa not in supported_isas()]
    return candidates[0] if candidates else None


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """The probe's output for each FUSEDOPTIM_CPU_ISA value the tests need
    (None: unset), every subprocess started at once: each spends seconds
    importing torch, and they overlap."""
    values = [None, "scalar", "SCALAR", "avx9000"] + ([_unsupported_isa()] if _unsupported_isa() else [])
    cwd = str(tmp_path_factory.mktemp("probe"))  # outside the checkout: only the installed package imports
    base = {k: v for k, v in os.environ.items() if k != "FUSEDOPTIM_CPU_ISA"}
    return run_at_once({value: ([sys.executable, "-c", _PROBE],
                                {"cwd": cwd, "env": base if value is None else dict(base, FUSEDOPTIM_CPU_ISA=value)})
                        for value in values}, timeout=180)


def _probe(probes, value):
    done = probes[value]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_process_bits(isa):
    fusedoptim.set_cpu_isa(isa)
    p = torch.linspace(-3, 3, 37).requires_grad_()
    opt = fusedoptim.Adam([p], lr=0.1, amsgrad=True, weight_decay=0.1)
    for k in range(3):
        p.grad = torch.cos(torch.arange(37.0) * (k + 1))
        opt.step()
    return p.detach().view(torch.int32).tolist()


def test_env_var_selects_scalar(probes, restore_isa):
    out = _probe(probes, "scalar")
    assert out["isa"] == "scalar"
    assert out["request"] == "scalar" and out["honored"] is True
    assert out["backends"] == ["native-cpu/scalar"]
    assert not [w for w in out["warnings"] if "FUSEDOPTIM_CPU_ISA" in w[1]], out["warnings"]
    assert out["bits"] == _in_process_bits("scalar")


def test_env_var_unset_uses_best_variant(probes):
    out = _probe(probes, None)
    best = [isa for isa in BEST_FIRST if isa in out["supported"]][0]
    assert out["isa"] == best and out["request"] is None and out["honored"] is True
    assert out["warnings"] == []
    # the subprocess imported the installed package, as this process did
    assert os.path.realpath(out["module"]) == os.path.realpath(fusedoptim.__file__)


@pytest.mark.parametrize("request_kind", ["unsupported", "unknown"])
def test_env_var_bad_request_warns_and_keeps_supported_isa(probes, request_kind):
    if request_kind == "unsupported":
        value = _unsupported_isa()
        if value is None:
            pytest.skip("this CPU supports every variant: nothing unsupported to request")
    else:
        value = "avx9000"
    out = _probe(probes, value)
    best = [isa for isa in BEST_FIRST if isa in out["supported"]][0]
    assert out["isa"] == best, out
    assert out["request"] == value and out["honored"] is False
    assert out["backends"] == [f"native-cpu/{best}"]
    msgs = [w for w in out["warnings"] if w[0] == "RuntimeWarning" and "FUSEDOPTIM_CPU_ISA" in w[1]]
    assert len(msgs) == 1, out["warnings"]
    assert value in msgs[0][1]
    if request_kind == "unknown":  # says it is no variant, and lists the names
        assert "is not a CPU variant" in msgs[0][1] and ", ".join(ALL_ISAS) in msgs[0][1], msgs[0][1]
    else:
        assert "cannot be used here" in msgs[0][1], msgs[0][1]


def test_env_var_and_set_cpu_isa_take_any_case(probes, restore_isa):
    out = _probe(probes, "SCALAR")
    assert out["isa"] == "scalar" and out["request"] == "SCALAR" and out["honored"] is True
    assert not [w for w in out["warnings"] if "FUSEDOPTIM_CPU_ISA" in w[1]], out["warnings"]
    for name in ("Scalar", "SCALAR"):
        fusedoptim.set_cpu_isa(name)
        assert fusedoptim.get_cpu_isa() == "scalar"
