"""Training cost of PW-Self over DINO: time and peak memory of one training step, by phase.

The paper's CIFAR-10 setting (ViT-Tiny/16, 2 x 224 + 8 x 96 crops, per-token centre,
``--preset cifar10-vit-tiny16-*``) with a small batch on the CPU, for six
configurations: DINO, PW-Self ``mean`` and PW-Self ``mean`` + patch augmentation
(``PatchJitter.authors(16)``), each with head ``out_dim`` 1000 and 65536.

Everything is built by ``pwself_reference`` itself: the flags by
:func:`pwself_reference.config.parse_args` with the preset, the student and teacher
by ``train.build_network``, the loss by :class:`~pwself_reference.losses.PWSelfLoss`,
the optimizer by ``train.param_groups`` + AdamW, the crops by
:func:`~pwself_reference.augment.batched_multicrop` (per-sample boxes), the
photometric augmentation by :class:`~pwself_reference.augment.ViewAugment`, the
matches by ``train.compute_matches``, clipping and the EMA by ``train.clip_gradients``
and ``train.ema_update``. The step is the one of ``train.train_one_epoch``, cut into
phases with ``perf_counter`` around each; backward passes are split between the
loss, the head and the backbone with detach boundaries (``out.backward(grad)``), so
the arithmetic is the same as one ``loss.backward()`` (checked: the decomposed
step's loss equals ``criterion(student(views), teacher(views))``).

Phases (seconds per step):

* ``crop_aug``: batched multi-crop + DINO photometric augmentation + normalisation;
* ``patch_aug``: ``PatchJitter`` on every view (PW-Self + patch aug only);
* ``matching``: ``compute_matches`` for the 18 (teacher, student) view pairs;
* ``backbone``: teacher and student ViT forward + student backward;
* ``head``: teacher and student DINO head forward + student head backward;
* ``loss``: ``PWSelfLoss`` forward (softmax / log-softmax of every kept token,
  gather of the matched pairs, cross-entropy, centre update) + backward;
* ``optimizer``: zero_grad, per-parameter clipping, AdamW step, teacher EMA.

With ``--fused-loss on`` (configurations ending in ``-fused``) the head phase stops at
the bottleneck features and the last layer's weight; the loss phase runs the fused loss,
whose matrix products with the last layer (the teacher and student logits, ``G W`` and
``G^T x``, and the centre's ``(summed features) W^T``, all profiled under
``FusedHeadLoss.last_layer``) are moved to ``head`` by their profiled share: in the
unfused step the head computes them.

Each configuration runs in a fresh subprocess (1 warm-up step, then ``--steps``
timed steps); its peak memory is the process's resident-set high-water mark
(``ru_maxrss``) after the steps.

Usage::

    python benchmarks/bench_training_cost.py     # writes benchmarks/results/training_cost.{json,md,png}
    python benchmarks/bench_training_cost.py --report-only   # rewrites .md and .png from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("crop_aug", "patch_aug", "matching", "backbone", "head", "loss", "optimizer")
CONFIGS = {  # name: (loss, patch_aug, head_tokens, fused_loss)
    "dino": ("dino", "none", "all", "off"),
    "pwself-mean": ("mean", "none", "all", "off"),
    "pwself-mean-matched": ("mean", "none", "matched", "off"),
    "pwself-mean-patchaug": ("mean", "authors", "all", "off"),
    "pwself-mean-fused": ("mean", "none", "all", "on"),
    "pwself-mean-matched-fused": ("mean", "none", "matched", "on"),
}


def run_config(name: str, out_dim: int, batch: int, steps: int, threads: int) -> dict:
    """Build everything as train.py does and time ``steps`` steps after one warm-up."""
    import torch

    from pwself_reference import train as T
    from pwself_reference.augment import (
        ViewAugment,
        batched_multicrop,
        match_batch,
        normalize,
        view_grids,
    )
    from pwself_reference.config import parse_args
    from pwself_reference.losses import matched_token_masks
    from pwself_reference.models import backbone_tokens
    from pwself_reference.network import HeadOutput, static_rows

    loss_name, patch_aug, head_tokens, fused_loss = CONFIGS[name]
    preset = {"dino": "cifar10-vit-tiny16-dino", "mean": "cifar10-vit-tiny16-mean"}[loss_name]
    args = parse_args(["--preset", preset, "--out-dim", str(out_dim), "--batch-size", str(batch),
                       "--patch-aug", patch_aug, "--head-tokens", head_tokens,
                       "--fused-loss", fused_loss, "--device", "cpu",
                       "--data-path", tempfile.gettempdir()])  # no data is read
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    # seeded by --seed (0), built exactly as train.py builds them
    student, teacher, criterion, optimizer, _ = T.build_models(args, torch.device("cpu"), None)
    patch_level = args.loss != "dino"
    fused = patch_level and fused_loss == "on"
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = args.lr * batch / 256.0
        if i == 0:
            group["weight_decay"] = args.weight_decay
    spec = T.crop_spec(args)
    jitter = T.build_patch_jitter(args.patch_aug, args.patch_size)
    view_aug = ViewAugment(spec.n_global, spec.n_local, jitter, tuple(args.blur_sigma))
    # CIFAR-10 images are 32 x 32, upsampled by the crops to 224 / 96
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    epoch = args.freeze_last_layer  # past the frozen-last-layer epoch: the whole head trains
    n_global = spec.n_global

    def net_forward(net, views, grad: bool, keep=None):
        """MultiCropNetwork.forward cut in two: the backbone tokens (gathered into the
        head's input buffer under ``--head-tokens matched``) here, the head outside."""
        groups: list[list[torch.Tensor]] = []
        for v in views:
            if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        with torch.set_grad_enabled(grad):
            flat, tokens = [], []
            for g in groups:
                tok = backbone_tokens(net.backbone, torch.cat(g, dim=0))
                if not patch_level:
                    tok = tok[:, :1]
                tokens += [tok.shape[1]] * len(g)
                flat.append(tok.reshape(-1, tok.shape[-1]))
            x = torch.cat(flat, dim=0)
            if keep is None:
                return x, tokens, None
            kept = torch.cat([m.reshape(-1) for m in keep]).nonzero().squeeze(1)
            n = kept.shape[0]
            x = torch.cat([x.index_select(0, kept),
                           x.new_zeros(static_rows(n, x.shape[0]) - n, x.shape[1])])
            return x, tokens, kept

    def step(step_idx: int, check: bool = False, profile_loss: bool = False) -> dict[str, float]:
        t: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        torch.manual_seed(1000 + step_idx)
        t0 = time.perf_counter()
        mb = batched_multicrop(images, spec, shared=False)
        views = [op(v.float()) for v, op in zip(mb.views, view_aug.ops)]
        if jitter is not None:  # as ViewAugment does it: one call per view size
            b = time.perf_counter()
            views = view_aug._jitter_by_size(views)
            t["patch_aug"] = time.perf_counter() - b
        views = [normalize(x) for x in views]
        t["crop_aug"] = time.perf_counter() - t0 - t["patch_aug"]

        a = time.perf_counter()
        matches = match_batch(mb, n_global, args.patch_size, args.match_rule) \
            if patch_level else None
        keep_t = keep_s = None
        if head_tokens == "matched":  # part of the matching phase: which tokens are matched
            n_tok = [1 + r * c for r, c in view_grids(views, args.patch_size)]
            keep_t, keep_s = matched_token_masks(matches, n_tok[:n_global], n_tok, batch)
        t["matching"] = time.perf_counter() - a

        # forward: backbone, then head, teacher (no grad) and student
        a = time.perf_counter()
        t_tok, t_tokens, t_kept = net_forward(teacher, views[:n_global], grad=False, keep=keep_t)
        s_tok, s_tokens, s_kept = net_forward(student, views, grad=True, keep=keep_s)
        b = time.perf_counter()
        s_tok_d = s_tok.detach().requires_grad_(True)
        if fused:  # --fused-loss on: the head up to its last layer here, the loss applies it
            with torch.no_grad():
                teacher_out = HeadOutput(teacher.head.bottleneck(t_tok), batch, tuple(t_tokens),
                                         t_kept, teacher.head.last_layer_weight())
            s_head = (student.head.bottleneck(s_tok_d), student.head.last_layer_weight())
        else:
            with torch.no_grad():
                teacher_out = HeadOutput(teacher.head(t_tok), batch, tuple(t_tokens), t_kept)
            s_head = (student.head(s_tok_d),)
        c = time.perf_counter()
        s_head_d = [x.detach().requires_grad_(True) for x in s_head]
        student_out = HeadOutput(s_head_d[0], batch, tuple(s_tokens), s_kept,
                                 s_head_d[1] if fused else None)
        t["head_rows"] = float(t_tok.shape[0] + s_tok.shape[0])
        if check:  # the decomposed forward is the network's own forward
            with torch.no_grad():
                cp = criterion.center.clone()
                ref = criterion(student(views, all_tokens=patch_level, keep=keep_s,
                                        features=fused),
                                teacher(views[:n_global], all_tokens=patch_level, keep=keep_t,
                                        features=fused),
                                matches, epoch, update_center=False)
                mine = criterion(student_out, teacher_out, matches, epoch, update_center=False)
                assert torch.equal(cp, criterion.center)
            # drop-path is random in the student: compare with drop-path off
            rel = abs(float(ref) - float(mine)) / max(abs(float(ref)), 1e-12)
            check_rel = rel
        c2 = time.perf_counter()
        prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                if profile_loss else contextlib.nullcontext())
        with prof:
            loss = criterion(student_out, teacher_out, matches, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        d = time.perf_counter()
        if profile_loss:  # share of the loss spent in softmax / log-softmax (fwd + bwd)
            ka = prof.key_averages()
            total_us = sum(e.self_cpu_time_total for e in ka)
            # the loss marks its softmax / log-softmax of every token (and the softmax part of
            # its gradient) with a profiler range: the cost that grows with the head's output
            from pwself_reference.losses import CENTER_LABEL, SOFTMAX_LABEL

            soft_us = sum(e.cpu_time_total for e in ka if e.key == SOFTMAX_LABEL)
            t["loss_softmax_fraction"] = soft_us / max(total_us, 1e-9)
            # the fused loss runs the head's last layer (its matrix products, marked): that
            # share of the loss's time is the head's, also where the centre update runs it
            from pwself_reference.fused_loss import LAST_LAYER_LABEL

            last_us = sum(e.cpu_time_total for e in ka if e.key == LAST_LAYER_LABEL)
            center_us = sum(e.cpu_time_total for e in ka if e.key == CENTER_LABEL) \
                - nested_us(prof.events(), LAST_LAYER_LABEL, CENTER_LABEL)
            t["loss_center_fraction"] = center_us / max(total_us, 1e-9)
            t["loss_last_layer_fraction"] = last_us / max(total_us, 1e-9)
            top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
            t["loss_top_ops"] = [(e.key, e.self_cpu_time_total / 1e6 / (total_us / 1e6) * 100.0
                                  if total_us else 0.0) for e in top]
        torch.autograd.backward(list(s_head), [x.grad for x in s_head_d])
        e = time.perf_counter()
        s_tok.backward(s_tok_d.grad)
        f = time.perf_counter()
        t["backbone"] = (b - a) + (f - e)
        t["head"] = (c - b) + (e - d)
        t["loss"] = d - c2
        T.clip_gradients(student, args.clip_grad)
        optimizer.step()
        T.ema_update(teacher, student, args.momentum_teacher)
        t["optimizer"] = time.perf_counter() - f
        t["step"] = sum(t[p] for p in PHASES)
        t["loss_value"] = float(loss.detach())
        if check:
            t["check_rel_diff"] = check_rel
        return t

    # the check runs without drop-path so both forwards are deterministic
    dp = [m for m in student.modules() if type(m).__name__ == "DropPath"]
    saved = [m.drop_prob for m in dp]
    for m in dp:
        m.drop_prob = 0.0
    warm = step(0, check=True)
    for m, p in zip(dp, saved):
        m.drop_prob = p
    timed = [step(i + 1) for i in range(steps)]
    # one more (untimed) step profiles the loss to split it: softmax / log-softmax of every
    # head output (scales with tokens x out_dim, like the head) vs the rest (gather,
    # cross-entropy, temperature, centring)
    prof_step = step(steps + 1, profile_loss=True)
    softmax_fraction = prof_step["loss_softmax_fraction"]
    last_layer_fraction = prof_step["loss_last_layer_fraction"]
    for s in timed:  # --fused-loss on: the last layer's products inside the loss go to "head"
        s["loss_fused_call"] = s["loss"]
        s["head"] += s["loss"] * last_layer_fraction
        s["loss"] -= s["loss"] * last_layer_fraction
        s["step"] = sum(s[p] for p in PHASES)
    rest = max(1.0 - last_layer_fraction, 1e-9)  # the profile's shares, of the loss without it
    fastest = min(timed, key=lambda s: s["step"])
    res = {
        "config": name, "loss": loss_name, "patch_aug": patch_aug, "head_tokens": head_tokens,
        "out_dim": out_dim,
        # teacher + student rows through the head (mean over the timed steps)
        "head_rows_per_step": sum(s["head_rows"] for s in timed) / steps,
        "batch": batch, "timed_steps": steps, "threads": threads,
        "check_rel_diff_vs_network_forward": warm["check_rel_diff"],
        "warmup_s": warm["step"],
        "steps_s": [s["step"] for s in timed],
        # the machine is shared: the fastest timed step (least disturbed) and its phases
        "s_per_step": fastest["step"],
        "phases_s": {p: fastest[p] for p in PHASES},
        "s_per_step_mean": sum(s["step"] for s in timed) / steps,
        "phases_mean_s": {p: sum(s[p] for s in timed) / steps for p in PHASES},
        "fused_loss": fused_loss,
        "loss_last_layer_fraction": last_layer_fraction,
        "loss_fused_call_s": fastest["loss_fused_call"],
        "loss_softmax_fraction": softmax_fraction / rest,
        "loss_center_fraction": prof_step["loss_center_fraction"] / rest,
        "loss_top_ops_pct_of_loss": prof_step["loss_top_ops"],
        "loss_values": [s["loss_value"] for s in timed],
        "student_head_tokens_per_step": int(
            sum(v.shape[0] * (1 + (v.shape[-2] // 16) * (v.shape[-1] // 16) if patch_level else 1)
                for v in batched_multicrop(images[:1], spec).views) * batch),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    return res


def nested_us(events, inner: str, outer: str) -> float:
    """CPU time (us) of the profiler ranges ``inner`` that run inside a range ``outer``."""
    total = 0.0
    for e in events:
        if e.name != inner:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name != outer:
            parent = parent.cpu_parent
        if parent is not None:
            total += e.cpu_time_total
    return total


def fmt_table(results: list[dict]) -> list[str]:
    base = {r["out_dim"]: r for r in results if r["config"] == "dino"}
    lines = [
        "| config | out_dim | batch | timed steps | head rows | s / step | x DINO | peak RSS (MB) | "
        "crop+aug | "
        "patch aug | matching | backbone | head | loss | (softmax) | (centre) | (pairs) | "
        "optimizer | bookkeeping % | w/o softmax | w/o softmax, centre |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|",
    ]
    for r in results:
        ph = r["phases_s"]
        ratio = r["s_per_step"] / base[r["out_dim"]]["s_per_step"] if r["out_dim"] in base else 0
        lines.append(
            f"| {r['config']} | {r['out_dim']} | {r['batch']} | {r['timed_steps']} | "
            f"{r['head_rows_per_step']:.0f} | {r['s_per_step']:.2f} | {ratio:.2f}x | {r['peak_rss_mb']:.0f} | "
            + " | ".join(f"{ph[p]:.3f}" for p in PHASES[:-1])
            + f" | {r['loss_softmax_s']:.3f} | {r['loss_center_s']:.3f} | {r['loss_pairs_s']:.3f}"
            + f" | {ph['optimizer']:.3f} | {r['bookkeeping_pct']:.1f}"
            + f" | {r['bookkeeping_no_softmax_pct']:.1f} | {r['bookkeeping_strict_pct']:.1f} |"
        )
    return lines


def matched_table(results: list[dict]) -> list[str]:
    """``--head-tokens matched`` against ``all`` (and DINO) at each out_dim."""
    lines = ["``--head-tokens matched`` (the head on CLS + matched tokens only, same loss) "
             "against ``all`` and DINO:", "",
             "| out_dim | head rows all -> matched | s / step: DINO, all, matched | matched / all "
             "| matched - DINO over all - DINO | peak RSS (MB): DINO, all, matched |",
             "|---:|---:|---:|---:|---:|---:|"]
    for dim in sorted({r["out_dim"] for r in results}):
        by = {r["config"]: r for r in results if r["out_dim"] == dim}
        if not {"dino", "pwself-mean", "pwself-mean-matched"} <= set(by):
            continue
        d, a, m = by["dino"], by["pwself-mean"], by["pwself-mean-matched"]
        over = ((m["s_per_step"] - d["s_per_step"]) / (a["s_per_step"] - d["s_per_step"])
                if a["s_per_step"] > d["s_per_step"] else float("nan"))
        lines.append(
            f"| {dim} | {a['head_rows_per_step']:.0f} -> {m['head_rows_per_step']:.0f} "
            f"({m['head_rows_per_step'] / a['head_rows_per_step']:.0%}) | "
            f"{d['s_per_step']:.2f}, {a['s_per_step']:.2f}, {m['s_per_step']:.2f} | "
            f"{m['s_per_step'] / a['s_per_step']:.2f}x | {over:.0%} | "
            f"{d['peak_rss_mb']:.0f}, {a['peak_rss_mb']:.0f}, {m['peak_rss_mb']:.0f} |")
    return lines


def fused_table(results: list[dict]) -> list[str]:
    """Each ``-fused`` configuration against its unfused one and against the floor the head
    sets: the step's ratio to DINO if every phase but the head cost what it costs in DINO."""
    lines = ["The fused loss against the unfused one (same run). \"Head-only floor\": the step "
             "over DINO's if every phase but the head (the head's matrix products, the fused "
             "loss's last-layer products included) took DINO's time, i.e. what a loss, matching "
             "and optimizer that cost nothing beyond DINO's would give:", "",
             "| config | out_dim | loss (s): unfused -> fused | fused / unfused | "
             "x DINO: unfused -> fused | head-only floor | peak RSS over DINO (MB): unfused -> "
             "fused |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r["config"].endswith("-fused"):
            continue
        by = {x["config"]: x for x in results if x["out_dim"] == r["out_dim"]}
        d, u = by.get("dino"), by.get(r["config"].removesuffix("-fused"))
        if d is None or u is None:
            continue
        step = d["s_per_step"]
        floor = (step - d["phases_s"]["head"] + r["phases_s"]["head"]) / step
        lines.append(
            f"| {r['config']} | {r['out_dim']} | {u['phases_s']['loss']:.3f} -> "
            f"{r['phases_s']['loss']:.3f} | {r['phases_s']['loss'] / u['phases_s']['loss']:.2f}x | "
            f"{u['s_per_step'] / step:.2f}x -> {r['s_per_step'] / step:.2f}x | {floor:.2f}x | "
            f"{u['peak_rss_mb'] - d['peak_rss_mb']:+.0f} -> {r['peak_rss_mb'] - d['peak_rss_mb']:+.0f} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Stacked bars: seconds per step by phase, one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["out_dim"] for r in results})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), squeeze=False)
    colours = dict(zip(PHASES, plt.get_cmap("tab10").colors))
    for ax, dim in zip(axes[0], dims):
        rows = [r for r in results if r["out_dim"] == dim]
        bottom = [0.0] * len(rows)
        for p in PHASES:
            vals = [r["phases_s"][p] for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, color=colours[p], label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, r in enumerate(rows):
            ax.text(i, bottom[i], f"{r['s_per_step']:.2f} s\n{r['bookkeeping_pct']:.1f}% bk",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [r["config"] for r in rows], fontsize=8)
        ax.set_ylim(0, max(bottom) * 1.2)
        ax.set_title(f"out_dim {dim}, batch {rows[0]['batch']}")
        ax.set_ylabel("s / step (CPU)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("One training step by phase (bk: matching + loss + patch aug)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="images per step, out_dim 1000")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--batch-large", type=int, default=4, help="images per step, out_dim 65536")
    ap.add_argument("--steps-large", type=int, default=2, help="timed steps, out_dim 65536")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: least disturbed when other jobs share the cores)")
    ap.add_argument("--out-dims", type=int, nargs="+", default=[1000, 65536])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="configurations to run (dino is the baseline of the ratios)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--_child", nargs=2, metavar=("CONFIG", "OUT_DIM"), help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true",
                    help="only redraw training_cost.png from the JSON in --out")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite training_cost.md and .png from the JSON in --out")
    a = ap.parse_args(argv)

    if a.replot or a.report_only:
        run = json.loads((a.out / "training_cost.json").read_text())
        if a.report_only:
            write_report(run["meta"], run["results"], run["vs_dino"], a.out)
        else:
            plot(run["results"], a.out / "training_cost.png")
        return

    if a._child:
        out_dim = int(a._child[1])
        large = out_dim > 1000
        res = run_config(a._child[0], out_dim, a.batch_large if large else a.batch,
                         a.steps_large if large else a.steps, a.threads)
        print("RESULT " + json.dumps(res))
        return

    import torch

    load_start = list(os.getloadavg())
    t_all = time.perf_counter()
    results = []
    for out_dim in a.out_dims:
        for name in a.configs:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, str(out_dim),
                   "--batch", str(a.batch), "--steps", str(a.steps), "--batch-large",
                   str(a.batch_large), "--steps-large", str(a.steps_large),
                   "--threads", str(a.threads)]
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                "PYTHONPATH", ""), OMP_NUM_THREADS=str(a.threads),
                MKL_NUM_THREADS=str(a.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{name} out_dim {out_dim} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            ph = r["phases_s"]
            r["loss_softmax_s"] = ph["loss"] * r["loss_softmax_fraction"]
            r["loss_center_s"] = ph["loss"] * r["loss_center_fraction"]
            r["loss_rest_s"] = ph["loss"] - r["loss_softmax_s"]
            r["loss_pairs_s"] = r["loss_rest_s"] - r["loss_center_s"]
            r["bookkeeping_s"] = ph["matching"] + ph["loss"] + ph["patch_aug"]
            r["bookkeeping_pct"] = 100.0 * r["bookkeeping_s"] / r["s_per_step"]
            r["bookkeeping_no_softmax_s"] = ph["matching"] + r["loss_rest_s"] + ph["patch_aug"]
            r["bookkeeping_no_softmax_pct"] = (100.0 * r["bookkeeping_no_softmax_s"]
                                               / r["s_per_step"])
            r["bookkeeping_strict_s"] = ph["matching"] + r["loss_pairs_s"] + ph["patch_aug"]
            r["bookkeeping_strict_pct"] = 100.0 * r["bookkeeping_strict_s"] / r["s_per_step"]
            results.append(r)
            print(f"{name:22s} out_dim {out_dim:6d}: {r['s_per_step']:.2f} s/step, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, bookkeeping {r['bookkeeping_pct']:.1f}%, "
                  f"steps {[round(x, 2) for x in r['steps_s']]}, "
                  f"{ {k: round(v, 3) for k, v in ph.items()} }", flush=True)
    load_end = list(os.getloadavg())

    # differences against DINO at the same out_dim (same run)
    diffs = []
    for r in results:
        if r["config"] == "dino":
            continue
        d = next(x for x in results if x["config"] == "dino" and x["out_dim"] == r["out_dim"])
        delta = {p: r["phases_s"][p] - d["phases_s"][p] for p in PHASES}
        total = r["s_per_step"] - d["s_per_step"]
        # per-image normalisation when the two runs used different batch sizes (they do not here)
        diffs.append({"config": r["config"], "out_dim": r["out_dim"], "delta_step_s": total,
                      "delta_phases_s": delta,
                      "head_share_of_delta_pct": 100.0 * delta["head"] / total if total else 0.0})

    meta = {
        "setting": "CIFAR-10 preset: ViT-Tiny/16, 2 x 224 + 8 x 96 crops (32 px images "
                   "upsampled), per-token centre, match rule official, per-sample boxes, "
                   "AdamW, fp32, CPU",
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": a.threads,
        "load_average_start": load_start, "load_average_end": load_end,
        "wall_time_s": time.perf_counter() - t_all,
        "bookkeeping_definition": "(matching + loss + patch_aug) / step; loss is the whole "
                                  "PWSelfLoss forward + backward (softmax of every kept token, "
                                  "gather, cross-entropy, centre update)",
        "goal_bookkeeping_pct": 5.0,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "training_cost.json").write_text(
        json.dumps({"meta": meta, "results": results, "vs_dino": diffs}, indent=2) + "\n")
    print(write_report(meta, results, diffs, a.out))


def write_report(meta: dict, results: list[dict], diffs: list[dict], out: Path) -> str:
    """Write ``training_cost.md`` and ``.png`` into ``out`` from a run's JSON parts; returns
    the markdown."""
    threads = meta["threads"]
    load_start, load_end = meta["load_average_start"], meta["load_average_end"]
    md = [
        "# Training cost of PW-Self over DINO",
        "",
        f"{meta['setting']}; torch {meta['torch']}, {threads} threads on a {meta['cpu_count']}-"
        f"core {meta['cpu']} machine shared with other jobs: load average (1, 5, 15 min) "
        f"{[round(x, 2) for x in load_start]} at start, {[round(x, 2) for x in load_end]} at end. "
        f"Each configuration runs in a fresh process: 1 warm-up step, then the timed steps "
        f"(the fastest timed step and its phases are shown, the least disturbed by other "
        f"jobs; the JSON also has the means). Peak RSS: the process's resident-set "
        f"high-water mark (models, optimizer "
        f"state and the step). Phases in seconds per step. Total wall time "
        f"{meta['wall_time_s']:.0f} s.",
        "",
        *fmt_table(results),
        "",
        "bookkeeping % = (matching + loss + patch aug) / step, the goal being at most 5%. "
        "\"loss\" is the whole PWSelfLoss forward + backward, which for PW-Self includes the "
        "softmax / log-softmax of every head output (tokens x out_dim, a cost that grows with "
        "the head's output like the head itself) as well as the cross-entropy of "
        "the matched pairs and the centre update; a torch.profiler profile of the loss of one "
        "more step splits it, by the share of each profiler range, into \"(softmax)\": the "
        "softmax / log-softmax of every token, forward and gradient; \"(centre)\": the update "
        "of the centre, a read of every teacher output (tokens x out_dim; per-token here, as in "
        "the authors' code); \"(pairs)\": the rest, i.e. the cross-entropy of the matched pairs "
        "(the gather loss: the sparse pair weights, the matched dot products and their "
        "gradient). \"w/o softmax\" = (matching + centre + pairs + patch aug) / step; \"w/o "
        "softmax, centre\" = (matching + pairs + patch aug) / step: PW-Self's own bookkeeping "
        "as the goal defines it (matching + gather loss + patch augmentation).",
        "",
        "Configurations ending in -fused run with ``--fused-loss on``: the network stops at the "
        "head's bottleneck features and the loss applies the head's last layer chunk by chunk "
        "(pwself_reference.fused_loss). Their \"head\" column counts the last layer's matrix "
        "products made inside the fused loss (the profiled share of the loss in the "
        "FusedHeadLoss.last_layer range) and \"loss\" the rest of the fused call, so that both "
        "columns mean what they mean for the unfused configurations; the whole fused call is "
        "loss_fused_call_s in the JSON. Their (softmax) column is 0: the fused loss has no "
        "separate softmax of every token.",
        "",
        "Difference from DINO at the same out_dim (s / step):",
        "",
        "| config | out_dim | step | head | backbone | loss | matching | patch aug | "
        "crop+aug | optimizer | head share of the difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in diffs:
        dp = d["delta_phases_s"]
        md.append(
            f"| {d['config']} | {d['out_dim']} | {d['delta_step_s']:+.2f} | {dp['head']:+.2f} | "
            f"{dp['backbone']:+.2f} | {dp['loss']:+.2f} | {dp['matching']:+.3f} | "
            f"{dp['patch_aug']:+.3f} | {dp['crop_aug']:+.3f} | {dp['optimizer']:+.3f} | "
            f"{d['head_share_of_delta_pct']:.0f}% |"
        )
    md += ["", "The head column is the cost of applying the DINO head to every token (PW-Self) "
           "instead of the CLS token only (DINO).", ""]
    md += matched_table(results)
    md += ["", *fused_table(results)]
    md += ["",
           "Where the loss's time goes (torch.profiler, self CPU time of the top operators as a "
           "share of the loss's forward + backward):", ""]
    for r in results:
        if r["config"] != "dino":
            ops = ", ".join(f"{k} {v:.0f}%" for k, v in r["loss_top_ops_pct_of_loss"][:6])
            md.append(f"- {r['config']}, out_dim {r['out_dim']}: {ops}")
    (out / "training_cost.md").write_text("\n".join(md) + "\n")
    plot(results, out / "training_cost.png")
    return "\n".join(md)


if __name__ == "__main__":
    main()
