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
``state_bits=8``         any (CPU)            ``<moment>_codes`` (uint8), ``<moment>_scale``
=======================  ===================  ========================================

8-bit states (Note [8-bit states] in csrc/common/quant8.h) quantize the
moments of tensors with at least ``min_quantized_numel`` elements; smaller
ones keep full states under torch's keys. ``exp_avg_sq_codes`` hold the
root of ``exp_avg_sq``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from ._tensors import local

#: The options and their defaults (off): keys of ``defaults`` and of every group.
OPTION_DEFAULTS: Dict[str, Any] = {
    "master_weights": False,
    "stochastic_rounding": False,
    "kahan_summation": False,
    "state_dtype": None,
    "max_grad_norm": None,
    "state_bits": None,
    "state_block_size": 256,
    "min_quantized_numel": 4096,
}

#: State keys that exist only with an option.
EXTRA_KEYS = ("master_param", "kahan_comp")

#: Keys of the moments whose dtype ``state_dtype``/``master_weights`` set.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

_LOW = (torch.bfloat16, torch.float16)

#: The moments that 8-bit states quantize, and the two state keys of each.
QUANT_KEYS: Dict[str, Tuple[str, str]] = {
    "exp_avg": ("exp_avg_codes", "exp_avg_scale"),
    "exp_avg_sq": ("exp_avg_sq_codes", "exp_avg_sq_scale"),
    "momentum_buffer": ("momentum_buffer_codes", "momentum_buffer_scale"),
}
#: Which 8-bit moments are stored as their square root (the unsigned map).
ROOT_KEYS = ("exp_avg_sq",)
CODE_KEYS = tuple(c for c, _ in QUANT_KEYS.values())
SCALE_KEYS = tuple(s for _, s in QUANT_KEYS.values())
#: key -> the moment it holds a part of.
MOMENT_OF = {k: m for m, pair in QUANT_KEYS.items() for k in pair}


class Options(NamedTuple):
    """The precision options of one param group."""

    master_weights: bool = False
    stochastic_rounding: bool = False
    kahan_summation: bool = False
    state_dtype: Optional[torch.dtype] = None
    max_grad_norm: Optional[float] = None
    seed: int = 0
    state_bits: Optional[int] = None
    block: int = 256
    min_quantized: int = 4096

    @property
    def per_param(self) -> bool:
        """Whether the kernels need another layout than torch's."""
        return (self.master_weights or self.stochastic_rounding or self.kahan_summation
                or self.state_dtype is not None or self.state_bits is not None)

    def quantizes(self, p: Tensor) -> bool:
        """Whether the moments of param ``p`` are 8-bit (its local shard's size decides)."""
        return self.state_bits == 8 and local_numel(p) >= self.min_quantized

    def param_keys(self, p: Tensor, keys: Tuple[str, ...]) -> Tuple[str, ...]:
        """The state keys of param ``p`` for the group's keys: each moment
        that 8-bit states quantize becomes its codes and scale."""
        if not self.quantizes(p):
            return keys
        return tuple(k2 for k in keys for k2 in QUANT_KEYS.get(k, (k,)))

    def key_shape(self, p: Tensor, key: str) -> Tuple[int, ...]:
        """The shape of state ``key`` of ``p`` (its local shard): the param's,
        or one scale per block."""
        shape = tuple(local_shape(p))
        if key in SCALE_KEYS:
            return ((math.prod(shape) + self.block - 1) // self.block,)
        return shape

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
        if key in CODE_KEYS:
            return torch.uint8
        if key in SCALE_KEYS:
            return torch.float32
        if key == "master_param":
            return torch.float32
        if key == "kahan_comp":
            return p.dtype
        return self.moment_dtype(p)


def local_shape(p: Tensor) -> torch.Size:
    """The shape of the part of ``p`` this process updates (a DTensor's local shard)."""
    return local(p).shape


def local_numel(p: Tensor) -> int:
    return local(p).numel()


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
    bits, block, minq = opts["state_bits"], opts["state_block_size"], opts["min_quantized_numel"]
    if bits is not None:
        if isinstance(bits, bool) or bits != 8:
            raise ValueError(f"state_bits must be None or 8, got {bits!r}")
        if sd is not None:
            raise ValueError("state_bits=8 cannot be combined with state_dtype: 8-bit states set the moments' "
                             "storage themselves (tensors below min_quantized_numel keep the param's dtype)")
    for name, v in (("state_block_size", block), ("min_quantized_numel", minq)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not (64 <= block <= 4096 and block & (block - 1) == 0):
        raise ValueError(f"state_block_size must be a power of two from 64 to 4096, got {block}")
    if minq < 0:
        raise ValueError(f"min_quantized_numel must be non-negative, got {minq}")
    if bits is None and (block != OPTION_DEFAULTS["state_block_size"] or minq != OPTION_DEFAULTS["min_quantized_numel"]):
        raise ValueError("state_block_size and min_quantized_numel apply to 8-bit states only: pass state_bits=8")
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
    if o.state_bits is not None and group.get("amsgrad"):
        raise ValueError(f"state_bits=8 cannot be combined with amsgrad=True (param group {gi}): 8-bit states keep "
                         "no max_exp_avg_sq")
    for j, p in enumerate(group["params"]):
        if isinstance(p, Tensor):
            check_param(o, p, f"param {j} of group {gi}")


def options_of(group: Dict[str, Any]) -> Options:
    """The precision options of a param group."""
    get = group.get
    return Options(bool(get("master_weights", False)), bool(get("stochastic_rounding", False)),
                   bool(get("kahan_summation", False)), get("state_dtype"), get("max_grad_norm"),
                   int(get("sr_seed", 0)), get("state_bits"), get("state_block_size", 256),
                   get("min_quantized_numel", 4096))


def setup(defaults: Dict[str, Any], groups: List[Dict[str, Any]], options: Dict[str, Any]) -> None:
    """Validate the precision options of a constructor and store them in
    ``defaults`` and every group (they are param-group options, so a group
    may override them). With every option off nothing is stored: the
    defaults, groups and state_dicts stay exactly torch's."""
    check_options(options)
    options = dict(options)
    if any(options[k] != v for k, v in OPTION_DEFAULTS.items()):
        if options["stochastic_rounding"]:
            options["sr_seed"] = draw_seed()
        defaults.update(options)
        for group in groups:
            for k, v in options.items():
                group.setdefault(k, v)
    for gi, group in enumerate(groups):
        check_group_options(group, gi)


def check_group_options(group: Dict[str, Any], gi: int) -> None:
    """A group's options, valid and fitting its params (a new group draws its own seed)."""
    check_options({k: group.get(k, v) for k, v in OPTION_DEFAULTS.items()})
    if group.get("stochastic_rounding") and "sr_seed" not in group:
        group["sr_seed"] = draw_seed()
    check_group(options_of(group), group, gi)


def max_grad_norm(groups: List[Dict[str, Any]]) -> Optional[float]:
    """The optimizer's max_grad_norm: one value for all groups, or None."""
    values = {g.get("max_grad_norm") for g in groups}
    if values == {None}:
        return None
    if len(values) > 1:
        raise ValueError(
            "max_grad_norm clips the global norm of all grads of the optimizer: every param group "
            f"must have the same value, got {sorted(values, key=str)}"
        )
    return float(values.pop())


def torch_state_dict(sd: Dict[str, Any], params: List[Tensor], torch_step: bool) -> Dict[str, Any]:
    """``sd`` as torch.optim keeps it: without the options' state and group
    keys, moments in each param's dtype (a UserWarning names what was dropped)."""
    dropped = set()
    new_state = {}
    block_of = {pid: g.get("state_block_size", 256) for g in sd["param_groups"] for pid in g["params"]}
    for pid, st in sd["state"].items():
        p = params[pid] if isinstance(pid, int) and pid < len(params) else None
        out = {}
        for key, v in st.items():
            if key in EXTRA_KEYS or (key == "step" and not torch_step):
                dropped.add(key)
                continue
            if key in SCALE_KEYS:
                continue
            if key in CODE_KEYS:  # 8-bit states: torch's moment, dequantized
                moment = MOMENT_OF[key]
                v = dequantize(v, st[QUANT_KEYS[moment][1]], block_of.get(pid, 256), moment in ROOT_KEYS)
                if p is not None:
                    v = v.to(p.dtype)
                out[moment] = v
                dropped.add("8-bit precision (moments dequantized)")
                continue
            if key in MOMENT_KEYS and isinstance(v, Tensor) and p is not None and v.dtype != p.dtype:
                v = v.to(p.dtype)
                dropped.add(f"{key} precision")
            out[key] = v
        new_state[pid] = out
    groups = [{k: v for k, v in g.items() if k not in OPTION_DEFAULTS and k != "sr_seed"} for g in sd["param_groups"]]
    if dropped:
        warnings.warn(
            "torch_state_dict(): dropped fusedoptim-only state torch.optim does not use: " + ", ".join(sorted(dropped)),
            UserWarning,
            stacklevel=3,
        )
    return {"state": new_state, "param_groups": groups}


def saved_state(state_dict: Dict[str, Any], groups: List[Dict[str, Any]]) -> List[Tuple[Tensor, str, Tensor, int]]:
    """The option-dependent state tensors of a checkpoint, with their params
    and the checkpoint's block size of 8-bit states: torch's loader casts
    every state tensor to its param's dtype, while the options keep other
    dtypes (fp32 master and moments, bf16 moments, uint8 codes, fp32 scales)."""
    saved = []
    for g_saved, g in zip(state_dict.get("param_groups", []), groups):
        block = g_saved.get("state_block_size", 256)
        for sid, p in zip(g_saved.get("params", []), g["params"]):
            st = state_dict.get("state", {}).get(sid)
            if isinstance(st, dict):
                for key, v in st.items():
                    if isinstance(v, Tensor) and (key in MOMENT_KEYS or key in EXTRA_KEYS or key in MOMENT_OF):
                        saved.append((p, key, v, block))
    return saved


def quantize(x: Tensor, block: int, root: bool) -> Tuple[Tensor, Tensor]:
    """A moment as 8-bit codes (uint8, its shape) and scales (float32, one per
    block), by the kernels' quantizer (Note [8-bit states]); ``root``: an
    ``exp_avg_sq``, quantized as its square root."""
    xf = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    codes = torch.empty(xf.shape, dtype=torch.uint8)
    scales = torch.empty(((xf.numel() + block - 1) // block,), dtype=torch.float32)
    _C.q8_quantize(xf.data_ptr(), xf.numel(), codes.data_ptr(), scales.data_ptr(), block, root)
    return codes.to(x.device), scales.to(x.device)


def dequantize(codes: Tensor, scales: Tensor, block: int, root: bool) -> Tensor:
    """The float32 moment of 8-bit codes and scales (``root``: squared back)."""
    c = codes.detach().to(device="cpu", dtype=torch.uint8).contiguous()
    sc = scales.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if sc.numel() != (c.numel() + block - 1) // block:
        raise ValueError(f"{sc.numel()} scales do not fit {c.numel()} codes in blocks of {block}")
    out = torch.empty(c.shape, dtype=torch.float32)
    _C.q8_dequantize(c.data_ptr(), sc.data_ptr(), c.numel(), out.data_ptr(), block, root)
    return out.to(codes.device)


def _convert_layout(o: Options, p: Tensor, st: Dict[str, Any], block_of: Dict[str, int]) -> bool:
    """Bring the moments of ``p`` into the layout of the options in force:
    full moments quantized where 8-bit states apply, 8-bit codes dequantized
    where they do not, codes of another block size requantized. Returns
    whether anything was converted."""
    changed = False
    quant = o.quantizes(p)
    for moment, (ck, sk) in QUANT_KEYS.items():
        root = moment in ROOT_KEYS
        if ck in st and sk in st and (not quant or block_of.get(ck, o.block) != o.block):
            full = dequantize(st.pop(ck), st.pop(sk), block_of.get(ck, 256), root)
            if not quant:
                st[moment] = full.to(o.key_dtype(p, moment))
            else:
                st[ck], st[sk] = quantize(full, o.block, root)
            changed = True
        elif quant and isinstance(st.get(moment), Tensor):
            st[ck], st[sk] = quantize(st.pop(moment), o.block, root)
            changed = True
    return changed


def restore_state(defaults: Dict[str, Any], groups: List[Dict[str, Any]], state: Any,
                  saved: List[Tuple[Tensor, str, Tensor, int]]) -> None:
    """After torch's loader: options a checkpoint lacks (e.g. torch's) are this
    optimizer's; the saved tensors of :func:`saved_state` get the dtypes of
    the options in force; state of an option not in force is dropped (warned)."""
    for group in groups:
        for k in OPTION_DEFAULTS:
            if k in defaults:
                group.setdefault(k, defaults[k])
        if group.get("stochastic_rounding") and "sr_seed" not in group:
            group["sr_seed"] = defaults.get("sr_seed", 0) or draw_seed()
    group_of = {id(p): g for g in groups for p in g["params"]}
    dropped = set()
    blocks: Dict[int, Dict[str, int]] = {}
    for p, key, v, block in saved:
        o = options_of(group_of[id(p)])
        st = state[p]
        if key in EXTRA_KEYS and key != o.extra_key:
            st.pop(key, None)
            dropped.add(key)
        elif p.is_floating_point():
            # Codes and scales as saved, moments in the dtype the options keep.
            dtype = v.dtype if key in MOMENT_OF else o.key_dtype(p, key)
            st[key] = v.to(dtype=dtype, device=p.device)
            blocks.setdefault(id(p), {})[key] = block
    for g in groups:
        o = options_of(g)
        for p in g["params"]:
            if p in state and (o.state_bits is not None or id(p) in blocks):
                _convert_layout(o, p, state[p], blocks.get(id(p), {}))
    if dropped:
        warnings.warn(
            f"load_state_dict: ignored state of precision options this optimizer does not use: "
            f"{', '.join(sorted(dropped))}",
            UserWarning,
            stacklevel=3,
        )
