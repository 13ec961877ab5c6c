"""examples/train.py: a complete training loop with fusedoptim, run briefly."""

import argparse
import importlib.util
import pathlib

import pytest
import torch

import fusedoptim

from tolerances import EXAMPLE_FINAL_LOSS_RTOL

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train.py"


def _load():
    spec = importlib.util.spec_from_file_location("fusedoptim_example_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_example_trains_like_torch_and_resumes_exactly(optimizer, bf16):
    torch.set_num_threads(1)
    mod = _load()
    args = argparse.Namespace(optimizer=optimizer, steps=60, batch=64, dim=16, width=64,
                              lr=3e-3 if optimizer == "adamw" else 3e-2, eval_every=20, patience=10, bf16=bf16)
    ref = mod.train("torch", args)
    ours = mod.train("fusedoptim", args)
    resumed = mod.train("fusedoptim", args, resume_at=30)
    assert len(ours["train"]) == len(ref["train"]) == 60
    # Training really happened: the loss fell.
    assert sum(ours["train"][-10:]) < 0.7 * sum(ours["train"][:10])
    # Same curve as torch.optim, up to fp32 rounding differences that a few
    # dozen data-dependent steps amplify (see tolerances.py).
    for a, b in zip(ours["val"], ref["val"]):
        assert abs(a - b) <= EXAMPLE_FINAL_LOSS_RTOL * abs(b), (ours["val"], ref["val"])
    # The run reports its timings and which backend fusedoptim's step took.
    assert len(ours["step_s"]) == len(ours["opt_step_s"]) == 60
    assert all(0 < o <= s for o, s in zip(ours["opt_step_s"], ours["step_s"]))
    assert ours["backends"] == [f"native-cpu/{fusedoptim.get_cpu_isa()}"] and ref["backends"] is None
    # A checkpoint saved and loaded mid-run changes nothing, bit for bit.
    assert resumed["train"] == ours["train"]
    assert resumed["val"] == ours["val"]


def test_example_help_gives_each_option_a_description_and_default(capsys):
    mod = _load()
    with pytest.raises(SystemExit) as done:
        mod.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    for flag, default in (("--optimizer", "adamw"), ("--steps", "300"), ("--batch", "128"), ("--dim", "32"),
                          ("--width", "256"), ("--lr", "3e-3 for adamw"), ("--eval-every", "25"),
                          ("--patience", "4"), ("--no-bf16", "bf16 autocast")):
        entry = options[options.index(flag):].split("\n  --")[0]
        assert f"(default: {default}" in " ".join(entry.split()), entry
