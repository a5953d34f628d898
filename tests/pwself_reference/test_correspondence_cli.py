"""``python -m pwself_reference.eval correspondence`` on the bundled data and on image folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pwself_reference.data import build_labelled_dataset
from pwself_reference.evaluation import PositionOnly, correspondence_recall, eval_transform
from pwself_reference.evaluation.cli import main
from pwself_reference.models import build_backbone
from tests.pwself_reference.test_eval_cli import write_checkpoint, write_imagefolder


def tiny_fashion_checkpoint(path: Path) -> Path:
    """train.py's checkpoint format for a 1-block ViT on the bundled 28 px images."""
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", patch_size=4, img_size=28, depth=1, embed_dim=32,
                         num_heads=2)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    config = {"arch": "vit_tiny", "patch_size": 4, "global_crop_size": 28, "local_crop_size": 12,
              "global_crops_scale": [0.4, 1.0], "local_crops_scale": [0.1, 0.4], "depth": 1,
              "embed_dim": 32, "num_heads": 2, "dataset": "fashion-mnist-mini",
              "data_path": None}
    torch.save({"config": config, "teacher": state, "student": state, "epoch": 0}, path)
    return path


def test_bundled_data_json_matches_the_library(tmp_path):
    ckpt = tiny_fashion_checkpoint(tmp_path / "ck.pth")
    assert main(["correspondence", "--checkpoint", str(ckpt), "--max-images", "40",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "eval_correspondence.json").read_text())
    assert record["protocol"] == "correspondence" and record["settings"]["n_images"] == 40
    res = record["results"]
    assert set(res) == {"backbone", "position_only"}
    for model in res.values():
        assert set(model["all"]) == {"non_flipped", "flipped", "global_local"}
        for grp, stats in model["all"].items():
            # Fashion-MNIST's black background: foreground is a strict subset of the tokens
            assert 0 < model["foreground"][grp]["tokens"] < stats["tokens"]
            assert stats["chance_at_1"] == round(100 / 49, 3)
    # the same numbers as the library on the same 40 images (evenly spaced over the split)
    test = build_labelled_dataset("fashion-mnist-mini", None, False, eval_transform(28, 1.0))
    idx = torch.linspace(0, len(test) - 1, 40).round().long().tolist()
    images = torch.stack([test[i][0] for i in idx])
    net = build_backbone("vit_tiny", patch_size=4, img_size=28, depth=1, embed_dim=32, num_heads=2)
    net.load_state_dict({k[9:]: v for k, v in torch.load(ckpt, weights_only=True)["teacher"].items()})
    kw = dict(global_size=28, local_size=12, foreground_std=0.1, local_scale=(0.1, 0.4))
    assert correspondence_recall(net, images, **kw)["all"] == res["backbone"]["all"]
    assert correspondence_recall(PositionOnly(net), images, **kw)["foreground"] == \
        res["position_only"]["foreground"]


def test_imagefolder_and_plain_image_directory(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck.pth")  # patch 16, 32 px, no local crops recorded
    data = write_imagefolder(tmp_path / "data")
    out = tmp_path / "folder.json"
    assert main(["correspondence", "--checkpoint", str(ckpt), "--dataset", "imagefolder",
                 "--data-path", str(data), "--num-workers", "0", "--output", str(out),
                 "--global-size", "32", "--source-size", "48"]) == 0
    record = json.loads(out.read_text())
    assert record["settings"]["n_images"] == 12 and record["settings"]["source_size"] == 48
    assert set(record["results"]["backbone"]["all"]) == {"non_flipped", "flipped"}
    assert record["results"]["backbone"]["all"]["flipped"]["candidates"] == 4
    out2 = tmp_path / "dir.json"
    assert main(["correspondence", "--checkpoint", str(ckpt), "--image-dir",
                 str(data / "val" / "red"), "--num-workers", "0", "--output", str(out2)]) == 0
    assert json.loads(out2.read_text())["settings"]["n_images"] == 4


def test_empty_image_directory_is_a_clear_error(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ck.pth")
    (tmp_path / "empty").mkdir()
    assert main(["correspondence", "--checkpoint", str(ckpt), "--image-dir",
                 str(tmp_path / "empty"), "--num-workers", "0"]) == 2
    assert "no images" in capsys.readouterr().err
