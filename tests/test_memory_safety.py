"""No address reaches a kernel unchecked (Note [addresses] in
fusedoptim/_tensors.py), and a step either raises before anything is
written or completes.

Each wrong-extent case (a state tensor too short, of the wrong dtype, not
contiguous, on the wrong device) is built on each path that hands tensors
to the kernels: the eager step (creating state, and the cached C plan of
later steps), the CUDA path (emulated on the host), the precision options,
the functional layer and its custom op, and the backends' own entry. A
kernel writing ``param.numel()`` elements through a short tensor's address
would corrupt the heap here; every case must instead raise ValueError with
params and state exactly as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedoptim
from fusedoptim import _compile
from fusedoptim.adam import ADAMW
from fusedoptim.backends import cpu as cpu_backend
from fusedoptim.backends import cuda as _cuda
from fusedoptim.sgd import SGD_SPEC
from cases import assert_snapshot_equal, snapshot

SHAPES = [(17,), (33,)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def _wrong(kind: str, like: torch.Tensor) -> torch.Tensor:
    """A state tensor that does not fit ``like`` in one way."""
    if kind == "short":
        return torch.zeros(7, dtype=like.dtype)
    if kind == "dtype":
        return torch.zeros(like.shape, dtype=torch.float64)
    if kind == "strided":
        return torch.zeros(like.numel() * 2, dtype=like.dtype)[::2]
    if kind == "device":
        return torch.zeros(like.shape, dtype=like.dtype, device="meta")
    raise AssertionError(kind)


KINDS = ["short", "dtype", "strided", "device"]
OPTIMIZERS = {
    "AdamW": (lambda ps, **kw: fusedoptim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw), ADAMW, "exp_avg"),
    "SGD": (lambda ps, **kw: fusedoptim.SGD(ps, lr=1e-2, momentum=0.9, **kw), SGD_SPEC, "momentum_buffer"),
}


# ------------------------------------------------------- state created wrong
@pytest.fixture
def faulty_init(monkeypatch):
    """Make the specs' state creation produce one wrong stream: what a traced
    state creation did on a torch without custom ops ((7,) for params of
    (17,) and (33,)). Returns a setter (kind, key, only_param_shape)."""

    def install(spec, kind, key, only=None):
        real = spec.init_state

        def init_state(p, state, keys, opts, **kw):
            first = real(p, state, keys, opts, **kw)
            if only is None or tuple(p.shape) == only:
                state[key] = _wrong(kind, state[key])
            return first

        monkeypatch.setattr(spec, "init_state", init_state)

    return install


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("path", ["cpu", "cuda-emulated"])
def test_state_created_wrong_raises_before_any_write(name, kind, path, faulty_init):
    make, spec, key = OPTIMIZERS[name]
    ps = _params()
    opt = make(ps)
    faulty_init(spec, kind, key, only=(33,))  # the second param: the first one's state was made fine
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=rf"state\['{key}'\] of param 1 must be a contiguous"):
        if path == "cpu":
            opt.step()
        else:
            with _cuda.emulate():
                opt.step()
    assert_snapshot_equal(before, snapshot(opt, ps), f"{name} {kind} {path}")
    assert len(opt.state) == 0, "the state created before the failed check was not removed"


@pytest.mark.parametrize("kind", KINDS)
def test_state_created_wrong_under_precision_options(kind, faulty_init):
    ps = _params(torch.bfloat16)
    opt = fusedoptim.AdamW(ps, lr=1e-2, master_weights=True)
    faulty_init(ADAMW, kind, "master_param")
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"state\['master_param'\] of param 0 must be a contiguous torch.float32"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, ps), kind)
    assert len(opt.state) == 0


def test_a_failed_build_in_a_later_group_leaves_earlier_groups_untouched(faulty_init):
    ps = _params()
    opt = fusedoptim.AdamW([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.1}])
    faulty_init(ADAMW, "short", "exp_avg_sq", only=(33,))
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"state\['exp_avg_sq'\] of param 0"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, ps), "two groups")
    assert len(opt.state) == 0


# -------------------------------------------- state changed under a cached plan
def _cached(name):
    make, _, key = OPTIMIZERS[name]
    ps = _params()
    opt = make(ps)
    opt.step()
    opt.step()  # the second step ran the group's cached C plan
    assert opt.last_backends == ["native-cpu/" + fusedoptim.backend_info()["isa"]]
    return ps, opt, key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["set_", "resize_", "data"])
def test_state_shrunk_in_place_under_a_cached_plan(name, how):
    """The same tensor object, moved to a smaller allocation: the cached
    plan's address would point into freed memory."""
    ps, opt, key = _cached(name)
    t = opt.state[ps[1]][key]
    if how == "set_":
        t.set_(torch.zeros(5))
    elif how == "resize_":
        t.resize_(5)
    else:
        t.data = torch.zeros(5)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=rf"state\['{key}'\] of param 1 has shape \(5,\)"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, ps), how)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_state_moved_in_place_under_a_cached_plan_is_updated_where_it_now_lives(name):
    """``set_`` to new memory of the same size: the step must update the new
    memory (as torch does), not the old address the plan was built with."""
    ps, opt, key = _cached(name)
    ref_ps = [p.detach().clone().requires_grad_() for p in ps]
    torch_cls = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[name]
    kw = {"AdamW": dict(lr=1e-2, weight_decay=0.1), "SGD": dict(lr=1e-2, momentum=0.9)}[name]
    ref = torch_cls(ref_ps, **kw, foreach=False)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors, not views of ours
    for p, q in zip(ps, ref_ps):
        q.grad = p.grad.clone()
    old = opt.state[ps[1]][key]
    old_storage = old.detach().clone()
    fresh = torch.full_like(old, 0.5)
    old.set_(fresh)
    ref.state[ref_ps[1]][key].fill_(0.5)
    opt.step()
    ref.step()
    assert opt.state[ps[1]][key].data_ptr() == fresh.data_ptr()
    torch.testing.assert_close(opt.state[ps[1]][key], ref.state[ref_ps[1]][key], rtol=0, atol=1e-6)
    torch.testing.assert_close(ps[1].detach(), ref_ps[1].detach(), rtol=0, atol=1e-6)
    assert not torch.equal(fresh, torch.full_like(fresh, 0.5)), "the new memory was not updated"
    del old_storage


# ------------------------------------------ state torch's fallback cannot take
@pytest.mark.parametrize("kind", ["dtype", "device"])
def test_state_the_fallback_cannot_take_raises_before_any_write(kind):
    """State the kernels cannot take goes to torch's implementation; state
    that torch's would fail on midway (after updating other params) is
    caught in the check phase."""
    ps = _params()
    opt = fusedoptim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    opt.step()
    opt.step()
    st = opt.state[ps[0]]
    st["exp_avg"] = st["exp_avg"].double() if kind == "dtype" else st["exp_avg"].to("meta")
    before = snapshot(opt, ps) if kind == "dtype" else None
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of param 0 is torch.float64|on meta") as info:
        opt.step()
    assert isinstance(info.value, RuntimeError), type(info.value)  # torch's step raises RuntimeError here
    if before is not None:
        assert_snapshot_equal(before, snapshot(opt, ps), kind)


def test_strided_state_goes_to_torch_and_matches_it():
    """A non-contiguous state tensor is not an error: torch's implementation
    takes it, with torch's results."""
    ps = _params()
    ref_ps = [p.detach().clone().requires_grad_() for p in ps]
    for p, q in zip(ps, ref_ps):
        q.grad = p.grad.clone()
    opt = fusedoptim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, weight_decay=0.1, foreach=False)
    opt.step()
    ref.step()
    for o, q in ((opt, ps[0]), (ref, ref_ps[0])):
        o.state[q]["exp_avg"] = _wrong("strided", q).copy_(o.state[q]["exp_avg"])
    opt.step()
    ref.step()
    assert opt.last_backends == [f"native-cpu/{fusedoptim.backend_info()['isa']}+torch"]
    for p, q in zip(ps, ref_ps):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


# ------------------------------------------- functional layer and backend entry
def _adam_lists(kind=None, which="exp_avgs"):
    ps = [p.detach() for p in _params()]
    grads = [torch.randn_like(p) for p in ps]
    lists = {"exp_avgs": [torch.zeros_like(p) for p in ps], "exp_avg_sqs": [torch.zeros_like(p) for p in ps],
             "state_steps": [torch.tensor(0.0) for _ in ps]}
    if kind is not None:
        lists[which][1] = _wrong(kind, ps[1]) if which != "state_steps" else {
            "short": torch.zeros(0), "dtype": torch.tensor(0.0, dtype=torch.float64),
            "strided": torch.zeros(4)[::2], "device": torch.tensor(0.0, device="meta")}[kind]
    return ps, grads, lists


@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "state_steps"])
@pytest.mark.parametrize("kind", KINDS)
def test_backend_entry_checks_every_address(kind, which):
    """``backends.cpu.run_tensors``, the native entry of the functional layer
    and of its custom op: every tensor against the kernel's extent."""
    ps, grads, lists = _adam_lists(kind, which)
    saved = [p.clone() for p in ps]
    from fusedoptim.adam import AdamHyper
    h = AdamHyper(1e-2, 0.9, 0.999, 1e-8, 0.0, True, False, False)
    with pytest.raises(ValueError, match=rf"{which[:-1] if which != 'state_steps' else 'state_steps'}.*\[1\] must be"):
        cpu_backend.run_tensors("adam", ps, grads, {"exp_avg": lists["exp_avgs"], "exp_avg_sq": lists["exp_avg_sqs"]},
                                lists["state_steps"], None, h, 1)
    for p, s in zip(ps, saved):
        assert torch.equal(p, s)


def test_backend_entry_checks_grads_against_params():
    ps, grads, lists = _adam_lists()
    grads[1] = torch.zeros(7)
    from fusedoptim.adam import AdamHyper
    h = AdamHyper(1e-2, 0.9, 0.999, 1e-8, 0.0, True, False, False)
    with pytest.raises(ValueError, match=r"grad 1 has shape \(7,\) but its param has \(33,\)"):
        cpu_backend.run_tensors("adam", ps, grads, {"exp_avg": lists["exp_avgs"], "exp_avg_sq": lists["exp_avg_sqs"]},
                                lists["state_steps"], None, h, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_functional_adam_checks_state(kind):
    """The functional step: a short state is an error; a state of another
    dtype or device, which torch's for-loop would take for the param and fail
    on midway, is an error before anything is written; a strided one runs
    torch's for-loop."""
    ps, grads, lists = _adam_lists(kind)
    saved = [p.clone() for p in ps]
    call = lambda: fusedoptim.adam.adam(ps, grads, lists["exp_avgs"], lists["exp_avg_sqs"], [], lists["state_steps"],
                                        amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8,
                                        maximize=False)
    if kind == "strided":
        call()
        assert not torch.equal(ps[1], saved[1])
        return
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of param 1"):
        call()
    for p, s in zip(ps, saved):
        assert torch.equal(p, s)


@pytest.mark.skipif(not _compile.HAVE_CUSTOM_OP, reason="torch.library.custom_op needs torch 2.4+")
@pytest.mark.parametrize("kind", ["short", "dtype"])  # a meta tensor dispatches to the op's fake
def test_custom_op_checks_every_address(kind):
    """The custom op is public (``torch.ops.fusedoptim.adam_step_``): called
    directly with tensors that do not fit, it raises."""
    ps, grads, lists = _adam_lists(kind)
    saved = [p.clone() for p in ps]
    with pytest.raises(ValueError, match=r"exp_avg\[1\] must be"):
        torch.ops.fusedoptim.adam_step_(ps, grads, lists["exp_avgs"], lists["exp_avg_sqs"], [], lists["state_steps"],
                                        0.0, 0.9, 0.999, 1e-8, 0.0, True, False, False,
                                        torch.tensor(1e-2, dtype=torch.float64), 1)
    for p, s in zip(ps, saved):
        assert torch.equal(p, s)


def test_address_rejects_tensors_without_memory():
    from fusedoptim._tensors import address
    for t in (torch.zeros(4, device="meta"), torch.zeros(2, 2).t(), torch.zeros(4, dtype=torch.float64), "x"):
        with pytest.raises(ValueError, match="must be a contiguous torch.float32 tensor of 4 elements on cpu"):
            address(t, "x", torch.float32, 4, "cpu")
    t = torch.zeros(4)
    assert address(t, "x", torch.float32, 4, "cpu") == t.data_ptr()
    assert address(t[1:], "x", torch.float32, 3, "cpu") == t.data_ptr() + 4

