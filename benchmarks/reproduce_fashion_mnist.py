"""Small-scale reproduction of PW-Self's claims on Fashion-MNIST (issues 6 and 17).

Every arm pretrains the same small ViT with ``pwself_reference/train.py`` on the
bundled Fashion-MNIST subset (6000 train / 1000 test images, native 28 px), with
the same budget (epochs, crops, batch) and differs only in the flags of its arm:

==================  ==================================================
arm                 flags on top of the shared recipe
==================  ==================================================
dino                ``--loss dino`` (Eq. 7, CLS only)
mean                ``--loss mean`` (Eq. 8)
sum                 ``--loss sum`` (Eq. 9)
lambda0.2           ``--loss lambda --lambda 0.2`` (Eq. 10)
mean-patchaug       ``--loss mean --patch-aug paper``
mean-official       ``--loss mean --match-rule official``
mean-centre         ``--loss mean --match-rule centre``
mean-shared         ``--loss mean --same-spatial-aug``
dino-p7, mean-p7,   the same with 7 px patches (4 x 4 tokens on 28 px, local crops of
mean-patchaug-p7    14 px): patch augmentation on 49-pixel patches instead of 16
==================  ==================================================

Grids: ``--grid short`` (default: the 8 arms above without ``-p7``, 3 epochs, seeds
0-2; report ``reproduction.*``) and ``--grid long`` (dino, mean, mean-patchaug and
their ``-p7`` arms, 15 epochs, seeds 0-2; report ``reproduction_long.*``, runs kept in
``reproduction_runs/long/``). ``--arms``, ``--seeds`` and a recipe after ``--``
override a grid.

Each ``(arm, seed)`` run lives in ``OUT/<arm>/seed<seed>``. A seed fixes the
initialisation and the data order, so arms with the same seed start from the same
weights and differences to DINO are paired by seed. After training, the final
teacher backbone is evaluated: weighted k-NN (k = 10 and 20, T = 0.07, CLS token),
a linear probe (DINO's: concatenated CLS of the last 4 blocks, SGD, 100 epochs,
on cached features of the un-augmented images, best of learning rates 0.03, 0.1,
0.3) and the patch-token correspondence of
:func:`pwself_reference.evaluation.correspondence_recall` (1000 test images, seed 0,
the recipe's crops, ``rule="centre"``, foreground tokens: patch std > 0.1), with
its position-only baseline. Per-epoch k-NN (k = 20) comes from the training log;
per-epoch correspondence from the teacher of every epoch: the long grid trains with
``--saveckp-freq 1`` and keeps the teacher backbone of each ``checkpointNNNN.pth`` in
``OUT/<arm>/seed<s>/epochs/teacher_epochNNN.pth`` (the full checkpoint is then deleted).

Baselines, computed by the script beside every grid: raw pixels (k-NN and the
linear probe on the flattened, normalised 3 x 28 x 28 input) and the untrained
network of each seed (the initialisation every arm of that seed starts from:
k-NN, linear, correspondence), plus the position-only network and chance for
the correspondence columns.

The grid is resumable: a finished run is skipped (its result is kept both in the
run directory and in ``benchmarks/results/reproduction_runs/``, which is committed,
so a grid continues on another machine), an interrupted one continues with
``--resume``; rerun the same command after a kill. Baselines are kept the same way.

Usage::

    python benchmarks/reproduce_fashion_mnist.py                # short grid, 2 runs at a time
    python benchmarks/reproduce_fashion_mnist.py --grid long    # 15 epochs, per-epoch curves
    python benchmarks/reproduce_fashion_mnist.py --report-only  # baselines + tables only

writes ``benchmarks/results/<report>.{json,md,png}``, ``<report>_table.rst`` and, for
runs with per-epoch correspondence, ``<report>_curves.png``.
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
#: backbone variants: flags that change the network (so its untrained baseline)
VARIANTS: dict[str, list[str]] = {"": [], "p7": ["--patch-size", "7", "--local-crop-size", "14"]}
for _arm in ("dino", "mean", "mean-patchaug"):
    ARMS[f"{_arm}-p7"] = ARMS[_arm] + VARIANTS["p7"]
METRICS = ("knn10", "knn20", "linear")
LINEAR_LRS = (0.03, 0.1, 0.3)
#: correspondence groups and the figures kept per group (foreground query tokens)
CORR_GROUPS = ("non_flipped", "flipped", "global_local")
CORR_FOREGROUND_STD = 0.1
CORR_IMAGES = 1000

RECIPE = ["--epochs", "3", "--batch-size", "32"]
GRIDS: dict[str, dict] = {
    "short": {"arms": [a for a in ARMS if not a.endswith("-p7")], "recipe": RECIPE,
              "report": "reproduction", "runs": "reproduction_runs", "snapshots": False},
    "long": {"arms": ["dino", "mean", "mean-patchaug", "dino-p7", "mean-p7", "mean-patchaug-p7"],
             "recipe": ["--epochs", "15", "--batch-size", "32"], "report": "reproduction_long",
             "runs": "reproduction_runs/long", "snapshots": True},
}


def variant_of(arm: str) -> str:
    """The backbone variant of an arm ("" for the shared 4 px patch network)."""
    return next((v for v in VARIANTS if v and arm.endswith(f"-{v}")), "")


def paired_baseline(arm: str) -> str:
    """The DINO arm an arm is paired with (same backbone variant)."""
    v = variant_of(arm)
    return f"dino-{v}" if v else "dino"


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run
def train_run(run_dir: Path, arm: str, seed: int, recipe: list[str], threads: int,
              snapshots: bool = False) -> None:
    """Train (or resume) one run in a subprocess; its stdout goes to ``run_dir/train.out``.

    With ``snapshots``, train.py keeps every epoch's checkpoint (``--saveckp-freq 1``)
    for the per-epoch correspondence curve; :func:`collect_snapshots` reduces them to
    teacher backbones.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "pwself_reference" / "train.py"), *recipe, *ARMS[arm],
           "--seed", str(seed), "--output-dir", str(run_dir), "--threads", str(threads),
           "--no-progress", "--no-plots"]
    if snapshots:
        cmd += ["--saveckp-freq", "1"]
    if (run_dir / "checkpoint.pth").is_file():
        cmd.append("--resume")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    with open(run_dir / "train.out", "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def snapshot_teacher(run_dir: Path, ckpt_path: Path) -> Path:
    """Keep the teacher backbone of a train.py checkpoint (written atomically) as
    ``run_dir/epochs/teacher_epochNNN.pth`` (NNN: its epochs done), unless already there."""
    from pwself_reference.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    dest = run_dir / "epochs" / f"teacher_epoch{int(ckpt['epoch']):03d}.pth"
    if not dest.is_file():
        teacher = {k: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
        save_checkpoint({"config": ckpt["config"], "teacher": teacher,
                         "epoch": int(ckpt["epoch"])}, dest)
    return dest


def collect_snapshots(run_dir: Path) -> list[Path]:
    """Teacher snapshots of every epoch checkpoint train.py kept (``--saveckp-freq``), then
    those checkpoints are deleted (they hold the optimizer state too). Safe to repeat after
    a kill: a checkpoint goes only once its snapshot is written. ``final.pth`` gives the
    last epoch of runs trained without ``--saveckp-freq``."""
    kept = sorted(run_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth"))
    for path in kept:
        snapshot_teacher(run_dir, path)
        path.unlink()
    if (run_dir / "final.pth").is_file():
        snapshot_teacher(run_dir, run_dir / "final.pth")
    return sorted((run_dir / "epochs").glob("teacher_epoch*.pth"))


def eval_loaders(config: dict) -> tuple:
    """The images of train.py's k-NN monitor (its --train-subset / --test-subset, if any)."""
    from torch.utils.data import DataLoader

    from pwself_reference.data import build_labelled_dataset
    from pwself_reference.evaluation import eval_transform
    from pwself_reference.train import seeded_subset

    tf = eval_transform(config["global_crop_size"], config["eval_resize_ratio"])
    return tuple(DataLoader(seeded_subset(build_labelled_dataset(config["dataset"],
                                                                 config.get("data_path"), train, tf),
                                          config[subset], config["seed"]), batch_size=500)
                 for train, subset in ((True, "train_subset"), (False, "test_subset")))


def classify(train: tuple, test: tuple, *, knn: bool = True, linear: bool = True) -> dict:
    """k-NN (k = 10, 20) and/or the linear probe on ``(features, labels)`` pairs."""
    from pwself_reference.evaluation import knn_classify, train_linear_classifier

    out: dict = {}
    if knn:
        for k in (10, 20):
            out[f"knn{k}"] = knn_classify(*train, *test, k=k, T=0.07, num_classes=10)[0]
    if linear:
        # DINO's probe at lr 1e-3 underfits in the 2400 steps of this small set; take the best
        # of a small lr sweep, as DINO's later linear evaluation does
        out["linear"] = max(
            train_linear_classifier(*train, *test, num_classes=10, epochs=100, lr=lr,
                                    batch_size=256, val_freq=10, seed=0)["best_top1"]
            for lr in LINEAR_LRS)
    return out


def backbone_metrics(backbone, loaders: tuple, config: dict) -> dict:
    """k-NN, linear probe and correspondence of one backbone."""
    from functools import partial

    from pwself_reference.evaluation import extract_features, last_blocks_features

    out = classify(*[extract_features(backbone, dl, "cpu") for dl in loaders], linear=False)
    n_last = min(4, len(backbone.blocks))
    out.update(classify(*[extract_features(backbone, dl, "cpu",
                                           features=partial(last_blocks_features,
                                                            n_last_blocks=n_last))
                          for dl in loaders], knn=False))
    out["correspondence"] = correspondence(backbone, loaders[1], config)
    return out


def correspondence(backbone, test_loader, config: dict, position_only: bool = True) -> dict:
    """Correspondence recall (foreground and all tokens) of a backbone and, optionally, of
    its position embeddings alone, on the first CORR_IMAGES test images."""
    import torch

    from pwself_reference.evaluation import PositionOnly, correspondence_recall

    images = torch.cat([x for x, _ in test_loader])[:CORR_IMAGES]
    kw = dict(global_size=config["global_crop_size"], local_size=config["local_crop_size"],
              global_scale=tuple(config["global_crops_scale"]),
              local_scale=tuple(config["local_crops_scale"]), rule="centre",
              foreground_std=CORR_FOREGROUND_STD, seed=0)
    models = {"model": backbone}
    if position_only:
        models["position_only"] = PositionOnly(backbone)
    out = {}
    for name, model in models.items():
        r = correspondence_recall(model, images, **kw)
        out[name] = {"foreground": r["foreground"], "all": r["all"]}
    return out


def untrained_backbone(recipe: list[str], arm: str, seed: int):
    """The network every arm of ``seed`` (and of ``arm``'s variant) starts from, and its config:
    train.py seeds with ``--seed`` and builds the student backbone first."""
    import torch

    from pwself_reference.config import parse_args, to_dict
    from pwself_reference.models import build_backbone

    config = to_dict(parse_args([*recipe, *ARMS[arm], "--seed", str(seed)]))
    torch.manual_seed(seed)
    backbone = build_backbone(config["arch"], config["patch_size"], config["global_crop_size"],
                              config["drop_path"], depth=config["depth"],
                              embed_dim=config["embed_dim"], num_heads=config["num_heads"])
    return backbone.eval(), config


def evaluate_run(run_dir: Path, threads: int) -> dict:
    """k-NN (k=10, 20), linear probe and correspondence of the final teacher backbone of a
    run; per-epoch k-NN from its log and per-epoch correspondence from its snapshots."""
    import torch

    from pwself_reference.checkpoint import load_backbone

    torch.set_num_threads(threads)
    backbone, config = load_backbone(run_dir / "final.pth", "teacher")
    loaders = eval_loaders(config)
    out = backbone_metrics(backbone, loaders, config)
    curve = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "knn":
            curve[int(rec["epoch"])] = rec["top1"]
    out["knn20_by_epoch"] = [curve[e] for e in sorted(curve)]
    snaps = sorted((run_dir / "epochs").glob("teacher_epoch*.pth"))
    if snaps:
        by_epoch = {}
        for path in snaps:
            net, _ = load_backbone(path, "teacher")
            r = correspondence(net, loaders[1], config, position_only=False)["model"]
            by_epoch[int(path.stem[len("teacher_epoch"):])] = {
                g: r["foreground"][g]["recall_at_1"] for g in CORR_GROUPS}
        out["corr_by_epoch"] = {str(e): by_epoch[e] for e in sorted(by_epoch)}
    out["wall_time_s"] = _train_wall_time(run_dir)
    return out


def _train_wall_time(run_dir: Path) -> float:
    total = 0.0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "epoch":
            total += float(rec.get("time_s", 0.0))
    return total


def kept_result(results_dir: Path, arm: str, seed: int, runs: str = "reproduction_runs") -> Path:
    """The committed copy of a run's result, so a grid continues on another machine."""
    return results_dir / runs / f"{arm}-seed{seed}.json"


def _kept_or_none(paths: list[Path], recipe: list[str]) -> dict | None:
    for path in paths:
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("recipe", recipe) != recipe:
                raise ValueError(f"{path} was made with the recipe {result['recipe']}, not "
                                 f"{recipe}; use another --out / --results")
            return result
    return None


def do_run(out: Path, results_dir: Path, arm: str, seed: int, recipe: list[str],
           threads: int, runs: str = "reproduction_runs", snapshots: bool = False) -> dict:
    run_dir = out / arm / f"seed{seed}"
    kept = kept_result(results_dir, arm, seed, runs)
    result = _kept_or_none([kept, run_dir / "result.json"], recipe)
    if result is None:
        t0 = time.perf_counter()
        if not (run_dir / "final.pth").is_file():
            train_run(run_dir, arm, seed, recipe, threads, snapshots)
        if snapshots:
            collect_snapshots(run_dir)
        result = {"arm": arm, "seed": seed, "recipe": recipe, **evaluate_run(run_dir, threads)}
        write_json_atomic(run_dir / "result.json", result)
        print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: knn20 {result['knn20']:.2f} "
              f"linear {result['linear']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    if not kept.is_file():
        write_json_atomic(kept, {"recipe": recipe, **result})
    return result


# ----------------------------------------------------------------------------- baselines
def pixel_baseline(results_dir: Path, recipe: list[str], threads: int,
                   runs: str = "reproduction_runs") -> dict:
    """k-NN and linear probe on the flattened, normalised input images (kept like a run)."""
    kept = results_dir / runs / "baseline-raw-pixels.json"
    result = _kept_or_none([kept], recipe)
    if result is None:
        import torch

        from pwself_reference.config import parse_args, to_dict

        torch.set_num_threads(threads)
        config = to_dict(parse_args([*recipe, "--seed", "0"]))
        feats = []
        for dl in eval_loaders(config):
            xs, ys = zip(*[(x.flatten(1), y) for x, y in dl])
            feats.append((torch.cat(xs), torch.cat(ys)))
        result = {"recipe": recipe, "arm": "raw pixels", **classify(*feats)}
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(kept, result)
        print(f"raw pixels: knn20 {result['knn20']:.2f} linear {result['linear']:.2f}", flush=True)
    return result


def untrained_baseline(results_dir: Path, recipe: list[str], arm: str, seed: int, threads: int,
                       runs: str = "reproduction_runs") -> dict:
    """k-NN, linear and correspondence of the untrained network of ``arm``'s variant and
    ``seed`` (kept like a run; shared by every arm of that variant and seed)."""
    v = variant_of(arm)
    kept = results_dir / runs / f"untrained{'-' + v if v else ''}-seed{seed}.json"
    result = _kept_or_none([kept], recipe)
    if result is None:
        import torch

        torch.set_num_threads(threads)
        backbone, config = untrained_backbone(recipe, arm, seed)
        result = {"recipe": recipe, "arm": f"untrained{'-' + v if v else ''}", "variant": v,
                  "seed": seed, **backbone_metrics(backbone, eval_loaders(config), config)}
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(kept, result)
        print(f"untrained {v or 'p4'} seed {seed}: knn20 {result['knn20']:.2f} "
              f"linear {result['linear']:.2f}", flush=True)
    return result


# ----------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def corr_value(result: dict, group: str, key: str = "recall_at_1",
               model: str = "model") -> float | None:
    """A run's foreground correspondence figure, or None when it was not measured."""
    return (result.get("correspondence", {}).get(model, {}).get("foreground", {})
            .get(group, {}).get(key))


CORR_METRICS = tuple(f"corr_{g}" for g in CORR_GROUPS)


def _metric(result: dict, m: str) -> float | None:
    if m.startswith("corr_"):
        return corr_value(result, m[len("corr_"):])
    return result.get(m)


def summarise(results: list[dict], arms: list[str], seeds: list[int]) -> dict:
    """Mean and std over seeds per arm and metric; paired differences to DINO (of the same
    backbone variant); per-epoch k-NN and correspondence curves."""
    by = {(r["arm"], r["seed"]): r for r in results}
    summary: dict = {}
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        base = paired_baseline(arm)
        row: dict = {"n_seeds": len(rs)}
        for m in METRICS + CORR_METRICS:
            vals = [v for r in rs if (v := _metric(r, m)) is not None]
            row[m] = _mean_std(vals) if vals else None
            pairs = [_metric(by[(arm, s)], m) - _metric(by[(base, s)], m) for s in seeds
                     if (arm, s) in by and (base, s) in by
                     and _metric(by[(arm, s)], m) is not None
                     and _metric(by[(base, s)], m) is not None]
            row[f"{m}_vs_dino"] = _mean_std(pairs) if pairs and arm != base else None
        curves = [r["knn20_by_epoch"] for r in rs]
        n = min(len(c) for c in curves)
        row["knn20_by_epoch"] = [_mean_std([c[e] for c in curves]) for e in range(n)]
        corr_curves = [r["corr_by_epoch"] for r in rs if r.get("corr_by_epoch")]
        if corr_curves:
            epochs = sorted(set.intersection(*[set(c) for c in corr_curves]), key=int)
            row["corr_by_epoch"] = {e: {g: _mean_std([c[e][g] for c in corr_curves])
                                        for g in CORR_GROUPS} for e in epochs}
        summary[arm] = row
    return summary


def summarise_baselines(pixels: dict | None, untrained: list[dict]) -> dict:
    """Rows of the baselines: raw pixels, untrained network(s) (mean ± std over seeds),
    position-only (untrained embeddings) and chance of the correspondence columns."""
    rows: dict = {}
    if pixels is not None:
        rows["raw pixels"] = {"n_seeds": None, **{m: (pixels[m], float("nan")) for m in METRICS}}
    for arm in dict.fromkeys(r["arm"] for r in untrained):
        rs = [r for r in untrained if r["arm"] == arm]
        rows[f"{arm} network"] = {"n_seeds": len(rs), **{
            m: _mean_std(vals) if (vals := [v for r in rs if (v := _metric(r, m)) is not None])
            else None for m in METRICS + CORR_METRICS}}
        pos = [corr_value(r, g, model="position_only") for r in rs for g in CORR_GROUPS]
        if None not in pos:
            rows[f"position-only ({arm})"] = {"n_seeds": len(rs), **{
                f"corr_{g}": _mean_std([corr_value(r, g, model="position_only") for r in rs])
                for g in CORR_GROUPS}}
        chance = [corr_value(r, g, "chance_at_1") for r in rs[:1] for g in CORR_GROUPS]
        if None not in chance:
            label = "chance" if arm == "untrained" else f"chance ({arm[len('untrained-'):]})"
            rows[label] = {"n_seeds": None, **{
                f"corr_{g}": (c, float("nan")) for g, c in zip(CORR_GROUPS, chance)}}
    return rows


def _fmt(ms: tuple[float, float] | None, signed: bool = False) -> str:
    if ms is None:
        return "—"
    m, s = ms
    text = f"{m:+.2f}" if signed else f"{m:.2f}"
    return text if math.isnan(s) else f"{text} ± {s:.2f}"


CLASSIFY_COLS = [("k-NN k=10", "knn10", False), ("k-NN k=20", "knn20", False),
                 ("linear", "linear", False), ("Δ k-NN k=20 vs DINO", "knn20_vs_dino", True),
                 ("Δ linear vs DINO", "linear_vs_dino", True)]
CORR_COLS = [("recall@1 non-flipped", "corr_non_flipped", False),
             ("recall@1 flipped", "corr_flipped", False),
             ("recall@1 global-local", "corr_global_local", False),
             ("Δ non-flipped vs DINO", "corr_non_flipped_vs_dino", True),
             ("Δ global-local vs DINO", "corr_global_local_vs_dino", True)]


def _cells(summary: dict, cols: list, baselines: dict | None) -> list[list[str]]:
    rows = [[arm, str(r["n_seeds"])] + [_fmt(r.get(key), signed) for _, key, signed in cols]
            for arm, r in summary.items()]
    for name, r in (baselines or {}).items():
        if all(r.get(key) is None for _, key, _ in cols):
            continue
        rows.append([f"*{name}*", "—" if r["n_seeds"] is None else str(r["n_seeds"])]
                    + [_fmt(r.get(key), signed) for _, key, signed in cols])
    return rows


def markdown_table(summary: dict, baselines: dict | None = None, cols: list | None = None) -> str:
    cols = CLASSIFY_COLS if cols is None else cols
    head = ("| arm | seeds | " + " | ".join(c for c, _, _ in cols) + " |\n|---|---:|"
            + "---:|" * len(cols) + "\n")
    return head + "\n".join("| " + " | ".join(r) + " |"
                             for r in _cells(summary, cols, baselines)) + "\n"


def rst_table(summary: dict, baselines: dict | None = None, cols: list | None = None) -> str:
    cols = CLASSIFY_COLS if cols is None else cols
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [["arm", "seeds"] + [c for c, _, _ in cols]] + _cells(summary, cols, baselines):
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {c}" for c in row[1:])
    return "\n".join(lines) + "\n"


#: paired differences to DINO that the budget table compares between two grids
BUDGET_METRICS = [("Δ k-NN k=20", "knn20_vs_dino"), ("Δ linear", "linear_vs_dino"),
                  ("Δ corr. non-flipped", "corr_non_flipped_vs_dino"),
                  ("Δ corr. flipped", "corr_flipped_vs_dino"),
                  ("Δ corr. global-local", "corr_global_local_vs_dino")]


def _epochs(recipe: list[str]) -> str:
    return recipe[recipe.index("--epochs") + 1] if "--epochs" in recipe else "?"


def budget_table(short: dict, long: dict) -> str | None:
    """Markdown table of each arm's paired differences to DINO in two grids (``short`` and
    ``long``: ``{"recipe": ..., "summary": ...}``, as the grids' JSON holds them), side by
    side: how a claim moves with the budget. None when no arm is in both."""
    arms = [a for a in long["summary"] if a in short["summary"] and
            long["summary"][a].get("knn20_vs_dino") is not None and
            short["summary"][a].get("knn20_vs_dino") is not None]
    if not arms:
        return None
    e_short, e_long = _epochs(short["recipe"]), _epochs(long["recipe"])
    head = ["arm"] + [f"{name}, {e} epochs (seeds)" for name, _ in BUDGET_METRICS
                      for e in (e_short, e_long)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm in arms:
        cells = [arm]
        for _, key in BUDGET_METRICS:
            for grid in (short, long):
                row = grid["summary"][arm]
                # a grid run before the correspondence evaluation existed has no such figure
                ms = row.get(key)
                cells.append("—" if ms is None else f"{_fmt(ms, signed=True)} ({row['n_seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
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


def plot_corr_curves(summary: dict, untrained: dict[str, dict], path: Path) -> bool:
    """Per-epoch foreground recall@1 of each group (epoch 0: the untrained network)."""
    arms = {a: r for a, r in summary.items() if r.get("corr_by_epoch")}
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CORR_GROUPS), figsize=(12, 3.8), sharey=True)
    for ax, g in zip(axes, CORR_GROUPS):
        for arm, r in arms.items():
            pts = {int(e): v[g] for e, v in r["corr_by_epoch"].items()}
            init = untrained.get(variant_of(arm), {}).get(f"corr_{g}")
            if init is not None:
                pts.setdefault(0, init)
            x = sorted(pts)
            m = [pts[e][0] for e in x]
            s = [0.0 if math.isnan(pts[e][1]) else pts[e][1] for e in x]
            line, = ax.plot(x, m, label=arm, lw=2.0 if arm.startswith("dino") else 1.3)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            alpha=0.12, color=line.get_color())
        ax.set_title(g.replace("_", "-"), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("correspondence recall@1, foreground, %")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(out: Path, results_dir: Path, arms: list[str], seeds: list[int], recipe: list[str],
           wall_s: float | None, name: str = "reproduction", runs: str = "reproduction_runs",
           pixels: dict | None = None, untrained: list[dict] | None = None) -> dict:
    results = [json.loads(p.read_text()) for arm in arms for s in seeds
               if (p := kept_result(results_dir, arm, s, runs)).is_file()]
    summary = summarise(results, arms, seeds)
    untrained = untrained or []
    baselines = summarise_baselines(pixels, untrained)
    import torch

    meta = {"recipe": recipe, "arms": {a: ARMS[a] for a in arms}, "seeds": seeds,
            "runs_done": len(results), "runs_total": len(arms) * len(seeds),
            "train_wall_time_s_total": sum(r["wall_time_s"] for r in results),
            "grid_wall_time_s_this_invocation": wall_s, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "correspondence": {"images": CORR_IMAGES, "seed": 0, "rule": "centre",
                               "foreground_std": CORR_FOREGROUND_STD,
                               "figure": "recall@1 of foreground query tokens, percent"}}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / f"{name}.json",
                      {"meta": meta, "summary": summary, "baselines": baselines, "runs": results,
                       "baseline_runs": ([pixels] if pixels else []) + untrained})
    n_corr = sum(1 for r in results if "correspondence" in r)
    md = ["# Small-scale reproduction on Fashion-MNIST", "",
          f"Runs done: {len(results)} / {len(arms) * len(seeds)}; seeds {seeds}; "
          f"training time of the runs: {meta['train_wall_time_s_total'] / 60:.0f} min in total.",
          "", "Shared recipe: `python pwself_reference/train.py " + " ".join(recipe) + "`", "",
          "Mean ± standard deviation over seeds (percent). Δ: difference to DINO (of the same "
          "patch size) with the same seed (same initialisation and data order), mean ± std over "
          "seeds. Rows in italics are baselines computed by the script: raw pixels (the "
          "flattened, normalised 3 x 28 x 28 input) and the untrained network of each seed "
          "(the weights every arm of that seed starts from).", "",
          markdown_table(summary, baselines),
          "## Patch-token correspondence", "",
          "Recall@1 (percent) of geometric matches among the teacher's patch tokens "
          f"(`pwself_reference.evaluation.correspondence_recall`: {CORR_IMAGES} test images, "
          "two global views and one local view each, seed 0, `rule='centre'`, foreground "
          f"query tokens: patch std > {CORR_FOREGROUND_STD}). Position-only: the network's "
          "position embeddings as tokens; chance: 1 / tokens of the searched view. "
          f"Measured for {n_corr} of the {len(results)} runs"
          + (" (runs finished before the evaluation existed show —; their checkpoints were "
             "not kept)." if n_corr < len(results) else "."), "",
          markdown_table(summary, baselines, CORR_COLS)]
    short_json = results_dir / "reproduction.json"
    if name != "reproduction" and summary and short_json.is_file():
        short = json.loads(short_json.read_text())
        table = budget_table({"recipe": short["meta"]["recipe"], "summary": short["summary"]},
                             {"recipe": recipe, "summary": summary})
        if table:
            md += ["", "## Budget", "",
                   f"Paired differences to DINO (same seed) after {_epochs(short['meta']['recipe'])}"
                   f" epochs (`reproduction.md`) and after {_epochs(recipe)} epochs (this grid), "
                   "mean ± std over seeds, the number of seeds in brackets; corr.: recall@1 of "
                   "the patch-token correspondence (percentage points).", "", table]
    (results_dir / f"{name}.md").write_text("\n".join(md))
    (results_dir / f"{name}_table.rst").write_text(rst_table(summary, baselines))
    if summary:
        plot(summary, results_dir / f"{name}.png")
        init = {r.get("variant", ""): baselines.get(f"{r['arm']} network", {}) for r in untrained}
        plot_corr_curves(summary, init, results_dir / f"{name}_curves.png")
    return summary


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=list(GRIDS), default="short",
                   help="arms, recipe and report name (short: 3 epochs; long: 15 epochs with "
                        "per-epoch correspondence)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the runs (default: runs/<report>)")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                   help="where <report>.{json,md,png} are written")
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                   help="arms to run (default: the grid's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per arm")
    p.add_argument("--workers", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report-only", action="store_true",
                   help="no training: baselines (kept after the first time) and tables only")
    p.add_argument("--no-baselines", action="store_true", help="skip the baseline rows")
    p.add_argument("recipe", nargs=argparse.REMAINDER,
                   help="extra train.py flags after '--' replacing the grid's recipe "
                        f"(short: {' '.join(RECIPE)})")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    arms = args.arms or grid["arms"]
    for arm in arms:
        if paired_baseline(arm) not in arms:
            p.error(f"--arms must include {paired_baseline(arm)} (the baseline of {arm})")
    recipe = [a for a in args.recipe if a != "--"] or grid["recipe"]
    out = args.out or ROOT / "runs" / grid["report"]
    runs, snapshots = grid["runs"], grid["snapshots"]
    t0 = time.perf_counter()
    if args.report_only:  # collect runs finished by an earlier (killed) invocation
        for arm in arms:
            for s in args.seeds:
                if (out / arm / f"seed{s}" / "result.json").is_file():
                    do_run(out, args.results, arm, s, recipe, args.threads, runs, snapshots)
    else:
        # seed-major order: a partial grid still has every arm at the first seeds
        jobs = [(arm, s) for s in args.seeds for arm in arms]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(do_run, out, args.results, arm, s, recipe, args.threads, runs,
                                   snapshots) for arm, s in jobs]
            for f in futures:
                f.result()
    pixels, untrained = None, []
    if not args.no_baselines:
        pixels = pixel_baseline(args.results, recipe, args.threads, runs)
        variants = {variant_of(a): a for a in arms}
        untrained = [untrained_baseline(args.results, recipe, arm, s, args.threads, runs)
                     for arm in variants.values() for s in args.seeds]
    summary = report(out, args.results, arms, args.seeds, recipe,
                     None if args.report_only else time.perf_counter() - t0, grid["report"],
                     runs, pixels, untrained)
    print(markdown_table(summary, summarise_baselines(pixels, untrained)))


if __name__ == "__main__":
    main()
