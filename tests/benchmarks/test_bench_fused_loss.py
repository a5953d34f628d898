"""benchmarks/bench_fused_loss.py: its synthetic step is a valid pairing, and the ways it
times compute the same loss (run on the CPU at a tiny size)."""

from __future__ import annotations

import json

import torch

from tests.benchmarks import load_benchmark

bench = load_benchmark("bench_fused_loss")


def test_inputs_pair_each_student_token_with_a_teacher_token_of_its_image():
    batch, locals_ = 2, 3
    inp = bench.make_inputs(batch, locals_, out_dim=16, dim=4, dtype=torch.float32,
                            device="cpu")
    n_s, n_t = inp["rows"]
    assert n_s == batch * (2 * bench.GLOBAL_TOKENS + locals_ * bench.LOCAL_TOKENS)
    assert n_t == 2 * batch * bench.GLOBAL_TOKENS
    pairs = inp["pairs"]
    assert torch.equal(pairs.student_row, torch.arange(n_s))     # every student token once
    t_view, rest = pairs.teacher_row // (batch * bench.GLOBAL_TOKENS), \
        pairs.teacher_row % (batch * bench.GLOBAL_TOKENS)
    t_image = rest // bench.GLOBAL_TOKENS
    sizes = [bench.GLOBAL_TOKENS] * 2 + [bench.LOCAL_TOKENS] * locals_
    s_view = torch.cat([torch.full((batch * t,), v) for v, t in enumerate(sizes)])
    s_image = torch.cat([torch.arange(batch).repeat_interleave(t) for t in sizes])
    assert torch.equal(t_image, s_image)                           # the same image
    assert not torch.any(t_view == s_view)                         # never a view with itself
    assert torch.isclose(pairs.weight.sum(), torch.tensor(1.0))


def test_ways_agree_and_results_are_written(tmp_path):
    payload = bench.main(["--device", "cpu", "--batch", "1", "--locals", "1", "--out-dim", "64",
                          "--dim", "8", "--dtype", "float32", "--repeat", "1",
                          "--ways", "unfused", "fused-torch", "--chunk-sizes", "7", "100",
                          "--out", str(tmp_path)])
    runs = [(r["way"], r["chunk"]) for r in payload["results"]]
    assert runs == [("unfused", None), ("fused-torch", 7), ("fused-torch", 100)]
    losses = [r["loss"] for r in payload["results"]]
    assert all(abs(v - losses[0]) <= 1e-5 * abs(losses[0]) for v in losses)
    saved = json.loads((tmp_path / "fused_loss.json").read_text())
    assert [(r["way"], r["chunk"]) for r in saved["results"]] == runs
    assert "| fused-torch |" in (tmp_path / "fused_loss.md").read_text()
