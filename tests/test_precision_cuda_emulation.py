"""The precision options of the CUDA kernels, proven on the CPU through the
emulation (``_C.cuda_emulation``: the kernels of csrc/cuda/mta.h compiled by
the host compiler, Note [CUDA emulation]).

Kernel level, with host tensors: every call of the emulated CUDA kernels is
checked **bit for bit** against the CPU scalar variant (``_C.adam_step`` /
``_C.sgd_step`` under ``set_cpu_isa("scalar")``) given identical inputs and
options: params, every state, the extra stream (fp32 master or Kahan
compensation) and the step counters. The grid:

* the 9 (param, state, store) layouts of precision.h's layout_supported();
* Adam: no / L2 / decoupled weight decay, amsgrad, maximize; host step
  counters and device step counters (capturable/fused: the count kernel
  increments them, the update kernel derives bias corrections and the
  stochastic-rounding keys from them), a device lr;
* SGD: no momentum / momentum with dampening / Nesterov, weight decay,
  maximize, first step (buffer = grad) mixed with later steps in one launch;
  SGD's host step counters of stochastic rounding;
* sizes 1, 7, 8191, 8193, 16385 and more in one launch (chunk boundaries),
  views misaligned by 1..7 elements, streams misaligned against each other
  (one-element path), the large and the small kernel parameter block and
  several launches per call;
* the grad multiplier read from ``clip_coef`` (a device float32) against the
  CPU's ``grad_mul`` of the same value, NaN and 0 included; AMP unscaling in
  the kernel against grads unscaled by hand.

The grad norm (``grad_norm``): deterministic, within 1e-12 (relative, in
double) of ``_C.grad_norm_sq`` and of NumPy float64, AMP-unscaled, mixed
dtypes, 1000 tiny tensors over several launches; out[1] is precision.h's
clip_coef of the sum (``_C.clip_coef``).

Bad arguments raise ValueError before anything is written.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from fusedoptim import _C
from cases import bits, scalar_cpu
from torch_versions import GRAD_SCALER, NO_GRAD_SCALER

EMU = _C.cuda_emulation

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CODE = {F32: _C.DTYPE_FLOAT32, BF16: _C.DTYPE_BFLOAT16, F16: _C.DTYPE_FLOAT16}
PLAIN, MASTER, SR, KAHAN = _C.STORE_PLAIN, _C.STORE_MASTER, _C.STORE_STOCHASTIC, _C.STORE_KAHAN
STORE_NAME = {PLAIN: "plain", MASTER: "master", SR: "stochastic", KAHAN: "kahan"}
DNAME = {F32: "f32", BF16: "bf16", F16: "f16"}

#: (param dtype, state dtype, store mode): precision.h's layout_supported().
LAYOUTS = [
    (F32, F32, PLAIN), (BF16, BF16, PLAIN), (F16, F16, PLAIN), (F32, BF16, PLAIN),
    (BF16, F32, MASTER), (F16, F32, MASTER), (BF16, BF16, SR), (BF16, BF16, KAHAN), (F16, F16, KAHAN),
]
LAYOUT_IDS = [f"{DNAME[p]}-{DNAME[s]}-{STORE_NAME[m]}" for p, s, m in LAYOUTS]

SIZES = (1, 7, 8191, 8193, 16385, 3)
SEED = 0x1234_5678_9ABC_DEF  # stochastic rounding (more than 32 bits)
K_CHUNK, K_PAD = 8192, 8


# --------------------------------------------------------------------------- problems
def _at(values: torch.Tensor, off: int) -> torch.Tensor:
    """A contiguous copy of ``values`` starting ``off`` elements into a larger
    buffer (CPU allocations are 64-byte aligned, so the view is misaligned to
    16 bytes by ``off * element_size`` mod 16)."""
    buf = torch.zeros(values.numel() + 8, dtype=values.dtype)
    view = buf[off:off + values.numel()]
    view.copy_(values.reshape(-1))
    return view


class Problem:
    """The tensors of one multi-tensor call, each stream of tensor k placed at
    its own element offset (offs[stream][k])."""

    STREAMS = ("param", "grad", "m", "v", "vmax", "buf", "extra")

    def __init__(self, layout, sizes: Sequence[int], seed: int, offs: Optional[Dict[str, List[int]]] = None,
                 step0: float = 0.0, grad_scale: float = 1.0):
        pdt, sdt, store = layout
        self.layout, self.sizes = layout, list(sizes)
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)
        offs = offs or {}
        off = {s: offs.get(s, [0] * n) for s in self.STREAMS}
        self.t: Dict[str, List[torch.Tensor]] = {s: [] for s in self.STREAMS}
        self.steps: List[torch.Tensor] = []
        self.grad_values: List[torch.Tensor] = []
        for k, size in enumerate(sizes):
            p32 = torch.randn(size, generator=gen) * 2
            master = p32 + torch.randn(size, generator=gen) * 1e-3  # a master that differs from the param
            g32 = torch.randn(size, generator=gen) * 3
            m = torch.randn(size, generator=gen) * 0.1
            v = torch.rand(size, generator=gen) * 0.01 + 1e-4
            vmax = v + torch.rand(size, generator=gen) * 0.01
            buf = torch.randn(size, generator=gen)
            comp = torch.randn(size, generator=gen) * 1e-3 * p32.abs()
            if grad_scale != 1.0:
                g32 = g32 * grad_scale
            self.t["param"].append(_at(p32.to(pdt), off["param"][k]))
            self.t["grad"].append(_at(g32.to(pdt), off["grad"][k]))
            self.t["m"].append(_at(m.to(sdt), off["m"][k]))
            self.t["v"].append(_at(v.to(sdt), off["v"][k]))
            self.t["vmax"].append(_at(vmax.to(sdt), off["vmax"][k]))
            self.t["buf"].append(_at(buf.to(sdt), off["buf"][k]))
            if store == MASTER:
                self.t["extra"].append(_at(master.float(), off["extra"][k]))
            elif store == KAHAN:
                self.t["extra"].append(_at(comp.to(pdt), off["extra"][k]))
            self.steps.append(torch.tensor(step0, dtype=torch.float32))

    def clone(self) -> "Problem":
        c = object.__new__(Problem)
        c.layout, c.sizes = self.layout, list(self.sizes)
        c.t = {s: [_at(x.clone(), int(x.storage_offset())) for x in xs] for s, xs in self.t.items()}
        c.steps = [s.clone() for s in self.steps]
        return c

    def ptrs(self, stream: str) -> List[int]:
        return [x.data_ptr() for x in self.t[stream]]

    @property
    def numels(self) -> List[int]:
        return [x.numel() for x in self.t["param"]]

    def snapshot(self) -> Dict[str, List[torch.Tensor]]:
        out = {s: [bits(x) for x in xs] for s, xs in self.t.items()}
        out["step"] = [bits(s) for s in self.steps]
        return out


def assert_same(got: Problem, ref: Problem, what: str, streams: Optional[Sequence[str]] = None) -> None:
    """Bit for bit, every stream (and the step counters)."""
    a, b = got.snapshot(), ref.snapshot()
    for s in (streams or a.keys()):
        for k, (x, y) in enumerate(zip(a[s], b[s])):
            if not torch.equal(x, y):
                diff = torch.nonzero((x != y).reshape(-1)).reshape(-1)
                i = int(diff[0])
                raise AssertionError(f"{what}: {s}[{k}] (size {got.sizes[k]}) differs at {diff.numel()} of "
                                     f"{x.numel()} elements, first at {i}: {hex(int(x.reshape(-1)[i]))} vs "
                                     f"{hex(int(y.reshape(-1)[i]))}")


def assert_unchanged(p: Problem, before: Dict[str, List[torch.Tensor]], what: str) -> None:
    after = p.snapshot()
    for s in before:
        for x, y in zip(after[s], before[s]):
            assert torch.equal(x, y), f"{what}: {s} was written"


# --------------------------------------------------------------------------- callers
ADAM_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _options(p: Problem, ids: Sequence[int]) -> dict:
    pdt, sdt, store = p.layout
    return dict(state_dtype=CODE[sdt], store=store, extras=p.ptrs("extra") if store in (MASTER, KAHAN) else None,
                tensor_ids=list(ids) if store == SR else None, seed=SEED if store == SR else 0)


def adam_cpu(p: Problem, wd: float, decoupled: bool, amsgrad: bool, maximize: bool, ids: Sequence[int],
             grad_mul: float = 1.0, lr: float = ADAM_HYPER["lr"]) -> None:
    hyper = dict(ADAM_HYPER, lr=lr)
    with scalar_cpu():
        _C.adam_step(p.ptrs("param"), p.ptrs("grad"), p.ptrs("m"), p.ptrs("v"), p.ptrs("vmax") if amsgrad else None,
                     [s.data_ptr() for s in p.steps], p.numels, CODE[p.layout[0]], hyper["lr"], hyper["beta1"],
                     hyper["beta2"], hyper["eps"], wd, decoupled, amsgrad, maximize, 1, grad_mul=grad_mul,
                     **_options(p, ids))


def adam_emu(p: Problem, wd: float, decoupled: bool, amsgrad: bool, maximize: bool, ids: Sequence[int], *,
             device_steps: bool = False, space: str = "auto", clip: Optional[torch.Tensor] = None,
             grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
             lr: float = ADAM_HYPER["lr"], lr_t: Optional[torch.Tensor] = None) -> dict:
    hyper = dict(ADAM_HYPER, lr=lr)
    return EMU.adam_step(p.ptrs("param"), p.ptrs("grad"), p.ptrs("m"), p.ptrs("v"),
                         p.ptrs("vmax") if amsgrad else None, [s.data_ptr() for s in p.steps], p.numels,
                         CODE[p.layout[0]], hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], wd, decoupled,
                         amsgrad, maximize, device_steps=device_steps,
                         lr_ptr=lr_t.data_ptr() if lr_t is not None else 0,
                         grad_scale=grad_scale.data_ptr() if grad_scale is not None else 0,
                         found_inf=found_inf.data_ptr() if found_inf is not None else 0, param_space=space,
                         clip_coef=clip.data_ptr() if clip is not None else 0, **_options(p, ids))


def _sgd_steps(p: Problem) -> Optional[List[int]]:
    return [s.data_ptr() for s in p.steps] if p.layout[2] == SR else None


SGD_LR = 0.05


def sgd_cpu(p: Problem, wd: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
            first: Sequence[bool], ids: Sequence[int], grad_mul: float = 1.0) -> None:
    with scalar_cpu():
        _C.sgd_step(p.ptrs("param"), p.ptrs("grad"), p.ptrs("buf") if momentum else None,
                    list(first) if momentum else None, p.numels, CODE[p.layout[0]], SGD_LR, wd, momentum, dampening,
                    nesterov, maximize, 1, steps=_sgd_steps(p), grad_mul=grad_mul, **_options(p, ids))


def sgd_emu(p: Problem, wd: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
            first: Sequence[bool], ids: Sequence[int], *, space: str = "auto", clip: Optional[torch.Tensor] = None,
            grad_scale: Optional[torch.Tensor] = None) -> dict:
    return EMU.sgd_step(p.ptrs("param"), p.ptrs("grad"), p.ptrs("buf") if momentum else None,
                        list(first) if momentum else None, p.numels, CODE[p.layout[0]], SGD_LR, wd, momentum,
                        dampening, nesterov, maximize, param_space=space,
                        grad_scale=grad_scale.data_ptr() if grad_scale is not None else 0,
                        clip_coef=clip.data_ptr() if clip is not None else 0, steps=_sgd_steps(p),
                        **_options(p, ids))


# --------------------------------------------------------------------------- Adam
#: (weight decay, decoupled, amsgrad, maximize): every weight-decay mode with
#: and without amsgrad, maximize on and off.
ADAM_FLAGS = [(0.0, False, False, False), (0.1, False, True, False), (0.1, True, False, True),
              (0.1, True, True, False), (0.1, False, False, True), (0.0, False, True, True)]
ADAM_FLAG_IDS = [f"wd{'-dec' if d else '-l2' if w else '0'}{'-ams' if a else ''}{'-max' if m else ''}"
                 for w, d, a, m in ADAM_FLAGS]


@pytest.mark.parametrize("steps_mode", ["host", "device"])
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=ADAM_FLAG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_adam_layout_bits(layout, flags, steps_mode):
    """Three steps over tensors of 1, 7, 8191, 8193, 16385 and 3 elements in
    one launch (chunk boundaries inside tensors, blocks spanning tensors);
    param blocks alternate between large and small."""
    wd, dec, ams, mx = flags
    p = Problem(layout, SIZES, seed=100 * LAYOUTS.index(layout) + ADAM_FLAGS.index(flags), step0=3.0)
    ref = p.clone()
    ids = [5, 0, 17, 2**31 + 3, 9, 1]
    space = "large" if (LAYOUTS.index(layout) + ADAM_FLAGS.index(flags)) % 2 == 0 else "small"
    for step in range(3):
        st = adam_emu(p, wd, dec, ams, mx, ids, device_steps=steps_mode == "device", space=space)
        adam_cpu(ref, wd, dec, ams, mx, ids)
        assert st["launches"] == 1 and st["max_tensors_per_launch"] == len(SIZES), st
        assert_same(p, ref, f"Adam {layout} {flags} {steps_mode} step {step}")
    assert [s.item() for s in p.steps] == [6.0] * len(SIZES)


MISALIGNED = [(layout, how) for layout in LAYOUTS
              for how in ("shared", "grad-differs", "state-differs", "extra-differs")
              if how != "extra-differs" or layout[2] in (MASTER, KAHAN)]  # only these have an extra stream


@pytest.mark.parametrize("layout,how", MISALIGNED, ids=[f"{LAYOUT_IDS[LAYOUTS.index(l)]}-{h}" for l, h in MISALIGNED])
def test_adam_misaligned(layout, how):
    """Tensor k's streams start k % 8 elements into their buffers ("shared":
    every stream at the same element offset, so the 16-byte packets start
    after a one-element head; otherwise one stream is offset differently and
    the tensor takes the one-element path)."""
    sizes = [9, 100, 8195, 33, 1, 2, 31, 1000]
    n = len(sizes)
    base = [k % 8 for k in range(n)]
    shifted = [(k + 1 + k % 3) % 8 for k in range(n)]
    offs = {s: base for s in Problem.STREAMS}
    if how == "grad-differs":
        offs["grad"] = shifted
    elif how == "state-differs":
        offs = dict(offs, m=shifted, v=shifted, vmax=shifted)
    elif how == "extra-differs":
        offs["extra"] = shifted
    for flags, device_steps in [((0.1, True, True, False), False), ((0.1, False, False, True), True)]:
        wd, dec, ams, mx = flags
        p = Problem(layout, sizes, seed=7, offs=offs)
        ref = p.clone()
        ids = list(range(10, 10 + n))
        for step in range(2):
            adam_emu(p, wd, dec, ams, mx, ids, device_steps=device_steps)
            adam_cpu(ref, wd, dec, ams, mx, ids)
            assert_same(p, ref, f"Adam {layout} misaligned {how} {flags} step {step}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_adam_device_lr_and_many_launches(layout):
    """Device steps with a device lr, 100 tensors of 1..100 elements: 3
    launches of the small parameter block (48 tensors each), 1 of the large;
    a launch of several tensors per block."""
    sizes = list(range(1, 101))
    for space, launches in (("small", 3), ("large", 1)):
        p = Problem(layout, sizes, seed=11, step0=1.0)
        ref = p.clone()
        ids = list(range(len(sizes)))
        lr_t = torch.tensor(2e-3)
        for step in range(2):
            st = adam_emu(p, 0.1, True, True, False, ids, device_steps=True, space=space, lr_t=lr_t, lr=1e-3)
            adam_cpu(ref, 0.1, True, True, False, ids, lr=float(lr_t))  # the lr the device reads: fp32
            assert st["launches"] == launches, st
            assert_same(p, ref, f"Adam {layout} device lr {space} step {step}")


# --------------------------------------------------------------------------- SGD
#: (weight decay, momentum, dampening, nesterov, maximize)
SGD_FLAGS = [(0.0, 0.0, 0.0, False, False), (0.05, 0.0, 0.0, False, True), (0.0, 0.9, 0.1, False, False),
             (0.05, 0.9, 0.1, False, True), (0.05, 0.9, 0.0, True, False), (0.0, 0.9, 0.0, True, True)]
SGD_FLAG_IDS = [f"wd{w}-mom{m}-damp{d}{'-nesterov' if n else ''}{'-max' if x else ''}" for w, m, d, n, x in SGD_FLAGS]


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=SGD_FLAG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_sgd_layout_bits(layout, flags):
    """Three steps; the first has first-step tensors (buffer = grad) and
    initialised ones in the same launch; SGD's step counters (stochastic
    rounding) counted by the binding as on the CPU."""
    wd, mom, damp, nest, mx = flags
    p = Problem(layout, SIZES, seed=100 * LAYOUTS.index(layout) + SGD_FLAGS.index(flags), step0=2.0)
    ref = p.clone()
    ids = [3, 1, 4, 1, 5, 9]
    space = "large" if (LAYOUTS.index(layout) + SGD_FLAGS.index(flags)) % 2 == 0 else "small"
    first = [True, False, True, True, False, True]
    for step in range(3):
        st = sgd_emu(p, wd, mom, damp, nest, mx, first, ids, space=space)
        sgd_cpu(ref, wd, mom, damp, nest, mx, first, ids)
        assert st["launches"] == 1, st
        assert_same(p, ref, f"SGD {layout} {flags} step {step}")
        first = [False] * len(SIZES)
    expect = 5.0 if layout[2] == SR else 2.0
    assert [s.item() for s in p.steps] == [expect] * len(SIZES)


@pytest.mark.parametrize("how", ["shared", "grad-differs", "buf-differs"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_sgd_misaligned(layout, how):
    sizes = [9, 100, 8195, 33, 1, 2, 31, 1000]
    n = len(sizes)
    base = [k % 8 for k in range(n)]
    shifted = [(k + 3) % 8 for k in range(n)]
    offs = {s: base for s in Problem.STREAMS}
    if how == "grad-differs":
        offs["grad"] = shifted
    elif how == "buf-differs":
        offs["buf"] = shifted
    for flags in [(0.05, 0.9, 0.0, True, False), (0.0, 0.0, 0.0, False, True)]:
        wd, mom, damp, nest, mx = flags
        p = Problem(layout, sizes, seed=8, offs=offs)
        ref = p.clone()
        ids = list(range(n))
        first = [k % 2 == 0 for k in range(n)]
        for step in range(2):
            sgd_emu(p, wd, mom, damp, nest, mx, first, ids)
            sgd_cpu(ref, wd, mom, damp, nest, mx, first, ids)
            assert_same(p, ref, f"SGD {layout} misaligned {how} {flags} step {step}")
            first = [False] * n


def test_sgd_many_launches_first_bits():
    """700 tensors: two launches of the large block (672 + 28), the first-step
    bits of each launch start clean."""
    sizes = [k % 13 + 1 for k in range(700)]
    layout = (BF16, F32, MASTER)
    p = Problem(layout, sizes, seed=12)
    ref = p.clone()
    first = [k % 3 == 0 for k in range(700)]
    st = sgd_emu(p, 0.0, 0.9, 0.0, False, False, first, list(range(700)), space="large")
    sgd_cpu(ref, 0.0, 0.9, 0.0, False, False, first, list(range(700)))
    assert st["launches"] == 2 and st["capacity"] == 672, st
    assert_same(p, ref, "SGD 700 tensors")


# --------------------------------------------------------------------------- grad multiplier, AMP
CLIP_VALUES = [0.37, 1.0, 0.0, float("nan"), 1e-30]


@pytest.mark.parametrize("coef", CLIP_VALUES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[::2] + [LAYOUTS[3]], ids=LAYOUT_IDS[::2] + [LAYOUT_IDS[3]])
def test_clip_coef_pointer_matches_grad_mul(layout, coef):
    """The kernels multiply the grads by *clip_coef (a float32 on the device)
    exactly as the CPU multiplies them by grad_mul (maximize included)."""
    clip = torch.tensor(coef, dtype=torch.float32)
    for mx in (False, True):
        p = Problem(layout, SIZES[:5], seed=13)
        ref = p.clone()
        ids = list(range(5))
        for steps_mode in ("host", "device"):
            adam_emu(p, 0.1, True, False, mx, ids, device_steps=steps_mode == "device", clip=clip)
            adam_cpu(ref, 0.1, True, False, mx, ids, grad_mul=float(clip))
            assert_same(p, ref, f"Adam {layout} clip {coef} max {mx} {steps_mode}")
        p = Problem(layout, SIZES[:5], seed=14)
        ref = p.clone()
        first = [True] * 5
        for step in range(2):
            sgd_emu(p, 0.05, 0.9, 0.0, True, mx, first, ids, clip=clip)
            sgd_cpu(ref, 0.05, 0.9, 0.0, True, mx, first, ids, grad_mul=float(clip))
            assert_same(p, ref, f"SGD {layout} clip {coef} max {mx}")
            first = [False] * 5


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_amp_unscale_then_clip(layout):
    """AMP: the kernel divides the grads by the scale (rounded to the grad
    dtype, written back) and then applies the clip coefficient; the CPU gets
    grads unscaled by hand and grad_mul."""
    scale = 1024.0
    scale_t, found = torch.tensor(scale), torch.tensor(0.0)
    clip = torch.tensor(0.5)
    sizes = [7, 8193, 100]
    p = Problem(layout, sizes, seed=15, grad_scale=scale)
    ref = p.clone()
    for g in ref.t["grad"]:
        g.copy_((g.float() / scale).to(g.dtype))
    adam_emu(p, 0.1, False, True, False, [0, 1, 2], grad_scale=scale_t, found_inf=found, clip=clip)
    adam_cpu(ref, 0.1, False, True, False, [0, 1, 2], grad_mul=0.5)
    assert_same(p, ref, f"Adam AMP {layout}")
    p = Problem(layout, sizes, seed=16, grad_scale=scale)
    ref = p.clone()
    for g in ref.t["grad"]:
        g.copy_((g.float() / scale).to(g.dtype))
    sgd_emu(p, 0.0, 0.9, 0.1, False, False, [True] * 3, [0, 1, 2], grad_scale=scale_t, clip=clip)
    sgd_cpu(ref, 0.0, 0.9, 0.1, False, False, [True] * 3, [0, 1, 2], grad_mul=0.5)
    assert_same(p, ref, f"SGD AMP {layout}")


def test_found_inf_writes_nothing():
    layout = (BF16, BF16, SR)
    p = Problem(layout, [7, 8193], seed=17, step0=4.0)
    before = p.snapshot()
    found, scale, clip = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)
    adam_emu(p, 0.1, True, False, False, [0, 1], device_steps=True, grad_scale=scale, found_inf=found, clip=clip)
    assert_unchanged(p, before, "Adam with found_inf")


def test_stochastic_rounding_keys_differ_by_tensor_and_step():
    """The same values in two tensors with different ids round differently
    somewhere; the emulated kernels agree with the CPU on each."""
    layout = (BF16, BF16, SR)
    p = Problem(layout, [4096, 4096], seed=18)
    for x in ("param", "grad", "m", "v"):
        p.t[x][1].copy_(p.t[x][0])
    ref = p.clone()
    adam_emu(p, 0.0, False, False, False, [0, 1])
    adam_cpu(ref, 0.0, False, False, False, [0, 1])
    assert_same(p, ref, "SR ids")
    assert not torch.equal(p.t["param"][0], p.t["param"][1])


# --------------------------------------------------------------------------- grad norm
def _norm_inputs(sizes: Sequence[int], dtypes: Sequence[torch.dtype], seed: int, offs: Optional[List[int]] = None,
                 scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for k, (n, dt) in enumerate(zip(sizes, dtypes)):
        g = (torch.randn(n, generator=gen) * (0.1 + k % 5) * scale).to(dt)
        grads.append(_at(g, offs[k] if offs else 0))
    return grads


def emu_norm(grads, max_norm: float = 1.0, grad_scale: Optional[torch.Tensor] = None, space: str = "auto",
             scratch_extra: int = 0) -> Tuple[float, float, dict]:
    numels = [g.numel() for g in grads]
    dts = [CODE[g.dtype] for g in grads]
    n = EMU.grad_norm_scratch(numels, dts)
    scratch = torch.full((max(n + scratch_extra, 1),), float("nan"), dtype=torch.float64)
    out = torch.zeros(2, dtype=torch.float32)
    st = EMU.grad_norm([g.data_ptr() for g in grads], numels, dts, scratch.data_ptr(), scratch.numel(),
                       out.data_ptr(), max_norm, grad_scale=grad_scale.data_ptr() if grad_scale is not None else 0,
                       param_space=space)
    return float(out[0]), float(out[1]), dict(st, scratch=n, out_bits=bits(out),
                                              partials=scratch[:st["blocks"]].tolist())


def cpu_norm_sq(grads) -> float:
    return _C.grad_norm_sq([g.data_ptr() for g in grads], [g.numel() for g in grads], [CODE[g.dtype] for g in grads], 1)


def np_norm_sq(grads) -> float:
    return float(sum(np.sum(g.float().numpy().astype(np.float64) ** 2) for g in grads))


NORM_CASES = {
    "f32": ([1, 7, 8191, 8193, 16385, 100000], [F32] * 6),
    "bf16": ([5, 8192, 33000], [BF16] * 3),
    "mixed": ([100, 9000, 7, 20000, 1, 4097, 0, 3], [BF16, F32, F16, F16, F32, BF16, F32, F32]),
}


@pytest.mark.parametrize("space", ["large", "small"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_grad_norm_matches_float64(case, space):
    sizes, dts = NORM_CASES[case]
    grads = _norm_inputs(sizes, dts, seed=19, offs=[k % 8 for k in range(len(sizes))])
    before = [bits(g) for g in grads]
    norm, coef, st = emu_norm(grads, max_norm=1.0, space=space)
    for g, b in zip(grads, before):
        assert torch.equal(bits(g), b), "grad_norm wrote a grad"
    # The sum of squares in double: the stage-1 partials (left in the
    # scratch) add up to the CPU's and NumPy's float64 sums within 1e-12;
    # the fp32 norm is within one rounding of the CPU's (its double sum
    # differs in the last bits, which may cross a float rounding boundary).
    ref_cpu, ref_np = cpu_norm_sq(grads), np_norm_sq(grads)
    assert len(st["partials"]) == st["blocks"] <= st["scratch"]
    total = math.fsum(st["partials"])
    assert abs(total - ref_cpu) <= 1e-12 * ref_cpu and abs(total - ref_np) <= 1e-12 * ref_np, (total, ref_cpu, ref_np)
    exp_norm, exp_coef = _C.clip_coef(ref_cpu, 1.0)
    assert norm == pytest.approx(exp_norm, rel=2 ** -23), (norm, exp_norm)
    assert abs(norm * norm - ref_np) <= 4 * 2 ** -23 * ref_np
    if norm == exp_norm:
        assert coef == exp_coef
    # Determinism: the same bits on every run (and the scratch size is enough).
    for _ in range(2):
        assert torch.equal(emu_norm(grads, max_norm=1.0, space=space)[2]["out_bits"], st["out_bits"])
    groups = len(set(dts))
    assert st["launches"] >= groups


def test_grad_norm_sum_of_squares_in_double():
    """The double sum itself, through a norm whose float is exact: grads of
    0/1/2 values; and through coef with max_norm = norm (exactly 1 - tiny)."""
    grads = [_at(torch.tensor([3.0, 4.0] * 5000), 1), _at(torch.full((12,), 2.0, dtype=BF16), 0)]
    norm, coef, _ = emu_norm(grads, max_norm=1e6)
    assert norm == float(np.float32(math.sqrt(25 * 5000 + 48)))
    assert coef == 1.0
    norm, coef, _ = emu_norm(grads, max_norm=1.0)
    exp = _C.clip_coef(cpu_norm_sq(grads), 1.0)
    assert (norm, coef) == exp


def test_grad_norm_with_grad_scale():
    """AMP: each element unscaled exactly as the update does (g / scale rounded
    to the grad dtype) before squaring."""
    scale = 4096.0
    sizes, dts = NORM_CASES["mixed"]
    grads = _norm_inputs(sizes, dts, seed=21, scale=scale)
    unscaled = [(g.float() / scale).to(g.dtype) for g in grads]
    norm, coef, _ = emu_norm(grads, max_norm=0.5, grad_scale=torch.tensor(scale))
    exp_norm, exp_coef = _C.clip_coef(cpu_norm_sq(unscaled), 0.5)
    assert norm == pytest.approx(exp_norm, rel=2 ** -23)
    assert coef == pytest.approx(exp_coef, rel=2 ** -22)
    assert abs(norm * norm - np_norm_sq(unscaled)) <= 4 * 2 ** -23 * np_norm_sq(unscaled)


@pytest.mark.parametrize("space,launches", [("small", 6), ("large", 1)])
def test_grad_norm_many_tiny_tensors(space, launches):
    """1000 tensors of 1..7 elements: 6 launches of the small parameter block
    (168 tensors each), one of the large; several tensors per block."""
    sizes = [k % 7 + 1 for k in range(1000)]
    grads = _norm_inputs(sizes, [F32] * 1000, seed=22)
    norm, coef, st = emu_norm(grads, space=space)
    assert st["launches"] == launches, st
    exp_norm, exp_coef = _C.clip_coef(cpu_norm_sq(grads), 1.0)
    assert norm == pytest.approx(exp_norm, rel=2 ** -23)
    assert abs(norm * norm - np_norm_sq(grads)) <= 4 * 2 ** -23 * np_norm_sq(grads)
    assert torch.equal(emu_norm(grads, space=space)[2]["out_bits"], st["out_bits"])


def test_grad_norm_nonfinite_and_empty():
    grads = _norm_inputs([10, 10], [F32, BF16], seed=23)
    grads[1][3] = float("inf")
    norm, coef, _ = emu_norm(grads)
    assert norm == float("inf") and coef == 0.0
    grads[0][2] = float("nan")
    norm, coef, _ = emu_norm(grads)
    assert math.isnan(norm) and math.isnan(coef)
    norm, coef, st = emu_norm([])
    assert (norm, coef) == _C.clip_coef(0.0, 1.0) and st["scratch"] == 0


def test_grad_norm_scratch_size():
    sizes = [8192] * 3 + [1]
    assert EMU.grad_norm_scratch(sizes, [0] * 4) == 4  # padded flat list: 3 * 8192 + 8 -> 4 blocks
    # per dtype: fp32 tensors 0 and 3 (8192 + 8 -> 2 blocks), bf16 1, fp16 1
    assert EMU.grad_norm_scratch(sizes, [0, 1, 2, 0]) == 4
    assert EMU.grad_norm_scratch([0, 0], [0, 1]) == 0


# --------------------------------------------------------------------------- bad arguments
def _bad_adam_calls(p: Problem):
    """(what, kwargs overriding a valid emulated Adam call) that must raise ValueError."""
    ok = dict(state_dtype=CODE[BF16], store=KAHAN, extras=p.ptrs("extra"), tensor_ids=None, seed=0)
    return [
        ("unsupported layout", dict(ok, state_dtype=CODE[F32], store=KAHAN)),
        ("stochastic with fp16 states", dict(ok, state_dtype=CODE[F16], store=SR, extras=None, tensor_ids=[0, 1])),
        ("stochastic with extras", dict(ok, store=SR, tensor_ids=[0, 1])),
        ("kahan without extras", dict(ok, extras=None)),
        ("extras with plain store", dict(ok, store=PLAIN)),
        ("short extras", dict(ok, extras=p.ptrs("extra")[:1])),
        ("misaligned extras", dict(ok, extras=[x + 1 for x in p.ptrs("extra")])),
        ("misaligned clip_coef", dict(ok, clip_coef=p.t["param"][0].data_ptr() + 2)),
        ("bad state dtype", dict(ok, state_dtype=7)),
        ("bad store", dict(ok, store=9)),
    ]


def test_bad_arguments_raise_before_writing():
    p = Problem((BF16, BF16, KAHAN), [7, 9], seed=24, step0=1.0)
    before = p.snapshot()
    for what, kw in _bad_adam_calls(p):
        for device_steps in (False, True):
            with pytest.raises(ValueError):
                EMU.adam_step(p.ptrs("param"), p.ptrs("grad"), p.ptrs("m"), p.ptrs("v"), None,
                              [s.data_ptr() for s in p.steps], p.numels, CODE[BF16], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                              False, False, False, device_steps=device_steps, **kw)
                pytest.fail(f"no ValueError: {what}")
            assert_unchanged(p, before, f"Adam {what}")
    q = Problem((BF16, BF16, SR), [7, 9], seed=25, step0=1.0)
    before = q.snapshot()
    sgd_bad = [
        ("stochastic without steps", dict(store=SR, tensor_ids=[0, 1], steps=None)),
        ("stochastic without ids", dict(store=SR, steps=[s.data_ptr() for s in q.steps])),
        ("steps without stochastic", dict(store=PLAIN, steps=[s.data_ptr() for s in q.steps])),
        ("short ids", dict(store=SR, tensor_ids=[0], steps=[s.data_ptr() for s in q.steps])),
        ("master with bf16 states", dict(store=MASTER, extras=q.ptrs("param"))),
    ]
    for what, kw in sgd_bad:
        with pytest.raises(ValueError):
            EMU.sgd_step(q.ptrs("param"), q.ptrs("grad"), q.ptrs("buf"), [True, True], q.numels, CODE[BF16], 0.1, 0.0,
                         0.9, 0.0, False, False, state_dtype=CODE[BF16], **kw)
            pytest.fail(f"no ValueError: {what}")
        assert_unchanged(q, before, f"SGD {what}")
    # adam_step's stochastic rounding with device steps still needs ids.
    with pytest.raises(ValueError):
        EMU.adam_step(q.ptrs("param"), q.ptrs("grad"), q.ptrs("m"), q.ptrs("v"), None,
                      [s.data_ptr() for s in q.steps], q.numels, CODE[BF16], 1e-3, 0.9, 0.999, 1e-8, 0.0, False,
                      False, False, device_steps=True, store=SR)
    assert_unchanged(q, before, "Adam SR without ids")


def test_grad_norm_bad_arguments():
    grads = _norm_inputs([100, 9000], [F32, BF16], seed=26)
    numels, dts = [100, 9000], [0, 1]
    need = EMU.grad_norm_scratch(numels, dts)
    scratch = torch.full((need,), 7.0, dtype=torch.float64)
    out = torch.full((2,), 7.0)
    ptrs = [g.data_ptr() for g in grads]
    bad = [
        ("scratch too small", dict(scratch_len=need - 1)),
        ("max_norm zero", dict(max_norm=0.0)),
        ("max_norm nan", dict(max_norm=float("nan"))),
        ("max_norm inf", dict(max_norm=float("inf"))),
        ("null out", dict(out=0)),
        ("misaligned out", dict(out=out.data_ptr() + 2)),
        ("misaligned scratch", dict(scratch=scratch.data_ptr() + 4)),
        ("bad dtype", dict(dtypes=[0, 5])),
        ("short dtypes", dict(dtypes=[0])),
        ("misaligned grad", dict(grads=[ptrs[0], ptrs[1] + 1])),
        ("bad param space", dict(param_space="medium")),
    ]
    for what, kw in bad:
        args = dict(grads=ptrs, numels=numels, dtypes=dts, scratch=scratch.data_ptr(), scratch_len=need,
                    out=out.data_ptr(), max_norm=1.0)
        args.update(kw)
        with pytest.raises(ValueError):
            EMU.grad_norm(**args)
            pytest.fail(f"no ValueError: {what}")
        assert torch.equal(scratch, torch.full((need,), 7.0, dtype=torch.float64)), what
        assert torch.equal(out, torch.full((2,), 7.0)), what


# ---------------------------------------------------------------------------
# Through the optimizers: fusedoptim's classes under _cuda.emulate() send CPU
# params down the whole CUDA path (state creation in the options' layout,
# batches, stochastic-rounding ids, the device grad norm and its coefficient
# pointer, the cached all-CUDA plan from the second step on). Every param and
# state tensor must equal, bit for bit, the CPU path's under the scalar ISA.

import contextlib  # noqa: E402

import fusedoptim  # noqa: E402
from fusedoptim.backends import cuda as _cuda  # noqa: E402

OPT_CASES = [
    # (class, class kwargs, param dtype, option kwargs)
    (fusedoptim.AdamW, {}, BF16, dict(master_weights=True)),
    (fusedoptim.AdamW, {}, BF16, dict(stochastic_rounding=True)),
    (fusedoptim.AdamW, {}, BF16, dict(kahan_summation=True, max_grad_norm=1.0)),
    (fusedoptim.AdamW, {}, F16, dict(master_weights=True, max_grad_norm=0.5)),
    (fusedoptim.AdamW, {}, F16, dict(kahan_summation=True)),
    (fusedoptim.AdamW, {}, F32, dict(state_dtype=torch.bfloat16, max_grad_norm=0.1)),
    (fusedoptim.AdamW, {}, F32, dict(max_grad_norm=1e4)),
    (fusedoptim.AdamW, dict(capturable=True), BF16, dict(stochastic_rounding=True, max_grad_norm=1.0)),
    (fusedoptim.AdamW, dict(capturable=True), F16, dict(master_weights=True)),
    (fusedoptim.Adam, dict(amsgrad=True, weight_decay=0.1, maximize=True), BF16, dict(kahan_summation=True)),
    (fusedoptim.Adam, dict(fused=True), F32, dict(state_dtype=torch.bfloat16)),
    (fusedoptim.SGD, dict(momentum=0.9), BF16, dict(master_weights=True, max_grad_norm=1.0)),
    (fusedoptim.SGD, dict(momentum=0.9, nesterov=True), BF16, dict(stochastic_rounding=True)),
    (fusedoptim.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01), F16, dict(kahan_summation=True)),
    (fusedoptim.SGD, dict(momentum=0.9), F32, dict(state_dtype=torch.bfloat16, max_grad_norm=0.3)),
    (fusedoptim.SGD, {}, BF16, dict(stochastic_rounding=True)),
]


def _opt_id(case):
    cls, ckw, dt, okw = case
    return "-".join([cls.__name__, DNAME[dt], *ckw, *(f"{k}" for k in okw)])


def _train(case, emulated: bool, steps: int = 4, sizes=(100, 9000, 7, 16, 33)):
    cls, ckw, dt, okw = case
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n).to(dt)) for n in sizes]
    opt = cls([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.01, **ckw, **okw)
    g = torch.Generator().manual_seed(1)
    norms = []
    with scalar_cpu(), (_cuda.emulate() if emulated else contextlib.nullcontext()):
        for _ in range(steps):
            for p in ps:
                p.grad = (torch.randn(p.numel(), generator=g) * 3).to(dt)
            opt.step()
            norms.append(None if opt.last_grad_norm is None else opt.last_grad_norm.clone())
    return ps, opt, norms


@pytest.mark.parametrize("case", OPT_CASES, ids=[_opt_id(c) for c in OPT_CASES])
def test_optimizer_emulated_equals_cpu(case):
    """All five options through the optimizers: the emulated CUDA path gives
    the CPU path's bits for params, every state tensor (by name, dtype
    included) and the clip norm of every step."""
    ps_c, opt_c, norms_c = _train(case, emulated=False)
    ps_e, opt_e, norms_e = _train(case, emulated=True)
    assert opt_e.last_backends == ["native-cuda-emulated"] * 2
    assert opt_c.last_backends[0].startswith("native-cpu/")
    for k, (pc, pe) in enumerate(zip(ps_c, ps_e)):
        assert torch.equal(bits(pc.detach()), bits(pe.detach())), f"param {k}"
        sc, se = opt_c.state[pc], opt_e.state[pe]
        assert list(sc) == list(se), f"state keys of param {k}: {list(sc)} vs {list(se)}"
        for key in sc:
            a, b = sc[key], se[key]
            assert a.dtype == b.dtype, f"state[{key!r}] of param {k}: {a.dtype} vs {b.dtype}"
            assert torch.equal(bits(a.cpu()), bits(b.cpu())), f"state[{key!r}] of param {k}"
    for step, (a, b) in enumerate(zip(norms_c, norms_e)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(bits(a.reshape(1)), bits(b.reshape(1))), f"last_grad_norm of step {step}: {a} vs {b}"


@pytest.mark.skipif(GRAD_SCALER is None, reason=NO_GRAD_SCALER)
def test_optimizer_emulated_amp_clip():
    """AMP with max_grad_norm on the CUDA path: GradScaler hands the scale to
    the step (fused=True), the device norm divides the grads by it element by
    element, as the CPU path's unscaled grads; a step with an inf changes
    nothing, and the next one matches the CPU path again."""
    results = []
    for emulated in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 32).to(BF16)
        opt = fusedoptim.AdamW(model.parameters(), lr=1e-2, fused=True, master_weights=True, max_grad_norm=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(BF16)
        with scalar_cpu(), (_cuda.emulate() if emulated else contextlib.nullcontext()):
            for step in range(4):
                opt.zero_grad()
                loss = model(x).float().pow(2).mean()
                scaler.scale(loss).backward()
                if step == 2:
                    model.weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
                assert opt.last_backends == (["native-cuda-emulated"] if emulated else [f"native-cpu/scalar"]) \
                    or step == 2
        results.append(([p.detach().clone() for p in model.parameters()],
                        [dict(opt.state[p]) for p in model.parameters()], opt.last_grad_norm))
    (pc, sc, nc), (pe, se, ne) = results
    for a, b in zip(pc, pe):
        assert torch.equal(bits(a), bits(b))
    for a, b in zip(sc, se):
        for key in a:
            assert torch.equal(bits(a[key].cpu()), bits(b[key].cpu())), key
    assert torch.equal(bits(nc.reshape(1)), bits(ne.reshape(1)))
    assert float(sc[0]["step"]) == 3.0  # the inf step was skipped
