"""An independent float64 NumPy reference of the published update rules.

Written from the algorithm boxes in the torch.optim documentation (and the
Adam / AdamW / AMSGrad papers), not from fusedoptim's sources: every
quantity is kept in float64 and the formulas are spelled out the way they
are published, with bias-corrected moments.

Adam (Kingma & Ba), torch.optim.Adam docs, for t = 1, 2, ...::

    g_t   = -grad if maximize else grad
    if weight_decay and not decoupled:   g_t = g_t + weight_decay * theta   (L2)
    if weight_decay and decoupled:       theta = theta - lr * weight_decay * theta  (AdamW)
    m_t   = beta1 * m + (1 - beta1) * g_t
    v_t   = beta2 * v + (1 - beta2) * g_t^2
    m_hat = m_t / (1 - beta1^t)
    if amsgrad: v_max = max(v_max, v_t);  v_hat = v_max / (1 - beta2^t)
    else:       v_hat = v_t / (1 - beta2^t)
    theta = theta - lr * m_hat / (sqrt(v_hat) + eps)

SGD, torch.optim.SGD docs::

    g_t = -grad if maximize else grad
    if weight_decay: g_t = g_t + weight_decay * theta
    if momentum:
        b_t = g_t                                    (t == 1)
        b_t = momentum * b + (1 - dampening) * g_t   (t > 1)
        g_t = g_t + momentum * b_t if nesterov else b_t
    theta = theta - lr * g_t
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np


@dataclass
class AdamState:
    t: int = 0
    m: Optional[np.ndarray] = None
    v: Optional[np.ndarray] = None
    v_max: Optional[np.ndarray] = None


def adam_update(theta: np.ndarray, grad: np.ndarray, st: AdamState, *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool) -> np.ndarray:
    """One Adam/AdamW step on float64 arrays; returns the new theta and updates ``st``."""
    theta = np.asarray(theta, dtype=np.float64)
    g = -np.asarray(grad, dtype=np.float64) if maximize else np.asarray(grad, dtype=np.float64)
    if st.m is None:
        st.m = np.zeros_like(theta)
        st.v = np.zeros_like(theta)
        st.v_max = np.zeros_like(theta)
    st.t += 1
    t = st.t
    if weight_decay != 0:
        if decoupled:
            theta = theta - lr * weight_decay * theta
        else:
            g = g + weight_decay * theta
    st.m = beta1 * st.m + (1.0 - beta1) * g
    st.v = beta2 * st.v + (1.0 - beta2) * (g * g)
    m_hat = st.m / (1.0 - beta1 ** t)
    if amsgrad:
        st.v_max = np.maximum(st.v_max, st.v)
        v_hat = st.v_max / (1.0 - beta2 ** t)
    else:
        v_hat = st.v / (1.0 - beta2 ** t)
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps)


@dataclass
class SGDState:
    t: int = 0
    b: Optional[np.ndarray] = None


def sgd_update(theta: np.ndarray, grad: np.ndarray, st: SGDState, *, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, maximize: bool,
               round_product: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """One SGD step on float64 arrays; returns the new theta and updates ``st``.

    ``round_product`` rounds ``momentum * buf`` before the grad is added, as
    torch's ``buf.mul_(momentum)`` does in the buffer's arithmetic: a model
    of the one intermediate rounding that can decide a tie when the buffer
    is then stored in a low-precision format."""
    theta = np.asarray(theta, dtype=np.float64)
    g = -np.asarray(grad, dtype=np.float64) if maximize else np.asarray(grad, dtype=np.float64)
    st.t += 1
    if weight_decay != 0:
        g = g + weight_decay * theta
    if momentum != 0:
        if st.t == 1:
            st.b = g.copy()  # the first-step rule: the buffer starts as the gradient, no dampening
        else:
            product = momentum * st.b
            st.b = (round_product(product) if round_product is not None else product) + (1.0 - dampening) * g
        g = g + momentum * st.b if nesterov else st.b
    return theta - lr * g


def _group_hyper(kind: str, group: Dict) -> Dict:
    if kind == "sgd":
        return dict(lr=float(group["lr"]), momentum=float(group.get("momentum", 0.0)),
                    dampening=float(group.get("dampening", 0.0)), weight_decay=float(group.get("weight_decay", 0.0)),
                    nesterov=bool(group.get("nesterov", False)), maximize=bool(group.get("maximize", False)))
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    decoupled = kind == "adamw" or bool(group.get("decoupled_weight_decay", False))
    default_wd = 1e-2 if kind == "adamw" else 0.0
    return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group.get("eps", 1e-8)),
                weight_decay=float(group.get("weight_decay", default_wd)), amsgrad=bool(group.get("amsgrad", False)),
                maximize=bool(group.get("maximize", False)), decoupled=decoupled)


@dataclass
class NumpyOptimizer:
    """Runs the reference over param groups: ``groups`` is a list of dicts of
    hyperparameters with ``params``, a list of float64 arrays."""

    kind: str  # "adam", "adamw" or "sgd"
    groups: List[Dict]
    states: Dict[int, object] = field(default_factory=dict)

    def step(self, grads: List[List[Optional[np.ndarray]]]) -> None:
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            hyper = _group_hyper(self.kind, group)
            for pi, g in enumerate(group_grads):
                if g is None:
                    continue
                key = (gi, pi)
                if self.kind == "sgd":
                    st = self.states.setdefault(key, SGDState())
                    group["params"][pi] = sgd_update(group["params"][pi], g, st, **hyper)
                else:
                    st = self.states.setdefault(key, AdamState())
                    group["params"][pi] = adam_update(group["params"][pi], g, st, **hyper)
