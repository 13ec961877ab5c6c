"""What the native kernels do not cover runs torch's own for-loop code:
fp64, complex, non-contiguous params, channels_last weights, sparse grads
(SGD), differentiable=True, non-CPU devices, aliased params. Those params
must match torch's for-loop bit for bit, and last_backends must say so."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusedoptim
from cases import ALL_CASES, CASES_BY_ID, assert_close, assert_same_bits
from tolerances import FP32_TRAINING_LOOP, FP32_VS_TORCH, TORCH_FUSED_STRIDE_BUG_MIN_ERROR
from torch_versions import (ADAM_STEP_DTYPE_UNDER_FLOAT64_DEFAULT, NO_SGD_FUSED, SGD_HAS_FUSED, cpu_fused,
                            without_none)

REPRESENTATIVE = [CASES_BY_ID[k] for k in ("Adam-wd0.1-amsgrad-max", "AdamW-wd0.1", "Adam-decoupled-wd0.1-amsgrad",
                                           "SGD-mom0.9-damp0-nesterov-wd0.05-max", "SGD-mom0.9-damp0.1-wd0",
                                           "SGD-mom0-damp0-wd0.05")]


def _ids(c):
    return c.id


def _isa_backend():
    return f"native-cpu/{fusedoptim.get_cpu_isa()}"


def _make_params(kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "fp64":
        return [torch.randn(17, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)]
    if kind == "complex64":
        return [torch.randn(17, generator=gen, dtype=torch.complex64), torch.randn(4, 3, generator=gen, dtype=torch.complex64)]
    if kind == "transposed":
        return [torch.randn(5, 7, generator=gen).t(), torch.randn(9, 4, generator=gen).to(torch.bfloat16).t()]
    if kind == "sliced":
        return [torch.randn(40, generator=gen)[::3], torch.randn(6, 8, generator=gen)[:, 1:7]]
    if kind == "channels_last":
        return [torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
                torch.randn(4, 2, 5, 5, generator=gen).to(torch.float16).to(memory_format=torch.channels_last)]
    raise ValueError(kind)


def _grad_for(p, gen):
    g = torch.randn(p.shape, generator=gen, dtype=torch.float64 if not p.is_complex() else torch.complex128)
    out = torch.empty_like(p)  # same strides as the param, like autograd's
    out.copy_(g.to(p.dtype))
    return out


def _run(case, which, make_params, steps=8, seed=1, grad_fn=_grad_for, **extra):
    """``make_params()`` builds fresh (deterministic) tensors for each run, so
    views and strides are exactly those asked for."""
    params = [p.requires_grad_() for p in make_params()]
    opt = case.make(which, [{"params": params[:1]}, {"params": params[1:]}], **extra)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = grad_fn(p, gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kind", ["fp64", "complex64", "transposed", "sliced", "channels_last"])
@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_fallback_matches_torch_for_loop_bitwise(case, kind):
    make = lambda: _make_params(kind)  # noqa: E731
    if kind in ("transposed", "sliced", "channels_last"):
        assert not any(p.is_contiguous() for p in make())
    ours, opt = _run(case, "ours", make)
    theirs, torch_opt = _run(case, "torch", make)
    assert opt.last_backends == ["torch", "torch"], opt.last_backends
    for a, b in zip(ours, theirs):
        assert a.stride() == b.stride()
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        assert_same_bits([a.detach()], [b.detach()], f"{case.id} {kind} fallback vs torch for-loop")
    # state has torch's layout (zeros_like(preserve_format)) and values (torch
    # 2.2's SGD without momentum stores momentum_buffer None: no state, see
    # test_sgd_without_momentum_stores_no_state_on_any_path)
    for p, q in zip(ours, theirs):
        st_o, st_t = without_none(opt.state[p]), without_none(torch_opt.state[q])
        assert st_o.keys() == st_t.keys()
        for k in st_o:
            assert st_o[k].stride() == st_t[k].stride() and st_o[k].dtype == st_t[k].dtype
            a, b = st_o[k], st_t[k]
            if a.is_complex():
                a, b = torch.view_as_real(a), torch.view_as_real(b)
            assert_same_bits([a], [b], f"{case.id} {kind} state[{k!r}]")


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_group_split_between_native_and_torch(case):
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(33, generator=gen), torch.randn(5, 7, generator=gen).t(),
            torch.randn(17, generator=gen, dtype=torch.float64), torch.randn(1031, generator=gen).to(torch.bfloat16)]
    res = {}
    for which in ("ours", "torch"):
        ps = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in init]
        opt = case.make(which, [{"params": ps}])
        g2 = torch.Generator().manual_seed(3)
        for _ in range(10):
            for p in ps:
                p.grad = _grad_for(p, g2)
            opt.step()
        res[which] = (ps, opt)
    ps_o, opt_o = res["ours"]
    ps_t, _ = res["torch"]
    assert opt_o.last_backends == [_isa_backend() + "+torch"]
    # the fallback params: torch's own code, bit for bit
    assert_same_bits([ps_o[1].detach(), ps_o[2].detach()], [ps_t[1].detach(), ps_t[2].detach()], "fallback part")
    # the native fp32 param: the usual tolerance
    assert_close([ps_o[0].detach()], [ps_t[0].detach()], what=f"{case.id} native part", **FP32_VS_TORCH)


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_transposed_grad_of_contiguous_param_goes_native(case):
    """A grad whose strides differ from its (contiguous) param is read
    through a contiguous copy: still native, same values, grad untouched."""

    def transposed_grad(p, gen):
        g = torch.randn(p.shape[::-1], generator=gen).to(p.dtype).t()
        assert not g.is_contiguous() and g.shape == p.shape
        return g

    def make():
        gen = torch.Generator().manual_seed(4)
        return [torch.randn(7, 5, generator=gen), torch.randn(33, 17, generator=gen)]

    ours, opt = _run(case, "ours", make, grad_fn=transposed_grad)
    theirs, _ = _run(case, "torch", make, grad_fn=transposed_grad)
    assert opt.last_backends == [_isa_backend()] * 2
    assert all(p.grad.stride() == (1, p.shape[0]) for p in ours), "the grad itself must stay transposed"
    assert_close([p.detach() for p in ours], [p.detach() for p in theirs], what=f"{case.id} transposed grad",
                 **FP32_VS_TORCH)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_sparse_grads_embedding(momentum):
    """nn.Embedding(sparse=True) trained with a dense head in one optimizer."""
    res = {}
    for which, cls, kw in (("ours", fusedoptim.SGD, {}), ("torch", torch.optim.SGD, {"foreach": False})):
        torch.manual_seed(9)
        emb = torch.nn.Embedding(50, 8, sparse=True)
        head = torch.nn.Linear(8, 1)
        opt = cls([{"params": emb.parameters()}, {"params": head.parameters()}], lr=0.01, momentum=momentum, **kw)
        gen = torch.Generator().manual_seed(10)
        for _ in range(6):
            opt.zero_grad()
            idx = torch.randint(0, 50, (12,), generator=gen)
            (head(emb(idx)) - 1).pow(2).mean().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        res[which] = (emb, head, opt)
    emb_o, head_o, opt_o = res["ours"]
    emb_t, head_t, _ = res["torch"]
    assert opt_o.last_backends == ["torch", _isa_backend()]
    # (the embedding's grads depend on the head, which runs natively: close, not equal)
    assert_close([emb_o.weight.detach()], [emb_t.weight.detach()], what="sparse-grad embedding", **FP32_TRAINING_LOOP)
    assert_close([p.detach() for p in head_o.parameters()], [p.detach() for p in head_t.parameters()],
                 what="dense head", **FP32_TRAINING_LOOP)
    if momentum:
        assert opt_o.state[emb_o.weight]["momentum_buffer"] is not None


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.kind == "sgd" and not c.kwargs["weight_decay"]], ids=_ids)
def test_sgd_sparse_grads_bitwise(case):
    """Given sparse grads (independent of the params), a sparse-grad param
    goes through torch's code: bit for bit, next to a native dense one."""
    res = {}
    for which in ("ours", "torch"):
        sp = torch.linspace(-1, 1, 60).reshape(20, 3).requires_grad_()
        dense = torch.linspace(1, 2, 11).requires_grad_()
        opt = case.make(which, [{"params": [sp, dense]}])
        gen = torch.Generator().manual_seed(14)
        for _ in range(5):
            rows = torch.randint(0, 20, (6,), generator=gen)
            vals = torch.randn(6, 3, generator=gen)
            sp.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (20, 3), check_invariants=True)
            dense.grad = torch.randn(11, generator=gen)
            opt.step()
        res[which] = (sp.detach().clone(), dense.detach().clone(), opt)
    assert res["ours"][2].last_backends == [_isa_backend() + "+torch"]
    assert_same_bits([res["ours"][0]], [res["torch"][0]], f"{case.id} sparse-grad param")
    assert_close([res["ours"][1]], [res["torch"][1]], what=f"{case.id} dense param", **FP32_VS_TORCH)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.kind == "sgd" and c.kwargs["weight_decay"]][:2], ids=_ids)
def test_sgd_sparse_grads_with_weight_decay_raise_like_torch(case):
    """torch's SGD cannot add a dense weight decay to a sparse grad; fusedoptim
    (which hands sparse grads to torch) raises the same error."""
    errors = {}
    for which in ("ours", "torch"):
        sp = torch.ones(20, 3, requires_grad=True)
        opt = case.make(which, [sp])
        sp.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), (20, 3), check_invariants=True)
        with pytest.raises(Exception) as info:
            opt.step()
        errors[which] = (type(info.value), str(info.value))
    assert errors["ours"] == errors["torch"]


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_differentiable_runs_torch_and_backpropagates(case):
    """One differentiable step (as in torch's own tests): the result and the
    gradients through the step, w.r.t. the initial params and the grad,
    equal torch's."""
    res = {}
    for which in ("ours", "torch"):
        w = torch.linspace(-1, 1, 12, dtype=torch.float64).requires_grad_()
        s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        p = w.clone()  # a non-leaf param: allowed with differentiable=True
        opt = case.make(which, [p], differentiable=True)
        p.grad = torch.cos(torch.arange(12.0, dtype=torch.float64)) * s
        opt.step()
        # (torch's SGD detaches the momentum buffer on its first step, so the
        # grad may not be part of the graph: allow_unused, compared as such)
        dw, ds = torch.autograd.grad(p.pow(2).sum(), [w, s], allow_unused=True)
        if which == "ours":
            assert opt.last_backends == ["torch"]
        res[which] = (p.detach().clone(), dw, None if ds is None else ds.detach())
    assert_same_bits([res["ours"][0]], [res["torch"][0]], "differentiable params")
    assert_same_bits([res["ours"][1]], [res["torch"][1]], "d(loss)/d(initial params) through the step")
    assert (res["ours"][2] is None) == (res["torch"][2] is None)
    if res["torch"][2] is not None:
        assert_same_bits([res["ours"][2]], [res["torch"][2]], "d(loss)/d(grad scale) through the step")
        assert float(res["ours"][2].detach()) != 0.0, "the step must be part of the graph"


def test_meta_device_params_use_torch():
    p = torch.empty(5, 3, device="meta", requires_grad=True)
    opt = fusedoptim.Adam([p], lr=0.1)
    p.grad = torch.empty(5, 3, device="meta")
    opt.step()
    assert opt.last_backends == ["torch"]
    assert opt.state[p]["exp_avg"].device.type == "meta"


def test_float64_default_dtype_keeps_torch_step_dtype():
    """With torch's default dtype float64, torch keeps `step` in float64;
    fusedoptim must follow (via torch) rather than write a float32 counter."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        res = {}
        for which, cls, kw in (("ours", fusedoptim.Adam, {}), ("torch", torch.optim.Adam, {"foreach": False})):
            p = torch.linspace(-1, 1, 9, dtype=torch.float32).requires_grad_()
            opt = cls([p], lr=0.1, **kw)
            for k in range(3):
                p.grad = torch.full((9,), 0.5 * (k + 1), dtype=torch.float32)
                opt.step()
            res[which] = (p.detach().clone(), opt.state[p]["step"])
    finally:
        torch.set_default_dtype(old)
    # float64 on torch 2.13 (float32 on torch 2.2, whose Adam always keeps float32 counters)
    assert res["ours"][1].dtype == res["torch"][1].dtype == ADAM_STEP_DTYPE_UNDER_FLOAT64_DEFAULT
    assert_same_bits([res["ours"][0]], [res["torch"][0]], "params with float64 default dtype")


@pytest.mark.parametrize("kind", ["fp32", "fp64", "complex64", "transposed", "sparse"])
def test_sgd_without_momentum_stores_no_state_on_any_path(kind):
    """fusedoptim's SGD keeps no state without momentum, on every torch and
    every path, native or torch's fallback (README, Compatibility: torch
    before 2.3 stores ``momentum_buffer: None`` there, which carries nothing);
    its state_dict then has no state either, and loads into torch's SGD."""
    if kind == "sparse":
        p = torch.zeros(6, 3, requires_grad=True)
        grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), (6, 3), check_invariants=True)
    else:
        p = _make_params(kind)[0].requires_grad_() if kind != "fp32" else torch.zeros(7, requires_grad=True)
        grad = torch.ones_like(p)
    opt = fusedoptim.SGD([p], lr=0.1)
    for _ in range(2):
        p.grad = grad.clone()
        opt.step()
    assert opt.last_backends == ([_isa_backend()] if kind == "fp32" else ["torch"]), opt.last_backends
    assert dict(opt.state.get(p, {})) == {}, f"{kind}: state {dict(opt.state[p])}"
    sd = opt.state_dict()
    assert sd["state"] == {}, sd["state"]
    theirs = torch.optim.SGD([p.detach().clone().requires_grad_()], lr=0.1)
    theirs.load_state_dict(sd)


# ---------------------------------------------------------------- torch's fused=True and strides
@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1"], CASES_BY_ID["SGD-mom0.9-damp0-wd0"]], ids=_ids)
def test_torch_fused_ignores_strides_but_fusedoptim_does_not(case):
    """torch 2.13's fused CPU kernels walk param, grad and state memory in
    storage order, ignoring strides: with a transposed param and a grad of
    other strides they pair the wrong elements. fusedoptim (even when asked
    for fused=True) never routes such params to them."""

    def contiguous_grad(p, gen):
        return torch.randn(p.shape, generator=gen).to(p.dtype)  # strides differ from the param's

    def make():
        gen = torch.Generator().manual_seed(5)
        return [torch.randn(5, 7, generator=gen).t(), torch.randn(6, 4, generator=gen).t()]

    if case.kind == "sgd" and not SGD_HAS_FUSED:
        pytest.skip(NO_SGD_FUSED)
    loop, _ = _run(case, "torch", make, grad_fn=contiguous_grad)
    ours, opt = _run(case, "ours", make, grad_fn=contiguous_grad, fused=True)
    assert opt.last_backends == ["torch", "torch"]
    assert_same_bits([p.detach() for p in ours], [p.detach() for p in loop], "fusedoptim(fused=True) vs for-loop")
    if not cpu_fused(case.kind):
        return  # torch before 2.4 has no fused CPU kernel to compare with (fused=True needs CUDA there)
    fused, _ = _run(case, "torch", make, grad_fn=contiguous_grad, fused=True, foreach=None)
    err = max(float((a - b).detach().abs().max()) for a, b in zip(fused, loop))
    if torch.__version__.startswith("2.13."):
        # The documented fact for the pinned torch version.
        assert err > TORCH_FUSED_STRIDE_BUG_MIN_ERROR, f"torch {torch.__version__} fused=True now handles strides (max error {err:.3e})"


# ---------------------------------------------------------------- aliasing
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_overlapping_views_use_torch_sequential_semantics(case):
    res = {}
    for which in ("ours", "torch"):
        base = torch.linspace(-2, 2, 40)
        a, b = base[0:24], base[16:40]  # overlap on 8 elements
        pa = torch.nn.Parameter(a)
        pb = torch.nn.Parameter(b)
        assert pa.data_ptr() == base.data_ptr() and pb.data_ptr() == base.data_ptr() + 16 * 4
        extra = torch.ones(9, requires_grad=True)
        opt = case.make(which, [{"params": [extra, pa, pb]}])
        gen = torch.Generator().manual_seed(11)
        for _ in range(6):
            pa.grad = torch.randn(24, generator=gen)
            pb.grad = torch.randn(24, generator=gen)
            extra.grad = torch.randn(9, generator=gen)
            opt.step()
        res[which] = (base.clone(), extra.detach().clone(), opt)
    assert res["ours"][2].last_backends == ["torch"], "aliased params must not go native"
    assert_same_bits([res["ours"][0], res["ours"][1]], [res["torch"][0], res["torch"][1]], "overlapping views")


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_disjoint_views_of_one_buffer_may_go_native(case):
    res = {}
    for which in ("ours", "torch"):
        base = torch.linspace(-2, 2, 48)
        pa, pb = torch.nn.Parameter(base[0:24]), torch.nn.Parameter(base[24:48])
        opt = case.make(which, [{"params": [pa, pb]}])
        gen = torch.Generator().manual_seed(12)
        for _ in range(6):
            pa.grad = torch.randn(24, generator=gen)
            pb.grad = torch.randn(24, generator=gen)
            opt.step()
        res[which] = (base.clone(), opt)
    assert res["ours"][1].last_backends == [_isa_backend()]
    assert_close([res["ours"][0]], [res["torch"][0]], what="disjoint views", **FP32_VS_TORCH)


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_duplicate_param_in_one_group_updated_twice_like_torch(case):
    res = {}
    for which in ("ours", "torch"):
        p = torch.linspace(-1, 1, 13).requires_grad_()
        q = torch.ones(5, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about duplicates
            opt = case.make(which, [{"params": [p, q, p]}])
        for k in range(4):
            p.grad = torch.full((13,), 0.3 * (k + 1))
            q.grad = torch.full((5,), -0.2)
            opt.step()
        res[which] = (p.detach().clone(), q.detach().clone(), opt)
    assert res["ours"][2].last_backends == ["torch"]
    assert_same_bits(list(res["ours"][:2]), list(res["torch"][:2]), "duplicated param")


# ---------------------------------------------------------------- params that change under a cached plan
@pytest.mark.parametrize("case", [CASES_BY_ID["Adam-wd0.1-amsgrad"], CASES_BY_ID["SGD-mom0.9-damp0-wd0"]], ids=_ids)
def test_param_made_non_contiguous_in_place_of_its_data(case):
    """``p.data = p.data.t()`` keeps the data pointer but makes the param
    non-contiguous; a plan cached on the pointer must not keep treating it
    as a contiguous array."""
    res = {}
    for which in ("ours", "torch"):
        p = torch.arange(16.0).reshape(4, 4).requires_grad_()
        opt = case.make(which, [p])
        gen = torch.Generator().manual_seed(13)
        p.grad = torch.randn(4, 4, generator=gen)
        opt.step()
        p.data = p.data.t()
        for _ in range(3):
            p.grad = torch.randn(4, 4, generator=gen)
            opt.step()
        res[which] = p.detach().clone()
    assert_close([res["ours"]], [res["torch"]], what=f"{case.id} after p.data = p.data.t()", **FP32_VS_TORCH)


@pytest.mark.parametrize("case", [CASES_BY_ID["AdamW-wd0.1"], CASES_BY_ID["SGD-mom0.9-damp0.1-wd0"]], ids=_ids)
def test_param_data_replaced_mid_run(case):
    """Replacing p.data (e.g. a reload or a dtype change) is picked up."""
    res = {}
    for which in ("ours", "torch"):
        p = torch.linspace(-1, 1, 37).requires_grad_()
        opt = case.make(which, [p])
        for k in range(3):
            p.grad = torch.full((37,), 0.1 * (k + 1))
            opt.step()
        p.data = torch.linspace(2, 3, 37)  # a new buffer, same shape and dtype
        for k in range(3):
            p.grad = torch.full((37,), -0.1 * (k + 1))
            opt.step()
        res[which] = p.detach().clone()
    assert_close([res["ours"]], [res["torch"]], what=f"{case.id} after replacing p.data", **FP32_VS_TORCH)
