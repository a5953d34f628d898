"""End-to-end training runs on tiny data with a tiny ViT (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pwself_reference import train as train_mod
from pwself_reference.augment import CropSpec, batched_multicrop
from pwself_reference.checkpoint import load_checkpoint
from pwself_reference.config import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--train-subset", "64", "--test-subset", "40", "--batch-size", "16", "--epochs", "1",
    "--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "32",
    "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--local-crops-number", "2",
    "--knn-every", "0", "--no-plots", "--no-progress", "--threads", "1", "--log-every", "1",
    "--warmup-epochs", "0",
]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    train_mod.main(TINY + ["--output-dir", str(out), *extra])
    return out


@pytest.mark.parametrize("loss", ["dino", "mean", "sum", "lambda"])
def test_one_short_epoch_per_loss(tmp_path, loss):
    out = _run(tmp_path, loss, "--loss", loss, "--lambda", "0.3", "--freeze-last-layer", "0")
    final = load_checkpoint(out / "final.pth")
    assert final["config"]["loss"] == loss and final["step"] == 4 and final["epoch"] == 1
    assert not list(out.glob("checkpoint0*.pth"))  # --saveckp-freq is off by default
    steps = [r for r in _records(out) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    matched = steps[0]["matched_tokens"]
    assert matched == 1.0 if loss == "dino" else matched > 1.0
    # the student moved, and the teacher followed it by EMA (momentum < 1)
    torch.manual_seed(0)
    args = parse_args(TINY + ["--output-dir", str(out)])
    init = train_mod.build_network(args, 0.0).state_dict()
    for key in ("backbone.blocks.0.attn.qkv.weight", "head.last_v"):
        s, t, i = final["student"][key], final["teacher"][key], init[key]
        assert not torch.equal(s, i) and not torch.equal(t, i)
        assert (t - i).abs().sum() < (s - i).abs().sum()


def test_head_tokens_matched_trains_with_the_loss_of_all(tmp_path):
    """The first step (zero centre) has the same loss; the resolved config states the centre."""
    runs = {mode: _run(tmp_path, mode, "--head-tokens", mode, "--center", "per-token")
            for mode in ("all", "matched")}
    first = {mode: _records(out)[0]["loss"] for mode, out in runs.items()}
    assert first["matched"] == pytest.approx(first["all"], rel=1e-5)
    config = json.loads((runs["matched"] / "config.json").read_text())
    assert config["head_tokens"] == "matched"
    assert "matched pair" in config["center_batch_mean"]
    assert "every token" in json.loads((runs["all"] / "config.json").read_text())[
        "center_batch_mean"]


def test_resume_is_exact(tmp_path):
    extra = ["--epochs", "2", "--loss", "mean", "--drop-path", "0.1"]
    ref = _run(tmp_path, "ref", *extra)
    # killed mid-epoch 2 with step checkpoints, then resumed
    out = tmp_path / "killed"
    stopped = train_mod.main(TINY + ["--output-dir", str(out), *extra, "--save-every-steps", "1",
                                     "--stop-after-steps", "6"])
    assert stopped["stopped"] and stopped["steps"] == 6 and not (out / "final.pth").exists()
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 6
    train_mod.main(TINY + ["--output-dir", str(out), *extra, "--resume"])
    # killed without step checkpoints: resumes from the end of epoch 1
    out2 = tmp_path / "killed2"
    assert train_mod.main(TINY + ["--output-dir", str(out2), *extra,
                                  "--stop-after-steps", "6"])["stopped"]
    assert load_checkpoint(out2 / "checkpoint.pth")["step"] == 4
    train_mod.main(TINY + ["--output-dir", str(out2), *extra, "--resume"])
    a = load_checkpoint(ref / "final.pth")
    for other in (out, out2):
        b = load_checkpoint(other / "final.pth")
        for which in ("student", "teacher"):
            for k, v in a[which].items():
                assert torch.equal(v, b[which][k]), (other.name, which, k)
        assert torch.equal(a["criterion"]["center"], b["criterion"]["center"])
        assert [r["step"] for r in _records(other) if r["type"] == "step"] == list(range(1, 9))


def test_saveckp_freq_keeps_every_nth_epoch(tmp_path):
    out = _run(tmp_path, "keep", "--epochs", "3", "--saveckp-freq", "2")
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth",
                                                                   "checkpoint0002.pth"]
    kept, final = load_checkpoint(out / "checkpoint0002.pth"), load_checkpoint(out / "final.pth")
    assert (kept["epoch"], kept["step"], final["step"]) == (2, 8, 12)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    # it is the state after epoch 2: resuming from it ends with the same weights
    again = tmp_path / "from_epoch2"
    again.mkdir()
    shutil.copy(out / "checkpoint0002.pth", again / "checkpoint.pth")
    train_mod.main(TINY + ["--output-dir", str(again), "--epochs", "3", "--resume"])
    resumed = load_checkpoint(again / "final.pth")
    for which in ("student", "teacher"):
        for k, v in final[which].items():
            assert torch.equal(v, resumed[which][k]), (which, k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_forward = train_mod.PWSelfLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_mod.PWSelfLoss, "forward", forward)
    out = tmp_path / "nan"
    with pytest.raises(train_mod.NonFiniteLossError, match="nan.*checkpoint"):
        train_mod.main(TINY + ["--output-dir", str(out), "--epochs", "2"])
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["step"] == 4 and ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["student"].values())
    assert not (out / "final.pth").exists()


def test_loader_crops_same_spatial_and_patch_aug(tmp_path):
    out = _run(tmp_path, "loader", "--crops", "loader", "--num-workers", "1", "--same-spatial-aug", "--patch-aug",
               "paper", "--center", "per-token", "--match-rule", "official",
               "--local-crops-number", "0")
    ck = load_checkpoint(out / "final.pth")
    assert ck["criterion"]["center"].shape == (1, 1 + 7 * 7, 32)
    assert ck["config"]["same_spatial_aug"] and ck["config"]["crops"] == "loader"


def test_same_spatial_aug_shares_boxes_and_flips():
    images = torch.rand(6, 3, 28, 28)
    spec = CropSpec(28, 12, n_local=2)
    shared = batched_multicrop(images, spec, shared=True)
    assert (shared.boxes == shared.boxes[:, :1]).all() and (shared.flips == shared.flips[:, :1]).all()
    torch.manual_seed(0)
    own = batched_multicrop(images, spec, shared=False)
    assert not (own.boxes == own.boxes[:, :1]).all()


def test_main_job_code_path_reduced(tmp_path):
    """``python pwself_reference/train.py`` with only the size reduced: every output is written."""
    out = tmp_path / "main"
    cmd = [sys.executable, str(ROOT / "pwself_reference" / "train.py"), "--output-dir", str(out),
           "--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "k-NN (k=20) at initialisation: top-1" in res.stdout
    assert "k-NN top-1:" in res.stdout and "wall time" in res.stdout
    assert "epoch 1/1 [####################] 4/4" in res.stderr and "img/s" in res.stderr
    for name in ("final.pth", "checkpoint.pth", "config.json", "log.jsonl", "curves.png",
                 "matches.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "fashion-mnist-mini" and config["loss"] == "mean"
    kinds = [r["type"] for r in _records(out)]
    assert kinds[0] == "knn" and "epoch" in kinds and kinds.count("knn") == 2
    knn = [r for r in _records(out) if r["type"] == "knn"]
    assert all(0 <= r["top1"] <= 100 for r in knn)


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "pwself_reference" / "train.py"),
           *TINY, "--output-dir", str(out), "--device", "cpu", "--knn-every", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and res.stdout.count("k-NN (k=20) at initialisation") == 1
    ck = load_checkpoint(out / "final.pth")
    assert ck["world_size"] == 2 and ck["step"] == 2  # 64 images / (16 x 2 processes)
    steps = [r["step"] for r in _records(out) if r["type"] == "step"]
    assert steps == [1, 2]  # written by rank 0 only


@pytest.mark.parametrize("flags, match", [
    (["--patch-size", "5"], "--global-crop-size 28 is not a multiple of --patch-size 5"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--arch", "resnet50"], "--arch"),
    (["--arch", "vit_nonexistent"], "--arch"),
    (["--dataset", "fashion-mnist", "--data-path", "/no/such/dir"], "--data-path"),
    (["--dataset", "cifar10"], "--data-path"),
    (["--global-crops-number", "0"], "--global-crops-number"),
    (["--lambda", "1.5"], "--lambda"),
    (["--lambda", "-0.1"], "--lambda"),
    (["--local-crop-size", "10"], "--local-crop-size 10 is not a multiple"),
    (["--global-crops-scale", "0.5", "1.5"], "--global-crops-scale"),
    (["--resume"], "--resume"),
    (["--saveckp-freq", "-1"], "--saveckp-freq"),
])
def test_bad_configuration_fails_before_training(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        parse_args(["--output-dir", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()


def test_cli_reports_bad_configuration(tmp_path):
    cmd = [sys.executable, str(ROOT / "pwself_reference" / "train.py"), "--lambda", "2",
           "--output-dir", str(tmp_path / "x")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "--lambda must be in [0, 1]" in res.stderr


def test_presets_apply_and_flags_override():
    args = parse_args(["--preset", "cifar10-vit-tiny16-lambda0.2", "--data-path", "/tmp",
                       "--epochs", "3"])
    assert (args.dataset, args.arch, args.patch_size, args.loss, args.lam) == (
        "cifar10", "vit_tiny", 16, "lambda", 0.2)
    assert (args.global_crop_size, args.local_crop_size, args.out_dim) == (224, 96, 1000)
    assert args.depth is None and args.epochs == 3


def test_main_leaves_subnormal_floats_representable(tmp_path):
    """train.main flushes subnormals for speed while it runs, not after it returns."""
    tiny = torch.tensor(1e-310, dtype=torch.float64)
    assert tiny.item() != 0.0
    train_mod.main([*TINY, "--output-dir", str(tmp_path / "run")])
    assert (tiny * 1.0).item() != 0.0
    assert sys.float_info.min * 0.5 != 0.0  # Python floats too (hypothesis relies on it)


# ----------------------------------------------------------------------------- matching in the loader
@pytest.mark.parametrize("rule", ["half", "centre"])
def test_loader_matches_equal_the_step_matches(rule):
    """``MatchingCollate``'s matches are bit for bit those the step computes (same pairs, same dict)."""
    from PIL import Image

    from pwself_reference.augment import MatchingCollate, MultiCropDataset, collate_multicrop

    g = torch.Generator().manual_seed(0)
    base = [(Image.fromarray((torch.rand(36 + 4 * k, 40, 3, generator=g) * 255).byte().numpy()), 0)
            for k in range(5)]
    ds = MultiCropDataset(base, CropSpec(28, 12, n_global=2, n_local=3), seed=1)
    samples = [ds[k] for k in range(len(ds))]
    loader_side = MatchingCollate(2, 4, rule)(samples).matches
    step_side = train_mod.match_batch(collate_multicrop(samples), 2, 4, rule)
    assert list(loader_side) == list(step_side)
    for key, want in step_side.items():
        got = loader_side[key]
        for a, b in zip((got.idx_a, got.idx_b, got.valid), (want.idx_a, want.idx_b, want.valid)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_loader_path_trains_on_the_loader_matches(tmp_path, monkeypatch):
    """On ``--crops loader`` the step does not match; the run equals one matching in the step."""
    from pwself_reference import augment

    extra = ["--crops", "loader", "--loss", "mean", "--match-rule", "centre", "--num-workers", "1"]
    step_calls: list[int] = []
    real = train_mod.match_batch

    def counted(*a, **k):
        step_calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "match_batch", counted)
    loader_run = _run(tmp_path, "loader", *extra)
    assert step_calls == []
    # the same run with plain collation: the step computes the matches itself (the fallback)
    monkeypatch.setattr(train_mod, "MatchingCollate",
                        lambda *a, **k: augment.collate_multicrop)
    step_run = _run(tmp_path, "step", *extra)
    assert len(step_calls) == 4
    a, b = load_checkpoint(loader_run / "final.pth"), load_checkpoint(step_run / "final.pth")
    for which in ("student", "teacher"):
        for k, v in a[which].items():
            assert torch.equal(v, b[which][k]), (which, k)


def test_profile_shows_step_matching_only_without_loader_matches(tmp_path):
    """The step's fallback matching runs in a "match_patches" profiler range."""
    from torch.profiler import ProfilerActivity, profile

    names = {}
    for crops in ("batched", "loader"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _run(tmp_path, crops, "--crops", crops, "--loss", "mean", "--train-subset", "32")
        names[crops] = {e.key for e in prof.key_averages()}
    assert "match_patches" in names["batched"] and "match_patches" not in names["loader"]


def test_console_entry_points_name_the_cli_functions():
    """``pwself-train`` and ``pwself-eval`` (pyproject.toml) resolve to the two CLIs."""
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"pwself-train", "pwself-eval"}
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
    assert scripts["pwself-train"] == "pwself_reference.train:cli"


def test_script_runs_without_a_path_hack(tmp_path):
    """``python pwself_reference/train.py --help`` from anywhere, the package installed."""
    res = subprocess.run([sys.executable, str(ROOT / "pwself_reference" / "train.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--head-tokens" in res.stdout
    assert "sys.path" not in (ROOT / "pwself_reference" / "train.py").read_text()
