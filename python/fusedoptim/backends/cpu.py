"""The CPU backend: the calls into the CPU kernels, and the grad norm.

A call takes :class:`~fusedoptim.backends.Tables` (one per param group and
dtype) and the step's :class:`~fusedoptim.backends.StepArgs`; a group whose
tables are cached runs from its :class:`fusedoptim._C.StepPlan` instead
(Note [cached step plans] in csrc/bindings/step_plan.h). The kernel variant
(scalar, AVX2, AVX-512) is chosen inside the compiled module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _C
from .._precision import Options
from .._tensors import DTYPE_CODES, address, disjoint, grad_addresses
from . import StepArgs, Tables

__all__ = ["grad_norm", "name", "run", "run_plan", "run_tensors"]


def name() -> str:
    """This backend's name in ``optimizer.last_backends``: ``native-cpu/<isa>``."""
    return f"native-cpu/{_C.get_cpu_isa()}"


def _options(opts: Any, clip: Any) -> Dict[str, Any]:
    """Keyword arguments of the options common to a call and a plan run."""
    return {"state_dtype": opts.state_code, "store": opts.store, "seed": opts.seed,
            "grad_mul": 1.0 if clip is None else clip}


def run(kernel: str, t: Tables, gptrs: List[int], h: Any, args: StepArgs) -> None:
    """One call of ``kernel`` ("adam" or "sgd") over tables ``t``."""
    kw: Dict[str, Any] = {}
    o = t.opts
    if o.active:
        kw = _options(o, args.clip)
        if o.extra_key is not None:
            kw["extras"] = t.streams[o.extra_key]
        if o.stochastic_rounding:
            kw["tensor_ids"] = t.ids
            if kernel == "sgd":
                kw["steps"] = t.steps
    s = t.streams
    m, v, b = "exp_avg", "exp_avg_sq", "momentum_buffer"
    if t.quant:  # Note [8-bit states]: codes in place of the moments, plus their scales
        m, v, b = "exp_avg_codes", "exp_avg_sq_codes", "momentum_buffer_codes"
        kw["state_dtype"] = _C.DTYPE_QUANT8
        kw["block_size"] = o.block
        if kernel == "adam":
            kw["exp_avg_scales"] = s["exp_avg_scale"]
            kw["exp_avg_sq_scales"] = s["exp_avg_sq_scale"]
        elif h.momentum != 0:
            kw["momentum_scales"] = s["momentum_buffer_scale"]
    if kernel == "adam":
        if t.step_code != _C.DTYPE_FLOAT32:
            kw["step_dtype"] = t.step_code  # torch's float64 counters
        _C.adam_step(
            t.pptrs, gptrs, s[m], s[v], s.get("max_exp_avg_sq"), t.steps, t.numels, t.code,
            float(h.lr), h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.amsgrad, h.maximize, args.threads,
            **kw,
        )
    else:
        momentum = h.momentum != 0
        _C.sgd_step(
            t.pptrs, gptrs, s[b] if momentum else None, t.first if momentum else None, t.numels,
            t.code, h.lr, h.weight_decay, h.momentum, h.dampening, h.nesterov, h.maximize, args.threads, **kw,
        )


def run_plan(kernel: str, plan: "_C.StepPlan", h: Any, opts: Any, args: StepArgs) -> None:
    """Run a cached plan that a successful ``collect()`` made ready."""
    kw = _options(opts, args.clip) if opts.active else {}
    if kernel == "adam":
        plan.run_adam(float(h.lr), h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.amsgrad, h.maximize,
                      args.threads, **kw)
    else:
        plan.run_sgd(h.lr, h.weight_decay, h.momentum, h.dampening, h.nesterov, h.maximize, args.threads, **kw)


def grad_norm(ptrs: List[int], numels: List[int], codes: List[int], max_norm: float,
              threads: int) -> Tuple[Tensor, float]:
    """The global norm of CPU grads (a 0-d float32 tensor, as
    ``clip_grad_norm_`` returns it) and the clip coefficient, summed in the
    fixed order of Note [precision options]: the same bits for any thread
    count and CPU variant."""
    norm, coef = _C.clip_coef(_C.grad_norm_sq(ptrs, numels, codes, threads), max_norm)
    return torch.tensor(norm, dtype=torch.float32), coef


def run_tensors(kernel: str, params: Sequence[Tensor], grads: Sequence[Tensor], streams: Dict[str, Sequence[Tensor]],
                steps: Optional[Sequence[Tensor]], first: Optional[Sequence[bool]], h: Any, threads: int) -> None:
    """The functional entry: one step of ``kernel`` over lists of CPU tensors.

    Every tensor is checked against what the kernel touches through its
    address (dtype, element count, contiguity, device) before anything is
    written; a strided grad is read through a contiguous copy. Params of one
    dtype go in one call, or one param per call where params share memory
    (updated one after the other, never by threads racing on the shared bytes).
    """
    n = len(params)
    lists = dict(grads=grads, steps=steps, first_step=first, **streams)
    for name_, xs in lists.items():
        if xs is not None and len(xs) != n:
            raise ValueError(f"{name_} has {len(xs)} entries, params has {n}")
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, p in enumerate(params):
        if p.dtype not in DTYPE_CODES:
            raise ValueError(f"params[{i}] has dtype {p.dtype}; the native step takes {list(DTYPE_CODES)}")
        by_dtype.setdefault(p.dtype, []).append(i)
    batches = list(by_dtype.values()) if disjoint(params) else [[i] for i in range(n)]
    calls = []
    for index in batches:
        t = Tables(DTYPE_CODES[params[index[0]].dtype], Options())
        t.streams = {k: [] for k in streams}
        for i in index:
            p = params[i]
            n = p.numel()
            t.pptrs.append(address(p, f"params[{i}]", p.dtype, n, "cpu"))
            for k, xs in streams.items():
                t.streams[k].append(address(xs[i], f"{k}[{i}]", p.dtype, n, "cpu"))
            if steps is not None:
                t.steps.append(address(steps[i], f"state_steps[{i}]", torch.float32, 1, "cpu"))
            t.numels.append(n)
            t.first.append(bool(first[i]) if first is not None else False)
        calls.append((t, grad_addresses([grads[i] for i in index], [params[i] for i in index])))
    # Everything was checked: now write.
    args = StepArgs(threads)
    for t, addr in calls:
        run(kernel, t, addr.ptrs, h, args)
