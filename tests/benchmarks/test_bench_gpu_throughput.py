"""Fast CPU checks of benchmarks/bench_gpu_throughput.py (its ``--smoke`` mode)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu_throughput.py"
RESULTS = ROOT / "benchmarks" / "results"


bench = load_benchmark("bench_gpu_throughput")


def _snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.glob("gpu_throughput.*")}


def test_smoke_times_every_config_on_cpu(tmp_path: Path) -> None:
    before = _snapshot()
    payload = bench.main(["--smoke", "--device", "cpu", "--archs", "vit_small"])
    # the smoke mode writes nothing into benchmarks/results unless --out is given
    assert _snapshot() == before

    meta, results = payload["meta"], payload["results"]
    assert meta["smoke"] is True
    assert meta["torch"] == torch.__version__
    assert "CPU" in meta["device_name"]
    assert meta["precision"] == "bf16"
    assert [r["config"] for r in results] == ["dino", "pwself-mean", "pwself-mean-patchaug",
                                              "pwself-mean-matched", "pwself-mean-unfused"]
    for r in results:
        assert r["batch"] == 4 and r["timed_steps"] == 2 and r["oom_batches"] == []
        assert r["precision"] == "bfloat16"
        assert r["images_per_s"] > 0
        # images/s is the timed images over the timed seconds
        assert r["images_per_s"] * r["s_per_step"] == pytest.approx(r["batch"])
        assert math.isfinite(r["mean_loss"]) and r["mean_loss"] > 0
        assert r["crops"] == "2x32 + 2x16" and r["patch_size"] == 8 and r["out_dim"] == 64
    # head tokens per image: CLS of 4 views (DINO); 2 x (1 + 4 x 4) + 2 x (1 + 2 x 2) (PW-Self)
    assert results[0]["student_tokens_per_image"] == 4
    assert results[1]["student_tokens_per_image"] == 44
    assert [r["patch_aug"] for r in results] == ["none", "none", "authors", "none", "none"]
    assert [r["loss"] for r in results] == ["dino"] + ["mean"] * 4
    assert [r["head_tokens"] for r in results] == ["all"] * 3 + ["matched", "all"]
    assert [r["fused_loss"] for r in results] == [None, "on", "on", "on", "off"]

    files = bench.write_results(payload, tmp_path)
    assert [f.name for f in files] == ["gpu_throughput.json", "gpu_throughput.md",
                                       "gpu_throughput_table.rst"]
    assert json.loads(files[0].read_text()) == json.loads(json.dumps(payload))
    md = files[1].read_text()
    assert "SMOKE RUN" in md and md.count("| vit_small/8 |") == 5
    rst = files[2].read_text()
    assert rst.startswith(".. list-table::") and rst.count("   * - vit_small/8") == 5
    assert "     - 1.00x" in rst  # DINO against itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu"])
    assert exc.value.code == 2
    assert "--smoke" in capsys.readouterr().err


def test_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--device", "cpu", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "--batch-size must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--device", "cpu", "--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds must be > 0" in capsys.readouterr().err


def test_median_round_keeps_the_middle_run_and_every_rate() -> None:
    runs = [{"config": "dino", "images_per_s": v} for v in (210.0, 190.0, 250.0)]
    med = bench.median_round(runs)
    assert med["images_per_s"] == 210.0 and med["images_per_s_rounds"] == [210.0, 190.0, 250.0]
    # the lower middle of an even count; failed rounds do not count
    failed = {"config": "dino", "images_per_s": None, "error": "out of memory"}
    assert bench.median_round(runs[:2] + [failed])["images_per_s"] == 190.0
    assert bench.median_round([failed]) is failed


def test_rounds_interleave_and_report_the_spread(tmp_path: Path) -> None:
    payload = bench.main(["--smoke", "--device", "cpu", "--archs", "vit_small", "--configs",
                          "dino", "pwself-mean", "--rounds", "3", "--out", str(tmp_path)])
    assert payload["meta"]["rounds"] == 3
    assert [r["config"] for r in payload["results"]] == ["dino", "pwself-mean"]
    for r in payload["results"]:
        rates = r["images_per_s_rounds"]
        assert len(rates) == 3 and sorted(rates)[1] == r["images_per_s"]
    md = (tmp_path / "gpu_throughput.md").read_text()
    assert "median of 3 rounds" in md
    assert len(re.findall(r"\| \d+\.\d \(\d+\.\d-\d+\.\d\) \|", md)) == 2
