"""Draw the benchmark plots of the docs from the committed results JSON.

Usage::

    python docs/scripts/make_results_plots.py            # all figures
    python docs/scripts/make_results_plots.py --only matching

Reads ``benchmarks/results/*.json`` and writes, next to them:

* ``matching_speedup.png``: speed-up of :func:`patchaug.match_patches` (each rule)
  over EsViT's cosine-argmax matching, CPU (both baselines) and GPU;
* ``patch_jitter_speedup.png``: speed-up of each pipeline over Kornia's
  ``PatchSequential`` and of each operator over Kornia's functional op, on the
  CPU with 2 threads and with 1 (``patch_jitter_gpu.json`` records no engine:
  it predates the Triton kernel, so it is left out);
* ``reproduction_arms.png``: the Fashion-MNIST reproduction, each arm's k-NN and
  linear accuracy, one dot per seed (a colour per seed, so pairs with DINO show),
  mean ± std over seeds, DINO's mean as a line, unseeded baselines as crosses;
* ``gpu_throughput.png``: training images/s (and the ratio to DINO's time per
  image) and peak memory on a GPU, per architecture and configuration.

Every number drawn is read from a JSON file a benchmark wrote; nothing is typed
in here except the 100x goal line of the matching plot. The PNGs are committed
and the docs show them (``docs/guides/benchmarks.rst``, ``reproducing.rst``,
``patch_matching.rst``); rerun this after a
benchmark rewrites its JSON. ``benchmarks/results/reproduction.png`` (per-epoch
k-NN curves) and ``training_cost.png`` are drawn by their own benchmarks.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
MATCHING_GOAL = 100.0  # the project's goal for match_patches against EsViT on the CPU
DPI = 110


def _load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def _hbars(ax, labels: list[str], groups: dict[str, list[float | None]], unit: str = "x") -> None:
    """Grouped horizontal bars on a log axis, each labelled with its value; 1x marked.

    The x range leaves room for the value labels; the legend goes below the axes.
    """
    n = len(groups)
    height = 0.8 / max(n, 1)
    for g, (name, values) in enumerate(groups.items()):
        ys = [i + (g - (n - 1) / 2) * height for i in range(len(labels))]
        shown = [(y, v) for y, v in zip(ys, values) if v is not None]
        if not shown:
            continue
        bars = ax.barh([y for y, _ in shown], [v for _, v in shown], height=height * 0.9,
                       label=name)
        for bar, (_, v) in zip(bars, shown):
            ax.annotate(f"{v:.3g}{unit}", (v, bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    values = [v for vs in groups.values() for v in vs if v is not None] + [1.0]
    low, high = min(values) / 1.5, max(values) * 4
    ax.set_xlim(low, high)
    ticks = [m * 10.0**e for e in range(-3, 4) for m in (1, 3) if low <= m * 10.0**e <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
    ax.axvline(1.0, color="black", lw=0.8)
    ax.grid(axis="x", alpha=0.3)


def _legend_below(ax, ncol: int = 1, offset: float = 0.3) -> None:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -offset), ncol=ncol,
              frameon=False)


def _save(fig, out: Path) -> Path:
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_matching(results: Path) -> Path | None:
    """Speed-up of each match_patches rule over EsViT's matching, CPU and GPU."""
    cpu = _load(results, "matching.json")
    gpu = _load(results, "matching_gpu.json")
    if cpu is None:
        return None
    panels = [cpu] + ([gpu] if gpu else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    # CPU: one bar per baseline the benchmark recorded.
    speedup = cpu["speedup"]
    methods = list(next(iter(speedup.values())))
    baseline_names = {
        "esvit": "EsViT as its loss computes it (baseline of record)",
        "esvit_normalised_once": "EsViT normalising each view once",
    }
    ax = axes[0, 0]
    _hbars(ax, methods, {baseline_names.get(b, b): [s.get(m) for m in methods]
                         for b, s in speedup.items()})
    ax.axvline(MATCHING_GOAL, color="tab:red", ls="--", lw=1, label=f"{MATCHING_GOAL:.0f}x goal")
    setup = cpu.get("setup", {})
    ax.set_title(f"CPU, {setup.get('threads', '?')} threads, B={setup.get('batch', '?')}, "
                 f"{setup.get('pairs', '?')} view pairs", fontsize=9)
    ax.set_xlabel("speed-up over EsViT matching (x, log scale)")
    _legend_below(ax)
    if gpu:
        gpu_methods = list(gpu["speedup_vs_esvit"])
        ax = axes[0, 1]
        _hbars(ax, gpu_methods, {"EsViT cosine-argmax on the GPU":
                                 [gpu["speedup_vs_esvit"][m] for m in gpu_methods]})
        ax.set_title(f"GPU: {gpu.get('device', '?')}, torch {gpu.get('torch', '?')}",
                     fontsize=9)
        ax.set_xlabel("speed-up over EsViT matching (x, log scale; < 1: slower)")
        ax.set_xlim(0.1, 10)
        ax.xaxis.set_major_locator(FixedLocator([0.1, 0.3, 1, 3, 10]))
        _legend_below(ax)
    fig.suptitle("Patch matching for one training step: match_patches vs EsViT", fontsize=10)
    fig.tight_layout()
    return _save(fig, results / "matching_speedup.png")


# Pipelines of bench_patch_jitter.py, in the order of its table, with their labels.
_JITTER_PIPELINES = {
    "patchjitter_paper": "PatchJitter.paper(16)",
    "patchjitter_paper_compiled": "torch.compile(PatchJitter.paper(16)) (runs eagerly)",
    "patchjitter_authors": "PatchJitter.authors(16)",
    "patchjitter_paper_reference": "PatchJitter.paper(16), reference engine",
    "kornia_patchsequential_colorjitter": "Kornia PatchSequential (ColorJitter)",
    "per_patch_loop": "Python loop over patches",
}


def _jitter_speedups(cpu: dict) -> dict[str, float]:
    base = cpu["kornia_patchsequential_colorjiggle"]["median_s"]
    out = {label: base / cpu[key]["median_s"] for key, label in _JITTER_PIPELINES.items()
           if isinstance(cpu.get(key), dict) and cpu[key].get("median_s")}
    per_patch = cpu.get("per_patch")
    if per_patch:
        out["PerPatch (vs PatchSequential, same Kornia ops)"] = per_patch["speedup_vs_patchsequential"]
    return out


def plot_patch_jitter(results: Path) -> Path | None:
    """Speed-up over Kornia PatchSequential per pipeline, and per operator over Kornia's op."""
    runs = {}
    for name in ("patch_jitter.json", "patch_jitter_1thread.json"):
        data = _load(results, name)
        if data:
            runs[f"CPU, {data['machine']['threads']} thread(s)"] = data
    if not runs:
        return None
    fig, (ax_pipe, ax_op) = plt.subplots(1, 2, figsize=(11, 4.8))
    speedups = {run: _jitter_speedups(data["cpu"]) for run, data in runs.items()}
    labels = list(dict.fromkeys(label for s in speedups.values() for label in s))
    _hbars(ax_pipe, labels, {run: [s.get(label) for label in labels]
                             for run, s in speedups.items()})
    config = next(iter(runs.values()))["config"]
    ax_pipe.set_title(f"Pipelines, {config['batch']} x 3 x {config['size']}^2, patch "
                      f"{config['patch']}, median wall time", fontsize=9)
    ax_pipe.set_xlabel("x faster than Kornia PatchSequential (ColorJiggle) (log scale)")
    _legend_below(ax_pipe)
    ops = [row["op"] for row in next(iter(runs.values()))["per_op"]]
    _hbars(ax_op, ops, {run: [{r["op"]: r["speedup"] for r in data["per_op"]}.get(op) for op in ops]
                        for run, data in runs.items()})
    ax_op.set_title("Each operator alone, every patch augmented", fontsize=9)
    ax_op.set_xlabel("x faster than Kornia's functional op (log scale)")
    _legend_below(ax_op)
    fig.suptitle("PatchJitter vs Kornia", fontsize=10)
    fig.tight_layout()
    return _save(fig, results / "patch_jitter_speedup.png")


def plot_reproduction_arms(results: Path) -> Path | None:
    """Each arm's accuracy: a dot per seed (one colour per seed), mean ± std, DINO's mean.

    A run without a seed (a baseline evaluated once, e.g. raw pixels) is one cross.
    """
    data = _load(results, "reproduction.json")
    if data is None:
        return None
    runs = data["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None})
    seed_colour = {seed: f"C{i % 10}" for i, seed in enumerate(seeds)}
    metrics = {"knn20": "k-NN top-1 (k=20)", "linear": "linear probe top-1"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(10, 0.4 * len(arms) + 1.8), sharey=True)
    labelled: set[str] = set()

    def label(name: str) -> str | None:
        """The legend label the first time it is drawn, then none (one legend entry each)."""
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for ax, (metric, title) in zip(axes, metrics.items()):
        for i, arm in enumerate(arms):
            mine = [r for r in runs if r["arm"] == arm and r.get(metric) is not None]
            seeded = [r for r in mine if r.get("seed") is not None]
            for r in seeded:
                ax.scatter(r[metric], i, s=16, color=seed_colour[r["seed"]], zorder=3,
                           label=label(f"seed {r['seed']}"))
            for r in mine:
                if r.get("seed") is None:
                    ax.scatter(r[metric], i, marker="x", s=30, color="black", zorder=3,
                               label=label("no seed (evaluated once)"))
            if len(seeded) > 1:
                values = [r[metric] for r in seeded]
                ax.errorbar(statistics.fmean(values), i, xerr=statistics.stdev(values), fmt="D", color="black",
                            mfc="none", ms=6, capsize=3, zorder=4,
                            label=label("mean ± std over seeds"))
            if arm == "dino" and seeded:
                ax.axvline(statistics.fmean(r[metric] for r in seeded), color="black",
                           ls="--", lw=0.8, label=label("DINO mean"))
        ax.set_yticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    _legend_below(axes[0], ncol=3, offset=0.16)
    meta = data.get("meta", {})
    fig.suptitle(f"Fashion-MNIST reproduction: every arm and seed "
                 f"({' '.join(meta.get('recipe', []))})", fontsize=10)
    fig.tight_layout()
    return _save(fig, results / "reproduction_arms.png")


def plot_gpu_throughput(results: Path) -> Path | None:
    """Training images/s and peak memory on a GPU, per architecture and configuration."""
    data = _load(results, "gpu_throughput.json")
    if data is None:
        return None
    rows = data["results"]
    archs = list(dict.fromkeys(f"{r['arch']}/{r['patch_size']}" for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by_key = {(f"{r['arch']}/{r['patch_size']}", r["config"]): r for r in rows}
    fig, (ax_ips, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(configs)
    for c, config in enumerate(configs):
        xs = [a + (c - (len(configs) - 1) / 2) * width for a in range(len(archs))]
        present = [(x, by_key[(arch, config)]) for x, arch in zip(xs, archs)
                   if (arch, config) in by_key]
        ips = ax_ips.bar([x for x, _ in present], [r["images_per_s"] for _, r in present],
                         width * 0.9, label=config)
        for bar, (_, r) in zip(ips, present):
            dino = by_key.get((f"{r['arch']}/{r['patch_size']}", "dino"))
            note = f"{dino['images_per_s'] / r['images_per_s']:.2f}x" if dino else ""
            ax_ips.annotate(f"{r['images_per_s']:.0f}\n{note}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
        mem = ax_mem.bar([x for x, _ in present], [r["peak_memory_gib"] for _, r in present],
                         width * 0.9, label=config)
        ax_mem.bar_label(mem, fmt="%.1f", fontsize=7)
    meta = data.get("meta", {})
    for ax, label in ((ax_ips, "training images / s (x DINO's time per image)"),
                      (ax_mem, "peak GPU memory (GiB)")):
        ax.set_xticks(range(len(archs)), archs)
        ax.set_ylabel(label, fontsize=8)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    _legend_below(ax_ips, ncol=len(configs), offset=0.12)
    batches = sorted({r["batch"] for r in rows})
    fig.suptitle(f"Training throughput on {meta.get('device_name', 'a GPU')} "
                 f"({meta.get('precision', '?')}, batch {'/'.join(map(str, batches))}, "
                 f"out_dim {rows[0]['out_dim']}, crops {rows[0]['crops']})", fontsize=10)
    fig.tight_layout()
    return _save(fig, results / "gpu_throughput.png")


PLOTS = {
    "matching": plot_matching,
    "patch_jitter": plot_patch_jitter,
    "reproduction": plot_reproduction_arms,
    "gpu_throughput": plot_gpu_throughput,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the results JSON; the PNGs are written there too")
    parser.add_argument("--only", choices=sorted(PLOTS), action="append",
                        help="draw only these figures (repeatable)")
    args = parser.parse_args()
    for name in args.only or PLOTS:
        out = PLOTS[name](args.results)
        print(f"{name}: {out if out else 'no results JSON, skipped'}")


if __name__ == "__main__":
    main()
