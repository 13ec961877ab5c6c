"""The torch compatibility layer (fusedoptim/_torch_compat.py): the one
place that uses torch internals and APIs newer than the floor, and the
supported range that pyproject.toml, the README and backend_info() state."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import fusedoptim
import fusedoptim._compile
from fusedoptim import _torch_compat as compat

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(fusedoptim.__file__).resolve().parent


def test_installed_torch_is_in_the_supported_range():
    assert compat.TORCH_VERSION[:2] >= compat.MIN_TORCH, (torch.__version__, compat.MIN_TORCH)


def test_pyproject_readme_and_backend_info_agree_on_the_range():
    floor = ".".join(map(str, compat.MIN_TORCH))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dependencies = \["torch>=([0-9.]+)"\]', pyproject, re.M).group(1) == floor
    assert compat.supported_range() == f">={floor}"
    assert fusedoptim.backend_info()["torch_supported"] == f">={floor}"
    readme = (ROOT / "README.md").read_text()
    assert f"**Supported: torch {floor} and later**" in readme
    assert f"the floor ({floor}.x)" in readme


def test_backend_info_says_how_compile_runs():
    info = fusedoptim.backend_info()
    if compat.TRACE_STEP:
        assert info["torch_compile"].startswith("traced")
    else:
        assert info["torch_compile"].startswith("eager")


# Names of torch internals: each may appear only in _torch_compat.py.
PRIVATE = [r"\btorch\._[a-z]\w*", r"\._init_group\(", r"_use_grad_for_differentiable", r"_step_supports_amp_scaling",
           r"_local_tensor", r"\bhooked\b", r"__wrapped__"]


def _code_lines(path: pathlib.Path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if code.strip() and not code.lstrip().startswith(("\"", "'", "``")):
            yield n, code


def test_torch_internals_are_used_in_one_module_only():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch_compat.py":
            continue
        in_doc = False
        for n, code in _code_lines(path):
            if code.count('"""') % 2 == 1:
                in_doc = not in_doc
                continue
            if in_doc:
                continue
            for pat in PRIVATE:
                if re.search(pat, code):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {code.strip()}")
    assert not offenders, "torch internals outside _torch_compat.py:\n" + "\n".join(offenders)


def test_the_scan_finds_an_internal():
    """The scan above is able to fail: a line using one is caught."""
    assert any(re.search(p, "x = torch._foreach_add(a, b)") for p in PRIVATE)
    assert any(re.search(p, "opt._init_group(group, ps)") for p in PRIVATE)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls", [fusedoptim.Adam, fusedoptim.AdamW])
def test_init_group_creates_torch_state(cls, amsgrad):
    """torch's _init_group, whatever its signature on this torch (AdamW's
    takes amsgrad before 2.6): the lists filled, the state in torch's layout."""
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    opt = cls([p], amsgrad=amsgrad)
    lists = [[] for _ in range(6)]
    compat.init_group(opt, opt.param_groups[0], *lists)
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = lists
    assert params == [p] and grads[0] is p.grad
    assert exp_avgs[0] is opt.state[p]["exp_avg"] and exp_avg_sqs[0] is opt.state[p]["exp_avg_sq"]
    assert steps[0] is opt.state[p]["step"] and float(steps[0]) == 0.0
    assert (len(max_sqs) == 1) == amsgrad


def test_unhooked_is_the_inner_step():
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch hooks the class's step
    inner = compat.unhooked(torch.optim.SGD.step)
    assert not getattr(inner, "hooked", False)
    assert inner.__qualname__.endswith("SGD.step")
    assert compat.unhooked(len) is len


def test_accepts_reads_torch_signatures():
    assert compat.accepts(torch.optim.Adam, "amsgrad")
    assert not compat.accepts(torch.optim.Adam, "no_such_keyword")
    assert compat.accepts(torch.optim.SGD, "fused") == (compat.TORCH_VERSION[:2] >= (2, 3))


def test_foreach_helpers():
    ts = [torch.full((3,), 6.0), torch.full((2,), 3.0)]
    compat.foreach_div_(ts, torch.tensor(3.0))
    assert [t.tolist() for t in ts] == [[2.0] * 3, [1.0] * 2]
    compat.foreach_mul_(ts, 0.5)
    assert [t.tolist() for t in ts] == [[1.0] * 3, [0.5] * 2]


def test_local_shard_of_a_plain_tensor_is_none():
    assert compat.local_shard(torch.zeros(2)) is None


@pytest.mark.skipif(compat.TRACE_STEP, reason="a torch whose Dynamo cannot trace the step (before 2.6)")
def test_compiled_step_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(fusedoptim._compile, "_warned_eager", False)  # once per process: as if first
    p = torch.randn(9, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, eager = fusedoptim.AdamW([p], lr=0.1), fusedoptim.AdamW([q], lr=0.1)
    step = torch.compile(lambda: opt.step())
    with pytest.warns(RuntimeWarning, match="runs eagerly, outside the graph") as record:
        for k in range(3):
            p.grad = torch.full_like(p, 0.1 * (k + 1))
            q.grad = p.grad.clone()
            step()
            eager.step()
    assert sum("outside the graph" in str(w.message) for w in record) == 1
    assert torch.equal(p, q)
