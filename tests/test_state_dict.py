"""state_dict: torch's layout, and checkpoints moving both ways between
fusedoptim and torch.optim in the middle of a run."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fusedoptim
from cases import (ALL_CASES, CASES_BY_ID, DTYPE_IDS, DTYPES, SMALL_GROUP_SHAPES, assert_close,
                   assert_same_bits, make_problem, param_groups, record, state_tensors)
from tolerances import FP32_STATE_VS_TORCH, FP32_VS_TORCH, LOWP_ONE_STEP_VS_TORCH
from torch_versions import without_none

N_FIRST, N_SECOND = 20, 30


def _advance(opt, flat, problem, start, stop, dtype=None):
    for step in range(start, stop):
        for p, g in zip(flat, [g for row in problem.grads(step, dtype) for g in row]):
            p.grad = g
        opt.step()


def _start(case, which, problem, init=None):
    groups = param_groups(case, init if init is not None else problem.init)
    opt = case.make(which, groups)
    return opt, [p for g in groups for p in g["params"]]


def _current(flat, shapes):
    """The current param values, regrouped like the problem."""
    out, k = [], 0
    for group in shapes:
        out.append([flat[k + i].detach().clone() for i in range(len(group))])
        k += len(group)
    return out


def _uninterrupted(case, which, problem):
    opt, flat = _start(case, which, problem)
    _advance(opt, flat, problem, 0, N_FIRST + N_SECOND)
    return opt, flat


@pytest.mark.parametrize("direction", ["fusedoptim->torch", "torch->fusedoptim"])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_checkpoint_moves_between_libraries_mid_run(case, direction):
    src, dst = ("ours", "torch") if direction == "fusedoptim->torch" else ("torch", "ours")
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=21, steps=N_FIRST + N_SECOND)

    first, flat1 = _start(case, src, problem)
    _advance(first, flat1, problem, 0, N_FIRST)
    sd = copy.deepcopy(first.state_dict())
    second, flat2 = _start(case, dst, problem, init=_current(flat1, problem.shapes))
    second.load_state_dict(sd)
    # The loaded state is exactly what was saved.
    for p1, p2 in zip(flat1, flat2):
        assert first.state[p1].keys() == second.state[p2].keys()
        for k, v in first.state[p1].items():
            if v is None:  # torch 2.2's SGD without momentum: momentum_buffer None, loaded as it is
                assert second.state[p2][k] is None, f"loaded state[{k!r}]"
                continue
            assert_same_bits([second.state[p2][k]], [v], f"loaded state[{k!r}]")
    _advance(second, flat2, problem, N_FIRST, N_FIRST + N_SECOND)
    if dst == "ours":
        assert all(b.startswith("native-cpu/") for b in second.last_backends), \
            f"a state_dict from torch must be usable by the native path: {second.last_backends}"

    for which in ("torch", "ours"):
        ref_opt, ref_flat = _uninterrupted(case, which, problem)
        label = "torch" if which == "torch" else "fusedoptim"
        stats = assert_close([p.detach() for p in flat2], [p.detach() for p in ref_flat],
                             what=f"{case.id} {direction} vs uninterrupted {label}", **FP32_VS_TORCH)
        record(f"fp32 params after {direction} vs uninterrupted", stats, case.id)
        so, sr = state_tensors(second, flat2), state_tensors(ref_opt, ref_flat)
        assert so.keys() == sr.keys()
        for key in so:
            assert_close(so[key], sr[key], what=f"{case.id} {direction} state[{key!r}] vs uninterrupted {label}",
                         **FP32_STATE_VS_TORCH[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_state_dict_layout_matches_torch(case, dtype):
    gen = torch.Generator().manual_seed(2)
    shapes = [(), (7,), (3, 5), (4,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    sds = {}
    for which in ("ours", "torch"):
        params = [t.clone().requires_grad_() for t in init]
        opt = case.make(which, [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], foreach=None)
        for step in range(3):
            for p in params[:-1]:  # the last param never gets a grad
                p.grad = torch.ones_like(p) * (step + 1)
            opt.step()
        sds[which] = opt.state_dict()
    ours, theirs = sds["ours"], sds["torch"]
    assert ours.keys() == theirs.keys() == {"state", "param_groups"}
    # torch 2.2's SGD without momentum stores momentum_buffer None (no state in fusedoptim)
    theirs = dict(theirs, state=without_none(theirs["state"]))
    assert ours["param_groups"] == theirs["param_groups"], "param_groups differ from torch's"
    assert ours["state"].keys() == theirs["state"].keys(), \
        f"params with state: {sorted(ours['state'])} vs torch {sorted(theirs['state'])}"
    if case.kind == "sgd" and case.kwargs["momentum"] == 0:
        assert ours["state"] == {}, "SGD without momentum keeps no state in torch"
    else:
        assert sorted(ours["state"]) == [0, 1, 2]  # param 3 had no grad
    for i, st in ours["state"].items():
        assert set(st) == set(theirs["state"][i])
        assert set(st) == set(case.state_keys), f"param {i}: keys {sorted(st)}, expected {sorted(case.state_keys)}"
        for k, v in st.items():
            t = theirs["state"][i][k]
            assert isinstance(v, torch.Tensor) and v.dtype == t.dtype and v.shape == t.shape and v.device == t.device, \
                f"state[{i}][{k!r}]: {v.dtype}{tuple(v.shape)} vs torch {t.dtype}{tuple(t.shape)}"
            if k == "step":
                assert v.dim() == 0 and v.dtype == torch.float32 and float(v) == 3.0
                assert not v.requires_grad
            else:
                assert v.dtype == dtype and v.shape == init[i].shape


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES[::3] + [CASES_BY_ID["SGD-mom0.9-damp0.1-wd0.05"]], ids=repr)
def test_fusedoptim_to_fusedoptim_is_bit_exact(case, dtype):
    """Save mid-run, load into a fresh fusedoptim optimizer, continue: the
    same bits as never stopping, in every dtype."""
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=22, steps=N_FIRST + N_SECOND)
    ref_opt, ref_flat = _uninterrupted(case, "ours", problem)
    first, flat1 = _start(case, "ours", problem)
    _advance(first, flat1, problem, 0, N_FIRST)
    second, flat2 = _start(case, "ours", problem, init=_current(flat1, problem.shapes))
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _advance(second, flat2, problem, N_FIRST, N_FIRST + N_SECOND)
    assert_same_bits([p.detach() for p in flat2], [p.detach() for p in ref_flat], f"{case.id} resumed params")
    so, sr = state_tensors(second, flat2), state_tensors(ref_opt, ref_flat)
    for key in so:
        assert_same_bits(so[key], sr[key], f"{case.id} resumed state[{key!r}]")


@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["AdamW-wd0.1-max"],
                                  CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"], CASES_BY_ID["SGD-mom0-damp0-wd0"]],
                         ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_torch_save_load_round_trip(case, dtype):
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=23, steps=N_FIRST + N_SECOND)
    ref_opt, ref_flat = _uninterrupted(case, "ours", problem)
    first, flat1 = _start(case, "ours", problem)
    _advance(first, flat1, problem, 0, N_FIRST)
    buf = io.BytesIO()
    torch.save({"optim": first.state_dict(), "params": [p.detach() for p in flat1]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    loaded_params = ckpt["params"]
    assert_same_bits(loaded_params, [p.detach() for p in flat1], "saved params")
    second, flat2 = _start(case, "ours", problem, init=_current(loaded_params, problem.shapes))
    second.load_state_dict(ckpt["optim"])
    for p in flat2:
        st = second.state[p]
        if "step" in st:
            assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == N_FIRST
    _advance(second, flat2, problem, N_FIRST, N_FIRST + N_SECOND)
    assert_same_bits([p.detach() for p in flat2], [p.detach() for p in ref_flat], f"{case.id} after torch.save/load")


@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad-max"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0.05"]],
                         ids=repr)
def test_load_state_dict_into_the_same_optimizer_rewinds(case):
    """Loading an earlier state_dict into a running optimizer replaces its
    state (cached native plans must not keep writing the old tensors)."""
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=24, steps=30)
    opt, flat = _start(case, "ours", problem)
    _advance(opt, flat, problem, 0, 10)
    saved_sd = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in flat]
    _advance(opt, flat, problem, 10, 20)
    first_pass = [p.detach().clone() for p in flat]
    with torch.no_grad():
        for p, v in zip(flat, saved_params):
            p.copy_(v)
    opt.load_state_dict(saved_sd)
    _advance(opt, flat, problem, 10, 20)
    assert_same_bits([p.detach() for p in flat], first_pass, f"{case.id} replay after load_state_dict")
    # (like torch, the optimizer now shares tensors with `saved_sd`: torch's
    # load_state_dict does not copy tensors that already have the right dtype)
    for p in flat:
        for k, v in opt.state[p].items():
            assert v.shape == (() if k == "step" else p.shape)


def test_state_dict_from_torch_with_other_dtype_is_cast_like_torch():
    """torch casts loaded state to the param's dtype (except `step`); a
    checkpoint from an fp32 run then drives a bf16 run natively."""
    p32 = torch.randn(33, requires_grad=True)
    t = torch.optim.Adam([p32], lr=0.1, foreach=False)
    for _ in range(3):
        p32.grad = torch.randn(33)
        t.step()
    sd = t.state_dict()
    results = {}
    for which, cls in (("ours", fusedoptim.Adam), ("torch", torch.optim.Adam)):
        pb = p32.detach().to(torch.bfloat16).requires_grad_()
        opt = cls([pb], lr=0.1) if which == "ours" else cls([pb], lr=0.1, foreach=False)
        opt.load_state_dict(copy.deepcopy(sd))
        st = opt.state[pb]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["step"].dtype == torch.float32
        pb.grad = torch.ones(33, dtype=torch.bfloat16)
        opt.step()
        if which == "ours":
            assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"]
        results[which] = pb.detach().float()
        assert float(opt.state[pb]["step"]) == 4.0
    # bf16 arithmetic differs (torch rounds intermediates); one step stays within 2 bf16 ulps.
    assert_close([results["ours"]], [results["torch"]], what="one bf16 step after loading", **LOWP_ONE_STEP_VS_TORCH)


# ---------------------------------------------------------------- resetting state mid-run
RESETS = {
    "state.clear()": lambda opt, flat: opt.state.clear(),
    "state[p] = {}": lambda opt, flat: [opt.state.__setitem__(p, {}) for p in flat],
    "del state[p]": lambda opt, flat: [opt.state.__delitem__(p) for p in flat if p in opt.state],
    "state = defaultdict(dict)": lambda opt, flat: setattr(opt, "state", __import__("collections").defaultdict(dict)),
}


@pytest.mark.parametrize("reset", sorted(RESETS))
@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]],
                         ids=repr)
def test_resetting_state_mid_run_restarts_like_torch(case, reset):
    """Common ways to reset an optimizer's state: torch then starts over
    (step 0, zero moments, buf = grad); fusedoptim must do the same, not
    keep updating the old state tensors through a cached plan."""
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=25, steps=12)
    out = {}
    for which in ("ours", "torch"):
        opt, flat = _start(case, which, problem)
        _advance(opt, flat, problem, 0, 6)
        RESETS[reset](opt, flat)
        _advance(opt, flat, problem, 6, 12)
        out[which] = (opt, flat)
    opt_o, flat_o = out["ours"]
    opt_t, flat_t = out["torch"]
    for k, (po, pt) in enumerate(zip(flat_o, flat_t)):
        assert set(opt_o.state[po]) == set(opt_t.state[pt]) == set(case.state_keys), f"param {k} state keys"
        if "step" in opt_t.state[pt]:
            assert float(opt_o.state[po]["step"]) == float(opt_t.state[pt]["step"]) == 6.0
    assert_close([p.detach() for p in flat_o], [p.detach() for p in flat_t], what=f"{case.id} after {reset}",
                 **FP32_VS_TORCH)
