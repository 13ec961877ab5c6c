"""The CUDA backend on a GPU.

Every test but the first needs a GPU *and* a fusedoptim build with the CUDA
backend (``fusedoptim.backends.cuda.available()``); without them they skip with the
reason. ``tests/test_cuda_emulation.py`` runs the same kernels on the CPU
everywhere; this file checks what only a GPU can: the real launches, 16-byte
accesses at misaligned addresses, streams, CUDA graphs, GradScaler without
host syncs, and that the GPU computes the CPU scalar variant's bits.

Run them with ``python -m pytest tests/test_cuda.py -q`` (or
``python bench/bench_cuda.py``, which runs them before timing).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import fusedoptim
from fusedoptim.backends import cuda as _cuda
from cases import (ALL_CASES, CASES_BY_ID, DTYPE_IDS, DTYPES, SMALL_GROUP_SHAPES, OptCase, assert_close,
                   assert_same_bits, flat64, make_problem, param_groups, record, scalar_cpu, special_problem,
                   state_tensors)
from tolerances import (FP16_ADAM_EPS, FP32_STATE_VS_TORCH, FP32_TRAINING_LOOP, FP32_VS_TORCH, LOWP_FLOOR_ULPS,
                        LOWP_MAX_RATIO)
from torch_versions import GRAD_SCALER, NO_SGD_FUSED, SGD_HAS_FUSED, without_none

HAVE_GPU = torch.cuda.is_available()
CUDA_OK = HAVE_GPU and _cuda.available()
if not HAVE_GPU:
    _WHY = "no GPU here (torch.cuda.is_available() is False)"
elif not _cuda.available():
    _WHY = f"fusedoptim's CUDA backend cannot run here: {_cuda.info()['reason']}"
else:
    _WHY = ""

#: Marks a test that needs a GPU and fusedoptim's CUDA backend.
gpu = pytest.mark.skipif(not CUDA_OK, reason=_WHY)
#: SGD(fused=True) exists where torch's SGD has ``fused`` (torch 2.3+).
NEEDS_SGD_FUSED = pytest.mark.skipif(not SGD_HAS_FUSED, reason=NO_SGD_FUSED)

NATIVE = "native-cuda"
ADAM_MODES: Dict[str, Dict[str, Any]] = {"host-steps": {}, "capturable": {"capturable": True}, "fused": {"fused": True}}
CAPACITY = {("adam", "large"): 448, ("adam", "small"): 48, ("sgd", "large"): 672, ("sgd", "small"): 80}


@pytest.fixture(autouse=True)
def _fresh_stats():
    _cuda.last_stats.clear()
    yield
    _cuda.last_stats.clear()




@contextlib.contextmanager
def param_space(space: str):
    """Force the kernel parameter block of the real backend ("large" or "small").

    ``emulate(False, ...)`` leaves emulation off and only sets the block."""
    with _cuda.emulate(False, param_space=space):
        yield


def _modes(cases: Sequence[OptCase]) -> List[Tuple[OptCase, str]]:
    """(case, mode) pairs: every Adam case in each step-counter mode, SGD once."""
    out = []
    for case in cases:
        out += [(case, "default")] if case.kind == "sgd" else [(case, mode) for mode in ADAM_MODES]
    return out


def _mode_extra(case: OptCase, mode: str) -> Dict[str, Any]:
    return {} if case.kind == "sgd" else dict(ADAM_MODES[mode])


def _lowp_extra(case: OptCase, dtype: torch.dtype) -> Optional[Dict[str, Any]]:
    return {"eps": FP16_ADAM_EPS} if dtype == torch.float16 and case.kind != "sgd" else None


def _flat(opt) -> List[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def run_on(device: str, case: OptCase, problem, which: str = "ours", dtype: Optional[torch.dtype] = None,
           group_extra: Optional[Dict[str, Any]] = None, steps: Optional[int] = None,
           **extra: Any) -> Tuple[List[torch.Tensor], torch.optim.Optimizer]:
    """``problem`` on ``device`` ("cuda" or "cpu") with ours or torch's for-loop;
    returns the final params on the CPU and the optimizer. On the CPU, ours
    runs the scalar variant."""
    init = [[t.to(device) for t in group] for group in problem.init]
    groups = param_groups(case, init, dtype, group_extra)
    opt = case.make(which, groups, **extra)
    flat = [p for g in groups for p in g["params"]]
    for step in range(problem.steps if steps is None else steps):
        for p, g in zip(flat, [g for row in problem.grads(step, dtype) for g in row]):
            p.grad = g.to(device)
        if which == "ours" and device == "cpu":
            with scalar_cpu():
                opt.step()
        else:
            opt.step()
        if which == "ours" and device != "cpu":
            assert opt.last_backends == [NATIVE] * len(groups), opt.last_backends
    return [p.detach().cpu() for p in flat], opt


def state_on_cpu(opt) -> Dict[str, List[torch.Tensor]]:
    return {k: [t.detach().cpu() for t in v] for k, v in state_tensors(opt, _flat(opt)).items()}


# --------------------------------------------------------------------------- runs everywhere
def test_backend_info_reports_cuda():
    """backend_info() says whether the CUDA backend was compiled and can run
    here, and if not, why (on every machine), under "cuda" alone."""
    info = fusedoptim.backend_info()
    cuda = info["cuda"]
    for key in ("compiled", "available", "reason", "device_count", "driver_version", "runtime_version", "archs",
                "large_param_space", "emulating"):
        assert key in cuda, key
    assert not any(k.startswith("cuda_") for k in info), sorted(info)
    assert cuda["available"] == _cuda.available()
    if not cuda["available"]:
        assert isinstance(cuda["reason"], str) and cuda["reason"].strip(), cuda
        if not cuda["compiled"]:
            assert cuda["archs"] == [] and "no CUDA backend" in cuda["reason"]
        elif cuda["driver_version"] == 0:
            assert cuda["reason"] == "no CUDA driver found", cuda
    else:
        assert cuda["compiled"] and cuda["reason"] == ""


def test_backend_info_old_cuda_keys_still_answer_with_a_warning():
    info = fusedoptim.backend_info()
    cuda = info["cuda"]
    for old, new in (("cuda_compiled", "compiled"), ("cuda_available", "available"), ("cuda_reason", "reason")):
        with pytest.warns(DeprecationWarning, match=f"backend_info\\(\\)\\['cuda'\\]\\['{new}'\\]"):
            value = info[old]
        assert value == (cuda[new] or None if new == "reason" else cuda[new]), (old, value)
    with pytest.raises(KeyError):
        info["cuda_nonsense"]


@pytest.mark.parametrize("driver,expected", [
    (0, "no CUDA driver found"),
    (12040, "no usable CUDA driver or device: cudaErrorInsufficientDriver: "
            "CUDA driver version is insufficient for CUDA runtime version"),
])
def test_reason_without_a_driver_says_so(monkeypatch, driver, expected):
    """The CUDA runtime calls a missing driver (libcuda not found) an
    insufficient one; with driver_version 0 the reason says there is none."""
    raw = {"compiled": True, "available": False, "device_count": 0, "driver_version": driver,
           "runtime_version": 13000, "archs": [80, 90], "large_param_space": False,
           "reason": "no usable CUDA driver or device: cudaErrorInsufficientDriver: "
                     "CUDA driver version is insufficient for CUDA runtime version"}
    monkeypatch.setattr(_cuda, "_INFO", None)
    monkeypatch.setattr(_cuda._C, "cuda_info", lambda: dict(raw))
    cuda = fusedoptim.backend_info()["cuda"]
    assert cuda["reason"] == expected and cuda["available"] is False
    text = " ".join(str(fusedoptim.backend_info()).split())  # long values are wrapped
    assert f"not available: {expected}" in text and "sm_80, sm_90" in text, text
    assert f"driver {driver or 'none'}" in text, text


@pytest.mark.skipif(not HAVE_GPU or _cuda.available(), reason="needs a GPU and a build without a usable CUDA backend")
def test_cuda_params_without_backend_run_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(_cuda, "_warned", False)
    p = torch.randn(10, device="cuda", requires_grad=True)
    q = p.detach().clone().requires_grad_()
    # Both run torch's default implementation for CUDA params (foreach).
    opt, ref = fusedoptim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    g = torch.randn(10, device="cuda")
    p.grad, q.grad = g.clone(), g.clone()
    with pytest.warns(RuntimeWarning, match="CUDA params run torch's own implementation"):
        opt.step()
    ref.step()
    assert opt.last_backends == ["torch"]
    assert torch.equal(p, q)


# --------------------------------------------------------------------------- backend facts
@gpu
def test_backend_info_on_a_gpu():
    info = fusedoptim.backend_info()
    cuda = info["cuda"]
    archs = cuda["archs"]
    assert archs and all(isinstance(a, int) for a in archs), archs
    # nvcc's __CUDA_ARCH_LIST__ spells sm_80 as 800; accept 80 as well.
    ccs = sorted(a // 10 if a >= 100 else a for a in archs)
    assert ccs[0] >= 70, archs
    assert cuda["device_count"] == torch.cuda.device_count() >= 1
    assert cuda["driver_version"] > 0 and cuda["runtime_version"] > 0
    major, minor = torch.cuda.get_device_capability()
    # SASS for this GPU's major version or PTX of an older arch that the driver JIT-compiles.
    assert any(cc <= major * 10 + minor for cc in ccs), (archs, (major, minor))
    p = torch.zeros(3, device="cuda", requires_grad=True)
    opt = fusedoptim.SGD([p], lr=1.0)
    p.grad = torch.ones(3, device="cuda")
    opt.step()
    assert opt.last_backends == [NATIVE]
    assert torch.equal(p.detach().cpu(), torch.full((3,), -1.0))


# --------------------------------------------------------------------------- parity with torch on CUDA
GRID = _modes(ALL_CASES)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,mode", GRID, ids=[f"{c.id}-{m}" for c, m in GRID])
def test_matches_torch_on_cuda(case, mode, dtype):
    """Every flag combination x fp32/bf16/fp16 x Adam step-counter mode, 50
    steps on the small odd shapes, against torch.optim's for-loop on the GPU
    (fp32: tolerances; bf16/fp16: error vs torch's fp32 run no worse than
    torch's own). Capturable/fused modes are also compared with torch's own
    run with the same flag, and the state has torch's layout (step counters
    on the device with capturable/fused, on the host otherwise)."""
    extra = _mode_extra(case, mode)
    gx = _lowp_extra(case, dtype)
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=51)
    ours, o = run_on("cuda", case, problem, group_extra=gx, **extra)
    theirs, t = run_on("cuda", case, problem, which="torch", group_extra=gx)
    for po, pt in zip(_flat(o), _flat(t)):  # (torch 2.2's SGD: momentum_buffer None without momentum)
        assert set(o.state[po]) == set(without_none(t.state[pt])) == set(case.state_keys)
    if case.kind != "sgd":
        on_device = bool(extra)
        for p in _flat(o):
            step = o.state[p]["step"]
            assert step.dtype == torch.float32 and step.dim() == 0
            assert step.device == (p.device if on_device else torch.device("cpu")), (mode, step.device)
    if dtype == torch.float32:
        stats = assert_close(ours, theirs, what=f"{case.id} {mode} CUDA params vs torch CUDA", **FP32_VS_TORCH)
        record("fp32 params vs torch (CUDA)", stats, case.id)
        so, st = state_on_cpu(o), state_on_cpu(t)
        for key in st:
            assert_close(so[key], st[key], what=f"{case.id} {mode} CUDA state[{key!r}] vs torch",
                         **FP32_STATE_VS_TORCH[key])
        if extra:
            same, _ = run_on("cuda", case, problem, which="torch", **extra)
            assert_close(ours, same, what=f"{case.id} CUDA params vs torch with {extra}", **FP32_VS_TORCH)
        return
    ref32, _ = run_on("cuda", case, problem, which="torch", dtype=torch.float32, group_extra=gx)
    a, b, ref = flat64(ours), flat64(theirs), flat64(ref32)
    assert np.isfinite(a).all(), f"{case.id} {DTYPE_IDS[dtype]}: non-finite values"
    floor = LOWP_FLOOR_ULPS * float(torch.finfo(dtype).eps) * float(np.abs(ref).max(initial=1.0))
    da, db = np.abs(a - ref), np.abs(b - ref)
    db[~np.isfinite(db)] = np.inf
    msg = (f"{case.id} {mode} {DTYPE_IDS[dtype]} on CUDA vs fp32 torch: max error {da.max():.3e}, "
           f"torch {db.max():.3e}, allowed {LOWP_MAX_RATIO}x + {floor:.2e}")
    assert da.max() <= LOWP_MAX_RATIO * db.max() + floor, msg
    assert np.sqrt(np.mean(da * da)) <= LOWP_MAX_RATIO * np.sqrt(np.mean(db * db)) + floor, msg


# --------------------------------------------------------------------------- the CPU's bits
BITS_SHAPES = [[(), (1,), (7,)], [(17,), (3, 5), (33,)], [(2, 3, 11), (1031,), (8195,), (16385,)]]


def _compare_bits(case, dtype, problem, extra, label):
    gpu_p, go = run_on("cuda", case, problem, **extra)
    cpu_p, co = run_on("cpu", case, problem, **extra)
    tag = f"{case.id} {DTYPE_IDS[dtype]} {extra} ({label})"
    assert_same_bits(gpu_p, cpu_p, f"{tag}: params, GPU vs CPU scalar")
    sg, sc = state_on_cpu(go), state_on_cpu(co)
    assert sg.keys() == sc.keys()
    for key in sc:
        assert_same_bits(sg[key], sc[key], f"{tag}: state[{key!r}], GPU vs CPU scalar")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,mode", GRID, ids=[f"{c.id}-{m}" for c, m in GRID])
def test_gpu_bits_equal_cpu_scalar(case, mode, dtype):
    """The kernels use correctly rounded intrinsics (nvcc -fmad=false) and the
    CPU's conversions, so the GPU computes the CPU scalar variant's bits: fp32
    and, as both round once from the same fp32 values, bf16/fp16 too. 30 steps
    on small sizes and on tensors across chunk boundaries."""
    problem = make_problem(BITS_SHAPES, dtype, seed=52, steps=30)
    _compare_bits(case, dtype, problem, _mode_extra(case, mode), "30 steps")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_gpu_bits_equal_cpu_scalar_on_special_values(case, dtype):
    """NaN, inf, -0.0, subnormals (nvcc keeps denormals without -ftz) and
    overflowing squares: the same bits, NaNs at the same places."""
    init, grads = special_problem(dtype, steps=4)
    for extra in ([{}] if case.kind == "sgd" else list(ADAM_MODES.values())):
        out = {}
        for device in ("cuda", "cpu"):
            groups = param_groups(case, [[t.to(device) for t in g] for g in init])
            opt = case.make("ours", groups, **extra)
            flat = [p for g in groups for p in g["params"]]
            for row in grads:
                for p, g in zip(flat, [g.to(device) for r in row for g in r]):
                    p.grad = g
                if device == "cpu":
                    with scalar_cpu():
                        opt.step()
                else:
                    opt.step()
                    assert opt.last_backends == [NATIVE] * len(groups)
            out[device] = ([p.detach().cpu() for p in flat], opt)
        assert_same_bits(out["cuda"][0], out["cpu"][0], f"{case.id} {DTYPE_IDS[dtype]} {extra}: special values")
        sg, sc = state_on_cpu(out["cuda"][1]), state_on_cpu(out["cpu"][1])
        for key in sc:
            assert_same_bits(sg[key], sc[key], f"{case.id} {DTYPE_IDS[dtype]} {extra}: state[{key!r}]")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case_id", ["AdamW-wd0.1-amsgrad", "SGD-mom0.9-damp0-nesterov-wd0.05"])
def test_large_tensor_bits_equal_cpu_scalar(case_id, dtype):
    """4M + 3 elements (512 blocks, a one-element tail) and a small tensor."""
    case = CASES_BY_ID[case_id]
    problem = make_problem([[(4 * 2 ** 20 + 3,), (5,)]], dtype, seed=53, steps=3)
    for mode in (["default"] if case.kind == "sgd" else ["host-steps", "fused"]):
        _compare_bits(case, dtype, problem, _mode_extra(case, mode), "4M + 3 elements")


# --------------------------------------------------------------------------- misaligned views, many launches
MISALIGNED_SIZES = (1, 2, 7, 8, 9, 31, 100, 8195)


def _at(values: torch.Tensor, off: int, device: str) -> torch.Tensor:
    """A copy of ``values`` as a contiguous view ``off`` elements into a larger buffer."""
    buf = torch.zeros(values.numel() + 8, dtype=values.dtype, device=device)
    view = buf[off:off + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def _misaligned(case: OptCase, dtype: torch.dtype, offs: Tuple[int, int, int], device: str):
    op, og, os_ = offs
    gen = torch.Generator().manual_seed(54)
    init = [(torch.randn(n, generator=gen) * 2).to(dtype) for n in MISALIGNED_SIZES]
    moments = [((torch.randn(n, generator=gen) * 0.1).to(dtype), (torch.rand(n, generator=gen) * 0.01 + 1e-4).to(dtype))
               for n in MISALIGNED_SIZES]
    grads = [[(torch.randn(n, generator=gen) * 3).to(dtype) for n in MISALIGNED_SIZES] for _ in range(3)]
    params = [_at(t, op, device).detach().requires_grad_() for t in init]
    opt = case.make("ours", [dict(params=params)])
    for p, (m, v) in zip(params, moments):
        if case.kind == "sgd":
            opt.state[p]["momentum_buffer"] = _at(m, os_, device)
        else:
            opt.state[p].update(step=torch.tensor(2.0), exp_avg=_at(m, os_, device), exp_avg_sq=_at(v, os_, device))
            if case.kwargs.get("amsgrad"):
                opt.state[p]["max_exp_avg_sq"] = _at(v * 2, os_, device)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = _at(g, og, device)
        if device == "cpu":
            with scalar_cpu():
                opt.step()
        else:
            opt.step()
            assert opt.last_backends == [NATIVE]
    return [p.detach().cpu() for p in params], state_on_cpu(opt)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("offset", range(8), ids=lambda o: f"off{o}")
def test_misaligned_views_bits_equal_cpu_scalar(offset, dtype):
    """Params, grads and state as views at element offsets 0 to 7 of larger
    buffers, sharing the param's misalignment or not: the 16-byte path must
    only run where every stream is 16-byte aligned (a misaligned vector access
    is a CUDA error), and the results are the CPU's bits."""
    for offs in ((offset, offset, offset), (offset, (offset + 1) % 8, offset), (offset, offset, (offset + 2) % 8)):
        for case_id in ("Adam-wd0.1-amsgrad", "AdamW-wd0.1-max", "SGD-mom0.9-damp0-nesterov-wd0.05"):
            case = CASES_BY_ID[case_id]
            gp, gs = _misaligned(case, dtype, offs, "cuda")
            cp, cs = _misaligned(case, dtype, offs, "cpu")
            tag = f"{case_id} {DTYPE_IDS[dtype]} offsets (param, grad, state) {offs}"
            assert_same_bits(gp, cp, f"{tag}: params")
            for key in cs:
                assert_same_bits(gs[key], cs[key], f"{tag}: state[{key!r}]")


N_MANY = 1000
MANY_SHAPES = [[(1 + (k * 7) % 23,) for k in range(N_MANY)]]


@gpu
@pytest.mark.parametrize("space", ["large", "small", "auto"])
@pytest.mark.parametrize("case_id,mode", [("Adam-wd0.1", "host-steps"), ("AdamW-wd0-amsgrad", "capturable"),
                                          ("SGD-mom0.9-damp0.1-wd0.05", "default")])
def test_many_tensors_several_launches(case_id, mode, space):
    """1000 tensors: several full launches of the large (or small) kernel
    parameter block; "auto" takes the large block where the driver accepts it."""
    case = CASES_BY_ID[case_id]
    if space == "large" and not _cuda.info()["large_param_space"]:
        pytest.skip("this driver does not accept the large kernel parameter block")
    problem = make_problem(MANY_SHAPES, torch.float32, seed=55, steps=3)
    extra = _mode_extra(case, mode)
    with param_space(space):
        gpu_p, go = run_on("cuda", case, problem, **extra)
    cpu_p, _ = run_on("cpu", case, problem, **extra)
    assert_same_bits(gpu_p, cpu_p, f"{case_id} 1000 tensors, {space} parameter block")
    family = "sgd" if case.kind == "sgd" else "adam"
    expected = space if space != "auto" else ("large" if _cuda.info()["large_param_space"] else "small")
    cap = CAPACITY[(family, expected)]
    st = _cuda.last_stats[-1]
    assert st["capacity"] == cap and st["max_tensors_per_launch"] == cap, st
    assert st["launches"] == math.ceil(N_MANY / cap), st
    if case.kind != "sgd":
        assert all(go.state[p]["step"].item() == 3.0 for p in _flat(go))


@gpu
def test_mixed_cpu_and_cuda_params_in_one_group():
    """A group with CPU and CUDA params: the CPU kernels and the CUDA kernels
    each take theirs, in one step, like torch's for-loop."""
    case = CASES_BY_ID["AdamW-wd0.1-amsgrad"]
    problem = make_problem([[(33,), (1031,), (7,), (64,)]], torch.float32, seed=56, steps=10)
    devices = ["cpu", "cuda", "cpu", "cuda"]
    out = {}
    for which in ("ours", "torch"):
        ps = [t.detach().clone().to(d).requires_grad_() for t, d in zip(problem.init[0], devices)]
        opt = case.make(which, [dict(params=ps)])
        for step in range(problem.steps):
            for p, g in zip(ps, problem.grads(step)[0]):
                p.grad = g.to(p.device)
            opt.step()
        if which == "ours":
            assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}+{NATIVE}"], opt.last_backends
        out[which] = [p.detach().cpu() for p in ps]
    assert_close(out["ours"], out["torch"], what="mixed CPU/CUDA group vs torch", **FP32_VS_TORCH)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_another_device_than_the_current_one():
    """Params on cuda:1 while cuda:0 is current: the launch goes to cuda:1
    (on its current stream), with the same bits as the CPU."""
    case = CASES_BY_ID["Adam-wd0.1-amsgrad"]
    problem = make_problem(BITS_SHAPES, torch.float32, seed=57, steps=5)
    with torch.cuda.device(0):
        gpu_p, _ = run_on("cuda:1", case, problem, fused=True)
    cpu_p, _ = run_on("cpu", case, problem, fused=True)
    assert_same_bits(gpu_p, cpu_p, "params on cuda:1")


# --------------------------------------------------------------------------- streams
def _sleep_cycles_for(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep needs to keep the stream busy ~``seconds``."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    ms = max(start.elapsed_time(end), 1e-3)
    return int(cycles * seconds * 1e3 / ms)


@gpu
@pytest.mark.parametrize("name", ["Adam", "AdamW-capturable", "SGD-momentum"])
def test_step_runs_on_the_current_stream(name):
    """The kernels go to torch.cuda.current_stream(): on a side stream that
    first sleeps and then writes the grads, the step must see those grads (a
    launch on another stream would run at once and read zeros)."""
    n = 100_003
    gen = torch.Generator().manual_seed(58)
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    make = {"Adam": lambda ps: fusedoptim.Adam(ps, lr=0.01),
            "AdamW-capturable": lambda ps: fusedoptim.AdamW(ps, lr=0.01, capturable=True),
            "SGD-momentum": lambda ps: fusedoptim.SGD(ps, lr=0.01, momentum=0.9)}[name]
    expected = p0.clone().requires_grad_()
    ref = make([expected])
    expected.grad = g.clone()
    with scalar_cpu():
        ref.step()

    p = p0.cuda().requires_grad_()
    p.grad = torch.zeros(n, device="cuda")
    g_dev = g.cuda()
    opt = make([p])
    cycles = _sleep_cycles_for(0.2)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        p.grad.copy_(g_dev)  # device to device: queued behind the sleep, the host does not wait
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert opt.last_backends == [NATIVE]
    assert_same_bits([p.detach().cpu()], [expected.detach()], f"{name}: step on a side stream")


# --------------------------------------------------------------------------- AMP without host syncs
def _no_host_sync(fn, cycles: int) -> float:
    """Run ``fn`` behind a sleeping kernel; return its host time. A host sync
    in ``fn`` waits for the sleep, which takes far longer than ``fn``."""
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # torch's own syncs raise
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed


GRAD_SCALER_CASES = [pytest.param("Adam", dict(lr=0.01), id="Adam"),
                     pytest.param("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True), id="AdamW"),
                     pytest.param("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), id="SGD", marks=NEEDS_SGD_FUSED)]


def _cuda_grad_scaler(**kwargs):
    """torch.amp.GradScaler("cuda") (torch 2.3+), else torch.cuda.amp.GradScaler (the same scaler)."""
    return GRAD_SCALER("cuda", **kwargs) if GRAD_SCALER is not None else torch.cuda.amp.GradScaler(**kwargs)


@gpu
@pytest.mark.parametrize("name,kwargs", GRAD_SCALER_CASES)
def test_grad_scaler_skips_steps_without_host_syncs(name, kwargs):
    """torch.amp.GradScaler("cuda") with fused=True: an inf injected into a
    grad at step 3 skips that step on the device. No step reads found_inf on
    the host (except SGD's very first step, which must know whether it creates
    the momentum buffers: README, "AMP without host syncs"). Same params and
    scale history as torch's own fused=True optimizer."""
    cycles = _sleep_cycles_for(0.3)
    out = {}
    for which in ("ours", "torch"):
        torch.manual_seed(8)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).cuda()
        cls = getattr(fusedoptim if which == "ours" else torch.optim, name)
        opt = cls(model.parameters(), fused=True, **kwargs)
        scaler = _cuda_grad_scaler(init_scale=2.0 ** 12, growth_interval=3)
        x = torch.randn(64, 32, device="cuda")
        scales, host_times = [], []
        for step in range(8):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            scaler.scale(loss).backward()
            if step == 3:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow: this step must change nothing
            if which == "ours" and step > 0:
                host_times.append(_no_host_sync(lambda: scaler.step(opt), cycles))
            else:
                scaler.step(opt)
            if which == "ours":
                assert opt.last_backends == [NATIVE]
            scaler.update()
            scales.append(scaler.get_scale())
        out[which] = ([p.detach().cpu() for p in model.parameters()], scales, opt)
        if which == "ours":
            sleep_s = 0.3
            assert max(host_times) < 0.5 * sleep_s, f"a step waited for the GPU: host times {host_times}"
    (po, so, oo), (pt, st, ot) = out["ours"], out["torch"]
    assert so == st, f"scale history {so} vs torch {st}"
    assert all(torch.isfinite(p).all() for p in po)
    assert_close(po, pt, what=f"{name} GradScaler on CUDA vs torch fused=True", **FP32_TRAINING_LOOP)
    if name != "SGD":
        steps_o = [oo.state[p]["step"].item() for p in _flat(oo)]
        assert steps_o == [ot.state[p]["step"].item() for p in _flat(ot)] == [7.0] * len(po)


def _strided(g: torch.Tensor) -> torch.Tensor:
    """``g``'s values with other strides (every other element of a buffer)."""
    if g.numel() < 2:
        return g
    out = torch.zeros(g.shape + (2,), dtype=g.dtype, device=g.device)[..., 0]
    out.copy_(g)
    return out


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("case_id", ["AdamW-wd0.1-amsgrad",
                                     pytest.param("SGD-mom0.9-damp0.1-wd0.05", marks=NEEDS_SGD_FUSED)])
def test_amp_found_inf_changes_nothing_on_cuda(case_id, layout):
    """opt.grad_scale / opt.found_inf set by hand (as GradScaler does),
    found_inf = 1 after two real steps: params, grads (contiguous or read
    through a copy), state and step counters keep their bits."""
    case = CASES_BY_ID[case_id]
    problem = make_problem(BITS_SHAPES, torch.float32, seed=59, steps=3)
    init = [[t.cuda() for t in g] for g in problem.init]
    groups = param_groups(case, init)
    opt = case.make("ours", groups, fused=True)
    flat = [p for g in groups for p in g["params"]]
    for step in range(3):
        grads = [g.cuda() * 1024 for row in problem.grads(step) for g in row]
        for p, g in zip(flat, grads):
            p.grad = _strided(g) if layout == "strided" and step == 2 else g
        opt.grad_scale = torch.tensor(1024.0, device="cuda")
        opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0, device="cuda")
        if step == 2:
            before = ([p.detach().clone() for p in flat], [p.grad.clone() for p in flat],
                      {k: [t.clone() for t in v] for k, v in state_tensors(opt, flat).items()})
        opt.step()
    params, grads, state = before
    assert_same_bits([p.detach() for p in flat], params, "params after a found_inf step")
    assert_same_bits([p.grad for p in flat], grads, "grads after a found_inf step")
    for k, v in state_tensors(opt, flat).items():
        assert_same_bits(v, state[k], f"state[{k!r}] after a found_inf step")


# --------------------------------------------------------------------------- CUDA graphs
GRAPH_CASES = ["Adam", "AdamW-amsgrad", "Adam-tensor-lr", "SGD-nesterov"]


def _graph_optimizer(name: str, params: List[torch.Tensor], torch_ref: bool = False):
    mod = torch.optim if torch_ref else fusedoptim
    if name == "Adam":
        return mod.Adam(params, lr=0.01, capturable=True)
    if name == "AdamW-amsgrad":
        return mod.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True, capturable=True)
    if name == "Adam-tensor-lr":
        return mod.Adam(params, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    if name == "SGD-nesterov":
        return mod.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)
    raise ValueError(name)


@gpu
@pytest.mark.parametrize("name", GRAPH_CASES)
def test_cuda_graph_capture_and_replay(name):
    """optimizer.step() captured in a CUDA graph after warm-up steps on a side
    stream (as torch's CUDA graph docs show) and replayed with new grads
    copied into the static grads: bit for bit the eager run. With a device lr
    (a schedule writing into it between replays), the graph reads the new lr.
    Also within tolerance of torch's eager capturable step."""
    shapes = [1, 7, 1031, 8195, 20000]
    gen = torch.Generator().manual_seed(60)
    init = [torch.randn(n, generator=gen) for n in shapes]
    n_warm, n_replay = 3, 6
    grads = [[torch.randn(n, generator=gen).cuda() for n in shapes] for _ in range(n_warm + n_replay)]
    lrs = [0.01 * (0.8 ** k) for k in range(n_warm + n_replay)]

    def set_lr(opt, k):
        lr = opt.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(lrs[k])  # in place: the captured kernels read this tensor

    # Graphed run.
    params = [t.cuda().requires_grad_() for t in init]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = _graph_optimizer(name, params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(n_warm):
            for p, g in zip(params, grads[k]):
                p.grad.copy_(g)
            set_lr(opt, k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    assert opt.last_backends == [NATIVE]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(n_warm, n_warm + n_replay):
        for p, g in zip(params, grads[k]):
            p.grad.copy_(g)
        set_lr(opt, k)
        graph.replay()
    torch.cuda.synchronize()

    # Eager runs: fusedoptim and torch.
    eager = {}
    for which in ("ours", "torch"):
        ps = [t.cuda().requires_grad_() for t in init]
        o = _graph_optimizer(name, ps, torch_ref=which == "torch")
        for k in range(n_warm + n_replay):
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            set_lr(o, k)
            o.step()
        eager[which] = ([p.detach().cpu() for p in ps], o)
    got = [p.detach().cpu() for p in params]
    assert_same_bits(got, eager["ours"][0], f"{name}: graph replays vs eager fusedoptim")
    so, se = state_on_cpu(opt), state_on_cpu(eager["ours"][1])
    for key in se:
        assert_same_bits(so[key], se[key], f"{name}: state[{key!r}] after replays vs eager")
    if "step" in so:
        assert all(s.item() == n_warm + n_replay for s in so["step"])
    assert_close(got, eager["torch"][0], what=f"{name}: graph replays vs torch eager", **FP32_VS_TORCH)


# --------------------------------------------------------------------------- state_dict across devices and libraries
@gpu
@pytest.mark.parametrize("mode", list(ADAM_MODES))
def test_state_dict_between_fusedoptim_cuda_and_torch_cuda(mode):
    """A checkpoint of fusedoptim on the GPU loads into torch.optim on the GPU
    (same flags) and continues like an uninterrupted torch run."""
    case = CASES_BY_ID["AdamW-wd0.1-amsgrad"]
    extra = ADAM_MODES[mode]
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=61, steps=20)
    _, first = run_on("cuda", case, problem, steps=10, **extra)
    sd = copy.deepcopy(first.state_dict())
    current = [[p.detach().clone() for p in g["params"]] for g in first.param_groups]
    groups = param_groups(case, current)
    second = case.make("torch", groups, **extra)
    second.load_state_dict(sd)
    flat = [p for g in groups for p in g["params"]]
    for step in range(10, 20):
        for p, g in zip(flat, [g.cuda() for row in problem.grads(step) for g in row]):
            p.grad = g
        second.step()
    ref, _ = run_on("cuda", case, problem, which="torch", **extra)
    assert_close([p.detach().cpu() for p in flat], ref, what=f"{mode}: fusedoptim CUDA -> torch CUDA", **FP32_VS_TORCH)


# ---------------------------------------------------------------- precision options on a GPU
PRECISION_GPU_CASES = [
    # (class, class kwargs, param dtype, options)
    (fusedoptim.AdamW, {}, torch.bfloat16, dict(master_weights=True)),
    (fusedoptim.AdamW, {}, torch.bfloat16, dict(stochastic_rounding=True)),
    (fusedoptim.AdamW, {"capturable": True}, torch.bfloat16, dict(stochastic_rounding=True)),
    (fusedoptim.AdamW, {}, torch.bfloat16, dict(kahan_summation=True)),
    (fusedoptim.AdamW, {}, torch.float16, dict(master_weights=True)),
    (fusedoptim.AdamW, {"fused": True}, torch.float32, dict(state_dtype=torch.bfloat16)),
    (fusedoptim.SGD, {"momentum": 0.9}, torch.bfloat16, dict(master_weights=True)),
    (fusedoptim.SGD, {"momentum": 0.9, "nesterov": True}, torch.bfloat16, dict(stochastic_rounding=True)),
    (fusedoptim.SGD, {"momentum": 0.9}, torch.float16, dict(kahan_summation=True)),
]


def _precision_run(case, device, max_grad_norm=None, steps=3, no_sync=False):
    cls, ckw, dt, okw = case
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n).to(dt).to(device)) for n in (100, 70001, 7, 1 << 20)]
    opt = cls(ps, lr=0.01, max_grad_norm=max_grad_norm, **ckw, **okw)
    g = torch.Generator().manual_seed(1)
    with scalar_cpu():
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.numel(), generator=g).to(dt).to(device)
            if no_sync:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # the step itself must not sync
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default") if no_sync else None
    return ps, opt


@gpu
@pytest.mark.parametrize("case", PRECISION_GPU_CASES, ids=lambda c: f"{c[0].__name__}-{c[2]}-{'-'.join(c[3])}-{'-'.join(c[1])}")
def test_precision_options_gpu_bits_equal_cpu_scalar(case):
    """Master weights, stochastic rounding (same random bits), Kahan and bf16
    states: the GPU computes the CPU scalar variant's bits for params and
    every state tensor."""
    pc, oc = _precision_run(case, "cpu")
    pg, og = _precision_run(case, "cuda")
    assert og.last_backends == [NATIVE]
    for a, b in zip(pc, pg):
        assert_same_bits([b.detach().cpu()], [a.detach()], "param")
        for key, t in oc.state[a].items():
            assert_same_bits([og.state[b][key].cpu()], [t], f"state[{key!r}]")


@gpu
@pytest.mark.parametrize("case", PRECISION_GPU_CASES[:2] + PRECISION_GPU_CASES[5:7],
                         ids=lambda c: f"{c[0].__name__}-{c[2]}-{'-'.join(c[3])}")
def test_max_grad_norm_gpu_matches_cpu_without_host_sync(case):
    """max_grad_norm on the GPU: the norm stays on the device (no host sync
    in the step) and agrees with the CPU's; the clipped step agrees within
    fp32 tolerance (the norms' summation orders differ, so the coefficient
    may differ in its last bit)."""
    pc, oc = _precision_run(case, "cpu", max_grad_norm=0.5)
    # (SGD's host step counters of stochastic rounding are not in these cases.)
    pg, og = _precision_run(case, "cuda", max_grad_norm=0.5, no_sync=True)
    assert og.last_grad_norm.device.type == "cuda"
    torch.testing.assert_close(og.last_grad_norm.cpu(), oc.last_grad_norm, rtol=1e-6, atol=0)
    for a, b in zip(pc, pg):
        torch.testing.assert_close(b.detach().cpu().float(), a.detach().float(), **FP32_VS_TORCH)


def _eight_bit_run(device, kind, dtype, opts):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)  # stochastic rounding's seed
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype).to(device)) for n in (70001, 4096, 300)]
    cls = fusedoptim.SGD if kind == "sgd" else fusedoptim.AdamW
    kw = dict(lr=1e-2, momentum=0.9, nesterov=True) if kind == "sgd" else dict(lr=1e-2, weight_decay=0.1)
    opt = cls(ps, state_bits=8, **kw, **opts)
    for _ in range(4):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * torch.logspace(-8, 1, p.numel())).to(dtype).to(device)
        opt.step()
    return ps, opt


@gpu
@pytest.mark.parametrize("kind,dtype,opts", [("adamw", torch.float32, {}), ("sgd", torch.float32, {}),
                                             ("adamw", torch.bfloat16, {"stochastic_rounding": True}),
                                             ("adamw", torch.bfloat16, {"master_weights": True})],
                         ids=lambda v: str(v))
def test_8bit_states_gpu_bits_equal_cpu_scalar(kind, dtype, opts):
    """state_bits=8 on the GPU (Note [8-bit states on CUDA]): params, codes
    and scales are the CPU scalar variant's bits."""
    fusedoptim.set_cpu_isa("scalar")  # (restored by the test fixture)
    pc, oc = _eight_bit_run("cpu", kind, dtype, opts)
    pg, og = _eight_bit_run("cuda", kind, dtype, opts)
    assert og.last_backends == [NATIVE]
    for a, b in zip(pc, pg):
        assert_same_bits([b.detach().cpu()], [a.detach()], "param")
        for key, t in oc.state[a].items():
            assert_same_bits([og.state[b][key].cpu()], [t], f"state[{key!r}]")
