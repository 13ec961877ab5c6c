"""torch.compile: a compiled ``optimizer.step()`` traces with no graph break.

The native steps are the custom ops ``fusedoptim::adam_step_`` and
``fusedoptim::sgd_step_`` (registered by python/fusedoptim/adam.py and sgd.py through _compile.py). A compiled step must
give exactly the bits of the eager step (the same native calls with the same
hyperparameters), match torch.optim within the suite's tolerances, keep
torch's ``state_dict`` layout, and compile once (SGD with momentum: twice,
the first step creates the buffers). Params the kernels do not take run
torch's functional for-loop code inside the same graph.

Compiling is slow on two cores: every test compiles a handful of tiny
graphs for a few steps; one parity case runs the inductor backend (what
users get, which calls the op in place), the others ``aot_eager``. Every
``fullgraph=True`` compile doubles as a check that nothing breaks the graph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedoptim
from cases import (CASES_BY_ID, DTYPE_IDS, SMALL_GROUP_SHAPES, assert_close, assert_same_bits, flat64, make_problem,
                   param_groups, record, run_case, state_tensors)
from tolerances import (FP32_STATE_VS_TORCH, FP32_TRAINING_LOOP, FP32_VS_TORCH, LOWP_FLOOR_ULPS, LOWP_MAX_RATIO)
from torch_versions import COMPILE_TRACES_STEP, HAVE_CUSTOM_OP, NO_CUSTOM_OP, NO_TRACED_STEP

#: The tests of the traced step (graphs, graph breaks, compile counts,
#: fullgraph=True). Where fusedoptim does not trace the step on the installed
#: torch, a compiled step runs eagerly outside the graph with one warning
#: (tests/test_torch_compat.py::test_compiled_step_runs_eagerly_with_one_warning).
TRACED = pytest.mark.skipif(not COMPILE_TRACES_STEP, reason=NO_TRACED_STEP)
#: The custom ops called directly: registered where torch has torch.library.custom_op.
OPS = pytest.mark.skipif(not HAVE_CUSTOM_OP, reason=NO_CUSTOM_OP)

STEPS = 5

#: (case, dtype, backend, compiles): compiles is how many graphs the whole
#: run needs (SGD with momentum: the first step creates the buffers, the next
#: ones read them). One case runs inductor, the default backend, which turns
#: the op's functional form back into the in-place call (its first use in a
#: process costs ~10 s on two cores with a cold cache); the others aot_eager,
#: which runs the functional form (copies, then copy back) and compiles in
#: well under a second. Both must give the eager bits.
PARITY = [
    (CASES_BY_ID["Adam-wd0.1-amsgrad"], torch.float32, "inductor", 1),  # L2 decay, AMSGrad
    (CASES_BY_ID["AdamW-wd0.1-amsgrad-max"], torch.float32, "aot_eager", 1),  # decoupled decay, maximize
    (CASES_BY_ID["Adam-decoupled-wd0.1"], torch.float32, "aot_eager", 1),
    (CASES_BY_ID["SGD-mom0.9-damp0.1-wd0.05-max"], torch.float32, "aot_eager", 2),
    (CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05"], torch.float32, "aot_eager", 2),
    (CASES_BY_ID["SGD-mom0-damp0-wd0.05"], torch.float32, "aot_eager", 1),
    (CASES_BY_ID["AdamW-wd0.1"], torch.bfloat16, "aot_eager", 1),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _flat(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _compiled_step(opt, backend="inductor"):
    """``opt.step()`` compiled with fullgraph=True (any graph break raises) and a frame counter."""
    counter = CompileCounterWithBackend(backend)

    def step():
        opt.step()

    return torch.compile(step, fullgraph=True, backend=counter), counter


def _run(case, problem, compiled, steps=STEPS, backend="inductor", **extra):
    """``steps`` steps of fusedoptim on ``problem``, eager or compiled; returns (params, opt, counter)."""
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups, **extra)
    flat = _flat(opt)
    step, counter = _compiled_step(opt, backend) if compiled else (opt.step, None)
    for k in range(steps):
        for p, g in zip(flat, [g for row in problem.grads(k) for g in row]):
            p.grad = g
        step()
    return [p.detach() for p in flat], opt, counter


def _assert_same_state(a, b, what):
    ps_a, ps_b = _flat(a), _flat(b)
    sa, sb = state_tensors(a, ps_a), state_tensors(b, ps_b)
    assert sa.keys() == sb.keys(), f"{what}: state keys {sorted(sa)} vs {sorted(sb)}"
    for key in sa:
        assert_same_bits(sa[key], sb[key], f"{what}: state[{key!r}]")


def _lowp_no_worse_than_torch(ours, theirs, ref32, dtype, what):
    """bf16/fp16: our error against the fp32 reference within LOWP_MAX_RATIO x torch's own."""
    a, b, ref = flat64(ours), flat64(theirs), flat64(ref32)
    floor = LOWP_FLOOR_ULPS * float(torch.finfo(dtype).eps) * float(np.abs(ref).max(initial=1.0))
    ours_max, torch_max = float(np.abs(a - ref).max()), float(np.abs(b - ref).max())
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    assert ours_max <= LOWP_MAX_RATIO * torch_max + floor, (
        f"{what}: max error vs fp32 torch {ours_max:.3e}, torch {DTYPE_IDS[dtype]} {torch_max:.3e}")


# --------------------------------------------------------------------------- graph breaks
@TRACED
@pytest.mark.parametrize("case_id", ["AdamW-wd0.1-amsgrad-max", "SGD-mom0.9-damp0-nesterov-wd0.05"])
def test_step_traces_as_one_graph_with_the_custom_op(case_id):
    case = CASES_BY_ID[case_id]
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=3)
    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups)
    for p, g in zip(_flat(opt), [g for row in problem.grads(0) for g in row]):
        p.grad = g

    explanation = torch._dynamo.explain(lambda: opt.step())()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    op = "adam_step_" if case.kind != "sgd" else "sgd_step_"
    # One op call per param group (three groups), nothing else updates the params.
    assert code.count(f"fusedoptim.{op}") == 3, code


def test_train_step_breaks_only_at_backward():
    """forward + backward + step in one function: Dynamo breaks the graph at
    ``loss.backward()`` (torch's own limitation, as with torch.optim); the
    step after it compiles into the resumed graph with no break of its own."""
    def make():
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model, fusedoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)

    def train_step(model, opt, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    x, y = torch.randn(16, 6), torch.randn(16, 1)
    if COMPILE_TRACES_STEP:  # (else the step is a graph break of its own, run eagerly: only the results below)
        model, opt = make()
        explanation = torch._dynamo.explain(train_step)(model, opt, x, y)
        reasons = [str(r.reason) for r in explanation.break_reasons]
        assert explanation.graph_break_count == 1 and "backward" in reasons[0], reasons
        assert any("fusedoptim.adam_step_" in g.code for g in explanation.graphs)

    torch._dynamo.reset()
    model, opt = make()
    ref_model, ref_opt = make()
    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(4):
        compiled(model, opt, x, y)
        train_step(ref_model, ref_opt, x, y)
        opt.zero_grad()
        ref_opt.zero_grad()
    stats = assert_close(list(model.parameters()), list(ref_model.parameters()), what="compiled train step vs eager",
                         **FP32_TRAINING_LOOP)
    record("compiled train step vs eager", stats, "test_train_step_breaks_only_at_backward")
    assert float(opt.state[next(model.parameters())]["step"]) == 4.0


# --------------------------------------------------------------------------- results
@TRACED
@pytest.mark.parametrize("case,dtype,backend,compiles", PARITY,
                         ids=[f"{c.id}-{DTYPE_IDS[d]}-{b}" for c, d, b, _ in PARITY])
def test_compiled_step_equals_eager_bits_and_matches_torch(case, dtype, backend, compiles):
    problem = make_problem(SMALL_GROUP_SHAPES, dtype, seed=7, steps=STEPS + 1)
    eager, eager_opt, _ = _run(case, problem, compiled=False)
    ours, opt, counter = _run(case, problem, compiled=True, backend=backend)

    assert counter.frame_count == compiles, f"compiled {counter.frame_count} graphs over {STEPS} steps"
    assert_same_bits(ours, eager, f"{case.id} {DTYPE_IDS[dtype]}: compiled vs eager params")
    _assert_same_state(opt, eager_opt, f"{case.id} {DTYPE_IDS[dtype]}: compiled vs eager")

    theirs, torch_opt = run_case(case, "torch", problem, steps=STEPS)
    for k, (po, pt) in enumerate(zip(_flat(opt), _flat(torch_opt))):
        assert set(opt.state[po]) == set(torch_opt.state[pt]) == set(case.state_keys), k
    if dtype == torch.float32:
        stats = assert_close(ours, theirs, what=f"{case.id}: compiled params vs torch", **FP32_VS_TORCH)
        record("fp32 params vs torch (compiled step)", stats, case.id)
        so, st = state_tensors(opt, _flat(opt)), state_tensors(torch_opt, _flat(torch_opt))
        for key in so:
            assert_close(so[key], st[key], what=f"{case.id}: compiled state[{key!r}] vs torch",
                         **FP32_STATE_VS_TORCH[key])
    else:
        ref32, _ = run_case(case, "torch", problem, dtype=torch.float32, steps=STEPS)
        _lowp_no_worse_than_torch(ours, theirs, ref32, dtype, f"{case.id} {DTYPE_IDS[dtype]} compiled")
    _check_state_dict_moves_to_torch(case, problem, ours, opt, torch_opt)


def _check_state_dict_moves_to_torch(case, problem, ours, opt, torch_opt):
    """After compiled steps the state_dict has torch's layout, and torch.optim
    loads it and continues where the compiled run stopped."""
    sd, ref = copy.deepcopy(opt.state_dict()), torch_opt.state_dict()
    # The same groups as torch's (which these tests build with foreach=False).
    assert [dict(g, foreach=None) for g in sd["param_groups"]] == [dict(g, foreach=None) for g in ref["param_groups"]]
    assert sd["state"].keys() == ref["state"].keys()
    for k in ref["state"]:
        assert sd["state"][k].keys() == ref["state"][k].keys(), k
        for key, t in ref["state"][k].items():
            o = sd["state"][k][key]
            assert (o.dtype, o.shape, o.device) == (t.dtype, t.shape, t.device), (k, key)
    if problem.dtype != torch.float32:
        return
    rows, k = [], 0
    for shapes in problem.shapes:
        rows.append([p.clone() for p in ours[k:k + len(shapes)]])
        k += len(shapes)
    resumed = case.make("torch", param_groups(case, rows))
    resumed.load_state_dict(sd)
    for p, g in zip(_flat(resumed), [g for row in problem.grads(STEPS) for g in row]):
        p.grad = g
    resumed.step()
    expected, _ = run_case(case, "torch", problem, steps=STEPS + 1)
    assert_close([p.detach() for p in _flat(resumed)], expected, what=f"{case.id}: torch resumed from a compiled run",
                 **FP32_VS_TORCH)


@TRACED
def test_tensor_lr_changes_without_recompiling():
    """A tensor lr reaches the op as a tensor: changing it (as an LR schedule
    does) reuses the graph, and every step uses the current value."""
    case = CASES_BY_ID["AdamW-wd0.1"]
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=9, steps=STEPS)

    def run(compiled):
        groups = param_groups(case, problem.init)
        for k, g in enumerate(groups):
            g["lr"] = torch.tensor(1e-2 * (k + 1))
        opt = case.make("ours", groups)
        step, counter = _compiled_step(opt) if compiled else (opt.step, None)
        for k in range(STEPS):
            for p, g in zip(_flat(opt), [g for row in problem.grads(k) for g in row]):
                p.grad = g
            step()
            for group in opt.param_groups:
                group["lr"].mul_(0.5)
        return _flat(opt), counter

    ours, counter = run(compiled=True)
    eager, _ = run(compiled=False)
    assert counter.frame_count == 1
    assert_same_bits(ours, eager, "tensor lr: compiled vs eager")


@TRACED
def test_float_lr_schedule_compiles_twice():
    """A float lr changed by an LR scheduler at every step: Dynamo recompiles
    once, then takes the lr as a graph input (it reaches the op as a tensor),
    and every step matches eager bit for bit. The scheduler wraps
    ``opt.step`` in a function Dynamo never traces, so this compiles with
    fullgraph=False, as torch's own tutorial does."""
    case_id = "SGD-mom0.9-damp0-nesterov-wd0.05"  # torch's own SGD recompiles at every step here
    case = CASES_BY_ID[case_id]
    steps = 6
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=19, steps=steps)

    def run(compiled):
        opt = case.make("ours", param_groups(case, problem.init))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(lambda: opt.step(), backend=counter) if compiled else opt.step
        for k in range(steps):
            for p, g in zip(_flat(opt), [g for row in problem.grads(k) for g in row]):
                p.grad = g
            step()
            sched.step()
        return opt, counter

    opt, counter = run(compiled=True)
    eager_opt, _ = run(compiled=False)
    # The first graph (which also creates the momentum buffers), then one
    # with the lr as an input.
    assert counter.frame_count == 2, counter.frame_count
    assert_same_bits([p.detach() for p in _flat(opt)], [p.detach() for p in _flat(eager_opt)],
                     f"{case_id}: float lr schedule, compiled vs eager")


@TRACED
def test_fallback_params_run_torch_code_in_the_same_graph():
    """fp64, transposed and sliced params go through torch's functional
    for-loop inside the graph (fullgraph=True); a contiguous param with a
    transposed grad and the other native params through the op (which would
    reject anything else); a param without grad is skipped."""
    for case_id in ("Adam-wd0.1-amsgrad-max", "SGD-mom0.9-damp0.1-wd0.05"):
        case = CASES_BY_ID[case_id]
        gen = torch.Generator().manual_seed(4)
        init = [torch.randn(17, generator=gen), torch.randn(4, 6, generator=gen),
                torch.randn(9, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen),
                torch.randn(30, generator=gen), torch.randn(6, generator=gen, dtype=torch.bfloat16),
                torch.randn(3, generator=gen)]

        def params():
            ps = [t.clone() for t in init]
            ps[3] = ps[3].t()  # non-contiguous param
            ps[4] = ps[4][::2]  # sliced param
            return [p.detach().requires_grad_(True) for p in ps]

        def grads(step):
            g = torch.Generator().manual_seed(100 + step)
            out = [torch.randn(p.shape, generator=g).to(p.dtype) for p in init]
            out[1] = torch.randn(6, 4, generator=g).t()  # transposed grad of a contiguous param
            out[3] = out[3].t()
            out[4] = out[4][::2]
            out[6] = None  # no grad: skipped
            return out

        def run(which, compiled=False):
            ps = params()
            opt = case.make(which, [dict(params=ps)])
            step = _compiled_step(opt, backend="aot_eager")[0] if compiled else opt.step
            for k in range(3):
                for p, g in zip(ps, grads(k)):
                    p.grad = g
                step()
            return ps, opt

        torch._dynamo.reset()
        ours, opt = run("ours", compiled=True)  # fullgraph=True: no graph break
        eager, _ = run("ours")
        theirs, _ = run("torch")
        native = [0, 1, 5]  # fp32, fp32 with a transposed grad, bf16
        assert_same_bits([ours[i] for i in native], [eager[i] for i in native], f"{case_id}: native params")
        # fp32 and fp64 params (torch's compiled code keeps fp64 bias corrections in fp32, as torch.optim does).
        assert_close(ours[:5], theirs[:5], what=f"{case_id}: compiled vs torch", **FP32_VS_TORCH)
        assert torch.equal(ours[6], init[6]) and ours[6] not in opt.state, f"{case_id}: a param without grad changed"
        for i, p in enumerate(ours[:6]):
            assert opt.state[p].keys() == set(case.state_keys), (i, opt.state[p].keys())


@TRACED
def test_eager_and_compiled_steps_interleave():
    """The eager plan cache and the compiled step share the state: SGD buffers
    created by a compiled step are read by eager steps and the other way round."""
    case = CASES_BY_ID["SGD-mom0.9-damp0.1-wd0.05"]
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=13, steps=6)
    eager, eager_opt, _ = _run(case, problem, compiled=False, steps=6)

    groups = param_groups(case, problem.init)
    opt = case.make("ours", groups)
    compiled, _ = _compiled_step(opt, backend="aot_eager")
    for k, step in enumerate([compiled, compiled, opt.step, opt.step, compiled, compiled]):
        for p, g in zip(_flat(opt), [g for row in problem.grads(k) for g in row]):
            p.grad = g
        step()
    assert_same_bits([p.detach() for p in _flat(opt)], eager, "interleaved vs eager params")
    _assert_same_state(opt, eager_opt, "interleaved vs eager")


# --------------------------------------------------------------------------- the ops themselves
def _tensors(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in (7, 33)]


@OPS
def test_custom_ops_pass_opcheck():
    """Schema (declared mutations are the actual ones), fake tensors, autograd
    registration and AOT dispatch, as torch.library.opcheck checks them."""
    sq = [t.abs() for t in _tensors(seed=2)]
    mx = [t * 2 for t in sq]
    steps = [torch.tensor(1.0), torch.tensor(4.0)]
    for amsgrad in (False, True):
        args = (_tensors(), _tensors(seed=1), _tensors(seed=3), [t.clone() for t in sq],
                [t.clone() for t in mx] if amsgrad else [], [s.clone() for s in steps],
                1e-2, 0.9, 0.999, 1e-8, 0.1, True, amsgrad, False, None, 0)
        result = torch.library.opcheck(torch.ops.fusedoptim.adam_step_.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    for momentum, lr_tensor in ((0.9, torch.tensor(0.05)), (0.0, None)):
        bufs = _tensors(seed=4) if momentum else []
        first = [True, False] if momentum else []
        args = (_tensors(), _tensors(seed=1), bufs, first, 1e-2, 0.1, momentum, 0.0, False, True, lr_tensor, 0)
        result = torch.library.opcheck(torch.ops.fusedoptim.sgd_step_.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


@OPS
def test_op_equals_the_eager_step():
    """Called directly, the op is the eager step: same bits for params and state."""
    ps = [t.requires_grad_() for t in _tensors()]
    ref = [t.detach().clone().requires_grad_() for t in ps]
    opt, ref_opt = fusedoptim.Adam(ps, lr=1e-2, amsgrad=True), fusedoptim.Adam(ref, lr=1e-2, amsgrad=True)
    for k in range(3):
        for p, q, g in zip(ps, ref, _tensors(seed=10 + k)):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()
        if k == 0:
            opt.step()  # creates the state
            continue
        st = [opt.state[p] for p in ps]
        torch.ops.fusedoptim.adam_step_(
            [p.detach() for p in ps], [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
            [s["max_exp_avg_sq"] for s in st], [s["step"] for s in st],
            1e-2, 0.9, 0.999, 1e-8, 0.0, False, True, False, None, 0)
    assert_same_bits([p.detach() for p in ps], [q.detach() for q in ref], "op vs eager step")
    _assert_same_state(opt, ref_opt, "op vs eager step")


@OPS
@pytest.mark.parametrize("bad", ["strided-param", "state-dtype", "state-numel", "step-dtype", "param-dtype", "lengths",
                                 "grad-shape", "negative-lr"])
def test_op_rejects_bad_tensors_before_writing(bad):
    ps, gs, m, v, steps = _tensors(), _tensors(seed=1), _tensors(seed=2), [t.abs() for t in _tensors(seed=3)], \
        [torch.tensor(0.0), torch.tensor(0.0)]
    if bad == "strided-param":
        ps[1] = torch.randn(66)[::2]
    elif bad == "state-dtype":
        m[1] = m[1].to(torch.bfloat16)
    elif bad == "state-numel":
        v[1] = torch.rand(32)
    elif bad == "step-dtype":
        steps[1] = torch.tensor(0.0, dtype=torch.float64)
    elif bad == "param-dtype":
        ps[1], gs[1], m[1], v[1] = (t.double() for t in (ps[1], gs[1], m[1], v[1]))
    elif bad == "lengths":
        gs = gs[:1]
    elif bad == "grad-shape":
        gs[1] = torch.randn(3, 11).t()  # 33 elements, strided, not the param's shape
    lr = torch.tensor(-1e-2, dtype=torch.float64) if bad == "negative-lr" else None
    before = [t.clone() for t in ps + m + v + steps]
    with pytest.raises(ValueError):
        torch.ops.fusedoptim.adam_step_(ps, gs, m, v, [], steps, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, False, False,
                                        lr, 0)
    for a, b in zip(ps + m + v + steps, before):
        assert torch.equal(a, b), "the op wrote before raising"


@TRACED
def test_restarted_trace_of_a_first_sgd_step():
    """One compiled function stepping two optimizers: the second one's float
    hyperparameters differ, so Dynamo recompiles, first tries them as symbolic
    floats and restarts the analysis. _init_group has run for real by then
    (it creates state entries while tracing), so the restarted trace must not
    depend on whether an entry exists: the first step of a multi-group SGD
    with momentum still creates every buffer once and matches eager."""
    step = torch.compile(lambda opt: opt.step(), fullgraph=True, backend="aot_eager")
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=17, steps=2)
    for case_id in ("SGD-mom0.9-damp0.1-wd0", "SGD-mom0.9-damp0-nesterov-wd0.05-max"):
        case = CASES_BY_ID[case_id]
        eager, eager_opt, _ = _run(case, problem, compiled=False, steps=2)
        opt = case.make("ours", param_groups(case, problem.init))
        for k in range(2):
            for p, g in zip(_flat(opt), [g for row in problem.grads(k) for g in row]):
                p.grad = g
            step(opt)
        assert_same_bits([p.detach() for p in _flat(opt)], eager, f"{case_id}: compiled vs eager")
        _assert_same_state(opt, eager_opt, f"{case_id}: compiled vs eager")


def test_amp_fused_step_runs_eagerly_under_compile():
    """With fused=True, torch.amp.GradScaler hands the step ``grad_scale`` and
    ``found_inf``: reading the flag needs the eager step, so the compiled
    function breaks the graph there (documented) and does what eager does:
    unscale and step, or skip the whole step on an inf."""
    def run(compiled, found_inf):
        ps = [t.detach().clone().requires_grad_() for t in _tensors()]
        opt = fusedoptim.AdamW(ps, lr=1e-2, fused=True)
        step = torch.compile(lambda: opt.step(), backend="aot_eager") if compiled else opt.step
        for k in range(2):
            for p, g in zip(ps, _tensors(seed=20 + k)):
                p.grad = g * 1024.0
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(float(found_inf and k == 1))
            step()
        return [p.detach() for p in ps], opt

    for found_inf in (False, True):
        ours, opt = run(True, found_inf)
        eager, eager_opt = run(False, found_inf)
        assert_same_bits(ours, eager, f"AMP step (found_inf={found_inf}): compiled vs eager")
        _assert_same_state(opt, eager_opt, f"AMP step (found_inf={found_inf}): compiled vs eager")
        assert float(opt.state[_flat(opt)[0]]["step"]) == (1.0 if found_inf else 2.0)
