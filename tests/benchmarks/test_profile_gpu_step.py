"""CPU check of benchmarks/profile_gpu_step.py on the tiny ``--smoke`` model."""

from __future__ import annotations

from tests.benchmarks import load_benchmark

prof = load_benchmark("profile_gpu_step")


def test_profile_times_the_chunk_plan_of_pwself_only(capsys) -> None:
    from pwself_reference import fused_loss

    plan = fused_loss._plan
    flags = ["--smoke", "--device", "cpu", "--batch-size", "4", "--steps", "1", "--rows", "3"]
    pw = prof.main(flags + ["--config", "pwself-mean"])
    dino = prof.main(flags + ["--config", "dino"])
    assert fused_loss._plan is plan                     # the timer is taken off again
    assert pw["plan_calls_per_step"] == 1 and 0 < pw["plan_s_per_step"] < pw["s_per_step"]
    assert dino["plan_calls_per_step"] == 0 and dino["plan_s_per_step"] == 0
    assert "fused-loss chunk plan on the host" in capsys.readouterr().out
