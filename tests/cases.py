"""The registry of optimizer cases and the helpers every test module shares.

A case is (our class, torch's class, constructor kwargs), as in torch-optimi's
tests. ``ADAM_CASES`` and ``SGD_CASES`` enumerate every combination of torch's
flags (weight decay, amsgrad, maximize, momentum, dampening, Nesterov); ``LARGE_CASES`` is the subset that also runs on 1000003
elements. Problems (initial params and per-step grads) are deterministic:
each is drawn from seeded ``torch.Generator`` objects, so two runs of one
problem see exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fusedoptim
from torch_versions import ADAM_HAS_DECOUPLED, NO_DECOUPLED

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}

LR_ADAM = 1e-2
LR_SGD = 1e-2
WD = 0.1


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class OptCase:
    """One optimizer configuration: our class, torch's class and their kwargs."""

    id: str
    ours: type
    theirs: type
    kwargs: Dict[str, Any] = field(hash=False)
    kind: str = "adam"  # "adam", "adamw" or "sgd": picks the NumPy reference

    def __repr__(self) -> str:  # pytest ids
        return self.id

    @property
    def unsupported(self) -> Optional[str]:
        """Why the installed torch cannot run this case (torch.optim's class
        lacks one of its keywords: Adam's ``decoupled_weight_decay`` before
        2.6), else None. conftest.py skips every test parametrized with such
        a case, with this reason."""
        if self.kwargs.get("decoupled_weight_decay") and not ADAM_HAS_DECOUPLED:
            return NO_DECOUPLED
        return None

    @property
    def state_keys(self) -> Tuple[str, ...]:
        """Exactly the per-param state keys torch keeps for this case."""
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.kwargs.get("momentum", 0) != 0 else ()
        keys = ("step", "exp_avg", "exp_avg_sq")
        return keys + (("max_exp_avg_sq",) if self.kwargs.get("amsgrad", False) else ())

    def group_overrides(self, k: int) -> Dict[str, Any]:
        """Hyperparameters that differ between the param groups of a problem."""
        if k == 0:
            return {}
        lr = self.kwargs["lr"]
        wd = self.kwargs.get("weight_decay", 1e-2 if self.kind == "adamw" else 0.0)
        if self.kind == "sgd":
            if k == 1:
                return {"lr": lr * 0.5, "momentum": 0.5 if self.kwargs.get("momentum", 0) else 0.0}
            return {"lr": lr * 2.0, "weight_decay": wd * 3.0}
        if k == 1:
            return {"lr": lr * 0.5, "betas": (0.8, 0.99), "eps": 1e-6}
        return {"lr": lr * 2.0, "weight_decay": wd * 3.0}

    def make(self, which: str, groups: List[Dict[str, Any]], **extra: Any) -> torch.optim.Optimizer:
        """Build ours (``which="ours"``) or torch's for-loop (``"torch"``)."""
        kwargs = dict(self.kwargs)
        kwargs.update(extra)
        if which == "torch":
            kwargs.setdefault("foreach", False)
            return self.theirs(groups, **kwargs)
        return self.ours(groups, **kwargs)


def _adam_cases() -> List[OptCase]:
    cases = []
    for wd, amsgrad, maximize in itertools.product((0.0, WD), (False, True), (False, True)):
        tag = f"wd{wd:g}" + ("-amsgrad" if amsgrad else "") + ("-max" if maximize else "")
        kw = dict(lr=LR_ADAM, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
        cases.append(OptCase(f"Adam-{tag}", fusedoptim.Adam, torch.optim.Adam, kw, "adam"))
        cases.append(OptCase(f"AdamW-{tag}", fusedoptim.AdamW, torch.optim.AdamW, kw, "adamw"))
        if wd:
            kw = dict(kw, decoupled_weight_decay=True)
            cases.append(OptCase(f"Adam-decoupled-{tag}", fusedoptim.Adam, torch.optim.Adam, kw, "adamw"))
    return cases


def _sgd_cases() -> List[OptCase]:
    cases = []
    # (momentum, dampening, nesterov); Nesterov only with dampening 0, as torch requires.
    momenta = [(0.0, 0.0, False), (0.0, 0.1, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)]
    for (mom, damp, nesterov), wd, maximize in itertools.product(momenta, (0.0, 0.05), (False, True)):
        tag = f"mom{mom:g}-damp{damp:g}" + ("-nesterov" if nesterov else "") + f"-wd{wd:g}" + ("-max" if maximize else "")
        kw = dict(lr=LR_SGD, momentum=mom, dampening=damp, nesterov=nesterov, weight_decay=wd, maximize=maximize)
        cases.append(OptCase(f"SGD-{tag}", fusedoptim.SGD, torch.optim.SGD, kw, "sgd"))
    return cases


ADAM_CASES = _adam_cases()
SGD_CASES = _sgd_cases()
ALL_CASES = ADAM_CASES + SGD_CASES
CASES_BY_ID = {c.id: c for c in ALL_CASES}

#: The combos that also run on 1000003 elements (kept small for the 2-core budget).
LARGE_CASES = [
    (CASES_BY_ID["Adam-wd0.1-amsgrad"], torch.float32),
    (CASES_BY_ID["AdamW-wd0.1-max"], torch.bfloat16),
    (CASES_BY_ID["Adam-decoupled-wd0.1"], torch.float16),
    (CASES_BY_ID["SGD-mom0.9-damp0.1-wd0.05"], torch.float32),
    (CASES_BY_ID["SGD-mom0.9-damp0-nesterov-wd0.05-max"], torch.bfloat16),
    (CASES_BY_ID["SGD-mom0-damp0-wd0-max"], torch.float16),
]

#: Shapes of the default problem, one list per param group: 0-d, 1, and
#: sizes that are not multiples of 8 or 16 (the AVX2 / AVX-512 widths), so
#: every variant runs both its vector body and its scalar tail.
SMALL_GROUP_SHAPES: List[List[Tuple[int, ...]]] = [
    [(), (1,), (7,)],
    [(17,), (3, 5), (33,)],
    [(2, 3, 11), (1031,), (64,)],
]
LARGE_GROUP_SHAPES: List[List[Tuple[int, ...]]] = [[(1000003,), (7,)]]
STEPS = 50


# --------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """Initial params (one list per group) and a seeded grad stream."""

    shapes: List[List[Tuple[int, ...]]]
    dtype: torch.dtype
    seed: int
    steps: int
    init: List[List[torch.Tensor]] = field(default_factory=list)

    _cache: Dict[int, List[List[torch.Tensor]]] = field(default_factory=dict, repr=False)

    def grads(self, step: int, dtype: Optional[torch.dtype] = None) -> List[List[torch.Tensor]]:
        """The grads of ``step``: drawn in fp32, rounded to the problem's dtype
        (so a reference in another dtype sees the same values upcast). Fresh
        tensors on every call (an optimizer may not alias another's grads)."""
        row_list = self._cache.get(step)
        if row_list is None:
            gen = torch.Generator().manual_seed(self.seed * 7919 + 1000 + step)
            row_list = []
            for gi, shapes in enumerate(self.shapes):
                row = []
                for ti, shape in enumerate(shapes):
                    scale = (1.0, 0.1, 3.0)[(gi + ti) % 3]
                    row.append((torch.randn(shape, generator=gen) * scale).to(self.dtype))
                row_list.append(row)
            self._cache[step] = row_list
        return [[g.to(dtype) if dtype is not None and dtype != g.dtype else g.clone() for g in row]
                for row in row_list]


def make_problem(shapes: List[List[Tuple[int, ...]]], dtype: torch.dtype, seed: int = 0,
                 steps: int = STEPS) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    init = [[torch.randn(shape, generator=gen).to(dtype) for shape in group] for group in shapes]
    return Problem(shapes, dtype, seed, steps, init)


def param_groups(case: OptCase, init: List[List[torch.Tensor]], dtype: Optional[torch.dtype] = None,
                 group_extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Fresh leaf params (copies of ``init``, optionally cast) in groups with
    the case's overrides, then ``group_extra`` applied to every group."""
    groups = []
    for k, tensors in enumerate(init):
        ps = [t.detach().clone().to(dtype if dtype is not None else t.dtype).requires_grad_() for t in tensors]
        groups.append(dict(params=ps, **case.group_overrides(k)))
        groups[-1].update(group_extra or {})
    return groups


def run_case(case: OptCase, which: str, problem: Problem, dtype: Optional[torch.dtype] = None,
             steps: Optional[int] = None, group_extra: Optional[Dict[str, Any]] = None,
             **extra: Any) -> Tuple[List[torch.Tensor], torch.optim.Optimizer]:
    """Run ``steps`` steps of ours or torch's optimizer on ``problem``; returns
    the flat list of final params and the optimizer."""
    groups = param_groups(case, problem.init, dtype, group_extra)
    opt = case.make(which, groups, **extra)
    flat = [p for g in groups for p in g["params"]]
    for step in range(problem.steps if steps is None else steps):
        for p, g in zip(flat, [g for row in problem.grads(step, dtype) for g in row]):
            p.grad = g
        opt.step()
    return [p.detach() for p in flat], opt


def run_numpy(case: OptCase, problem: Problem, group_extra: Optional[Dict[str, Any]] = None) -> List[np.ndarray]:
    """The float64 NumPy reference on ``problem`` (inputs upcast from the problem's dtype)."""
    from reference_numpy import NumpyOptimizer

    groups = []
    for k, tensors in enumerate(problem.init):
        hyper = dict(case.kwargs)
        hyper.update(case.group_overrides(k))
        hyper.update(group_extra or {})
        hyper["params"] = [t.double().numpy().copy() for t in tensors]
        groups.append(hyper)
    ref = NumpyOptimizer(case.kind, groups)
    for step in range(problem.steps):
        ref.step([[g.double().numpy() for g in row] for row in problem.grads(step)])
    return [p for g in ref.groups for p in g["params"]]


def state_tensors(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
    """Every state tensor of ``params``, keyed by state name, in param order."""
    out: Dict[str, List[torch.Tensor]] = {}
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out.setdefault(k, []).append(v)
    return out


# --------------------------------------------------------------------------- special values
def _from_bits(pattern: int, dtype: torch.dtype) -> torch.Tensor:
    it = INT_VIEW[dtype]
    if it == torch.int16 and pattern >= 0x8000:
        pattern -= 0x10000
    if it == torch.int32 and pattern >= 0x80000000:
        pattern -= 0x100000000
    return torch.tensor([pattern], dtype=it).view(dtype)[0]


def special_values(dtype: torch.dtype):
    """NaNs (quiet, signalling, negative, with payloads), infinities, signed
    zeros, subnormals, the largest finite value and the smallest normal."""
    fi = torch.finfo(dtype)
    vals = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, fi.max, -fi.max, fi.tiny, -fi.tiny,
            fi.tiny / 4, -fi.tiny / 8, fi.tiny * 0.75]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    nan_bits = {torch.float32: [0x7F800001, 0xFFC00001, 0x7FBFFFFF],
                torch.bfloat16: [0x7F81, 0xFFC1, 0x7FBF],
                torch.float16: [0x7C01, 0xFE01, 0x7DFF]}[dtype]
    subnormal_bits = {torch.float32: [0x00000001, 0x807FFFFF],
                      torch.bfloat16: [0x0001, 0x807F],
                      torch.float16: [0x0001, 0x83FF]}[dtype]
    extra = torch.stack([_from_bits(b, dtype) for b in nan_bits + subnormal_bits])
    return torch.cat([t, extra])


SPECIAL_SHAPES = [[(1031,), (17,)], [(64,), ()]]


def special_problem(dtype: torch.dtype, steps: int = 4, seed: int = 11):
    """Params and per-step grads with special values in vector bodies and in
    scalar tails (positions 0.., 520.., 1020.. of the 1031-element tensor and
    the 17-element tail), different positions on different steps."""
    sv = special_values(dtype)
    gen = torch.Generator().manual_seed(seed)
    init = [[(torch.randn(s, generator=gen) * 2).to(dtype) for s in shapes] for shapes in SPECIAL_SHAPES]
    n = sv.numel()
    init[0][0][:n] = sv
    init[0][0][1031 - n:] = sv.flip(0)
    init[0][1][3:3 + 5] = sv[:5]
    # Values whose square overflows the storage dtype (and fp32 for fp32).
    init[0][0][600] = 1e19 if dtype != torch.float16 else 300.0
    grads = []
    for step in range(steps):
        row = [[(torch.randn(s, generator=gen) * (3.0 if k else 0.5)).to(dtype) for k, s in enumerate(shapes)]
               for shapes in SPECIAL_SHAPES]
        g = row[0][0]
        off = 100 + 40 * step
        g[off:off + n] = sv.roll(step)
        g[1031 - n - 3:1031 - 3] = sv.roll(-step)
        g[700 + step] = 1e20 if dtype != torch.float16 else 1000.0  # g*g overflows
        g[800 + step] = 1e-20 if dtype != torch.float16 else 1e-7   # g*g underflows
        row[0][1][step:step + 4] = sv[step:step + 4]
        row[1][0][5 + step] = sv[step]
        grads.append(row)
    return init, grads



# --------------------------------------------------------------------------- comparisons
def _as64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def flat64(xs: Sequence[Any]) -> np.ndarray:
    """Concatenate tensors / arrays of any shape into one float64 vector."""
    if len(xs) == 0:
        return np.zeros(0)
    return np.concatenate([_as64(x).reshape(-1) for x in xs])


def errors(actual: Sequence[Any], expected: Sequence[Any], rel_floor: float = 1e-3) -> Dict[str, Any]:
    """Max abs error, max rel error (|a-e| / max(|e|, rel_floor)) and where.

    Non-finite values must sit at the same places with the same value (NaN
    with NaN, +inf with +inf); a mismatch there counts as an infinite error.
    """
    a, e = flat64(actual), flat64(expected)
    assert a.shape == e.shape, f"element counts differ: {a.shape} vs {e.shape}"
    if a.size == 0:
        return dict(abs=0.0, rel=0.0, where=None, n=0, nonfinite_mismatch=0)
    fin = np.isfinite(a) & np.isfinite(e)
    same_nonfinite = (np.isnan(a) & np.isnan(e)) | ((a == e) & ~np.isfinite(e))
    bad_nonfinite = int((~fin & ~same_nonfinite).sum())
    diff = np.where(fin, np.abs(a - e), 0.0)
    rel = diff / np.maximum(np.abs(e), rel_floor)
    rel = np.where(fin, rel, 0.0)
    i = int(np.argmax(diff))
    j = int(np.argmax(rel))
    return dict(abs=float(diff[i]) if not bad_nonfinite else math.inf, rel=float(rel[j]) if not bad_nonfinite else math.inf,
                where=i, where_rel=j, actual=float(a[i]), expected=float(e[i]), n=int(a.size),
                nonfinite_mismatch=bad_nonfinite)


def assert_close(actual: Sequence[Any], expected: Sequence[Any], *, rtol: float, atol: float, what: str) -> Dict[str, Any]:
    """Elementwise |a - e| <= atol + rtol * |e| over all tensors, with a verbose message."""
    a, e = flat64(actual), flat64(expected)
    assert a.shape == e.shape, f"{what}: element counts differ: {a.shape} vs {e.shape}"
    stats = errors([a], [e])
    if a.size == 0:
        return stats
    fin = np.isfinite(a) & np.isfinite(e)
    tol = atol + rtol * np.abs(e)
    bad = fin & (np.abs(a - e) > tol)
    nonfinite_bad = stats["nonfinite_mismatch"]
    if bad.any() or nonfinite_bad:
        idx = np.flatnonzero(bad)[:5]
        worst = int(np.argmax(np.where(fin, np.abs(a - e) - tol, -np.inf)))
        lines = [
            f"{what}: {int(bad.sum())} of {a.size} elements outside atol={atol:g} + rtol={rtol:g}*|expected|;"
            f" {nonfinite_bad} non-finite mismatches",
            f"  max abs error {stats['abs']:.3e} at flat index {stats['where']}"
            f" (actual {stats['actual']!r}, expected {stats['expected']!r})",
            f"  max rel error {stats['rel']:.3e} at flat index {stats['where_rel']}",
            f"  worst violation at flat index {worst}: actual {a[worst]!r}, expected {e[worst]!r},"
            f" allowed {tol[worst]:.3e}",
            "  first violations: " + ", ".join(f"[{k}] {a[k]!r} vs {e[k]!r}" for k in idx),
        ]
        if nonfinite_bad:
            nk = np.flatnonzero(~fin & ~((np.isnan(a) & np.isnan(e)) | (a == e)))[:5]
            lines.append("  non-finite mismatches: " + ", ".join(f"[{k}] {a[k]!r} vs {e[k]!r}" for k in nk))
        raise AssertionError("\n".join(lines))
    return stats


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (contiguous copy)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype]).clone()


def assert_same_bits(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], what: str,
                     nan_positions_only: bool = True) -> None:
    """Bit-for-bit equality; NaNs only need to sit at the same positions
    (their payloads may legitimately differ between equal computations)."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} tensors"
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{k}]: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        an, en = torch.isnan(a), torch.isnan(e)
        if not torch.equal(an, en):
            diff = torch.nonzero((an != en).reshape(-1)).reshape(-1)[:5].tolist()
            raise AssertionError(f"{what}[{k}]: NaN positions differ at flat indices {diff} "
                                 f"({int(an.sum())} vs {int(en.sum())} NaNs)")
        ab, eb = bits(a).reshape(-1), bits(e).reshape(-1)
        mask = ~an.reshape(-1) if nan_positions_only else torch.ones_like(an.reshape(-1))
        neq = (ab != eb) & mask
        if neq.any():
            idx = torch.nonzero(neq).reshape(-1)[:5].tolist()
            af, ef = a.detach().reshape(-1), e.detach().reshape(-1)
            detail = ", ".join(f"[{i}] {af[i].item()!r} (0x{int(ab[i]) & 0xFFFFFFFF:x}) vs {ef[i].item()!r} "
                               f"(0x{int(eb[i]) & 0xFFFFFFFF:x})" for i in idx)
            raise AssertionError(f"{what}[{k}]: {int(neq.sum())} of {a.numel()} elements differ in bits: {detail}")


def snapshot(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Dict[str, Any]:
    """Bits of params, grads and every state tensor, for "nothing was written" checks."""
    snap: Dict[str, Any] = {"params": [bits(p) if p.is_floating_point() else p.detach().clone() for p in params],
                            "grads": [None if p.grad is None else
                                      (p.grad.to_dense() if p.grad.is_sparse else p.grad.detach()).clone()
                                      for p in params],
                            "state": {}}
    for i, p in enumerate(params):
        st = opt.state.get(p, None)
        if st is None:
            continue
        snap["state"][i] = {k: (bits(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                                (v.clone() if isinstance(v, torch.Tensor) else v)) for k, v in st.items()}
    return snap


def assert_snapshot_equal(before: Dict[str, Any], after: Dict[str, Any], what: str) -> None:
    for k, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert torch.equal(a, b), f"{what}: param {k} was written"
    for k, (a, b) in enumerate(zip(before["grads"], after["grads"])):
        if a is None or b is None:
            assert a is None and b is None, f"{what}: grad {k} appeared or vanished"
        else:
            assert torch.equal(a.view(INT_VIEW.get(a.dtype, a.dtype)) if a.is_floating_point() else a,
                               b.view(INT_VIEW.get(b.dtype, b.dtype)) if b.is_floating_point() else b), \
                f"{what}: grad {k} was written"
    assert before["state"].keys() == after["state"].keys(), \
        f"{what}: state created for params {sorted(set(after['state']) - set(before['state']))}"
    for i in before["state"]:
        sb, sa = before["state"][i], after["state"][i]
        assert sb.keys() == sa.keys(), f"{what}: state keys of param {i} changed: {sorted(sb)} -> {sorted(sa)}"
        for key in sb:
            if isinstance(sb[key], torch.Tensor):
                assert torch.equal(sb[key], sa[key]), f"{what}: state[{key!r}] of param {i} was written"


# --------------------------------------------------------------------------- error log
#: Largest errors measured by the parity tests, printed at the end of the run
#: (see conftest.pytest_terminal_summary): key -> (abs, rel, test id).
MEASURED: Dict[str, Tuple[float, float, str]] = {}


def record(key: str, stats: Dict[str, Any], test_id: str = "") -> None:
    old = MEASURED.get(key)
    if old is None or stats["abs"] > old[0] or (stats["abs"] == old[0] and stats["rel"] > old[1]):
        MEASURED[key] = (stats["abs"], max(stats["rel"], old[1] if old else 0.0), test_id)
    elif stats["rel"] > old[1]:
        MEASURED[key] = (old[0], stats["rel"], old[2])


def supported_isas() -> List[str]:
    return list(fusedoptim.backend_info()["supported_isas"])


def compiled_isas() -> List[str]:
    return list(fusedoptim.backend_info()["compiled_isas"])


@contextlib.contextmanager
def scalar_cpu():
    """The CPU native path with its scalar variant; the ISA in use is restored after."""
    saved = fusedoptim.get_cpu_isa()
    fusedoptim.set_cpu_isa("scalar")
    try:
        yield
    finally:
        fusedoptim.set_cpu_isa(saved)
