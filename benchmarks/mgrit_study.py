"""Accuracy and modelled speed of one-shot mgrit settings against serial training (issue 11).

One command per data set trains a deep gated ResConv chain (``resconv_chain`` with
``gate="tanh"``: every layer scale is ``h·tanh(g/h)``, ``h = horizon/N``, the ODE regime)
with the serial engine and with each mgrit setting, for every seed, and prints a markdown
table: test accuracy − serial's per seed, the measured seconds per step at P = 2 (mgrit and
serial, this machine), the cost model's seconds per step at P = 2 (a check against the
measurement) and its speed-up over serial at P = 8, plus a plot of accuracy vs modelled
speed-up (one point per setting).

    python benchmarks/mgrit_study.py --dataset mnist --data-dir /root/data \
        --json mnist.json --out benchmarks/results/mgrit_study.md --plot benchmarks/results/mgrit_study_mnist.png
    python benchmarks/mgrit_study.py --dataset cifar10 --data-dir /root/data \
        --json cifar.json --out benchmarks/results/mgrit_study.md --plot benchmarks/results/mgrit_study_cifar10.png

Defaults: 256 layers of width 8, 10 000 training images (seeded subset), the full test set,
batch 64, 3 epochs, SGD lr 0.05 Nesterov 0.9, weight decay 5e-4, 50 warm-up steps then
cosine; seeds 0, 1, 2; P = 2 for the mgrit runs; BN statistics re-estimated (exact forward
passes, both engines) before evaluation. ``--json`` keeps every finished run; rerunning the
same command skips them (an interrupted study resumes). ``--settings`` picks settings by name
(see ``SETTINGS``); ``--from-json`` re-prints the report.

**Cost model** (as in ``layer_parallel_scaling.py``, from the engine's phase timers): each
setting is also run for a few steps on one process (P = 1: no waiting) with 1 and with 2
cycles a step; the timers split each solve into its coarsest-level part (``fwd_coarsest``,
``bwd_coarsest``: sequential, runs rank after rank whatever P) and the rest (relaxation and
restriction: divides over P), the difference of the two runs gives one cycle, the rest the
start (nested coarse solve). With the training run's mean cycles ``k`` and fraction of cold
starts ``s`` per direction, ``T(P) = Σ_dir (s·start_seq + k·cycle_seq) + (Σ_dir (s·start_par +
k·cycle_par) + other)/P + α·(P − 1)·Σ_dir (s + k)``, ``other`` = final sweeps, loss and update
at P = 1, ``α`` one state-sized message hop (ping-pong, measured in the P = 2 runs). One idle
core per rank is assumed (no contention); serial's time per step is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import resprune as rp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hop_seconds, print_report  # noqa: E402

SETTINGS: dict[str, dict] = {
    # TorchBraid's defaults: 3 levels, F on the fine level, FCF on coarse ones, 2 + 1 cycles
    "tb-F21": dict(cf=4, levels=3, relax="F,FCF", fwd_iters=2, bwd_iters=1, warm_start="class_mean"),
    "tb-F21-avg": dict(cf=4, levels=3, relax="F,FCF", fwd_iters=2, bwd_iters=1, warm_start="class_mean",
                       coarse_params="average"),
    "FCF11-avg": dict(cf=4, levels=2, relax="FCF", fwd_iters=1, bwd_iters=1, warm_start="class_mean",
                      coarse_params="average"),
    "F11-cf8-avg": dict(cf=8, levels=3, relax="F,FCF", fwd_iters=1, bwd_iters=1, warm_start="class_mean",
                        coarse_params="average"),
    "adaptive-0.1": dict(cf=4, levels=2, relax="FCF", mode="adaptive", tol=0.1, fwd_iters=3, bwd_iters=3,
                         warm_start="class_mean", coarse_params="average"),
}
TRAIN_ARGS = ("dataset", "data_dir", "layers", "width", "stem_stride", "head_pool", "horizon", "gate", "batch", "eval_batch",
              "epochs",
              "max_steps", "train_subset", "test_subset", "lr", "wd", "warmup", "smooth", "recal_batches")


def _subset(ds, n: int, seed: int):
    from resprune.data.sources import ArrayDataset

    if n <= 0 or n >= len(ds):
        return ds
    idx = np.sort(np.random.RandomState(seed).permutation(len(ds))[:n])
    return ArrayDataset(ds.images[idx], ds.labels[idx], ds.classes)


def _build(a, seed: int):
    from resprune.data import DeviceLoader, load_arrays

    tr, te = load_arrays(a.dataset, a.data_dir)
    tr, te = _subset(tr, a.train_subset, seed), _subset(te, a.test_subset, seed)
    train = DeviceLoader(tr, a.batch, train=True, seed=seed)
    norm = dict(mean=tuple(train.mean.flatten().tolist()), std=tuple(train.std.flatten().tolist()))
    test = DeviceLoader(te, a.eval_batch, train=False, **norm)
    torch.manual_seed(seed)
    model = _chain(a, train.num_classes, tr.images.shape[-1])
    return train, test, model, (1, tr.images.shape[-1], *tr.images.shape[1:3])


def _chain(a, num_classes: int, in_chans: int) -> torch.nn.Module:
    return rp.create_model("resconv_chain", num_classes=num_classes, depth=a.layers, width=a.width,
                           in_chans=in_chans, horizon=a.horizon, gate=a.gate or None, stem_stride=a.stem_stride,
                           head_pool=a.head_pool)


def _engine(a, model, options: dict | None, input_size):
    from resprune.parallel import MGRITConfig, create_engine
    from resprune.sparsity import LayerSmoothness

    def sgd(named):
        return torch.optim.SGD(named, lr=a.lr, momentum=0.9, nesterov=True, weight_decay=a.wd)

    reg = LayerSmoothness(a.smooth) if a.smooth > 0 else None
    if options is None:
        return create_engine("serial", model, F.cross_entropy, sgd, regularizer=reg)
    return create_engine("mgrit", model, F.cross_entropy, sgd, MGRITConfig(**options, input_size=input_size),
                         regularizer=reg)


def worker(a) -> None:
    """Under torchrun: train (``--engine serial`` or mgrit with ``--options`` JSON) or, with
    ``--calibrate``, time a few steps at 1 and 2 cycles; rank 0 prints ``RESULT {json}``."""
    from resprune.parallel import finalize, init_distributed

    rank, world, _, _ = init_distributed(backend="gloo", timeout_s=7200)
    torch.set_num_threads(1)
    code = 0
    try:
        train, test, model, insz = _build(a, a.seed)
        opts = json.loads(a.options) if a.options else None
        out = _calibrate(a, model, opts, insz, train) if a.calibrate else _train(a, model, opts, insz, train, test)
        if rank == 0:
            print("RESULT " + json.dumps(out), flush=True)
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finalize(code)


def _calibrate(a, model, opts, insz, train) -> dict:
    base = {k: v for k, v in opts.items() if k not in ("mode", "tol", "warm_start", "min_iters")}
    res = {}
    batches = list(itertools.islice(iter(train), a.calib_steps + 1))
    for k in (1, 2):
        eng = _engine(a, _chain(a, train.num_classes, insz[1]),
                      {**base, "mode": "simultaneous", "fwd_iters": k, "bwd_iters": k}, insz)
        eng.load_full_state_dict(model.state_dict())
        rows = []
        for i, (x, y) in enumerate(batches):
            t0 = time.perf_counter()
            eng.step(x, y)
            wall = time.perf_counter() - t0
            if i:
                rows.append(dict(eng.stats["times_s"], wall=wall))
        res[str(k)] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    return res


def _train(a, model, opts, insz, train, test) -> dict:
    eng = _engine(a, model, opts, insz)
    world = eng.world_size
    hop = hop_seconds(math.prod((a.batch, a.width, *insz[2:]))) if world > 1 else None
    total = a.epochs * len(train) if not a.max_steps else min(a.max_steps, a.epochs * len(train))

    def lr_factor(i: int) -> float:
        if i < a.warmup:
            return (i + 1) / a.warmup
        return 0.5 * (1 + math.cos(math.pi * (i - a.warmup) / max(1, total - a.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, lr_factor)
    losses, steps_s, iters, warm, fdef, bdef = [], [], [], [], [], []
    diverged = False
    t0 = time.perf_counter()
    for x, y in itertools.islice((b for _ in range(a.epochs) for b in train), total):
        ts = time.perf_counter()
        loss = eng.step(x, y)
        steps_s.append(time.perf_counter() - ts)
        sched.step()
        losses.append(loss)
        if opts is not None:
            st = eng.stats
            iters.append((st["fwd_iters"], st["bwd_iters"]))
            warm.append(bool(st.get("warm")))
            fdef.append(st.get("fwd_defect"))
            bdef.append(st.get("bwd_defect"))
        if not math.isfinite(loss):
            diverged = True
            break
    t_train = time.perf_counter() - t0
    acc = float("nan")
    if not diverged:
        if a.recal_batches:
            eng.recalibrate_bn(x for x, _ in itertools.islice(iter(train), a.recal_batches))
        correct = n = 0
        for x, y in test:
            correct += int((eng.eval_forward(x).argmax(1) == y).sum())
            n += len(y)
        acc = 100.0 * correct / n
    tail = max(1, len(losses) // 10)
    return {"P": world, "steps": len(losses), "diverged": diverged, "acc_test": acc, "t_train": t_train,
            "step_s": statistics.median(steps_s) if steps_s else None, "hop_s": hop,
            "loss_tail": float(np.mean(losses[-tail:])) if losses else None, "loss_head": losses[:20],
            "fwd_iters": float(np.mean([i[0] for i in iters])) if iters else None,
            "bwd_iters": float(np.mean([i[1] for i in iters])) if iters else None,
            "cold": 1.0 - float(np.mean(warm)) if warm else None,
            "fwd_defect": float(np.mean([d for d in fdef[-tail:] if d is not None] or [float("nan")])),
            "bwd_defect": float(np.mean([d for d in bdef[-tail:] if d is not None] or [float("nan")]))}


def launch(a, P: int, seed: int, options: dict | None, calibrate: bool = False) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(P),
           __file__, "--worker", "--seed", str(seed), "--calib-steps", str(a.calib_steps)]
    for k in TRAIN_ARGS:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if options is not None:
        cmd += ["--options", json.dumps(options)]
    if calibrate:
        cmd.append("--calibrate")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"run P={P} seed {seed} {options} failed (rc {r.returncode})")
    res = json.loads(line[0][7:])
    res["job_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- cost model
def fit(calib: dict) -> dict:
    """Per-direction start and cycle costs (sequential / parallel parts) from the P = 1 runs
    with 1 and 2 cycles a step, and the rest of a step (``other``)."""
    c1, c2 = calib["1"], calib["2"]
    m = {}
    for d in ("fwd", "bwd"):
        seq1, seq2 = c1[f"{d}_coarsest"], c2[f"{d}_coarsest"]
        par1, par2 = c1[f"{d}_solve"] - seq1, c2[f"{d}_solve"] - seq2
        m[d] = {"cycle_seq": max(0.0, seq2 - seq1), "cycle_par": max(0.0, par2 - par1)}
        m[d]["start_seq"] = max(0.0, seq1 - m[d]["cycle_seq"])
        m[d]["start_par"] = max(0.0, par1 - m[d]["cycle_par"])
    m["other"] = max(0.0, c1["wall"] - c1["fwd_solve"] - c1["bwd_solve"])
    return m


def model_time(m: dict, P: int, kf: float, kb: float, cold: float, alpha: float) -> float:
    seq = par = hops = 0.0
    for d, k in (("fwd", kf), ("bwd", kb)):
        seq += cold * m[d]["start_seq"] + k * m[d]["cycle_seq"]
        par += cold * m[d]["start_par"] + k * m[d]["cycle_par"]
        hops += cold + k
    return seq + (par + m["other"]) / P + alpha * (P - 1) * hops


# ----------------------------------------------------------------------------- report
def summarize(a, data: dict) -> tuple[list[dict], float]:
    seeds = [int(s) for s in a.seeds.split(",")]
    hops = [r["hop_s"] for k, r in data.items() if k.startswith("run/") and r.get("hop_s")]
    alpha = statistics.median(hops) if hops else 0.0
    serial = {s: data.get(f"serial/{s}") for s in seeds}
    t_ser = statistics.median([r["step_s"] for r in serial.values() if r and r.get("step_s")] or [float("nan")])
    if "time/serial" in data:  # timed on an idle machine (--time-steps)
        t_ser = data["time/serial"]["step_s"]
    rows = []
    for name in a.settings.split(","):
        runs = [data.get(f"run/{name}/{s}") for s in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        diffs = [r["acc_test"] - serial[s]["acc_test"] for s, r in zip(seeds, runs) if serial.get(s)]
        kf = float(np.mean([r["fwd_iters"] for r in runs]))
        kb = float(np.mean([r["bwd_iters"] for r in runs]))
        cold = float(np.mean([r["cold"] for r in runs]))
        row = {"setting": name, "options": SETTINGS.get(name, {}), "diffs": diffs, "kf": kf, "kb": kb,
               "cold": cold, "serial_step": t_ser,
               "step_p2": (data[f"time/{name}"]["step_s"] if f"time/{name}" in data
                           else statistics.median(r["step_s"] for r in runs)),
               "p_check": _p_invariance(data.get(f"time/{name}"), data.get(f"run/{name}/{seeds[0]}")),
               "fwd_defect": float(np.mean([r["fwd_defect"] for r in runs])),
               "bwd_defect": float(np.mean([r["bwd_defect"] for r in runs]))}
        cal = data.get(f"calib/{name}")
        if cal:
            m = fit(cal)
            row["model_p2"] = model_time(m, 2, kf, kb, cold, alpha)
            row["model_p8"] = model_time(m, 8, kf, kb, cold, alpha)
            row["speedup_p8"] = t_ser / row["model_p8"]
        rows.append(row)
    return rows, alpha


def _p_invariance(timed: dict | None, run: dict | None) -> float | None:
    """Largest relative difference of the first losses of a timed run (P = --procs) and the
    accuracy run of the same seed (P = --acc-procs): one-shot mgrit is P-independent."""
    if not timed or not run or not timed.get("loss_head") or not run.get("loss_head") or timed["P"] == run["P"]:
        return None
    n = min(len(timed["loss_head"]), len(run["loss_head"]))
    return max(abs(u - v) / max(abs(v), 1e-12) for u, v in zip(timed["loss_head"][:n], run["loss_head"][:n]))


def report(a, data: dict, started: str) -> str:
    rows, alpha = summarize(a, data)
    seeds = a.seeds.split(",")
    ser = [data.get(f"serial/{s}", {}).get("acc_test", float("nan")) for s in seeds]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = "; ".join(ln.split(":", 1)[0].strip() + ": " + ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                    if ln.split(":")[0].strip() in ("Model name", "CPU(s)"))
    f = lambda v, fmt: "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)  # noqa: E731
    out = [f"## mgrit study: {a.dataset}, {a.layers} layers (gate {a.gate or 'none'}, horizon {a.horizon:g}), "
           f"P = {a.procs}", "",
           f"- Date: {started}; {cpu}; torch {torch.__version__}, Python {platform.python_version()}, gloo, "
           "one thread per process",
           f"- Data: {a.dataset}, {a.train_subset or 'all'} training images (seeded subset), "
           f"{a.test_subset or 'all'} test images; batch {a.batch}, {a.epochs} epoch(s)"
           f"{f' capped at {a.max_steps} steps' if a.max_steps else ''}; SGD lr {a.lr:g} Nesterov 0.9, wd {a.wd:g}, "
           f"{a.warmup} warm-up steps then cosine; smoothness γ {a.smooth:g}; seeds {a.seeds}",
           f"- Serial test accuracy per seed: {', '.join(f(v, '.2f') for v in ser)} %; serial s/step "
           f"{f(rows[0]['serial_step'] if rows else None, '.3f')}; message hop α = {alpha * 1e3:.3f} ms",
           f"- Chain: width {a.width}, stem stride {a.stem_stride}; accuracy runs at P = {a.acc_procs or a.procs}; "
           + (f"s/step from {a.time_steps}-step runs (seed 0) at P = {a.procs} and serial on one core, machine "
              "otherwise idle; 'P check': largest relative difference of their first 20 losses from the "
              "accuracy run's" if "time/serial" in data else "s/step from the accuracy runs"), "",
           "| setting | test acc − serial per seed (pt) | cycles fwd + bwd (cold starts) | s/step P = 2 measured "
           "(mgrit / serial) | model s/step P = 2 | model speed-up P = 8 | defect fwd / bwd (last 10 %) | P check | goal |",
           "|---|---|---|---|---|---:|---|---|---|"]
    for r in rows:
        ok = (len(r["diffs"]) == len(seeds) and all(d >= -0.5 for d in r["diffs"])
              and r["step_p2"] < r["serial_step"] and r.get("speedup_p8", 0) >= 3)
        out.append(f"| {r['setting']} | {', '.join(f'{d:+.2f}' for d in r['diffs'])} | {r['kf']:.2f} + {r['kb']:.2f} "
                   f"({100 * r['cold']:.0f} %) | {f(r['step_p2'], '.3f')} / {f(r['serial_step'], '.3f')} | "
                   f"{f(r.get('model_p2'), '.3f')} | {f(r.get('speedup_p8'), '.2f')}× | "
                   f"{f(r['fwd_defect'], '.3f')} / {f(r['bwd_defect'], '.3f')} | {f(r.get('p_check'), '.1e')} | "
                   f"{'met' if ok else 'not met'} |")
    out += ["", "Settings: " + "; ".join(f"`{r['setting']}` {r['options']}" for r in rows), ""]
    return "\n".join(out)


def plot(a, data: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, _ = summarize(a, data)
    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for r in rows:
        if "speedup_p8" not in r or not r["diffs"]:
            continue
        x, lo, hi = r["speedup_p8"], min(r["diffs"]), max(r["diffs"])
        ax.errorbar([x], [float(np.mean(r["diffs"]))], yerr=[[float(np.mean(r["diffs"])) - lo],
                                                             [hi - float(np.mean(r["diffs"]))]], fmt="o", capsize=3)
        ax.annotate(r["setting"], (x, float(np.mean(r["diffs"]))), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(-0.5, color="grey", ls="--", lw=0.8)
    ax.axvline(3.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("modelled speed-up over serial at P = 8")
    ax.set_ylabel("test accuracy − serial (points; mean, min–max over seeds)")
    ax.set_title(f"mgrit on {a.dataset}, {a.layers}-layer gated chain")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10", "digits"])
    ap.add_argument("--data-dir", default=os.environ.get("RESPRUNE_DATA", "/root/data"))
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--stem-stride", type=int, default=1, help="2: the chain runs at half resolution")
    ap.add_argument("--head-pool", type=int, default=1,
                    help="the head pools to a k × k grid before its linear layer (7 for MNIST at stride 2)")
    ap.add_argument("--horizon", type=float, default=1.0)
    ap.add_argument("--gate", default="tanh", help="tanh, clamp or '' (the plain trainable scale)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--smooth", type=float, default=0.0, help="γ of the smoothness penalty (all runs)")
    ap.add_argument("--recal-batches", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--procs", type=int, default=2, help="P of the timed runs (and of the accuracy runs "
                    "unless --acc-procs)")
    ap.add_argument("--acc-procs", type=int, default=0,
                    help="P of the accuracy runs (default --procs); one-shot mgrit computes the same thing at "
                         "any P, so 1 frees cores, and --time-steps runs check that on the first 20 losses")
    ap.add_argument("--time-steps", type=int, default=0,
                    help="also time serial and each setting at P = --procs for this many steps (seed 0) on "
                         "an otherwise idle machine; the table then uses these timings")
    ap.add_argument("--phase", default="all", choices=["all", "acc", "time"],
                    help="acc: accuracy runs and calibration only; time: timed runs only")
    ap.add_argument("--calib-steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    ap.add_argument("--json", default=None, help="keep finished runs here (rerun resumes)")
    ap.add_argument("--from-json", default=None)
    ap.add_argument("--out", default=None, help="append the markdown report here")
    ap.add_argument("--plot", default=None, help="PNG: accuracy vs modelled speed-up at P = 8")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--options", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    path = a.from_json or a.json
    saved = json.load(open(path)) if path and os.path.isfile(path) else {}
    if saved and any(saved["args"].get(k) != getattr(a, k) for k in TRAIN_ARGS) and not a.from_json:
        raise SystemExit(f"{path} holds runs with other settings; use another --json")
    data, started = saved.get("data", {}), saved.get("started", time.strftime("%Y-%m-%d %H:%M"))
    if a.from_json:
        a = argparse.Namespace(**{**vars(a), **{k: v for k, v in saved["args"].items() if k in TRAIN_ARGS}})
    names = a.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")

    def keep(key: str, fn) -> None:
        if key in data or a.from_json:
            return
        data[key] = fn()
        print(f"{key}: " + json.dumps({k: v for k, v in data[key].items() if not isinstance(v, dict)}),
              file=sys.stderr, flush=True)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"args": vars(a), "data": data, "started": started}, fh)

    if a.phase in ("all", "acc"):
        for seed in [int(s) for s in a.seeds.split(",")]:
            keep(f"serial/{seed}", lambda: launch(a, 1, seed, None))
            for n in names:
                keep(f"run/{n}/{seed}", lambda: launch(a, a.acc_procs or a.procs, seed, SETTINGS[n]))
        for n in names:
            keep(f"calib/{n}", lambda: launch(a, 1, 0, SETTINGS[n], calibrate=True))
    if a.phase in ("all", "time") and a.time_steps:
        timed = argparse.Namespace(**{**vars(a), "max_steps": a.time_steps, "recal_batches": 0, "test_subset": 500})
        keep("time/serial", lambda: launch(timed, 1, 0, None))
        for n in names:
            keep(f"time/{n}", lambda: launch(timed, a.procs, 0, SETTINGS[n]))
    rep = report(a, data, started)
    print_report(rep, a.out)
    if a.plot:
        plot(a, data, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
