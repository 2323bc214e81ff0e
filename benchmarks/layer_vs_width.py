#!/usr/bin/env python3
"""Layer pruning against width (filter) pruning at the same MACs: onnxruntime latency.

For ResNet-56 and ResNet-110 (CIFAR, 32×32 inputs):

* **layer**: :func:`resprune.prune_` in budget mode (``target_macs`` = 0.35 and 0.5 of the
  MACs), then fused: whole layers and residual branches disappear.
* **width**: Torch-Pruning (``torch_pruning``, optional dependency ``resprune[width]``) with
  L1-norm filter importance on the fused *unpruned* net, pruning the output filters of the
  first conv of every residual block (and the matching input channels of the second), the
  classic filter-pruning recipe for CIFAR ResNets (Li et al., 2017, "Pruning Filters for
  Efficient ConvNets"): the residual stream keeps its width, so the option-A shortcuts stay
  exact. One ratio for all stages is bisected until the MACs match the layer-pruned net's
  within 2%; channel counts are integers, so the last stage (64 channels, finest steps) gets
  its own ratio when the common one jumps over the target.

All nets are exported to ONNX (verified against torch) and timed side by side with
``export/ort_bench.py`` (interleaved runs, batch 1 and 64, medians, peak memory of a child
process). Latency does not depend on weight values, so without ``--checkpoint`` a freshly
built ResConv model is used with its layer scales drawn from a fixed seed (they decide only
*which* layers the budget removes); with ``--checkpoint`` (a sparse-trained model in
``resprune.save`` format) its own scales decide.

Run (about 5 minutes on 2 cores; keep it polite on a shared machine):

    nice python benchmarks/layer_vs_width.py --threads 1 --runs 20

Writes ``benchmarks/results/layer_vs_width.md`` (``--out``) with the hardware, versions,
date and settings, and prints the same tables (``--json`` also keeps the raw numbers). The
benchmark process runs ``--repeat`` times per model; ratios are the mean over repeats of the
ratio of medians within one process, with the min–max range.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import resprune as rp

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "export" / "ort_bench.py"
INPUT = (1, 3, 32, 32)
MACS_TOL = 0.02


# --------------------------------------------------------------------------- models


def base_model(name: str, checkpoint: str | None, seed: int) -> nn.Module:
    if checkpoint:
        return rp.load(checkpoint).eval()
    torch.manual_seed(seed)
    m = rp.create_model(name).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, rc in rp.sparsity.removable_scales(m):
            rc.scale.copy_(torch.rand((), generator=g) ** 2)  # importance order only
    return m


def layer_pruned(base: nn.Module, target: float) -> tuple[nn.Module, rp.PruneReport]:
    m = copy.deepcopy(base)
    rep = rp.prune_(m, rp.PruneConfig(target_macs=target, input_size=INPUT))
    return rp.fuse(m), rep


STAGES = ("layer1", "layer2", "layer3")


def _width_prune(fused: nn.Module, ratios: dict[str, float]) -> nn.Module:
    """Prune ``ratios[stage]`` of the filters of every block's first conv in each stage (L1 norm)."""
    import torch_pruning as tp

    m = copy.deepcopy(fused)
    internal = set()
    for name, mod in m.named_modules():
        if name.endswith(".conv1"):  # first conv of a residual block: Sequential(Conv2d, ReLU)
            conv = mod[0] if isinstance(mod, nn.Sequential) else mod
            internal.add(id(conv))
    ignored = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)) and id(x) not in internal]
    if any(r > 0 for r in ratios.values()):
        pruner = tp.pruner.MetaPruner(
            m, torch.zeros(INPUT), importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.0, pruning_ratio_dict={getattr(m, s): r for s, r in ratios.items()},
            ignored_layers=ignored,
        )
        pruner.step()
    return m.eval()


def _bisect(make, macs_goal: int, lo: float, hi: float, steps: int = 16):
    """Bisect a ratio in [lo, hi]; return (closest net, ratio, MACs) and the largest ratio whose
    MACs are still >= the goal (MACs fall as the ratio grows, in steps)."""
    best, under = None, lo
    for _ in range(steps):
        r = (lo + hi) / 2
        m = make(r)
        macs = rp.profile(m, INPUT).macs
        if best is None or abs(macs / macs_goal - 1) < abs(best[2] / macs_goal - 1):
            best = (m, r, macs)
        if abs(macs / macs_goal - 1) <= MACS_TOL / 4:
            break
        if macs > macs_goal:
            lo = under = r
        else:
            hi = r
    return best, under


def width_pruned(fused: nn.Module, macs_goal: int) -> tuple[nn.Module, dict[str, float], int]:
    """Filter ratios whose MACs are within MACS_TOL of ``macs_goal``: one uniform ratio first;
    channel counts are integers, so when its steps are too coarse the last stage (64 channels,
    the finest steps) gets its own ratio on top."""
    (m, r, macs), under = _bisect(lambda r: _width_prune(fused, dict.fromkeys(STAGES, r)), macs_goal, 0.0, 0.95)
    ratios = dict.fromkeys(STAGES, r)
    if abs(macs / macs_goal - 1) > MACS_TOL / 4:
        base = dict.fromkeys(STAGES, under)
        (m3, r3, macs3), _ = _bisect(lambda x: _width_prune(fused, {**base, "layer3": x}), macs_goal, under, 0.97)
        if abs(macs3 / macs_goal - 1) < abs(macs / macs_goal - 1):
            m, macs, ratios = m3, macs3, {**base, "layer3": r3}
    if abs(macs / macs_goal - 1) > MACS_TOL:
        raise RuntimeError(f"width pruning could not match {macs_goal:,} MACs within {MACS_TOL:.0%} (got {macs:,})")
    return m, {k: round(v, 4) for k, v in ratios.items()}, macs


# --------------------------------------------------------------------------- environment


def hardware() -> dict:
    info = {"cpu": None, "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        kv = {k.strip(): v.strip() for k, v in kv.items()}
        info.update(cpu=kv.get("Model name"), cores=int(kv.get("CPU(s)", os.cpu_count())),
                    threads_per_core=kv.get("Thread(s) per core"), sockets=kv.get("Socket(s)"))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if not info["cpu"]:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def versions() -> dict:
    import onnx
    import onnxruntime

    v = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__, "resprune": rp.__version__}
    try:
        import torch_pruning

        v["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
    except ImportError:
        v["torch_pruning"] = None
    return v


# --------------------------------------------------------------------------- main


def run_model(name: str, args, work: Path) -> dict:
    t0 = time.perf_counter()
    base = base_model(name, args.checkpoint, args.seed)
    fused = rp.fuse(base)
    full = rp.profile(fused, INPUT)
    nets = {"unpruned": (fused, full.macs, {})}
    for t in args.targets:
        lp, rep = layer_pruned(base, t)
        lmacs = rp.profile(lp, INPUT).macs
        nets[f"layer-{t:g}"] = (lp, lmacs, {"removed": len(rep.removed), "removed_per_stage": rep.removed_per_stage})
        wp, ratios, wmacs = width_pruned(fused, lmacs)
        nets[f"width-{t:g}"] = (wp, wmacs, {"filter_ratios": ratios})
    files, rows = [], {}
    for key, (m, macs, extra) in nets.items():
        path = work / f"{name}-{key}.onnx"
        rp.export_onnx(m, path, INPUT)
        files.append(path)
        rows[key] = {"macs": macs, "params": sum(p.numel() for p in m.parameters()),
                     "convs": sum(isinstance(x, nn.Conv2d) for x in m.modules()), **extra}
    prep_s = time.perf_counter() - t0
    benches = []
    for k in range(args.repeat):  # separate processes: the spread between them is reported
        for b in args.batch:
            out = work / f"{name}-bench-{k}-b{b}.json"
            cmd = [sys.executable, str(TOOL), *map(str, files), "--names", *nets, "--batch", str(b),
                   "--runs", str(runs_for(b, args)), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--json", str(out), "--quiet"] + (["--no-memory"] if k > 0 else [])
            subprocess.run(cmd, check=True)
            benches.append((k, json.loads(out.read_text())))
    for k, bench in benches:
        for r in bench["results"]:
            cell = rows[r["model"]].setdefault(f"b{r['batch']}", {"medians": [], "peak_rss_mb": None})
            cell["medians"].append(r["median_ms"])
            if k == 0:
                cell["peak_rss_mb"] = r["peak_rss_mb"]
    return {"model": name, "source": args.checkpoint or f"fresh ResConv {name}, scales seed {args.seed}",
            "rows": rows, "bench": benches[0][1], "prep_s": prep_s, "bench_s": time.perf_counter() - t0 - prep_s}


def runs_for(batch: int, args) -> int:
    """``--runs`` at the largest batch; smaller batches (short, noisier runs) get proportionally
    more, up to ``--max-runs``, so every batch size gets a similar share of the time."""
    return max(args.runs, min(args.max_runs, args.runs * max(args.batch) // batch))


def _ratio(x: dict, y: dict) -> tuple[float, float, float]:
    """Mean, min and max over repeats of the ratio of medians (same repeat = same process)."""
    rs = [a / b for a, b in zip(x["medians"], y["medians"])]
    return sum(rs) / len(rs), min(rs), max(rs)


def _fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.3f}" if r[1] == r[2] else f"{r[0]:.3f} ({r[1]:.2f}–{r[2]:.2f})"


def tables(results: list[dict], batches: list[int]) -> tuple[str, str, list[str]]:
    det = ["| model | net | convs | MACs (M) | MACs ratio | params (k) | "
           + " | ".join(f"b={b} median ms | b={b} ratio" for b in batches)
           + f" | peak MB b={batches[-1]} | pruning |",
           "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(batches) + "---:|---|"]
    summ = ["| model | MACs target | MACs ratio (layer / width) | "
            + " | ".join(f"latency ratio pruned/unpruned b={b}: layer / width" for b in batches) + " | "
            + " | ".join(f"layer/width latency b={b}" for b in batches) + f" | peak MB b={batches[-1]} (layer / width) |",
            "|---|---:|---:|" + "---:|" * (2 * len(batches)) + "---:|"]
    verdicts, faster, ge, excess, lwr, n_rep = [], 0, 0, [], [], 0
    for res in results:
        rows = res["rows"]
        u = rows["unpruned"]
        for key, r in rows.items():
            lat = " | ".join(f"{sum(r[f'b{b}']['medians']) / len(r[f'b{b}']['medians']):.3f} | "
                             f"{_fmt(_ratio(r[f'b{b}'], u[f'b{b}']))}" for b in batches)
            how = ("removed units per stage " + ", ".join(f"{k}: {v}" for k, v in r["removed_per_stage"].items())
                   if "removed_per_stage" in r else
                   "filter ratio " + ", ".join(f"{k}: {v:.3f}" for k, v in r["filter_ratios"].items())
                   if "filter_ratios" in r else "")
            det.append(f"| {res['model']} | {key} | {r['convs']} | {r['macs'] / 1e6:.2f} | {r['macs'] / u['macs']:.3f} | "
                       f"{r['params'] / 1e3:.0f} | {lat} | {r[f'b{batches[-1]}']['peak_rss_mb'] or 0:.0f} | {how} |")
        for key in [k for k in rows if k.startswith("layer-")]:
            t = key.split("-", 1)[1]
            L, W = rows[key], rows[f"width-{t}"]
            lr = {b: _ratio(L[f"b{b}"], u[f"b{b}"]) for b in batches}
            wr = {b: _ratio(W[f"b{b}"], u[f"b{b}"]) for b in batches}
            lw = {b: _ratio(L[f"b{b}"], W[f"b{b}"]) for b in batches}
            mr = L["macs"] / u["macs"]
            summ.append(
                f"| {res['model']} | {t} | {mr:.3f} / {W['macs'] / u['macs']:.3f} | "
                + " | ".join(f"{_fmt(lr[b])} / {_fmt(wr[b])}" for b in batches) + " | "
                + " | ".join(_fmt(lw[b]) for b in batches)
                + f" | {L[f'b{batches[-1]}']['peak_rss_mb'] or 0:.0f} / {W[f'b{batches[-1]}']['peak_rss_mb'] or 0:.0f} |")
            for b in batches:
                faster += lw[b][0] < 1
                ge += lr[b][0] <= mr
                excess.append(lr[b][0] - mr)
                lwr.append(lw[b][0])
                n_rep = len(L[f"b{b}"]["medians"])
                per_l = [a / c for a, c in zip(L[f"b{b}"]["medians"], u[f"b{b}"]["medians"])]
                per_lw = [a / c for a, c in zip(L[f"b{b}"]["medians"], W[f"b{b}"]["medians"])]
                verdicts.append(
                    f"{res['model']} target {t}, batch {b}: layer-pruned latency ratio {_fmt(lr[b])} vs MACs ratio "
                    f"{mr:.3f}: latency reduction {'≥' if lr[b][0] <= mr else '<'} MACs reduction on average "
                    f"({sum(x <= mr for x in per_l)}/{len(per_l)} repeats ≥); layer/width latency {_fmt(lw[b])}: "
                    f"layer-pruned {'faster' if lw[b][0] < 1 else 'NOT faster'} on average "
                    f"({sum(x < 1 for x in per_lw)}/{len(per_lw)} repeats faster)")
    n = len(lwr)
    if n:
        verdicts[:0] = [
            f"**Layer-pruned faster than width-pruned at equal MACs: {faster}/{n} cases** "
            f"(layer/width latency {min(lwr):.3f}–{max(lwr):.3f}, mean over {n_rep} repeat(s)).",
            f"**Layer pruning's latency reduction ≥ its MACs reduction: {ge}/{n} cases** (latency ratio minus "
            f"MACs ratio {min(excess):+.3f} to {max(excess):+.3f}; positive = latency fell less than MACs).",
        ]
    return "\n".join(summ), "\n".join(det), verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "resnet110"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.35, 0.5], help="MACs fractions to keep")
    p.add_argument("--checkpoint", help="sparse-trained model (resprune.save); replaces --models by its model")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer scales of a fresh model")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--runs", type=int, default=20, help="timed runs at the largest batch (default 20)")
    p.add_argument("--max-runs", type=int, default=300, help="cap of the runs at smaller batches (default 300)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2,
                   help="benchmark processes per model (default 2); ratios are shown as mean (min–max)")
    p.add_argument("--json", help="also write the raw numbers (incl. ort_bench's JSON) here")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_vs_width.md"))
    p.add_argument("--workdir", help="where the ONNX files go (default: a temporary directory)")
    args = p.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        p.error("width pruning needs torch_pruning: pip install 'resprune[width]' (torch-pruning)")
    if args.checkpoint:
        arch = rp.serialization.load_payload(args.checkpoint)["arch"]
        args.models = [arch["factory"].partition(":")[2]]
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for name in args.models:
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}: build, prune (layer, width), export, bench", flush=True)
            results.append(run_model(name, args, work))
    wall = time.perf_counter() - t0
    summ, det, verdicts = tables(results, args.batch)
    hw, ver = hardware(), versions()
    dev = results[0]["bench"]["device"]
    weights = ("weights from " + args.checkpoint if args.checkpoint else
               f"fresh models: weights random, layer scales from seed {args.seed} (latency does not depend on "
               "weight values; the scales only decide which layers the budget removes)")
    md = [
        "# Layer pruning vs width pruning at equal MACs (onnxruntime latency)", "",
        f"Date: {_dt.date.today().isoformat()}. Hardware: {hw['cpu']}, {hw['cores']} logical CPUs "
        f"({dev['usable_cpus']} usable); the machine was shared with other jobs. Versions: "
        + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        "",
        f"Settings: onnxruntime CPUExecutionProvider, {args.threads} intra-op thread(s), graph optimisation all; "
        f"{', '.join(f'{runs_for(b, args)} (batch {b})' for b in args.batch)} timed runs after {args.warmup} warm-up "
        "per net, all nets of a model interleaved "
        f"in one process (export/ort_bench.py), {args.repeat} such processes per model; ratios of medians within a "
        f"process, shown as mean (min–max) over the processes; ms columns are means of the medians. Inputs 3×32×32. {weights}. Layer: `rp.prune_` budget mode "
        "(rank by |scale|), fused. Width: Torch-Pruning on the fused unpruned net, L1-norm filter importance, "
        "output filters of the first conv of each residual block (residual stream and option-A shortcuts untouched), "
        "one ratio for all stages, the last stage's own ratio adjusted when integer channel steps are too coarse, "
        f"matched to the layer-pruned MACs within {MACS_TOL:.0%}. Peak MB: peak RSS of a child "
        f"process running the net alone. Wall time {wall:.0f} s.",
        "", f"Command: `{' '.join(['python', 'benchmarks/layer_vs_width.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "", "## Summary", "", summ, "",
        "Ratios below 1 mean faster. A run at batch 1 lasts 1–15 ms and is the most exposed to other jobs on a "
        "shared machine (hence more runs and the min–max over processes); batch-64 ratios are the stable ones.",
        "", "## Goal check", "",
        *[f"- {v}" for v in verdicts], "",
        "## All nets", "", det, "",
    ]
    text = "\n".join(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"hardware": hw, "versions": ver, "argv": sys.argv[1:] if argv is None else argv, "results": results},
            indent=1, default=str) + "\n")
    print(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
