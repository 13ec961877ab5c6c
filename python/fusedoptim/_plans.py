"""The step plans of param groups: routing plus pointer tables, cached.

A :class:`GroupPlan` is a group's :class:`~fusedoptim._routing.Route` with
the tables the backends call with, built once the missing state exists
(phase 2 of a step). A group updated by one backend alone also gets a
:class:`fusedoptim._C.StepPlan` (Note [cached step plans] in
csrc/bindings/step_plan.h): from the next step on it checks itself from C
(the same params, addresses, sizes, dtypes and contiguity, the same grads
present, the same ``optimizer.state`` entries and state tensors) and reads
the grads' addresses; only when something changed does the step route the
group again. A step over thousands of small tensors then costs one
``collect`` and one run call per group.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import _C
from ._routing import Route
from ._precision import SCALE_KEYS
from ._spec import Spec
from ._tensors import DTYPE_CODES, STEP_CODES, address, grad_addresses, local
from .backends import StepArgs, Tables, cpu, cuda

__all__ = ["CudaBuild", "GroupPlan", "build_cpu", "build_cuda", "group_values", "run_cpu", "run_cpu_cached", "run_cuda",
           "undo"]


class GroupPlan:
    """Routing and tables of one param group, valid while unchanged."""

    __slots__ = ("route", "tables", "cpu_plan", "cuda_plan", "cuda_tables", "mode", "fast")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.tables: List[Tables] = []  # one CPU kernel call each
        self.cpu_plan: Optional[_C.StepPlan] = None  # all-CPU groups: the tables, checked and run from C
        self.cuda_plan: Optional[_C.StepPlan] = None  # all-CUDA groups: checks and grad addresses from C
        self.cuda_tables: List[Tables] = []  # the launches the cuda_plan feeds
        self.mode = cuda.mode()  # a plan holds to the mode it was built in (CUDA emulated or not)
        # (group_values, hyper, "cpu"/"cuda", mode) of the last step that ran the cached plan.
        self.fast: Optional[tuple] = None

    @property
    def opts(self) -> Any:
        return self.route.opts

    def cached(self, spec: Spec, group: Dict[str, Any], opts: Any) -> Optional[str]:
        """Which cached plan may run this group ("cpu", "cuda" or None), if still current."""
        r = self.route
        if r.opts != opts or r.keys != spec.keys(group, opts) or self.mode != cuda.mode():
            return None
        if self.cpu_plan is not None and not r.torch and not r.cuda:
            return "cpu"
        if self.cuda_plan is not None:
            return "cuda"
        return None

    def release(self) -> None:
        """Drop the grad references a ``collect()`` took."""
        if self.cpu_plan is not None:
            self.cpu_plan.release()
        if self.cuda_plan is not None:
            self.cuda_plan.release()


_PLAIN = (float, int, bool, str, type(None), torch.dtype)


def group_values(group: Dict[str, Any]) -> Optional[tuple]:
    """The group's settings (every key but ``params``) as a tuple that ``==``
    compares exactly, or None when one is not a plain value (a tensor lr can
    change in place, so a group with one is checked in full every step)."""
    out = []
    for k, v in group.items():
        if k == "params":
            continue
        if type(v) is tuple:
            if not all(type(x) in _PLAIN for x in v):
                return None
        elif type(v) not in _PLAIN:
            return None
        out.append(k)
        out.append(v)
    return tuple(out)


def _positions(param_groups: Sequence[Dict[str, Any]]) -> Dict[int, int]:
    """id(param) -> its position in the optimizer, over all groups in order
    (the tensor id of stochastic rounding; stable across state_dicts)."""
    out: Dict[int, int] = {}
    for g in param_groups:
        for p in g["params"]:
            out.setdefault(id(p), len(out))
    return out


def _fill(t: Tables, p: Tensor, i: int, state: Dict[str, Any], keys: Sequence[str], uses_step: bool, first: bool,
          pid: int) -> None:
    """Add param ``p`` (position ``i``) and its state to the tables, every
    address checked against what the kernel touches (Note [addresses])."""
    shard = local(p)
    n = shard.numel()
    device = shard.device
    opts = t.opts
    t.params.append(p)
    t.numels.append(n)
    t.pptrs.append(address(p, f"param {i}", p.dtype, n, device))
    for k in keys:
        numel = n if k not in SCALE_KEYS else opts.key_shape(p, k)[0]
        t.streams[k].append(address(state.get(k), f"state[{k!r}] of param {i}", opts.key_dtype(p, k), numel, device))
    if uses_step:
        step_device = device if t.device_steps else "cpu"
        step_dtype = torch.float64 if t.step_code == _C.DTYPE_FLOAT64 else torch.float32
        t.steps.append(address(state.get("step"), f"state['step'] of param {i}", step_dtype, 1, step_device))
    t.first.append(first)
    t.ids.append(pid)


def _native_plan(params: Any, state_all: Any, keys: Sequence[str], uses_step: bool,
                 entries: List[tuple]) -> Optional["_C.StepPlan"]:
    """A C plan over ``entries`` (tables, index in tables, position, state)."""
    b = _C.StepPlanBuilder(params, state_all, list(keys), uses_step)
    for t, j, i, state in entries:
        b.add(i, t.params[j], state, t.code, t.numels[j], t.pptrs[j],
              [t.streams[k][j] if k in t.streams else 0 for k in keys],
              t.steps[j] if uses_step else 0, t.first[j], t.ids[j], step_dtype=t.step_code)
    return b.build()


def _state_of(state_all: Any, p: Tensor, journal: List[tuple]) -> Dict[str, Any]:
    """``optimizer.state[p]``, created empty if missing (and journaled)."""
    if p not in state_all:
        journal.append((state_all, p))
    return state_all[p]


def _init_state(spec: Spec, p: Tensor, state: Dict[str, Any], keys: Sequence[str], opts: Any, journal: List[tuple],
                **kw: Any) -> bool:
    """:meth:`Spec.init_state`, with the entries it creates journaled."""
    had = set(state)
    first = spec.init_state(p, state, keys, opts, **kw)
    journal.extend((state, k) for k in list(state) if k not in had)
    return first


def undo(journal: List[tuple]) -> None:
    """Remove the state entries a failed build created, newest first: the
    optimizer's state is then exactly as before the step."""
    for d, k in reversed(journal):
        d.pop(k, None)
    journal.clear()


def build_cpu(plan: GroupPlan, spec: Spec, opt: Any, group: Dict[str, Any], ps: List[Tensor],
              journal: List[tuple]) -> None:
    """Phase 2 for the CPU params: create missing state (each new entry
    recorded in ``journal``), fill the tables, and cache a C plan when the
    group is a plain list of unsharded params. Writes no param."""
    r = plan.route
    keys, opts = r.keys, r.opts
    state_all = opt.state
    keeps = spec.keeps_state(group, opts)
    uses_step = spec.uses_step(opts)
    position = _positions(opt.param_groups) if opts.stochastic_rounding else {}
    entries = []
    sharded = False
    plan.tables = []
    step_dtype = spec.step_dtype(group)
    for (code, step_code, quant), index in r.cpu.items():  # (tables of one dtype side by side: route)
        t = Tables(code, opts, step_code=step_code)
        t.quant = quant
        t.index = list(index)
        tkeys = opts.param_keys(ps[index[0]], keys) if quant else keys
        t.streams = {k: [] for k in tkeys}
        for j, i in enumerate(index):
            p = ps[i]
            # Touch optimizer.state only where torch would keep state.
            state = _state_of(state_all, p, journal) if keeps else {}
            first = _init_state(spec, p, state, tkeys, opts, journal, step_dtype=step_dtype)
            _fill(t, p, i, state, tkeys, uses_step, first, position.get(id(p), 0))
            sharded = sharded or local(p) is not p
            entries.append((t, j, i, state))
        plan.tables.append(t)
    plan.cpu_plan = None
    # Sharded params take the general path every step: the C plan checks
    # params by their own addresses, which a DTensor does not have.
    if plan.tables and isinstance(group["params"], list) and not sharded:
        if opts.state_bits is None:
            plan.cpu_plan = _native_plan(group["params"], state_all, keys, uses_step, entries)
        else:
            # 8-bit states: the tables' keys differ (codes and scales where a
            # tensor is quantized). The plan checks the union of them (a key
            # a param does not use stays absent) and reads the grads; the
            # tables run as they are (run_cpu_cached).
            union = list(dict.fromkeys(k for t in plan.tables for k in t.streams))
            lo = 0
            for t in plan.tables:
                t.lo, t.hi = lo, lo + len(t.index)
                lo = t.hi
            plan.cpu_plan = _native_plan(group["params"], state_all, union, uses_step, entries)


def run_cpu_cached(plan: GroupPlan, spec: Spec, hyper: Any, args: StepArgs) -> None:
    """A cached CPU group whose tables run from Python (8-bit states): the
    grads' addresses from the C plan's ``collect()``."""
    gptrs = plan.cpu_plan.take_grad_ptrs()  # type: ignore[union-attr]
    for t in plan.tables:
        cpu.run(spec.kernel, t, gptrs[t.lo:t.hi], hyper, args)
        if any(t.first):
            t.first = [False] * len(t.first)


def run_cpu(plan: GroupPlan, spec: Spec, gs: List[Tensor], hyper: Any, args: StepArgs) -> None:
    """The general CPU path: one kernel call per table, grads read now."""
    addrs = [grad_addresses([gs[i] for i in t.index], t.params) for t in plan.tables]
    for t, addr in zip(plan.tables, addrs):
        cpu.run(spec.kernel, t, addr.ptrs, hyper, args)
        if any(t.first):
            t.first = [False] * len(t.first)
    del addrs
    if plan.cpu_plan is not None:
        plan.cpu_plan.clear_first()


class CudaBuild:
    """What :func:`build_cuda` made for :func:`run_cuda`: the launches' tables,
    the state of each param, and the step's args (its inf flag read when a
    first step must know whether it happens)."""

    __slots__ = ("tables", "states", "args")

    def __init__(self, tables: List[Tables], states: Dict[int, Dict[str, Any]], args: StepArgs) -> None:
        self.tables = tables
        self.states = states
        self.args = args


def build_cuda(plan: GroupPlan, spec: Spec, opt: Any, group: Dict[str, Any], ps: List[Tensor], args: StepArgs,
               journal: List[tuple]) -> Optional[CudaBuild]:
    """Phase 2 for the CUDA params of a group: create missing state (torch's
    layout; each new entry recorded in ``journal``) and fill the tables.
    None when the step is skipped (AMP found an inf). Writes no param."""
    r = plan.route
    keys, opts = r.keys, r.opts
    state_all = opt.state
    def keys_of(p: Tensor) -> Sequence[str]:
        return opts.param_keys(p, keys) if opts.state_bits is not None else keys

    if args.found_inf is not None and (
        any(spec.grad_init_missing(state_all.get(ps[i], {}), keys_of(ps[i])) for i in r.cuda)
        or (opts.stochastic_rounding and not spec.torch_step)
    ):
        # A first step fills buffers from the grad, and host counters count
        # steps: whether the step happens must be known now (one host sync;
        # for buffers, on their first step only). A skipped step creates nothing.
        if bool(args.found_inf.item()):
            return None
        args = StepArgs(args.threads, args.grad_scale, None, args.clip)
    keeps = spec.keeps_state(group, opts)
    uses_step = spec.uses_step(opts)
    # Step counters on the param's device with capturable=True or fused=True.
    step_on_device = spec.torch_step and bool(group.get("capturable") or group.get("fused"))
    position = _positions(opt.param_groups) if opts.stochastic_rounding else {}
    step_dtype = spec.step_dtype(group)
    batches: Dict[tuple, Tables] = {}
    states: Dict[int, Dict[str, Any]] = {}
    for i in r.cuda:
        p = ps[i]
        state = _state_of(state_all, p, journal) if keeps else {}
        pkeys = keys_of(p)  # 8-bit states: codes and scales where p is quantized
        first = _init_state(spec, p, state, pkeys, opts, journal, step_on_device=step_on_device,
                            step_dtype=step_dtype)
        step = state.get("step") if spec.torch_step else None
        # Counters a kernel increments on the device are float32; others are counted on the host.
        device_steps = step is not None and step.dtype == torch.float32 and (
            step.device.type != "cpu" or (step_on_device and cuda.on_device(step)))
        step_code = STEP_CODES[step.dtype] if step is not None else _C.DTYPE_FLOAT32
        quant = tuple(pkeys) != tuple(keys)
        key = (DTYPE_CODES[p.dtype], str(p.device), device_steps, step_code, quant)
        t = batches.get(key)
        if t is None:
            t = batches[key] = Tables(key[0], opts, p.device, device_steps, step_code)
            t.quant = quant
            t.streams = {k: [] for k in pkeys}
        t.index.append(i)
        _fill(t, p, i, state, pkeys, uses_step, first, position.get(id(p), 0))
        states[i] = state
    # Batches of one dtype side by side (a C plan's buckets are runs of one dtype).
    return CudaBuild([batches[k] for k in sorted(batches, key=lambda k: k[0])], states, args)


def run_cuda(plan: GroupPlan, spec: Spec, opt: Any, group: Dict[str, Any], ps: List[Tensor], gs: List[Tensor],
             built: CudaBuild, hyper: Any) -> None:
    """Launch the CUDA params of a group, and cache a plan when the whole group is CUDA."""
    r = plan.route
    args = built.args
    addrs = [grad_addresses([gs[i] for i in t.index], t.params) for t in built.tables]
    for t, addr in zip(built.tables, addrs):
        cuda.launch(spec.kernel, t, addr.ptrs, hyper, args)
        if args.grad_scale is not None:
            addr.write_back()
        t.first = [False] * len(t.first)
    del addrs
    plan.cuda_plan = None
    if not r.cpu and not r.torch:
        _cache_cuda(plan, group, ps, built.tables, built.states, r.keys, spec.uses_step(r.opts), opt.state)


def _cache_cuda(plan: GroupPlan, group: Dict[str, Any], ps: List[Tensor], tables: List[Tables],
                states: Dict[int, Dict[str, Any]], keys: Sequence[str], uses_step: bool, state_all: Any) -> None:
    """Cache a group that is all CUDA, unless a param is sharded (the C plan
    checks params by their own addresses) or its state is incomplete (e.g.
    SGD buffers that a skipped first step did not create)."""
    if not tables or not isinstance(group["params"], list):
        return
    step = ("step",) if uses_step else ()
    entries = []
    lo = 0
    for t in tables:
        tracked = tuple(t.streams) + step  # a table's own keys (8-bit states: codes and scales where quantized)
        for j, i in enumerate(t.index):
            state = states[i]
            if local(ps[i]) is not ps[i] or any(state.get(k) is None for k in tracked):
                return
            entries.append((t, j, i, state))
        t.lo, t.hi = lo, lo + len(t.index)
        lo = t.hi
    union = list(dict.fromkeys(k for t in tables for k in t.streams))  # (== keys without 8-bit states)
    plan.cuda_plan = _native_plan(group["params"], state_all, union, uses_step, entries)
    plan.cuda_tables = tables


def run_cuda_cached(plan: GroupPlan, spec: Spec, hyper: Any, args: StepArgs) -> None:
    """A cached all-CUDA group: the grads' addresses from the C plan's collect()."""
    gptrs = plan.cuda_plan.take_grad_ptrs()  # type: ignore[union-attr]
    for t in plan.cuda_tables:
        cuda.launch(spec.kernel, t, gptrs[t.lo:t.hi], hyper, args)

