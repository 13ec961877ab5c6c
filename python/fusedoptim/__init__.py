"""fusedoptim: fused Adam, AdamW and SGD for PyTorch.

Drop-in replacements for :class:`torch.optim.Adam`, :class:`torch.optim.AdamW`
and :class:`torch.optim.SGD` whose step updates every tensor of a param group
in one native call, with CPU kernels chosen at run time (AVX-512, AVX2 or
portable scalar)::

    import fusedoptim
    opt = fusedoptim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
"""

from ._config import (
    backend_info,
    get_cpu_isa,
    get_num_threads,
    get_q8_passes,
    get_threads_backend,
    set_cpu_isa,
    set_num_threads,
    set_q8_passes,
    set_threads_backend,
)
from ._config import warn_ignored_requests as _warn
from .adam import Adam, AdamW
from .sgd import SGD

__version__: str = backend_info()["version"]

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "backend_info",
    "get_cpu_isa",
    "get_num_threads",
    "get_q8_passes",
    "get_threads_backend",
    "set_cpu_isa",
    "set_num_threads",
    "set_q8_passes",
    "set_threads_backend",
    "__version__",
]

_warn()
del _warn
