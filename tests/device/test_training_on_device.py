"""``train.py`` end to end on the device: every precision, resume, k-NN."""

from __future__ import annotations

import json

import pytest
import torch

from pwself_reference import train as train_mod
from pwself_reference.checkpoint import load_checkpoint
from tests.device.conftest import DEVICE
from tests.pwself_reference.test_train import TINY

#: fp16 autocast needs CUDA (train.py refuses it elsewhere)
PRECISIONS = ["fp32", "bf16"] + (["fp16"] if DEVICE.startswith("cuda") else [])


def _steps(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "step"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("loss", ["dino", "mean"])
def test_short_run_per_precision(device, tmp_path, precision, loss):
    out = tmp_path / f"{loss}-{precision}"
    train_mod.main(TINY + ["--output-dir", str(out), "--device", str(device), "--loss", loss,
                           "--precision", precision, "--knn-every", "1", "--patch-aug",
                           "paper", "--freeze-last-layer", "0"])
    final = load_checkpoint(out / "final.pth")
    assert final["step"] == 4 and final["config"]["precision"] == precision
    steps = _steps(out)
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(torch.isfinite(v).all() for v in final["student"].values())
    knn = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()
           if "knn_top1" in x]
    assert knn and 0.0 <= knn[-1]["knn_top1"] <= 100.0


def test_resume_on_device_continues_where_it_stopped(device, tmp_path):
    extra = ["--epochs", "2", "--loss", "mean", "--device", str(device), "--precision", "bf16"]
    out = tmp_path / "killed"
    stopped = train_mod.main(TINY + ["--output-dir", str(out), *extra, "--save-every-steps", "1",
                                     "--stop-after-steps", "6"])
    assert stopped["stopped"] and stopped["steps"] == 6 and not (out / "final.pth").exists()
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 6
    train_mod.main(TINY + ["--output-dir", str(out), *extra, "--resume"])
    assert [r["step"] for r in _steps(out)] == list(range(1, 9))
    assert load_checkpoint(out / "final.pth")["step"] == 8
