"""``benchmarks/bench_matching.py``: the device mode's output and its argument checks."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.benchmarks import load_benchmark

bench = load_benchmark("bench_matching")


def _main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_matching.py", *argv])
    bench.main()


def test_device_mode_times_every_rule_and_esvit(monkeypatch, tmp_path):
    # "cpu:0" takes the device branch (any device other than the plain CPU of record)
    _main(monkeypatch, "--device", "cpu:0", "--repeat", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "matching_gpu.json").read_text())
    names = ["match_patches[half]", "match_patches[official]", "match_patches[centre]",
             "esvit_cosine_argmax"]
    assert list(res["seconds_per_step"]) == names
    assert all(v > 0 for v in res["seconds_per_step"].values())
    for name in names[:3]:  # speed-up = EsViT's time over the rule's
        want = res["seconds_per_step"]["esvit_cosine_argmax"] / res["seconds_per_step"][name]
        assert res["speedup_vs_esvit"][name] == pytest.approx(want, rel=0.01, abs=0.01)
    md = (tmp_path / "matching_gpu.md").read_text()
    assert md.count("| match_patches[") == 3 and "esvit_cosine_argmax" in md
    assert not (tmp_path / "matching.json").exists()  # the CPU record is not touched


def test_unknown_device_is_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        _main(monkeypatch, "--device", "bogus", "--out", str(tmp_path))
    assert err.value.code == 2 and "--device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        _main(monkeypatch, "--device", "cuda", "--out", str(tmp_path))
    assert err.value.code == 2 and "no CUDA device" in capsys.readouterr().err
