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


def corr(base: float) -> dict:
    def group(r: float) -> dict:
        return {"recall_at_1": r, "recall_within_1": r + 20, "chance_at_1": 2.041}
    return {"model": {"foreground": {g: group(base + i) for i, g in enumerate(rep.CORR_GROUPS)}},
            "position_only": {"foreground": {g: group(5.0) for g in rep.CORR_GROUPS}}}


def test_correspondence_columns_curves_and_baseline_rows():
    runs = [dict(fake("dino", s, 50), correspondence=corr(10 + s),
                 corr_by_epoch={"1": {g: 10.0 + s for g in rep.CORR_GROUPS}}) for s in (0, 1)]
    runs += [dict(fake("mean", s, 52), correspondence=corr(14 + 2 * s),
                  corr_by_epoch={"1": {g: 12.0 for g in rep.CORR_GROUPS}}) for s in (0, 1)]
    runs.append(fake("sum", 0, 51))  # a run finished before correspondence existed
    s = rep.summarise(runs, ["dino", "mean", "sum"], [0, 1])
    assert s["mean"]["corr_non_flipped"] == pytest.approx((15, math.sqrt(2)))
    assert s["mean"]["corr_flipped_vs_dino"] == pytest.approx((4.5, math.sqrt(0.5)))
    assert s["sum"]["corr_flipped"] is None and s["sum"]["corr_flipped_vs_dino"] is None
    assert s["dino"]["corr_by_epoch"]["1"]["global_local"] == pytest.approx((10.5, math.sqrt(0.5)))
    pixels = {"knn10": 80.0, "knn20": 78.6, "linear": 82.0}
    untrained = [dict(fake("untrained", s, 45), correspondence=corr(3.0 + s)) for s in (0, 1)]
    base = rep.summarise_baselines(pixels, untrained)
    assert list(base) == ["raw pixels", "untrained network", "position-only (untrained)",
                          "chance"]
    md = rep.markdown_table(s, base)
    assert "| *raw pixels* | — | 80.00 | 78.60 | 82.00 | — | — |" in md
    assert "| *untrained network* | 2 | 46.00 ± 0.00 | 45.00 ± 0.00 | 55.00 ± 0.00 |" in md
    assert "position-only" not in md  # no classification figures: no row
    md = rep.markdown_table(s, base, rep.CORR_COLS)
    assert "| sum | 1 | — | — | — | — | — |" in md
    assert "| *position-only (untrained)* | 2 | 5.00 ± 0.00 |" in md
    assert "| *chance* | — | 2.04 | 2.04 | 2.04 | — | — |" in md
    assert "raw pixels" not in md


def test_p7_arms_pair_with_dino_of_their_patch_size():
    assert rep.ARMS["mean-patchaug-p7"][-4:] == ["--patch-size", "7", "--local-crop-size", "14"]
    assert rep.paired_baseline("mean-p7") == "dino-p7" and rep.paired_baseline("mean") == "dino"
    runs = [fake("dino", 0, 50), fake("dino-p7", 0, 40), fake("mean-p7", 0, 43)]
    s = rep.summarise(runs, ["dino", "dino-p7", "mean-p7"], [0])
    assert s["mean-p7"]["knn20_vs_dino"][0] == 3 and s["dino-p7"]["knn20_vs_dino"] is None


def test_snapshots_keep_the_teacher_backbone_of_each_epoch_checkpoint(tmp_path):
    import torch

    from pwself_reference.checkpoint import load_backbone, load_checkpoint, save_checkpoint

    backbone, config = rep.untrained_backbone(["--depth", "1", "--embed-dim", "16",
                                               "--num-heads", "2"], "dino", 0)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for epoch in (1, 3):  # train.py --saveckp-freq: checkpointNNNN.pth after NNNN epochs
        save_checkpoint({"config": config, "teacher": {**state, "head.w": torch.zeros(2)},
                         "optimizer": {"state": torch.ones(3)}, "epoch": epoch},
                        tmp_path / f"checkpoint{epoch:04d}.pth")
    save_checkpoint({"config": config, "teacher": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    snaps = rep.collect_snapshots(tmp_path)
    assert [p.name for p in snaps] == ["teacher_epoch001.pth", "teacher_epoch003.pth"]
    # the numbered checkpoints are gone once kept as snapshots; the rolling one stays
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pth")) == ["checkpoint.pth"]
    net, _ = load_backbone(snaps[1], "teacher")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  backbone.state_dict().values()))
    assert set(load_checkpoint(snaps[0])) == {"config", "teacher", "epoch"}
    assert all(k.startswith("backbone.") for k in load_checkpoint(snaps[0])["teacher"])
    # repeating (a kill after the snapshots) changes nothing; final.pth adds its epoch
    save_checkpoint({"config": config, "teacher": state, "epoch": 4}, tmp_path / "final.pth")
    assert [p.name for p in rep.collect_snapshots(tmp_path)] == [
        "teacher_epoch001.pth", "teacher_epoch003.pth", "teacher_epoch004.pth"]


def test_tiny_long_grid_trains_evaluates_and_reports(tmp_path):
    recipe = ["--epochs", "2", "--train-subset", "64", "--test-subset", "40", "--batch-size", "16",
              "--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "32",
              "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
              "--local-crops-number", "2", "--warmup-epochs", "0"]
    out, results = tmp_path / "runs", tmp_path / "results"
    rep.main(["--grid", "long", "--out", str(out), "--results", str(results), "--arms", "dino",
              "mean", "--seeds", "0", "--workers", "2", "--", *recipe])
    data = json.loads((results / "reproduction_long.json").read_text())
    assert data["meta"]["runs_done"] == 2 and data["meta"]["recipe"] == recipe
    assert rep.kept_result(results, "dino", 0, "reproduction_runs/long").is_file()
    for run in data["runs"]:
        for key in ("knn10", "knn20", "linear"):
            assert 0.0 <= run[key] <= 100.0
        # k-NN at initialisation and after each epoch
        assert len(run["knn20_by_epoch"]) == 3 and run["knn20_by_epoch"][-1] == run["knn20"]
        # per-epoch correspondence from the teacher of every epoch (--saveckp-freq 1)
        assert set(run["corr_by_epoch"]) == {"1", "2"}
        for g in rep.CORR_GROUPS:
            assert 0.0 <= rep.corr_value(run, g) <= 100.0
    # same seed, same initialisation: both arms start from the same k-NN accuracy ...
    assert data["runs"][0]["knn20_by_epoch"][0] == data["runs"][1]["knn20_by_epoch"][0]
    # ... which the script's untrained network reproduces: it is the runs' initialisation
    untrained = json.loads((results / "reproduction_runs" / "long" / "untrained-seed0.json")
                           .read_text())
    assert untrained["knn20"] == data["runs"][0]["knn20_by_epoch"][0]
    # train.py's closing summary reads its k-NN against raw pixels on the same images
    raw = json.loads((results / "reproduction_runs" / "long" / "baseline-raw-pixels.json")
                     .read_text())
    assert (f"k-NN top-1 on raw pixels (flattened input, same k-NN): {raw['knn20']:.2f}%"
            in (out / "dino" / "seed0" / "train.out").read_text())
    assert set(data["baselines"]) >= {"raw pixels", "untrained network", "chance"}
    for arm in ("dino", "mean"):  # epoch checkpoints reduced to teacher snapshots
        run_dir = out / arm / "seed0"
        assert not list(run_dir.glob("checkpoint0*.pth"))
        assert len(list((run_dir / "epochs").glob("teacher_epoch*.pth"))) == 2
        assert "--saveckp-freq 1" in (run_dir / "train.out").read_text()
    assert (results / "reproduction_long.png").stat().st_size > 0
    assert (results / "reproduction_long_curves.png").stat().st_size > 0
    md = (results / "reproduction_long.md").read_text()
    assert "| mean | 1 |" in md and "| *raw pixels* |" in md and "| *chance* |" in md


def test_budget_table_sets_each_arms_differences_of_two_grids_side_by_side():
    nan = float("nan")
    short = {"recipe": ["--epochs", "3"], "summary": {
        "dino": {"n_seeds": 3, "knn20_vs_dino": None, "linear_vs_dino": None},
        "mean": {"n_seeds": 3, "knn20_vs_dino": (3.77, 1.12), "linear_vs_dino": (-2.5, 2.0)},
        "sum": {"n_seeds": 3, "knn20_vs_dino": (1.0, 0.5), "linear_vs_dino": (0.0, 1.0)}}}
    long = {"recipe": ["--epochs", "15", "--batch-size", "32"], "summary": {
        "dino": {"n_seeds": 1, "knn20_vs_dino": None, "linear_vs_dino": None},
        "mean": {"n_seeds": 1, "knn20_vs_dino": (2.9, nan), "linear_vs_dino": (1.5, nan),
                 "corr_non_flipped_vs_dino": (2.4, nan), "corr_flipped_vs_dino": (-0.5, nan),
                 "corr_global_local_vs_dino": (1.25, nan)}}}
    table = rep.budget_table(short, long).splitlines()
    assert table[0] == ("| arm | Δ k-NN k=20, 3 epochs (seeds) | Δ k-NN k=20, 15 epochs (seeds) "
                        "| Δ linear, 3 epochs (seeds) | Δ linear, 15 epochs (seeds) "
                        "| Δ corr. non-flipped, 3 epochs (seeds) "
                        "| Δ corr. non-flipped, 15 epochs (seeds) "
                        "| Δ corr. flipped, 3 epochs (seeds) | Δ corr. flipped, 15 epochs (seeds) "
                        "| Δ corr. global-local, 3 epochs (seeds) "
                        "| Δ corr. global-local, 15 epochs (seeds) |")
    # only arms of both grids, DINO (no difference to itself) left out; a figure the short grid
    # did not measure shows "—"
    assert table[2:] == ["| mean | +3.77 ± 1.12 (3) | +2.90 (1) | -2.50 ± 2.00 (3) | +1.50 (1) "
                         "| — | +2.40 (1) | — | -0.50 (1) | — | +1.25 (1) |"]
    assert rep.budget_table(short, {"recipe": [], "summary": {}}) is None
