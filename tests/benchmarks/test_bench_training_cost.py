"""benchmarks/bench_training_cost.py: the table that sets the fused loss against the unfused
one and against the head-only floor (the arithmetic of its columns, on made-up results)."""

from __future__ import annotations

import pytest

from tests.benchmarks import load_benchmark

bench = load_benchmark("bench_training_cost")


def _result(config: str, step: float, head: float, loss: float, rss: float,
            out_dim: int = 65536) -> dict:
    phases = dict.fromkeys(bench.PHASES, 0.0)
    phases.update(head=head, loss=loss, backbone=step - head - loss)
    return {"config": config, "out_dim": out_dim, "s_per_step": step, "phases_s": phases,
            "peak_rss_mb": rss}


def test_fused_table_rows_compare_each_fused_config_with_its_unfused_one_and_dino():
    results = [
        _result("dino", step=4.0, head=1.0, loss=0.0, rss=2000),
        _result("pwself-mean-matched", step=12.0, head=7.0, loss=2.0, rss=4300),
        _result("pwself-mean-matched-fused", step=10.0, head=7.2, loss=0.5, rss=2400),
    ]
    lines = bench.fused_table(results)
    rows = [line for line in lines if line.startswith("| pwself")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == "pwself-mean-matched-fused"
    assert cells[2] == "2.000 -> 0.500"
    assert cells[3] == "0.25x"
    assert cells[4] == "3.00x -> 2.50x"
    # floor: DINO's step with its head swapped for the fused config's: (4 - 1 + 7.2) / 4
    assert cells[5] == f"{(4.0 - 1.0 + 7.2) / 4.0:.2f}x"
    assert cells[6] == "+2300 -> +400"


@pytest.mark.parametrize("missing", ["dino", "pwself-mean-matched"])
def test_fused_table_skips_a_fused_config_without_its_baselines(missing):
    results = [r for r in (
        _result("dino", 4.0, 1.0, 0.0, 2000),
        _result("pwself-mean-matched", 12.0, 7.0, 2.0, 4300),
        _result("pwself-mean-matched-fused", 10.0, 7.2, 0.5, 2400),
    ) if r["config"] != missing]
    assert not [line for line in bench.fused_table(results) if line.startswith("| pwself")]


def test_report_only_rewrites_the_markdown_from_the_committed_json(tmp_path):
    source = bench.ROOT / "benchmarks" / "results" / "training_cost.json"
    (tmp_path / "training_cost.json").write_text(source.read_text())
    bench.main(["--report-only", "--out", str(tmp_path)])
    md = (tmp_path / "training_cost.md").read_text()
    committed = (bench.ROOT / "benchmarks" / "results" / "training_cost.md").read_text()
    assert md == committed            # the committed report is this script's output
    assert "head-only floor" in md
    assert (tmp_path / "training_cost.png").stat().st_size > 0
