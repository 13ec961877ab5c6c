"""Independent float64 NumPy references of the precision options.

Written from the definitions in Note [precision options]
(csrc/common/precision.h), not from fusedoptim's kernels. The update itself
is reference_numpy's float64 Adam / AdamW / SGD (the published formulas); an
option only changes where the update starts from and how its result is
stored:

=======================  ===========================================================
option                   definition (p: stored param, p': the float64 update of p)
=======================  ===========================================================
plain (torch)            param = rne(p'); states rounded to the param's dtype
``master_weights``       master = p' (update runs on the fp32 master); param = rne(master)
``stochastic_rounding``  param = sr(p', bits(seed, step, tensor id, i))   (bf16)
``kahan_summation``      y = (p' - p) + c;  s = p + y;  param = rne(s);
                         c = rne(y - (param - p))            (c in the param's dtype)
``state_dtype=bf16``     every state rounded to nearest-even bf16 after each step
``max_grad_norm``        norm = ||all grads||_2;  g *= min(1, max_norm / (norm + 1e-6))
=======================  ===========================================================

rne (round to nearest, ties to even) and the bf16 / fp16 formats are
implemented here with frexp / rint on float64, so float64 values round once,
directly to the storage format (no detour through torch or float32).

Stochastic rounding rounds x up to the next bf16 value with probability
``frac`` = (x - lower neighbour) / spacing, decided by 16 random bits r:
up iff frac * 2**16 + r >= 2**16. The random bits are the counter-based hash
the spec names (``sr_key`` / ``sr_bits`` of precision.h: a 32-bit
"lowbias32" avalanche mix32 chained over (seed low, seed high, step, tensor
id) and then the element index); the hash *is* the spec's definition of
which bits an element gets, so it is written out here in NumPy uint32
arithmetic and checked against known avalanche properties in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from reference_numpy import AdamState, SGDState, _group_hyper, adam_update, sgd_update


# --------------------------------------------------------------------------- formats and rounding
@dataclass(frozen=True)
class Format:
    """A binary floating-point storage format: ``mant`` significant bits
    (implicit bit included), normal exponents ``emin..emax`` (value = m * 2**e, 1 <= m < 2)."""

    name: str
    mant: int
    emin: int
    emax: int

    @property
    def max(self) -> float:
        return (2.0 - 2.0 ** (1 - self.mant)) * 2.0 ** self.emax


BF16 = Format("bf16", 8, -126, 127)
FP16 = Format("fp16", 11, -14, 15)
FP32 = Format("fp32", 24, -126, 127)
FORMATS = {"bf16": BF16, "fp16": FP16, "fp32": FP32}


def spacing(x: np.ndarray, fmt: Format) -> np.ndarray:
    """The distance between consecutive ``fmt`` values around |x| (the ulp of
    the binade of x; subnormals have the spacing of the smallest binade)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        _, e = np.frexp(x)  # x = f * 2**e, 0.5 <= f < 1, so the binade exponent is e - 1
    e = np.where(x == 0, fmt.emin, np.maximum(e.astype(np.int64) - 1, fmt.emin))
    return np.ldexp(1.0, e - (fmt.mant - 1))


def round_nearest_even(x: np.ndarray, fmt: Format) -> np.ndarray:
    """float64 -> the nearest ``fmt`` value (ties to even), as float64. Overflow
    gives +-inf (IEEE: values at or beyond max + half a spacing); NaN stays NaN."""
    x = np.asarray(x, dtype=np.float64)
    out = np.array(x, dtype=np.float64, copy=True)
    fin = np.isfinite(x)
    xs = x[fin]
    step = spacing(xs, fmt)
    # x / step is exact (a power of two); rint rounds half to even.
    r = np.rint(xs / step) * step
    limit = fmt.max + spacing(np.array(fmt.max), fmt) / 2
    r = np.where(np.abs(xs) >= limit, np.copysign(np.inf, xs), r)
    r = np.where(np.abs(r) > fmt.max, np.copysign(np.inf, xs), r)
    out[fin] = np.copysign(r, xs)  # keep the sign of zero results
    return out


def to_fp32(x: np.ndarray) -> np.ndarray:
    """float64 -> the nearest float32 value (as float64)."""
    return round_nearest_even(x, FP32)


def store(x: np.ndarray, fmt: Format) -> np.ndarray:
    """An fp32 result stored in ``fmt`` with round to nearest even (rne(fp32(x)))."""
    return round_nearest_even(to_fp32(x), fmt)


def ulps_apart(a: np.ndarray, b: np.ndarray, fmt: Format) -> np.ndarray:
    """|a - b| in units of ``fmt``'s spacing at the larger magnitude (finite inputs)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / spacing(np.maximum(np.abs(a), np.abs(b)), fmt)


# --------------------------------------------------------------------------- counter-based random bits
_M32 = np.uint64(0xFFFFFFFF)


def _u32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64) & _M32


def mix32(x) -> np.ndarray:
    """The 32-bit avalanche hash: xorshift-multiply, twice (modular arithmetic on uint64 masked to 32 bits)."""
    x = _u32(x)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def sr_key(seed: int, step: int, tensor_id: int) -> int:
    """The key of one tensor at one step: (seed low word, seed high word, step, tensor id) chained through mix32."""
    seed &= (1 << 64) - 1
    k = mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    k = mix32(k ^ np.uint64(seed >> 32))
    k = mix32(k ^ np.uint64(step & 0xFFFFFFFF))
    return int(mix32((k + np.uint64((tensor_id * 0x85EBCA6B) & 0xFFFFFFFF)) & _M32))


def sr_bits(key: int, index: np.ndarray) -> np.ndarray:
    """The 32 random bits of the elements ``index`` (int64 flat indices) under ``key``."""
    index = np.asarray(index, dtype=np.uint64)
    hi = index >> np.uint64(32)
    lo = index & _M32
    key_hi = np.uint64(key) ^ mix32(hi)
    return mix32(key_hi ^ ((lo * np.uint64(0x9E3779B9)) & _M32))


def stochastic_round_bf16(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """x (float64; must be finite) rounded to one of its two bf16 neighbours:
    up in magnitude iff frac * 2**16 + (bits >> 16) >= 2**16, where frac is
    the distance to the lower-magnitude neighbour in units of the spacing.
    For an x exactly representable in float32, frac * 2**16 is the low 16
    bits of x's float32 pattern, so the probability of rounding up is exactly frac."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.abs(x)
    step = spacing(mag, BF16)
    low = np.floor(mag / step) * step
    frac = (mag - low) / step
    r = (np.asarray(bits, dtype=np.uint64) >> np.uint64(16)).astype(np.float64)
    up = frac * 65536.0 + r >= 65536.0
    res = np.where(up, low + step, low)
    res = np.where(res > BF16.max, np.inf, res)
    return np.copysign(res, x)


# --------------------------------------------------------------------------- Kahan store
def kahan_store(p_old: np.ndarray, p_new: np.ndarray, comp: np.ndarray, fmt: Format,
                arith=np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """The compensated store of Note [precision options], every operation in
    ``arith`` (np.float64 for the reference; np.float32 gives the exact
    single-precision evaluation of the same formula); the two stores round
    like every store here (:func:`store`):
        y = (p' - p) + c;  s = p + y;  param = rne(s);  c = rne(y - (param - p))
    Returns (param, comp) as float64 arrays of ``fmt`` values."""
    p_old = np.asarray(p_old, dtype=arith)
    p_new = np.asarray(p_new, dtype=arith)
    comp = np.asarray(comp, dtype=arith)
    with np.errstate(over="ignore", invalid="ignore"):
        y = (p_new - p_old) + comp
        s = p_old + y
        stored = store(s.astype(np.float64), fmt)
        new_comp = y - (stored.astype(arith) - p_old)
    return stored, store(new_comp.astype(np.float64), fmt)


# --------------------------------------------------------------------------- gradient clipping
def grad_norm64(grads: Sequence[np.ndarray]) -> float:
    """The global L2 norm of all grads, in float64 (math.fsum: correctly rounded sum of squares)."""
    import math

    sq = [float(v) ** 2 for g in grads for v in np.asarray(g, dtype=np.float64).reshape(-1)]
    return math.sqrt(math.fsum(sq))


def clip_coef64(norm: float, max_norm: float) -> float:
    """clip_grad_norm_'s definition: min(1, max_norm / (norm + 1e-6)); NaN stays NaN, inf gives 0."""
    if np.isnan(norm):
        return float("nan")
    return min(1.0, max_norm / (norm + 1e-6))


def grad_norm_sq_documented_order(grads: Sequence[np.ndarray], chunk: int = 4096, lanes: int = 16) -> float:
    """The sum of squares in the order precision.h documents for the
    deterministic reduction: per tensor, chunks of ``chunk`` elements from its
    start; inside a chunk element i goes to lane i % lanes, each lane summed
    sequentially in index order; lanes combined pairwise, (((l0+l1)+(l2+l3))+
    ((l4+l5)+(l6+l7))) + (the same over l8..l15); chunk sums added in chunk order, tensor sums in tensor order. The squares
    of fp32 values are exact in float64, so this is bit-exact."""
    total = 0.0
    for g in grads:
        g = np.asarray(g, dtype=np.float32).astype(np.float64).reshape(-1)
        tensor_sum = 0.0
        for start in range(0, g.size, chunk):
            sq = g[start:start + chunk] ** 2
            pad = (-sq.size) % lanes
            sq = np.concatenate([sq, np.zeros(pad)]).reshape(-1, lanes)
            lane = np.cumsum(sq, axis=0)[-1]  # cumsum is strictly sequential
            a = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
            b = ((lane[8] + lane[9]) + (lane[10] + lane[11])) + ((lane[12] + lane[13]) + (lane[14] + lane[15]))
            chunk_sum = a + b
            tensor_sum = tensor_sum + chunk_sum
        total = total + tensor_sum
    return float(total)


def clip_coef_f32(sumsq: float, max_norm: float) -> Tuple[float, float]:
    """torch.nn.utils.clip_grad_norm_'s fp32 arithmetic: total_norm = float32(sqrt(sumsq));
    coef = float32(1 / float32(total_norm + 1e-6)) * max_norm (torch's ``max_norm / tensor``
    is a reciprocal, then a multiply), clamped to at most 1."""
    with np.errstate(all="ignore"):
        norm = np.float32(np.sqrt(np.float64(sumsq)))
        denom = np.float32(norm + np.float32(1e-6))
        coef = np.float32(np.float32(1.0) / denom) * np.float32(max_norm)
        coef = np.float32(coef)
        if coef > 1:
            coef = np.float32(1.0)
    return float(norm), float(coef)


# --------------------------------------------------------------------------- the optimizer reference
@dataclass
class PrecisionReference:
    """Float64 Adam / AdamW / SGD with one precision option.

    ``groups``: dicts of hyperparameters with ``params`` (float64 arrays holding
    the params' stored values). ``param_fmt``: the params' storage format
    ("fp32", "bf16", "fp16"). ``option``: "plain", "master", "stochastic",
    "kahan" or "state_bf16". ``max_grad_norm`` scales every grad by the
    clip coefficient of the global norm first. ``seed``: stochastic rounding's
    (a group's ``sr_seed`` takes precedence).

    Every store into a 16-bit format goes through float32 first (``to_fp32``):
    the options define the math as fp32 and the store as a rounding of that
    fp32 result. That matters at exact ties, which are common: with
    1 - beta1 = 0.1, 0.9 * m + 0.1 * g is dyadic whenever m's significand is a
    multiple of 5, and the float32 lerp weight 0.1f lands the fp32 result on
    the tie (ties to even) where a direct float64 rounding would go the other way.

    After each step ``params`` holds the stored values (rounded to the
    format), ``masters`` the float64 master copies, ``comps`` the Kahan
    compensations, ``exact`` the unrounded float64 trajectory of the same
    grads (no store rounding at all) and ``states`` the float64 optimizer
    states (rounded to the state format where the option stores them so).
    """

    kind: str
    groups: List[Dict]
    param_fmt: str = "fp32"
    option: str = "plain"
    max_grad_norm: Optional[float] = None
    seed: int = 0
    fp32_scalars: bool = True
    states: Dict[Tuple[int, int], object] = field(default_factory=dict)
    masters: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict)
    comps: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict)
    last_norm: Optional[float] = None

    def __post_init__(self):
        self.fmt = FORMATS[self.param_fmt]
        self.state_fmt = {"plain": self.fmt, "master": None, "stochastic": BF16, "kahan": self.fmt,
                          "state_bf16": BF16}[self.option]
        if self.state_fmt is FP32:
            self.state_fmt = None  # fp32 states: float64 stands in for fp32 (no extra rounding)
        self.exact = [[np.array(p, dtype=np.float64) for p in g["params"]] for g in self.groups]
        self._exact_states: Dict[Tuple[int, int], object] = {}

    def flat_params(self) -> List[np.ndarray]:
        return [p for g in self.groups for p in g["params"]]

    def _round_states(self, st) -> None:
        if self.state_fmt is None:
            return
        for name in ("m", "v", "v_max", "b"):
            val = getattr(st, name, None)
            if val is not None:
                setattr(st, name, store(val, self.state_fmt))

    def _hyper(self, group: Dict) -> Dict:
        """The group's hyperparameters; with ``fp32_scalars`` the ones the fp32
        arithmetic multiplies by directly are their float32 values, as in
        torch's fp32 code (``buf.mul_(momentum)``, ``grad.add(p, alpha=wd)``
        cast the Python scalar to float32): SGD's lr, momentum, 1 - dampening
        and weight decay, Adam's weight decay. Decimal weights like 0.9 or 0.05
        often put a result exactly on a bf16 tie (0.9 * b + g is dyadic whenever
        b's significand is a multiple of 5), and then the float32 value's
        tiny difference decides the rounding."""
        hyper = _group_hyper(self.kind, group)
        if self.fp32_scalars:
            f32 = lambda x: float(to_fp32(np.float64(x)))  # noqa: E731
            hyper["weight_decay"] = f32(hyper["weight_decay"])
            if self.kind == "sgd":
                hyper["lr"] = f32(hyper["lr"])
                hyper["momentum"] = f32(hyper["momentum"])
                hyper["dampening"] = 1.0 - f32(1.0 - hyper["dampening"])
        return hyper

    def _update(self, theta, g, st, hyper, exact: bool = False):
        if self.kind == "sgd":
            # torch's buf.mul_(momentum) rounds to fp32 before the grad is
            # added: with a low-precision buffer that rounding decides ties
            # (the exact trajectory rounds nothing).
            rp = to_fp32 if self.fp32_scalars and self.state_fmt is not None and not exact else None
            return sgd_update(theta, g, st, round_product=rp, **hyper)
        return adam_update(theta, g, st, **hyper)

    def step(self, grads: List[List[Optional[np.ndarray]]]) -> None:
        present = [np.asarray(g, dtype=np.float64) for row in grads for g in row if g is not None]
        coef = 1.0
        if self.max_grad_norm is not None:
            self.last_norm = grad_norm64(present)
            coef = clip_coef64(self.last_norm, self.max_grad_norm)
        tensor_id = -1
        for gi, (group, row) in enumerate(zip(self.groups, grads)):
            hyper = self._hyper(group)
            for pi, g in enumerate(row):
                tensor_id += 1
                if g is None:
                    continue
                g = np.asarray(g, dtype=np.float64) * coef
                key = (gi, pi)
                new_state = SGDState if self.kind == "sgd" else AdamState
                st = self.states.setdefault(key, new_state())
                est = self._exact_states.setdefault(key, new_state())
                self.exact[gi][pi] = self._update(self.exact[gi][pi], g, est, hyper, exact=True)
                p = group["params"][pi]
                if self.option == "master":
                    master = self.masters.get(key, p)
                    master = self._update(master, g, st, hyper)
                    self.masters[key] = master
                    group["params"][pi] = store(master, self.fmt)
                    continue
                p_new = self._update(p, g, st, hyper)
                self._round_states(st)
                if self.option == "stochastic":
                    idx = np.arange(p.size, dtype=np.int64)
                    seed = int(group.get("sr_seed", self.seed))
                    r = sr_bits(sr_key(seed, st.t, tensor_id), idx).reshape(p.shape)
                    group["params"][pi] = stochastic_round_bf16(to_fp32(p_new), r)
                elif self.option == "kahan":
                    c = self.comps.get(key, np.zeros_like(p))
                    group["params"][pi], self.comps[key] = kahan_store(p, p_new, c, self.fmt)
                else:
                    group["params"][pi] = store(p_new, self.fmt) if self.fmt is not FP32 else p_new
