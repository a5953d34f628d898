"""Small-scale reproduction of PW-Self's claims on Fashion-MNIST (issue 6, part 2).

Every arm pretrains the same small ViT with ``pwself_reference/train.py`` on the
bundled Fashion-MNIST subset (6000 train / 1000 test images, native 28 px), with
the same budget (epochs, crops, batch) and differs only in the flags of its arm:

=================  ==================================================
arm                flags on top of the shared recipe
=================  ==================================================
dino               ``--loss dino`` (Eq. 7, CLS only)
mean               ``--loss mean`` (Eq. 8)
sum                ``--loss sum`` (Eq. 9)
lambda0.2          ``--loss lambda --lambda 0.2`` (Eq. 10)
mean-patchaug      ``--loss mean --patch-aug paper``
mean-official      ``--loss mean --match-rule official``
mean-centre        ``--loss mean --match-rule centre``
mean-shared        ``--loss mean --same-spatial-aug``
=================  ==================================================

Each ``(arm, seed)`` run lives in ``OUT/<arm>/seed<seed>``. A seed fixes the
initialisation and the data order, so arms with the same seed start from the same
weights and differences to DINO are paired by seed. After training, the final
teacher backbone is evaluated: weighted k-NN (k = 10 and 20, T = 0.07, CLS token)
and a linear probe (DINO's: concatenated CLS of the last 4 blocks, SGD, 100 epochs,
on cached features of the un-augmented images, best of learning rates 0.03, 0.1, 0.3).
Per-epoch k-NN (k = 20) comes from the training log.

The grid is resumable: a finished run is skipped (its result is kept both in the
run directory and in ``benchmarks/results/reproduction_runs/``, which is committed,
so a grid continues on another machine), an interrupted one continues with
``--resume``; rerun the same command after a kill.

Usage::

    python benchmarks/reproduce_fashion_mnist.py                # full grid, 2 runs at a time
    python benchmarks/reproduce_fashion_mnist.py --report-only  # just rebuild the tables

writes ``benchmarks/results/reproduction.{json,md,png}`` and ``reproduction_table.rst``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: arm name -> train.py flags added to the shared recipe
ARMS: dict[str, list[str]] = {
    "dino": ["--loss", "dino"],
    "mean": ["--loss", "mean"],
    "sum": ["--loss", "sum"],
    "lambda0.2": ["--loss", "lambda", "--lambda", "0.2"],
    "mean-patchaug": ["--loss", "mean", "--patch-aug", "paper"],
    "mean-official": ["--loss", "mean", "--match-rule", "official"],
    "mean-centre": ["--loss", "mean", "--match-rule", "centre"],
    "mean-shared": ["--loss", "mean", "--same-spatial-aug"],
}
METRICS = ("knn10", "knn20", "linear")
LINEAR_LRS = (0.03, 0.1, 0.3)


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run
def train_run(run_dir: Path, arm: str, seed: int, recipe: list[str], threads: int) -> None:
    """Train (or resume) one run in a subprocess; its stdout goes to ``run_dir/train.out``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "pwself_reference" / "train.py"), *recipe, *ARMS[arm],
           "--seed", str(seed), "--output-dir", str(run_dir), "--threads", str(threads),
           "--no-progress", "--no-plots"]
    if (run_dir / "checkpoint.pth").is_file():
        cmd.append("--resume")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    with open(run_dir / "train.out", "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)


def evaluate_run(run_dir: Path, threads: int) -> dict:
    """k-NN (k=10, 20) and linear probe of the final teacher backbone of a run."""
    import torch
    from torch.utils.data import DataLoader

    from pwself_reference.checkpoint import load_backbone
    from pwself_reference.data import build_labelled_dataset
    from pwself_reference.evaluation import (
        eval_transform,
        extract_features,
        knn_classify,
        train_linear_classifier,
    )

    torch.set_num_threads(threads)
    backbone, config = load_backbone(run_dir / "final.pth", "teacher")
    from pwself_reference.train import seeded_subset

    tf = eval_transform(config["global_crop_size"], config["eval_resize_ratio"])
    # the images of train.py's k-NN monitor (its --train-subset / --test-subset, if any)
    loaders = [DataLoader(seeded_subset(build_labelled_dataset(config["dataset"],
                                                               config.get("data_path"), train, tf),
                                        config[subset], config["seed"]), batch_size=500)
               for train, subset in ((True, "train_subset"), (False, "test_subset"))]
    out: dict = {}
    (ftr, ytr), (fte, yte) = (extract_features(backbone, dl, "cpu") for dl in loaders)
    for k in (10, 20):
        out[f"knn{k}"] = knn_classify(ftr, ytr, fte, yte, k=k, T=0.07, num_classes=10)[0]
    n_last = min(4, len(backbone.blocks))
    (ftr, ytr), (fte, yte) = (extract_features(backbone, dl, "cpu", n_last_blocks=n_last)
                              for dl in loaders)
    # DINO's probe at lr 1e-3 underfits in the 2400 steps of this small set; take the best of
    # a small lr sweep, as DINO's later linear evaluation does
    out["linear"] = max(
        train_linear_classifier(ftr, ytr, fte, yte, num_classes=10, epochs=100, lr=lr,
                                batch_size=256, val_freq=10, seed=0)["best_top1"]
        for lr in LINEAR_LRS)
    curve = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "knn":
            curve[int(rec["epoch"])] = rec["top1"]
    out["knn20_by_epoch"] = [curve[e] for e in sorted(curve)]
    out["wall_time_s"] = _train_wall_time(run_dir)
    return out


def _train_wall_time(run_dir: Path) -> float:
    total = 0.0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "epoch":
            total += float(rec.get("time_s", 0.0))
    return total


def kept_result(results_dir: Path, arm: str, seed: int) -> Path:
    """The committed copy of a run's result, so a grid continues on another machine."""
    return results_dir / "reproduction_runs" / f"{arm}-seed{seed}.json"


def do_run(out: Path, results_dir: Path, arm: str, seed: int, recipe: list[str],
           threads: int) -> dict:
    run_dir = out / arm / f"seed{seed}"
    kept = kept_result(results_dir, arm, seed)
    for path in (kept, run_dir / "result.json"):
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("recipe", recipe) != recipe:
                raise ValueError(f"{path} was made with the recipe {result['recipe']}, not "
                                 f"{recipe}; use another --out / --results")
            break
    else:
        t0 = time.perf_counter()
        if not (run_dir / "final.pth").is_file():
            train_run(run_dir, arm, seed, recipe, threads)
        result = {"arm": arm, "seed": seed, "recipe": recipe, **evaluate_run(run_dir, threads)}
        write_json_atomic(run_dir / "result.json", result)
        print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: knn20 {result['knn20']:.2f} "
              f"linear {result['linear']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    if not kept.is_file():
        write_json_atomic(kept, {"recipe": recipe, **result})
    return result


# ----------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def summarise(results: list[dict], arms: list[str], seeds: list[int]) -> dict:
    """Mean and std over seeds per arm and metric; paired differences to DINO."""
    by = {(r["arm"], r["seed"]): r for r in results}
    summary: dict = {}
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        row: dict = {"n_seeds": len(rs)}
        for m in METRICS:
            row[m] = _mean_std([r[m] for r in rs])
            pairs = [by[(arm, s)][m] - by[("dino", s)][m] for s in seeds
                     if (arm, s) in by and ("dino", s) in by]
            row[f"{m}_vs_dino"] = _mean_std(pairs) if pairs and arm != "dino" else None
        curves = [r["knn20_by_epoch"] for r in rs]
        n = min(len(c) for c in curves)
        row["knn20_by_epoch"] = [_mean_std([c[e] for c in curves]) for e in range(n)]
        summary[arm] = row
    return summary


def _fmt(ms: tuple[float, float] | None, signed: bool = False) -> str:
    if ms is None:
        return "—"
    m, s = ms
    text = f"{m:+.2f}" if signed else f"{m:.2f}"
    return text if math.isnan(s) else f"{text} ± {s:.2f}"


def markdown_table(summary: dict) -> str:
    head = ("| arm | seeds | k-NN k=10 | k-NN k=20 | linear | Δ k-NN k=20 vs DINO | "
            "Δ linear vs DINO |\n|---|---:|---:|---:|---:|---:|---:|\n")
    rows = [f"| {arm} | {r['n_seeds']} | {_fmt(r['knn10'])} | {_fmt(r['knn20'])} | "
            f"{_fmt(r['linear'])} | {_fmt(r['knn20_vs_dino'], True)} | "
            f"{_fmt(r['linear_vs_dino'], True)} |" for arm, r in summary.items()]
    return head + "\n".join(rows) + "\n"


def rst_table(summary: dict) -> str:
    cols = ["arm", "seeds", "k-NN k=10", "k-NN k=20", "linear", "Δ k-NN k=20 vs DINO",
            "Δ linear vs DINO"]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    cells = [cols] + [[arm, str(r["n_seeds"]), _fmt(r["knn10"]), _fmt(r["knn20"]),
                       _fmt(r["linear"]), _fmt(r["knn20_vs_dino"], True),
                       _fmt(r["linear_vs_dino"], True)] for arm, r in summary.items()]
    for row in cells:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {c}" for c in row[1:])
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, r in summary.items():
        curve = r["knn20_by_epoch"]
        x = list(range(len(curve)))
        m = [c[0] for c in curve]
        s = [0.0 if math.isnan(c[1]) else c[1] for c in curve]
        style = dict(lw=2.2, color="k") if arm == "dino" else dict(lw=1.3)
        ax.plot(x, m, label=arm, **style)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.12,
                        color=style.get("color"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 (k=20), %")
    ax.set_title("Fashion-MNIST subset: k-NN of the teacher during pretraining (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, results_dir: Path, arms: list[str], seeds: list[int], recipe: list[str],
           wall_s: float | None) -> dict:
    results = [json.loads(p.read_text()) for arm in arms for s in seeds
               if (p := kept_result(results_dir, arm, s)).is_file()]
    summary = summarise(results, arms, seeds)
    import torch

    meta = {"recipe": recipe, "arms": {a: ARMS[a] for a in arms}, "seeds": seeds,
            "runs_done": len(results), "runs_total": len(arms) * len(seeds),
            "train_wall_time_s_total": sum(r["wall_time_s"] for r in results),
            "grid_wall_time_s_this_invocation": wall_s, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / "reproduction.json",
                      {"meta": meta, "summary": summary, "runs": results})
    md = ["# Small-scale reproduction on Fashion-MNIST", "",
          f"Runs done: {len(results)} / {len(arms) * len(seeds)}; seeds {seeds}; "
          f"training time of the runs: {meta['train_wall_time_s_total'] / 60:.0f} min in total.",
          "", "Shared recipe: `python pwself_reference/train.py " + " ".join(recipe) + "`", "",
          "Mean ± standard deviation over seeds (percent). Δ: difference to DINO with the "
          "same seed (same initialisation and data order), mean ± std over seeds.", "",
          markdown_table(summary)]
    (results_dir / "reproduction.md").write_text("\n".join(md))
    (results_dir / "reproduction_table.rst").write_text(rst_table(summary))
    if summary:
        plot(summary, results_dir / "reproduction.png")
    return summary


# ----------------------------------------------------------------------------- main
RECIPE = ["--epochs", "3", "--batch-size", "32"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduction",
                   help="directory of the runs (checkpoints, logs, per-run results)")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                   help="where reproduction.{json,md,png} are written")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per arm")
    p.add_argument("--workers", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plot")
    p.add_argument("recipe", nargs=argparse.REMAINDER,
                   help="extra train.py flags after '--' replacing the shared recipe "
                        f"(default: {' '.join(RECIPE)})")
    args = p.parse_args(argv)
    if "dino" not in args.arms:
        p.error("--arms must include dino (the baseline of every difference)")
    recipe = [a for a in args.recipe if a != "--"] or RECIPE
    t0 = time.perf_counter()
    if args.report_only:  # collect runs finished by an earlier (killed) invocation
        for arm in args.arms:
            for s in args.seeds:
                if (args.out / arm / f"seed{s}" / "result.json").is_file():
                    do_run(args.out, args.results, arm, s, recipe, args.threads)
    else:
        # seed-major order: a partial grid still has every arm at the first seeds
        jobs = [(arm, s) for s in args.seeds for arm in args.arms]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(do_run, args.out, args.results, arm, s, recipe, args.threads)
                       for arm, s in jobs]
            for f in futures:
                f.result()
    summary = report(args.out, args.results, args.arms, args.seeds, recipe,
                     None if args.report_only else time.perf_counter() - t0)
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
