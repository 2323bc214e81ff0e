"""PNG plots of the report (matplotlib, Agg canvas; pyplot and its global state are not used).

Each function takes plain data (the dicts :mod:`resprune.report` builds from a run
directory) and a path, writes one PNG and returns the path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["plot_scales", "plot_before_after", "before_after_figure", "plot_removed_per_stage", "plot_acc_vs_macs"]

BEFORE, AFTER, REMOVED, KEPT = "#4c72b0", "#dd8452", "#c44e52", "#4c72b0"


def _figure(w: float, h: float):
    """A figure on its own Agg canvas, laid out by matplotlib's constrained layout (titles,
    suptitle, tick labels and outside legends get room without overlapping)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_scales(run: dict, path: str | os.PathLike) -> Path:
    """|layer scale| per removable layer (log axis), removed ones marked, threshold drawn."""
    sc = run["scales"]
    names, values = sc["names"], [abs(v) for v in sc["values"]]
    removed = set(run["removed"])
    nonzero = [v for v in values if v > 0]
    thr = sc.get("threshold")
    floor = min(nonzero + ([thr] if thr else []) + [1.0]) / 10  # zeros drawn a decade below
    if nonzero and min(nonzero) <= floor:
        floor = min(nonzero) / 10
    shown = [max(v, floor) for v in values]
    fig = _figure(max(8.5, min(20.0, 0.16 * len(names) + 4.5)), 4.4)
    ax = fig.add_subplot()
    colors = [REMOVED if n in removed else KEPT for n in names]
    ax.bar(range(len(names)), shown, color=colors, width=0.8)
    ax.set_yscale("log")
    if thr:
        ax.axhline(thr, color="k", ls="--", lw=1, label=f"pruning threshold {thr:g}")
    elif run.get("max_removed_scale"):
        ax.axhline(run["max_removed_scale"], color="k", ls=":", lw=1,
                   label=f"largest removed |s| {run['max_removed_scale']:.3g} (budget mode)")
    # stage boundaries
    stages = [n.split(".")[0] for n in names]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5, color="0.6", lw=0.8)
    starts = [i for i in range(len(stages)) if i == 0 or stages[i] != stages[i - 1]]
    for j, i in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(stages)
        ax.text((i + end - 1) / 2, 1.01, stages[i], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="0.3")
    if len(names) <= 60:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_xlabel("removable layer (ResConv scale), module order")
    ax.set_ylabel("|layer scale| before pruning (log)")
    from matplotlib.patches import Patch

    handles = [Patch(color=REMOVED, label=f"removed ({len(removed)})"),
               Patch(color=KEPT, label=f"kept ({len(names) - len(removed & set(names))})")]
    h2, _ = ax.get_legend_handles_labels()
    if len(nonzero) != len(values):
        h2.append(Patch(color="none", label=f"|s| = 0 drawn at {floor:.1g}"))
    ax.legend(handles=handles + h2, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{run['name']}: layer scales and pruning", pad=16)
    return _save(fig, path)


def plot_before_after(run: dict, path: str | os.PathLike) -> Path:
    """Pruned as % of unpruned (MACs, params, latency per batch) and accuracy before/after."""
    return _save(before_after_figure(run), path)


def before_after_figure(run: dict):
    """The figure of :func:`plot_before_after`. Labels cannot collide: the cost panel widens
    with its bars, bar values sit above their bars with head room below the title, the
    legend is outside the axes, accuracy values sit inside their bars."""
    b, a = run["before"], run["after"]
    labels, ratios = [], []
    for key, label in (("macs", "MACs"), ("params", "params")):
        if b.get(key) and a.get(key) is not None:
            labels.append(label)
            ratios.append(100 * a[key] / b[key])
    for bs, lat in sorted(run["latency"].items(), key=lambda kv: int(kv[0])):
        if lat.get("ratio") is not None:
            labels.append(f"latency\nbatch {bs}")
            ratios.append(100 * lat["ratio"])
    left = max(4.2, 0.8 * len(labels) + 0.8)
    fig = _figure(left + 4.3, 4.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[left, 4.3])
    bars = ax1.bar(range(len(labels)), ratios, color=AFTER)
    ax1.axhline(100, color=BEFORE, ls="--", lw=1, label="unpruned model = 100%")
    top = max([115.0] + [1.15 * r + 5 for r in ratios])
    for rect, v in zip(bars, ratios):
        ax1.text(rect.get_x() + rect.get_width() / 2, v + 0.01 * top, f"{v:.0f}%", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(labels)))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylim(0, top)
    ax1.set_ylabel("pruned model, % of unpruned")
    ax1.set_title("cost after pruning (lower is better)", fontsize=10)
    fig.legend(handles=ax1.get_lines(), fontsize=8, loc="outside lower left", frameon=False)
    accs = [b.get("test_acc"), a.get("test_acc")]
    xs = ["before\n(" + b.get("stage", "sparse") + ")", "after\n(" + a.get("stage", "pruned") + ")"]
    known = [v for v in accs if v is not None]
    lo = max(0.0, math.floor(min(known) - 10)) if known else 0.0
    hi = min(100.0, (max(known) if known else 100.0) + 5)
    bars = ax2.bar(xs, [v if v is not None else lo for v in accs], color=[BEFORE, AFTER])
    for rect, v in zip(bars, accs):  # inside the bar, under its top: a bar is >= 10 points tall
        x = rect.get_x() + rect.get_width() / 2
        if v is None:
            ax2.text(x, lo + 0.02 * (hi - lo), "n/a", ha="center", va="bottom", fontsize=9)
        else:
            ax2.text(x, v - 0.02 * (hi - lo), f"{v:.2f}%", ha="center", va="top", fontsize=9, color="white")
    ax2.set_ylim(lo, hi)
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("accuracy (axis starts at %g%%)" % lo, fontsize=10)
    fig.suptitle(f"{run['name']}: before and after pruning", fontsize=11)
    return fig


def plot_removed_per_stage(run: dict, path: str | os.PathLike) -> Path:
    """Stacked bars: removal units removed and kept, per stage."""
    stages = list(run["units_per_stage"])
    removed = [run["removed_per_stage"].get(s, 0) for s in stages]
    kept = [run["units_per_stage"][s] - r for s, r in zip(stages, removed)]
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    ax.bar(stages, removed, color=REMOVED, label="removed")
    ax.bar(stages, kept, bottom=removed, color=KEPT, label="kept")
    for i, (r, k) in enumerate(zip(removed, kept)):
        ax.text(i, r + k + 0.2, f"{r}/{r + k}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max([r + k for r, k in zip(removed, kept)] + [1]) * 1.15 + 0.5)
    ax.set_xlabel("stage")
    ax.set_ylabel("removal units (count)")
    ax.set_title(f"{run['name']}: layers removed per stage\n"
                 "(unit: one conv with its own shortcut, or a block's whole residual branch)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never on a bar label
    return _save(fig, path)


def plot_acc_vs_macs(runs: list[dict], path: str | os.PathLike) -> Path:
    """Test accuracy against MACs across runs; an arrow from each run's unpruned to pruned model."""
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    first = True
    for r in runs:
        b, a = r["before"], r["after"]
        if a.get("macs") is None or a.get("test_acc") is None:
            continue
        xa, ya = a["macs"] / 1e6, a["test_acc"]
        ax.scatter([xa], [ya], color=AFTER, zorder=3, label="pruned" if first else None)
        ax.annotate(r["name"], (xa, ya), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if b.get("macs") is not None and b.get("test_acc") is not None:
            xb, yb = b["macs"] / 1e6, b["test_acc"]
            ax.scatter([xb], [yb], facecolor="none", edgecolor=BEFORE, zorder=3,
                       label="unpruned (sparse)" if first else None)
            ax.annotate("", (xa, ya), (xb, yb), arrowprops={"arrowstyle": "->", "color": "0.5", "lw": 0.8})
        first = False
    ax.set_xlabel("MACs per image (M, conv + linear)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against MACs across runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_latency_vs_macs(run: dict, path: str | os.PathLike) -> Path:
    """Predicted latency against MACs of the candidate prunings (the greedy removal in each
    rank order, from the run's latency table) and the pruned model chosen."""
    p = run["predicted_latency"]
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    for rank, pts in p["candidates"].items():
        xs, ys = zip(*pts)
        ax.plot([x / 1e6 for x in xs], ys, marker=".", ms=4, lw=1, label=f"removal order: {rank}")
    if run["after"].get("macs") is not None:
        ax.scatter([run["after"]["macs"] / 1e6], [p["predicted_after_ms"]], color=AFTER, zorder=3, s=40,
                   label="pruned (this run)")
    if p.get("target_ms") is not None:
        ax.axhline(p["target_ms"], color="0.5", ls="--", lw=0.8, label=f"target {p['target_ms']:g} ms")
    ax.set_xlabel("MACs per image (M, conv + linear)")
    ax.set_ylabel(f"predicted latency (ms, batch {p['batch']})")
    ax.set_title(f"{run['name']}: predicted latency against MACs of candidate prunings\n"
                 f"({p['device']}, {p['runtime']} {p['precision']}, {p['threads']} thread(s))", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
