"""Training accuracy of simultaneous-mode mgrit against the serial engine, on MNIST.

The same deep ResConv chain (stem 1→C, N identity-shortcut ResConv2d of width C at 28×28,
avgpool + linear head; layer scales initialised to ``horizon/N``) is trained twice, with the
same seed (same initial weights), the same data order (DeviceLoader seed), the same
optimizer and the same number of steps:

(a) the ``serial`` engine on one process;
(b) the ``mgrit`` engine, simultaneous mode (``fwd_iters``/``bwd_iters`` per step, default
    1 + 1), on P processes under torchrun (gloo, CPU, one thread each). These count the
    cycles after the nested start; benchmarks/results/mgrit_accuracy.md counts the start as
    the first cycle (its "k" is ``k − 1`` here).
    ``benchmarks/mgrit_study.py`` is the ODE-regime study (gated chain, 3 seeds, cost model).

Both are then evaluated exactly (``eval_forward``, eval-mode BN) on the MNIST test set and
on a fixed slice of their training subset. The script prints a markdown report (train-loss
curve summary, accuracies, the difference in points, wall times); ``--out`` appends it.

    python benchmarks/mgrit_accuracy.py --data-dir /tmp/data --out benchmarks/results/mgrit_accuracy.md

(defaults: 32 layers, width 16, 10 000 training images, batch 32, 2 epochs, SGD lr 0.05
momentum 0.9, cf 4, P = 2; about 10 min on 2 shared cores). Results and their caveats:
``benchmarks/results/mgrit_accuracy.md``.

``--horizon`` sets the initial layer scales (``horizon/N``; ``--horizon N`` is the ResConv
default scale 1.0). The MNIST idx files are read from ``--data-dir`` (torchvision layout
``MNIST/raw``); nothing is downloaded or copied.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import torch.nn.functional as F

import resprune as rp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_report  # noqa: E402


def _subset(ds, n: int, seed: int):
    from resprune.data.sources import ArrayDataset

    if n <= 0 or n >= len(ds):
        return ds
    idx = np.random.RandomState(seed).permutation(len(ds))[:n]
    return ArrayDataset(ds.images[idx], ds.labels[idx], ds.classes)


def worker(a: argparse.Namespace) -> None:
    """Runs under torchrun: P = 1 → serial engine, P > 1 → mgrit; rank 0 prints JSON."""
    from resprune.data import DeviceLoader, load_arrays
    from resprune.parallel import MGRITConfig, create_engine, finalize, init_distributed

    rank, world, _, _ = init_distributed(backend="gloo", timeout_s=3600)
    torch.set_num_threads(1)
    code = 0
    try:
        tr, te = load_arrays("mnist", a.data_dir)
        tr = _subset(tr, a.train_subset, a.seed)
        te = _subset(te, a.test_subset, a.seed)
        train = DeviceLoader(tr, a.batch, train=True, seed=a.seed)
        norm = dict(mean=tuple(train.mean.flatten().tolist()), std=tuple(train.std.flatten().tolist()))
        test = DeviceLoader(te, a.eval_batch, train=False, **norm)
        train_eval = DeviceLoader(_subset(tr, a.train_eval, a.seed + 1), a.eval_batch, train=False, **norm)

        torch.manual_seed(a.seed)
        model = rp.create_model("resconv_chain", depth=a.layers, width=a.width, in_chans=tr.images.shape[-1], horizon=a.horizon)

        def sgd(named):
            return torch.optim.SGD(named, lr=a.lr, momentum=a.momentum, weight_decay=a.wd,
                                   nesterov=a.nesterov)

        if a.engine == "serial":
            eng = create_engine("serial", model, F.cross_entropy, sgd)
        else:
            cfg = MGRITConfig(cf=a.cf, levels=a.levels, relax=a.relax, mode=a.mode, tol=a.tol,
                              fwd_iters=a.fwd_iters, bwd_iters=a.bwd_iters, coarse_params=a.coarse_params,
                              input_size=(1, tr.images.shape[-1], *tr.images.shape[1:3]))
            eng = create_engine("mgrit", model, F.cross_entropy, sgd, cfg)

        total = a.epochs * len(train)
        if a.max_steps:
            total = min(total, a.max_steps)

        def lr_factor(i: int) -> float:  # linear warm-up, then cosine to 0 (or constant)
            if i < a.warmup:
                return (i + 1) / a.warmup
            if a.schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (i - a.warmup) / max(1, total - a.warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, lr_factor)
        losses, fres, bres, fdef, bdef, iters = [], [], [], [], [], []
        diverged = False
        t0 = time.perf_counter()
        for _ in range(a.epochs):
            for x, y in train:
                loss = eng.step(x, y)
                sched.step()
                losses.append(loss)
                if a.engine != "serial":
                    fr, br = eng.stats.get("fwd_residuals") or [], eng.stats.get("bwd_residuals") or []
                    fres.append(fr[-1] if fr else None)
                    bres.append(br[-1] if br else None)
                    fdef.append(eng.stats.get("fwd_defect"))
                    iters.append((eng.stats.get("fwd_iters"), eng.stats.get("bwd_iters")))
                    bdef.append(eng.stats.get("bwd_defect"))
                if not math.isfinite(loss):
                    diverged = True
                    break
                if a.max_steps and len(losses) >= a.max_steps:
                    break
            if diverged or (a.max_steps and len(losses) >= a.max_steps):
                break
        t_train = time.perf_counter() - t0

        def accuracy(loader) -> float:
            correct = total = 0
            for x, y in loader:
                correct += int((eng.eval_forward(x).argmax(1) == y).sum())
                total += len(y)
            return 100.0 * correct / total

        t0 = time.perf_counter()
        # eval-mode accuracy with the running BN statistics training left behind ...
        acc_test_raw = float("nan") if diverged else accuracy(test)
        # ... and after re-estimating them with exact forward passes over training batches
        # (the same procedure for both engines; what the trainer does before evaluation)
        if not diverged and a.recal_batches:
            eng.recalibrate_bn(x for x, _ in itertools.islice(iter(train), a.recal_batches))
        acc_test = float("nan") if diverged else accuracy(test)
        acc_train = float("nan") if diverged else accuracy(train_eval)
        t_eval = time.perf_counter() - t0
        sd = eng.full_state_dict()
        if rank == 0:
            scales = torch.stack([sd[f"blocks.{i}.scale"].abs() for i in range(a.layers)])
            print("RESULT " + json.dumps({
                "engine": a.engine, "P": world, "steps": len(losses), "losses": losses,
                "fwd_res": fres, "bwd_res": bres, "fwd_defect": fdef, "bwd_defect": bdef, "iters": iters,
                "diverged": diverged,
                "acc_test": acc_test, "acc_test_raw": acc_test_raw, "acc_train": acc_train, "n_test": len(te),
                "n_train": len(tr), "n_train_eval": len(train_eval.labels),
                "t_train": t_train, "t_eval": t_eval,
                "scale_mean": float(scales.mean()), "scale_max": float(scales.max()),
            }), flush=True)
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finalize(code)


def run_one(a: argparse.Namespace, engine: str, P: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(P),
           __file__, "--worker", "--engine", engine, "--seed", str(seed)]
    for k in ("data_dir", "layers", "width", "horizon", "batch", "eval_batch", "epochs", "max_steps",
              "train_subset", "test_subset", "train_eval", "lr", "momentum", "wd", "schedule", "warmup",
              "recal_batches", "cf", "levels", "relax", "fwd_iters", "bwd_iters", "coarse_params", "mode", "tol"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.nesterov:
        cmd.append("--nesterov")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    wall = time.perf_counter() - t0
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{engine} P={P} seed {seed} failed (rc {r.returncode})")
    res = json.loads(line[0][7:])
    res["wall"] = wall
    res["load_after"] = list(os.getloadavg())
    print(f"seed {seed} {engine} P={P}: {res['steps']} steps, test {res['acc_test']:.2f} % "
          f"(running stats {res['acc_test_raw']:.2f} %), train {res['t_train']:.0f} s, job {wall:.0f} s",
          file=sys.stderr, flush=True)
    return res


def _curve(losses: list[float], parts: int = 5) -> list[str]:
    n = len(losses)
    out = []
    for i in range(parts):
        seg = losses[i * n // parts:(i + 1) * n // parts]
        out.append(f"{sum(seg) / len(seg):.4f}" if seg else "–")
    return out


def _mean_std(v: list[float]) -> str:
    """``mean ± std %`` of the finite values, and how many runs diverged (NaN)."""
    bad = sum(1 for x in v if not math.isfinite(x))
    v = [x for x in v if math.isfinite(x)]
    if not v:
        return f"{bad} diverged"
    txt = f"{v[0]:.2f} %" if len(v) == 1 else f"{float(np.mean(v)):.2f} ± {float(np.std(v, ddof=1)):.2f} %"
    return f"{txt} over {len(v)} finished run(s), {bad} diverged" if bad else txt


def report(a: argparse.Namespace, runs: list[dict], started: str) -> str:
    """``runs``: one ``{"seed", "serial", "mgrit"}`` dict per seed."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = "; ".join(ln.split(":", 1)[0].strip() + ": " + ln.split(":", 1)[1].strip()
                    for ln in lscpu.splitlines()
                    if ln.split(":")[0].strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Architecture"))
    rows = [
        "| seed | engine | P | steps | test acc % | test acc %, running stats as trained | train-slice acc % "
        "| final loss (last 10 % mean) | train wall s | job wall s | final mean / max layer scale |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    curve = ["| seed | engine | " + " | ".join(f"steps {i}/5" for i in range(1, 6)) + " |",
             "|---|---|" + "---|" * 5]
    notes, diffs, sacc, macc = [], [], [], []
    defects = ["| seed | mgrit | " + " | ".join(f"steps {i}/5" for i in range(1, 6)) + " |",
               "|---|---|" + "---|" * 5]
    for run in runs:
        s, m = run["serial"], run["mgrit"]
        for r, name in ((s, "serial"), (m, f"mgrit {getattr(a, 'mode', 'simultaneous')}")):
            tail = r["losses"][-max(1, len(r["losses"]) // 10):]
            raw = r.get("acc_test_raw", float("nan"))
            rows.append(f"| {run['seed']} | {name} | {r['P']} | {r['steps']} | {r['acc_test']:.2f} | {raw:.2f} | "
                        f"{r['acc_train']:.2f} | {sum(tail) / len(tail):.4f} | {r['t_train']:.0f} | "
                        f"{r['wall']:.0f} | {r['scale_mean']:.3f} / {r['scale_max']:.3f} |")
            curve.append(f"| {run['seed']} | {name} | " + " | ".join(_curve(r["losses"])) + " |")
            if r["diverged"]:
                big = next((i + 1 for i, v in enumerate(r["losses"]) if not v < 3.0), None)
                notes.append(f"seed {run['seed']}: {name} DIVERGED: training loss first above 3.0 at step {big}, "
                             f"non-finite at step {r['steps']}; the run stopped there and was not evaluated.")
        for key, label in (("fwd_defect", "forward"), ("bwd_defect", "adjoint")):
            vals = [v for v in m.get(key) or [] if v is not None]
            if vals:
                defects.append(f"| {run['seed']} | {label} | " + " | ".join(_curve(vals)) + " |")
        diffs.append(m["acc_test"] - s["acc_test"])
        sacc.append(s["acc_test"])
        macc.append(m["acc_test"])
    met = all(abs(d) <= 0.5 for d in diffs) and all(math.isfinite(d) for d in diffs)
    load = "; ".join(f"seed {run['seed']}: " + ", ".join(
        f"{n} {' / '.join(f'{v:.1f}' for v in run[n]['load_after'])}" for n in ("serial", "mgrit")
        if "load_after" in run[n]) for run in runs) or "not recorded"
    sched = f"{a.schedule} schedule" + (f" after {a.warmup} warm-up steps" if getattr(a, "warmup", 0) else "")
    s0, m0 = runs[0]["serial"], runs[0]["mgrit"]
    fr = [v for run in runs for v in run["mgrit"]["fwd_res"] if v is not None]
    br = [v for run in runs for v in run["mgrit"]["bwd_res"] if v is not None]
    recal = getattr(a, "recal_batches", 0)
    return "\n".join([
        f"## Run: {a.layers} layers, horizon {a.horizon:g}, lr {a.lr:g}, cf {a.cf}, "
        f"{getattr(a, 'coarse_params', 'inject')}, {a.relax} "
        + (f"converged to tol {a.tol:g} (≤ {a.fwd_iters}+{a.bwd_iters})" if getattr(a, "mode", "") == "converged"
           else f"{a.fwd_iters}+{a.bwd_iters}") + f", P = {m0['P']}", "",
        f"- Date: {started}; hardware: {cpu}; load average (1/5/15 min) right after each job: {load}",
        f"- Versions: torch {torch.__version__}, Python {platform.python_version()}, gloo backend, "
        "one thread per process, CPU",
        f"- Data: MNIST 28×28, {s0['n_train']} training images (seeded subset), test set {s0['n_test']} images; "
        f"train-slice accuracy on {s0['n_train_eval']} of the training images; no augmentation",
        f"- Model: stem 1→{a.width} + {a.layers} identity-shortcut ResConv2d of width {a.width} at 28×28 + "
        f"avgpool/linear ({a.layers + 2} layers in `layer_sequence`); initial layer scales {a.horizon:g}/{a.layers}",
        f"- Training: SGD lr {a.lr:g}, momentum {a.momentum:g}{' (Nesterov)' if getattr(a, 'nesterov', False) else ''}, "
        f"weight decay {getattr(a, 'wd', 0.0):g} (all parameters), {sched}, batch {a.batch}, "
        f"{a.epochs} epoch(s){f' capped at {a.max_steps} steps' if a.max_steps else ''}; per seed the same "
        "initial weights and data order for both engines",
        f"- Eval: exact `eval_forward`; BN running statistics "
        + (f"re-estimated from {recal} training batches (exact forward, both engines) before the "
           "'test acc' and 'train-slice' columns; the column 'running stats as trained' is before that"
           if recal else "as training left them"),
        f"- mgrit: P = {m0['P']}, {getattr(a, 'mode', 'simultaneous')}"
        f"{f' (tol {a.tol:g})' if getattr(a, 'mode', '') == 'converged' else ''}, cf = {a.cf}, "
        f"levels = {a.levels}, relax {a.relax}, "
        f"coarse parameters {getattr(a, 'coarse_params', 'inject')}, "
        f"fwd/bwd iterations {'at most ' if getattr(a, 'mode', '') == 'converged' else ''}"
        f"{a.fwd_iters}/{a.bwd_iters} per step; {len(runs)} seed(s), 1 run each", "",
        *rows, "",
        f"Test accuracy over {len(runs)} seed(s): serial {_mean_std(sacc)}, mgrit {_mean_std(macc)}; "
        f"difference mgrit − serial per seed: {', '.join(f'{d:+.2f}' for d in diffs)} points "
        f"(goal |diff| ≤ 0.5 for every seed: {'met' if met else 'NOT met'}).", *notes, "",
        *([f"mgrit iterations per step (forward, adjoint), mean over the steps: " + "; ".join(
            f"seed {run['seed']}: {np.mean([i[0] for i in run['mgrit']['iters']]):.2f}, "
            f"{np.mean([i[1] for i in run['mgrit']['iters']]):.2f}" for run in runs if run['mgrit'].get('iters')), ""]
          if any(run['mgrit'].get('iters') for run in runs) else []),
        "Train loss (as each engine reports it: mgrit's is the loss of its inexact forward states), "
        "mean over each fifth of the steps:", "", *curve, "",
        *(["Relative C-point defect of the states (forward) and adjoints the mgrit gradients used, "
           "‖Φ(u[c−1]) − u[c]‖/‖u[c]‖ over the C-points inside ranks (0 = exact), mean over each "
           "fifth of the steps:", "", *defects, ""] if len(defects) > 2 else []),
        (f"mgrit last-iteration relative C-point residuals over the steps: forward median "
         f"{float(np.median(fr)):.2e} (max {max(fr):.2e}), adjoint median {float(np.median(br)):.2e} "
         f"(max {max(br):.2e})." if fr and br else
         "mgrit residuals: none computed (with 1 forward + 1 adjoint iteration the step is the nested "
         "coarse start and the final F-sweep only; the solver computes no C-point residual)."),
        ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("RESPRUNE_DATA", "/tmp/data"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--horizon", type=float, default=2.0, help="initial layer scales = horizon/layers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no cap)")
    ap.add_argument("--train-subset", type=int, default=10000, help="0: all 60000")
    ap.add_argument("--test-subset", type=int, default=0, help="0: all 10000")
    ap.add_argument("--train-eval", type=int, default=2000, help="training images used for train accuracy")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--wd", type=float, default=0.0, help="SGD weight decay (all parameters)")
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--recal-batches", type=int, default=50,
                    help="training batches for BN re-estimation before eval (0: none)")
    ap.add_argument("--cf", type=int, default=4)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--relax", default="F", choices=["F", "FCF"])
    ap.add_argument("--coarse-params", default="inject", choices=["inject", "average"])
    ap.add_argument("--mode", default="simultaneous", choices=["simultaneous", "converged"],
                    help="converged with a loose --tol and small caps = iterations adapt per step")
    ap.add_argument("--tol", type=float, default=1e-6, help="converged mode's relative C-point residual")
    ap.add_argument("--fwd-iters", type=int, default=1)
    ap.add_argument("--bwd-iters", type=int, default=1)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one serial + one mgrit run each")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None, help="append the markdown report to this file")
    ap.add_argument("--json", default=None, help="write both runs' raw results (JSON) here")
    ap.add_argument("--from-json", default=None, help="only re-print the report of a --json file")
    ap.add_argument("--serial-from", default=None,
                    help="take the serial runs from this --json file (same settings) instead of rerunning")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="serial", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            d = json.load(f)
        runs = d["runs"] if "runs" in d else [{"seed": d["args"].get("seed", 0), "serial": d["serial"],
                                                "mgrit": d["mgrit"]}]
        rep = report(argparse.Namespace(**d["args"]), runs, d.get("started", "?"))
        print(rep)
        return 0
    started = time.strftime("%Y-%m-%d %H:%M")
    reuse = {}
    if a.serial_from:  # serial runs of an earlier study with the same training settings
        with open(a.serial_from) as f:
            old = json.load(f)
        same = ("data_dir", "layers", "width", "horizon", "batch", "eval_batch", "epochs", "max_steps",
                "train_subset", "test_subset", "train_eval", "lr", "momentum", "nesterov", "wd", "schedule",
                "warmup", "recal_batches")
        diff = [k for k in same if old["args"].get(k) != getattr(a, k)]
        if diff:
            raise SystemExit(f"--serial-from {a.serial_from}: different settings {diff}")
        reuse = {r["seed"]: r["serial"] for r in old["runs"]}
    runs = []
    for seed in [int(v) for v in a.seeds.split(",")]:
        s_run = reuse[seed] if seed in reuse else run_one(a, "serial", 1, seed)
        runs.append({"seed": seed, "serial": s_run, "mgrit": run_one(a, "mgrit", a.procs, seed)})
        if a.json:  # after every seed, so an interrupted study keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "runs": runs, "started": started}, f)
    rep = report(a, runs, started)
    print_report(rep, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
