"""The CUDA path, proven on the CPU: the kernels of csrc/cuda/mta.h compiled
for the host (``_C.cuda_emulation``, Note [CUDA emulation]).

Inside ``fusedoptim.backends.cuda.emulate()`` the optimizers send CPU params through
the whole CUDA path: state created in torch's layout (device step counters
with ``capturable=True`` or ``fused=True``), AMP ``grad_scale``/``found_inf``
handed to the kernels as pointers, tensors packed into launches of the large
or small kernel parameter block. Every test checks the emulated step against

* the CPU native path with the scalar variant, **bit for bit** (params,
  every state tensor, step counters): the kernels call the same update math
  with correctly rounded operations, and bf16/fp16 use the same conversions;
* torch.optim's for-loop on the same CPU tensors: fp32 within
  ``tolerances.FP32_VS_TORCH``; bf16/fp16 with an error against an fp32 run
  no worse than torch's own (``LOWP_MAX_RATIO``).

torch's ``capturable=True`` refuses CPU tensors (it asserts CUDA/XLA/...
params) and its ``fused=True`` runs torch's own CPU kernel, so the torch
reference of those modes is torch's for-loop without the flag: the flags
change where the step counter lives and who increments it, not the math.
(The one place torch's fused=True CPU step is the reference is the state a
skipped first step leaves; before torch 2.4, which has no such step, that
state is spelled out.)

AMP as GradScaler drives a ``fused=True`` optimizer: ``opt.grad_scale`` and
``opt.found_inf`` set before the step. What the tests pin down:
found_inf = 0 unscales the grads in the kernel, written back, bit-identical
to dividing them by hand; found_inf = 1 after real steps writes nothing at
all; found_inf = 1 on the *first* Adam step writes no param or grad but
leaves the state created (zero moments, step 0), which is exactly what
torch's own fused=True step leaves; on the first SGD step it leaves no
momentum buffer (torch's fused SGD leaves an uninitialised one), so the next
real step starts with buf = grad as torch's for-loop does.

The torch reference never runs under ``emulate()``. Emulation runs every
(block, thread) of a launch one after the other, so the big tensors here are
the few chunk-boundary cases only.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import fusedoptim
from fusedoptim import _C
from fusedoptim.backends import cuda as _cuda
from cases import (ALL_CASES, CASES_BY_ID, DTYPE_IDS, DTYPES, SMALL_GROUP_SHAPES, OptCase, assert_close,
                   assert_same_bits, assert_snapshot_equal, bits, flat64, make_problem, param_groups, record, run_case,
                   scalar_cpu, snapshot, special_problem, state_tensors)
from tolerances import (FP16_ADAM_EPS, FP32_STATE_VS_TORCH, FP32_TRAINING_LOOP, FP32_VS_TORCH, LOWP_FLOOR_ULPS,
                        LOWP_MAX_RATIO)
from torch_versions import (CPU_FUSED_ADAM, GRAD_SCALER, NO_GRAD_SCALER, NO_SGD_FUSED, SGD_HAS_FUSED,
                            without_none)

EMULATED = "native-cuda-emulated"

#: Adam's CUDA modes: where the step counter lives. "host-steps" is torch's
#: default layout (a CPU float32 counter the host increments before the
#: launch); "capturable" and "fused" keep it on the param's device and a
#: kernel increments it (under emulation the "device" is the CPU).
ADAM_MODES: Dict[str, Dict[str, Any]] = {"host-steps": {}, "capturable": {"capturable": True}, "fused": {"fused": True}}

#: Tensors one launch carries (csrc/cuda/mta.h: AdamArgs<448>/<48>, SGDArgs<672>/<80>).
CAPACITY = {("adam", "large"): 448, ("adam", "small"): 48, ("sgd", "large"): 672, ("sgd", "small"): 80}
PARAM_BYTES = {"large": 32764, "small": 4096}  # Note [kernel parameter space]
K_CHUNK, K_PAD = 8192, 8


def _family(case: OptCase) -> str:
    return "sgd" if case.kind == "sgd" else "adam"


#: SGD(fused=True) exists where torch's SGD has ``fused`` (torch 2.3+).
NEEDS_SGD_FUSED = pytest.mark.skipif(not SGD_HAS_FUSED, reason=NO_SGD_FUSED)


def _params(pairs: Sequence[Tuple[str, str]]) -> List[Any]:
    """(case id, mode) pairs as pytest params, SGD's "fused" mode marked NEEDS_SGD_FUSED."""
    return [pytest.param(c, m, id=f"{c}-{m}", marks=[NEEDS_SGD_FUSED] if c.startswith("SGD") and m == "fused" else [])
            for c, m in pairs]


@pytest.fixture(autouse=True)
def _fresh_stats():
    """Every test sees only its own launch statistics, and never leaves emulation on."""
    _cuda.last_stats.clear()
    yield
    assert not _cuda.emulating(), "a test left fusedoptim.backends.cuda.emulate() on"
    _cuda.last_stats.clear()




# --------------------------------------------------------------------------- runners
def run_ours(case: OptCase, problem, *, emulate: bool, param_space: str = "auto", dtype: Optional[torch.dtype] = None,
             group_extra: Optional[Dict[str, Any]] = None, steps: Optional[int] = None,
             **extra: Any) -> Tuple[List[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` steps of fusedoptim on ``problem``: emulated CUDA, or the CPU path
    with the scalar variant. Checks the backend every step and that the grads
    were only read (no AMP here)."""
    groups = param_groups(case, problem.init, dtype, group_extra)
    opt = case.make("ours", groups, **extra)
    flat = [p for g in groups for p in g["params"]]
    for step in range(problem.steps if steps is None else steps):
        grads = [g for row in problem.grads(step, dtype) for g in row]
        for p, g in zip(flat, grads):
            p.grad = g
        before = [bits(g) for g in grads]
        if emulate:
            with _cuda.emulate(param_space=param_space):
                opt.step()
            assert opt.last_backends == [EMULATED] * len(groups), opt.last_backends
        else:
            with scalar_cpu():
                opt.step()
            assert opt.last_backends == ["native-cpu/scalar"] * len(groups), opt.last_backends
        for k, (b, g) in enumerate(zip(before, grads)):
            assert torch.equal(b, bits(g)), f"step {step}: grad {k} was written without AMP"
    return [p.detach().clone() for p in flat], opt


def _flat(opt) -> List[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_same_state_bits(got_opt, ref_opt, what: str) -> None:
    """Every state tensor (step counters included) of two optimizers, bit for bit."""
    pg, pr = _flat(got_opt), _flat(ref_opt)
    for k, (a, b) in enumerate(zip(pg, pr)):
        assert set(got_opt.state[a]) == set(ref_opt.state[b]), \
            f"{what}: state keys of param {k}: {sorted(got_opt.state[a])} vs {sorted(ref_opt.state[b])}"
    sg, sr = state_tensors(got_opt, pg), state_tensors(ref_opt, pr)
    for key in sr:
        assert_same_bits(sg[key], sr[key], f"{what} state[{key!r}]")


def check_against_torch_fp32(case: OptCase, problem, ours: List[torch.Tensor], opt, label: str) -> None:
    """fp32: params and every state tensor within the suite's tolerances of torch's for-loop."""
    theirs, t = run_case(case, "torch", problem)
    stats = assert_close(ours, theirs, what=f"{case.id} emulated CUDA fp32 params vs torch ({label})", **FP32_VS_TORCH)
    record(f"fp32 params vs torch (emulated CUDA, {label})", stats, case.id)
    po, pt = _flat(opt), _flat(t)
    for k, (a, b) in enumerate(zip(po, pt)):
        keys_t = without_none(t.state[b]).keys()  # torch 2.2's SGD: momentum_buffer None without momentum
        assert set(opt.state[a]) == set(keys_t) == set(case.state_keys), \
            f"param {k}: state keys {sorted(opt.state[a])} vs torch {sorted(keys_t)}"
    so, st = state_tensors(opt, po), state_tensors(t, pt)
    for key in st:
        for a, b in zip(so[key], st[key]):
            assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, \
                f"state[{key!r}]: {a.dtype}{tuple(a.shape)} on {a.device} vs torch {b.dtype}{tuple(b.shape)} on {b.device}"
        assert_close(so[key], st[key], what=f"{case.id} emulated CUDA state[{key!r}] vs torch ({label})",
                     **FP32_STATE_VS_TORCH[key])


def check_lowp_against_torch(case: OptCase, dtype: torch.dtype, problem, ours: List[torch.Tensor],
                             group_extra: Optional[Dict[str, Any]], label: str) -> None:
    """bf16/fp16: the error against torch's fp32 run on the same (upcast) values
    is no worse than torch's own bf16/fp16 error, within LOWP_MAX_RATIO."""
    theirs, _ = run_case(case, "torch", problem, group_extra=group_extra)
    ref32, _ = run_case(case, "torch", problem, dtype=torch.float32, group_extra=group_extra)
    a, b, ref = flat64(ours), flat64(theirs), flat64(ref32)
    assert np.isfinite(a).all(), f"{case.id} {DTYPE_IDS[dtype]}: {int((~np.isfinite(a)).sum())} non-finite values"
    floor = LOWP_FLOOR_ULPS * float(torch.finfo(dtype).eps) * float(np.abs(ref).max(initial=1.0))
    da, db = np.abs(a - ref), np.abs(b - ref)
    db[~np.isfinite(db)] = np.inf
    ours_max, ours_rms = float(da.max()), float(np.sqrt(np.mean(da * da)))
    torch_max, torch_rms = float(db.max()), float(np.sqrt(np.mean(db * db)))
    record(f"{DTYPE_IDS[dtype]} params vs fp32 torch: emulated CUDA ({label})", dict(abs=ours_max, rel=0.0), case.id)
    msg = (f"{case.id} {DTYPE_IDS[dtype]} emulated CUDA vs fp32 torch: max/rms error {ours_max:.3e}/{ours_rms:.3e}, "
           f"torch {DTYPE_IDS[dtype]} {torch_max:.3e}/{torch_rms:.3e}, allowed {LOWP_MAX_RATIO}x torch + {floor:.2e}")
    assert ours_max <= LOWP_MAX_RATIO * torch_max + floor, msg
    assert ours_rms <= LOWP_MAX_RATIO * torch_rms + floor, msg


def _lowp_extra(case: OptCase, dtype: torch.dtype) -> Optional[Dict[str, Any]]:
    # torch's fp16 Adam with eps=1e-8 divides by an eps that underflows (see tolerances.FP16_ADAM_EPS).
    return {"eps": FP16_ADAM_EPS} if dtype == torch.float16 and case.kind != "sgd" else None


def check_everything(case: OptCase, dtype: torch.dtype, problem, label: str, param_space: str = "auto",
                     lowp_vs_torch: bool = True, **extra: Any) -> Tuple[List[torch.Tensor], torch.optim.Optimizer]:
    """Emulated CUDA vs the CPU scalar variant (bits) and vs torch (tolerances).

    ``lowp_vs_torch=False`` skips the bf16/fp16 error comparison with torch
    (two more torch runs) where the bits against the CPU path, whose bf16/fp16
    accuracy test_parity.py checks, are the point of the test."""
    gx = _lowp_extra(case, dtype)
    emu, eo = run_ours(case, problem, emulate=True, param_space=param_space, group_extra=gx, **extra)
    cpu, co = run_ours(case, problem, emulate=False, group_extra=gx, **extra)
    tag = f"{case.id} {DTYPE_IDS[dtype]} {extra or ''} ({label})"
    assert_same_bits(emu, cpu, f"{tag} params: emulated CUDA vs CPU scalar")
    assert_same_state_bits(eo, co, f"{tag}: emulated CUDA vs CPU scalar")
    if dtype == torch.float32:
        check_against_torch_fp32(case, problem, emu, eo, label)
    elif lowp_vs_torch:
        check_lowp_against_torch(case, dtype, problem, emu, gx, label)
    return emu, eo


def _modes(cases: Sequence[OptCase]) -> List[Tuple[OptCase, str]]:
    out = []
    for case in cases:
        if case.kind == "sgd":
            out.append((case, "default"))
        else:
            out += [(case, mode) for mode in ADAM_MODES]
    return out


def _mode_extra(case: OptCase, mode: str) -> Dict[str, Any]:
    if case.kind == "sgd":
        return {"fused": True} if mode == "fused" else {}
    return dict(ADAM_MODES[mode])


# --------------------------------------------------------------------------- every flag x dtype
GRID = _modes(ALL_CASES)
STEPS = 12


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,mode", GRID, ids=[f"{c.id}-{m}" for c, m in GRID])
def test_every_flag_matches_torch_and_cpu_bits(case, mode, dtype):
    """Every registry case (Adam/AdamW, L2/decoupled decay, amsgrad, maximize;
    SGD momentum/dampening/Nesterov/weight decay/maximize, first step
    included) in every Adam step-counter mode: 12 steps on the small odd
    shapes (0-d, 1, 7, 17, 3x5, 33, 2x3x11, 1031, 64) in three groups with
    different hyperparameters."""
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=31, steps=STEPS)
    _, opt = check_everything(case, dtype, problem, "small sizes", **_mode_extra(case, mode))
    if case.kind != "sgd":
        for p in _flat(opt):
            step = opt.state[p]["step"]
            # torch's layout: a 0-d float32 counter (on the param's device, here the CPU).
            assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device
            assert step.item() == STEPS


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_special_values_bit_identical_to_cpu(case, dtype):
    """NaN (with payloads), +-inf, -0.0, subnormals, the largest finite value,
    squares that overflow or underflow, in the packet body and in the
    one-element tail of each tensor: the same bits as the CPU scalar variant
    (NaNs at the same places)."""
    init, grads = special_problem(dtype, steps=3)
    modes = [{}] if case.kind == "sgd" else list(ADAM_MODES.values())
    for extra in modes:
        out = {}
        for where in ("emulated", "cpu"):
            groups = param_groups(case, init)
            opt = case.make("ours", groups, **extra)
            flat = [p for g in groups for p in g["params"]]
            for row in grads:
                for p, g in zip(flat, [g.clone() for r in row for g in r]):
                    p.grad = g
                if where == "emulated":
                    with _cuda.emulate():
                        opt.step()
                    assert opt.last_backends == [EMULATED] * len(groups)
                else:
                    with scalar_cpu():
                        opt.step()
            out[where] = ([p.detach().clone() for p in flat], opt)
        (pe, oe), (pc, oc) = out["emulated"], out["cpu"]
        tag = f"{case.id} {DTYPE_IDS[dtype]} {extra} special values"
        assert any(torch.isnan(p).any() for p in pc), "the problem must produce NaNs"
        assert_same_bits(pe, pc, f"{tag}: params, emulated CUDA vs CPU scalar")
        assert_same_state_bits(oe, oc, f"{tag}: emulated CUDA vs CPU scalar")


# --------------------------------------------------------------------------- chunk and tensor boundaries
#: Blocks take 8192 elements of the flat list; tensors start at multiples of 8.
#: Group 0: tensors ending one before, at and one after a chunk boundary, and
#: one spanning three chunks, all in one launch (blocks that start inside a
#: tensor and end in the next one). Group 1: 3 (padded to 8) then 8189
#: elements, so the chunk boundary falls 8184 elements into the second
#: tensor. Group 2: one tensor over three chunks.
CHUNK_SHAPES = [[(8191,), (8192,), (8193,), (16385,)], [(3,), (8189,), (8192,)], [(16385,)]]
CHUNK_CASES = [
    ("Adam-wd0.1-amsgrad", torch.float32, "host-steps"),
    ("AdamW-wd0.1-max", torch.bfloat16, "capturable"),
    ("Adam-decoupled-wd0.1-amsgrad", torch.float16, "fused"),
    ("Adam-wd0", torch.float32, "capturable"),
    ("SGD-mom0.9-damp0.1-wd0.05", torch.float32, "default"),
    ("SGD-mom0.9-damp0-nesterov-wd0.05-max", torch.bfloat16, "default"),
    ("SGD-mom0-damp0-wd0-max", torch.float16, "default"),
]


def _padded(n: int) -> int:
    return (n + K_PAD - 1) // K_PAD * K_PAD


def _expected_blocks(shapes: Sequence[Tuple[int, ...]]) -> int:
    return math.ceil(sum(_padded(math.prod(s)) for s in shapes) / K_CHUNK)


@pytest.mark.parametrize("param_space", ["large", "small"])
@pytest.mark.parametrize("case_id,dtype,mode", CHUNK_CASES, ids=[f"{c}-{DTYPE_IDS[d]}-{m}" for c, d, m in CHUNK_CASES])
def test_chunk_boundaries(case_id, dtype, mode, param_space):
    case = CASES_BY_ID[case_id]
    problem = make_problem(CHUNK_SHAPES, dtype, seed=32, steps=3)
    check_everything(case, dtype, problem, "chunk boundaries", param_space=param_space, **_mode_extra(case, mode))
    # The last step's launches: one per group, blocks = ceil(padded flat size / 8192).
    stats = list(_cuda.last_stats)[-len(CHUNK_SHAPES):]
    for shapes, st in zip(CHUNK_SHAPES, stats):
        assert st["launches"] == 1 and st["max_tensors_per_launch"] == len(shapes), st
        assert st["blocks"] == _expected_blocks(shapes), (shapes, st)
        assert st["capacity"] == CAPACITY[(_family(case), param_space)], st
        assert st["param_bytes"] <= PARAM_BYTES[param_space], st


#: Many tensors inside one block: sizes 1..40 back to back (every padding
#: 0..7), then 3, 768 and 1000; a second group of 0-d and 2-d tensors.
MANY_SMALL_SHAPES = [[(k,) for k in range(1, 41)] + [(3,), (768,), (1000,)], [(), (2, 3), (5, 7), (1, 1), (3,)]]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,mode", _modes(ALL_CASES[::3]), ids=[f"{c.id}-{m}" for c, m in _modes(ALL_CASES[::3])])
def test_many_small_tensors_in_one_block(case, mode, dtype):
    problem = make_problem(MANY_SMALL_SHAPES, dtype, seed=33, steps=6)
    check_everything(case, dtype, problem, "many small tensors", lowp_vs_torch=False, **_mode_extra(case, mode))
    st = _cuda.last_stats[-2]
    assert st["launches"] == 1 and st["max_tensors_per_launch"] == 43
    assert st["blocks"] == _expected_blocks(MANY_SMALL_SHAPES[0]) == 1, st


def test_empty_tensors_count_steps_like_torch():
    """A 0-element param still counts a step in torch; with device step
    counters the count kernel increments it although no block touches it
    (empty tensors between, before and after non-empty ones)."""
    shapes = [[(0,), (5,), (0,), (0,), (9,), (0,)], [(0,)]]
    case = CASES_BY_ID["AdamW-wd0.1-amsgrad"]
    problem = make_problem(shapes, torch.float32, seed=34, steps=4)
    for mode in ADAM_MODES:
        extra = ADAM_MODES[mode]
        ours, opt = check_everything(case, torch.float32, problem, "empty tensors", **extra)
        assert [opt.state[p]["step"].item() for p in _flat(opt)] == [4.0] * 7, mode
    sgd = CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"]
    check_everything(sgd, torch.float32, problem, "empty tensors")


# --------------------------------------------------------------------------- misaligned heads and tails
MISALIGNED_SIZES = (1, 2, 7, 8, 9, 31, 100, 8195)
MISALIGNED_CASES = ["Adam-wd0.1-amsgrad", "AdamW-wd0.1-max", "SGD-mom0.9-damp0-nesterov-wd0.05",
                    "SGD-mom0.9-damp0.1-wd0", "SGD-mom0-damp0-wd0.05"]


def _at(values: torch.Tensor, off: int) -> torch.Tensor:
    """A contiguous view of a copy of ``values`` starting ``off`` elements into a
    larger buffer (CPU buffers are 64-byte aligned, so the view is misaligned
    to 16 bytes by ``off * element_size`` mod 16)."""
    buf = torch.zeros(values.numel() + 8, dtype=values.dtype)
    view = buf[off:off + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def _misaligned_run(case: OptCase, dtype: torch.dtype, offs: Tuple[int, int, int], which: str, steps: int = 3,
                    amp_scale: Optional[float] = None):
    """Params at element offset offs[0], grads at offs[1], state tensors at
    offs[2] of larger buffers; state injected (step 2, non-zero moments /
    buffers) so that every stream of the kernels is misaligned as asked.
    With ``amp_scale`` the grads are scaled and opt.grad_scale / opt.found_inf
    (0) set: the emulated kernels unscale them, the CPU path divides first."""
    op, og, os_ = offs
    gen = torch.Generator().manual_seed(35)
    init = [(torch.randn(n, generator=gen) * 2).to(dtype) for n in MISALIGNED_SIZES]
    state0 = []
    for n in MISALIGNED_SIZES:
        m = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        v = (torch.rand(n, generator=gen) * 0.01 + 1e-4).to(dtype)
        vmax = (v.float() + torch.rand(n, generator=gen) * 0.01).to(dtype)
        buf = torch.randn(n, generator=gen).to(dtype)
        state0.append((m, v, vmax, buf))
    grads = [[(torch.randn(n, generator=gen) * 3).to(dtype) for n in MISALIGNED_SIZES] for _ in range(steps)]

    params = [_at(t, op).detach().requires_grad_() for t in init]
    for p in params:
        assert p.is_leaf and p.is_contiguous() and (p.data_ptr() % 16 == (op * p.element_size()) % 16)
    opt = case.make("torch" if which == "torch" else "ours", [dict(params=params)])
    for p, (m, v, vmax, buf) in zip(params, state0):
        if case.kind == "sgd":
            if case.kwargs["momentum"] != 0:
                opt.state[p]["momentum_buffer"] = _at(buf, os_)
        else:
            st = {"step": torch.tensor(2.0), "exp_avg": _at(m, os_), "exp_avg_sq": _at(v, os_)}
            if case.kwargs.get("amsgrad"):
                st["max_exp_avg_sq"] = _at(vmax, os_)
            opt.state[p].update(st)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = _at(g if amp_scale is None else (g.float() * amp_scale).to(dtype), og)
        if amp_scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(amp_scale), torch.tensor(0.0)
        if which == "emulated":
            with _cuda.emulate():
                opt.step()
            assert opt.last_backends == [EMULATED]
        elif which == "cpu":
            with scalar_cpu():
                opt.step()
            assert opt.last_backends == ["native-cpu/scalar"]
        else:
            opt.step()
    if amp_scale is not None:
        del opt.grad_scale, opt.found_inf
    # The state stayed in the misaligned buffers it was given (nothing replaced it).
    for p in params:
        es = p.element_size()
        assert p.grad.data_ptr() % 16 == og * es % 16
        for key, t in without_none(opt.state[p]).items():  # (torch 2.2's SGD: momentum_buffer None)
            if key != "step":
                assert t.data_ptr() % 16 == os_ * es % 16, key
    return [p.detach().clone() for p in params] + [p.grad.clone() for p in params], opt


MISALIGN_MODES = {
    # every stream shares the param's misalignment: one-element head, 16-byte packets, one-element tail
    "shared": lambda o: (o, o, o),
    # the grad is misaligned differently: every element takes the one-element path
    "grad-differs": lambda o: (o, (o + 1) % 8, o),
    # param and grad agree, the state tensors do not: one-element path too
    "state-differs": lambda o: (o, o, (o + 2) % 8),
}


@pytest.mark.parametrize("mode", list(MISALIGN_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("offset", range(8), ids=lambda o: f"off{o}")
def test_misaligned_views(offset, dtype, mode):
    """Params, grads and state that are contiguous views at element offsets
    0 (aligned control) to 7 of larger buffers: sizes 1 to 8195 (a chunk
    boundary inside the last one). Same bits as the CPU scalar variant; fp32
    within tolerance of torch."""
    offs = MISALIGN_MODES[mode](offset)
    for case_id in MISALIGNED_CASES:
        case = CASES_BY_ID[case_id]
        emu, eo = _misaligned_run(case, dtype, offs, "emulated")
        cpu, co = _misaligned_run(case, dtype, offs, "cpu")
        tag = f"{case_id} {DTYPE_IDS[dtype]} offsets (param, grad, state) = {offs}"
        assert_same_bits(emu, cpu, f"{tag}: params and grads, emulated CUDA vs CPU scalar")
        assert_same_state_bits(eo, co, f"{tag}: emulated CUDA vs CPU scalar")
        if dtype == torch.float32:
            ref, to = _misaligned_run(case, dtype, offs, "torch")
            assert_close(emu, ref, what=f"{tag}: params and grads vs torch", **FP32_VS_TORCH)
            for key, tensors in state_tensors(to, _flat(to)).items():
                assert_close(state_tensors(eo, _flat(eo))[key], tensors, what=f"{tag}: state[{key!r}] vs torch",
                             **FP32_STATE_VS_TORCH[key])


@pytest.mark.parametrize("mode", ["shared", "grad-differs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("offset", [1, 3, 6], ids=lambda o: f"off{o}")
def test_misaligned_views_with_amp(offset, dtype, mode):
    """AMP on misaligned grads: the kernels write the unscaled grads back
    through the one-element head/tail path and the 16-byte path; params,
    state and the grads after the step are the CPU path's bits (which divides
    the grads by grad_scale before its update)."""
    offs = MISALIGN_MODES[mode](offset)
    scale = 1024.0 if dtype == torch.float16 else 65536.0
    for case_id in ("Adam-wd0.1-amsgrad", "SGD-mom0.9-damp0-nesterov-wd0.05"):
        case = CASES_BY_ID[case_id]
        emu, eo = _misaligned_run(case, dtype, offs, "emulated", amp_scale=scale)
        cpu, co = _misaligned_run(case, dtype, offs, "cpu", amp_scale=scale)
        tag = f"{case_id} {DTYPE_IDS[dtype]} AMP, offsets (param, grad, state) = {offs}"
        assert_same_bits(emu, cpu, f"{tag}: params and unscaled grads, emulated CUDA vs CPU scalar")
        assert_same_state_bits(eo, co, f"{tag}: emulated CUDA vs CPU scalar")


# --------------------------------------------------------------------------- many tensors, several launches
N_MANY = 1000
MANY_SHAPES = [[(1 + (k * 7) % 23,) for k in range(N_MANY)]]
MULTI_LAUNCH = [
    ("Adam-wd0.1", "host-steps"),
    ("Adam-wd0-amsgrad", "capturable"),
    ("AdamW-wd0.1-max", "fused"),
    ("SGD-mom0.9-damp0.1-wd0.05", "default"),
    ("SGD-mom0-damp0-wd0", "default"),
]


MULTI_LAUNCH_GRID = [(c, m, s, torch.float32) for c, m in MULTI_LAUNCH for s in ("large", "small")] + [
    (c, m, "small", torch.bfloat16) for c, m in MULTI_LAUNCH[1:4]]


@pytest.mark.parametrize("case_id,mode,param_space,dtype", MULTI_LAUNCH_GRID,
                         ids=[f"{c}-{m}-{s}-{DTYPE_IDS[d]}" for c, m, s, d in MULTI_LAUNCH_GRID])
def test_hundreds_of_tensors_several_launches(case_id, mode, param_space, dtype):
    """1000 tensors in one group: several launches, each full but the last;
    with device step counters the count kernel runs per launch, so every
    counter must be incremented exactly once per step."""
    case = CASES_BY_ID[case_id]
    problem = make_problem(MANY_SHAPES, dtype, seed=36, steps=2)
    _, opt = check_everything(case, dtype, problem, "1000 tensors", param_space=param_space, lowp_vs_torch=False,
                              **_mode_extra(case, mode))
    cap = CAPACITY[(_family(case), param_space)]
    st = _cuda.last_stats[-1]
    assert st["capacity"] == cap, st
    assert st["launches"] == math.ceil(N_MANY / cap) > 1, st
    assert st["max_tensors_per_launch"] == cap, st
    assert st["param_bytes"] <= PARAM_BYTES[param_space], st
    if case.kind != "sgd":
        assert all(opt.state[p]["step"].item() == 2.0 for p in _flat(opt))


def test_auto_param_space_is_large_under_emulation():
    """The emulation has no driver to ask: "auto" takes the large block."""
    p = torch.randn(10, requires_grad=True)
    opt = fusedoptim.Adam([p])
    p.grad = torch.randn(10)
    with _cuda.emulate():
        opt.step()
    assert _cuda.last_stats[-1]["capacity"] == CAPACITY[("adam", "large")]


# --------------------------------------------------------------------------- AMP: grad_scale and found_inf
def _amp_scale(dtype: torch.dtype, non_power_of_two: bool) -> float:
    if non_power_of_two:
        return 3.0  # the division rounds: it must round exactly as torch's g / scale does
    # fp16 tops out at 65504: scaled grads of magnitude ~10 need a smaller scale.
    return 1024.0 if dtype == torch.float16 else 65536.0


AMP_CASES = [("Adam-wd0.1-amsgrad", m) for m in ADAM_MODES] + [
    ("AdamW-wd0.1-max", "fused"),
    ("SGD-mom0.9-damp0.1-wd0.05", "fused"),
    ("SGD-mom0.9-damp0-nesterov-wd0-max", "fused"),
    ("SGD-mom0-damp0-wd0.05", "fused"),
]
AMP_SHAPES = [[(), (7,), (33,), (1031,)], [(8195,)]]


def _amp_run(case: OptCase, dtype: torch.dtype, extra: Dict[str, Any], *, scale: Optional[float],
             found_inf: Sequence[float], grad_layout: str = "contiguous", seed: int = 37):
    """Steps with grads multiplied by ``scale`` and ``opt.grad_scale``/``opt.found_inf``
    set as GradScaler sets them (``scale=None``: grads as they are, no AMP).
    Returns params, optimizer, and the grads after each step."""
    problem = make_problem(AMP_SHAPES, dtype, seed=seed, steps=len(found_inf))
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups, **extra)
    flat = [p for g in groups for p in g["params"]]
    seen = []
    for step, inf in enumerate(found_inf):
        grads = [g for row in problem.grads(step) for g in row]
        if scale is not None:
            grads = [(g.float() * scale).to(dtype) for g in grads]
        if grad_layout == "strided":
            grads = [_strided(g) for g in grads]
        for p, g in zip(flat, grads):
            p.grad = g
        if scale is not None:
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(inf)
        with _cuda.emulate():
            opt.step()
        seen.append([p.grad.detach().clone() for p in flat])
    return [p.detach().clone() for p in flat], opt, seen


def _strided(g: torch.Tensor) -> torch.Tensor:
    """``g``'s values in a non-contiguous tensor (every other element of a
    buffer); the kernels read it through a contiguous copy. A 0-d or
    one-element grad stays as it is (it is always contiguous)."""
    if g.numel() < 2:
        return g
    out = torch.zeros(g.shape + (2,), dtype=g.dtype)[..., 0]
    out.copy_(g)
    assert not out.is_contiguous() and torch.equal(out, g)
    return out


def _hand_unscaled(case, dtype, scale, steps, seed=37):
    """The grads of _amp_run's steps, scaled and divided back by hand as
    torch's unscale does (``g / scale`` in the grad's dtype)."""
    problem = make_problem(AMP_SHAPES, dtype, seed=seed, steps=steps)
    return [[((g.float() * scale).to(dtype) / torch.tensor(scale)).to(dtype) for row in problem.grads(s) for g in row]
            for s in range(steps)]


@pytest.mark.parametrize("non_power_of_two", [False, True], ids=["pow2-scale", "scale3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case_id,mode", _params(AMP_CASES))
def test_amp_unscales_in_the_kernel(case_id, mode, dtype, non_power_of_two):
    """found_inf = 0: the kernels divide the grads by grad_scale, write them
    back (as torch's fused step does) and update with them. Params, state and
    grads equal a run whose grads were divided by hand, bit for bit."""
    case = CASES_BY_ID[case_id]
    extra = _mode_extra(case, mode)
    scale = _amp_scale(dtype, non_power_of_two)
    steps = 3
    ours, opt, seen = _amp_run(case, dtype, extra, scale=scale, found_inf=[0.0] * steps)
    unscaled = _hand_unscaled(case, dtype, scale, steps)
    for s in range(steps):
        assert_same_bits(seen[s], unscaled[s], f"{case_id} {DTYPE_IDS[dtype]} step {s}: grads after the step "
                                               f"vs g / {scale:g} by hand")

    # The same steps with the hand-divided grads and no AMP.
    problem = make_problem(AMP_SHAPES, dtype, seed=37, steps=steps)
    groups = param_groups(case, problem.init)
    ref = case.make("ours", groups, **extra)
    flat = [p for g in groups for p in g["params"]]
    for s in range(steps):
        for p, g in zip(flat, unscaled[s]):
            p.grad = g.clone()
        with _cuda.emulate():
            ref.step()
    assert_same_bits(ours, [p.detach() for p in flat], f"{case_id} {DTYPE_IDS[dtype]}: AMP vs grads divided by hand")
    assert_same_state_bits(opt, ref, f"{case_id} {DTYPE_IDS[dtype]}: AMP vs grads divided by hand")


@pytest.mark.parametrize("case_id,mode", _params(AMP_CASES))
def test_amp_strided_grads_unscale_like_contiguous_ones(case_id, mode):
    """A grad with other strides is unscaled in place before the contiguous
    copy the kernel reads: same params, state and grads as contiguous grads."""
    case = CASES_BY_ID[case_id]
    extra = _mode_extra(case, mode)
    a, oa, ga = _amp_run(case, torch.float32, extra, scale=65536.0, found_inf=[0.0] * 3)
    b, ob, gb = _amp_run(case, torch.float32, extra, scale=65536.0, found_inf=[0.0] * 3, grad_layout="strided")
    assert_same_bits(b, a, f"{case_id}: params, strided vs contiguous grads")
    assert_same_state_bits(ob, oa, f"{case_id}: strided vs contiguous grads")
    for s in range(3):
        assert_same_bits(gb[s], ga[s], f"{case_id}: grads after step {s}, strided vs contiguous")


@pytest.mark.parametrize("grad_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("case_id,mode", _params(AMP_CASES))
def test_amp_found_inf_changes_nothing(case_id, mode, grad_layout):
    """After two real steps, a step with found_inf = 1 writes nothing: params,
    grads (not even unscaled), every state tensor and the step counters keep
    their bits; the next step continues as if the skipped one never happened."""
    case = CASES_BY_ID[case_id]
    extra = _mode_extra(case, mode)
    scale = 65536.0
    problem = make_problem(AMP_SHAPES, torch.float32, seed=38, steps=4)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups, **extra)
    flat = [p for g in groups for p in g["params"]]

    def set_grads(step, layout):
        grads = [g * scale for row in problem.grads(step) for g in row]
        if layout == "strided":
            grads = [_strided(g) for g in grads]
        for p, g in zip(flat, grads):
            p.grad = g

    for step in range(2):
        set_grads(step, "contiguous")
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        with _cuda.emulate():
            opt.step()
    set_grads(2, grad_layout)
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(1.0)
    before = snapshot(opt, flat)
    with _cuda.emulate():
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, flat), f"{case_id} {mode} found_inf=1 ({grad_layout} grads)")


@pytest.mark.parametrize("mode", list(ADAM_MODES))
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_amp_found_inf_on_the_first_adam_step(cls, mode):
    """A first step with found_inf = 1 changes no param and no grad. The
    state is created (zero moments, step 0), exactly what torch's own
    fused=True step leaves on the same CPU tensors (its fused kernel
    increments the counters and takes found_inf back off). The next real step
    is then a first step: the same as torch's for-loop from scratch."""
    case = CASES_BY_ID[f"{cls}-wd0.1-amsgrad"]
    extra = ADAM_MODES[mode]
    problem = make_problem(AMP_SHAPES, torch.float32, seed=39, steps=2)
    scale = 1024.0

    def start(which, **kw):
        groups = param_groups(case, problem.init)
        opt = case.make(which, groups, **kw)
        flat = [p for g in groups for p in g["params"]]
        for p, g in zip(flat, [g * scale for row in problem.grads(0) for g in row]):
            p.grad = g
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(1.0)
        return opt, flat

    ours, flat = start("ours", **extra)
    before = snapshot(ours, flat)
    with _cuda.emulate():
        ours.step()
    after = snapshot(ours, flat)
    for k in range(len(flat)):
        assert torch.equal(before["params"][k], after["params"][k]), f"param {k} was written"
        assert torch.equal(before["grads"][k], after["grads"][k]), f"grad {k} was written"
    if CPU_FUSED_ADAM:
        theirs = case.theirs([dict(params=[p.detach().clone().requires_grad_() for p in flat])],
                             **dict(case.kwargs, fused=True))
        for p, q in zip(_flat(theirs), flat):
            p.grad = q.grad.clone()
        theirs.grad_scale, theirs.found_inf = torch.tensor(scale), torch.tensor(1.0)
        theirs.step()
        assert_same_state_bits(ours, theirs, f"{cls} {mode}: state after a skipped first step vs torch fused=True")
    else:
        # torch before 2.4 has no fused CPU step to compare with: the state it
        # leaves, spelled out (torch's layout, zero moments, 0-d float32 step 0).
        for k, p in enumerate(flat):
            st = ours.state[p]
            assert set(st) == set(case.state_keys), (k, sorted(st))
            for key, t in st.items():
                want = (torch.float32, ()) if key == "step" else (p.dtype, p.shape)
                assert (t.dtype, t.shape, t.device) == want + (p.device,), (k, key, t.dtype, t.shape, t.device)
                assert torch.equal(bits(t), bits(torch.zeros_like(t))), f"param {k}: state[{key!r}] is not +0"
    assert all(ours.state[p]["step"].item() == 0.0 for p in flat)

    # A real step now is a first step.
    del ours.grad_scale, ours.found_inf
    for p, g in zip(flat, [g for row in problem.grads(1) for g in row]):
        p.grad = g
    with _cuda.emulate():
        ours.step()
    groups = param_groups(case, problem.init)
    ref = case.make("torch", groups)
    for p, g in zip([p for g in groups for p in g["params"]], [g for row in problem.grads(1) for g in row]):
        p.grad = g
    ref.step()
    assert_close([p.detach() for p in flat], [p.detach() for p in _flat(ref)],
                 what=f"{cls} {mode}: first real step after a skipped one vs torch", **FP32_VS_TORCH)
    assert all(ours.state[p]["step"].item() == 1.0 for p in flat)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
@pytest.mark.parametrize("cls", ["AdamW", pytest.param("SGD", marks=NEEDS_SGD_FUSED)])
def test_amp_group_split_between_kernels_and_torch(cls, found_inf):
    """A group whose fp64 and non-contiguous params run torch's code while the
    rest runs the (emulated) CUDA kernels: found_inf is then read on the host
    (the torch part cannot read it on the device), the torch part's grads are
    unscaled before torch's step, the kernels unscale their own. Same result
    as the same group with the grads divided by hand; found_inf = 1 changes
    nothing."""
    kwargs = dict(lr=0.1, weight_decay=0.1) if cls == "AdamW" else dict(lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(43)
    init = [torch.randn(7, generator=gen), torch.randn(5, generator=gen, dtype=torch.float64),
            torch.randn(3, 4, generator=gen).t(), torch.randn(1031, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in init] for _ in range(3)]
    scale = 1024.0

    def run(amp):
        ps = [t.detach().clone() if t.is_contiguous() else t.detach().t().clone().t() for t in init]
        ps = [p.requires_grad_() for p in ps]
        assert not ps[2].is_contiguous()
        opt = getattr(fusedoptim, cls)(ps, fused=True, **kwargs)
        for step, row in enumerate(grads):
            infs = found_inf if step == 2 else 0.0
            for p, g in zip(ps, row):
                p.grad = g * scale if amp else g.clone()
            if amp:
                opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(infs)
            before = snapshot(opt, ps)
            with _cuda.emulate():
                opt.step()
            if amp and infs:
                assert opt.last_backends == ["skipped (found_inf)"]
                assert_snapshot_equal(before, snapshot(opt, ps), f"{cls}: split group, found_inf=1")
            else:
                assert opt.last_backends == [f"{EMULATED}+torch"], opt.last_backends
        return [p.detach().clone() for p in ps], opt

    amp, oa = run(True)
    if found_inf:
        return
    ref, orf = run(False)
    assert_same_bits(amp, ref, f"{cls}: split group with AMP vs grads divided by hand")
    assert_same_state_bits(oa, orf, f"{cls}: split group with AMP vs grads divided by hand")


@NEEDS_SGD_FUSED
@pytest.mark.parametrize("case_id", ["SGD-mom0.9-damp0.1-wd0.05", "SGD-mom0.9-damp0-nesterov-wd0-max"])
def test_amp_found_inf_on_the_first_sgd_step_leaves_no_buffer(case_id):
    """torch's own fused SGD creates uninitialised momentum buffers on a
    skipped first step (and later reads them). fusedoptim creates none, so the
    next real step initialises buf = grad exactly as torch's for-loop does
    on its first step."""
    case = CASES_BY_ID[case_id]
    problem = make_problem(AMP_SHAPES, torch.float32, seed=40, steps=3)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups, fused=True)
    flat = [p for g in groups for p in g["params"]]
    for p, g in zip(flat, [g * 1024.0 for row in problem.grads(0) for g in row]):
        p.grad = g
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    before = snapshot(opt, flat)
    with _cuda.emulate():
        opt.step()
    after = snapshot(opt, flat)
    for k in range(len(flat)):
        assert torch.equal(before["params"][k], after["params"][k]), f"param {k} was written"
        assert torch.equal(before["grads"][k], after["grads"][k]), f"grad {k} was written"
        assert "momentum_buffer" not in opt.state.get(flat[k], {}), f"param {k} got a momentum buffer"

    # Two real steps with AMP (found_inf = 0) vs torch's for-loop on the unscaled grads.
    for step in (1, 2):
        for p, g in zip(flat, [g * 1024.0 for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        with _cuda.emulate():
            opt.step()
    groups = param_groups(case, problem.init)
    ref = case.make("torch", groups)
    rflat = [p for g in groups for p in g["params"]]
    for step in (1, 2):
        for p, g in zip(rflat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        ref.step()
    assert_close([p.detach() for p in flat], [p.detach() for p in rflat],
                 what=f"{case_id}: after a skipped first step vs torch without it", **FP32_VS_TORCH)
    assert_close([opt.state[p]["momentum_buffer"] for p in flat], [ref.state[p]["momentum_buffer"] for p in rflat],
                 what=f"{case_id}: momentum buffers", **FP32_STATE_VS_TORCH["momentum_buffer"])


GRAD_SCALER_CASES = [pytest.param("Adam", dict(lr=0.01), id="Adam"),
                     pytest.param("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True), id="AdamW"),
                     pytest.param("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), id="SGD", marks=NEEDS_SGD_FUSED)]


@pytest.mark.skipif(GRAD_SCALER is None, reason=NO_GRAD_SCALER)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-clip-step"])
@pytest.mark.parametrize("name,kwargs", GRAD_SCALER_CASES)
def test_grad_scaler_loop_with_fused_true(name, kwargs, unscale_first):
    """torch.amp.GradScaler("cpu") with fused=True hands grad_scale and
    found_inf to the emulated kernels (no host read of found_inf); an
    overflow at step 3 is skipped. Same params as torch's for-loop with the
    same scaler, and the same scale history. With ``scaler.unscale_(opt)``
    and gradient clipping before the step (the usual pattern), the scaler
    has unscaled the grads itself and hands only found_inf."""
    out = {}
    for which in ("ours", "torch"):
        torch.manual_seed(8)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        if which == "ours":
            opt = getattr(fusedoptim, name)(model.parameters(), fused=True, **kwargs)
        else:
            opt = getattr(torch.optim, name)(model.parameters(), foreach=False, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
        x = torch.randn(16, 5)
        scales = []
        for step in range(8):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if step == 3:
                loss = loss * float("inf")  # an overflow: the step must be skipped
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if which == "ours":
                with _cuda.emulate():
                    scaler.step(opt)
                assert opt.last_backends == [EMULATED]
            else:
                scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        out[which] = ([p.detach().clone() for p in model.parameters()], scales, opt)
    (po, so, oo), (pt, st, ot) = out["ours"], out["torch"]
    assert so == st, f"scale history {so} vs torch {st}"
    assert all(torch.isfinite(p).all() for p in po)
    assert_close(po, pt, what=f"{name} GradScaler loop (emulated CUDA vs torch)", **FP32_TRAINING_LOOP)
    if name != "SGD":
        # 8 steps, one skipped: the device counters say 7, as torch's host ones.
        assert [oo.state[p]["step"].item() for p in _flat(oo)] == [ot.state[p]["step"].item() for p in _flat(ot)] \
            == [7.0] * len(po)


# --------------------------------------------------------------------------- state_dict round trips
N1, N2 = 8, 8
ROUND_TRIP = [(c, m) for c in ("Adam-wd0.1-amsgrad", "AdamW-wd0.1-max", "Adam-decoupled-wd0.1") for m in ADAM_MODES] + [
    ("SGD-mom0.9-damp0.1-wd0.05", "default"), ("SGD-mom0.9-damp0-nesterov-wd0.05-max", "default")]


@pytest.mark.parametrize("direction", ["emulated->torch", "torch->emulated"])
@pytest.mark.parametrize("case_id,mode", ROUND_TRIP, ids=[f"{c}-{m}" for c, m in ROUND_TRIP])
def test_state_dict_moves_between_emulated_cuda_and_torch(case_id, mode, direction):
    """A state_dict saved after emulated CUDA steps loads into torch.optim and
    continues like an uninterrupted torch run, and the other way round; the
    loaded state is exactly what was saved.

    load_state_dict takes the saved groups' flags: torch's CPU optimizer gets
    capturable/fused switched back off after loading (its capturable step
    refuses CPU tensors, see the module docstring), and fusedoptim gets its
    mode's flags back after loading torch's checkpoint, so the continuation
    really runs with device step counters."""
    case = CASES_BY_ID[case_id]
    extra = _mode_extra(case, mode)
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=41, steps=N1 + N2)

    def advance(opt, flat, start, stop, emulate):
        for step in range(start, stop):
            for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
                p.grad = g
            if emulate:
                with _cuda.emulate():
                    opt.step()
                assert opt.last_backends == [EMULATED] * len(opt.param_groups)
            else:
                opt.step()

    def start(which, init):
        groups = param_groups(case, init)
        opt = case.make(which, groups, **(extra if which == "ours" else {}))
        return opt, [p for g in groups for p in g["params"]]

    src_emulated = direction == "emulated->torch"
    first, flat1 = start("ours" if src_emulated else "torch", problem.init)
    advance(first, flat1, 0, N1, src_emulated)
    sd = copy.deepcopy(first.state_dict())
    current = []
    k = 0
    for shapes in problem.shapes:
        current.append([flat1[k + i].detach().clone() for i in range(len(shapes))])
        k += len(shapes)
    second, flat2 = start("torch" if src_emulated else "ours", current)
    second.load_state_dict(sd)
    for group in second.param_groups:
        if src_emulated:
            group.update(capturable=False, fused=None) if case.kind != "sgd" else group.update(fused=None)
        else:
            group.update(extra)
    for p1, p2 in zip(flat1, flat2):
        assert first.state[p1].keys() == second.state[p2].keys()
        for key, v in first.state[p1].items():
            assert_same_bits([second.state[p2][key]], [v], f"loaded state[{key!r}]")
    advance(second, flat2, N1, N1 + N2, not src_emulated)

    ref, ref_flat = start("torch", problem.init)
    advance(ref, ref_flat, 0, N1 + N2, False)
    assert_close([p.detach() for p in flat2], [p.detach() for p in ref_flat],
                 what=f"{case_id} {mode} {direction} vs uninterrupted torch", **FP32_VS_TORCH)
    so, sr = state_tensors(second, flat2), state_tensors(ref, ref_flat)
    assert so.keys() == sr.keys()
    for key in so:
        assert_close(so[key], sr[key], what=f"{case_id} {direction} state[{key!r}] vs uninterrupted torch",
                     **FP32_STATE_VS_TORCH[key])


# --------------------------------------------------------------------------- the backend called directly
def _adam_direct(lr: float, wd: float, decoupled: bool, lr_ptr: Optional[torch.Tensor]):
    gen = torch.Generator().manual_seed(42)
    n = 1031
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    step = torch.tensor(4.0)
    for _ in range(3):
        _C.cuda_emulation.adam_step(
            [p.data_ptr()], [g.data_ptr()], [m.data_ptr()], [v.data_ptr()], None, [step.data_ptr()], [n],
            _C.DTYPE_FLOAT32, 0.0 if lr_ptr is not None else lr, 0.9, 0.999, 1e-8, wd, decoupled, False, False,
            device_steps=True, lr_ptr=0 if lr_ptr is None else lr_ptr.data_ptr())
    return p, m, v, step


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)], ids=["no-wd", "L2", "decoupled"])
def test_device_lr_equals_host_lr(wd, decoupled):
    """capturable with a tensor lr on the device: the kernels read it through
    lr_ptr (step size and AdamW's decay). With an lr that fp32 holds exactly
    the result is the host-lr launch's, bit for bit. (Through the optimizer a
    CPU tensor lr is read on the host, so this path is reached directly.)"""
    lr = 2.0 ** -7
    ref = _adam_direct(lr, wd, decoupled, None)
    got = _adam_direct(lr, wd, decoupled, torch.tensor(lr))
    assert_same_bits(list(got), list(ref), f"device lr vs host lr (wd={wd}, decoupled={decoupled})")
    assert ref[3].item() == 7.0


def test_backend_rejects_bad_arguments():
    p = torch.zeros(4)
    ptr = p.data_ptr()
    with pytest.raises(ValueError, match="lr_ptr"):
        _C.cuda_emulation.adam_step([ptr], [ptr], [ptr], [ptr], None, [torch.zeros(()).data_ptr()], [4],
                                    _C.DTYPE_FLOAT32, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False,
                                    lr_ptr=torch.tensor(0.1).data_ptr())
    with pytest.raises(ValueError, match="param_space"):
        _C.cuda_emulation.sgd_step([ptr], [ptr], None, None, [4], _C.DTYPE_FLOAT32, 0.1, 0.0, 0.0, 0.0, False, False,
                                   param_space="huge")
    with pytest.raises(ValueError, match="param_space"):
        with _cuda.emulate(param_space="huge"):
            pass


def test_emulate_context_nests_and_restores():
    assert not _cuda.emulating()
    with _cuda.emulate(param_space="small"):
        assert _cuda.emulating() and _cuda.info()["emulating"]
        with _cuda.emulate(False):
            assert not _cuda.emulating()
            p = torch.randn(3, requires_grad=True)
            opt = fusedoptim.SGD([p], lr=0.1)
            p.grad = torch.ones(3)
            opt.step()
            assert opt.last_backends[0].startswith("native-cpu/")
        assert _cuda.emulating()
        with pytest.raises(RuntimeError, match="boom"):
            with _cuda.emulate(param_space="large"):
                raise RuntimeError("boom")
        assert _cuda.emulating() and _cuda._param_space == "small"
    assert not _cuda.emulating() and _cuda._param_space == "auto"


def test_launch_statistics_do_not_grow_without_bound():
    """``fusedoptim._cuda.last_stats`` describes the last launches. It must
    not keep a dict per launch call forever: on a GPU every step of a
    training run goes through it (a million steps of a model with a few
    param groups would hold millions of dicts)."""
    p = torch.randn(3, requires_grad=True)
    opt = fusedoptim.SGD([p], lr=0.01)
    p.grad = torch.ones(3)
    lengths = []
    with _cuda.emulate():
        for chunk in range(2):
            for _ in range(1500):
                opt.step()
            lengths.append(len(_cuda.last_stats))
    assert lengths[0] >= 1 and _cuda.last_stats[-1]["launches"] == 1
    assert lengths[1] == lengths[0] <= 1500, \
        f"last_stats grows with every launch: {lengths[0]} entries after 1500 steps, {lengths[1]} after 3000"


# ---------------------------------------------------------------------------
# The cached CUDA plan: after the first step, a group that is all CUDA is
# checked from C and only its grads' addresses are read. Every change to the
# group must send it back through the full check, and results must not care.

def _cached(opt) -> bool:
    plan = opt._fo_plans[id(opt.param_groups[0])][1]
    return plan.cuda_plan is not None


@pytest.mark.parametrize("cls,kw", [
    (fusedoptim.AdamW, dict(lr=1e-2, weight_decay=0.1, fused=True)),
    (fusedoptim.Adam, dict(lr=1e-2, amsgrad=True)),
    (fusedoptim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
], ids=["AdamW-fused", "Adam-amsgrad", "SGD-nesterov"])
def test_cached_cuda_plan_follows_every_change(cls, kw):
    torch.manual_seed(3)
    shapes = [(5,), (1000,), (17, 33), (1,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref_opt = cls(ours, **kw), cls(ref, **kw)  # ref_opt: the CPU native path

    def step(grads):
        for p, q, g in zip(ours, ref, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        with _cuda.emulate():
            opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)

    step([torch.randn(s) for s in shapes])
    assert _cached(opt)
    step([torch.randn(s) for s in shapes])          # cached path
    assert opt.last_backends == ["native-cuda-emulated"]
    # A strided grad: the general path reads it through a copy.
    g = torch.randn(33, 17).t()
    step([torch.randn(5), torch.randn(1000), g, torch.randn(1)])
    # A param without a grad: the plan is stale, the step skips it.
    step([torch.randn(5), None, torch.randn(17, 33), torch.randn(1)])
    # New state tensors (load_state_dict): cached addresses must not be used.
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    ref_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    step([torch.randn(s) for s in shapes])
    step([torch.randn(s) for s in shapes])
    assert _cached(opt)
    # A param's memory swapped under the optimizer (p.data = ...).
    with torch.no_grad():
        ours[1].data = ours[1].data.clone()
    step([torch.randn(s) for s in shapes])
    for key in opt.state[ours[0]]:
        if isinstance(opt.state[ours[0]][key], torch.Tensor):
            assert torch.equal(opt.state[ours[0]][key], ref_opt.state[ref[0]][key]), key


def test_cached_plans_hold_to_their_mode():
    # A plan cached under emulation holds host addresses for the emulated
    # kernels: outside emulate() the same optimizer must take the CPU path,
    # and back inside, the CUDA path again (never a plan of the other mode).
    torch.manual_seed(4)
    ours = [torch.randn(100, requires_grad=True) for _ in range(3)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref_opt = fusedoptim.AdamW(ours, lr=1e-2), fusedoptim.AdamW(ref, lr=1e-2)
    for k, emulated in enumerate([True, True, False, False, True, True]):
        for p, q in zip(ours, ref):
            g = torch.randn(100)
            p.grad, q.grad = g.clone(), g.clone()
        with _cuda.emulate(emulated):
            opt.step()
        ref_opt.step()
        expected = "native-cuda-emulated" if emulated else f"native-cpu/{fusedoptim.get_cpu_isa()}"
        assert opt.last_backends == [expected], k
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), k


def test_device_lr_through_the_optimizer():
    # capturable=True with a tensor lr: the kernels read the lr on the device
    # at every launch (as a replayed CUDA graph would), so changing the
    # tensor in place changes the next step, with no host read. Compared with
    # the CPU path given the same lr as a float.
    torch.manual_seed(5)
    shapes = [(300,), (7, 9)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    lr = torch.tensor(0.01)
    opt = fusedoptim.AdamW(ours, lr=lr, weight_decay=0.1, capturable=True)
    ref_opt = fusedoptim.AdamW(ref, lr=0.01, weight_decay=0.1)
    stats_before = len(_cuda.last_stats)
    for k, value in enumerate([0.01, 0.01, 0.003, 0.05]):
        lr.fill_(value)
        ref_opt.param_groups[0]["lr"] = float(lr)
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        with _cuda.emulate():
            opt.step()
        ref_opt.step()
        assert opt.last_backends == ["native-cuda-emulated"], k
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), k
    assert len(_cuda.last_stats) > stats_before or len(_cuda.last_stats) == _cuda.last_stats.maxlen
    assert opt.param_groups[0]["lr"] is lr  # never replaced by a float
