"""Where one PW-Self training step spends its time on a GPU: host work against device work.

Builds the trainer of ``bench_gpu_throughput.py`` (ImageNet-100 preset, random uint8 source
images on the device, no data loading), times the fused loss's chunk plan (built on the
host, in numpy) apart, and profiles a few steps with ``torch.profiler``::

    python benchmarks/profile_gpu_step.py --arch vit_small --config pwself-mean
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Profile one configuration; returns its seconds a step and the chunk plan's share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_gpu_throughput import ARCHS, CONFIGS, build_args, build_trainer
    from pwself_reference import fused_loss
    from pwself_reference import train as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_small", choices=ARCHS)
    ap.add_argument("--config", default="pwself-mean", choices=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed, then profiled, steps")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to check the script)")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny model of bench_gpu_throughput --smoke: checks the script")
    ap.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    a = ap.parse_args(argv)

    args = build_args(a.arch, a.config, a.batch_size, a.device, "bf16", smoke=a.smoke)
    dev = T.resolve_device(args.device)
    side = 40 if a.smoke else 256
    images = torch.randint(0, 256, (a.batch_size, 3, side, side), dtype=torch.uint8).to(dev)
    tr = build_trainer(args, images, 3 + 2 * a.steps)

    def run(n: int) -> float:
        """Seconds a step over ``n`` steps of ``train_one_epoch``."""
        tr.steps_per_epoch = tr.global_step + n
        tr.loader = [images] * n
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        T.train_one_epoch(tr, args.freeze_last_layer, start_it=tr.global_step)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) / n

    plan, plan_s = fused_loss._plan, []

    def timed_plan(*p, **k):
        t0 = time.perf_counter()
        out = plan(*p, **k)
        plan_s.append(time.perf_counter() - t0)
        return out

    fused_loss._plan = timed_plan
    try:
        run(3)
        plan_s.clear()
        step_s = run(a.steps)
    finally:
        fused_loss._plan = plan
    res = {"s_per_step": step_s, "plan_s_per_step": sum(plan_s) / a.steps,
           "plan_calls_per_step": len(plan_s) / a.steps}
    print(f"{a.arch} {a.config}: {step_s:.3f} s/step; fused-loss chunk plan on the host: "
          f"{res['plan_s_per_step']:.3f} s/step ({res['plan_calls_per_step']:g} call(s) a step)")

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run(a.steps)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if dev.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows))
    return res


if __name__ == "__main__":
    main()
