"""Precision options beyond torch.optim, shared by Adam, AdamW and SGD.

Every option is off by default, so the defaults keep torch's results and
state layout. See Note [precision options] in csrc/common/precision.h for the
math; this module decides, per param group and param, which storage layout
the kernels run with, and which extra state it needs.

=======================  ===================  ========================================
option                   params               state
=======================  ===================  ========================================
``master_weights``       bfloat16, float16    ``master_param`` (float32); moments fp32
``stochastic_rounding``  bfloat16             ``step`` (SGD too); seed in the group
``kahan_summation``      bfloat16, float16    ``kahan_comp`` (param dtype)
``state_dtype``          float32 (bfloat16)   moments / momentum buffer in bfloat16
``max_grad_norm``        any                  none (``last_grad_norm`` on the optimizer)
=======================  ===================  ========================================
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from . import _C

#: The options and their defaults (off): keys of ``defaults`` and of every group.
OPTION_DEFAULTS: Dict[str, Any] = {
    "master_weights": False,
    "stochastic_rounding": False,
    "kahan_summation": False,
    "state_dtype": None,
    "max_grad_norm": None,
}

#: State keys that exist only with an option.
EXTRA_KEYS = ("master_param", "kahan_comp")

#: Keys of the moments whose dtype ``state_dtype``/``master_weights`` set.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

_LOW = (torch.bfloat16, torch.float16)


class Options(NamedTuple):
    """The precision options of one param group."""

    master_weights: bool = False
    stochastic_rounding: bool = False
    kahan_summation: bool = False
    state_dtype: Optional[torch.dtype] = None
    max_grad_norm: Optional[float] = None
    seed: int = 0

    @property
    def per_param(self) -> bool:
        """Whether the kernels need another layout than torch's."""
        return (self.master_weights or self.stochastic_rounding or self.kahan_summation
                or self.state_dtype is not None)

    @property
    def active(self) -> bool:
        return self.per_param or self.max_grad_norm is not None

    @property
    def store(self) -> int:
        if self.master_weights:
            return _C.STORE_MASTER
        if self.stochastic_rounding:
            return _C.STORE_STOCHASTIC
        if self.kahan_summation:
            return _C.STORE_KAHAN
        return _C.STORE_PLAIN

    @property
    def extra_key(self) -> Optional[str]:
        if self.master_weights:
            return "master_param"
        if self.kahan_summation:
            return "kahan_comp"
        return None

    @property
    def state_code(self) -> int:
        """The moments' dtype code for the kernels, -1 for "the param's"."""
        if self.master_weights:
            return _C.DTYPE_FLOAT32
        if self.state_dtype == torch.bfloat16:
            return _C.DTYPE_BFLOAT16
        return -1

    def moment_dtype(self, p: Tensor) -> torch.dtype:
        """dtype of exp_avg, exp_avg_sq, max_exp_avg_sq and momentum_buffer for param p."""
        if self.master_weights:
            return torch.float32
        if self.state_dtype is not None:
            return self.state_dtype
        return p.dtype

    def key_dtype(self, p: Tensor, key: str) -> torch.dtype:
        if key == "master_param":
            return torch.float32
        if key == "kahan_comp":
            return p.dtype
        return self.moment_dtype(p)


def draw_seed() -> int:
    """A stochastic-rounding seed from torch's default generator (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def check_options(opts: Dict[str, Any]) -> None:
    """Validate option values (not yet against params): ValueError/TypeError."""
    for name in ("master_weights", "stochastic_rounding", "kahan_summation"):
        if not isinstance(opts[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(opts[name]).__name__}")
    chosen = [n for n in ("master_weights", "stochastic_rounding", "kahan_summation") if opts[n]]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} cannot be combined: each decides how the param is stored "
            "(master_weights keeps an fp32 copy, stochastic_rounding rounds at random, "
            "kahan_summation carries the rounding error); choose one"
        )
    sd = opts["state_dtype"]
    if sd not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {sd!r}")
    if sd == torch.bfloat16 and opts["master_weights"]:
        raise ValueError("state_dtype=torch.bfloat16 cannot be combined with master_weights=True "
                         "(master weights keep float32 states)")
    mgn = opts["max_grad_norm"]
    if mgn is not None:
        if isinstance(mgn, bool) or not isinstance(mgn, (int, float)):
            raise TypeError(f"max_grad_norm must be a float or None, got {type(mgn).__name__}")
        if not (math.isfinite(mgn) and mgn > 0):
            raise ValueError(f"Invalid max_grad_norm: {mgn} (must be positive and finite)")


def check_param(o: Options, p: Tensor, where: str) -> None:
    """ValueError when param p cannot take the group's options."""
    dt = p.dtype
    if o.master_weights and dt not in _LOW:
        raise ValueError(
            f"master_weights=True needs bfloat16 or float16 params, but {where} is {dt}: "
            "put float32 params in a param group with master_weights=False"
        )
    if o.stochastic_rounding and dt != torch.bfloat16:
        raise ValueError(
            f"stochastic_rounding=True needs bfloat16 params, but {where} is {dt}: "
            "put other params in a param group with stochastic_rounding=False"
        )
    if o.kahan_summation and dt not in _LOW:
        raise ValueError(
            f"kahan_summation=True needs bfloat16 or float16 params, but {where} is {dt}: "
            "put float32 params in a param group with kahan_summation=False"
        )
    sd = o.state_dtype
    if sd is not None and not o.master_weights:
        if sd == torch.bfloat16 and dt not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype=torch.bfloat16 needs float32 (or bfloat16) params, but {where} is {dt}")
        if sd == torch.float32 and dt != torch.float32:
            raise ValueError(
                f"state_dtype=torch.float32 with {dt} params ({where}) needs master_weights=True"
            )


def check_group(o: Options, group: Dict[str, Any], gi: int) -> None:
    for j, p in enumerate(group["params"]):
        if isinstance(p, Tensor):
            check_param(o, p, f"param {j} of group {gi}")
