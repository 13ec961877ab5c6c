"""What an optimizer is, declared once: its state streams and their order,
how they are created and checked, for every backend.

An optimizer of this package is a :class:`Spec` (a declaration) plus its
update math in ``csrc/common/update_math.h``. The spec says:

- ``kernel``: the native kernel family (``"adam"`` or ``"sgd"``) the
  backends call;
- ``streams``: the per-element state tensors, named and ordered once; that
  order is the kernels' argument order and the cached plans' table order.
  A stream exists for a group when its ``when`` holds; it starts as zeros,
  or (``init="grad"``) is filled by the kernel from the grad on its first
  step, as torch's SGD does with ``buf = grad``;
- ``torch_step``: torch keeps a float32 ``step`` per param (Adam);
- ``sparse_error``: the error torch raises for sparse grads, or None when
  torch's own implementation takes them (SGD);
- ``hyper``: the group's hyperparameters, validated (torch's messages);
- ``traced_step``: one group's step as torch.compile traces it
  (:mod:`fusedoptim._compile`).

The precision options (:mod:`fusedoptim._precision`) add one stream (fp32
master weights or the Kahan compensation) after the spec's own, set the
streams' dtypes, and may add a ``step`` counter (stochastic rounding).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._compile import kernel_ok
from ._precision import MOMENT_OF, QUANT_KEYS, SCALE_KEYS, Options
from ._tensors import local, step_dtype

__all__ = ["GradMismatchError", "Spec", "StateMismatchError", "Stream", "in_range", "number"]


class GradMismatchError(RuntimeError, ValueError):
    """A grad that does not match its param (shape, dtype or device): a
    RuntimeError, as torch raises for it, and a ValueError, as this package
    raised before."""


class StateMismatchError(RuntimeError, ValueError):
    """A state tensor that does not fit its param (shape, or a dtype or
    device torch's step would fail on): a RuntimeError, as torch's step
    raises for it, and a ValueError, as this package raised before."""


class Stream(NamedTuple):
    """One per-element state tensor of an optimizer."""

    key: str
    #: Whether a group has this stream (None: every group).
    when: Optional[Callable[[Dict[str, Any]], bool]] = None
    #: "zeros", or "grad": the kernel fills it from the grad on its first step.
    init: str = "zeros"


def number(value: Any, name: str) -> float:
    """A hyperparameter as a Python float (a 1-element tensor allowed); NaN rejected."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}") from None
    if out != out:
        raise ValueError(f"Invalid {name}: nan")
    return out


def in_range(value: Any, name: str, upper: float = math.inf) -> Any:
    """The domain rule of most hyperparameters, torch's message: ``0 <= value < upper``.

    A plain comparison (it also rejects NaN), so that it holds for a traced
    symbolic float under torch.compile as for a float.
    """
    if not 0.0 <= value < upper:
        raise ValueError(f"Invalid {name}: {value}")
    return value


def checked(value: Any, name: str, upper: float = math.inf) -> float:
    """:func:`number`, then :func:`in_range`."""
    return in_range(number(value, name), name, upper)


class Spec:
    """The declaration of one optimizer; see the module docstring."""

    def __init__(self, name: str, kernel: str, streams: Tuple[Stream, ...], hyper: Callable[[Dict[str, Any]], Any],
                 traced_step: Callable[[Any, Dict[str, Any]], None], *, torch_step: bool,
                 sparse_error: Optional[str] = None, grads_of_any_dtype: bool = False) -> None:
        self.name = name
        self.kernel = kernel
        self.streams = streams
        self.hyper = hyper
        self.traced_step = traced_step
        self.torch_step = torch_step
        self.sparse_error = sparse_error
        #: Whether torch's step takes a grad of another dtype than its param
        #: (as a param's ``grad_dtype`` allows in newer torch): such params
        #: run torch's step. Otherwise the mismatch raises
        #: :class:`GradMismatchError`.
        self.grads_of_any_dtype = grads_of_any_dtype
        self._grad_init = {s.key for s in streams if s.init == "grad"}

    # -- the streams ----------------------------------------------------------
    def own_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The spec's own state streams of the group, in kernel order (the
        functional layer's: no precision options)."""
        return tuple(s.key for s in self.streams if s.when is None or s.when(group))

    def keys(self, group: Dict[str, Any], opts: Options) -> Tuple[str, ...]:
        """The group's state streams, in kernel order: the spec's, then the options' extra one."""
        keys = self.own_keys(group)
        return keys + (opts.extra_key,) if opts.extra_key else keys

    def uses_step(self, opts: Optional[Options]) -> bool:
        """Whether params keep a float32 ``step`` the kernels count (``opts``
        None: no precision options)."""
        return self.torch_step or (opts is not None and opts.stochastic_rounding)

    def step_dtype(self, group: Dict[str, Any]) -> torch.dtype:
        """The dtype of a new ``step``: torch's for its own counter (float32,
        or float64 under a float64 default dtype unless ``fused``); float32
        for the counter of stochastic rounding."""
        return step_dtype(bool(group.get("fused"))) if self.torch_step else torch.float32

    def keeps_state(self, group: Dict[str, Any], opts: Options) -> bool:
        """Whether params of the group have state at all (SGD without momentum keeps none)."""
        return bool(self.keys(group, opts)) or self.uses_step(opts)

    # -- checks (phase 1: nothing is written) -----------------------------------
    def check_grad(self, i: int, p: Tensor, g: Tensor, gi: Optional[int] = None) -> None:
        """A grad must match its param (param ``i`` of group ``gi``), or raise
        :class:`GradMismatchError` (torch's errors for sparse grads)."""
        where = f"param {i}" if gi is None else f"param {i} of group {gi}"
        if g.layout != torch.strided and self.sparse_error is not None:
            raise RuntimeError(self.sparse_error)
        if g.shape != p.shape:
            raise GradMismatchError(f"grad of {where} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}")
        if g.layout != torch.strided:
            return  # sparse grads are torch's business (its SGD supports them)
        if g.dtype != p.dtype and not self.grads_of_any_dtype:
            raise GradMismatchError(f"grad of {where} has dtype {g.dtype} but the param has dtype {p.dtype}")
        if g.device != p.device:
            raise GradMismatchError(f"grad of {where} is on {g.device} but the param is on {p.device}")

    def check_state(self, i: int, p: Tensor, state: Dict[str, Any], keys: Tuple[str, ...],
                    opts: Optional[Options] = None) -> None:
        """Existing state must fit its param, else torch's code would fail midway.
        With ``opts``, ``keys`` are the param's own (8-bit states: codes and
        scales), and state of the other layout is an error too."""
        for key in keys:
            t = state.get(key)
            if t is None and (key not in state or key in self._grad_init):
                # Missing, it is created; None is torch's own "not yet" only
                # for a buffer filled from the grad (SGD's momentum_buffer).
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"state[{key!r}] of param {i} must be a Tensor, got {type(t).__name__}")
            if opts is not None and key in SCALE_KEYS:
                expect = opts.key_shape(p, key)
                if tuple(local(t).shape) != expect:
                    raise ValueError(f"state[{key!r}] of param {i} has shape {tuple(t.shape)}, expected {expect}: "
                                     f"one scale per block of {opts.block} elements")
            elif t.shape != p.shape:
                raise StateMismatchError(
                    f"state[{key!r}] of param {i} has shape {tuple(t.shape)} but the param has {tuple(p.shape)}"
                )
        if opts is not None:
            if opts.quantizes(p):  # full moments where the kernels take codes
                other = [k for k in state if k in QUANT_KEYS and QUANT_KEYS[k][0] in keys]
            else:  # codes or scales where the kernels take full moments
                other = [k for k in state if k in MOMENT_OF]
            if other:
                held = "8-bit" if opts.quantizes(p) else "full-precision"
                raise ValueError(
                    f"state of param {i} holds {other[0]!r}, but its group keeps {held} moments "
                    f"(state_bits={opts.state_bits}, min_quantized_numel={opts.min_quantized}): load_state_dict "
                    "converts a checkpoint between the two layouts; state set by hand must match"
                )

    def check_torch_state(self, i: int, p: Tensor, g: Tensor, state: Dict[str, Any], keys: Tuple[str, ...]) -> None:
        """Existing state that torch's own implementation will be given must be
        in the layout torch creates (and its ``load_state_dict`` casts to): each
        stream of the param's dtype (or of its grad's, which torch's SGD copies
        into its buffer), on its device. On anything else torch's step raises
        midway (after counting the step) or not, op by op (an Adam ``exp_avg``
        of another dtype fails its ``lerp_``; an ``exp_avg_sq`` passes); this
        takes torch's own layout only and raises :class:`StateMismatchError`
        for the rest, with nothing written."""
        for key in keys:
            t = state.get(key)
            if isinstance(t, Tensor) and (t.dtype not in (p.dtype, g.dtype) or t.device != p.device):
                raise StateMismatchError(
                    f"state[{key!r}] of param {i} is {t.dtype} on {t.device} but the param is {p.dtype} on "
                    f"{p.device}; the param runs torch's implementation, which fusedoptim gives state only "
                    f"in the layout torch creates: the param's dtype and device, as load_state_dict casts it"
                )

    def state_usable(self, p: Tensor, state: Dict[str, Any], keys: Tuple[str, ...], opts: Optional[Options],
                     cuda: bool = False) -> bool:
        """Whether existing state is in the layout the kernels take: streams
        beside the param, contiguous, in the options' dtypes (``opts`` None,
        the functional layer's: the param's dtype); step counters scalars on
        the host, float32 (or, for an optimizer, float64 for torch's own), or
        for the CUDA kernels and torch's own counters float32 on the param's
        device (capturable / fused)."""
        if self.uses_step(opts):
            step = state.get("step")
            if step is not None or self.torch_step:
                host = (torch.float32, torch.float64) if self.torch_step and opts is not None else (torch.float32,)
                if not (isinstance(step, Tensor) and step.dtype in host and step.numel() == 1
                        and not step.requires_grad):
                    return False
                on_device = cuda and self.torch_step and step.device == p.device and step.dtype == torch.float32
                if step.device.type != "cpu" and not on_device:
                    return False
        shard = local(p)
        for key in keys:
            t = state.get(key)
            dtype = p.dtype if opts is None else opts.key_dtype(p, key)
            shape = opts.key_shape(p, key) if opts is not None and key in SCALE_KEYS else tuple(shard.shape)
            if t is not None and not (isinstance(t, Tensor) and t.dtype == dtype
                                      and t.device == p.device and local(t).is_contiguous()
                                      and tuple(local(t).shape) == shape):
                return False
        return True

    def split(self, params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]], keys: Tuple[str, ...],
              native_ok: bool) -> Tuple[List[int], List[int]]:
        """The functional steps' routing (lists of tensors, no optimizer):
        every grad and state checked as the optimizers check them, then the
        positions the native op takes and those left to torch."""
        native: List[int] = []
        fallback: List[int] = []
        for i, (p, g, state) in enumerate(zip(params, grads, states)):
            self.check_grad(i, p, g)
            if state:
                self.check_state(i, p, state, keys)
            # No Options object here: torch.compile traces this, and torch 2.5's
            # tracer cannot read a property of a NamedTuple subclass.
            usable = native_ok and kernel_ok(p, g) and self.state_usable(p, state, keys, None)
            if not usable and state:
                self.check_torch_state(i, p, g, state, keys)
            (native if usable else fallback).append(i)
        return native, fallback

    # -- creation (phase 2) ------------------------------------------------------
    def init_state(self, p: Tensor, state: Dict[str, Any], keys: Tuple[str, ...], opts: Options,
                   step_on_device: bool = False, step_dtype: torch.dtype = torch.float32) -> bool:
        """Create the missing state of ``p`` in torch's layout (in the options'
        dtypes). Returns whether a stream is filled from the grad this step.

        torch's own ``step`` comes first, as torch creates it; a counter that
        only stochastic rounding needs comes last.
        """
        if self.torch_step and "step" not in state:
            state["step"] = (torch.zeros((), dtype=step_dtype, device=p.device) if step_on_device
                             else torch.tensor(0.0, dtype=step_dtype))
        first = False
        for key in keys:
            if state.get(key) is not None:
                continue
            if key in SCALE_KEYS:
                state[key] = torch.zeros(opts.key_shape(p, key), dtype=torch.float32, device=p.device)
            elif key in MOMENT_OF:  # 8-bit codes: zeros, or filled from the grad on the first step
                state[key] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
                first = first or MOMENT_OF[key] in self._grad_init
            elif key in self._grad_init:
                state[key] = torch.empty_like(p, dtype=opts.moment_dtype(p), memory_format=torch.preserve_format)
                first = True
            elif key == "master_param":
                state[key] = p.detach().to(dtype=torch.float32, memory_format=torch.preserve_format, copy=True)
            else:
                state[key] = torch.zeros_like(p, dtype=opts.key_dtype(p, key), memory_format=torch.preserve_format)
        if not self.torch_step and opts.stochastic_rounding and "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # the random keys count steps
        return first

    def grad_init_missing(self, state: Dict[str, Any], keys: Tuple[str, ...]) -> bool:
        """Whether a stream filled from the grad has yet to be created."""
        return any(k in self._grad_init and state.get(k) is None for k in keys)
