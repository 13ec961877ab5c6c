"""Precision options on the CPU: master weights, stochastic
rounding, Kahan summation, bf16 states and fused gradient clipping.

Three layers, each checked against tests/reference_precision.py (float64 /
NumPy definitions written from Note [precision options]):

1. The references themselves, against torch's conversions and closed forms.
2. The kernels (``_C.adam_step`` / ``_C.sgd_step`` keyword options,
   ``_C.grad_norm_sq``, ``_C.clip_coef``), in lockstep with the plain fp32
   kernel: an option may only change where the update starts and how its
   fp32 result is stored, so feeding the fp32 kernel the option's stored
   values (upcast) must give exactly the fp32 result the option then stores,
   and the stored bits must be exactly the option's store of it. Bit for bit,
   on every supported ISA, with tensors at odd offsets and guard elements.
3. The optimizers (``fusedoptim.Adam/AdamW/SGD`` keyword options): float64
   references with stated tolerances, statistics of stochastic rounding,
   reproducibility, clipping against torch, state_dict, validation.

Every tolerance is explained where it is defined (the TOL_* constants below).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

import fusedoptim
from fusedoptim import _C
from cases import (CASES_BY_ID, SMALL_GROUP_SHAPES, assert_close, assert_same_bits, assert_snapshot_equal, bits,
                   make_problem, param_groups, record, run_case, snapshot, state_tensors, supported_isas)
from reference_precision import (BF16, FP16, FP32, PrecisionReference, clip_coef64, clip_coef_f32,
                                 grad_norm64, grad_norm_sq_documented_order, kahan_store, mix32,
                                 round_nearest_even, spacing, sr_bits, sr_key, stochastic_round_bf16, to_fp32,
                                 ulps_apart)
from tolerances import FP32_CLIPPED_STATE_VS_TORCH, FP32_VS_NUMPY, FP32_VS_TORCH, REF64_CLOSED_FORM
from torch_versions import WEIGHTS_ONLY_BF16

F32, BF, F16 = torch.float32, torch.bfloat16, torch.float16
CODE = {F32: _C.DTYPE_FLOAT32, BF: _C.DTYPE_BFLOAT16, F16: _C.DTYPE_FLOAT16}
FMT = {F32: FP32, BF: BF16, F16: FP16}
NAME = {F32: "fp32", BF: "bf16", F16: "fp16"}
STORE_NAME = {_C.STORE_PLAIN: "plain", _C.STORE_MASTER: "master", _C.STORE_STOCHASTIC: "sr",
              _C.STORE_KAHAN: "kahan"}

#: Sizes around the vector widths (AVX2: 8 lanes, AVX-512: 16): scalar-only,
#: one vector minus/plus one, and a long body with a tail.
KERNEL_SIZES = [1, 15, 16, 17, 1000]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _as(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 values (exactly representable in like's dtype) as a tensor of like's dtype and shape."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(like.dtype).reshape(like.shape)


# =========================================================================== 1. the references
def test_reference_round_nearest_even_matches_torch_conversions():
    """The reference's rounding (frexp/rint on float64) against torch's own
    fp32 -> bf16 / fp16 conversions (both round to nearest even), over normal,
    subnormal, overflowing and tie values."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(20000, generator=gen) * s for s in (1.0, 1e-3, 1e-6, 1e-39, 1e4, 3e38)]
    # exact ties between two bf16 / fp16 values (odd and even lower neighbours)
    base = torch.tensor([1.0, 1.0078125, 3.0, 0.5], dtype=torch.float32)
    xs.append(base + 2.0 ** -8 * torch.tensor([1, 1, 2, 0.5]))
    xs.append(torch.tensor([1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 65520.0, 65519.99, -65520.0, 2.0 ** -25,
                            2.0 ** -24 * 1.5, 0.0, -0.0]))
    x = torch.cat(xs)
    for dtype in (BF, F16):
        expected = x.to(dtype)
        got = _as(round_nearest_even(_np(x), FMT[dtype]), expected)
        assert_same_bits([got], [expected], f"reference rne vs torch .to({NAME[dtype]})")


def test_reference_spacing_and_ulps():
    np.testing.assert_array_equal(spacing(np.array([1.0, 1.5, 0.99, 2.0, 0.0]), BF16),
                                  [2.0 ** -7, 2.0 ** -7, 2.0 ** -8, 2.0 ** -6, 2.0 ** -133])
    np.testing.assert_array_equal(spacing(np.array([1.0, 65504.0, 1e-7]), FP16), [2.0 ** -10, 32.0, 2.0 ** -24])
    assert ulps_apart(np.array([1.0]), np.array([1.0 + 2 ** -7]), BF16)[0] == 1.0


def test_reference_stochastic_rounding_probabilities_are_exact():
    """Over all 2**16 values of the random bits, x rounds up exactly
    frac * 2**16 times (frac = distance to the lower neighbour in spacings):
    the expectation of the rounded value is x itself, for any float32 x."""
    all_r = (np.arange(65536, dtype=np.uint64) << np.uint64(16))
    for x in (1.0 - 1e-4, 1.0 - 3 * 2.0 ** -20, -0.3337, 2.0 ** -120 * 1.37, 7.0 + 2.0 ** -14):
        x32 = float(np.float32(x))
        out = stochastic_round_bf16(np.full(65536, x32), all_r)
        # only the two bf16 neighbours of x occur
        assert len(np.unique(out)) == 2 and np.all(np.abs(out - x32) < spacing(np.array([x32]), BF16)[0]), x
        assert np.all(round_nearest_even(out, BF16) == out)
        assert out.mean() == pytest.approx(x32, rel=1e-15, abs=0), f"not unbiased at {x!r}: {out.mean()!r}"
    # representable values never move
    for x in (1.0, -0.9921875, 2.0 ** -100, 0.0):
        out = stochastic_round_bf16(np.full(65536, x), all_r)
        assert np.all(out == x)


def test_reference_random_bits_look_uniform_and_depend_on_every_input():
    n = 1 << 16
    key = sr_key(12345, 1, 0)
    b = sr_bits(key, np.arange(n))
    top = (b >> np.uint64(16)).astype(np.float64) / 65536.0
    # uniform on [0, 1): mean 1/2 and variance 1/12, each within 6 sigma of n samples
    assert abs(top.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(top.var() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)
    # each of the 32 bits is set about half of the time (avalanche, no stuck bits)
    for k in range(32):
        frac = float(((b >> np.uint64(k)) & np.uint64(1)).mean())
        assert abs(frac - 0.5) < 6 * math.sqrt(0.25 / n), (k, frac)
    # changing any input changes about half of the bits
    variants = [sr_key(12346, 1, 0), sr_key(12345 + (1 << 32), 1, 0), sr_key(12345, 2, 0), sr_key(12345, 1, 1)]
    for other in variants:
        d = np.bitwise_xor(b, sr_bits(other, np.arange(n)))
        flipped = np.unpackbits(d.astype(">u4").view(np.uint8)).mean()
        assert abs(flipped - 0.5) < 0.01, (other, flipped)
    assert int(mix32(0)) == 0 and int(mix32(1)) != 1


def test_reference_kahan_store_closed_forms():
    # An update of 1e-4 on a bf16 value of 1.0 is lost by rne but kept in comp,
    # and param + comp is the float64 sum up to comp's own bf16 rounding.
    # comp has bf16's 8 bits itself: each step loses at most half a spacing
    # of the comp it stores, so the bound is the sum of those half spacings.
    p, c = np.array([1.0]), np.array([0.0])
    bound = 0.0
    for k in range(1, 101):
        p, c = kahan_store(p, p - 1e-4, c, BF16)
        bound += spacing(c, BF16)[0] / 2
        assert abs((p + c)[0] - (1.0 - k * 1e-4)) <= bound + 1e-15, k
    assert bound < 2e-3 * (p[0] + 0.01)  # far below the 1e-2 moved (and plain rne moves nothing)
    assert p[0] < 1.0  # the accumulated 1e-2 moved the param
    assert abs(p[0] - 0.99) <= spacing(np.array([0.99]), BF16)[0]
    # float32 arithmetic evaluation of the same formula on representable data is exact here
    p32, c32 = kahan_store(np.array([1.0]), np.array([1.0 - 2.0 ** -9]), np.array([0.0]), BF16, arith=np.float32)
    assert p32[0] == 1.0 and c32[0] == -(2.0 ** -9)


def test_reference_clip_coefficient_matches_torch_arithmetic():
    """clip_coef_f32 is torch's fp32 arithmetic: total_norm + 1e-6, then
    max_norm / tensor (a reciprocal and a multiply), clamp(max=1)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        s = float(torch.rand((), generator=gen)) * 10.0 ** float(torch.randint(-12, 12, (), generator=gen))
        mx = float(torch.rand((), generator=gen)) * 10.0 ** float(torch.randint(-6, 6, (), generator=gen))
        norm32 = torch.tensor(math.sqrt(s), dtype=torch.float32)
        coef = (mx / (norm32 + 1e-6)).clamp(max=1.0)
        assert clip_coef_f32(s, mx) == (norm32.item(), coef.item())
    assert clip_coef64(float("nan"), 1.0) != clip_coef64(float("nan"), 1.0)
    assert clip_coef64(float("inf"), 1.0) == 0.0
    assert clip_coef64(0.5, 1.0) == 1.0


def test_reference_grad_norm_orders_agree_to_rounding():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=gen).numpy() for n in (5000, 17, 8193, 1)]
    a = grad_norm_sq_documented_order(grads)
    assert a == pytest.approx(grad_norm64(grads) ** 2, rel=1e-13)


def test_reference_options_reduce_to_the_plain_reference():
    """With fp32 params, "plain" is exactly reference_numpy's float64 update;
    master weights in float64 track the exact trajectory exactly."""
    from reference_numpy import AdamState, adam_update

    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(9, generator=gen).double().numpy()
    grads = [torch.randn(9, generator=gen).double().numpy() for _ in range(5)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    ref = PrecisionReference("adamw", [dict(hyper, params=[p0.copy()])], "fp32", "plain", fp32_scalars=False)
    master = PrecisionReference("adamw", [dict(hyper, params=[round_nearest_even(p0, BF16)])], "bf16", "master",
                                fp32_scalars=False)
    master.masters[(0, 0)] = p0.copy()
    st, theta = AdamState(), p0.copy()
    for g in grads:
        ref.step([[g]])
        master.step([[g]])
        theta = adam_update(theta, g, st, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                            amsgrad=False, maximize=False, decoupled=True)
    np.testing.assert_allclose(ref.flat_params()[0], theta, **REF64_CLOSED_FORM)
    np.testing.assert_allclose(master.masters[(0, 0)], theta, **REF64_CLOSED_FORM)
    np.testing.assert_array_equal(master.flat_params()[0], round_nearest_even(round_nearest_even(theta, FP32), BF16))


# =========================================================================== 2. the kernels
class KernelRun:
    """Tensors of one kernel-level problem in one storage layout: each tensor
    is a view at an odd offset into a buffer whose guard elements around it
    must never be written."""

    GUARD = 5

    def __init__(self, kind: str, pdt: torch.dtype, sdt: torch.dtype, store: int, sizes: List[int],
                 init: List[torch.Tensor], amsgrad: bool, momentum: float, ids: List[int], seed: int):
        self.kind, self.pdt, self.sdt, self.store = kind, pdt, sdt, store
        self.sizes, self.amsgrad, self.momentum, self.ids, self.seed = sizes, amsgrad, momentum, ids, seed
        self.buffers: List[torch.Tensor] = []
        self.params = [self._view(n, pdt, k, init[k].to(pdt)) for k, n in enumerate(sizes)]
        zeros = lambda dt: [self._view(n, dt, k + 1) for k, n in enumerate(sizes)]  # noqa: E731
        self.states: Dict[str, List[torch.Tensor]] = {}
        if kind == "adam":
            self.states["exp_avg"] = zeros(sdt)
            self.states["exp_avg_sq"] = zeros(sdt)
            if amsgrad:
                self.states["max_exp_avg_sq"] = zeros(sdt)
        elif momentum:
            self.states["momentum_buffer"] = zeros(sdt)
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
        self.extras: Optional[List[torch.Tensor]] = None
        if store == _C.STORE_MASTER:
            self.extras = [self._view(n, torch.float32, k + 2, init[k].float()) for k, n in enumerate(sizes)]
        elif store == _C.STORE_KAHAN:
            self.extras = zeros(pdt)
        self.first = True

    def _view(self, n: int, dtype: torch.dtype, offset_seed: int, fill: Optional[torch.Tensor] = None):
        off = 1 + offset_seed % 3
        buf = torch.full((n + off + self.GUARD,), 1234.5, dtype=dtype)
        self.buffers.append(buf)
        v = buf[off:off + n]
        if fill is not None:
            v.copy_(fill.reshape(-1))
        else:
            v.zero_()
        return v

    def guards_intact(self) -> bool:
        return all(bool((b[:1] == 1234.5).all()) and bool((b[-self.GUARD:] == 1234.5).all()) for b in self.buffers)

    def step(self, grads: List[torch.Tensor], hyper: Dict[str, Any], threads: int = 1, grad_mul: float = 1.0,
             stepped: Optional[List[torch.Tensor]] = None) -> None:
        """One kernel call; ``grads`` in the params' dtype (copied to a contiguous tensor of it)."""
        gs = [g.to(self.pdt).contiguous() for g in grads]
        ptr = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
        kw: Dict[str, Any] = dict(state_dtype=CODE[self.sdt], store=self.store, grad_mul=grad_mul)
        if self.extras is not None:
            kw["extras"] = ptr(self.extras)
        if self.store == _C.STORE_STOCHASTIC:
            kw.update(tensor_ids=list(self.ids), seed=self.seed)
        if self.kind == "adam":
            _C.adam_step(ptr(self.params), ptr(gs), ptr(self.states["exp_avg"]), ptr(self.states["exp_avg_sq"]),
                         ptr(self.states["max_exp_avg_sq"]) if self.amsgrad else None, ptr(self.steps),
                         list(self.sizes), CODE[self.pdt], hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                         hyper["weight_decay"], hyper["decoupled"], self.amsgrad, hyper["maximize"], threads, **kw)
        else:
            if self.store == _C.STORE_STOCHASTIC:
                kw["steps"] = ptr(self.steps)
            bufs = self.states.get("momentum_buffer")
            _C.sgd_step(ptr(self.params), ptr(gs), ptr(bufs) if bufs else None,
                        [self.first] * len(self.sizes) if bufs else None, list(self.sizes), CODE[self.pdt],
                        hyper["lr"], hyper["weight_decay"], self.momentum, hyper["dampening"], hyper["nesterov"],
                        hyper["maximize"], threads, **kw)
        self.first = False

    def fp32_twin(self) -> "KernelRun":
        """The plain fp32 layout holding exactly the values this run's update
        starts from: the master (or the param, upcast) and the states, upcast."""
        start = self.extras if self.store == _C.STORE_MASTER else self.params
        twin = KernelRun(self.kind, F32, F32, _C.STORE_PLAIN, self.sizes, [t.float() for t in start],
                         self.amsgrad, self.momentum, self.ids, self.seed)
        for key, ts in self.states.items():
            for a, b in zip(twin.states[key], ts):
                a.copy_(b.float())
        for a, b in zip(twin.steps, self.steps):
            a.copy_(b)
        twin.first = self.first
        return twin

    def outputs(self) -> List[torch.Tensor]:
        out = [p.clone() for p in self.params] + [s.clone() for ts in self.states.values() for s in ts]
        out += [s.clone() for s in self.steps]
        return out + ([x.clone() for x in self.extras] if self.extras is not None else [])


ADAM_KERNEL_HYPER = [
    dict(id="adam-l2-amsgrad", kind="adam", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
         decoupled=False, amsgrad=True, maximize=False),
    dict(id="adamw-max", kind="adam", lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05,
         decoupled=True, amsgrad=False, maximize=True),
    dict(id="sgd-nesterov-wd", kind="sgd", lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True,
         weight_decay=0.05, maximize=False),
    dict(id="sgd-plain", kind="sgd", lr=5e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
         maximize=True),
]

#: Every (param, state, store) layout the kernels compile (precision.h).
LAYOUTS = [
    (F32, F32, _C.STORE_PLAIN), (BF, BF, _C.STORE_PLAIN), (F16, F16, _C.STORE_PLAIN),
    (F32, BF, _C.STORE_PLAIN), (BF, F32, _C.STORE_MASTER), (F16, F32, _C.STORE_MASTER),
    (BF, BF, _C.STORE_STOCHASTIC), (BF, BF, _C.STORE_KAHAN), (F16, F16, _C.STORE_KAHAN),
]
LAYOUT_IDS = [f"{NAME[p]}-{NAME[s]}states-{STORE_NAME[m]}" for p, s, m in LAYOUTS]


def _kernel_problem(hyper, pdt, sdt, store, seed=77):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen) for n in KERNEL_SIZES]
    ids = [3, 0, 7, 1, 2]  # not the positions: the kernel must use what it is given
    run = KernelRun(hyper["kind"], pdt, sdt, store, KERNEL_SIZES, init, hyper.get("amsgrad", False),
                    hyper.get("momentum", 0.0), ids, seed=0x1234_5678_9ABC_DEF0 + seed)
    grads = [[torch.randn(n, generator=gen).to(pdt) for n in KERNEL_SIZES] for _ in range(6)]
    return run, grads


def _expected_store(run: KernelRun, before: List[torch.Tensor], comps_before, twin: KernelRun):
    """What ``run`` must hold after its step, from the fp32 twin's results:
    a list of (what, actual tensor, expected float64 values)."""
    out = []
    p32 = [_np(t) for t in twin.params]
    for k, p in enumerate(run.params):
        if run.store == _C.STORE_PLAIN:
            exp = p32[k] if run.pdt == F32 else round_nearest_even(p32[k], FMT[run.pdt])
        elif run.store == _C.STORE_MASTER:
            out.append((f"master[{k}]", run.extras[k], p32[k]))
            exp = round_nearest_even(p32[k], FMT[run.pdt])
        elif run.store == _C.STORE_STOCHASTIC:
            key = sr_key(run.seed, int(run.steps[k].item()), run.ids[k])
            exp = stochastic_round_bf16(p32[k], sr_bits(key, np.arange(p.numel())))
        else:
            exp, comp = kahan_store(_np(before[k]), p32[k], comps_before[k], FMT[run.pdt], arith=np.float32)
            out.append((f"kahan_comp[{k}]", run.extras[k], comp))
        out.append((f"param[{k}]", p, exp))
    for key, ts in run.states.items():
        for k, t in enumerate(ts):
            want = _np(twin.states[key][k])
            out.append((f"{key}[{k}]", t, want if run.sdt == F32 else round_nearest_even(want, FMT[run.sdt])))
    for k, s in enumerate(run.steps):
        if run.kind == "adam" or run.store == _C.STORE_STOCHASTIC:
            out.append((f"step[{k}]", s, _np(twin.steps[k]) if run.kind == "adam" else None))
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("hyper", ADAM_KERNEL_HYPER, ids=lambda h: h["id"])
def test_kernel_store_is_the_fp32_update_then_the_option_store(hyper, layout, restore_isa):
    """Note [precision options] bit for bit: each step, the fp32 kernel run on
    the option's stored values (upcast) gives the fp32 update; the option's
    param / master / comp / states must be exactly its store of that update
    (rne, sr with the documented bits, the Kahan formula in fp32), on every
    ISA, with identical bits across ISAs, sizes around the vector widths and
    tensors at odd offsets (guards untouched). grad_mul is exercised too:
    the option run multiplies in the kernel, the twin gets grads * coef."""
    pdt, sdt, store = layout
    if hyper["kind"] == "sgd" and sdt != pdt and hyper["momentum"] == 0 and store == _C.STORE_PLAIN:
        pass  # (fp32 params, bf16 states, no momentum: no state at all; still a valid layout)
    finals = {}
    for isa in supported_isas():
        restore_isa(isa)
        run, grads = _kernel_problem(hyper, pdt, sdt, store)
        for step, gs in enumerate(grads):
            grad_mul = 1.0 if step % 2 == 0 else 0.75 ** step
            twin = run.fp32_twin()
            before = [p.clone() for p in run.params]
            comps = [_np(x) for x in run.extras] if store == _C.STORE_KAHAN else None
            run.step(gs, hyper, grad_mul=grad_mul)
            twin.step([g.float() * grad_mul for g in gs], hyper)
            for what, actual, expected in _expected_store(run, before, comps, twin):
                if expected is None:
                    assert float(actual) == step + 1, f"{what}: SGD's step counter after {step + 1} steps"
                    continue
                assert_same_bits([actual], [_as(expected, actual)],
                                 f"{hyper['id']} {LAYOUT_IDS[LAYOUTS.index(layout)]} {isa} step {step + 1} {what}")
        assert run.guards_intact(), f"{isa}: an element outside a tensor was written"
        finals[isa] = run.outputs()
    ref = finals["scalar"]
    for isa, got in finals.items():
        assert_same_bits(got, ref, f"{hyper['id']} {layout} {isa} vs scalar")


def test_kernel_sr_key_uses_seed_step_and_tensor_id():
    """Different seeds, steps or tensor ids give different roundings of the
    same value (and the same ones give the same bits)."""
    n = 4096

    def one(seed, tid, steps_before=0):
        run = KernelRun("sgd", BF, BF, _C.STORE_STOCHASTIC, [n], [torch.ones(n)], False, 0.0, [tid], seed)
        run.steps[0].fill_(steps_before)
        # p' = 1 - 1e-3 * 0.2 = 0.9998 (not a bf16 value: rounds to 1.0 or 1 - 2**-8 at random)
        run.step([torch.full((n,), 0.2)], dict(lr=1e-3, weight_decay=0.0, dampening=0.0, nesterov=False,
                                               maximize=False))
        return run.params[0].clone()

    base = one(5, 0)
    assert_same_bits([one(5, 0)], [base], "same seed, step and id")
    for other in (one(6, 0), one(5, 1), one(5, 0, steps_before=1), one(5 + (1 << 40), 0)):
        assert not torch.equal(bits(other), bits(base))
    down = float((base < 1).double().mean())
    # P(down) = (1 - 0.9998) / 2**-8 = 0.0512 (computed in fp32: 0.99980002...); 6 sigma of 4096 draws
    p_down = (1.0 - float(np.float32(np.float32(1.0) - np.float32(1e-3) * np.float32(0.2)))) / 2.0 ** -8
    assert abs(down - p_down) < 6 * math.sqrt(p_down * (1 - p_down) / n), (down, p_down)


def test_kernel_sr_leaves_representable_values_unchanged():
    """A fp32 result that is already a bf16 value has zero low bits: no
    random bits can move it (16 random bits never carry into bit 16)."""
    n = 1000
    init = torch.linspace(-4, 4, n).to(BF).float()
    run = KernelRun("sgd", BF, BF, _C.STORE_STOCHASTIC, [n], [init], False, 0.0, [0], seed=99)
    hyper = dict(lr=1.0, weight_decay=0.0, dampening=0.0, nesterov=False, maximize=False)
    for _ in range(20):
        run.step([torch.zeros(n)], hyper)  # p' = p exactly
    assert_same_bits([run.params[0]], [init.to(BF)], "SR with a zero update")
    # an update landing exactly on a bf16 value: 1 - 2**-7 (0.9921875), then 1 - 2 * 2**-7 ...
    run = KernelRun("sgd", BF, BF, _C.STORE_STOCHASTIC, [n], [torch.ones(n)], False, 0.0, [0], seed=99)
    for k in range(1, 6):
        run.step([torch.full((n,), 2.0 ** -7)], hyper)
        assert bool((run.params[0].float() == 1.0 - k * 2.0 ** -7).all()), k


@pytest.mark.parametrize("threads", [2, 3])
def test_kernel_options_identical_for_thread_counts(threads):
    """Large tensors (split between threads) give the bits of one thread for
    every option layout, including the random bits of SR."""
    sizes = [70001, 33]
    hyper = ADAM_KERNEL_HYPER[1]
    for pdt, sdt, store in LAYOUTS[3:]:
        outs = []
        for t in (1, threads):
            gen = torch.Generator().manual_seed(8)
            run = KernelRun("adam", pdt, sdt, store, sizes, [torch.randn(n, generator=gen) for n in sizes], False,
                            0.0, [1, 0], seed=2024)
            for _ in range(3):
                run.step([torch.randn(n, generator=gen) for n in sizes], hyper, threads=t, grad_mul=0.5)
            outs.append(run.outputs())
        assert_same_bits(outs[1], outs[0], f"{NAME[pdt]}/{NAME[sdt]}/{STORE_NAME[store]} {threads} threads vs 1")


def test_kernel_rejects_unsupported_layouts_and_bad_options():
    n = 8
    p32, g32 = torch.zeros(n), torch.zeros(n)
    s = [torch.zeros(n) for _ in range(2)]
    step = torch.zeros(())
    ptr = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731

    def adam(dtype, **kw):
        _C.adam_step(ptr([p32]), ptr([g32]), ptr(s[:1]), ptr(s[1:]), None, ptr([step]), [n], dtype,
                     1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 1, **kw)

    bad = [
        dict(dtype=_C.DTYPE_FLOAT32, store=_C.STORE_MASTER, state_dtype=_C.DTYPE_FLOAT32, extras=ptr([p32])),
        dict(dtype=_C.DTYPE_FLOAT32, store=_C.STORE_STOCHASTIC, tensor_ids=[0]),
        dict(dtype=_C.DTYPE_FLOAT16, store=_C.STORE_STOCHASTIC, tensor_ids=[0]),
        dict(dtype=_C.DTYPE_FLOAT32, store=_C.STORE_KAHAN, extras=ptr([p32])),
        dict(dtype=_C.DTYPE_FLOAT16, state_dtype=_C.DTYPE_BFLOAT16),
        dict(dtype=_C.DTYPE_BFLOAT16, state_dtype=_C.DTYPE_FLOAT32),  # fp32 states need the master store
        dict(dtype=_C.DTYPE_BFLOAT16, store=_C.STORE_MASTER, state_dtype=_C.DTYPE_BFLOAT16, extras=ptr([p32])),
        dict(dtype=_C.DTYPE_BFLOAT16, store=_C.STORE_MASTER),  # missing extras
        dict(dtype=_C.DTYPE_BFLOAT16, store=_C.STORE_STOCHASTIC),  # missing tensor_ids
        dict(dtype=_C.DTYPE_FLOAT32, extras=ptr([p32])),  # extras without a store that takes them
        dict(dtype=_C.DTYPE_FLOAT32, store=7),
        dict(dtype=_C.DTYPE_FLOAT32, state_dtype=9),
        dict(dtype=_C.DTYPE_FLOAT32, grad_mul=1.5),
        dict(dtype=_C.DTYPE_FLOAT32, grad_mul=-0.1),
        dict(dtype=_C.DTYPE_BFLOAT16, store=_C.STORE_STOCHASTIC, tensor_ids=[1 << 33]),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            adam(**kw)
        assert float(step) == 0.0, f"{kw}: the step counter was incremented before the error"
    with pytest.raises(ValueError):  # SGD: steps only with stochastic rounding
        _C.sgd_step(ptr([p32]), ptr([g32]), None, None, [n], _C.DTYPE_FLOAT32, 0.1, 0.0, 0.0, 0.0, False, False, 1,
                    steps=ptr([step]))
    with pytest.raises(ValueError):  # ... and SR needs them
        pb = torch.zeros(n, dtype=BF)
        _C.sgd_step(ptr([pb]), ptr([pb]), None, None, [n], _C.DTYPE_BFLOAT16, 0.1, 0.0, 0.0, 0.0, False, False, 1,
                    store=_C.STORE_STOCHASTIC, tensor_ids=[0])
    # NaN and 0 are legitimate multipliers (a non-finite / infinite norm)
    adam(_C.DTYPE_FLOAT32, grad_mul=0.0)
    adam(_C.DTYPE_FLOAT32, grad_mul=float("nan"))
    assert torch.isnan(p32).all()


# ---------------------------------------------------------------- grad_norm_sq and clip_coef
def _norm_inputs(seed=6):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5000, 1, 4096, 4097, 15, 12289, 0, 33]
    dts = [F32, BF, F16, F32, BF, F32, F32, F16]
    grads = [(torch.randn(n, generator=gen) * (3.0 if k % 2 else 0.01)).to(dt) for k, (n, dt) in enumerate(zip(sizes, dts))]
    return grads


def _grad_norm_sq(grads, threads):
    return _C.grad_norm_sq([g.data_ptr() for g in grads], [g.numel() for g in grads],
                           [CODE[g.dtype] for g in grads], threads)


def test_grad_norm_sq_is_the_documented_deterministic_sum(restore_isa):
    """_C.grad_norm_sq is exactly the documented order (chunks of 4096, 8
    lanes, pairwise) of the exact float64 squares, for mixed dtypes and every
    ISA and thread count; and within float64 rounding of the exact sum."""
    grads = _norm_inputs()
    expected = grad_norm_sq_documented_order([g.float().numpy() for g in grads])
    assert expected == pytest.approx(grad_norm64([g.double().numpy() for g in grads]) ** 2, rel=1e-13)
    for isa in supported_isas():
        restore_isa(isa)
        for threads in (1, 2, 3):
            got = _grad_norm_sq(grads, threads)
            assert got == expected, f"{isa}, {threads} threads: {got!r} vs documented order {expected!r}"


def test_grad_norm_sq_nonfinite_and_large():
    g = torch.randn(100)
    g[7] = float("inf")
    assert _grad_norm_sq([g], 1) == math.inf
    g[9] = float("nan")
    assert math.isnan(_grad_norm_sq([g], 1))
    # squares of fp32 values beyond 1.8e19 overflow fp32 but not the float64 sum
    big = torch.full((4,), 3e30)
    assert _grad_norm_sq([big], 1) == 4 * float(big[0]) ** 2  # exact: 4 equal squares, a power-of-two multiple
    assert _grad_norm_sq([], 1) == 0.0


def test_clip_coef_is_torch_arithmetic():
    gen = torch.Generator().manual_seed(7)
    cases = [(0.0, 1.0), (1.0, 1.0), (4.0, 1.0), (1e-14, 1e-3), (math.inf, 1.0), (math.nan, 1.0), (1e60, 5.0)]
    cases += [(float(torch.rand((), generator=gen)) * 100, float(torch.rand((), generator=gen)) * 10)
              for _ in range(200)]
    for s, mx in cases:
        norm, coef = _C.clip_coef(s, mx)
        want_norm, want_coef = clip_coef_f32(s, mx)
        if math.isnan(s):
            assert math.isnan(norm) and math.isnan(coef)
            continue
        assert (norm, coef) == (want_norm, want_coef), (s, mx)
        # and torch's own ops on the same fp32 norm
        t = torch.tensor(norm, dtype=torch.float32)
        assert coef == (mx / (t + 1e-6)).clamp(max=1.0).item(), (s, mx)
    assert _C.clip_coef(math.inf, 1.0)[1] == 0.0


# =========================================================================== 3. the optimizers

#: Cases of the registry used with the options: L2 Adam with AMSGrad, AdamW
#: maximizing, SGD with Nesterov momentum and decay, plain SGD (no state).
OPT_CASES = [CASES_BY_ID[k] for k in ("Adam-wd0.1-amsgrad", "AdamW-wd0.1-max", "SGD-mom0.9-damp0-nesterov-wd0.05",
                                      "SGD-mom0-damp0-wd0")]
OPTION_KW = {
    "master": dict(master_weights=True),
    "stochastic": dict(stochastic_rounding=True),
    "kahan": dict(kahan_summation=True),
    "state_bf16": dict(state_dtype=torch.bfloat16),
}
#: (option, param dtype) pairs the spec allows.
OPTION_DTYPES = [("master", BF), ("master", F16), ("kahan", BF), ("kahan", F16), ("stochastic", BF),
                 ("state_bf16", F32)]
REF_STEPS = 30


def run_reference(case, problem, option: str, param_dtype: torch.dtype, max_grad_norm=None, groups_seen=None):
    """The float64 reference of ``case`` with ``option`` on ``problem`` (its
    grads upcast); ``groups_seen``: the optimizer's param groups (for sr_seed)."""
    groups = []
    for k, tensors in enumerate(problem.init):
        hyper = dict(case.kwargs)
        hyper.update(case.group_overrides(k))
        if groups_seen is not None and "sr_seed" in groups_seen[k]:
            hyper["sr_seed"] = groups_seen[k]["sr_seed"]
        hyper["params"] = [_np(t.to(param_dtype)) for t in tensors]
        groups.append(hyper)
    ref = PrecisionReference(case.kind, groups, NAME[param_dtype], option, max_grad_norm=max_grad_norm)
    for step in range(problem.steps):
        ref.step([[_np(g) for g in row] for row in problem.grads(step, param_dtype)])
    return ref


def _flat(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _eps_for(case, dtype):
    # fp16 Adam with eps=1e-8: see tolerances.FP16_ADAM_EPS (the parity tests' choice).
    return dict(eps=1e-4) if dtype == F16 and case.kind != "sgd" else {}


# ---------------------------------------------------------------- tolerances of this file
# master weights: the fp32 master is an fp32 training run on the same grads,
# so it meets the fp32-vs-float64 tolerance of the parity suite.
TOL_MASTER = FP32_VS_NUMPY
# A stored low-precision param vs the reference's stored param. With master
# weights the two differ only where the reference's (float64) and our (fp32)
# masters straddle a rounding boundary: one spacing, never more.
TOL_PARAM_ULPS = 1.0
# Kahan and stochastic rounding keep their moments in bf16 / fp16, and the
# reference models our arithmetic only up to float64 vs fp32 intermediates
# (it rounds every stored value through fp32, and uses the fp32 values of
# the scalars fp32 code multiplies by: see PrecisionReference). Where an
# intermediate fp32 rounding of ours lands within 2**-24 of a 16-bit rounding
# tie (common: decimal weights like 0.9 and 0.05 on 8-bit significands give
# exact ties), a stored moment differs by one state spacing, which changes
# every later update of that element by up to lr * 2**-8 relative: several
# param spacings for a small param (measured: up to 8 bf16 spacings on 5 of
# 1235 elements, SGD with Nesterov). Elementwise bounds are therefore
# fractions: at least 99% of the elements within one param spacing of the
# reference (measured >= 99.6%), at least 98% bit-identical (measured >= 99.1%;
# Adam bf16: 100%) ...
LOWP_MIN_WITHIN_ONE = 0.99
LOWP_MIN_IDENTICAL = 0.98
# ... and over all elements the rule for low precision: the error
# against the exact float64 trajectory (no store rounding, no state rounding)
# no worse than 2x the reference's own error, in max and in RMS (measured
# ratios 1.00 +- 0.01).
LOWP_ERR_RATIO = 2.0
# Kahan: param + comp is the value the compensation carries. Where both runs
# took the same roundings they differ only by comp's own rounding (comp has
# 8 / 11 bits): at most half a comp spacing per step each, comp within about
# half a param spacing, so <= 2 * 2**-9 param spacings per step in bf16;
# over 30 steps 0.12 spacings. 0.25 leaves 2x; required of 98% of the
# elements (the others: moment flips as above; measured >= 98.9%).
TOL_KAHAN_SUM_ULPS = 0.25
# state_dtype=bf16 with fp32 params: the params are fp32 (1e-5 relative as
# for fp32), but a bf16 moment rounded the other way than the reference's
# (see above) changes that step's update by up to lr * 2**-8 * 1.5 (m's
# spacing plus half of v's): 1.2e-4 at the largest group lr 2e-2, rarely.
# Measured max 8.5e-6 absolute; 3e-5 keeps 3.5x, below one such flip.
TOL_STATE_BF16 = dict(rtol=1e-5, atol=3e-5)
# ... and measured against the exact float64 trajectory (no state rounding),
# our error must be no worse than 2x the reference's own (the suite's
# low-precision rule, tolerances.LOWP_MAX_RATIO), plus fp32's own error
# (FP32_VS_NUMPY's atol: SGD without momentum has no state to round).
STATE_BF16_MAX_RATIO = 2.0


@pytest.mark.parametrize("option,dtype", OPTION_DTYPES, ids=[f"{o}-{NAME[d]}" for o, d in OPTION_DTYPES])
@pytest.mark.parametrize("case", OPT_CASES, ids=repr)
def test_option_matches_float64_reference(case, option, dtype):
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=31, steps=REF_STEPS)
    case = dataclasses.replace(case, kwargs=dict(case.kwargs, **_eps_for(case, dtype)))
    ours, opt = run_case(case, "ours", problem, **OPTION_KW[option])
    assert all(b.startswith("native-cpu/") for b in opt.last_backends), opt.last_backends
    ref = run_reference(case, problem, option, dtype, groups_seen=opt.param_groups)
    flat = _flat(opt)
    tag = f"{case.id} {option} {NAME[dtype]}"
    fmt = FMT[dtype]
    if option == "master":
        masters = [opt.state[p]["master_param"] for p in flat]
        assert all(m.dtype == torch.float32 for m in masters)
        stats = assert_close(masters, [ref.masters[(gi, pi)] for gi, g in enumerate(ref.groups)
                                       for pi in range(len(g["params"]))], what=f"{tag} master", **TOL_MASTER)
        record(f"master fp32 vs float64 ({NAME[dtype]})", stats, case.id)
        # the param is exactly its master rounded to nearest even
        for p, m in zip(flat, masters):
            assert_same_bits([p.detach()], [m.to(dtype)], f"{tag} param == rne(master)")
    if option == "master":
        a = np.concatenate([_np(p).ravel() for p in ours])
        e = np.concatenate([x.ravel() for x in ref.flat_params()])
        u = ulps_apart(a, e, fmt)
        record(f"master {NAME[dtype]} param spacings vs ref", dict(abs=float(u.max()), rel=float((u > 0).mean())),
               case.id)
        assert u.max() <= TOL_PARAM_ULPS, f"{tag}: params {u.max()} spacings from the reference at {int(u.argmax())}"
    if option in ("kahan", "stochastic"):
        a = np.concatenate([_np(p).ravel() for p in ours])
        e = np.concatenate([x.ravel() for x in ref.flat_params()])
        u = ulps_apart(a, e, fmt)
        within, same = float((u <= 1).mean()), float((a == e).mean())
        record(f"{option} {NAME[dtype]} params: max spacings, frac differing", dict(abs=float(u.max()), rel=1 - same),
               case.id)
        assert within >= LOWP_MIN_WITHIN_ONE, f"{tag}: only {within:.4f} of params within one spacing of the reference"
        assert same >= LOWP_MIN_IDENTICAL, f"{tag}: only {same:.4f} of params bit-identical to the reference"
        exact = np.concatenate([x.ravel() for row in ref.exact for x in row])
        eo, er = np.abs(a - exact), np.abs(e - exact)
        assert eo.max() <= LOWP_ERR_RATIO * er.max(), f"{tag}: max error vs exact {eo.max():.3e} vs ref {er.max():.3e}"
        rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
        assert rms(eo) <= LOWP_ERR_RATIO * rms(er), f"{tag}: RMS error vs exact {rms(eo):.3e} vs ref {rms(er):.3e}"
    if option == "kahan":
        comps = [opt.state[p]["kahan_comp"] for p in flat]
        assert all(c.dtype == dtype for c in comps)
        ours_sum = a + np.concatenate([_np(c).ravel() for c in comps])
        ref_sum = e + np.concatenate([ref.comps[(gi, pi)].ravel() for gi, g in enumerate(ref.groups)
                                      for pi in range(len(g["params"]))])
        w = np.abs(ours_sum - ref_sum) / spacing(e, fmt)
        frac = float((w <= TOL_KAHAN_SUM_ULPS).mean())
        assert frac >= LOWP_MIN_IDENTICAL, f"{tag}: param + comp within {TOL_KAHAN_SUM_ULPS} spacings for only {frac:.4f}"
    if option == "state_bf16":
        states = state_tensors(opt, flat)
        for key, ts in states.items():
            if key != "step":
                assert all(t.dtype == BF and t.element_size() == 2 for t in ts), key
        stats = assert_close(ours, ref.flat_params(), what=f"{tag} params", **TOL_STATE_BF16)
        record("state_bf16 fp32 params vs ref", stats, case.id)
        exact = [x for row in ref.exact for x in row]
        err_ours = np.abs(np.concatenate([_np(p).ravel() for p in ours]) - np.concatenate([x.ravel() for x in exact]))
        err_ref = np.abs(np.concatenate([x.ravel() for x in ref.flat_params()]) -
                         np.concatenate([x.ravel() for x in exact]))
        assert err_ours.max() <= STATE_BF16_MAX_RATIO * err_ref.max() + FP32_VS_NUMPY["atol"], \
            f"{tag}: error vs exact {err_ours.max():.3e}, the reference's own {err_ref.max():.3e}"


# ---------------------------------------------------------------- stochastic rounding: statistics
SR_N = 65536
SR_STEPS = 100
SR_LR = 1e-4


def _sr_run(stochastic: bool, n=SR_N, steps=SR_STEPS):
    p = torch.ones(n, dtype=BF, requires_grad=True)
    opt = fusedoptim.Adam([p], lr=SR_LR, stochastic_rounding=stochastic)
    for _ in range(steps):
        p.grad = torch.ones(n, dtype=BF)  # a constant grad: Adam moves every element by ~lr per step
        opt.step()
    return p.detach().double().numpy(), opt


def test_stochastic_rounding_is_unbiased_where_plain_bf16_stalls():
    """bf16 params at 1.0, an Adam update of ~1e-4 per step (below half the
    bf16 spacing 2**-8 below 1.0, so rne rounds every update away): plain
    bf16 stays exactly 1.0; with SR the mean over 65536 elements reaches
    1 - sum of the updates (~0.99) after 100 steps.

    Bound: conditional on the past, one SR step adds zero-mean noise of
    variance frac * (1 - frac) * spacing**2 <= spacing**2 / 4 (spacing = 2**-8
    on [0.5, 1)); the noises are martingale increments, so an element's final
    variance is <= steps * spacing**2 / 4 and the mean of n independent
    elements has standard deviation <= sqrt(steps / n) * spacing / 2
    = 7.6e-5. We allow 6 of those (4.6e-4; a bias of one update per step
    would be 1e-2). The expected value is computed by the reference: the
    update does not depend on the param (no weight decay), only on the bf16
    moments, so it is the float64 run of those moments."""
    plain, _ = _sr_run(False)
    assert np.all(plain == 1.0), "plain bf16 was expected to round every 1e-4 update away"
    ours, opt = _sr_run(True)
    ref = PrecisionReference("adam", [dict(lr=SR_LR, params=[np.ones(1)])], "fp32", "state_bf16")
    for _ in range(SR_STEPS):
        ref.step([[np.ones(1)]])
    expected = float(ref.flat_params()[0][0])
    assert abs(expected - 0.99) < 2e-4  # ~0.99: 100 updates of ~1e-4 (bf16 moments: 0.99010)
    sd_bound = math.sqrt(SR_STEPS / SR_N) * 2.0 ** -8 / 2
    mean = float(ours.mean())
    assert abs(mean - expected) <= 6 * sd_bound, \
        f"mean {mean!r} vs expected {expected!r}: {abs(mean - expected) / sd_bound:.1f} bound sigmas"
    # the spread itself stays within the martingale bound (and is not zero: it is random)
    assert 0 < ours.std() <= math.sqrt(SR_STEPS) * 2.0 ** -8 / 2
    # every element is a bf16 value near the target
    assert np.all(round_nearest_even(ours, BF16) == ours) and np.all(np.abs(ours - expected) < 0.1)
    # moments are bf16 with SR (bf16 params' layout)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == BF


# ---------------------------------------------------------------- stochastic rounding: reproducibility
SR_REPRO_SHAPES = [[(70001,), (17,)], [(1031,), ()]]


def _sr_train(steps=6, threads=None, seed=None, sgd=False, interrupt_at=None, init_seed=0):
    problem = make_problem(SR_REPRO_SHAPES, BF, seed=41, steps=steps)
    case = CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05" if sgd else "AdamW-wd0.1-amsgrad"]
    torch.manual_seed(init_seed)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups, stochastic_rounding=True)
    if seed is not None:
        for g in opt.param_groups:
            g["sr_seed"] = seed
    if threads is not None:
        opt.num_threads = threads
    flat = _flat(opt)
    for step in range(steps):
        if step == interrupt_at:
            sd = torch.load(_saved(opt.state_dict()), weights_only=True)
            saved_params = [p.detach().clone() for p in flat]
            torch.manual_seed(init_seed + 99)  # a different seed draw: the loaded one must win
            groups = param_groups(case, [[t for t in saved_params[:2]], [t for t in saved_params[2:]]])
            opt = case.make("ours", groups, stochastic_rounding=True)
            if threads is not None:
                opt.num_threads = threads
            opt.load_state_dict(sd)
            flat = _flat(opt)
        for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.step()
    assert all(b.startswith("native-cpu/") for b in opt.last_backends)
    return [p.detach().clone() for p in flat], opt


def _saved(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_stochastic_rounding_reproducible_across_isa_threads_and_checkpoints(sgd, restore_isa):
    ref, opt = _sr_train(sgd=sgd, threads=1)
    seed = opt.param_groups[0]["sr_seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 62
    assert all(g["sr_seed"] == seed for g in opt.param_groups)
    for isa in supported_isas():
        restore_isa(isa)
        for threads in (1, 2, 3):
            got, _ = _sr_train(sgd=sgd, threads=threads)
            assert_same_bits(got, ref, f"SR {isa} {threads} threads vs scalar/1 thread")
    got, _ = _sr_train(sgd=sgd, interrupt_at=3)
    assert_same_bits(got, ref, "SR after a torch.save/load state_dict round trip at step 3")
    if sgd:
        assert opt.state[_flat(opt)[0]]["step"].dtype == torch.float32  # SGD keeps a step with SR
        assert float(opt.state[_flat(opt)[0]]["step"]) == 6


def test_stochastic_rounding_seed_comes_from_torch_and_changes_the_bits():
    a, oa = _sr_train(steps=2, init_seed=1)
    b, ob = _sr_train(steps=2, init_seed=1)
    c, oc = _sr_train(steps=2, init_seed=2)
    assert oa.param_groups[0]["sr_seed"] == ob.param_groups[0]["sr_seed"] != oc.param_groups[0]["sr_seed"]
    assert_same_bits(a, b, "same torch seed")
    assert not torch.equal(bits(a[0]), bits(c[0])), "a different seed must give different roundings"
    d, _ = _sr_train(steps=2, seed=oa.param_groups[0]["sr_seed"] + 1, init_seed=1)
    assert not torch.equal(bits(a[0]), bits(d[0]))
    # state_dict carries the seed
    assert oa.state_dict()["param_groups"][0]["sr_seed"] == oa.param_groups[0]["sr_seed"]


def test_stochastic_rounding_bits_match_the_reference_through_the_optimizer():
    """Optimizer level, SGD without momentum: p' = p - lr * g is exact in
    fp32 here (lr a power of two, 8-bit values), so the param must be
    exactly sr(p', bits(sr_seed, step, tensor id, i)), tensor ids counting
    over all groups (the second group's tensor has id 2)."""
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(n, generator=gen).to(BF).requires_grad_() for n in (33, 1000, 17)]
    opt = fusedoptim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 2.0 ** -9}], lr=2.0 ** -10,
                         stochastic_rounding=True)
    for step in range(1, 4):
        before = [_np(p) for p in ps]
        # |g| >= 0.5 with 8 significant bits: lr * g needs no bits below 2**-18
        grads = [torch.randn(p.shape, generator=gen).clamp(-4, 4) for p in ps]
        grads = [torch.where(g.abs() < 0.5, torch.copysign(torch.tensor(0.5), g), g).to(BF) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for tid, (p, b, g) in enumerate(zip(ps, before, grads)):
            lr = 2.0 ** -9 if tid == 2 else 2.0 ** -10
            exact = b - lr * _np(g)
            assert np.all(to_fp32(exact) == exact)
            key = sr_key(opt.param_groups[0]["sr_seed"], step, tid)
            want = stochastic_round_bf16(exact, sr_bits(key, np.arange(p.numel())))
            assert_same_bits([p.detach()], [_as(want, p)], f"step {step} tensor {tid}")


# ---------------------------------------------------------------- tracking the fp32 trajectory
TRACK_N, TRACK_STEPS = 4096, 200


def _track(dtype, kw, sgd=False):
    """A fixed quadratic: loss = 0.5 * sum(a * (w - t)**2), grads computed in
    float64 from the stored params, then stored in the params' dtype. Small
    lr so that most updates are below half a bf16 spacing."""
    gen = torch.Generator().manual_seed(51)
    a = torch.rand(TRACK_N, generator=gen, dtype=torch.float64) + 0.5
    t = torch.randn(TRACK_N, generator=gen, dtype=torch.float64)
    w0 = torch.randn(TRACK_N, generator=gen).to(BF)  # the same (bf16-representable) start for every run
    w = w0.to(dtype).requires_grad_()
    opt = (fusedoptim.SGD([w], lr=2e-3, momentum=0.9, **kw) if sgd
           else fusedoptim.AdamW([w], lr=1e-3, weight_decay=1e-2, **kw))
    for _ in range(TRACK_STEPS):
        w.grad = (a * (w.detach().double() - t)).to(dtype)
        opt.step()
    return w.detach().double()


#: Final RMS distance to the fp32 run must be below plain bf16's divided by
#: this. Measured (AdamW / SGD, 200 steps): plain bf16 1.5e-1 / 7.6e-2 (most
#: updates vanish); master 1.5e-3 / 1.7e-3 (101x / 45x better), Kahan
#: 3.5e-3 / 1.9e-3 (43x / 41x), SR 2.3e-2 / 9.1e-3 (6.5x / 8.4x: SR is right
#: on average, each element carries its random walk). Master ends within a
#: bf16 rounding of fp32 (rne's RMS error on values ~1: 2**-8 / sqrt(12) to
#: 2**-7 / sqrt(12), 1.1e-3 to 2.3e-3). The factors keep 2x to 5x margins.
TRACK_FACTOR = {"master": 20.0, "kahan": 20.0, "stochastic": 3.0}


@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_master_kahan_and_sr_track_the_fp32_trajectory(sgd):
    ref = _track(F32, {}, sgd)
    rms = lambda x: float(((x - ref) ** 2).mean().sqrt())  # noqa: E731
    plain = rms(_track(BF, {}, sgd))
    record(f"track {'sgd' if sgd else 'adamw'} plain bf16 rms", dict(abs=plain, rel=0.0))
    for option, factor in TRACK_FACTOR.items():
        err = rms(_track(BF, OPTION_KW[option], sgd))
        record(f"track {'sgd' if sgd else 'adamw'} {option} rms", dict(abs=err, rel=plain / err))
        assert err * factor <= plain, f"{option}: RMS distance to fp32 {err:.3e}, plain bf16 {plain:.3e} (need {factor}x)"


# ---------------------------------------------------------------- max_grad_norm
CLIP_STEPS = 20
#: last_grad_norm vs clip_grad_norm_'s return value: both fp32 norms of the
#: same fp32 grads; ours sums exact squares in double (one rounding at the
#: end), torch sums per-tensor fp32 norms (a few fp32 roundings: ~1e-7
#: relative each). Measured max relative difference 6e-8; 1e-6 = 8 fp32 ulps.
NORM_VS_TORCH_RTOL = 1e-6


def _clip_run(case, which, problem, max_norm, dtype=None, steps=CLIP_STEPS):
    groups = param_groups(case, problem.init, dtype)
    opt = case.make(which, groups, **({"max_grad_norm": max_norm} if which == "ours" else {}))
    flat = [p for g in groups for p in g["params"]]
    norms = []
    for step in range(steps):
        grads = [g for row in problem.grads(step, dtype) for g in row]
        kept = [g.clone() for g in grads]
        for p, g in zip(flat, grads):
            p.grad = g
        if which == "torch":
            norms.append(torch.nn.utils.clip_grad_norm_(flat, max_norm, error_if_nonfinite=False, foreach=False))
        opt.step()
        if which == "ours":
            norms.append(opt.last_grad_norm.clone())
            for k, (p, g) in enumerate(zip(flat, kept)):
                assert torch.equal(bits(p.grad), bits(g)), f"step {step}: grad {k} was written"
    return [p.detach() for p in flat], opt, norms


@pytest.mark.parametrize("case", OPT_CASES[:3] + [CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]], ids=repr)
def test_max_grad_norm_matches_clip_grad_norm_then_torch_step(case):
    problem = make_problem(SMALL_GROUP_SHAPES, F32, seed=61, steps=CLIP_STEPS)
    max_norm = 5.0  # the grads' norm is ~40: every step clips
    ours, opt, norms = _clip_run(case, "ours", problem, max_norm)
    theirs, topt, tnorms = _clip_run(case, "torch", problem, max_norm)
    assert all(b.startswith("native-cpu/") for b in opt.last_backends)
    for a, b in zip(norms, tnorms):
        assert a.dtype == torch.float32 and a.dim() == 0
        assert float(b) > max_norm
        assert abs(float(a) - float(b)) <= NORM_VS_TORCH_RTOL * float(b), (float(a), float(b))
    stats = assert_close(ours, theirs, what=f"{case.id} clip + step vs torch", **FP32_VS_TORCH)
    record("fp32 params with max_grad_norm vs torch clip + step", stats, case.id)
    so, st = state_tensors(opt, _flat(opt)), state_tensors(topt, _flat(topt))
    for key in so:
        assert_close(so[key], st[key], what=f"{case.id} state[{key!r}]", **FP32_CLIPPED_STATE_VS_TORCH[key])


def test_max_grad_norm_counts_every_group_and_dtype_in_one_norm():
    """Groups of fp32, bf16 and fp16 params: last_grad_norm is the fp32
    rounding of the documented exact sum over all of them, and the fp32
    group's update is bit-identical to the unclipped update of grads * coef
    (so the low-precision grads did count in the coefficient)."""
    gen = torch.Generator().manual_seed(62)
    spec = [(F32, (1031,)), (BF, (4097,)), (F16, (33,)), (F32, (7,))]
    init = [torch.randn(s, generator=gen).to(dt) for dt, s in spec]
    grads = [(torch.randn(s, generator=gen) * 2).to(dt) for dt, s in spec]
    ps = [t.clone().requires_grad_() for t in init]
    opt = fusedoptim.AdamW([{"params": ps[:1]}, {"params": ps[1:2], "lr": 1e-3}, {"params": ps[2:]}], lr=1e-2,
                           max_grad_norm=1.0)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    sumsq = grad_norm_sq_documented_order([g.float().numpy() for g in grads])
    norm32, coef = clip_coef_f32(sumsq, 1.0)
    assert float(opt.last_grad_norm) == norm32
    assert norm32 == pytest.approx(grad_norm64([g.double().numpy() for g in grads]), rel=1e-7)
    assert coef < 0.05
    twin = [t.clone().requires_grad_() for t in init if t.dtype == F32]
    topt = fusedoptim.AdamW([{"params": twin[:1]}, {"params": twin[1:]}], lr=1e-2)
    for p, g in zip(twin, [g for g in grads if g.dtype == F32]):
        p.grad = g * coef
    topt.step()
    assert_same_bits([ps[0].detach(), ps[3].detach()], [t.detach() for t in twin], "fp32 params: clip == grads * coef")


def test_max_grad_norm_bit_identical_for_threads_and_isas(restore_isa):
    problem = make_problem([[(70001,), (33,)], [(4097,)]], F32, seed=63, steps=3)
    case = CASES_BY_ID["AdamW-wd0.1-max"]
    outs = []
    for isa in supported_isas():
        restore_isa(isa)
        for threads in (1, 2, 3):
            groups = param_groups(case, problem.init)
            opt = case.make("ours", groups, max_grad_norm=10.0)
            opt.num_threads = threads
            flat = _flat(opt)
            norms = []
            for step in range(3):
                for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
                    p.grad = g
                opt.step()
                norms.append(opt.last_grad_norm.clone())
            outs.append((isa, threads, norms, [p.detach().clone() for p in flat]))
    _, _, ref_norms, ref_params = outs[0]
    for isa, threads, norms, params in outs[1:]:
        assert_same_bits(norms, ref_norms, f"last_grad_norm {isa} {threads} threads")
        assert_same_bits(params, ref_params, f"params {isa} {threads} threads")


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("case", [CASES_BY_ID["AdamW-wd0.1-max"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]], ids=repr)
def test_max_grad_norm_nonfinite_grads_behave_like_torch(case, bad):
    """An inf grad: norm inf, coefficient 0, so inf * 0 = NaN in that element
    and zero grads elsewhere; a NaN grad: every grad NaN. Compare with
    clip_grad_norm_(error_if_nonfinite=False) + torch's step: same NaN
    pattern, the finite values within fp32 tolerances."""
    problem = make_problem([[(33,), (7,)], [(17,)]], F32, seed=64, steps=3)
    row = problem.grads(1)
    row[0][0][5] = float(bad)
    problem._cache[1] = row
    ours, opt, norms = _clip_run(case, "ours", problem, 1.0, steps=3)
    theirs, _, tnorms = _clip_run(case, "torch", problem, 1.0, steps=3)
    assert (math.isnan(float(norms[1])) and math.isnan(float(tnorms[1]))) if bad == "nan" else \
        float(norms[1]) == float(tnorms[1]) == math.inf
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"NaN pattern differs: {torch.isnan(a)} vs {torch.isnan(b)}"
    assert any(torch.isnan(a).any() for a in ours)
    assert_close(ours, theirs, what=f"{case.id} {bad} grad, clip + step", **FP32_VS_TORCH)


def test_max_grad_norm_above_the_norm_changes_nothing():
    case = CASES_BY_ID["Adam-wd0.1-amsgrad"]
    for dtype in (F32, BF):
        problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=65, steps=10)
        plain, _ = run_case(case, "ours", problem)
        clipped, opt = run_case(case, "ours", problem, max_grad_norm=1e6)
        assert 0 < float(opt.last_grad_norm) < 1e6
        for a, b in zip(plain, clipped):
            assert torch.equal(a, b)
        assert run_case(case, "ours", problem)[1].last_grad_norm is None


# ---------------------------------------------------------------- state_dtype=bfloat16
@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]], ids=repr)
def test_state_dtype_bf16_halves_state_memory(case):
    problem = make_problem(SMALL_GROUP_SHAPES, F32, seed=71, steps=3)
    _, opt = run_case(case, "ours", problem, state_dtype=torch.bfloat16)
    _, plain = run_case(case, "ours", problem)
    for p, q in zip(_flat(opt), _flat(plain)):
        for key, v in opt.state[p].items():
            if key == "step":
                assert v.dtype == torch.float32
                continue
            assert v.dtype == BF and v.element_size() == 2 and v.shape == p.shape, key
            assert plain.state[q][key].element_size() == 4
    assert all(g["state_dtype"] == torch.bfloat16 for g in opt.param_groups)


# ---------------------------------------------------------------- state_dict
SD_CASES = [("master", BF, CASES_BY_ID["AdamW-wd0.1-amsgrad"]), ("master", F16, CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]),
            ("kahan", BF, CASES_BY_ID["Adam-wd0.1-max"]), ("kahan", F16, CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"]),
            ("stochastic", BF, CASES_BY_ID["AdamW-wd0.1"]), ("stochastic", BF, CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]),
            ("state_bf16", F32, CASES_BY_ID["Adam-wd0.1-amsgrad"]), ("state_bf16", F32, CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"])]
SD_IDS = [f"{o}-{NAME[d]}-{c.id}" for o, d, c in SD_CASES]
EXTRA_KEY = {"master": "master_param", "kahan": "kahan_comp"}


def _start_run(case, problem, init=None, **kw):
    groups = param_groups(case, init if init is not None else problem.init)
    opt = case.make("ours", groups, **kw)
    return opt, [p for g in groups for p in g["params"]]


def _advance(opt, flat, problem, start, stop):
    for step in range(start, stop):
        for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.step()


def _regroup(flat, shapes):
    out, k = [], 0
    for group in shapes:
        out.append([flat[k + i].detach().clone() for i in range(len(group))])
        k += len(group)
    return out


@pytest.mark.parametrize("option,dtype,case", SD_CASES, ids=SD_IDS)
def test_state_dict_round_trip_is_bit_exact(option, dtype, case):
    """Save mid-run (through torch.save / torch.load(weights_only=True)),
    load into a fresh optimizer with the same option, continue: the bits of
    an uninterrupted run, with the options' state dtypes kept."""
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=72, steps=12)
    kw = OPTION_KW[option]
    torch.manual_seed(7)  # the same sr_seed for the uninterrupted and the first run
    ref_opt, ref_flat = _start_run(case, problem, **kw)
    _advance(ref_opt, ref_flat, problem, 0, 12)
    torch.manual_seed(7)
    first, flat1 = _start_run(case, problem, **kw)
    _advance(first, flat1, problem, 0, 5)
    sd = first.state_dict()
    for st in sd["state"].values():
        if option in EXTRA_KEY:
            x = st[EXTRA_KEY[option]]
            assert x.dtype == (torch.float32 if option == "master" else dtype)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in st:
                want = {"master": torch.float32, "state_bf16": BF}.get(option, dtype)
                assert st[key].dtype == want, (key, st[key].dtype)
    for g in sd["param_groups"]:
        for k, v in kw.items():
            assert g[k] == v
    # (torch 2.2's weights-only unpickler rejects the dtype torch.bfloat16, a
    # group's state_dtype here: there the checkpoint takes a full unpickle)
    loaded = torch.load(_saved(sd), weights_only=WEIGHTS_ONLY_BF16 or "state_dtype" not in kw)
    torch.manual_seed(1234)  # a different sr_seed draw: the checkpoint's must win
    second, flat2 = _start_run(case, problem, init=_regroup(flat1, problem.shapes), **kw)
    second.load_state_dict(loaded)
    for p1, p2 in zip(flat1, flat2):
        for k, v in first.state[p1].items():
            assert second.state[p2][k].dtype == v.dtype, f"{k}: {second.state[p2][k].dtype} after load, saved {v.dtype}"
    _advance(second, flat2, problem, 5, 12)
    assert all(b.startswith("native-cpu/") for b in second.last_backends)
    assert_same_bits([p.detach() for p in flat2], [p.detach() for p in ref_flat], f"{option} resumed params")
    so, sr = state_tensors(second, flat2), state_tensors(ref_opt, ref_flat)
    assert so.keys() == sr.keys()
    for key in so:
        assert_same_bits(so[key], sr[key], f"{option} resumed state[{key!r}]")


@pytest.mark.parametrize("option,dtype,case", [SD_CASES[0], SD_CASES[2], SD_CASES[5], SD_CASES[6]],
                         ids=[SD_IDS[0], SD_IDS[2], SD_IDS[5], SD_IDS[6]])
def test_state_dict_loads_into_torch_and_torch_steps(option, dtype, case):
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=73, steps=8)
    first, flat1 = _start_run(case, problem, **OPTION_KW[option])
    _advance(first, flat1, problem, 0, 4)
    sd = copy.deepcopy(first.state_dict())
    groups = param_groups(case, _regroup(flat1, problem.shapes))
    topt = case.make("torch", groups)
    topt.load_state_dict(sd)  # torch keeps unknown keys and group entries, unused
    tflat = [p for g in groups for p in g["params"]]
    _advance(topt, tflat, problem, 4, 8)
    assert all(torch.isfinite(p).all() for p in tflat)
    # torch_state_dict(): a clean torch checkpoint, with a warning naming what was dropped
    with pytest.warns(UserWarning) as rec:
        tsd = first.torch_state_dict()
    msg = " ".join(str(w.message) for w in rec)
    if option in EXTRA_KEY:
        assert EXTRA_KEY[option] in msg
    for pid, st in tsd["state"].items():
        p = flat1[pid]
        assert not set(st) & {"master_param", "kahan_comp"}
        for key, v in st.items():
            if key != "step":
                assert v.dtype == p.dtype, (key, v.dtype, p.dtype)
        if case.kind == "sgd":
            assert "step" not in st, "torch's SGD keeps no step"
    assert all(not set(g) & {"master_weights", "stochastic_rounding", "kahan_summation", "state_dtype",
                             "max_grad_norm", "sr_seed"} for g in tsd["param_groups"])
    groups = param_groups(case, _regroup(flat1, problem.shapes))
    topt = case.make("torch", groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topt.load_state_dict(tsd)
    tflat = [p for g in groups for p in g["params"]]
    _advance(topt, tflat, problem, 4, 8)
    assert all(torch.isfinite(p).all() for p in tflat)


@pytest.mark.parametrize("option", ["master", "kahan"])
def test_loading_option_state_without_the_option_warns_and_drops_it(option):
    """The options are param-group entries, so (as for lr) load_state_dict
    takes them from the checkpoint: loading a master/Kahan checkpoint as is
    turns the option on. With the option switched off in the checkpoint's
    groups, its state keys are dropped with a UserWarning, the moments take
    the param's dtype and the run continues natively."""
    case = CASES_BY_ID["AdamW-wd0.1"]
    problem = make_problem(SMALL_GROUP_SHAPES, BF, seed=74, steps=8)
    first, flat1 = _start_run(case, problem, **OPTION_KW[option])
    _advance(first, flat1, problem, 0, 4)
    name = next(iter(OPTION_KW[option]))
    again, _ = _start_run(case, problem, init=_regroup(flat1, problem.shapes))
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    assert all(g[name] is True for g in again.param_groups)
    sd = copy.deepcopy(first.state_dict())
    for g in sd["param_groups"]:
        g[name] = False
    second, flat2 = _start_run(case, problem, init=_regroup(flat1, problem.shapes))
    with pytest.warns(UserWarning, match=EXTRA_KEY[option]):
        second.load_state_dict(sd)
    for p in flat2:
        assert EXTRA_KEY[option] not in second.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert second.state[p][key].dtype == BF  # torch's layout for bf16 params
    _advance(second, flat2, problem, 4, 8)
    assert all(b.startswith("native-cpu/") for b in second.last_backends)
    for p in flat2:
        assert EXTRA_KEY[option] not in second.state[p]


def test_torch_checkpoint_into_master_weights_creates_the_master_from_the_param():
    """A torch checkpoint (bf16 params, bf16 moments) into master_weights:
    the moments become fp32, and at the next step the master starts as the
    param's value: the step equals an fp32 optimizer's step from the param
    upcast with the same (upcast) moments, bit for bit."""
    case = CASES_BY_ID["AdamW-wd0.1-amsgrad"]
    problem = make_problem(SMALL_GROUP_SHAPES, BF, seed=75, steps=5)
    tgroups = param_groups(case, problem.init)
    topt = case.make("torch", tgroups)
    tflat = [p for g in tgroups for p in g["params"]]
    _advance(topt, tflat, problem, 0, 4)
    sd = copy.deepcopy(topt.state_dict())
    current = _regroup(tflat, problem.shapes)
    ours, flat = _start_run(case, problem, init=current, master_weights=True)
    ours.load_state_dict(copy.deepcopy(sd))
    for p in flat:
        assert "master_param" not in ours.state[p]
        assert ours.state[p]["exp_avg"].dtype == torch.float32
    twin, tw = _start_run(case, problem, init=[[t.float() for t in row] for row in current])
    twin.load_state_dict(copy.deepcopy(sd))  # cast to the fp32 params' dtype
    for opt, fl in ((ours, flat), (twin, tw)):
        for p, g in zip(fl, [g for row in problem.grads(4) for g in row]):
            p.grad = g.to(p.dtype)
        opt.step()
    masters = [ours.state[p]["master_param"] for p in flat]
    assert_same_bits(masters, [p.detach() for p in tw], "master after one step vs fp32 from the param")
    assert_same_bits([p.detach() for p in flat], [m.to(BF) for m in masters], "param = rne(master)")


# ---------------------------------------------------------------- validation
def _p(dtype, n=4):
    return torch.zeros(n, dtype=dtype, requires_grad=True)


BAD_OPTIONS = [
    (F32, dict(master_weights=True)), (F32, dict(stochastic_rounding=True)), (F32, dict(kahan_summation=True)),
    (F16, dict(stochastic_rounding=True)),
    (BF, dict(master_weights=True, stochastic_rounding=True)), (BF, dict(master_weights=True, kahan_summation=True)),
    (BF, dict(stochastic_rounding=True, kahan_summation=True)),
    (F32, dict(state_dtype=torch.float16)), (F32, dict(state_dtype=torch.float64)), (F32, dict(state_dtype="bf16")),
    (F16, dict(state_dtype=torch.bfloat16)), (BF, dict(master_weights=True, state_dtype=torch.bfloat16)),
    (BF, dict(state_dtype=torch.float32)), (F16, dict(state_dtype=torch.float32)),
    (F32, dict(max_grad_norm=0.0)), (F32, dict(max_grad_norm=-1.0)), (F32, dict(max_grad_norm=math.inf)),
    (F32, dict(max_grad_norm=math.nan)),
]
BAD_IDS = [f"{NAME[d]}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for d, kw in BAD_OPTIONS]


@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.AdamW, fusedoptim.SGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype,kw", BAD_OPTIONS, ids=BAD_IDS)
def test_bad_combinations_raise_value_error(cls, dtype, kw):
    with pytest.raises(ValueError):
        cls([_p(dtype)], lr=1e-2, **kw)
    # ... and through add_param_group
    opt = cls([_p(F32)], lr=1e-2)
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[_p(dtype)], **kw))


def test_rejected_param_group_is_not_added():
    """torch.optim validates a group before appending it; a group rejected
    for its precision options must not stay in param_groups either (a later
    step would otherwise run it)."""
    kept = []
    for dtype, kw in BAD_OPTIONS:
        opt = fusedoptim.AdamW([_p(F32)], lr=1e-2)
        with pytest.raises(ValueError):
            opt.add_param_group(dict(params=[_p(dtype)], **kw))
        if len(opt.param_groups) != 1:
            kept.append(f"{NAME[dtype]} {kw}")
    assert not kept, f"rejected groups left in param_groups ({len(kept)} of {len(BAD_OPTIONS)}): {kept[:3]} ..."


def test_good_combinations_are_accepted():
    for dtype, kw in [(BF, dict(master_weights=True)), (F16, dict(master_weights=True)),
                      (BF, dict(stochastic_rounding=True)), (BF, dict(kahan_summation=True)),
                      (F16, dict(kahan_summation=True)), (F32, dict(state_dtype=torch.bfloat16)),
                      (BF, dict(state_dtype=torch.bfloat16)), (F32, dict(state_dtype=torch.float32)),
                      (BF, dict(master_weights=True, state_dtype=torch.float32)), (F16, dict(max_grad_norm=1.0)),
                      (F32, dict(max_grad_norm=2))]:
        for cls in (fusedoptim.Adam, fusedoptim.AdamW, fusedoptim.SGD):
            p = _p(dtype)
            opt = cls([p], lr=1e-2, **kw)
            p.grad = torch.ones_like(p)
            opt.step()
            assert all(b.startswith("native-cpu/") for b in opt.last_backends), (cls, kw, opt.last_backends)


def test_param_added_later_with_option_is_checked():
    """A group that passes with the option off can be given params that
    cannot take it: an fp32 param added to a master_weights optimizer."""
    opt = fusedoptim.AdamW([_p(BF)], lr=1e-2, master_weights=True)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p(F32)]})  # inherits master_weights=True
    opt.add_param_group({"params": [_p(F32)], "master_weights": False})
    # a param appended to a group's list after construction: ValueError at the step, nothing written
    bad = _p(F32)
    opt.param_groups[0]["params"].append(bad)
    good = opt.param_groups[0]["params"][0]
    good.grad, bad.grad = torch.ones_like(good), torch.ones_like(bad)
    before = snapshot(opt, [good, bad])
    with pytest.raises(ValueError):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, [good, bad]), "fp32 param appended to a master_weights group")


@pytest.mark.parametrize("kind", ["non-contiguous", "sparse-grad", "complex", "differentiable"])
def test_params_the_kernels_cannot_take_raise_runtime_error_and_write_nothing(kind):
    base = torch.randn(8, 6).to(BF)
    if kind == "non-contiguous":
        p = base.t().contiguous().t().requires_grad_()  # transposed strides
        grad = torch.randn(8, 6).to(BF)
        cls, kw = fusedoptim.AdamW, dict(kahan_summation=True)
    elif kind == "sparse-grad":
        p = torch.randn(8, 6).requires_grad_()
        grad = torch.randn(8, 6).to_sparse()
        cls, kw = fusedoptim.SGD, dict(max_grad_norm=1.0)
    elif kind == "complex":
        p = torch.randn(8, 6, dtype=torch.complex64).requires_grad_()
        grad = torch.randn(8, 6, dtype=torch.complex64)
        cls, kw = fusedoptim.Adam, dict(max_grad_norm=1.0)
    else:
        p = base.clone().requires_grad_()
        grad = torch.randn(8, 6).to(BF)
        cls, kw = fusedoptim.Adam, dict(master_weights=True, differentiable=True)
    ok = torch.randn(5).to(BF if kind != "complex" and kind != "sparse-grad" else F32).requires_grad_()
    try:
        opt = cls([ok, p], lr=1e-2, **kw)
    except ValueError:
        pytest.fail("construction must not reject; the step raises RuntimeError")
    if kind != "differentiable":  # (differentiable=True is the whole group's: no good step)
        # one good step first, so that state exists and must stay untouched
        ok.grad = torch.randn(5).to(ok.dtype)
        p.grad = None
        opt.step()
    p.grad = grad
    ok.grad = torch.randn(5).to(ok.dtype)
    before = snapshot(opt, [ok, p])
    with pytest.raises(RuntimeError):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, [ok, p]), f"{kind} with {kw}")


# ---------------------------------------------------------------- defaults unchanged
@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["AdamW-wd0.1-max"],
                                  CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"]], ids=repr)
@pytest.mark.parametrize("dtype", [F32, BF, F16], ids=lambda d: NAME[d])
def test_options_off_give_the_existing_results(case, dtype):
    """Every option explicitly off: the same bits as the defaults, the
    existing torch parity, torch's state layout and no last_grad_norm."""
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=81, steps=10)
    off = dict(master_weights=False, stochastic_rounding=False, kahan_summation=False, state_dtype=None,
               max_grad_norm=None)
    default, dopt = run_case(case, "ours", problem)
    explicit, eopt = run_case(case, "ours", problem, **off)
    for a, b in zip(default, explicit):
        assert torch.equal(bits(a), bits(b))
    assert eopt.last_grad_norm is None
    for p in _flat(eopt):
        assert set(eopt.state[p]) == set(case.state_keys)
        for k, v in eopt.state[p].items():
            assert v.dtype == (torch.float32 if k == "step" else dtype)
    # options are stored only when set: the param groups (and so the
    # state_dict) stay exactly torch's
    theirs, topt = run_case(case, "torch", problem, foreach=None)
    assert eopt.state_dict()["param_groups"] == topt.state_dict()["param_groups"]
    assert eopt.defaults == topt.defaults
    if dtype == F32:
        assert_close(explicit, theirs, what=f"{case.id} options off vs torch", **FP32_VS_TORCH)


@pytest.mark.parametrize("cls,extra", [(fusedoptim.AdamW, {}), (fusedoptim.SGD, {"momentum": 0.9})],
                         ids=["AdamW", "SGD-momentum"])
@pytest.mark.parametrize("opts,dtype", [
    ({"master_weights": True}, torch.bfloat16),
    ({"stochastic_rounding": True}, torch.bfloat16),
    ({"kahan_summation": True, "max_grad_norm": 1.0}, torch.float16),
    ({"state_dtype": torch.bfloat16, "max_grad_norm": 0.5}, torch.float32),
], ids=["master", "sr", "kahan-clip", "bf16states-clip"])
def test_cached_plan_equals_general_path(cls, extra, opts, dtype):
    """From the second step on a group runs from its cached C plan; dropping
    the plans before every step forces the general path. Same bits."""
    def run(general: bool):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (100, 3000, 7)]
        opt = cls(ps, lr=0.01, **extra, **opts)
        g = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.numel(), generator=g).to(dtype)
            if general:
                opt._fo_plans = {}
            opt.step()
            norms.append(opt.last_grad_norm)
        return ps, opt, norms

    pa, oa, na = run(False)
    pb, ob, nb = run(True)
    assert oa._fo_plans and all(plan.cpu_plan is not None for _, plan in oa._fo_plans.values())
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key in oa.state[a]:
            assert torch.equal(oa.state[a][key], ob.state[b][key]), key
    for x, y in zip(na, nb):
        assert (x is None and y is None) or torch.equal(x, y)
