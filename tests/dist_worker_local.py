"""Rank process for tests/test_parallel_local.py: the local engine under torchrun (gloo, CPU).

1. greedy and overlapping variants train a ResConv chain on a small template task (60 SGD
   steps): the reported loss (the model's, a few steps late) ends below half its start (serial
   training is shown for comparison), and every rank reports the same losses;
2. the trained net exports: ``full_state_dict`` is the model without auxiliary heads; rank 0
   loads it into a fresh model, fuses it (``resprune.fuse``) and exports ONNX (verified with
   onnxruntime against the model);
3. phase timers, bytes sent and memory per rank are in ``stats`` / ``memory_bytes``.

Prints one ``RESULT`` line per check on rank 0 (:data:`N_CHECKS` in all).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import LocalConfig, create_engine

from helpers import RankChecks, run_rank

N_CHECKS = 4
STEPS = 60


def sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def task(seed: int = 3):
    torch.manual_seed(2)
    templates = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        y = torch.randint(0, 4, (16,), generator=g)
        out.append((templates[y] + 0.5 * torch.randn(16, 3, 8, 8, generator=g), y))
    return out


def main() -> int:
    check = RankChecks()
    rank = check.rank

    torch.manual_seed(0)
    base = rp.create_model("resconv_chain", num_classes=4, depth=8, width=8, horizon=1.0)
    data = task()
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, sgd)
    curve_s = [ser.step(x, y) for x, y in data]
    first, end_s = sum(curve_s[:3]) / 3, sum(curve_s[-5:]) / 5
    engines = {}
    for variant in ("greedy", "overlap"):
        eng = create_engine("local", copy.deepcopy(base), F.cross_entropy, sgd,
                            LocalConfig(variant=variant, queue=2, input_size=(1, 3, 8, 8)))
        curve = [eng.step(x, y) for x, y in data]
        eng._drain()
        end = sum(curve[-5:]) / 5
        spread = torch.tensor(curve, dtype=torch.float64)
        lo, hi = spread.clone(), spread.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        same = bool(torch.equal(lo, hi))
        ok = end <= 0.5 * first and same  # local training is slower per step than serial, but it learns
        check(f"{variant} trains", ok, f"loss {first:.3f} -> local {end:.3f} (serial {end_s:.3f}), the model loss of "
              f"{eng.delay} steps before; the same on every rank: {same}")
        engines[variant] = eng
    eng = engines["overlap"]
    # export: the model without auxiliary heads, fused, ONNX
    sd = eng.full_state_dict()
    if rank == 0:
        keys_ok = list(sd) == list(base.state_dict())
        model = copy.deepcopy(base)
        model.load_state_dict(sd)
        model.eval()
        fused = rp.fuse(model)
        x = data[0][0][:2]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "local.onnx"
            rp.export_onnx(fused, path, input_size=(1, 3, 8, 8), source=None)
            info = rp.verify_onnx(path, model)
        err = float((fused(x) - model(x)).abs().max())
        check("export", keys_ok and err <= 1e-4 and bool(info.get("functional")),
              f"no auxiliary keys {keys_ok}, fused vs model {err:.1e}, "
              f"onnxruntime vs model checked {info.get('functional')}")
    else:
        check("export", sd is None, "")
    mem = eng.gather_memory_bytes()
    st = eng.stats
    if rank == 0:
        full = sum(p.numel() * p.element_size() for p in base.parameters())
        own = [m["params"] for m in mem]
        ok = max(own) < full and st["times_s"]["total"] > 0 and st["sent_bytes"] > 0 and "forward" in st["times_s"]
        check("stats and memory", ok, f"parameter bytes per rank (with heads) {own} of {full}; rank 0 sent "
              f"{st['sent_bytes']} B in its last step; phases {sorted(st['times_s'])}")
    else:
        check("stats and memory", True, "")
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
