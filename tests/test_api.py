"""Drop-in behaviours: signatures, isinstance, groups, add_param_group,
closures, LR schedulers, tensor lr, hooks, zero_grad, deepcopy / pickle,
params without grads, a real nn.Module training loop."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fusedoptim
from cases import (ALL_CASES, CASES_BY_ID, SMALL_GROUP_SHAPES, assert_close, assert_same_bits, errors, make_problem,
                   param_groups, record, state_tensors)
from tolerances import FP32_TRAINING_LOOP, FP32_VS_TORCH
from torch_versions import ADAM_HAS_DECOUPLED, GRAD_SCALER, NO_GRAD_SCALER, cpu_fused, without_none

PAIRS = [(fusedoptim.Adam, torch.optim.Adam), (fusedoptim.AdamW, torch.optim.AdamW), (fusedoptim.SGD, torch.optim.SGD)]
REPRESENTATIVE = [CASES_BY_ID[k] for k in ("Adam-wd0.1-amsgrad", "AdamW-wd0.1-max", "Adam-decoupled-wd0.1",
                                           "SGD-mom0.9-damp0-nesterov-wd0.05", "SGD-mom0.9-damp0.1-wd0",
                                           "SGD-mom0-damp0-wd0")]


def _ids(c):
    return c.id


# ---------------------------------------------------------------- signatures and classes
PRECISION_OPTIONS = {"master_weights": False, "stochastic_rounding": False, "kahan_summation": False,
                     "state_dtype": None, "max_grad_norm": None, "state_bits": None, "state_block_size": 256,
                     "min_quantized_numel": 4096}
#: Keywords of newer torch that fusedoptim's signatures have on every torch,
#: with newer torch's defaults; where torch's class lacks one, setting it is
#: the TypeError torch raises (SGD's fused: torch 2.3+; Adam's
#: decoupled_weight_decay: 2.6+).
NEWER_KEYWORDS = {"Adam": {"fused": None, "decoupled_weight_decay": False}, "AdamW": {"fused": None},
                  "SGD": {"fused": None}}


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__name__)
def test_signature_matches_torch(ours, theirs):
    """torch's parameters in torch's order, kinds and defaults, then only the
    precision options: keyword-only and off by default."""
    so, st = inspect.signature(ours), inspect.signature(theirs)
    po, pt = list(so.parameters.values()), list(st.parameters.values())
    assert [p.name for p in po[:len(pt)]] == [p.name for p in pt]
    for a, b in zip(po, pt):
        assert a.kind == b.kind, f"{a.name}: {a.kind} vs torch {b.kind}"
        assert a.default == b.default and type(a.default) is type(b.default), \
            f"{a.name}: default {a.default!r} vs torch {b.default!r}"
    extra = po[len(pt):]
    newer = {k: v for k, v in NEWER_KEYWORDS[theirs.__name__].items() if k not in st.parameters}
    assert [p.name for p in extra] == list(newer) + list(PRECISION_OPTIONS)
    for p in extra:
        assert p.kind == inspect.Parameter.KEYWORD_ONLY
        want = dict(newer, **PRECISION_OPTIONS)[p.name]
        assert p.default == want and type(p.default) is type(want), (p.name, p.default, want)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__name__)
def test_is_a_torch_optimizer(ours, theirs):
    opt = ours([torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, theirs) and isinstance(opt, torch.optim.Optimizer)
    assert issubclass(ours, theirs)
    if theirs is torch.optim.AdamW:
        # as torch's AdamW is an Adam (torch 2.6+; before, its own class)
        assert isinstance(opt, torch.optim.Adam) == issubclass(torch.optim.AdamW, torch.optim.Adam)
    assert opt.defaults == theirs([torch.zeros(2, requires_grad=True)]).defaults
    assert type(opt).__name__ == theirs.__name__


def test_public_api():
    for name in ("Adam", "AdamW", "SGD", "backend_info", "get_cpu_isa", "set_cpu_isa", "get_num_threads",
                 "set_num_threads", "__version__"):
        assert hasattr(fusedoptim, name) and name in fusedoptim.__all__


# ---------------------------------------------------------------- groups
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_add_param_group_mid_run(case):
    """A group added after 10 steps starts at step 0 while the others are at
    10: per-tensor step counts and bias corrections must follow torch."""
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=31, steps=30)
    results = {}
    for which in ("ours", "torch"):
        groups = param_groups(case, problem.init)
        opt = case.make(which, groups[:2])
        flat = [p for g in groups for p in g["params"]]
        for step in range(30):
            if step == 10:
                opt.add_param_group(groups[2])
            grads = [g for row in problem.grads(step) for g in row]
            for p, g in zip(flat, grads):
                late = any(p is q for q in groups[2]["params"])
                p.grad = g if (step >= 10 or not late) else None
            opt.step()
        results[which] = (flat, opt)
    flat_o, opt_o = results["ours"]
    flat_t, opt_t = results["torch"]
    assert len(opt_o.param_groups) == 3 and all(b.startswith("native-cpu") for b in opt_o.last_backends)
    assert_close([p.detach() for p in flat_o], [p.detach() for p in flat_t], what=f"{case.id} add_param_group",
                 **FP32_VS_TORCH)
    if case.kind != "sgd":
        assert float(opt_o.state[flat_o[0]]["step"]) == 30.0
        assert float(opt_o.state[flat_o[-1]]["step"]) == 20.0


def test_groups_with_different_flags_in_one_optimizer():
    """amsgrad, maximize and weight decay differ per group (not only lr)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in [(17,), (5, 3), (9,)]]
    out = {}
    for which, cls in (("ours", fusedoptim.Adam), ("torch", torch.optim.Adam)):
        ps = [t.clone().requires_grad_() for t in init]
        groups = [{"params": [ps[0]], "amsgrad": True},
                  {"params": [ps[1]], "maximize": True, "weight_decay": 0.3, "lr": 0.05},
                  {"params": [ps[2]], "weight_decay": 0.2, "betas": (0.5, 0.9),
                   # a flag of torch's Adam from 2.6 only
                   **({"decoupled_weight_decay": True} if ADAM_HAS_DECOUPLED else {})}]
        opt = cls(groups, lr=0.01, **({} if which == "ours" else {"foreach": False}))
        g2 = torch.Generator().manual_seed(4)
        for _ in range(20):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g2)
            opt.step()
        out[which] = ps
    assert_close([p.detach() for p in out["ours"]], [p.detach() for p in out["torch"]], what="per-group flags",
                 **FP32_VS_TORCH)


# ---------------------------------------------------------------- closure
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_closure_returns_loss_and_is_called_once(case):
    torch.set_num_threads(1)  # tiny matmuls (see test_training_loop_matches_torch)
    out = {}
    for which in ("ours", "torch"):
        torch.manual_seed(5)
        model = torch.nn.Linear(4, 1)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        opt = case.make(which, model.parameters())
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses = [opt.step(closure) for _ in range(10)]
        assert len(calls) == 10
        assert all(isinstance(l, torch.Tensor) and l.dim() == 0 for l in losses)
        out[which] = (torch.stack(losses).detach(), [p.detach().clone() for p in model.parameters()])
    assert_close(out["ours"][0], out["torch"][0], what=f"{case.id} losses", **FP32_TRAINING_LOOP)
    assert out["ours"][0][-1] != out["ours"][0][0]
    assert_close(out["ours"][1], out["torch"][1], what=f"{case.id} params after closures", **FP32_TRAINING_LOOP)


def test_step_without_closure_returns_none():
    p = torch.zeros(3, requires_grad=True)
    opt = fusedoptim.SGD([p], lr=0.1)
    p.grad = torch.ones(3)
    assert opt.step() is None


# ---------------------------------------------------------------- schedulers, tensor lr
def _sched_run(case, which, make_sched, steps=40):
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=32, steps=steps)
    groups = param_groups(case, problem.init)
    opt = case.make(which, groups)
    sched = make_sched(opt)
    flat = [p for g in groups for p in g["params"]]
    lrs, moms = [], []
    for step in range(steps):
        for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
            p.grad = g
        opt.step()
        sched.step()
        lrs.append(list(sched.get_last_lr()))
        moms.append([g.get("betas", (g.get("momentum"),))[0] for g in opt.param_groups])
    return lrs, moms, [p.detach() for p in flat]


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.02, 0.1], total_steps=40),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=13),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("case", [c for c in REPRESENTATIVE if c.kwargs.get("momentum", 1) != 0], ids=_ids)
def test_lr_scheduler_same_sequence_and_results(case, sched):
    lr_o, mom_o, p_o = _sched_run(case, "ours", SCHEDULERS[sched])
    lr_t, mom_t, p_t = _sched_run(case, "torch", SCHEDULERS[sched])
    assert lr_o == lr_t, "lr sequence differs from torch's"
    assert mom_o == mom_t, "momentum / beta1 sequence differs from torch's"
    assert len(set(map(tuple, lr_o))) > 3  # the schedule does change the lr
    stats = assert_close(p_o, p_t, what=f"{case.id} with {sched}", **FP32_VS_TORCH)
    record("fp32 params vs torch (LR schedulers)", stats, f"{case.id}-{sched}")


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_tensor_lr(case):
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=33, steps=20)
    kw = dict(case.kwargs)
    out = {}
    for which in ("ours", "torch"):
        groups = param_groups(case, problem.init)
        for g in groups:
            g["lr"] = torch.tensor(g.get("lr", kw["lr"]))
        extra = dict(lr=torch.tensor(kw["lr"]))
        opt = case.make(which, groups, **extra)
        flat = [p for g in groups for p in g["params"]]
        for step in range(20):
            for p, g in zip(flat, [g for row in problem.grads(step) for g in row]):
                p.grad = g
            opt.step()
            if step == 10:
                for g in opt.param_groups:
                    g["lr"].fill_(float(g["lr"]) * 0.5)  # in-place change of the tensor lr
        if which == "ours":
            assert all(b.startswith("native-cpu") for b in opt.last_backends), opt.last_backends
        out[which] = [p.detach() for p in flat]
    assert_close(out["ours"], out["torch"], what=f"{case.id} tensor lr", **FP32_VS_TORCH)


# ---------------------------------------------------------------- hooks, zero_grad
@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.AdamW, fusedoptim.SGD], ids=lambda c: c.__name__)
def test_step_hooks_fire_once_per_step(cls):
    p = torch.ones(5, requires_grad=True)
    opt = cls([p], lr=0.1)
    seen = []

    def pre(o, args, kwargs):
        assert o is opt
        seen.append(("pre", p.detach().clone()))

    def post(o, args, kwargs):
        assert o is opt
        seen.append(("post", p.detach().clone()))

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(post)
    g_pre, g_post = [], []
    h3 = register_optimizer_step_pre_hook(lambda o, a, k: g_pre.append(o))
    h4 = register_optimizer_step_post_hook(lambda o, a, k: g_post.append(o))
    try:
        for _ in range(3):
            p.grad = torch.ones(5)
            opt.step()
    finally:
        h3.remove()
        h4.remove()
    assert [k for k, _ in seen] == ["pre", "post"] * 3
    for i in range(3):
        pre_val, post_val = seen[2 * i][1], seen[2 * i + 1][1]
        assert not torch.equal(pre_val, post_val), "post hook must see the updated params"
        if i:
            assert torch.equal(pre_val, seen[2 * i - 1][1])
    assert g_pre == [opt] * 3 and g_post == [opt] * 3
    h1.remove()
    h2.remove()
    p.grad = torch.ones(5)
    opt.step()
    assert len(seen) == 6


def test_a_pre_hook_may_replace_the_step_arguments_as_in_torch():
    """torch's runner: a pre-hook's (args, kwargs) replace the step's, anything
    else but None is a RuntimeError, raised before the step writes."""
    p = torch.ones(5, requires_grad=True)
    p.grad = torch.ones(5)
    opt = fusedoptim.SGD([p], lr=0.1)
    calls = []

    def closure():
        calls.append("closure")
        return torch.tensor(2.0)

    h = opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0],), {"closure": closure}))
    assert opt.step().item() == 2.0 and calls == ["closure"]
    h.remove()
    h = opt.register_step_pre_hook(lambda o, args, kwargs: "nonsense")
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        opt.step()
    assert torch.equal(p.detach(), before)
    h.remove()


@pytest.mark.parametrize("enabled", [True, False])
def test_step_sees_the_grad_modes_torchs_step_sees(enabled):
    """Hooks outside the grad mode the step sets, the closure with grad, the
    update without (torch's fallback, here for a strided param, updates leaf
    tensors in place, which it could not with grad on)."""
    seqs = []
    for cls in (torch.optim.AdamW, fusedoptim.AdamW):
        ps = [torch.ones(5, requires_grad=True), torch.ones(6, 4).t().requires_grad_()]
        for q in ps:
            q.grad = torch.ones_like(q)
        opt = cls(ps, lr=0.1)
        seen = []
        opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", torch.is_grad_enabled())))
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", torch.is_grad_enabled())))
        with torch.set_grad_enabled(enabled):
            opt.step(lambda: seen.append(("closure", torch.is_grad_enabled())))
            assert torch.is_grad_enabled() is enabled
        assert not torch.equal(ps[1].detach(), torch.ones(4, 6))
        seqs.append(seen)
    expected = [("pre", enabled), ("closure", True), ("post", enabled)]
    assert seqs[1] == expected
    # torch's own, where its hooks run (torch 2.2's Dynamo, once loaded,
    # takes the hook runner off torch.optim's classes).
    assert seqs[0] in (expected, [("closure", True)])
    assert opt.last_backends == [f"native-cpu/{fusedoptim.backend_info()['isa']}+torch"]


@pytest.mark.skipif(not fusedoptim._torch_compat.TRACE_STEP,
                    reason="before torch 2.6 torch's own runner wraps both steps, and fires the hooks twice, as for "
                           "its own classes")
def test_a_subclass_with_its_own_step_runs_the_hooks_once():
    """torch wraps a subclass's own step in its runner; the fused step it calls
    then runs without hooks, as torch.optim's inner steps do."""
    class Mine(fusedoptim.AdamW):
        def step(self, closure=None):
            self.extra = getattr(self, "extra", 0) + 1
            return super().step(closure)

    p = torch.ones(5, requires_grad=True)
    opt = Mine([p], lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    for _ in range(2):
        p.grad = torch.ones(5)
        opt.step()
    assert seen == ["pre", "post"] * 2 and opt.extra == 2
    assert opt.last_backends == ["native-cpu/" + fusedoptim.backend_info()["isa"]]


@pytest.mark.parametrize("cls", [fusedoptim.AdamW, fusedoptim.SGD], ids=lambda c: c.__name__)
def test_profiler_sees_the_step_and_zero_grad_ranges_as_torchs(cls):
    """With a profiler on, the step and zero_grad run inside torch's own
    ranges (named as torch names them); with none, they skip them."""
    from torch.profiler import ProfilerActivity, profile

    p = torch.ones(5, requires_grad=True)
    opt = cls([p], lr=0.1)
    p.grad = torch.ones(5)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        p.grad = torch.ones(5)
        opt.step()
        opt.zero_grad()
    names = {e.key for e in prof.key_averages()}
    assert f"Optimizer.step#{cls.__name__}.step" in names, sorted(names)
    assert f"Optimizer.zero_grad#{cls.__name__}.zero_grad" in names, sorted(names)
    assert p.grad is None


@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.SGD], ids=lambda c: c.__name__)
def test_state_dict_hooks_work(cls):
    p = torch.ones(5, requires_grad=True)
    opt = cls([p], lr=0.1, **({"momentum": 0.9} if cls is fusedoptim.SGD else {}))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    p.grad = torch.ones(5)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd-pre", "sd-post", "load-pre", "load-post"]


@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.SGD], ids=lambda c: c.__name__)
def test_zero_grad_and_steps_without_grads(cls):
    p = torch.ones(5, requires_grad=True)
    q = torch.ones(3, requires_grad=True)
    opt = cls([{"params": [p]}, {"params": [q]}], lr=0.1)
    p.grad, q.grad = torch.ones(5), torch.ones(3)
    opt.step()
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    before = (p.detach().clone(), q.detach().clone())
    opt.step()
    assert opt.last_backends == ["none", "none"]
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    p.grad, q.grad = torch.ones(5), torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(5)) and torch.equal(q.grad, torch.zeros(3))
    q.grad = None
    p.grad.fill_(1.0)
    opt.step()
    assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}", "none"]
    assert not torch.equal(p, before[0]) and torch.equal(q, before[1])


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_params_without_grad_are_skipped_like_torch(case):
    out = {}
    for which in ("ours", "torch"):
        ps = [torch.full((7,), 1.0 + k, requires_grad=True) for k in range(4)]
        frozen = torch.ones(3, requires_grad=False)
        opt = case.make(which, [{"params": ps[:2] + [frozen]}, {"params": ps[2:]}])
        for step in range(5):
            ps[0].grad = torch.full((7,), 0.5 * (step + 1))
            ps[2].grad = None if step < 3 else torch.full((7,), -1.0)
            opt.step()
        out[which] = (ps, opt)
    ps_o, opt_o = out["ours"]
    ps_t, opt_t = out["torch"]
    assert torch.equal(ps_o[1], torch.full((7,), 2.0)) and torch.equal(ps_o[3], torch.full((7,), 4.0))
    # (torch 2.2's SGD without momentum stores momentum_buffer None: no state in fusedoptim)
    for k in range(4):
        assert set(opt_o.state[ps_o[k]].keys()) == set(without_none(opt_t.state[ps_t[k]]).keys()), f"param {k}"
    assert_close([p.detach() for p in ps_o], [p.detach() for p in ps_t], what="skipped params", **FP32_VS_TORCH)
    assert len(opt_o.state_dict()["state"]) == len(opt_t.state_dict()["state"])


# ---------------------------------------------------------------- deepcopy, pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", REPRESENTATIVE, ids=_ids)
def test_copy_of_optimizer_steps_identically_and_independently(case, how):
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=34, steps=20)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups)
    opt.num_threads = 1
    flat = [p for g in groups for p in g["params"]]

    def advance(o, ps, start, stop):
        for step in range(start, stop):
            for p, g in zip(ps, [g for row in problem.grads(step) for g in row]):
                p.grad = g
            o.step()

    advance(opt, flat, 0, 10)
    if how == "deepcopy":
        opt2, flat2 = copy.deepcopy((opt, flat))
    else:
        opt2, flat2 = pickle.loads(pickle.dumps((opt, flat)))
    assert type(opt2) is type(opt) and opt2.num_threads == 1
    assert all(a is not b and a.data_ptr() != b.data_ptr() for a, b in zip(flat, flat2))
    snapshot_orig = [p.detach().clone() for p in flat]
    advance(opt2, flat2, 10, 20)
    # stepping the copy must not touch the original (no shared pointers)
    assert_same_bits([p.detach() for p in flat], snapshot_orig, "original params after stepping the copy")
    assert all(b.startswith("native-cpu") for b in opt2.last_backends)
    advance(opt, flat, 10, 20)
    assert_same_bits([p.detach() for p in flat2], [p.detach() for p in flat], f"{case.id} {how} copy vs original")
    so, s2 = state_tensors(opt, flat), state_tensors(opt2, flat2)
    for key in so:
        assert_same_bits(s2[key], so[key], f"{case.id} {how} state[{key!r}]")


# ---------------------------------------------------------------- a real training loop
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(13, 37)
        self.fc2 = torch.nn.Linear(37, 17)
        self.fc3 = torch.nn.Linear(17, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class _ExactSqrtStep:
    """torch's optimizer whose steps take a correctly rounded fp32 sqrt
    (through float64, exact for a float32 result), as torch's fused=True CPU
    kernels compute it: the stand-in for those kernels where torch has none
    (before 2.4)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        sqrt = torch.Tensor.sqrt

        def exact_sqrt(t):
            return sqrt(t.double()).float() if t.dtype == torch.float32 else sqrt(t)

        torch.Tensor.sqrt = exact_sqrt
        try:
            self.opt.step()
        finally:
            torch.Tensor.sqrt = sqrt


@pytest.mark.parametrize("case", ALL_CASES[::2] + [CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"]], ids=_ids)
def test_training_loop_matches_torch(case):
    # One torch thread: these matmuls are tiny, and OpenMP barriers make them
    # very slow when another process competes for the 2 cores.
    torch.set_num_threads(1)
    out = {}
    # The second reference (see below what it is for): torch's fused=True CPU
    # step (torch 2.4+); without it (and for SGD, which has no sqrt, the
    # for-loop itself), torch's for-loop with a correctly rounded sqrt.
    fused = "torch-fused" if cpu_fused(case.kind) else "torch-exact-sqrt"
    for which in ("ours", "torch", fused):
        torch.manual_seed(6)
        model = _Net()
        groups = [{"params": list(model.fc1.parameters()) + list(model.fc3.parameters())},
                  {"params": model.fc2.parameters(), "lr": case.kwargs["lr"] * 0.3}]
        if which == "torch-fused":
            opt = case.make("torch", groups, fused=True, foreach=None)
        elif which == "torch-exact-sqrt":
            opt = _ExactSqrtStep(case.make("torch", groups))
        else:
            opt = case.make(which, groups)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(64, 13, generator=gen)
        teacher = torch.randn(13, 3, generator=gen)
        y = torch.tanh(x @ teacher)  # a learnable target
        losses = []
        for step in range(50):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if which == "ours":
            assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"] * 2
        out[which] = (losses, [p.detach().clone() for p in model.parameters()])
    lo, po = out["ours"]
    lt, pt = out["torch"]
    if not case.kwargs.get("maximize"):
        assert lo[-1] < lo[0], "training must reduce the loss"
    _, pf = out[fused]
    # torch's CPU sqrt is off by an ulp on some inputs (Note [torch's rounding
    # order]); where torch's own fused=True step then leaves the for-loop's
    # trajectory (here a ReLU input near 0 flips), fusedoptim may leave it as
    # far, and follows the fused step instead. Where torch has no fused CPU
    # step (before 2.4), the for-loop with a correctly rounded sqrt (what the
    # fused step computes) stands in for it.
    fused_err = errors(pf, pt)["abs"]
    if fused_err <= FP32_TRAINING_LOOP["atol"]:
        stats = assert_close(po, pt, what=f"{case.id} nn.Module params after 50 steps", **FP32_TRAINING_LOOP)
        assert_close(lo, lt, what=f"{case.id} losses", **FP32_TRAINING_LOOP)
    else:
        assert case.kind != "sgd", f"{case.id}: torch's {fused} SGD left the for-loop by {fused_err:.3e}"
        stats = assert_close(po, pf, what=f"{case.id} params vs {fused}", **FP32_TRAINING_LOOP)
        ours_err = errors(po, pt)["abs"]
        assert ours_err <= fused_err + FP32_TRAINING_LOOP["atol"], \
            f"{case.id}: {ours_err:.3e} from torch's for-loop, {fused} {fused_err:.3e}"
    record("fp32 params vs torch (module-train, 50 steps)", stats, case.id)


@pytest.mark.skipif(GRAD_SCALER is None, reason=NO_GRAD_SCALER)
def test_amp_grad_scaler_with_fused_true():
    """fused=True lets torch.amp.GradScaler hand the unscaling to the step
    (as with torch's fused optimizers); results match torch's unfused path."""
    out = {}
    for which in ("ours", "torch"):
        torch.manual_seed(8)
        model = torch.nn.Linear(5, 3)
        if which == "ours":
            opt = fusedoptim.Adam(model.parameters(), lr=0.01, fused=True)
            assert opt._step_supports_amp_scaling
        else:
            opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        x = torch.randn(8, 5)
        for step in range(6):
            opt.zero_grad()
            loss = model(x).pow(2).sum()
            if step == 3:
                loss = loss * float("inf")  # an overflow: this step must be skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if which == "ours" and step == 3:
                assert opt.last_backends == ["skipped (found_inf)"]
        out[which] = [p.detach().clone() for p in model.parameters()]
        assert all(torch.isfinite(p).all() for p in out[which])
    assert_close(out["ours"], out["torch"], what="GradScaler", **FP32_VS_TORCH)


# ---------------------------------------------------------------- hyperparameters edited between steps
ADAM_EDITS = [{}, {"weight_decay": 0.1}, {"maximize": True}, {"betas": (0.8, 0.95)}, {"eps": 1e-3},
              {"weight_decay": 0.0}, {"decoupled_weight_decay": True, "weight_decay": 0.2}, {"lr": 0.03},
              {"maximize": False}, {"decoupled_weight_decay": False}]
if not ADAM_HAS_DECOUPLED:  # not a flag of torch's Adam before 2.6: its groups have no such key
    ADAM_EDITS = [{k: v for k, v in e.items() if k != "decoupled_weight_decay"} for e in ADAM_EDITS]
SGD_EDITS = [{}, {"weight_decay": 0.1}, {"maximize": True}, {"momentum": 0.5}, {"dampening": 0.3},
             {"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.0}, {"nesterov": True}, {"lr": 0.03},
             {"weight_decay": 0.0, "nesterov": False, "maximize": False}]


@pytest.mark.parametrize("kind", ["Adam", "SGD"])
def test_hyperparameters_edited_between_steps(kind):
    """Every flag and value of a group edited between steps (cached plans
    must follow), including momentum 0.9 -> 0 -> 0.9 (torch then reuses the
    old buffer) and switching the weight-decay mode."""
    ours_cls, torch_cls, edits = ((fusedoptim.Adam, torch.optim.Adam, ADAM_EDITS) if kind == "Adam"
                                  else (fusedoptim.SGD, torch.optim.SGD, SGD_EDITS))
    out = {}
    for which, cls, kw in (("ours", ours_cls, {}), ("torch", torch_cls, {"foreach": False})):
        gen = torch.Generator().manual_seed(35)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(17,), (4, 5), (1031,)]]
        opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}], lr=0.01, **kw)
        for step in range(30):
            opt.param_groups[step % 2].update(edits[(step // 3) % len(edits)])
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[which] = ps
    assert_close([p.detach() for p in out["ours"]], [p.detach() for p in out["torch"]],
                 what=f"{kind} with hyperparameters edited between steps", **FP32_VS_TORCH)


@pytest.mark.parametrize("start,then", [(0.0, 0.9), (0.9, 0.0)])
def test_sgd_momentum_switched_mid_run(start, then):
    """torch allows changing a group's momentum between steps (0 -> 0.9
    creates the buffer from the grad; 0.9 -> 0 stops using it)."""
    out = {}
    for which, cls, kw in (("ours", fusedoptim.SGD, {}), ("torch", torch.optim.SGD, {"foreach": False})):
        p = torch.linspace(-1, 1, 33).requires_grad_()
        q = torch.linspace(1, 2, 7).requires_grad_()
        opt = cls([{"params": [q]}, {"params": [p], "momentum": start}], lr=0.1, **kw)
        for step in range(6):
            if step == 3:
                opt.param_groups[1]["momentum"] = then
            p.grad = torch.full((33,), 0.5 + step)
            q.grad = torch.full((7,), 1.0)
            opt.step()
        out[which] = (p.detach().clone(), q.detach().clone())
    assert_close(list(out["ours"]), list(out["torch"]), what=f"SGD momentum {start} -> {then}", **FP32_VS_TORCH)


def test_step_reports_reach_a_copy_of_the_dict():
    """Lightning's optimizer wrapper copies the optimizer's __dict__ once; the
    per-step reports (last_backends, last_grad_norm) must still follow."""
    ps = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(6, 4).t())]  # the second strided
    opt = fusedoptim.AdamW([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.01)
    wrapper = object.__new__(type("Wrapped", (type(opt),), {}))
    wrapper.__dict__ = dict(opt.__dict__)
    assert wrapper.last_backends == []
    for p in ps:
        p.grad = torch.randn(p.shape).contiguous()
    opt.step()
    assert opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}", "torch"]
    assert wrapper.last_backends == opt.last_backends
    ps[1].grad = None
    opt.step()
    assert wrapper.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}", "none"]
    clipped = fusedoptim.SGD([ps[0]], lr=0.1, max_grad_norm=0.5)
    wrapper = object.__new__(type(clipped))
    wrapper.__dict__ = dict(clipped.__dict__)
    clipped.step()
    assert wrapper.last_grad_norm is not None and torch.equal(wrapper.last_grad_norm, clipped.last_grad_norm)


def test_step_reports_reach_a_wrapper_of_the_class():
    """Lightning 2.x's optimizer wrapper takes the optimizer's class (for
    isinstance) and holds the optimizer as _optimizer, without its __dict__:
    the per-step reports it shows are the wrapped optimizer's."""

    class Wrapper:  # as lightning.pytorch.core.optimizer.LightningOptimizer
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type("Lightning" + type(optimizer).__name__, (Wrapper, type(optimizer)), {})

    p = torch.nn.Parameter(torch.randn(10))
    opt = fusedoptim.SGD([p], lr=0.1, max_grad_norm=0.5)
    wrapper = Wrapper(opt)
    assert isinstance(wrapper, fusedoptim.SGD) and wrapper.last_backends == [] and wrapper.last_grad_norm is None
    p.grad = torch.randn(10)
    opt.step()
    assert wrapper.last_backends == opt.last_backends == [f"native-cpu/{fusedoptim.get_cpu_isa()}"]
    assert wrapper.last_grad_norm is opt.last_grad_norm and opt.last_grad_norm is not None


# ---------------------------------------------------------------- documentation
@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.AdamW, fusedoptim.SGD], ids=lambda c: c.__name__)
def test_help_documents_the_public_methods(cls):
    """help(cls) shows a Google-style docstring for each method a user calls,
    and the class documents every constructor argument."""
    for name in ("add_param_group", "load_state_dict", "state_dict", "step", "zero_grad", "torch_state_dict"):
        doc = inspect.getdoc(getattr(cls, name))
        assert doc and not doc.lstrip().startswith("#"), f"{cls.__name__}.{name}: {doc!r}"
        owner = next(k for k in cls.__mro__ if name in vars(k))
        assert owner.__module__.startswith("fusedoptim"), f"{name} is documented by {owner}"
        takes = [p for p in inspect.signature(getattr(cls, name)).parameters if p != "self"]
        if takes:
            assert "Args:" in doc and all(f"{p}:" in doc for p in takes), f"{cls.__name__}.{name}: {doc}"
    doc = inspect.getdoc(cls)
    args = doc[doc.index("Args:"):]
    for p in list(inspect.signature(cls).parameters):
        assert f"{p}:" in args or f"{p}," in args, f"{cls.__name__} does not document {p}"
    assert "compatibility" not in doc, doc
