"""Threads and many tensors: fusedoptim's own thread pool next to torch's
intra-op threads and Python threads; 300+ tensors of odd sizes and mixed
dtypes in one group."""

from __future__ import annotations

import threading

import pytest
import torch

import fusedoptim
from cases import CASES_BY_ID, DTYPE_IDS, assert_close, assert_same_bits, make_problem, param_groups
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
def test_optimizer_in_a_python_thread_while_torch_runs(case):
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


def test_two_optimizers_stepping_concurrently_from_python_threads():
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
