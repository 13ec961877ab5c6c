"""fusedoptim fp32 against the independent float64 NumPy reference
(tests/reference_numpy.py, written from the published formulas).

The reference itself is first checked against closed forms, so that a
mistake in it cannot make a wrong fusedoptim look right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import ALL_CASES, SMALL_GROUP_SHAPES, assert_close, make_problem, record, run_case, run_numpy
from reference_numpy import AdamState, SGDState, adam_update, sgd_update
from tolerances import FP32_VS_NUMPY, REF64_CLOSED_FORM


# ---------------------------------------------------------------- the reference against closed forms
def test_reference_adam_first_step_is_signed_lr():
    # After one step m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
    g = np.array([2.0, -0.5, 1e-3, 0.0])
    theta = np.array([1.0, 1.0, 1.0, 1.0])
    out = adam_update(theta, g, AdamState(), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      amsgrad=False, maximize=False, decoupled=False)
    np.testing.assert_allclose(out, theta - 0.1 * g / (np.abs(g) + 1e-8), **REF64_CLOSED_FORM)


def test_reference_adam_constant_grad_keeps_unit_steps():
    # A constant gradient keeps m_hat = g and v_hat = g^2 at every step (bias
    # correction exactly undoes the zero init): each step moves lr * sign(g).
    st = AdamState()
    theta = np.array([0.0, 0.0])
    for _ in range(10):
        theta = adam_update(theta, np.array([3.0, -0.25]), st, lr=0.01, beta1=0.9, beta2=0.99, eps=0.0,
                            weight_decay=0.0, amsgrad=True, maximize=False, decoupled=False)
    np.testing.assert_allclose(theta, [-0.1, 0.1], **REF64_CLOSED_FORM)
    # maximize flips the direction
    st = AdamState()
    theta = adam_update(np.array([0.0]), np.array([3.0]), st, lr=0.01, beta1=0.9, beta2=0.99, eps=0.0,
                        weight_decay=0.0, amsgrad=False, maximize=True, decoupled=False)
    np.testing.assert_allclose(theta, [0.01], **REF64_CLOSED_FORM)


def test_reference_adamw_decay_and_adam_l2_differ():
    g = np.array([0.0])
    theta = np.array([2.0])
    # decoupled: a zero grad still shrinks theta by lr * wd * theta
    out = adam_update(theta, g, AdamState(), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5,
                      amsgrad=False, maximize=False, decoupled=True)
    np.testing.assert_allclose(out, [2.0 * (1 - 0.1 * 0.5)], **REF64_CLOSED_FORM)
    # L2: the decay goes through the moments, giving a signed lr step
    out = adam_update(theta, g, AdamState(), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5,
                      amsgrad=False, maximize=False, decoupled=False)
    np.testing.assert_allclose(out, [2.0 - 0.1 * 1.0 / (1.0 + 1e-8)], **REF64_CLOSED_FORM)


def test_reference_sgd_momentum_first_step_and_sum():
    st = SGDState()
    theta = np.array([0.0])
    kw = dict(lr=1.0, momentum=0.5, dampening=0.25, weight_decay=0.0, nesterov=False, maximize=False)
    theta = sgd_update(theta, np.array([1.0]), st, **kw)   # b = g = 1 (no dampening on step 1)
    np.testing.assert_allclose(theta, [-1.0], **REF64_CLOSED_FORM)
    theta = sgd_update(theta, np.array([1.0]), st, **kw)   # b = 0.5 + 0.75 = 1.25
    np.testing.assert_allclose(theta, [-2.25], **REF64_CLOSED_FORM)
    st = SGDState()
    kw = dict(lr=1.0, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)
    theta = sgd_update(np.array([0.0]), np.array([1.0]), st, **kw)  # b = 1, g + 0.5 b = 1.5
    np.testing.assert_allclose(theta, [-1.5], **REF64_CLOSED_FORM)
    theta = sgd_update(np.array([0.0]), np.array([2.0]), SGDState(), lr=0.5, momentum=0.0, dampening=0.0,
                       weight_decay=1.0, nesterov=False, maximize=True)  # -(-2 + 1 * 0) * 0.5
    np.testing.assert_allclose(theta, [1.0], **REF64_CLOSED_FORM)


# ---------------------------------------------------------------- fusedoptim against the reference
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_fp32_matches_numpy_reference(case):
    problem = make_problem(SMALL_GROUP_SHAPES, torch.float32, seed=1)
    ours, opt = run_case(case, "ours", problem)
    assert all(b.startswith("native-cpu/") for b in opt.last_backends)
    ref = run_numpy(case, problem)
    stats = assert_close(ours, ref, what=f"{case.id} fp32 vs float64 numpy reference", **FP32_VS_NUMPY)
    record("fp32 params vs numpy (small sizes)", stats, case.id)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if "max" in c.id and "wd0.1" in c.id or "nesterov" in c.id],
                         ids=repr)
def test_fp32_matches_numpy_reference_after_100_steps(case):
    problem = make_problem([[(257,), (3, 3)], [(1,)]], torch.float32, seed=4, steps=100)
    ours, _ = run_case(case, "ours", problem)
    ref = run_numpy(case, problem)
    stats = assert_close(ours, ref, what=f"{case.id} fp32 vs numpy, 100 steps", **FP32_VS_NUMPY)
    record("fp32 params vs numpy (100 steps)", stats, case.id)


def test_numpy_reference_would_catch_a_wrong_formula():
    """The comparison is sharp enough to see a real mistake: an SGD whose
    first step applied dampening (a classic bug) is far outside tolerance."""
    case = next(c for c in ALL_CASES if c.id == "SGD-mom0.9-damp0.1-wd0")
    problem = make_problem([[(33,)]], torch.float32, seed=1, steps=5)
    ours, _ = run_case(case, "ours", problem)
    wrong = problem.init[0][0].double().numpy().copy()
    b = np.zeros_like(wrong)
    for step in range(problem.steps):
        g = problem.grads(step)[0][0].double().numpy()
        b = 0.9 * b + 0.9 * g  # dampening applied on the first step too
        wrong = wrong - 1e-2 * b
    with pytest.raises(AssertionError):
        assert_close(ours, [wrong], what="deliberately wrong reference", **FP32_VS_NUMPY)
