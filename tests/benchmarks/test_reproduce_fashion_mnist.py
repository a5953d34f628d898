"""benchmarks/reproduce_fashion_mnist.py: statistics, tables, resumability and one tiny real grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


rep = load_benchmark("reproduce_fashion_mnist")


def fake(arm: str, seed: int, base: float) -> dict:
    return {"arm": arm, "seed": seed, "knn10": base + 1, "knn20": base, "linear": base + 10,
            "knn20_by_epoch": [40.0, base - 1, base], "wall_time_s": 5.0}


def test_summary_is_mean_std_over_seeds_and_paired_difference_to_dino():
    results = [fake("dino", 0, 50), fake("dino", 1, 52), fake("dino", 2, 57),
               fake("mean", 0, 53), fake("mean", 1, 53), fake("mean", 2, 60)]
    s = rep.summarise(results, ["dino", "mean"], [0, 1, 2])
    m, sd = s["mean"]["knn20"]
    assert m == pytest.approx((53 + 53 + 60) / 3)
    assert sd == pytest.approx(math.sqrt(((53 - m) ** 2 * 2 + (60 - m) ** 2) / 2))
    # paired by seed: differences 3, 1, 3
    d, dsd = s["mean"]["knn20_vs_dino"]
    assert d == pytest.approx(7 / 3)
    assert dsd == pytest.approx(math.sqrt(((3 - 7 / 3) ** 2 * 2 + (1 - 7 / 3) ** 2) / 2))
    assert s["dino"]["knn20_vs_dino"] is None
    assert s["mean"]["linear"][0] == pytest.approx(m + 10)
    assert [c[0] for c in s["dino"]["knn20_by_epoch"]] == pytest.approx([40, 52, 53])


def test_difference_uses_only_seeds_present_in_both_arms():
    results = [fake("dino", 0, 50), fake("mean", 0, 51), fake("mean", 1, 70)]
    s = rep.summarise(results, ["dino", "mean"], [0, 1])
    assert s["mean"]["n_seeds"] == 2
    d, dsd = s["mean"]["knn20_vs_dino"]
    assert d == 1 and math.isnan(dsd)


def test_tables_list_every_arm_with_signed_differences():
    results = [fake("dino", 0, 50), fake("dino", 1, 50), fake("sum", 0, 48), fake("sum", 1, 49)]
    s = rep.summarise(results, ["dino", "sum"], [0, 1])
    md = rep.markdown_table(s)
    assert md.count("\n| ") == 2 and "| sum | 2 | 49.50 ± 0.71 | 48.50 ± 0.71 |" in md
    assert "-1.50 ± 0.71" in md
    rst = rep.rst_table(s)
    assert "   * - sum" in rst and "     - -1.50 ± 0.71" in rst


def test_finished_run_is_not_trained_again(tmp_path):
    run = tmp_path / "runs" / "mean" / "seed4"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(fake("mean", 4, 61)))
    results = tmp_path / "results"
    # a recipe that cannot run: train.py would fail if it were launched
    assert rep.do_run(tmp_path / "runs", results, "mean", 4, ["--no-such-flag"], 1)["knn20"] == 61
    # ... and the result is kept with the committed results
    kept = json.loads(rep.kept_result(results, "mean", 4).read_text())
    assert kept["knn20"] == 61 and kept["recipe"] == ["--no-such-flag"]


def test_kept_result_continues_a_grid_on_another_machine(tmp_path):
    results = tmp_path / "results"
    path = rep.kept_result(results, "sum", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"recipe": ["--epochs", "3"], **fake("sum", 1, 44)}))
    empty_runs = tmp_path / "fresh"
    assert rep.do_run(empty_runs, results, "sum", 1, ["--epochs", "3"], 1)["knn20"] == 44
    assert not empty_runs.exists()
    with pytest.raises(ValueError, match="recipe"):
        rep.do_run(empty_runs, results, "sum", 1, ["--epochs", "4"], 1)


def test_tiny_grid_trains_evaluates_and_reports(tmp_path):
    recipe = ["--epochs", "1", "--train-subset", "64", "--test-subset", "40", "--batch-size", "16",
              "--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "32",
              "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
              "--local-crops-number", "2", "--warmup-epochs", "0"]
    out, results = tmp_path / "runs", tmp_path / "results"
    rep.main(["--out", str(out), "--results", str(results), "--arms", "dino", "mean",
              "--seeds", "0", "--workers", "2", "--", *recipe])
    data = json.loads((results / "reproduction.json").read_text())
    assert data["meta"]["runs_done"] == 2 and data["meta"]["recipe"] == recipe
    assert rep.kept_result(results, "dino", 0).is_file()
    for run in data["runs"]:
        for key in ("knn10", "knn20", "linear"):
            assert 0.0 <= run[key] <= 100.0
        # k-NN at initialisation and after the one epoch
        assert len(run["knn20_by_epoch"]) == 2 and run["knn20_by_epoch"][-1] == run["knn20"]
    # same seed, same initialisation: both arms start from the same k-NN accuracy
    assert data["runs"][0]["knn20_by_epoch"][0] == data["runs"][1]["knn20_by_epoch"][0]
    assert (results / "reproduction.png").stat().st_size > 0
    assert "| mean | 1 |" in (results / "reproduction.md").read_text()
