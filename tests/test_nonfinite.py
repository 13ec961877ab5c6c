"""NaN and inf in grads and params propagate as in torch, and grads are never written."""

from __future__ import annotations

import pytest
import torch

import fusedoptim
from cases import ALL_CASES, DTYPE_IDS, DTYPES, INT_VIEW, assert_close, param_groups, special_problem
from tolerances import FP16_ADAM_EPS, FP32_CLOSED_FORM, FP32_VS_TORCH


def _run(case, which, dtype, compute_dtype=None, group_extra=None):
    init, grads = special_problem(dtype)
    groups = param_groups(case, init, dtype=compute_dtype, group_extra=group_extra)
    opt = case.make(which, groups)
    flat = [p for g in groups for p in g["params"]]
    for row in grads:
        gs = [g for r in row for g in r]
        for p, g in zip(flat, gs):
            p.grad = g.to(compute_dtype) if compute_dtype is not None else g
        opt.step()
    return [p.detach().clone() for p in flat], opt


def _masks(t):
    return torch.isnan(t), torch.isinf(t) & (t > 0), torch.isinf(t) & (t < 0)


def _diff_positions(a, b):
    return torch.nonzero(a.reshape(-1) != b.reshape(-1)).reshape(-1)[:8].tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_nan_and_inf_propagate_like_torch(case, dtype):
    extra = {"eps": FP16_ADAM_EPS} if dtype == torch.float16 and case.kind != "sgd" else None
    ours, opt = _run(case, "ours", dtype, group_extra=extra)
    assert all(b.startswith("native-cpu/") for b in opt.last_backends)
    theirs, _ = _run(case, "torch", dtype, group_extra=extra)
    assert any(torch.isnan(p).any() for p in theirs), "the problem must produce NaNs"
    if dtype in (torch.float32, torch.bfloat16):
        # Same dtype, same range: NaN, +inf and -inf at exactly torch's places.
        for k, (a, b) in enumerate(zip(ours, theirs)):
            for name, ma, mb in zip(("NaN", "+inf", "-inf"), _masks(a), _masks(b)):
                assert torch.equal(ma, mb), (f"{case.id} {DTYPE_IDS[dtype]} param {k}: {name} positions differ "
                                             f"from torch at flat indices {_diff_positions(ma, mb)}")
        if dtype == torch.float32:
            fin = [torch.where(torch.isfinite(a), a, torch.zeros_like(a)) for a in ours]
            fin_t = [torch.where(torch.isfinite(a), b, torch.zeros_like(b)) for a, b in zip(ours, theirs)]
            assert_close(fin, fin_t, what=f"{case.id} finite values next to NaN/inf", **FP32_VS_TORCH)
    else:
        # torch's fp16 for-loop rounds every intermediate to fp16, so e.g.
        # grad + wd * param overflows to inf at 65504 where fp32 math does not.
        # fusedoptim computes in fp32: its NaNs are exactly those of torch's
        # fp32 run on the same (upcast) values, and each is also a NaN in
        # torch's fp16 run.
        ref32, _ = _run(case, "torch", dtype, compute_dtype=torch.float32, group_extra=extra)
        for k, (a, b, r) in enumerate(zip(ours, theirs, ref32)):
            assert torch.equal(torch.isnan(a), torch.isnan(r)), \
                (f"{case.id} fp16 param {k}: NaN positions differ from torch fp32 at "
                 f"{_diff_positions(torch.isnan(a), torch.isnan(r))}")
            extra_nan = torch.isnan(a) & ~torch.isnan(b)
            assert not extra_nan.any(), f"{case.id} fp16 param {k}: NaN where torch fp16 has none: {_diff_positions(extra_nan, torch.zeros_like(extra_nan))}"


def test_nan_grad_only_poisons_its_own_element():
    p = torch.zeros(100, requires_grad=True)
    opt = fusedoptim.Adam([p], lr=0.1)
    g = torch.ones(100)
    g[37] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p[37]) and torch.isnan(opt.state[p]["exp_avg"][37]) and torch.isnan(opt.state[p]["exp_avg_sq"][37])
    others = torch.cat([p[:37], p[38:]]).detach()
    assert torch.isfinite(others).all()
    assert_close([others], [torch.full((99,), -0.1)], what="finite neighbours of a NaN grad", **FP32_CLOSED_FORM)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_grads_are_never_written(case, dtype):
    """Grads keep their bits: contiguous grads on the native path, a
    transposed grad (read through a copy) and fp64 params on torch's path."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(7,), (5, 9), (1031,)]]
    opt = case.make("ours", [{"params": params}])
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        grads[0][2] = float("nan")
        grads[2][100] = float("inf")
        grads[1] = torch.randn(9, 5, generator=gen).to(dtype).t()  # transposed grad of a contiguous param
        before = [g.clone() for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for k, (g, b) in enumerate(zip(grads, before)):
            assert params[k].grad is g, "the optimizer replaced a grad"
            assert g.stride() == b.stride()
            assert torch.equal(g.view(INT_VIEW[dtype]), b.view(INT_VIEW[dtype])), f"grad {k} written at step {step}"
    expected = "torch" if dtype == torch.float64 else f"native-cpu/{fusedoptim.get_cpu_isa()}"
    assert opt.last_backends == [expected]


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_huge_grad_does_not_freeze_param(cls):
    """torch computes (1 - beta2) * g * g as ((1 - beta2) * g) * g (addcmul),
    which stays finite for |g| up to ~5.8e20 in fp32; computing g * g first
    overflows to inf above ~1.8e19, making exp_avg_sq inf for good and
    freezing the element (every later update is m / inf = 0)."""
    ours_cls, torch_cls = {"Adam": (fusedoptim.Adam, torch.optim.Adam), "AdamW": (fusedoptim.AdamW, torch.optim.AdamW)}[cls]
    out = {}
    for which, c, kw in (("ours", ours_cls, {}), ("torch", torch_cls, {"foreach": False})):
        p = torch.zeros(9, requires_grad=True)
        opt = c([p], lr=0.1, **kw)
        for g in (1e20, 1.0, 1.0, 1.0):
            p.grad = torch.full((9,), g)
            opt.step()
        out[which] = (p.detach().clone(), opt.state[p]["exp_avg_sq"].clone())
    assert torch.isfinite(out["torch"][1]).all()
    assert torch.isfinite(out["ours"][1]).all(), f"exp_avg_sq overflowed to {out['ours'][1][0].item()}"
    assert_close([out["ours"][0]], [out["torch"][0]], what=f"{cls} after a 1e20 grad", **FP32_VS_TORCH)
