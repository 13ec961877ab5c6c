"""examples/train.py: a complete training loop with fusedoptim, run briefly."""

import argparse
import importlib.util
import pathlib

import pytest
import torch

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
    # A checkpoint saved and loaded mid-run changes nothing, bit for bit.
    assert resumed["train"] == ours["train"]
    assert resumed["val"] == ours["val"]
