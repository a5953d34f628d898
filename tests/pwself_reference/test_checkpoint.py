"""Atomic checkpoints, weights-only loading and rebuilding the backbone."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pwself_reference.checkpoint import load_backbone, load_checkpoint, save_checkpoint
from pwself_reference.models import DINOHead, backbone_tokens, build_backbone


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("vit_tiny", 4, 16, depth=1, embed_dim=48, num_heads=3)
        self.head = DINOHead(48, 8, hidden_dim=16, bottleneck_dim=8)


CONFIG = {"arch": "vit_tiny", "patch_size": 4, "global_crop_size": 16, "depth": 1,
          "embed_dim": 48, "num_heads": 3, "dataset": "fashion-mnist-mini"}


def test_round_trip_and_backbone(tmp_path):
    torch.manual_seed(0)
    teacher, student = _Net(), _Net()
    path = save_checkpoint({"config": CONFIG, "teacher": teacher.state_dict(),
                            "student": student.state_dict(), "epoch": 2, "step": 10,
                            "rng": torch.get_rng_state()}, tmp_path / "sub" / "ck.pth")
    assert path.is_file() and os.listdir(path.parent) == ["ck.pth"]  # no temp file left
    ck = load_checkpoint(path)
    assert ck["epoch"] == 2 and ck["config"] == CONFIG
    x = torch.rand(2, 3, 16, 16)
    for which, net in (("teacher", teacher), ("student", student)):
        bb, cfg = load_backbone(path, which=which)
        assert cfg == CONFIG and not bb.training
        net.eval()
        torch.testing.assert_close(backbone_tokens(bb, x), backbone_tokens(net.backbone, x))


def test_loading_never_unpickles_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"config": CONFIG, "x": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path)


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint({"step": 1}, tmp_path / "ck.pth")
    with pytest.raises((AttributeError, TypeError, RuntimeError)):
        save_checkpoint({"step": 2, "bad": lambda: 0}, path)  # cannot be serialised
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ck.pth"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(TypeError):
        save_checkpoint([1, 2], tmp_path / "x.pth")
    path = save_checkpoint({"config": CONFIG, "teacher": {}}, tmp_path / "ck.pth")
    with pytest.raises(ValueError, match="which"):
        load_backbone(path, which="both")
    with pytest.raises(ValueError, match="student"):
        load_backbone(path, which="student")
    with pytest.raises(ValueError, match="backbone"):
        load_backbone(path, which="teacher")
