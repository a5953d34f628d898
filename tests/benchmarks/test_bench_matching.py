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


def test_device_mode_times_every_rule_and_both_esvit_baselines(monkeypatch, tmp_path):
    # "cpu:0" takes the device branch (any device other than the plain CPU of record)
    _main(monkeypatch, "--device", "cpu:0", "--repeat", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "matching_gpu.json").read_text())
    rules = [name for rule in ("half", "official", "centre")
             for name in (f"match_patches[{rule}]", f"match_view_pairs[{rule}]",
                          f"match_patches[{rule}], torch engine")]
    assert list(res["seconds_per_step"]) == [*rules, "esvit", "esvit_normalised_once"]
    assert all(v > 0 for v in res["seconds_per_step"].values())
    for base in ("esvit", "esvit_normalised_once"):
        for name in rules:  # speed-up = the baseline's time over the rule's
            want = res["seconds_per_step"][base] / res["seconds_per_step"][name]
            assert res["speedup"][base][name] == pytest.approx(want, rel=0.01, abs=0.01)
    md = (tmp_path / "matching_gpu.md").read_text()
    assert md.count("| match_patches[") == 6 and md.count("| match_view_pairs[") == 3
    assert "| esvit |" in md
    assert not (tmp_path / "matching.json").exists()  # the CPU record is not touched


def test_both_esvit_baselines_find_the_same_matches():
    g = torch.Generator().manual_seed(1)
    tokens_g = torch.randn(2, 3, 9, 8, generator=g)
    tokens_l = torch.randn(2, 3, 4, 8, generator=g)
    with torch.no_grad():
        per_pair = bench.esvit_step(tokens_g, tokens_l)
        once = bench.esvit_step_normalised_once(tokens_g, tokens_l)
    assert len(per_pair) == len(once) == 2 * (2 + 2 - 1)  # every teacher against every other view
    for a, b in zip(per_pair, once):
        assert torch.equal(a, b)
    # per student token, the teacher token of largest cosine similarity
    sim = torch.nn.functional.cosine_similarity(tokens_l[0][:, :, None], tokens_g[1][:, None], dim=-1)
    assert torch.equal(per_pair[-2], sim.argmax(-1))


def test_unknown_device_is_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        _main(monkeypatch, "--device", "bogus", "--out", str(tmp_path))
    assert err.value.code == 2 and "--device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        _main(monkeypatch, "--device", "cuda", "--out", str(tmp_path))
    assert err.value.code == 2 and "no CUDA device" in capsys.readouterr().err
