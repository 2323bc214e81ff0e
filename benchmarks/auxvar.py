"""The ``auxvar`` engine (auxiliary-variable serial-parallel hybrid): accuracy, communication,
time per epoch and the speed-up bound.

**Part A** (``--part accuracy``): ResNet-20 (``--model``) on a seeded CIFAR-10 subset
(``--data-dir``, ``--limit`` training / ``--test-limit`` test images; ``resprune.data`` loaders,
crop + flip when augmenting), ``--epochs`` epochs of SGD (lr ``--lr``, momentum 0.9 Nesterov,
weight decay 5e-4, cosine per step, batch ``--batch``; the project's ``Trainer``), seed
``--seed``. Runs: serial backprop, and the auxvar engine with K = 2 stages (``--k``), each run
through the same training loop (``indexed_epoch``: parallel epochs on fixed, non-augmented
samples with their indices, then serial correction with augmentation):

- ``penalty`` and ``al``: ``--parallel-epochs`` parallel epochs, the rest serial correction,
  ``downsample=--downsample``;
- ablations: ``penalty, no correction`` (every epoch parallel) and ``penalty, no downsampling``
  (``downsample=1``).

Reported: test accuracy after the parallel phase and at the end, the bytes sent per parallel
epoch (all ranks, from the engine's ``stats["sent_bytes"]``) and per serial-correction epoch,
and the λ/μ memory per rank. The K ranks are simulated as threads of one process
(``ThreadComm``): the same arithmetic as K processes (messages matched in step order), not
the same wall time.

**Part B** (``--part time``, needs a quiet machine): one torchrun job with K = 2 gloo
processes (one thread each) on the same net and data. Rank 0 first times serial training alone
(the other rank waits): per batch ``T_d`` (making the batch), ``T_f`` (forward + loss), ``T_b``
(backward + optimizer step), and every layer's forward and backward seconds. Then the auxvar
engine runs a parallel epoch's steps on the same batches (after one initialising pass,
untimed), and serial-correction steps: per rank ``t_f^λ`` (stage forward), ``t_b^λ`` (stage
backward), ``t_ψ`` (exchange of boundary states + λ/μ update) from the engine's phase timers,
and the wall time per step. Reported: time per epoch (parallel, correction, serial), the
measured speed-up of a parallel epoch over a serial one, and the papers' bound
``ρ ≤ (T_d + T_f + T_b) / (T_d + t_ψ + t_f^λ + t_b^λ)`` (slowest rank). K = 4 and 8 come from
a cost model: stages = ``balanced_bounds`` of the counted layer costs, a stage's time = the sum
of its layers' measured forward + backward seconds, ``t_ψ`` scaled from K = 2 by the boundary
state's elements: a MODEL, not a measurement.

Commands (the tables in docs/parallel.md)::

    python benchmarks/auxvar.py --part accuracy --data-dir /root/data --out benchmarks/results/auxvar_accuracy.md
    python benchmarks/auxvar.py --part time --data-dir /root/data --out benchmarks/results/auxvar_time.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, header_lines, on_threads, subset, torchrun, write_report  # noqa: E402

import resprune as rp  # noqa: E402

RUNS = {  # label -> (variant, downsample from args (None) or fixed, correction on)
    "penalty": ("penalty", None, True),
    "al": ("al", None, True),
    "penalty, no correction": ("penalty", None, False),
    "penalty, no downsampling": ("penalty", 1, True),
}


def _data(a):
    from resprune.data import DeviceLoader, load_arrays

    tr, te = load_arrays("cifar10", a.data_dir)
    tr, te = subset(tr, a.limit, 0), subset(te, a.test_limit, 0)
    probe = DeviceLoader(tr, a.batch, train=True, augment=True, seed=a.seed)
    norm = dict(mean=tuple(probe.mean.flatten().tolist()), std=tuple(probe.std.flatten().tolist()))
    return tr, te, norm


def _loaders(a, tr, te, norm):
    from resprune.data import DeviceLoader

    return (DeviceLoader(tr, a.batch, train=True, augment=True, seed=a.seed, **norm),
            DeviceLoader(te, 500, train=False, **norm))


def _train_cfg(a):
    from resprune.config import TrainConfig

    return TrainConfig(epochs=a.epochs, lr=a.lr, l1=0.0, bf16=False, channels_last=False, device="cpu",
                       seed=a.seed)


def _engine_cfg(a, label: str, tr):
    from resprune.parallel import AuxVarConfig

    variant, f, correct = RUNS[label]
    return AuxVarConfig(variant=variant, parallel_epochs=a.parallel_epochs if correct else a.epochs,
                        beta=a.beta, beta_growth=a.beta_growth, aux_step=a.aux_step,
                        downsample=a.downsample if f is None else f,
                        input_size=(1, tr.images.shape[-1], *tr.images.shape[1:3]))


def train_run(a, label: str, tr, te, norm) -> dict:
    """One training run (``serial`` or a RUNS label): the Trainer's history and the bytes."""
    from resprune.parallel import create_engine
    from resprune.parallel.comm import ThreadGroup
    from resprune.train import Trainer
    from resprune.train.loop import param_groups

    torch.manual_seed(a.seed)
    base = rp.create_model(a.model, num_classes=len(tr.classes))
    cfg = _train_cfg(a)
    t0 = time.perf_counter()
    if label == "serial":
        torch.set_num_threads(a.threads)
        trl, tel = _loaders(a, tr, te, norm)
        hist = Trainer(copy.deepcopy(base), trl, tel, cfg, log=lambda s: None).fit()
        return {"label": label, "history": [h.test_acc for h in hist], "wall_s": time.perf_counter() - t0}
    group, K = ThreadGroup(a.k), a.k
    ecfg = _engine_cfg(a, label, tr)

    def work(k: int) -> dict:
        torch.set_num_threads(1)
        model = copy.deepcopy(base)

        def sgd(named):
            return torch.optim.SGD(param_groups(model, cfg.weight_decay, list(named)), lr=cfg.lr,
                                   momentum=cfg.momentum, nesterov=True)

        eng = create_engine("auxvar", model, torch.nn.functional.cross_entropy, sgd, ecfg, comm=group.comm(k))
        sent = {"parallel": {}, "serial": 0}  # parallel: by epoch (the first visit sends full states)
        step, mem = eng.step, {}

        def counted(x, y, index=None):
            loss = step(x, y, index)
            if index is None:
                sent["serial"] += eng.stats["sent_bytes"]
            else:
                sent["parallel"][eng.epoch] = sent["parallel"].get(eng.epoch, 0) + eng.stats["sent_bytes"]
            if index is not None:
                mem["aux"] = eng.memory_bytes()["aux"]
            return loss

        eng.step = counted
        trl, tel = _loaders(a, tr, te, norm)
        hist = Trainer(model, trl, tel, cfg, engine=eng, log=lambda s: None).fit()
        return {"history": [h.test_acc for h in hist], "sent": sent, "aux_bytes": mem.get("aux", 0),
                "bounds": list(eng.bounds)}

    ranks = on_threads(K, work)
    ep = ecfg.parallel_epochs
    return {"label": label, "history": ranks[0]["history"], "wall_s": time.perf_counter() - t0,
            "bounds": ranks[0]["bounds"], "parallel_epochs": ep, "downsample": ecfg.downsample,
            "bytes_per_parallel_epoch": [sum(r["sent"]["parallel"].get(e, 0) for r in ranks) for e in range(1, ep + 1)],
            "bytes_per_serial_epoch": sum(r["sent"]["serial"] for r in ranks) / max(1, a.epochs - ep),
            "aux_bytes_per_rank": [r["aux_bytes"] for r in ranks]}


def _mb(per_epoch: list[float]) -> str:
    first, later = per_epoch[0] / 1e6, sorted({round(b / 1e6, 1) for b in per_epoch[1:]})
    return f"{first:.1f}" + (f", {' / '.join(f'{b:.1f}' for b in later)}" if later else "")


def accuracy_table(runs: list[dict]) -> list[str]:
    serial = runs[0]["history"][-1]
    lines = ["| run | parallel epochs | downsample | test acc after parallel phase % | final test acc % | "
             "vs serial (points) | MB sent: first epoch (init), later parallel epochs | MB per correction epoch | "
             "λ/μ MB per rank |",
             "|---" * 9 + "|"]
    for r in runs:
        if r["label"] == "serial":
            lines.append(f"| serial backprop | - | - | - | {serial:.2f} | 0 | - | - | - |")
            continue
        ep = r["parallel_epochs"]
        mid = r["history"][ep - 1] if ep else float("nan")
        ser_b = f"{r['bytes_per_serial_epoch'] / 1e6:.1f}" if ep < len(r["history"]) else "-"
        lines.append(f"| {r['label']} | {ep} | {r['downsample']} | {mid:.2f} | {r['history'][-1]:.2f} | "
                     f"{r['history'][-1] - serial:+.2f} | {_mb(r['bytes_per_parallel_epoch'])} | {ser_b} | "
                     f"{' / '.join(f'{b / 1e6:.1f}' for b in r['aux_bytes_per_rank'])} |")
    return lines


def run_accuracy(a) -> int:
    t_start = time.perf_counter()
    tr, te, norm = _data(a)
    labels = ["serial", *a.runs]
    _, facts = header("auxvar engine: accuracy and communication (Part A)",
                      f"{len(labels)} training runs, seed {a.seed}, one each")
    runs = []
    for label in labels:
        r = train_run(a, label, tr, te, norm)
        runs.append(r)
        print(f"{label}: {r['history']} in {r['wall_s']:.0f} s", file=sys.stderr)
    facts.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t_start)
    setup = [f"- Data: CIFAR-10 ({a.data_dir}), {len(tr)} training images (seeded subset), {len(te)} test images; "
             "crop (pad 4) + flip in serial epochs, none in parallel epochs",
             f"- Model `{a.model}`; SGD lr {a.lr}, momentum 0.9 (Nesterov), weight decay 5e-4, batch {a.batch}, "
             f"{a.epochs} epochs, cosine per step; seed {a.seed}; serial with {a.threads} thread(s)",
             f"- auxvar: K = {a.k} (ranks simulated as threads, ThreadComm), β = {a.beta} (×{a.beta_growth} per "
             f"parallel epoch), aux_step {a.aux_step}; bounds {runs[1].get('bounds') if len(runs) > 1 else '-'}"]
    md = "\n".join([*header_lines(facts), *setup, "", *accuracy_table(runs), "",
                    "Test accuracy per epoch: " + "; ".join(f"{r['label']}: {[round(v, 2) for v in r['history']]}"
                                                             for r in runs), ""])
    print(md)
    if a.out:
        write_report(a.out, md, {"part": "accuracy", **facts, "runs": runs, "args": vars(a)})
    return 0


# ---------------------------------------------------------------------------------- Part B
def _serial_times(a, model, loader, steps: int) -> dict:
    """Rank 0 alone: medians of T_d, T_f, T_b per batch and each layer's forward/backward seconds."""
    import statistics

    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    td, tf, tb = [], [], []
    it = loader.indexed(augment=False)
    for i in range(steps + 2):
        t0 = time.perf_counter()
        x, y, _ = next(it)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        if i >= 2:
            td.append(t1 - t0), tf.append(t2 - t1), tb.append(t3 - t2)
    fwd, bwd = [], []
    for _ in range(3):
        h, saved, f_s = x, [], []
        for _, m in model.layer_sequence():
            t0 = time.perf_counter()
            h_in = h.detach().requires_grad_()
            h = m(h_in)
            f_s.append(time.perf_counter() - t0)
            saved.append((h_in, h))
        g, b_s = torch.ones_like(h) / h.numel(), []
        for h_in, out in reversed(saved):
            t0 = time.perf_counter()
            out.backward(g)
            b_s.append(time.perf_counter() - t0)
            g = h_in.grad
        fwd.append(f_s), bwd.append(b_s[::-1])
    med = statistics.median
    return {"T_d": med(td), "T_f": med(tf), "T_b": med(tb),
            "layer_fwd": [med(c) for c in zip(*fwd)], "layer_bwd": [med(c) for c in zip(*bwd)]}


def _engine_times(eng, loader, steps: int) -> dict:
    """Wall seconds per parallel step (after one untimed initialising pass over the same
    batches) and per serial-correction step (batches made beforehand: ``T_d`` is added from
    the serial measurement), and this rank's median phase seconds of the parallel steps."""
    import statistics

    import torch.distributed as dist

    batches = [b for _, b in zip(range(steps), loader.indexed(augment=False))]
    for x, y, idx in batches:  # initialises λ of these samples (a serial forward each)
        eng.step(x, y, idx)
    phases: dict[str, list[float]] = {}
    out = {}
    for mode in ("parallel", "serial"):
        dist.barrier()
        t0 = time.perf_counter()
        for x, y, idx in batches:
            eng.step(x, y, idx if mode == "parallel" else None)
            if mode == "parallel":
                for k, v in eng.stats["times_s"].items():
                    phases.setdefault(k, []).append(v)
                out["sent_bytes"] = eng.stats["sent_bytes"]
        dist.barrier()
        out[f"{mode}_step_s"] = (time.perf_counter() - t0) / len(batches)
    out["phases"] = {k: statistics.median(v) for k, v in phases.items()}
    return out


def time_worker(a) -> int:
    """Under torchrun: Part B's measurements; rank 0 prints ``BENCH {json}``."""
    import torch.distributed as dist

    from resprune.parallel import AuxVarConfig, create_engine, finalize, init_distributed
    from resprune.parallel.partition import analyze_layers

    rank, world, _, _ = init_distributed()
    torch.set_num_threads(1)
    tr, te, norm = _data(a)
    trl, _ = _loaders(a, tr, te, norm)
    torch.manual_seed(a.seed)
    base = rp.create_model(a.model, num_classes=len(tr.classes))
    serial = _serial_times(a, copy.deepcopy(base), trl, a.steps) if rank == 0 else None
    dist.barrier()
    size = (1, tr.images.shape[-1], *tr.images.shape[1:3])
    cfg = AuxVarConfig(variant=a.time_variant, downsample=a.downsample, parallel_epochs=1, input_size=size)
    eng = create_engine("auxvar", copy.deepcopy(base), torch.nn.functional.cross_entropy,
                        lambda p: torch.optim.SGD(p, lr=a.lr, momentum=0.9), cfg)
    mine = _engine_times(eng, trl, a.steps)
    ranks = eng.comm.gather_object(mine)
    if rank == 0:
        info = analyze_layers(base, size)
        print("BENCH " + json.dumps({"serial": serial, "ranks": ranks, "bounds": eng.bounds, "costs": info.costs,
                                     "state_numel": [int(torch.Size(info.point_shape(p, 1)).numel())
                                                     for p in range(len(info.costs) + 1)],
                                     "steps_per_epoch": len(trl)}), flush=True)
    finalize(0)
    return 0


def time_table(a, d: dict) -> tuple[list[str], list[dict]]:
    """Part B's table: measured K (= a.k) and the cost model for ``a.model_k``."""
    from resprune.parallel.partition import balanced_bounds

    s, ranks = d["serial"], d["ranks"]
    t_serial = s["T_d"] + s["T_f"] + s["T_b"]
    per = [(r["phases"].get("exchange", 0.0) + r["phases"].get("aux_update", 0.0), r["phases"]["forward"],
            r["phases"]["backward"]) for r in ranks]
    bound = t_serial / (s["T_d"] + max(sum(p) for p in per))
    par, cor = s["T_d"] + ranks[0]["parallel_step_s"], s["T_d"] + ranks[0]["serial_step_s"]
    rows = [{"K": len(ranks), "kind": "measured", "step_s": par, "speedup": t_serial / par, "bound": bound,
             "correction_step_s": cor}]
    layer = [f + b for f, b in zip(s["layer_fwd"], s["layer_bwd"])]
    numel, B = d["state_numel"], a.batch
    bnd = d["bounds"]
    scale = sum(f + b for _, f, b in per) / sum(layer)  # engine stage time vs the per-layer sum
    io = [(numel[bnd[k]] if k else 0) + (numel[bnd[k + 1]] if k < len(ranks) - 1 else 0) for k in range(len(ranks))]
    c_psi = sum(p[0] for p in per) / max(1, sum(io) * B)
    for K in a.model_k:
        bk = balanced_bounds(d["costs"], K)
        st = [scale * sum(layer[bk[k]:bk[k + 1]]) + c_psi * B * ((numel[bk[k]] if k else 0) +
                                                              (numel[bk[k + 1]] if k < K - 1 else 0))
              for k in range(K)]
        rows.append({"K": K, "kind": "model", "step_s": s["T_d"] + max(st), "speedup": t_serial / (s["T_d"] + max(st)),
                     "bound": t_serial / (s["T_d"] + max(st)), "correction_step_s": float("nan")})
    steps = d["steps_per_epoch"]
    lines = [f"Serial: T_d {s['T_d'] * 1e3:.1f} ms, T_f {s['T_f'] * 1e3:.1f} ms, T_b {s['T_b'] * 1e3:.1f} ms per batch "
             f"of {B} ({steps} batches an epoch: {steps * t_serial:.1f} s).", "",
             "Per rank at K = %d (median ms per parallel step): " % len(ranks)
             + "; ".join(f"rank {k}: t_ψ {p[0] * 1e3:.1f}, t_f^λ {p[1] * 1e3:.1f}, t_b^λ {p[2] * 1e3:.1f}"
                         for k, p in enumerate(per)), "",
             "| K | kind | s per epoch, parallel | speed-up of a parallel epoch | bound ρ | s per correction epoch | "
             f"hybrid {a.parallel_epochs}+{a.epochs - a.parallel_epochs} epochs vs serial |", "|---" * 7 + "|"]
    for r in rows:
        hybrid = (a.parallel_epochs * r["step_s"] + (a.epochs - a.parallel_epochs) * r["correction_step_s"]) / (
            a.epochs * t_serial)
        corr = f"{steps * r['correction_step_s']:.1f}" if r["kind"] == "measured" else "-"
        hyb = f"{1 / hybrid:.2f}×" if r["kind"] == "measured" else "-"
        lines.append(f"| {r['K']} | {r['kind']} | {steps * r['step_s']:.1f} | {r['speedup']:.2f}× | "
                     f"{r['bound']:.2f}× | {corr} | {hyb} |")
    return lines, rows


def run_time(a) -> int:
    t_start = time.perf_counter()
    _, facts = header("auxvar engine: time per epoch and speed-up (Part B)",
                      f"one torchrun job, K = {a.k} gloo processes, {a.steps} timed steps per mode")
    args = [a for a in sys.argv[1:] if a not in ("--worker",)]
    d = torchrun(__file__, a.k, [*args, "--worker"], timeout=a.timeout)
    facts.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t_start)
    lines, rows = time_table(a, d)
    setup = [f"- `{a.model}` on {a.limit} CIFAR-10 images, batch {a.batch}; auxvar `{a.time_variant}`, downsample "
             f"{a.downsample}; bounds {d['bounds']}; one thread per process; K = {a.model_k} from the cost model "
             "(stage time = its layers' serially measured forward + backward seconds, scaled to the engine's measured "
             "stage times at K = 2; t_ψ ∝ boundary elements), a MODEL with no communication latency beyond t_ψ"]
    md = "\n".join([*header_lines(facts), *setup, "", *lines, ""])
    print(md)
    if a.out:
        write_report(a.out, md, {"part": "time", **facts, "measured": d, "rows": rows, "args": vars(a)})
    return 0


OPTIONS = [  # (flag, type, default, help)
    ("--data-dir", str, os.environ.get("RESPRUNE_DATA", "/root/data"), "CIFAR-10 ImageFolder root"),
    ("--model", str, "resnet20", "registered model"),
    ("--limit", int, 10000, "training images (seeded subset)"),
    ("--test-limit", int, 2000, "test images (seeded subset)"),
    ("--epochs", int, 5, "epochs of every run"),
    ("--parallel-epochs", int, 3, "E_p; the rest is the serial correction"),
    ("--batch", int, 128, "batch size"),
    ("--lr", float, 0.1, "SGD learning rate (cosine)"),
    ("--seed", int, 0, "seed of model, subset order and loader"),
    ("--threads", int, 2, "torch threads of the serial run (each simulated rank: 1)"),
    ("--k", int, 2, "stages (ranks)"),
    ("--beta", float, 8.0, "AuxVarConfig.beta"),
    ("--beta-growth", float, 1.0, "AuxVarConfig.beta_growth"),
    ("--aux-step", float, 0.5, "AuxVarConfig.aux_step"),
    ("--downsample", int, 2, "AuxVarConfig.downsample (ablation: 1)"),
    ("--steps", int, 20, "Part B: timed steps per mode"),
    ("--timeout", float, 1800.0, "Part B: seconds for the torchrun job"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["accuracy", "time"], default="accuracy")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a dry run)")
    ap.add_argument("--out", default=None, help="markdown report (JSON beside it)")
    for flag, kind, default, text in OPTIONS:
        ap.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--time-variant", choices=["penalty", "al"], default="al")
    ap.add_argument("--model-k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.limit, a.test_limit, a.epochs, a.parallel_epochs, a.steps, a.batch = 512, 200, 2, 1, 3, 64
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        return time_worker(a)
    return run_accuracy(a) if a.part == "accuracy" else run_time(a)


if __name__ == "__main__":
    sys.exit(main())
