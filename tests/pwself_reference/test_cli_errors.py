"""The command lines on bad input: one clear line on stderr, a non-zero exit, no traceback.

``train.py`` (its ``cli`` entry point) and ``python -m pwself_reference.eval`` given a
missing or corrupt checkpoint, a data path without images, an unknown dataset name or an
output directory that cannot be written; ``--debug`` shows the traceback instead. A
finished run's ``final.pth`` is never overwritten.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pwself_reference.evaluation.cli import main as eval_main
from pwself_reference.train import cli as train_cli
from tests.pwself_reference.test_eval_cli import write_checkpoint, write_imagefolder

REPO = Path(__file__).resolve().parents[2]
# a tiny, fast training: the errors below happen before or at the first step
TINY = ["--epochs", "1", "--knn-every", "0", "--train-subset", "64", "--batch-size", "32",
        "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--num-workers", "0",
        "--no-plots", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "corrupt.pth").write_bytes(b"not a checkpoint")
    (tmp / "no_images").mkdir()
    (tmp / "a_file").write_text("x")
    return {"ckpt": write_checkpoint(tmp / "ck.pth"), "data": write_imagefolder(tmp / "data"),
            "corrupt": tmp / "corrupt.pth", "no_images": tmp / "no_images",
            "a_file": tmp / "a_file", "tmp": tmp}


def one_line_error(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- eval

def knn_args(files, **over) -> list[str]:
    args = {"--checkpoint": files["ckpt"], "--dataset": "imagefolder", "--data-path": files["data"],
            "--nb-knn": 1, "--num-workers": 0, "--output": files["tmp"] / "knn.json"} | over
    return ["knn"] + [str(v) for kv in args.items() for v in kv]


@pytest.mark.parametrize(("over", "words"), [
    ({"--checkpoint": "{tmp}/missing.pth"}, ["checkpoint not found", "missing.pth"]),
    ({"--checkpoint": "{corrupt}"}, ["corrupt.pth", "not a readable checkpoint"]),
    ({"--data-path": "{no_images}"}, ["data_path", "no_images"]),
    ({"--data-path": "{tmp}/nowhere"}, ["data_path", "nowhere"]),
    ({"--dataset": "imagenet-9000"}, ["dataset", "imagenet-9000"]),
    ({"--output": "{a_file}/sub/knn.json"}, ["--output", "cannot write"]),
    ({"--output": "{tmp}"}, ["--output", "is a directory"]),
], ids=["missing-ckpt", "corrupt-ckpt", "no-images", "missing-data", "unknown-dataset",
        "unwritable-output", "output-is-dir"])
def test_eval_bad_input_is_one_line(files, capsys, over, words):
    over = {k: v.format(**files) for k, v in over.items()}
    assert eval_main(knn_args(files, **over)) == 2
    one_line_error(capsys.readouterr().err, *words)


def test_eval_debug_shows_the_exception(files):
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        eval_main(knn_args(files, **{"--checkpoint": files["corrupt"]}) + ["--debug"])


def test_eval_checks_the_output_before_running(files, capsys, monkeypatch):
    import pwself_reference.evaluation.cli as cli

    ran = []
    monkeypatch.setitem(cli._RUNNERS, "knn", lambda args, device: ran.append(1) or {})
    assert eval_main(knn_args(files, **{"--output": f"{files['a_file']}/x.json"})) == 2
    assert not ran


def test_eval_module_entry_point_prints_no_traceback(files):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pwself_reference.eval", *knn_args(
        files, **{"--checkpoint": files["corrupt"]})], capture_output=True, text=True, env=env,
        cwd=files["tmp"], timeout=300)
    assert proc.returncode == 2
    one_line_error(proc.stderr, "corrupt.pth")


# ----------------------------------------------------------------------------- train

@pytest.mark.parametrize(("args", "words"), [
    (["--output-dir", "{tmp}/fresh", "--resume"], ["checkpoint.pth"]),
    (["--output-dir", "{tmp}/corrupt_run", "--resume"], ["checkpoint.pth", "not a readable checkpoint"]),
    (["--output-dir", "{tmp}/r1", "--dataset", "imagefolder", "--data-path", "{no_images}"],
     ["data_path", "no_images"]),
    (["--output-dir", "{tmp}/r2", "--dataset", "imagenet-9000", "--data-path", "{data}"],
     ["--dataset", "imagenet-9000"]),
    (["--output-dir", "{a_file}/run"], ["a_file"]),
], ids=["resume-missing-ckpt", "resume-corrupt-ckpt", "no-images", "unknown-dataset",
        "unwritable-output"])
def test_train_bad_input_is_one_line(files, capsys, args, words):
    (files["tmp"] / "corrupt_run").mkdir(exist_ok=True)
    (files["tmp"] / "corrupt_run" / "checkpoint.pth").write_bytes(b"\x80\x02garbage")
    assert train_cli([a.format(**files) for a in args] + TINY) == 2
    one_line_error(capsys.readouterr().err, *words)


def test_train_never_overwrites_a_finished_run(files, capsys):
    run = files["tmp"] / "finished"
    run.mkdir()
    (run / "final.pth").write_bytes(b"the finished run's weights")
    (run / "config.json").write_text("{}")
    assert train_cli(["--output-dir", str(run)] + TINY) == 2
    one_line_error(capsys.readouterr().err, "finished run", "final.pth")
    assert (run / "final.pth").read_bytes() == b"the finished run's weights"
    assert (run / "config.json").read_text() == "{}"


def test_train_debug_is_a_listed_flag_kept_out_of_the_configuration(files):
    from pwself_reference.config import build_parser, parse_args, to_dict

    assert "--debug" in build_parser().format_help()
    args = parse_args(["--output-dir", str(files["tmp"] / "r4"), "--debug"] + TINY)
    assert args.debug and "debug" not in to_dict(args)  # config.json and checkpoints


def test_train_debug_shows_the_exception(files):
    with pytest.raises(ValueError, match="imagenet-9000"):
        train_cli(["--output-dir", str(files["tmp"] / "r3"), "--dataset", "imagenet-9000", "--debug"]
                  + TINY)
