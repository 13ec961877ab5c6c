"""Shared fixtures of the fusedoptim suite.

The tests import the *installed* fusedoptim (never the source tree: nothing
here touches sys.path beyond pytest's own rootdir handling of tests/).
"""

from __future__ import annotations

import pytest
import torch

import fusedoptim
from cases import CASES_BY_ID, MEASURED, OptCase, supported_isas
from tolerances import LOWP_MAX_RATIO


def _cases_in(value):
    if isinstance(value, OptCase):
        yield value
    elif isinstance(value, str) and value in CASES_BY_ID:  # a case given by its id
        yield CASES_BY_ID[value]
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _cases_in(v)


def pytest_collection_modifyitems(config, items):
    """A test parametrized with a registry case (or its id) that the installed torch
    cannot run (``OptCase.unsupported``: e.g. Adam's decoupled_weight_decay
    before torch 2.6) is skipped with that reason."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        reasons = {c.unsupported for v in callspec.params.values() for c in _cases_in(v)} - {None}
        for reason in sorted(reasons):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _isolation():
    """Every test starts from the same global state and leaves it as found:
    a fixed torch seed, the best ISA, torch's thread count, fusedoptim's
    thread setting (None: follow torch)."""
    isa = fusedoptim.get_cpu_isa()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    fusedoptim.set_cpu_isa(isa)
    fusedoptim.set_num_threads(None)
    torch.set_num_threads(threads)


@pytest.fixture
def restore_isa():
    """Yield a setter for the CPU variant; the original is restored afterwards."""
    original = fusedoptim.get_cpu_isa()

    def set_isa(name: str) -> None:
        fusedoptim.set_cpu_isa(name)
        assert fusedoptim.get_cpu_isa() == name
        assert fusedoptim.backend_info()["isa"] == name

    yield set_isa
    fusedoptim.set_cpu_isa(original)
    assert fusedoptim.get_cpu_isa() == original


@pytest.fixture(params=["avx2", "avx512", "avx512bf16"])
def vector_isa(request, restore_isa):
    """Each vector variant, skipped with the reason when this CPU cannot run it."""
    name = request.param
    if name not in supported_isas():
        info = fusedoptim.backend_info()
        pytest.skip(f"{name} is not supported here: supported_isas={info['supported_isas']}, "
                    f"compiled_isas={info['compiled_isas']}")
    return name


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not MEASURED:
        return
    tr = terminalreporter
    tr.section("fusedoptim parity errors (largest measured)")
    for line in (
        "Measurements, not failures: each test asserts its own tolerance (tests/tolerances.py).",
        "Each row is the largest difference between two results over the tests that compared them:",
        "  max abs = max |a - e|, max rel = max |a - e| / max(|e|, 1e-3), a = fusedoptim unless named, e = reference.",
        "Rows '(same dtype)' set fusedoptim's bf16/fp16 params beside torch's: each rounds at every step,",
        "differently, so they drift apart. The tests judge low precision by each one's error against an",
        "fp32 or float64 reference instead (rows 'vs fp32 torch', 'vs float64 numpy'; max rel '-': not",
        f"measured): fusedoptim's must be at most {LOWP_MAX_RATIO:g} times torch's, plus a few ulps.",
        "",
    ):
        tr.write_line(line)
    tr.write_line(f"{'comparison':58s} {'max abs':>10s} {'max rel':>10s}  worst test")
    for key in sorted(MEASURED):
        a, r, where = MEASURED[key]
        rel = "-" if r == 0.0 and a > 0.0 else f"{r:10.3e}"
        tr.write_line(f"{key:58s} {a:10.3e} {rel:>10s}  {where}")
