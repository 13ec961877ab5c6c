"""Parity with torch.optim's for-loop implementation (foreach=False).

Every flag combination of the registry x fp32 / bf16 / fp16 x odd sizes
(0-d, 1, 7, 17, 15, 33, 66, 1031, 64) in three param groups with different
hyperparameters x 50 steps; a subset also on 1000003 elements.

fp32 is compared elementwise with tight tolerances. bf16 / fp16 are compared
against an fp32 reference (torch fp32 on the same values upcast, and the
float64 NumPy reference): fusedoptim's error must be no worse than torch's
own bf16 / fp16 error, within a factor of 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusedoptim
from cases import (ADAM_CASES, ALL_CASES, DTYPE_IDS, LARGE_CASES, LARGE_GROUP_SHAPES, LOWP_DTYPES,
                   SMALL_GROUP_SHAPES, assert_close, errors, flat64, make_problem, record, run_case, run_numpy,
                   state_tensors)
from tolerances import (FP16_ADAM_EPS, FP16_DEFAULT_EPS_MAX_ABS, FP32_STATE_VS_TORCH, FP32_VS_NUMPY, FP32_VS_TORCH,
                        LOWP_FLOOR_ULPS, LOWP_MAX_RATIO)
from torch_versions import without_none


def _flat_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def check_fp32_against_torch(case, problem, label):
    ours, o = run_case(case, "ours", problem)
    theirs, t = run_case(case, "torch", problem)
    assert all(b.startswith("native-cpu/") and "+" not in b for b in o.last_backends), o.last_backends

    stats = assert_close(ours, theirs, what=f"{case.id} fp32 params vs torch", **FP32_VS_TORCH)
    record(f"fp32 params vs torch ({label})", stats, case.id)

    # The state: same keys per param as torch (torch 2.2's SGD without momentum
    # stores momentum_buffer None, fusedoptim nothing), same values.
    ps_o, ps_t = _flat_params(o), _flat_params(t)
    for k, (po, pt) in enumerate(zip(ps_o, ps_t)):
        keys_t = without_none(t.state[pt]).keys()
        assert set(o.state[po].keys()) == set(keys_t) == set(case.state_keys), \
            f"param {k}: state keys {sorted(o.state[po])} vs torch {sorted(keys_t)}"
    so, st = state_tensors(o, ps_o), state_tensors(t, ps_t)
    assert so.keys() == st.keys()
    for key in so:
        for a, b in zip(so[key], st[key]):
            assert a.dtype == b.dtype and a.shape == b.shape, f"state[{key!r}]: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        stats = assert_close(so[key], st[key], what=f"{case.id} fp32 state[{key!r}] vs torch", **FP32_STATE_VS_TORCH[key])
        record(f"fp32 state[{key}] vs torch", stats, case.id)
    return ours


@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_fp32_matches_torch(case):
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=1)
    check_fp32_against_torch(case, problem, "small sizes")


@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_fp32_matches_torch_other_seed(case):
    """A second problem (other values, other sizes) so tolerances are not tuned to one draw."""
    shapes = [[(15,), (5, 5)], [(9, 1, 7)], [(0,), (127,), (2,)]]
    problem = make_problem(shapes, torch.float32, seed=2, steps=60)
    check_fp32_against_torch(case, problem, "small sizes")


def _lowp_group_extra(case, dtype):
    if dtype == torch.float16 and case.kind != "sgd":
        return {"eps": FP16_ADAM_EPS}
    return None


def _err_max_rms(x: np.ndarray, ref: np.ndarray):
    d = np.abs(x - ref)
    d[~np.isfinite(d)] = np.inf
    return float(d.max()), float(np.sqrt(np.mean(d * d)))


def check_lowp(case, dtype, problem, label, with_numpy=True):
    extra = _lowp_group_extra(case, dtype)
    ours, o = run_case(case, "ours", problem, group_extra=extra)
    assert all(b.startswith("native-cpu/") and "+" not in b for b in o.last_backends), o.last_backends
    theirs, _ = run_case(case, "torch", problem, group_extra=extra)
    ref32, _ = run_case(case, "torch", problem, dtype=torch.float32, group_extra=extra)
    refs = [("fp32 torch", flat64(ref32))]
    if with_numpy:
        refs.append(("float64 numpy", flat64(run_numpy(case, problem, group_extra=extra))))

    a, b = flat64(ours), flat64(theirs)
    assert np.isfinite(a).all(), f"{case.id} {DTYPE_IDS[dtype]}: fusedoptim produced {int((~np.isfinite(a)).sum())} non-finite values"
    eps = float(torch.finfo(dtype).eps)
    for ref_name, ref in refs:
        floor = LOWP_FLOOR_ULPS * eps * float(np.abs(ref).max(initial=1.0))
        ours_max, ours_rms = _err_max_rms(a, ref)
        torch_max, torch_rms = _err_max_rms(b, ref)
        record(f"{DTYPE_IDS[dtype]} params vs {ref_name}: fusedoptim ({label})", dict(abs=ours_max, rel=0.0), case.id)
        record(f"{DTYPE_IDS[dtype]} params vs {ref_name}: torch ({label})", dict(abs=torch_max, rel=0.0), case.id)
        msg = (f"{case.id} {DTYPE_IDS[dtype]} vs {ref_name} reference: fusedoptim max/rms error "
               f"{ours_max:.3e}/{ours_rms:.3e}, torch {torch_max:.3e}/{torch_rms:.3e}, "
               f"allowed {LOWP_MAX_RATIO}x torch + {floor:.2e}")
        assert ours_max <= LOWP_MAX_RATIO * torch_max + floor, msg
        assert ours_rms <= LOWP_MAX_RATIO * torch_rms + floor, msg
    record(f"{DTYPE_IDS[dtype]} params vs torch {DTYPE_IDS[dtype]} (same dtype)", errors(ours, theirs), case.id)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_lowp_error_no_worse_than_torch(case, dtype):
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=1)
    check_lowp(case, dtype, problem, "small sizes")


@pytest.mark.parametrize("case", ADAM_CASES[:4] + [c for c in ADAM_CASES if "amsgrad-max" in c.id], ids=repr)
def test_fp16_adam_default_eps_stays_finite_and_accurate(case):
    """With eps=1e-8, fp16 Adam in torch's for-loop divides by an eps that
    rounds to 0; fusedoptim computes in fp32 and must stay finite and close
    to the fp32 reference."""
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float16, seed=1)
    ours, _ = run_case(case, "ours", problem)
    ref32, _ = run_case(case, "torch", problem, dtype=torch.float32)
    a = flat64(ours)
    assert np.isfinite(a).all(), f"{case.id}: {int((~np.isfinite(a)).sum())} non-finite values"
    stats = errors(ours, ref32)
    record("fp16 params vs fp32 torch: fusedoptim (Adam, eps=1e-8)", stats, case.id)
    assert stats["abs"] <= FP16_DEFAULT_EPS_MAX_ABS, stats


@pytest.mark.parametrize("case,dtype", LARGE_CASES, ids=[f"{c.id}-{DTYPE_IDS[d]}" for c, d in LARGE_CASES])
def test_large_tensor(case, dtype):
    """1000003 elements (plus a 7-element tensor): many vector iterations,
    a scalar tail, and a split across threads."""
    problem = make_problem(LARGE_GROUP_SHAPES, dtype, seed=3)
    if dtype == torch.float32:
        ours = check_fp32_against_torch(case, problem, "1000003 elements")
        stats = assert_close(ours, run_numpy(case, problem), what=f"{case.id} fp32 vs numpy (large)", **FP32_VS_NUMPY)
        record("fp32 params vs numpy (1000003 elements)", stats, case.id)
    else:
        # (the NumPy reference is skipped here only to keep the suite fast; the
        # small-size tests compare every case against it)
        check_lowp(case, dtype, problem, "1000003 elements", with_numpy=False)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_sgd_single_step_rounds_once_to_nearest_even(dtype):
    """One plain-SGD step computes p + (-lr) * g in fp32 and rounds once to
    the storage dtype, to nearest even. With lr a power of two the exact
    value is representable in float64, so the expected bits are
    round_to_dtype(round_to_fp32(exact))."""
    lr = 2.0 ** -7
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(4099, generator=gen).to(dtype)
    g = (torch.randn(4099, generator=gen) * 3).to(dtype)
    # Include exact ties of the final rounding: p0 + lr*g halfway between two
    # representable values of the dtype.
    p0[:16] = torch.tensor(1.0, dtype=dtype)
    ulp = float(torch.finfo(dtype).eps)
    g[:8] = torch.tensor(ulp / 2 / lr, dtype=dtype) * torch.tensor([1, -1, 3, -3, 5, -5, 7, -7], dtype=dtype)
    p = p0.clone().requires_grad_()
    opt = fusedoptim.SGD([p], lr=lr)
    p.grad = g
    opt.step()
    assert opt.last_backends == ["native-cpu/" + fusedoptim.get_cpu_isa()]
    exact = p0.double() - lr * g.double()
    expected = exact.float().to(dtype)
    assert torch.equal(p.detach().view(torch.int16), expected.view(torch.int16)), \
        f"{int((p.detach() != expected).sum())} elements not rounded to nearest even"


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.0, 0.99), (0.3, 0.9), (0.5, 0.999), (0.95, 0.5)], ids=str)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_unusual_betas_match_torch_and_numpy(cls, betas):
    """beta1 = 0 (m = g: RMSprop-like, common in GAN training) and beta1 <= 0.5:
    the lerp weight 1 - beta1 is >= 0.5. Grads alternate between magnitude 1
    and 1e-6, so a formula that computes m + 1 * (g - m) cancels catastrophically
    where torch's lerp and the published formula give m = g exactly."""
    from cases import OptCase

    ours_cls, torch_cls = {"Adam": (fusedoptim.Adam, torch.optim.Adam), "AdamW": (fusedoptim.AdamW, torch.optim.AdamW)}[cls]
    case = OptCase(f"{cls}-betas{betas}", ours_cls, torch_cls, dict(lr=0.1, betas=betas, weight_decay=0.01),
                   cls.lower())

    class Alternating:
        shapes = [[(1000,)]]
        init = [[torch.zeros(1000)]]
        steps = 20

        @staticmethod
        def grads(step, dtype=None):
            gen = torch.Generator().manual_seed(step)
            return [[torch.randn(1000, generator=gen) * (1.0 if step % 2 == 0 else 1e-6)]]

    ours, o = run_case(case, "ours", Alternating)
    theirs, t = run_case(case, "torch", Alternating)
    assert o.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"]
    po, pt = _flat_params(o)[0], _flat_params(t)[0]
    assert_close([o.state[po]["exp_avg"]], [t.state[pt]["exp_avg"]], what=f"{case.id} exp_avg vs torch",
                 **FP32_STATE_VS_TORCH["exp_avg"])
    assert_close(ours, theirs, what=f"{case.id} params vs torch", **FP32_VS_TORCH)
    assert_close(ours, run_numpy(case, Alternating), what=f"{case.id} params vs numpy", **FP32_VS_NUMPY)
