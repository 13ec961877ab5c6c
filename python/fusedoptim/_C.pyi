"""Types of fusedoptim's private compiled module.

Every tensor is passed as its data address (``tensor.data_ptr()``) with its
element count; the module never sees a torch object. Use the optimizer
classes of :mod:`fusedoptim` instead of calling these directly: they
validate dtypes, devices, shapes, strides and aliasing first.
"""

from typing import Any, Dict, List, Optional, Tuple

DTYPE_FLOAT32: int
DTYPE_BFLOAT16: int
DTYPE_FLOAT16: int
#: float64: the dtype code of a step counter only (torch's ``step`` under a float64 default dtype).
DTYPE_FLOAT64: int
DTYPE_QUANT8: int
#: Store modes of the precision options (Note [precision options]).
STORE_PLAIN: int
STORE_MASTER: int
STORE_STOCHASTIC: int
STORE_KAHAN: int

def adam_step(
    params: List[int],
    grads: List[int],
    exp_avgs: List[int],
    exp_avg_sqs: List[int],
    max_exp_avg_sqs: Optional[List[int]],
    steps: List[int],
    numels: List[int],
    dtype: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    num_threads: int,
    *,
    state_dtype: int = -1,
    store: int = ...,
    extras: Optional[List[int]] = None,
    tensor_ids: Optional[List[int]] = None,
    seed: int = 0,
    grad_mul: float = 1.0,
    step_dtype: int = ...,
    exp_avg_scales: Optional[List[int]] = None,
    exp_avg_sq_scales: Optional[List[int]] = None,
    block_size: int = 0,
) -> None:
    """Fused Adam/AdamW step over many tensors.

    ``steps`` holds the addresses of step counters, float32 (or float64 with
    ``step_dtype=DTYPE_FLOAT64``); each is
    incremented by one before its tensor's bias corrections are computed.
    The keyword arguments are the precision options: the moments' dtype code
    (-1: the params'), the store mode (``STORE_*``), one extra stream per
    tensor for ``STORE_MASTER`` (fp32 master) and ``STORE_KAHAN``
    (compensation, param dtype), the tensor ids and seed of
    ``STORE_STOCHASTIC``, and the clip coefficient grads are multiplied by.
    Raises ValueError for bad hyperparameters, lengths, pointers or an
    unsupported (dtype, state dtype, store) combination before anything is
    written.
    """

def sgd_step(
    params: List[int],
    grads: List[int],
    momentum_buffers: Optional[List[int]],
    first_step: Optional[List[bool]],
    numels: List[int],
    dtype: int,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    num_threads: int,
    *,
    state_dtype: int = -1,
    store: int = ...,
    extras: Optional[List[int]] = None,
    steps: Optional[List[int]] = None,
    tensor_ids: Optional[List[int]] = None,
    seed: int = 0,
    grad_mul: float = 1.0,
    momentum_scales: Optional[List[int]] = None,
    block_size: int = 0,
) -> None:
    """Fused SGD step over many tensors; ``first_step[k]`` initialises buffer k with the gradient.

    Precision options as for :func:`adam_step`; stochastic rounding also
    takes float32 step counters (``steps``), incremented before use.
    """

def q8_quantize(x: int, numel: int, codes: int, scales: int, block: int, root: bool) -> None:
    """Quantize fp32 values into 8-bit codes and per-block scales (Note [8-bit states])."""
    ...

def q8_dequantize(codes: int, scales: int, numel: int, out: int, block: int, root: bool) -> None:
    """Dequantize 8-bit codes into fp32 values (root=True: their squares)."""
    ...

def grad_norm_sq(grads: List[int], numels: List[int], dtypes: List[int], num_threads: int) -> float:
    """Sum of squares of every grad element, in double, in a fixed order:
    the same bits for any thread count and CPU variant."""

def clip_coef(sumsq: float, max_norm: float) -> Tuple[float, float]:
    """``(total_norm, coefficient)`` of ``clip_grad_norm_`` from a sum of
    squares, in float32 as torch computes them."""

def backend_info() -> Dict[str, Any]:
    """Compiled variants, CPU features, the ISA in use and build facts."""

def set_cpu_isa(name: str) -> None:
    """Force 'scalar', 'avx2', 'avx512' or 'avx512bf16'; ValueError if unknown, RuntimeError if unsupported here."""

def set_threads_backend(name: str) -> None:
    """'openmp' (torch's OpenMP team), 'pool' (fusedoptim's own threads) or 'auto'."""

def threads_backend() -> str:
    """The threads the CPU kernels run on now: 'openmp (<runtime path>)' or 'pool'."""

def get_cpu_isa() -> str:
    """The CPU variant in use."""

def set_q8_passes(name: str) -> None:
    """'overlap', 'separate' or 'auto': the passes over a block of 8-bit Adam states; ValueError if unknown."""

def q8_passes() -> str:
    """The arrangement the active CPU variant runs: 'overlap' or 'separate', plus ' (auto)' unless forced."""

def stream_probe(rw: List[int], read: int, numel: int, dtype: int, num_threads: int,
                 nontemporal: bool = False) -> None:
    """Bandwidth probe: ``x += read`` for each of 1 to 4 read-write streams.

    Touches exactly the bytes of an optimizer step with the same streams
    (Adam: 3 read-write and the grad), with the same ISA and thread split.
    ``nontemporal`` writes the streams with streaming stores (plain stores in
    the scalar variant).
    """

def triad(a: int, b: int, c: int, scalar: float, numel: int, num_threads: int) -> None:
    """STREAM triad ``a = b + scalar * c`` over fp32 arrays."""

class StepPlan:
    """Cached pointer tables of one param group (see Note [cached step plans]).

    Made by :class:`StepPlanBuilder` once a group's state exists; each step
    :meth:`collect` checks the cache against the group (same params list and
    objects, same addresses, same grads present, same state tensor objects)
    and reads the grads' addresses without writing anything, then
    :meth:`run_adam` or :meth:`run_sgd` updates every bucket.
    """

    def collect(self, params: List[Any], state: Dict[Any, Any]) -> int:
        """0: valid, grads read; 1: stale, rebuild; 2: a grad needs the general path."""
    def run_adam(
        self,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
        num_threads: int,
        *,
        state_dtype: int = -1,
        store: int = ...,
        seed: int = 0,
        grad_mul: float = 1.0,
    ) -> None:
        """Adam/AdamW step of every entry (after a successful collect); precision options as ``adam_step``."""
    def run_sgd(
        self,
        lr: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        num_threads: int,
        *,
        state_dtype: int = -1,
        store: int = ...,
        seed: int = 0,
        grad_mul: float = 1.0,
    ) -> None:
        """SGD step of every entry (after a successful collect); precision options as ``sgd_step``."""
    def grad_ptrs(self) -> List[int]:
        """The grads' addresses read by a successful collect(), in plan order; the plan stays ready to run."""
    def take_grad_ptrs(self) -> List[int]:
        """The grads' addresses read by a successful collect(), in plan order (for the CUDA backend)."""
    def clear_first(self) -> None:
        """Mark every momentum buffer as initialised."""
    def release(self) -> None:
        """Drop the grad references taken by collect()."""
    def __len__(self) -> int: ...

class StepPlanBuilder:
    """Builds a :class:`StepPlan` one entry (a param the plan updates) at a time.

    ``params`` is the group's list (``collect`` checks its identity); the
    builder records which of its params have a grad now. ``state`` is
    ``optimizer.state``, whose items are snapshotted by :meth:`build`;
    ``keys`` are the state streams in kernel order; with ``with_step`` the
    entries also track ``state_dict["step"]``.
    """

    def __init__(self, params: List[Any], state: Dict[Any, Any], keys: List[str], with_step: bool) -> None: ...
    def add(
        self,
        position: int,
        param: Any,
        state_dict: Dict[str, Any],
        dtype: int,
        numel: int,
        pptr: int,
        streams: List[int],
        step: int,
        first: bool,
        tensor_id: int,
        *,
        step_dtype: int = ...,
    ) -> None:
        """One entry: the param at ``position`` among the group's params with a grad, its state dict, dtype
        code, element count and address, one stream address per key, the float32 step counter's address
        (0 without ``with_step``), whether this step initialises its SGD momentum buffer, and its
        stochastic-rounding tensor id (0 when unused). The expected state objects, the param's dtype and
        rank are read here. Consecutive entries of one dtype form a bucket; a dtype that comes back after
        another bucket started raises ValueError."""
    def build(self) -> StepPlan:
        """The plan; the builder cannot be used afterwards."""

def cuda_info() -> Dict[str, Any]:
    """Whether the CUDA backend was compiled and can run here (``reason`` if not), archs and versions."""

class _CudaBackend:
    """``_C.cuda`` (real kernels, device pointers; only in builds with CUDA) and
    ``_C.cuda_emulation`` (the same kernels compiled for the host, host pointers)."""

    @staticmethod
    def adam_step(
        params: List[int],
        grads: List[int],
        exp_avgs: List[int],
        exp_avg_sqs: List[int],
        max_exp_avg_sqs: Optional[List[int]],
        steps: List[int],
        numels: List[int],
        dtype: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
        device_steps: bool = False,
        lr_ptr: int = 0,
        grad_scale: int = 0,
        found_inf: int = 0,
        device: int = 0,
        stream: int = 0,
        param_space: str = "auto",
        *,
        state_dtype: int = -1,
        store: int = ...,
        extras: Optional[List[int]] = None,
        tensor_ids: Optional[List[int]] = None,
        seed: int = 0,
        clip_coef: int = 0,
        step_dtype: int = ...,
    ) -> Dict[str, int]:
        """Multi-tensor Adam/AdamW launches on ``stream`` of ``device``.

        The keyword arguments are the precision options of the CPU
        ``adam_step``, except that the clip coefficient is read on the device
        from the float32 at ``clip_coef`` (0: none). With ``device_steps``,
        stochastic-rounding keys come from the incremented device counters.

        ``device_steps``: the float32 step counters live on the device and a
        kernel increments them (skipped when ``*found_inf != 0``); otherwise
        they are host memory, incremented before the launch. ``grad_scale``
        and ``found_inf`` are addresses of float32 scalars (0: none). Returns
        ``launches``, ``blocks``, ``max_tensors_per_launch``, ``capacity``
        and ``param_bytes``.
        """

    @staticmethod
    def sgd_step(
        params: List[int],
        grads: List[int],
        momentum_buffers: Optional[List[int]],
        first_step: Optional[List[bool]],
        numels: List[int],
        dtype: int,
        lr: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        grad_scale: int = 0,
        found_inf: int = 0,
        device: int = 0,
        stream: int = 0,
        param_space: str = "auto",
        *,
        state_dtype: int = -1,
        store: int = ...,
        extras: Optional[List[int]] = None,
        steps: Optional[List[int]] = None,
        tensor_ids: Optional[List[int]] = None,
        seed: int = 0,
        clip_coef: int = 0,
    ) -> Dict[str, int]:
        """Multi-tensor SGD launches on ``stream`` of ``device``; see ``adam_step``.
        ``steps``: host float32 counters of stochastic rounding."""

    @staticmethod
    def grad_norm(
        grads: List[int],
        numels: List[int],
        dtypes: List[int],
        scratch: int,
        scratch_len: int,
        out: int,
        max_norm: float,
        grad_scale: int = 0,
        device: int = 0,
        stream: int = 0,
        param_space: str = "auto",
    ) -> Dict[str, int]:
        """Global grad norm in two launches, deterministic: per-block float64
        partial sums into ``scratch`` (``scratch_len`` float64 entries, at
        least ``grad_norm_scratch``), then ``out[0] = total_norm`` and
        ``out[1] = clip coefficient`` (float32, on the device). With
        ``grad_scale``, each grad element is unscaled as the update kernels
        unscale it before it is squared."""

    @staticmethod
    def grad_norm_scratch(numels: List[int], dtypes: List[int]) -> int:
        """float64 scratch entries ``grad_norm`` needs for these grads."""

cuda_emulation: _CudaBackend
cuda: _CudaBackend
