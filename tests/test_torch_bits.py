"""torch's own bits: fp32 steps round as torch.optim's for-loop rounds.

Note [torch's rounding order] (csrc/common/update_math.h) writes each
update in the order of torch's vectorised ATen kernels. Where torch itself
is not correctly rounded (its CPU ``sqrt`` comes from a vector math library
that is off by one ulp on some inputs) fusedoptim cannot follow it, so the
promise is relative: after N steps fusedoptim differs from torch's for-loop
on no more elements than torch's own ``fused=True`` step does in the same
run. SGD has no such op, so there the promise is every bit.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedoptim
from cases import ADAM_CASES, SGD_CASES, OptCase
from torch_versions import CPU_FUSED_ADAM, NO_CPU_FUSED_ADAM, cpu_fused, no_cpu_fused

N = 100_003
STEPS = 10


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32) != b.view(torch.int32)).sum())


def _run(case: OptCase, which: str, p0: torch.Tensor, grads) -> list:
    p = nn.Parameter(p0.clone())
    if which == "ours":
        opt = case.ours([p], **case.kwargs)
    else:
        opt = case.theirs([p], **case.kwargs, **({"foreach": False} if which == "loop" else {"fused": True}))
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    if which == "ours":
        assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"], opt.last_backends
    return out


@pytest.mark.parametrize("case", ADAM_CASES + SGD_CASES, ids=lambda c: c.id)
def test_fp32_steps_round_as_torch(case):
    if case.kind != "sgd" and not CPU_FUSED_ADAM:
        # Adam's promise is relative to torch's fused=True CPU step (see above).
        pytest.skip(NO_CPU_FUSED_ADAM)
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(N, generator=gen)
    grads = [torch.randn(N, generator=gen) for _ in range(STEPS)]
    loop = _run(case, "loop", p0, grads)
    ours = sum(_differing(a, b) for a, b in zip(_run(case, "ours", p0, grads), loop))
    if not cpu_fused(case.kind):
        # SGD on a torch without a fused CPU kernel: the promise is every bit.
        assert ours == 0, (f"{case.id}: {ours} elements of {STEPS} x {N} differ from torch's for-loop "
                           f"({no_cpu_fused('sgd')})")
        return
    fused = sum(_differing(a, b) for a, b in zip(_run(case, "fused", p0, grads), loop))
    msg = (f"{case.id}: {ours} elements of {STEPS} x {N} differ from torch's for-loop; "
           f"torch's fused=True: {fused}")
    assert ours <= fused, msg
    if case.kind == "sgd":
        assert ours == 0, msg


class _SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU and max-pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.head(x.flatten(1))


def _digits(n: int, gen: torch.Generator):
    """8x8 digit-like images as the classic digits data set has them: ten
    fixed stroke templates with intensities 4..16 of 16 on a zero background,
    shifted by up to a pixel, scaled to [0, 1]; with their labels."""
    strokes = torch.rand(10, 8, 8, generator=gen) > 0.6
    templates = torch.randint(4, 17, (10, 8, 8), generator=gen).float() * strokes
    labels = torch.randint(0, 10, (n,), generator=gen)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    images = torch.stack([torch.roll(templates[y], (int(s[0]), int(s[1])), (0, 1)) for y, s in zip(labels, shifts)])
    return (images / 16.0).unsqueeze(1), labels


def test_cnn_training_follows_torch_sgd():
    """200 steps of a small CNN with Nesterov SGD and weight decay: max-pooling
    picks a different element on a last-bit difference, after which two
    trajectories part (with fma-fused momentum buffers this run ends 5.6e-4
    apart); with torch's rounding they stay together."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = _digits(1024, gen)
    model = _SmallCNN()
    runs = {}
    for name, cls in (("ours", fusedoptim.SGD), ("torch", torch.optim.SGD)):
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        order = torch.Generator().manual_seed(1)
        for _ in range(200):
            idx = torch.randint(0, len(x), (64,), generator=order)
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        runs[name] = torch.cat([p.detach().flatten() for p in m.parameters()])
    a, b = runs["ours"], runs["torch"]
    rel = float((a - b).norm() / b.norm())
    print(f"CNN: normwise relative param difference after 200 steps: {rel:.3e}")
    assert rel <= 1e-6, f"normwise relative param difference after 200 steps: {rel:.3e}"


@pytest.mark.parametrize("make", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("cls,kw", [(fusedoptim.Adam, {}), (fusedoptim.AdamW, {"amsgrad": True}),
                                    (fusedoptim.SGD, {"momentum": 0.9})], ids=["Adam", "AdamW", "SGD"])
def test_copies_equal_their_original(make, cls, kw):
    """A copy has exactly the original's public attributes (torch's
    test_deepcopy_copies_all_public_attrs) and continues bit for bit."""
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(33, generator=gen)) for _ in range(2)]
    opt = cls(params, lr=0.01, **kw)
    for p in params:
        p.grad = torch.randn(33, generator=gen)
    opt.step()
    for set_threads in (False, True):
        if set_threads:
            opt.num_threads = 1
        twin = make(opt)
        public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
        assert public(twin) == public(opt), public(twin) ^ public(opt)
        assert twin.num_threads == opt.num_threads
    grads = [torch.randn(33, generator=gen) for _ in params]
    twin_params = [q for g in twin.param_groups for q in g["params"]]
    for ps, o in ((params, opt), (twin_params, twin)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32))


_NEEDS_CPU_FUSED_ADAM = [pytest.mark.skipif(not CPU_FUSED_ADAM, reason=NO_CPU_FUSED_ADAM)]


@pytest.mark.parametrize("cls,kw", [
    (fusedoptim.Adam, {}), (fusedoptim.AdamW, {"amsgrad": True}),
    pytest.param(fusedoptim.Adam, {"fused": True}, marks=_NEEDS_CPU_FUSED_ADAM),
    pytest.param(fusedoptim.AdamW, {"fused": True, "weight_decay": 0.1}, marks=_NEEDS_CPU_FUSED_ADAM),
    (fusedoptim.SGD, {"momentum": 0.9}),
], ids=["Adam", "AdamW-amsgrad", "Adam-fused", "AdamW-fused", "SGD-momentum"])
def test_float64_default_dtype(cls, kw):
    """Under torch.set_default_dtype(torch.float64), fp32 params still run
    natively, with the state layout torch.optim creates for the same flags
    (float64 ``step`` counters, float32 with ``fused=True``), the same
    results, and state_dicts that load both ways."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(5)
        init = [torch.randn(n, generator=gen, dtype=torch.float32) for n in (1000, 17)]
        grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float32) for t in init] for _ in range(4)]
        theirs_cls = getattr(torch.optim, cls.__name__)
        ps = {name: [nn.Parameter(t.clone()) for t in init] for name in ("ours", "torch")}
        opts = {"ours": cls(ps["ours"], lr=0.01, **kw), "torch": theirs_cls(ps["torch"], lr=0.01, **kw)}
        for row in grads:
            for name, opt in opts.items():
                for p, g in zip(ps[name], row):
                    p.grad = g.clone()
                opt.step()
            assert opts["ours"].last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"]
        for p, q in zip(ps["ours"], ps["torch"]):
            so, st = opts["ours"].state[p], opts["torch"].state[q]
            assert set(so) == set(st)
            for key in st:
                assert so[key].dtype == st[key].dtype and so[key].device == st[key].device, key
            if "step" in st:
                assert float(so["step"]) == float(st["step"]) == 4.0
            diff = (p.detach() - q.detach()).abs().max().item()
            assert diff <= 1e-6, f"max param difference {diff:.3e} after 4 steps"
        # Checkpoints cross-load, and the loaded optimizers step natively.
        for src, dst_cls, dst_name in (("torch", cls, "ours"), ("ours", theirs_cls, "torch")):
            fresh = [nn.Parameter(p.detach().clone()) for p in ps[dst_name]]
            dst = dst_cls(fresh, lr=0.01, **kw)
            dst.load_state_dict(opts[src].state_dict())
            for p, g in zip(fresh, grads[0]):
                p.grad = g.clone()
            dst.step()
            if dst_name == "ours":
                assert dst.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"]
    finally:
        torch.set_default_dtype(saved)


@pytest.mark.parametrize("kw", [{"fused": True}, {}], ids=["fused", "plain"])
def test_float64_step_counters_through_the_cuda_path(kw):
    """Emulated CUDA: float64 host counters (a checkpoint of a float64-default
    run) are counted on the host, with the CPU path's bits."""
    from fusedoptim.backends import cuda

    gen = torch.Generator().manual_seed(9)
    init = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen) for _ in range(3)]
    out = []
    for emulate in (False, True):
        p = nn.Parameter(init.clone())
        opt = fusedoptim.AdamW([p], lr=0.01, **kw)
        p.grad = grads[0].clone()
        opt.step()
        opt.state[p]["step"] = opt.state[p]["step"].double()  # as a float64-default run keeps it
        for g in grads[1:]:
            p.grad = g.clone()
            if emulate:
                with cuda.emulate():
                    opt.step()
                assert opt.last_backends == ["native-cuda-emulated"]
            else:
                opt.step()
        assert opt.state[p]["step"].dtype == torch.float64 and float(opt.state[p]["step"]) == 3.0
        out.append(p.detach().clone())
    assert torch.equal(out[0].view(torch.int32), out[1].view(torch.int32))
