"""Threads and many tensors: the step on torch's OpenMP team and on
fusedoptim's own pool, next to torch's intra-op threads and Python threads; 300+ tensors of odd sizes and mixed
dtypes in one group."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
import torch

import fusedoptim
from cases import CASES_BY_ID, DTYPE_IDS, assert_close, assert_same_bits, make_problem, param_groups
from subprocesses import run_at_once
from tolerances import FP32_VS_TORCH

CASES = [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["AdamW-wd0.1-max"], CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"]]
SHAPES = [[(90001,), (17,)], [(50003,), (7, 3)]]  # large enough to be split across threads


def _ids(c):
    return c.id


def _run(case, dtype, steps, between=None, threads=None):
    problem = make_problem(SHAPES, dtype, seed=41, steps=steps)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups)
    opt.num_threads = threads
    flat = [p for g in groups for p in g["params"]]
    for step in range(steps):
        if between is not None:
            between(step)
        for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.step()
        assert all(b.startswith("native-cpu") for b in opt.last_backends)
    return [p.detach().clone() for p in flat] + [t.clone() for p in flat for t in opt.state[p].values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_interleaved_with_torch_ops_and_changing_torch_threads(case, dtype):
    ref = _run(case, dtype, 8, threads=1)
    a = torch.randn(128, 128, dtype=torch.float64)
    expected = a @ a

    def between(step):
        torch.set_num_threads((1, 2, 2, 1)[step % 4])
        c = a @ a  # torch's own parallel kernels between our steps
        torch.testing.assert_close(c, expected)
        if step == 4:
            fusedoptim.set_num_threads(1 + step % 2)

    got = _run(case, dtype, 8, between=between)
    fusedoptim.set_num_threads(None)
    assert_same_bits(got, ref, f"{case.id} with torch threads changing between steps")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_optimizer_in_a_python_thread_while_torch_runs(case, threads_backend):
    ref = _run(case, torch.float32, 10, threads=2)
    result, errors = {}, []

    def worker():
        try:
            result["got"] = _run(case, torch.float32, 10, threads=2)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    t = threading.Thread(target=worker)
    x = torch.randn(256, 256, dtype=torch.float64)
    expected = x @ x
    t.start()
    rounds = 0
    while t.is_alive() or rounds == 0:
        torch.testing.assert_close(x @ x, expected)
        rounds += 1
    t.join()
    assert not errors, errors
    assert_same_bits(result["got"], ref, f"{case.id} stepped from a Python thread")


def test_two_optimizers_stepping_concurrently_from_python_threads(threads_backend):
    """Two optimizers share fusedoptim's thread pool from two Python threads."""
    cases = [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]]
    refs = [_run(c, torch.float32, 10, threads=2) for c in cases]
    results, errors = [None, None], []

    def worker(k):
        try:
            for _ in range(3):
                results[k] = _run(cases[k], torch.float32, 10, threads=2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        assert_same_bits(results[k], refs[k], f"{cases[k].id} concurrent with another optimizer")


# ---------------------------------------------------------------- many tensors, mixed dtypes
def _many_params(seed=42, n=320):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(1, 700, (n,), generator=gen)]
    sizes[::37] = [1] * len(sizes[::37])
    params, dtypes = [], []
    for k, s in enumerate(sizes):
        dtype = torch.bfloat16 if k % 3 == 1 else torch.float32
        shape = (s,) if k % 5 else (1, s)
        params.append(torch.randn(shape, generator=gen).to(dtype))
        dtypes.append(dtype)
    params.append(torch.randn((), generator=gen))
    return params


def _many_run(case, which, params, steps=12, split_by_dtype=False):
    ps = [p.clone().requires_grad_() for p in params]
    if split_by_dtype:
        groups = [{"params": [p for p in ps if p.dtype == dt]} for dt in (torch.float32, torch.bfloat16)]
    else:
        groups = [{"params": ps}]
    opt = case.make(which, groups)
    gen = torch.Generator().manual_seed(43)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("case", CASES + [CASES_BY_ID["SGD-mom0-damp0-wd0"]], ids=_ids)
def test_many_tensors_mixed_dtypes_in_one_group(case):
    params = _many_params()
    assert len(params) > 300
    ours, opt = _many_run(case, "ours", params)
    assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"], \
        "fp32 and bf16 params of one group are two native buckets, not a fallback"
    # Each param's math does not depend on its neighbours: the same bits as
    # with one group per dtype.
    split, _ = _many_run(case, "ours", params, split_by_dtype=True)
    assert_same_bits([p.detach() for p in ours], [p.detach() for p in split], "mixed group vs one group per dtype")
    # fp32 params against torch
    theirs, _ = _many_run(case, "torch", params)
    fp32 = [(a.detach(), b.detach()) for a, b in zip(ours, theirs) if a.dtype == torch.float32]
    assert_close([a for a, _ in fp32], [b for _, b in fp32], what=f"{case.id} 300+ tensors (fp32 ones)", **FP32_VS_TORCH)
    # state has the right dtypes and shapes for every tensor
    for p in ours:
        for k, v in opt.state[p].items():
            if k == "step":
                assert v.dtype == torch.float32 and float(v) == 12.0
            else:
                assert v.dtype == p.dtype and v.shape == p.shape


# ---------------------------------------------------------------- whose threads: torch's OpenMP team or our pool
BACKENDS = ("openmp", "pool")


@pytest.fixture(params=BACKENDS)
def threads_backend(request):
    """Runs a test on torch's OpenMP team and on fusedoptim's own pool."""
    if request.param == "openmp" and "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch was built without OpenMP")
    before = fusedoptim.get_threads_backend()
    fusedoptim.set_threads_backend(request.param)
    assert fusedoptim.get_threads_backend() == request.param
    yield request.param
    fusedoptim.set_threads_backend("auto")
    assert fusedoptim.get_threads_backend() == before


def test_default_threads_are_torchs_openmp_team():
    """Where torch runs on OpenMP, the step runs on the runtime torch loaded,
    found in the process, not one of our own."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch was built without OpenMP")
    assert fusedoptim.get_threads_backend() == "openmp"
    threading_ = fusedoptim.backend_info()["threading"]
    assert threading_.startswith("openmp (") and threading_.endswith(")"), threading_
    path = threading_[len("openmp ("):-1]
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert path in maps, f"{path} is not a library loaded in this process"


def test_threads_backend_names():
    with pytest.raises(ValueError, match="unknown threads backend 'bogus'"):
        fusedoptim.set_threads_backend("bogus")
    fusedoptim.set_threads_backend("pool")
    try:
        assert fusedoptim.get_threads_backend() == "pool"
        assert fusedoptim.backend_info()["threading"] == "pool"
    finally:
        fusedoptim.set_threads_backend("auto")


@pytest.mark.parametrize("case", CASES + [CASES_BY_ID["SGD-mom0-damp0-wd0"]], ids=_ids)
def test_same_bits_for_every_thread_count_on_either_backend(case, threads_backend):
    """Threads claim chunks in whatever order they arrive; the bits never
    depend on that, nor on the thread count."""
    shapes = [[(300_007,), (17,), (65_600,)], [(130_001,), (7, 3)]]
    problem = make_problem(shapes, torch.float32, seed=5, steps=4)
    results = []
    for threads in (1, 2, 3, 5):
        groups = param_groups(case, problem.init)
        opt = case.make("ours", groups)
        opt.num_threads = threads
        flat = [p for g in groups for p in g["params"]]
        for step in range(4):
            torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # torch's team runs just before
            for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
                p.grad = g
            opt.step()
        assert all(b.startswith("native-cpu") for b in opt.last_backends)
        results.append([p.detach().clone() for p in flat] + [t.clone() for p in flat for t in opt.state[p].values()])
    for threads, got in zip((2, 3, 5), results[1:]):
        assert_same_bits(got, results[0], f"{case.id}: {threads} threads on {threads_backend} vs 1 thread")


def test_grad_norm_same_bits_on_either_backend(threads_backend):
    """Clipping's grad norm sums fixed chunks in a fixed order."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (400_003, 5, 70_000)]
    grads = [torch.randn(p.shape, generator=gen) * 10 for p in params]
    norms = []
    for threads in (1, 2, 4):
        opt = fusedoptim.AdamW([p.detach().clone().requires_grad_() for p in params], max_grad_norm=1.0)
        opt.num_threads = threads
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad = g.clone()
        opt.step()
        norms.append(opt.last_grad_norm.clone())
    assert norms[0].item() > 1.0
    for got in norms[1:]:
        assert got.view(torch.int32).item() == norms[0].view(torch.int32).item(), (got, norms[0])


def test_step_leaves_torchs_workers_floating_point_mode_alone(threads_backend):
    """The step runs torch's workers in the caller's flush-to-zero mode and
    gives them their own back: a torch op after it keeps its denormals."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_denormals_after_flushed_step()
    finally:
        torch.set_num_threads(saved_threads)


def _check_denormals_after_flushed_step():
    p = torch.zeros(400_000, requires_grad=True)
    p.grad = torch.full_like(p, 1e-39)
    opt = fusedoptim.SGD([p], lr=1.0)
    opt.num_threads = 2
    torch.set_flush_denormal(True)
    try:
        opt.step()
    finally:
        torch.set_flush_denormal(False)
    assert int((p.detach() == 0).sum()) == p.numel()  # flushed, as the caller asked
    x = torch.full((1 << 21,), 1e-39)
    y = x * 1.0  # split across torch's threads
    assert int((y == 0).sum()) == 0, "a torch worker was left flushing denormals"


_ENV_PROBE = ("import warnings, json\nwith warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always')\n    import fusedoptim\n"
              "info = fusedoptim.backend_info()\n"
              "print(json.dumps([info['threading'], info['q8_passes'], [str(x.message) for x in w]]))")
_ENV_VALUES = [("FUSEDOPTIM_THREADS", "pool"), ("FUSEDOPTIM_THREADS", "bogus"),
               ("FUSEDOPTIM_Q8_PASSES", "separate"), ("FUSEDOPTIM_Q8_PASSES", "bogus")]


@pytest.fixture(scope="module")
def env_probes():
    """The probe's stdout for each environment setting, the subprocesses
    started at once (each spends seconds importing torch)."""
    done = run_at_once({(var, value): ([sys.executable, "-c", _ENV_PROBE], {"env": dict(os.environ, **{var: value})})
                        for var, value in _ENV_VALUES}, timeout=180)
    assert all(d.returncode == 0 for d in done.values()), {v: d.stderr for v, d in done.items()}
    return {key: json.loads(d.stdout.strip().splitlines()[-1]) for key, d in done.items()}


@pytest.mark.parametrize("value, expect", [("pool", "pool"), ("bogus", None)])
def test_threads_environment_variable(env_probes, value, expect):
    threading_, _, warned = env_probes[("FUSEDOPTIM_THREADS", value)]
    if expect is not None:
        assert threading_ == expect
        assert not [w for w in warned if "FUSEDOPTIM_THREADS" in w]
    else:
        assert any("FUSEDOPTIM_THREADS='bogus' is not a threads backend" in w for w in warned), warned


def test_q8_passes_environment_variable(env_probes):
    """FUSEDOPTIM_Q8_PASSES forces the arrangement at import (the scalar
    variant has only separate passes, so any variant shows it); a bad value
    warns and leaves the automatic choice."""
    _, passes, warned = env_probes[("FUSEDOPTIM_Q8_PASSES", "separate")]
    assert passes == "separate"
    assert not [w for w in warned if "FUSEDOPTIM_Q8_PASSES" in w]
    _, passes, warned = env_probes[("FUSEDOPTIM_Q8_PASSES", "bogus")]
    assert passes.endswith(" (auto)")
    assert any("FUSEDOPTIM_Q8_PASSES='bogus' is not an arrangement" in w for w in warned), warned
