"""Properties over random configurations, each seed a fixed test case.

The other modules pin each feature down alone; these draw combinations of
them (optimizer, flags, param dtypes and sizes, precision options, groups)
from a seeded generator, so every run checks the same cases:

* a checkpoint taken mid-run resumes to the same bits as the run that was
  never stopped, whatever the CPU variant and thread count after the load
  (and whatever seed torch's generator holds at the new construction);
* the CUDA path, run on the CPU through its emulation, gives the CPU scalar
  path's bits: params and every state tensor, in every step-counter mode;
* a step that raises leaves params, grads and state exactly as they were,
  with the exception type torch's own step raises on the same input.
"""

from __future__ import annotations

import copy
import io
import random
from typing import Any, Dict, List, Tuple

import pytest
import torch

import fusedoptim
from fusedoptim.backends import cuda as _cuda
from cases import assert_same_bits, assert_snapshot_equal, snapshot, supported_isas
from torch_versions import WEIGHTS_ONLY_BF16

CLASSES = {"adam": (fusedoptim.Adam, torch.optim.Adam), "adamw": (fusedoptim.AdamW, torch.optim.AdamW),
           "sgd": (fusedoptim.SGD, torch.optim.SGD)}


def _assert_same_run(params_a: List[torch.Tensor], state_a: List[Dict[str, Any]], params_b: List[torch.Tensor],
                     state_b: List[Dict[str, Any]], what: str) -> None:
    """Two runs' params and every state entry, bit for bit (8-bit codes and
    other integer tensors by value, plain values by ==)."""
    assert_same_bits(params_a, params_b, f"{what}: params")
    for i, (a, b) in enumerate(zip(state_a, state_b)):
        assert a.keys() == b.keys(), f"{what}: state keys of param {i}"
        for k, x in a.items():
            y = b[k]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                assert_same_bits([x], [y], f"{what}: state[{k!r}] of param {i}")
            elif isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: state[{k!r}] of param {i}"
            else:
                assert x == y, f"{what}: state[{k!r}] of param {i}"


def _flags(rng: random.Random, kind: str) -> Dict[str, Any]:
    if kind == "sgd":
        kw: Dict[str, Any] = dict(lr=0.01, momentum=rng.choice([0.0, 0.9]), weight_decay=rng.choice([0.0, 1e-4]),
                                  maximize=rng.random() < 0.2)
        if kw["momentum"] and rng.random() < 0.5:
            kw["nesterov"] = True
        elif kw["momentum"]:
            kw["dampening"] = rng.choice([0.0, 0.1])
        return kw
    return dict(lr=1e-3, weight_decay=rng.choice([0.0, 0.1]), amsgrad=rng.random() < 0.3,
                maximize=rng.random() < 0.2)


def _options(rng: random.Random, dtype: torch.dtype, kw: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """At most one store option the dtype takes, maybe clipping, maybe 8-bit states."""
    o: Dict[str, Any] = {}
    r = rng.random()
    if dtype != torch.float32 and r < 0.25:
        o["master_weights"] = True
    elif dtype == torch.bfloat16 and r < 0.45:
        o["stochastic_rounding"] = True
    elif dtype != torch.float32 and r < 0.6:
        o["kahan_summation"] = True
    elif dtype == torch.float32 and r < 0.4:
        o["state_dtype"] = torch.bfloat16
    if rng.random() < 0.3:
        o["max_grad_norm"] = rng.choice([0.5, 10.0])
    momentum = kind != "sgd" or kw["momentum"] != 0
    if rng.random() < 0.3 and "state_dtype" not in o and momentum and not kw.get("amsgrad"):
        o.update(state_bits=8, min_quantized_numel=rng.choice([0, 64, 4096]), state_block_size=rng.choice([64, 256]))
    return o


def _resume_case(seed: int) -> Dict[str, Any]:
    rng = random.Random(seed)
    kind = rng.choice(sorted(CLASSES))
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    kw = _flags(rng, kind)
    shapes = [(rng.randint(1, 3000),) if rng.random() < 0.5 else (rng.randint(1, 60), rng.randint(1, 60))
              for _ in range(rng.randint(1, 4))]
    return dict(kind=kind, dtype=dtype, kw=kw, opts=_options(rng, dtype, kw, kind), shapes=shapes,
                cut=rng.randint(1, 4), how=rng.choice(["deepcopy", "torch.save", "as is"]),
                isa=rng.choice(supported_isas()), threads=rng.choice([1, 2, 3]))


def _run(case: Dict[str, Any], grads: List[List[torch.Tensor]], p0: List[torch.Tensor], resume: bool
         ) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    cls = CLASSES[case["kind"]][0]
    torch.manual_seed(1)
    ps = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = cls(ps, **case["kw"], **case["opts"])
    for s, row in enumerate(grads):
        for p, g in zip(ps, row):
            p.grad = g.clone()
        opt.step()
        if resume and s == case["cut"] - 1:
            sd = opt.state_dict()
            if case["how"] == "deepcopy":
                sd = copy.deepcopy(sd)
            elif case["how"] == "torch.save":
                buf = io.BytesIO()
                torch.save(sd, buf)
                buf.seek(0)
                # (torch 2.2's weights-only loader rejects the dtype object a state_dtype group holds)
                sd = torch.load(buf, weights_only=WEIGHTS_ONLY_BF16 or "state_dtype" not in case["opts"])
            ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            torch.manual_seed(2)  # another stochastic-rounding seed at construction: the checkpoint's wins
            opt = cls(ps, **case["kw"], **case["opts"])
            opt.load_state_dict(sd)
            fusedoptim.set_cpu_isa(case["isa"])
            opt.num_threads = case["threads"]
    return [p.detach() for p in ps], [dict(opt.state[p]) for p in ps]


@pytest.mark.parametrize("seed", range(96))
def test_resume_is_bit_identical_on_any_variant_and_thread_count(seed):
    case = _resume_case(seed)
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(s, generator=gen).to(case["dtype"]) for s in case["shapes"]]
    grads = [[torch.randn(s, generator=gen).to(case["dtype"]) for s in case["shapes"]] for _ in range(5)]
    straight, st_a = _run(case, grads, p0, resume=False)
    fusedoptim.set_cpu_isa(supported_isas()[0])
    resumed, st_b = _run(case, grads, p0, resume=True)
    _assert_same_run(straight, st_a, resumed, st_b, f"{case}")


# ------------------------------------------------------------- the emulated CUDA path
def _emulation_case(seed: int) -> Dict[str, Any]:
    rng = random.Random(500 + seed)
    kind = rng.choice(sorted(CLASSES))
    dtypes = rng.sample([torch.float32, torch.bfloat16, torch.float16], rng.randint(1, 2))
    kw = _flags(rng, kind)
    if kind != "sgd":
        mode = rng.choice(["", "", "capturable", "fused"])  # where the step counter lives
        if mode:
            kw[mode] = True
    # Options need one dtype the option takes; with two dtypes, clipping only.
    opts = _options(rng, dtypes[0], kw, kind) if len(dtypes) == 1 else \
        ({"max_grad_norm": 1.0} if rng.random() < 0.3 else {})
    n = rng.choice([1, 3, 10, 60])
    # Sizes around the kernels' 8192-element chunk, and small ones.
    numels = [rng.choice([1, 7, 8191, 8193]) if rng.random() < 0.1 else rng.randint(1, 300) for _ in range(n)]
    return dict(kind=kind, kw=kw, opts=opts, dtypes=[rng.choice(dtypes) for _ in numels], numels=numels,
                space=rng.choice(["auto", "small", "large"]))


@pytest.mark.parametrize("seed", range(40))
def test_emulated_cuda_path_gives_the_cpu_scalar_bits(seed, restore_isa):
    case = _emulation_case(seed)
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(n, generator=gen).to(d) for n, d in zip(case["numels"], case["dtypes"])]
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in p0] for _ in range(3)]
    restore_isa("scalar")
    out = {}
    for path in ("cpu", "emulated"):
        torch.manual_seed(1)
        ps = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = CLASSES[case["kind"]][0](ps, **case["kw"], **case["opts"])
        for row in grads:
            for p, g in zip(ps, row):
                p.grad = g.clone()
            with _cuda.emulate(path == "emulated", param_space=case["space"]):
                opt.step()
        assert all(("emulated" in b) == (path == "emulated") for b in opt.last_backends), opt.last_backends
        out[path] = ([p.detach() for p in ps], [dict(opt.state[p]) for p in ps])
    _assert_same_run(*out["cpu"], *out["emulated"], f"{case}")


# ------------------------------------------------------------- errors
#: Bad inputs torch's step raises on too (the exception type is then torch's).
BAD = ["grad shape", "grad numel", "state shape", "missing step", "moment None", "sparse grad", "Adam grad dtype"]


def _spoil(bad: str, kind: str, opt: Any, q: torch.nn.Parameter) -> None:
    if bad == "grad shape":
        q.grad.data = q.grad.data.t().contiguous() if q.dim() == 2 and q.shape[0] != q.shape[1] else \
            q.grad.data.reshape(-1, 1)
    elif bad == "grad numel":
        q.grad.data = torch.zeros(3, dtype=q.dtype)
    elif bad == "state shape":
        opt.state[q]["momentum_buffer" if kind == "sgd" else "exp_avg"] = torch.zeros(3, dtype=q.dtype)
    elif bad == "missing step":
        del opt.state[q]["step"]
    elif bad == "moment None":
        opt.state[q]["exp_avg"] = None
    elif bad == "sparse grad":
        q.grad = q.grad.to_sparse()
    elif bad == "Adam grad dtype":
        q.grad.data = q.grad.data.double()


@pytest.mark.parametrize("seed", range(120))
def test_a_raised_step_writes_nothing_and_raises_torchs_type(seed):
    rng = random.Random(1000 + seed)
    kind = rng.choice(sorted(CLASSES))
    bads = [b for b in BAD if kind != "sgd" or b in ("grad shape", "grad numel", "state shape")]
    bad = rng.choice(bads)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    kw = _flags(rng, kind)
    if kind == "sgd":
        kw["momentum"] = 0.9  # (a buffer to spoil)
    shapes = [(rng.randint(2, 40), rng.randint(2, 30)) for _ in range(rng.randint(2, 5))]
    # A param torch's step updates (fp64), in its own group or beside the
    # others: it is the one spoiled where only torch's step reaches it.
    fallback_victim = bad in ("missing step",)
    victim = rng.randrange(len(shapes))
    raised = {}
    for which in ("ours", "torch for-loop", "torch foreach"):
        gen = torch.Generator().manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(
            torch.float64 if (fallback_victim and k == victim) else dtype)) for k, s in enumerate(shapes)]
        cls = CLASSES[kind][0 if which == "ours" else 1]
        opt = cls(ps, **kw, **({} if which == "ours" else {"foreach": which.endswith("foreach")}))
        for s in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        _spoil(bad, kind, opt, ps[victim])
        before = snapshot(opt, ps)
        with pytest.raises(Exception) as info:
            opt.step()
        raised[which] = info.value
        if which == "ours":
            assert_snapshot_equal(before, snapshot(opt, ps), f"{kind} {dtype} {bad} (param {victim})")
    # (torch's for-loop and foreach steps can raise different types, e.g.
    # AttributeError and TypeError on a None moment: either is torch's.)
    theirs = (type(raised["torch for-loop"]), type(raised["torch foreach"]))
    assert isinstance(raised["ours"], theirs), \
        f"{kind} {bad}: ours {type(raised['ours']).__name__}: {raised['ours']}; torch " + \
        ", ".join(f"{type(raised[w]).__name__}: {raised[w]}" for w in ("torch for-loop", "torch foreach"))
