"""The head's last layer + the PW-Self loss alone: the fused loss's engines against the unfused loss.

One call of the loss, forward and backward, from the bottleneck features and the last
layer, at the shapes of a training step: every token of 2 global + ``--locals`` local
views per image (ViT ``/16``: 197 and 37 tokens), each student token paired with one
teacher token of its image (and each CLS with the other global view's CLS), weights
``1 / pairs``, a per-token centre, out_dim ``--out-dim``. Three ways, in the same run:

* ``unfused``: :func:`pwself_reference.fused_loss.reference_head_loss`, the last layer on
  every token then softmax / log-softmax of ``(tokens, K)`` tensors (what the step does
  with ``--fused-loss off``);
* ``fused-torch``: :func:`~pwself_reference.fused_loss.fused_head_loss` with
  ``engine="torch"``;
* ``fused-triton``: the same with the Triton row pass (CUDA only).

Each fused way runs at each ``--chunk-sizes`` value (rows per chunk; default the fused
loss's own). Per run: the median time per call over ``--repeat`` calls after one warm-up, and on CUDA
the peak memory the call allocates (``torch.cuda.max_memory_allocated`` above what the
inputs hold); the ratios are to ``unfused``.

Usage::

    python benchmarks/bench_fused_loss.py --device cuda --out gpu_out   # writes fused_loss.{json,md}
    python benchmarks/bench_fused_loss.py --device cpu --batch 1 --out-dim 4096   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pwself_reference.fused_loss import fused_head_loss, reference_head_loss  # noqa: E402
from pwself_reference.fused_loss_triton import triton_available  # noqa: E402
from pwself_reference.losses import LossSlots  # noqa: E402

GLOBAL_TOKENS, LOCAL_TOKENS = 197, 37   # ViT /16 on 224 and 96 px crops, with CLS


def make_inputs(batch: int, locals_: int, out_dim: int, dim: int, dtype: torch.dtype,
                device: str, seed: int = 0) -> dict:
    """Features, weights, centre and pairs of one step (rows stacked view by view)."""
    gen = torch.Generator().manual_seed(seed)
    views = [GLOBAL_TOKENS] * 2 + [LOCAL_TOKENS] * locals_
    s_rows, t_rows, start = [], [], 0
    for v, tokens in enumerate(views):
        image = torch.arange(batch).repeat_interleave(tokens)
        token = torch.arange(tokens).repeat(batch)
        s_rows.append(start + torch.arange(batch * tokens))
        teachers = [t for t in (0, 1) if t != v]
        t_view = torch.tensor(teachers)[torch.randint(len(teachers), (batch * tokens,),
                                                       generator=gen)]
        t_token = torch.where(token == 0, 0, torch.randint(1, GLOBAL_TOKENS,
                                                           (batch * tokens,), generator=gen))
        t_rows.append((t_view * batch + image) * GLOBAL_TOKENS + t_token)
        start += batch * tokens
    student_row, teacher_row = torch.cat(s_rows), torch.cat(t_rows)
    n_s, n_t = start, 2 * batch * GLOBAL_TOKENS
    pairs = LossSlots(student_row.to(device), teacher_row.to(device),
                      torch.full((student_row.numel(),), 1.0 / student_row.numel(),
                                 device=device))
    xs = F.normalize(torch.randn(n_s, dim, generator=gen), dim=-1)
    xt = F.normalize(torch.randn(n_t, dim, generator=gen), dim=-1)
    w = F.normalize(torch.randn(out_dim, dim, generator=gen), dim=-1)
    centre = 0.1 * torch.randn(GLOBAL_TOKENS, out_dim, generator=gen)
    index = torch.arange(GLOBAL_TOKENS).repeat(2 * batch)
    return {"xs": xs.to(device, dtype), "w": w.to(device, dtype), "xt": xt.to(device, dtype),
            "wt": w.to(device, dtype), "centre": centre.to(device), "index": index.to(device),
            "pairs": pairs, "rows": (n_s, n_t)}


def one_call(way: str, inp: dict, chunk: int | None = None) -> float:
    xs = inp["xs"].detach().requires_grad_()
    w = inp["w"].detach().requires_grad_()
    args = (xs, w, inp["xt"], inp["wt"], inp["centre"], inp["pairs"], 0.1, 0.04)
    if way == "unfused":
        loss = reference_head_loss(*args, center_index=inp["index"])
    else:
        loss = fused_head_loss(*args, center_index=inp["index"], engine=way.split("-")[1],
                               chunk_size=chunk)
    loss.backward()
    return float(loss.detach())


def measure(way: str, inp: dict, repeat: int, device: str, chunk: int | None = None) -> dict:
    cuda = device.startswith("cuda")
    one_call(way, inp, chunk)                            # warm-up (kernels, allocator)
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = one_call(way, inp, chunk)                # float(): waits for the device
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return {"way": way, "chunk": chunk, "s_per_call": statistics.median(times), "times": times,
            "peak_gib": peak, "loss": value}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--locals", type=int, default=8, dest="locals_")
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=256, help="bottleneck width")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ways", nargs="+", default=["unfused", "fused-torch", "fused-triton"],
                    choices=["unfused", "fused-torch", "fused-triton"])
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=None,
                    help="chunk sizes of the fused ways (default: the fused loss's default)")
    ap.add_argument("--out", type=Path, default=None, help="folder for fused_loss.{json,md}")
    args = ap.parse_args(argv)
    ways = [w for w in args.ways if w != "fused-triton" or
            (args.device.startswith("cuda") and triton_available(torch.device(args.device)))]
    inp = make_inputs(args.batch, args.locals_, args.out_dim, args.dim,
                      getattr(torch, args.dtype), args.device)
    runs = [(w, c) for w in ways for c in ([None] if w == "unfused" else
                                           args.chunk_sizes or [None])]
    results = []
    for way, chunk in runs:
        try:
            results.append(measure(way, inp, args.repeat, args.device, chunk))
        except torch.OutOfMemoryError as error:
            results.append({"way": way, "chunk": chunk,
                            "error": f"out of memory: {str(error)[:120]}"})
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["way"] == "unfused" and "error" not in r), None)
    device_name = (torch.cuda.get_device_name(torch.device(args.device))
                   if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads")
    lines = ["# The last layer + PW-Self loss alone: fused engines against the unfused loss", "",
             f"{device_name}; torch {torch.__version__}; batch {args.batch}, 2 global + "
             f"{args.locals_} local views ({inp['rows'][0]} student, {inp['rows'][1]} teacher "
             f"rows), out_dim {args.out_dim}, {args.dtype} features and weights; median of "
             f"{args.repeat} calls (forward + backward) after a warm-up.", "",
             "| way | chunk | s / call | x unfused | peak memory (GiB) | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        chunk = "" if r["way"] == "unfused" else r["chunk"] or "default"
        if "error" in r:
            lines.append(f"| {r['way']} | {chunk} | {r['error']} | | | |")
            continue
        ratio = f"{r['s_per_call'] / base['s_per_call']:.2f}x" if base else ""
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['way']} | {chunk} | {r['s_per_call']:.4f} | {ratio} | {mem} | "
                     f"{r['loss']:.5f} |")
    print("\n".join(lines))
    payload = {"meta": {**{k: str(v) for k, v in vars(args).items()}, "device_name": device_name,
                        "torch": torch.__version__, "rows": inp["rows"]}, "results": results}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_loss.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "fused_loss.md").write_text("\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    main()
