"""Errors: construction-time validation like torch's, and step-time errors
raised before anything is written (params, grads and state bit-identical)."""

from __future__ import annotations

import pytest
import torch

import fusedoptim
from fusedoptim import _C
from fusedoptim._spec import GradMismatchError, StateMismatchError
from cases import assert_snapshot_equal, snapshot
from torch_versions import ADAM_HAS_DECOUPLED, CPU_FUSED_ADAM, NAMED_PARAMS

NAN, INF = float("nan"), float("inf")
PAIRS = {"Adam": (fusedoptim.Adam, torch.optim.Adam), "AdamW": (fusedoptim.AdamW, torch.optim.AdamW),
         "SGD": (fusedoptim.SGD, torch.optim.SGD)}


# ---------------------------------------------------------------- construction
def _params():
    return [torch.zeros(3, requires_grad=True)]


ADAM_CTOR = [
    dict(lr=-1.0), dict(lr=NAN), dict(lr=INF), dict(lr=0.0), dict(eps=-1e-8), dict(eps=NAN), dict(eps=0.0),
    dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, -0.5)),
    dict(betas=(NAN, 0.999)), dict(betas=(0.0, 0.0)), dict(weight_decay=-0.1), dict(weight_decay=NAN),
    dict(betas=(0.9, torch.tensor(0.999))), dict(betas=(torch.tensor(0.9), torch.tensor(0.999))),
    dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))),
    dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(0.01)), dict(lr=torch.tensor(0.01), foreach=True),
    dict(lr=torch.tensor(-0.01)), dict(fused=True, differentiable=True), dict(fused=True, foreach=True),
    dict(fused=True), dict(fused=False), dict(foreach=True), dict(capturable=True), dict(amsgrad=True, maximize=True),
    dict(lr="0.1"), dict(nonsense=1),
]
SGD_CTOR = [
    dict(lr=-1.0), dict(lr=NAN), dict(lr=INF), dict(momentum=-0.9), dict(momentum=NAN), dict(weight_decay=-1.0),
    dict(weight_decay=NAN), dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
    dict(nesterov=True, momentum=0.9), dict(dampening=-1.0), dict(dampening=2.0), dict(dampening=NAN),
    dict(lr=torch.tensor(0.1)), dict(lr=torch.tensor([0.1, 0.2])), dict(fused=True, differentiable=True),
    dict(fused=True, foreach=True), dict(fused=True), dict(momentum=0.9, foreach=True),
    dict(weight_decay=torch.tensor(0.1)), dict(lr="fast"), dict(betas=(0.9, 0.99)),
]
CTOR_CASES = ([("Adam", kw) for kw in ADAM_CTOR] + [("AdamW", kw) for kw in ADAM_CTOR + [dict(decoupled_weight_decay=True)]]
              + [("SGD", kw) for kw in SGD_CTOR])


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare exception types with torch's
        return type(e)
    return None


@pytest.mark.parametrize("name,kwargs", CTOR_CASES, ids=[f"{n}-{kw}" for n, kw in CTOR_CASES])
def test_constructor_validation_matches_torch(name, kwargs):
    ours, theirs = PAIRS[name]
    got = _outcome(lambda: ours(_params(), **kwargs))
    expected = _outcome(lambda: theirs(_params(), **kwargs))
    if name != "SGD" and kwargs == dict(fused=True) and not CPU_FUSED_ADAM:
        # torch before 2.4 has no CPU fused Adam/AdamW and refuses fused=True
        # for CPU params (RuntimeError); fusedoptim's CPU step is always fused
        # and takes fused=True on every version (its docstring).
        assert expected is RuntimeError and got is None, f"{name}({kwargs}): fusedoptim raised {got}, torch {expected}"
        return
    assert got is expected, f"{name}({kwargs}): fusedoptim raised {got}, torch raised {expected}"


@pytest.mark.skipif(ADAM_HAS_DECOUPLED, reason="torch's Adam takes decoupled_weight_decay (2.6+): the "
                    "registry's Adam-decoupled cases run instead")
def test_adam_decoupled_weight_decay_is_a_type_error_where_torch_has_none():
    """Before torch 2.6 torch's Adam has no decoupled_weight_decay: passing it
    True is a TypeError there, as torch's unknown keyword is (use AdamW);
    the default is accepted, and the groups have no such key, as torch's."""
    with pytest.raises(TypeError):
        torch.optim.Adam(_params(), decoupled_weight_decay=True)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        fusedoptim.Adam(_params(), decoupled_weight_decay=True)
    ours, theirs = fusedoptim.Adam(_params(), decoupled_weight_decay=False), torch.optim.Adam(_params())
    assert "decoupled_weight_decay" not in ours.defaults and "decoupled_weight_decay" not in ours.param_groups[0]
    assert ours.defaults == theirs.defaults


BAD_PARAMS = {
    "empty": lambda: [],
    "tensor-not-iterable": lambda: torch.zeros(3, requires_grad=True),
    "non-leaf": lambda: [torch.zeros(3, requires_grad=True) * 2],
    "duplicate-in-two-groups": lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(torch.zeros(3, requires_grad=True)),
    "set": lambda: {torch.zeros(3, requires_grad=True)},
    "group-without-params": lambda: [{"lr": 0.1}],
    "int-tensor": lambda: [torch.zeros(3, dtype=torch.int64)],
}


@pytest.mark.parametrize("bad", sorted(BAD_PARAMS))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_bad_params_argument_matches_torch(name, bad):
    ours, theirs = PAIRS[name]
    got = _outcome(lambda: ours(BAD_PARAMS[bad]()))
    expected = _outcome(lambda: theirs(BAD_PARAMS[bad]()))
    assert got is expected, f"{name}({bad}): fusedoptim raised {got}, torch raised {expected}"


def test_constructor_matches_torch_for_a_named_parameters_list():
    model = torch.nn.Linear(3, 2)
    for name, (ours, theirs) in PAIRS.items():
        if not NAMED_PARAMS:  # torch before 2.6 takes no (name, param) pairs: the same TypeError
            errors = []
            for cls in (ours, theirs):
                with pytest.raises(TypeError) as info:
                    cls(model.named_parameters())
                errors.append(str(info.value))
            assert errors[0] == errors[1], errors
            continue
        o, t = ours(model.named_parameters()), theirs(model.named_parameters())
        assert o.param_groups[0].get("param_names") == t.param_groups[0].get("param_names") == ["weight", "bias"]


# ---------------------------------------------------------------- step-time hyperparameters
def _three_groups(cls, **kwargs):
    """fp32 (native), fp64 (torch fallback) and bf16 (native) groups, with grads."""
    gen = torch.Generator().manual_seed(4)
    groups = [
        {"params": [torch.randn(33, generator=gen).requires_grad_(), torch.randn(3, 5, generator=gen).requires_grad_()]},
        {"params": [torch.randn(9, generator=gen, dtype=torch.float64).requires_grad_()]},
        {"params": [torch.randn(17, generator=gen).to(torch.bfloat16).requires_grad_()]},
    ]
    opt = cls(groups, **kwargs)
    flat = [p for g in groups for p in g["params"]]
    return opt, flat


def _set_grads(flat, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in flat:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


ADAM_BAD = [("lr", v) for v in (NAN, -1e-3, INF)] + [("beta1", v) for v in (NAN, -0.1, 1.0, INF)] + \
           [("beta2", v) for v in (NAN, -0.1, 1.0)] + [("eps", v) for v in (NAN, -1e-8, INF)] + \
           [("weight_decay", v) for v in (NAN, -0.1, INF)]
SGD_BAD = [("lr", v) for v in (NAN, -1e-3, INF)] + [("momentum", v) for v in (NAN, -0.5, INF)] + \
          [("weight_decay", v) for v in (NAN, -0.1, INF)] + [("dampening", v) for v in (NAN, INF)] + \
          [("nesterov+dampening", 0.1)]
STEP_CASES = ([("Adam", k, v) for k, v in ADAM_BAD] + [("AdamW", k, v) for k, v in ADAM_BAD] +
              [("SGD", k, v) for k, v in SGD_BAD])


def _corrupt(group, key, value):
    if key == "beta1":
        group["betas"] = (value, group["betas"][1])
    elif key == "beta2":
        group["betas"] = (group["betas"][0], value)
    elif key == "nesterov+dampening":
        group["nesterov"] = True
        group["dampening"] = value
    else:
        group[key] = value


@pytest.mark.parametrize("bad_group", [1, 2])
@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "after-2-steps"])
@pytest.mark.parametrize("name,key,value", STEP_CASES, ids=[f"{n}-{k}={v}" for n, k, v in STEP_CASES])
def test_bad_hyperparameter_set_later_raises_before_writing(name, key, value, warm, bad_group):
    cls = PAIRS[name][0]
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1, amsgrad=True)
    opt, flat = _three_groups(cls, **kwargs)
    if warm:
        for s in range(2):
            _set_grads(flat, s)
            opt.step()
    _set_grads(flat, 10)
    good = dict(opt.param_groups[bad_group])
    _corrupt(opt.param_groups[bad_group], key, value)
    before = snapshot(opt, flat)
    with pytest.raises(ValueError):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, flat), f"{name} {key}={value} in group {bad_group}")
    # Fixed again, the same optimizer steps normally and every group moves.
    opt.param_groups[bad_group].clear()
    opt.param_groups[bad_group].update(good)
    opt.step()
    for k, (p, b) in enumerate(zip(flat, before["params"])):
        assert not torch.equal(p.detach().contiguous().view(b.dtype), b), f"param {k} did not move after the fix"


# ---------------------------------------------------------------- step-time grads
# (A grad on another device than its param cannot be built on a CPU-only
# machine: torch's .grad setter and Tensor.data both refuse it, so the device
# check is covered only where a second device exists.)
def _swap_grad_data(p, new):
    """torch refuses a mismatched ``p.grad = ...``; ``.data`` assignment gets one past it."""
    p.grad.data = new


MISMATCHES = [(name, m) for name in sorted(PAIRS) for m in ("shape", "numel", "dtype")
              if not (name == "SGD" and m == "dtype")]  # (torch's SGD takes a grad of another dtype: below)


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize("name,mismatch", MISMATCHES, ids=[f"{n}-{m}" for n, m in MISMATCHES])
def test_mismatched_grad_raises_before_writing(name, mismatch, warm):
    cls = PAIRS[name][0]
    opt, flat = _three_groups(cls, lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
    if warm:
        for s in range(2):
            _set_grads(flat, s)
            opt.step()
    _set_grads(flat, 10)
    victim = flat[3]  # the bf16 param of the last group
    g = victim.grad
    new = {"shape": lambda: g.detach().reshape(1, 17).clone(),
           "numel": lambda: torch.zeros(5, dtype=g.dtype),
           "dtype": lambda: g.detach().float().clone()}[mismatch]()
    _swap_grad_data(victim, new)
    assert victim.grad.shape != victim.shape or victim.grad.dtype != victim.dtype
    before = snapshot(opt, flat)
    with pytest.raises(ValueError) as raised:
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, flat), f"{name}: grad {mismatch} mismatch")
    # torch raises RuntimeError here: code that catches it must catch ours.
    assert isinstance(raised.value, RuntimeError), type(raised.value)
    assert "param 0 of group 2" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_same_size_reshaped_grad_raises_at_every_step(name, warm):
    """A reshape that keeps rank and size (a (4, 3) grad swapped for (3, 4))
    passes every check but the shape's; the cached plan must see it too."""
    ours, theirs = PAIRS[name]
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    results = {}
    for label, cls in (("ours", ours), ("torch", theirs)):
        gen = torch.Generator().manual_seed(0)
        flat = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
        opt = cls(flat, **kwargs)
        for s in range(2 if warm else 0):
            _set_grads(flat, s)
            opt.step()
        _set_grads(flat, 10)
        victim = flat[0]
        _swap_grad_data(victim, torch.randn(3, 4, generator=gen))
        assert victim.grad.numel() == victim.numel() and victim.grad.shape != victim.shape
        before = snapshot(opt, flat)
        raised = []
        for _ in range(3):
            with pytest.raises(RuntimeError) as info:
                opt.step()
            raised.append(info.value)
            if label == "ours":
                assert_snapshot_equal(before, snapshot(opt, flat), f"{name}: reshaped grad, step {len(raised)}")
        results[label] = raised
    for k, e in enumerate(results["ours"]):
        assert type(e) is GradMismatchError, f"step {k + 1}: {type(e).__name__}: {e}"
        assert "param 0 of group 0" in str(e) and "(3, 4)" in str(e) and "(4, 3)" in str(e), str(e)


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "cached-plan"])
def test_sgd_grad_of_another_dtype_runs_torchs_step(warm):
    """torch's SGD takes an fp32 grad on a bf16 param (as a param's
    grad_dtype allows in newer torch): its in-place ops promote and its
    buffer is a copy of the grad. That param runs torch's step, with torch's bits (from the state
    the native steps left, with ``warm``), the others stay native, and the
    next steps go on the same way."""
    gen = torch.Generator().manual_seed(3)
    flat = [torch.randn(40, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    opt = fusedoptim.SGD(flat, lr=0.1, momentum=0.9)
    if warm:
        _set_grads(flat, 0)
        opt.step()
    ref_p = flat[1].detach().clone().requires_grad_()
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9, foreach=False)
    if warm:
        ref.state[ref_p]["momentum_buffer"] = opt.state[flat[1]]["momentum_buffer"].clone()
    for s in range(1, 4):
        _set_grads(flat, s)
        _swap_grad_data(flat[1], flat[1].grad.float() * 3)
        ref_p.grad = torch.zeros_like(ref_p)
        _swap_grad_data(ref_p, flat[1].grad.clone())
        opt.step()
        ref.step()
        assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}+torch"], opt.last_backends
    buf, ref_buf = opt.state[flat[1]]["momentum_buffer"], ref.state[ref_p]["momentum_buffer"]
    # A buffer made from the fp32 grad is fp32; one the native step made stays bf16.
    assert buf.dtype == ref_buf.dtype == (torch.bfloat16 if warm else torch.float32)
    assert torch.equal(buf.view(torch.int16) if warm else buf, ref_buf.view(torch.int16) if warm else ref_buf)
    assert torch.equal(flat[1].detach().view(torch.int16), ref_p.detach().view(torch.int16))


def _spoiled_step(name, kwargs, spoil, exc, what, steps=1):
    """fusedoptim's and torch's ``name`` over :func:`_three_groups`: ``steps``
    steps, then ``spoil(opt, flat)`` and one more step, which must raise
    ``exc`` for both; fusedoptim's must write nothing. Returns both errors."""
    raised = {}
    for label, cls in zip(("ours", "torch"), PAIRS[name]):
        opt, flat = _three_groups(cls, **kwargs)
        for s in range(steps):
            _set_grads(flat, s)
            opt.step()
        _set_grads(flat, 10)
        spoil(opt, flat)
        before = snapshot(opt, flat)
        with pytest.raises(exc) as info:
            opt.step()
        raised[label] = info.value
        if label == "ours":
            assert_snapshot_equal(before, snapshot(opt, flat), f"{name}: {what}")
    return raised


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_state_of_another_shape_raises_torchs_exception_type(name):
    """A state tensor of the wrong shape: torch's step raises RuntimeError;
    fusedoptim raises StateMismatchError (a RuntimeError and a ValueError)
    before anything is written."""
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)

    def spoil(opt, flat):
        opt.state[flat[3]][key] = torch.zeros(3, dtype=flat[3].dtype)

    raised = _spoiled_step(name, kwargs, spoil, RuntimeError, f"{key} of another shape")
    assert type(raised["ours"]) is StateMismatchError and isinstance(raised["ours"], ValueError)
    assert f"state['{key}'] of param 0 has shape (3,) but the param has (17,)" in str(raised["ours"])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_state_set_to_none_raises_before_writing(name):
    """A moment set to None: torch's step fails on it (TypeError in its
    foreach step, AttributeError in its for-loop, after counting the step);
    fusedoptim raises TypeError with nothing written, where a missing key
    would be created. SGD's momentum_buffer=None is torch's own "not yet"
    and is filled from the grad."""
    opt, flat = _three_groups(PAIRS[name][0], lr=0.1)
    _set_grads(flat, 0)
    opt.step()
    _set_grads(flat, 1)
    opt.state[flat[3]]["exp_avg"] = None
    before = snapshot(opt, flat)
    with pytest.raises(TypeError, match=r"state\['exp_avg'\] of param 0 must be a Tensor, got NoneType"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, flat), f"{name}: exp_avg=None")


def test_sgd_momentum_buffer_set_to_none_starts_from_the_grad_as_torch():
    results = {}
    for label, cls in (("ours", fusedoptim.SGD), ("torch", torch.optim.SGD)):
        gen = torch.Generator().manual_seed(2)
        flat = [torch.randn(40, generator=gen).requires_grad_() for _ in range(2)]
        opt = cls(flat, lr=0.1, momentum=0.9)
        for s in range(3):
            _set_grads(flat, s)
            opt.step()
            if s == 0:
                opt.state[flat[1]]["momentum_buffer"] = None
        results[label] = [p.detach().clone() for p in flat] + [opt.state[flat[1]]["momentum_buffer"].clone()]
    for a, b in zip(results["ours"], results["torch"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_error_in_torchs_step_leaves_the_native_params_unwritten(name):
    """torch's step runs before the kernels: when it raises (here its
    _init_group, on a state that lost its ``step``), the params the kernels
    would update are unwritten too, and the error is torch's."""
    def spoil(opt, flat):
        del opt.state[flat[2]]["step"]  # group 1 (fp64) runs torch's step

    errors = _spoiled_step(name, dict(lr=0.1), spoil, KeyError, "KeyError in torch's step", steps=2)
    assert errors["ours"].args == errors["torch"].args == ("step",)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_sparse_grad_raises_like_torch(name):
    ours, theirs = PAIRS[name]
    msgs = {}
    for which, cls in (("ours", ours), ("torch", theirs)):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        dense = torch.zeros(4, requires_grad=True)
        opt = cls([dense] + list(emb.parameters()))
        dense.grad = torch.ones(4)
        emb(torch.tensor([1, 2])).sum().backward()
        before = snapshot(opt, [dense, emb.weight]) if which == "ours" else None
        with pytest.raises(RuntimeError) as info:
            opt.step()
        msgs[which] = str(info.value)
        if which == "ours":
            assert_snapshot_equal(before, snapshot(opt, [dense, emb.weight]), "Adam with a sparse grad")
    assert "sparse" in msgs["ours"].lower() and msgs["ours"] == msgs["torch"]


# ---------------------------------------------------------------- _C
def _adam_args(n=8, dtype=torch.float32, amsgrad=False):
    p, g, m, v, vmax = (torch.randn(n).to(dtype) for _ in range(5))
    v.abs_()
    vmax.abs_()
    step = torch.tensor(3.0)
    keep = [p, g, m, v, vmax, step]
    args = dict(params=[p.data_ptr()], grads=[g.data_ptr()], exp_avgs=[m.data_ptr()], exp_avg_sqs=[v.data_ptr()],
                max_exp_avg_sqs=[vmax.data_ptr()] if amsgrad else None, steps=[step.data_ptr()], numels=[n],
                dtype={torch.float32: _C.DTYPE_FLOAT32, torch.bfloat16: _C.DTYPE_BFLOAT16,
                       torch.float16: _C.DTYPE_FLOAT16}[dtype],
                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=amsgrad,
                maximize=False, num_threads=1)
    return args, keep


ADAM_C_BAD = [
    dict(lr=NAN), dict(lr=-1.0), dict(lr=INF), dict(beta1=1.0), dict(beta1=NAN), dict(beta1=-0.1), dict(beta2=1.0),
    dict(beta2=NAN), dict(eps=-1.0), dict(eps=NAN), dict(eps=INF), dict(weight_decay=-1.0), dict(weight_decay=NAN),
    dict(num_threads=0), dict(dtype=7), dict(numels=[-1]), dict(numels=[8, 8]), dict(grads=[]),
    dict(params=[0]), dict(grads=[0]), dict(exp_avgs=[0]), dict(exp_avg_sqs=[0]), dict(steps=[0]),
    dict(amsgrad=True), dict(amsgrad=True, max_exp_avg_sqs=[0]), dict(amsgrad=True, max_exp_avg_sqs=[]),
]


@pytest.mark.parametrize("bad", ADAM_C_BAD, ids=[str(b) for b in ADAM_C_BAD])
def test_C_adam_step_validates_before_writing(bad):
    args, keep = _adam_args()
    before = [t.clone() for t in keep]
    args.update(bad)
    with pytest.raises(ValueError):
        _C.adam_step(**args)
    for k, (t, b) in enumerate(zip(keep, before)):
        assert torch.equal(t.view(torch.int32), b.view(torch.int32)), f"buffer {k} written (step counter included)"


def test_C_adam_step_rejects_misaligned_pointer():
    args, keep = _adam_args(dtype=torch.float32)
    before = [t.clone() for t in keep]
    args["grads"] = [args["grads"][0] + 1]
    with pytest.raises(ValueError):
        _C.adam_step(**args)
    assert all(torch.equal(t, b) for t, b in zip(keep, before))


def test_C_adam_step_valid_call_writes_and_counts():
    args, keep = _adam_args(amsgrad=True)
    p0 = keep[0].clone()
    _C.adam_step(**args)
    assert float(keep[5]) == 4.0
    assert not torch.equal(keep[0], p0)
    # a zero-length tensor may have a null pointer
    args2, keep2 = _adam_args()
    args2.update(params=[0], grads=[0], exp_avgs=[0], exp_avg_sqs=[0], numels=[0])
    _C.adam_step(**args2)
    assert float(keep2[5]) == 4.0


def _sgd_args(n=8, momentum=0.9):
    p, g, b = (torch.randn(n) for _ in range(3))
    keep = [p, g, b]
    args = dict(params=[p.data_ptr()], grads=[g.data_ptr()], momentum_buffers=[b.data_ptr()] if momentum else None,
                first_step=[False] if momentum else None, numels=[n], dtype=_C.DTYPE_FLOAT32, lr=0.1,
                weight_decay=0.0, momentum=momentum, dampening=0.0, nesterov=False, maximize=False, num_threads=1)
    return args, keep


SGD_C_BAD = [
    dict(lr=NAN), dict(lr=-1.0), dict(lr=INF), dict(momentum=-0.5), dict(momentum=NAN), dict(momentum=INF),
    dict(weight_decay=-1.0), dict(weight_decay=INF), dict(dampening=NAN), dict(dampening=INF),
    dict(nesterov=True, dampening=0.1), dict(momentum_buffers=None), dict(first_step=None), dict(first_step=[]),
    dict(momentum_buffers=[0]), dict(params=[0]), dict(grads=[0]), dict(numels=[8, 8]), dict(num_threads=-2),
    dict(dtype=99),
]


@pytest.mark.parametrize("bad", SGD_C_BAD, ids=[str(b) for b in SGD_C_BAD])
def test_C_sgd_step_validates_before_writing(bad):
    args, keep = _sgd_args()
    before = [t.clone() for t in keep]
    args.update(bad)
    with pytest.raises(ValueError):
        _C.sgd_step(**args)
    for k, (t, b) in enumerate(zip(keep, before)):
        assert torch.equal(t.view(torch.int32), b.view(torch.int32)), f"buffer {k} written"


def test_C_nesterov_without_momentum_rejected():
    args, keep = _sgd_args(momentum=0.0)
    args["nesterov"] = True
    before = [t.clone() for t in keep]
    with pytest.raises(ValueError):
        _C.sgd_step(**args)
    assert all(torch.equal(t, b) for t, b in zip(keep, before))
