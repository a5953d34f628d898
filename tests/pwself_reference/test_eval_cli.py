"""The evaluation command line on tiny data: JSON contents and error handling."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pwself_reference.evaluation import (
    compute_map,
    eval_transform,
    evaluate_copy_detection,
    extract_features,
    gnd_medium,
    knn_classify,
)
from pwself_reference.evaluation.cli import main
from pwself_reference.models import build_backbone

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(path: Path) -> Path:
    """A checkpoint in train.py's format: config + prefixed teacher/student state dicts."""
    torch.manual_seed(0)
    teacher = build_backbone("vit_tiny", patch_size=16, img_size=32)
    student = build_backbone("vit_tiny", patch_size=16, img_size=32)
    ckpt = {
        "config": {"arch": "vit_tiny", "patch_size": 16, "global_crop_size": 32,
                   "dataset": "imagefolder"},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
        | {"head.last_v": torch.zeros(3, 3)},
        "student": {f"backbone.{k}": v for k, v in student.state_dict().items()},
        "epoch": 1,
    }
    torch.save(ckpt, path)
    return path


def write_imagefolder(root: Path) -> Path:
    """Three colour classes of noisy 32x32 images: root/{train,val}/<class>/*.png."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
    for split, n in (("train", 8), ("val", 4)):
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return write_checkpoint(tmp / "ck.pth"), write_imagefolder(tmp / "data"), tmp


def run(args):
    return main([str(a) for a in args])


def test_knn_cli_matches_the_library(setup, tmp_path):
    ckpt, data, _ = setup
    out = tmp_path / "knn.json"
    dump = tmp_path / "feats"
    rc = run(["knn", "--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
              "--nb-knn", 1, 5, "--num-workers", 0, "--resize-ratio", 1.0, "--output", out,
              "--dump-features", dump])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["protocol"] == "knn" and record["which"] == "teacher"
    assert record["settings"]["n_train"] == 24 and record["settings"]["n_test"] == 12
    assert set(record["results"]) == {"1", "5"}

    # the same numbers computed directly from the checkpoint's teacher backbone
    from pwself_reference.checkpoint import load_backbone
    from pwself_reference.data import build_labelled_dataset

    backbone, _ = load_backbone(ckpt)
    feats = {}
    for split, train in (("train", True), ("test", False)):
        ds = build_labelled_dataset("imagefolder", data, train, eval_transform(32, 1.0))
        feats[split] = extract_features(backbone, torch.utils.data.DataLoader(ds, batch_size=7))
    for k in (1, 5):
        top1, top5 = knn_classify(*feats["train"], *feats["test"], k=k)
        assert record["results"][str(k)] == {"top1": top1, "top5": top5}
    # colour classes are easy even for a random network
    assert record["results"]["5"]["top1"] >= 75.0


    # features dumped and reloaded give the same numbers, without the backbone
    out2 = tmp_path / "knn2.json"
    assert run(["knn", "--checkpoint", ckpt, "--load-features", dump, "--nb-knn", 1, 5,
                "--output", out2]) == 0
    assert json.loads(out2.read_text())["results"] == record["results"]


def test_student_backbone_is_selectable(setup, tmp_path):
    ckpt, data, _ = setup
    common = ["--dataset", "imagefolder", "--data-path", data, "--nb-knn", 1, "--num-workers", 0]
    t, s = tmp_path / "t.json", tmp_path / "s.json"
    assert run(["knn", "--checkpoint", ckpt, "--output", t, "--dump-features", tmp_path / "ft",
                *common]) == 0
    assert run(["knn", "--checkpoint", ckpt, "--which", "student", "--output", s,
                "--dump-features", tmp_path / "fs", *common]) == 0
    assert json.loads(s.read_text())["which"] == "student"
    ft = torch.load(tmp_path / "ft" / "train_features.pth", weights_only=True)
    fs = torch.load(tmp_path / "fs" / "train_features.pth", weights_only=True)
    assert ft.shape == fs.shape and not torch.allclose(ft, fs)


def test_knn_cli_errors(setup, tmp_path, capsys):
    ckpt, data, _ = setup
    rc = run(["knn", "--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
              "--nb-knn", 25, "--output", tmp_path / "x.json"])
    assert rc == 2
    assert "k=[25] larger than the 24 train images" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    rc = run(["knn", "--checkpoint", tmp_path / "missing.pth", "--output", tmp_path / "y.json"])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    rc = run(["knn", "--checkpoint", ckpt, "--dataset", "imagefolder",
              "--data-path", tmp_path / "nodata"])
    assert rc == 2 and "nodata" in capsys.readouterr().err
    rc = run(["knn", "--checkpoint", ckpt, "--load-features", tmp_path])
    assert rc == 2 and "train_features.pth not found" in capsys.readouterr().err


def test_linear_cli(setup, tmp_path):
    ckpt, data, _ = setup
    out = tmp_path / "lin.json"
    rc = run(["linear", "--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
              "--n-last-blocks", 2, "--avgpool-patchtokens", "--epochs", 4, "--lr", 0.5,
              "--batch-size", 8, "--num-workers", 0, "--cache-features", "--resize-ratio", 1.0,
              "--output", out])
    assert rc == 0
    record = json.loads(out.read_text())
    res = record["results"]
    assert record["settings"]["num_labels"] == 3 and record["settings"]["n_last_blocks"] == 2
    assert len(res["history"]) == 4
    assert res["best_top1"] == max(h["top1"] for h in res["history"])
    assert res["best_top1"] >= 75.0  # colour classes
    assert res["final_top5"] is None  # 3 classes: no top-5
    # DINO's default: fresh augmented views every epoch
    out2 = tmp_path / "lin2.json"
    rc = run(["linear", "--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
              "--n-last-blocks", 1, "--epochs", 1, "--batch-size", 8, "--num-workers", 0,
              "--output", out2])
    assert rc == 0
    assert len(json.loads(out2.read_text())["results"]["history"]) == 1


def test_copydays_cli(setup, tmp_path):
    pytest.importorskip("skimage")
    from pwself_reference.checkpoint import load_backbone
    from pwself_reference.evaluation.synthetic import make_copy_detection_benchmark

    ckpt, _, _ = setup
    bench = make_copy_detection_benchmark(tmp_path / "cd", n_strong=1, n_distractors=6,
                                          n_whitening=8)
    out = tmp_path / "cd.json"
    rc = run(["copydays", "--checkpoint", ckpt, "--data-path", bench, "--imsize", 32,
              "--blocks", "original", "strong", "--distractors-path", bench / "distractors",
              "--num-workers", 0, "--output", out])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    direct = evaluate_copy_detection(load_backbone(ckpt)[0], bench, imsize=32,
                                     blocks=["original", "strong"],
                                     distractors_path=bench / "distractors")
    assert set(res["mAP"]) == {"original", "strong"}
    assert res["mAP"] == pytest.approx(direct["mAP"])
    assert res["mAP"]["original"] == 100.0 and res["n_distractors"] == 6
    rc = run(["copydays", "--checkpoint", ckpt, "--data-path", tmp_path / "none",
              "--output", tmp_path / "none.json"])
    assert rc == 2


def write_revisited(root: Path) -> Path:
    """A tiny rOxford-like set: queries are exact copies of some database images."""
    rng = np.random.default_rng(1)
    d = root / "roxford5k" / "jpg"
    d.mkdir(parents=True)
    imlist = [f"db{i}" for i in range(8)]
    for name in imlist:
        arr = rng.integers(0, 255, (3, 3, 3)).repeat(16, 0).repeat(16, 1)  # 48x48 blocks
        Image.fromarray(arr.astype(np.uint8)).save(d / f"{name}.jpg", quality=95)
    qimlist = ["q0", "q1"]
    for q, src in zip(qimlist, ("db2", "db5")):
        shutil.copy(d / f"{src}.jpg", d / f"{q}.jpg")
    gnd = [
        {"bbx": [0.0, 0.0, 48.0, 48.0], "easy": np.array([2]), "hard": np.array([], dtype=int),
         "junk": np.array([7])},
        {"bbx": [0.0, 0.0, 32.0, 32.0], "easy": np.array([], dtype=int), "hard": np.array([5]),
         "junk": np.array([], dtype=int)},
    ]
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(cfg))
    return root


def test_retrieval_cli(setup, tmp_path):
    ckpt, _, _ = setup
    root = write_revisited(tmp_path / "rev")
    out = tmp_path / "ret.json"
    rc = run(["retrieval", "--checkpoint", ckpt, "--data-path", root, "--dataset", "roxford5k",
              "--imsize", 40, "--multiscale", "--num-workers", 0, "--output", out])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    # each query's exact copy is ranked first: AP 1 (the hard split skips q0: no hard image)
    assert res["mAP_medium"] == 100.0 and res["mAP_hard"] == 100.0
    assert res["mP@k_medium"][0] == 100.0
    assert res["n_database"] == 8 and res["n_queries"] == 2
    assert json.loads(out.read_text())["settings"]["multiscale"] is True
    # sanity of the protocol on this set
    m, _, _, _ = compute_map(np.arange(8)[:, None].repeat(2, 1), gnd_medium(
        [{"easy": [2], "hard": [], "junk": [7]}, {"easy": [], "hard": [5], "junk": []}]))
    assert m == pytest.approx(((0 + 1 / 3) / 2 + (0 + 1 / 6) / 2) / 2)
    # a missing image is reported
    (root / "roxford5k" / "jpg" / "db3.jpg").unlink()
    assert run(["retrieval", "--checkpoint", ckpt, "--data-path", root,
                "--output", tmp_path / "r3.json"]) == 2


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "pwself_reference.eval", "knn", "--checkpoint",
         str(tmp_path / "none.pth")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "checkpoint not found" in proc.stderr


def test_knn_cli_default_resize_ratio_is_the_checkpoints(setup, tmp_path):
    """Without --resize-ratio the CLI resizes as train.py's k-NN monitor did."""
    ckpt, data, _ = setup
    ck = torch.load(ckpt, weights_only=True)
    results = {}
    for ratio in (1.0, 1.5):
        ck["config"]["eval_resize_ratio"] = ratio
        path = tmp_path / f"ck{ratio}.pth"
        torch.save(ck, path)
        out = tmp_path / f"knn{ratio}.json"
        assert run(["knn", "--checkpoint", path, "--dataset", "imagefolder", "--data-path", data,
                    "--nb-knn", 1, "--num-workers", 0, "--output", out]) == 0
        results[ratio] = json.loads(out.read_text())
        assert results[ratio]["settings"]["resize_ratio"] == ratio
    explicit = tmp_path / "explicit.json"
    assert run(["knn", "--checkpoint", tmp_path / "ck1.5.pth", "--dataset", "imagefolder",
                "--data-path", data, "--nb-knn", 1, "--num-workers", 0, "--resize-ratio", 1.0,
                "--output", explicit]) == 0
    assert json.loads(explicit.read_text())["results"] == results[1.0]["results"]
