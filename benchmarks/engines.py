"""The four layer-parallel engines side by side: step time, memory, bytes, and local accuracy.

**Part A** (``--part time``): one net, a ResConv chain (``resconv_chain``: stem, ``--depth``
identity-shortcut ResConv2d layers of ``--width`` channels at 32×32, head; layer scales
2/depth) and one random batch of ``--batch``, trained with SGD by every engine:
``serial``, ``pipeline-gpipe`` / ``pipeline-1f1b`` (``PipelineConfig(microbatches=M)``),
``mgrit`` (simultaneous, the nested start alone: "1 + 1" in
``benchmarks/layer_parallel_scaling.py``'s counting), ``local-greedy`` / ``local-overlap``
(``LocalConfig``). Each P in ``--procs`` (default 1, 2, 4) is one torchrun job (gloo, CPU, one
thread per rank) that builds every engine, warms them up and then times them in interleaved
repeats (engine order rotated each repeat): a repeat of an engine is ``--steps`` consecutive
steps between two barriers, its time per step the block's wall time / steps (for ``local``
this includes one pipeline fill per block, the model below too); the table gives the median
over repeats. One more (untimed) probe step per engine records, per rank:

- memory: ``engine.memory_bytes()`` (parameters + buffers with storage on the rank, grads,
  optimizer state; the serial engine's computed the same way) and the peak bytes the
  autograd graph holds for backward (saved tensors other than parameters, each storage once;
  measured with ``torch.autograd.graph.saved_tensors_hooks``): activation memory, where GPipe
  and 1F1B differ;
- bytes sent: the engine's own ``stats["sent_bytes"]`` and, independently, the bytes handed
  to ``torch.distributed.isend``/``send`` (wrapped by this script: what torch's pipelining
  schedules and resprune's ``DistComm`` call) plus the payload of ``all_reduce``/``broadcast``.

**Cost models** (fitted from the P = 1 run's phase timers of each engine, ``ℓ_n`` = forward
seconds of layer n from ``engine.measured_layer_time()`` rescaled to the engine's measured
forward seconds, ``r`` = backward/forward seconds, ``o`` = the rest of a step (loss
all-reduce, optimizer step, bookkeeping), partitions ``[b_k, b_{k+1})`` = the engines' own
``balanced_bounds`` of the counted layer costs, ``F_k = Σ_{n∈k} ℓ_n``, ``s_k`` = stage k's
share of the parameters, ``α(bytes) = latency + bytes/bandwidth`` fitted to gloo ping-pongs
of three message sizes in the P = 2 job, ``a_b`` = bytes of the state at boundary b for the
whole batch; ``ρ`` = compute slowdown when P ranks share the machine, 1 = one idle core per
rank):

    serial          T = T₁ (measured; no P)
    pipeline        t_k = (1 + r)·F_k / M
                    T(P) = ρ·(Σ_k t_k + (M − 1)·max_k t_k + o·max_k s_k) + 2·Σ_b α(a_b / M)
                    (fill and drain: every stage once, then M − 1 micro-batches at the
                    bottleneck; one activation and one gradient message per boundary on the
                    critical path; GPipe and 1F1B have the same bubble, they differ in memory)
    local           c_k = ρ·((1 + r)·(F_k + R_k) + o·s_k) + α(message into k)   (R_k: the
                    overlap replica's forward, overlapping variant only)
                    T(P) = max_k c_k + ρ·Σ_{k<P−1} F_k / S   (steady state plus the pipeline
                    fill once per block of S steps; no backward messages but a loss)
    mgrit           layer_parallel_scaling's model: T(P) = ρ·(c·N/cf + (f·N + o)/P) + 2·α·(P − 1)
                    (c: coarse step, f: fine layer, o: rest, from the P = 1 phase timers)

The report gives each model's error at P = 2 and P = 4, with ρ = 1 and with ρ measured at that
P from the engine's own compute timers (pipeline ``fwd_compute_s``, local ``forward``, mgrit
fine sweeps, against the P = 1 per-layer times), and extrapolates to P = 8 with ρ = 1: a
MODEL, not a measurement. Times with P above the number of cores are marked oversubscribed.

**Part B** (``--part local-accuracy``): a CIFAR ResNet (``--model``, ResConv ResNet-20) on a
seeded CIFAR-10 subset (``--data-dir``, ``--limit`` training images, ``--test-limit`` test
images; ``resprune.data`` loaders with crop + flip), trained by serial backprop and by the
local engine, greedy and overlapping, with K = 2 and 4 chunks, seeds 0, 1, 2 (``--seeds``):
final test accuracy and compute. The K ranks are simulated as threads of one process with
``resprune.parallel.comm.ThreadComm`` (the back end the engine's own tests use): the same
arithmetic as K processes, because every message is matched in step order and each chunk's
update depends only on what it received (greedy: the previous chunk's detached output of the
same step; overlap: the replica's gradient of ``queue`` steps before). Compute is counted, not
timed: ``torch.utils.flop_counter`` counts the FLOPs of each rank's forward + backward of one
step (conv/linear/matmul; BatchNorm and ReLU not counted), so "critical path" = the slowest
rank's FLOPs per step × steps (a parallel run's time with one device per rank), "total" =
all ranks. Writes ``engines_local_accuracy.{md,json,png}`` (accuracy vs compute, mean and
standard deviation over seeds).

Both parts: ``--out PATH.md`` (JSON beside it; Part B also PNG; ``--from-json`` re-prints a
report without measuring); ``--quick`` is a dry run with tiny sizes (30 s for Part A, 70 s for
Part B on the 2-core machine with a light load; writes only with ``--out``). Defaults: Part A
depth 256, width 16, batch 32, 8 micro-batches, cf 16, P = 1, 2, 4, 5 repeats × 4 steps
(estimated 6–12 min alone on 2 cores); Part B ResNet-20, 10,000 images, 5 epochs of batch 128,
the full test set, backprop on one thread (estimated 35–55 min alone on 2 cores).

    python benchmarks/engines.py --part time --out benchmarks/results/engines_time.md
    python benchmarks/engines.py --part local-accuracy --data-dir /root/data \\
        --out benchmarks/results/engines_local_accuracy.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_parallel_scaling as lps  # noqa: E402  (mgrit's cost model)
from _common import (FACT_KEYS, fit_hop, header, header_lines, hop_seconds, hop_time, on_threads,  # noqa: E402
                     subset, torchrun, write_report)

import resprune as rp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("serial", "pipeline-gpipe", "pipeline-1f1b", "mgrit", "local-greedy", "local-overlap")
VARIANTS_B = ("backprop", "greedy", "overlap")

DEFAULTS_A = dict(depth=256, width=16, batch=32, microbatches=8, cf=16, levels=2, queue=2, procs=[1, 2, 4],
                  repeats=5, steps=4, warmup=2)
QUICK_A = dict(depth=12, width=4, batch=8, microbatches=4, cf=4, levels=2, queue=2, procs=[1, 2],
               repeats=2, steps=2, warmup=1)
DEFAULTS_B = dict(model="resnet20", limit=10000, test_limit=0, epochs=5, train_batch=128, lr=0.1, wd=5e-4,
                  ks=[2, 4], seeds=[0, 1, 2], queue=2)
QUICK_B = dict(model="resnet20", limit=256, test_limit=256, epochs=1, train_batch=32, lr=0.05, wd=5e-4,
               ks=[2, 4], seeds=[0, 1], queue=2)


# =============================================================================== Part A
def chain(a) -> torch.nn.Module:
    """Part A's net: a ResConv chain with layer scales 2 / depth (as in layer_parallel_scaling)."""
    return rp.create_model("resconv_chain", depth=a.depth, width=a.width, horizon=2.0)


def engine_spec(name: str, a) -> tuple[str, Any]:
    """(registered engine, config) of a Part A engine name."""
    from resprune.parallel import LocalConfig, MGRITConfig, PipelineConfig

    insz = (1, 3, 32, 32)
    if name == "serial":
        return "serial", None
    if name.startswith("pipeline-"):
        return "pipeline", PipelineConfig(microbatches=a.microbatches, schedule=name.split("-")[1], input_size=insz)
    if name == "mgrit":  # the nested start alone: "1 + 1" in layer_parallel_scaling's tables
        return "mgrit", MGRITConfig(cf=a.cf, levels=a.levels, mode="simultaneous", fwd_iters=0, bwd_iters=0,
                                    input_size=insz)
    if name.startswith("local-"):
        variant = "overlap" if name.endswith("overlap") else "greedy"
        return "local", LocalConfig(variant=variant, overlap=1, queue=a.queue, input_size=insz)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


class ByteCounter:
    """Counts the bytes this process hands to ``torch.distributed``'s point-to-point sends
    (``isend``, ``send``) and the payload of ``all_reduce``/``broadcast``, by wrapping those
    functions in ``torch.distributed`` and ``torch.distributed.distributed_c10d`` (torch's
    pipelining and resprune's DistComm look them up at call time)."""

    def __init__(self) -> None:
        self.p2p = self.collective = 0

    def reset(self) -> None:
        self.p2p = self.collective = 0

    def install(self) -> "ByteCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for fname, kind in (("isend", "p2p"), ("send", "p2p"), ("all_reduce", "collective"),
                            ("broadcast", "collective")):
            orig = getattr(c10d, fname)

            def wrapped(tensor, *args, _orig=orig, _kind=kind, **kwargs):
                setattr(self, _kind, getattr(self, _kind) + tensor.numel() * tensor.element_size())
                return _orig(tensor, *args, **kwargs)

            wrapped.__name__ = wrapped.__qualname__ = fname
            setattr(c10d, fname, wrapped)
            setattr(dist, fname, wrapped)
        return self


class _Held:
    """A tensor saved for backward; tells its tracker when autograd lets go of it."""

    __slots__ = ("owner", "key", "t")

    def __init__(self, owner: "SavedTensorPeak", key: int, t: torch.Tensor) -> None:
        self.owner, self.key, self.t = owner, key, t

    def __del__(self) -> None:
        self.owner._drop(self.key)


class SavedTensorPeak:
    """Peak bytes of the tensors autograd saves for backward while the block runs (each
    storage counted once; storages of ``exclude``, the parameters, not counted)."""

    def __init__(self, exclude=()) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in exclude if not p.is_meta}
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor):
        if t.is_meta or t.device.type != "cpu" and not t.is_cuda:
            return t
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if key in self.skip or nbytes == 0:
            return t
        ref = self.refs.get(key)
        if ref is None:
            self.refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            ref[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def _drop(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is not None:
            ref[0] -= 1
            if ref[0] == 0:
                self.live -= ref[1]
                del self.refs[key]

    def __enter__(self) -> "SavedTensorPeak":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def memory_of(eng) -> dict[str, int]:
    """``engine.memory_bytes()``; for the serial engine the same counts of the whole model."""
    if hasattr(eng, "memory_bytes"):
        return eng.memory_bytes()
    from resprune.parallel.stage import tensor_bytes

    m = eng.model
    mem = {"params": tensor_bytes(m.parameters()), "buffers": tensor_bytes(m.buffers()),
           "grads": tensor_bytes(p.grad for p in m.parameters()),
           "optimizer": tensor_bytes(v for s in eng.optimizer.state.values() for v in s.values() if torch.is_tensor(v))}
    mem["total"] = sum(mem.values())
    return mem


def _all_params(eng) -> list[torch.Tensor]:
    ps = list(eng.model.parameters()) + [p for _, p in eng.local_named_parameters()]
    rep = getattr(eng, "replica", None)
    return ps + (list(rep.parameters()) if rep is not None else [])


def _snapshot(eng) -> dict[str, float]:
    s = eng.stats
    d = {k: float(v) for k, v in (s.get("times_s") or {}).items()}
    for k in ("comm_wait_s", "sent_bytes", "fwd_compute_s", "microbatches", "fwd_iters", "bwd_iters"):
        if s.get(k) is not None:
            d[k] = float(s[k])
    return d


def _settle(eng) -> None:
    """Nothing in flight after a block: the local engine's queues are drained by a public
    collective that drains first (``full_optimizer_state``; the engine has no public drain)."""
    if eng.name == "local" and eng.world_size > 1:
        eng.full_optimizer_state()


def time_worker(a) -> None:
    """Under torchrun: build every engine, time them interleaved, probe memory and bytes;
    rank 0 prints ``BENCH {json}``."""
    import torch.distributed as dist

    from resprune.parallel import create_engine, finalize, init_distributed

    rank, world, _, _ = init_distributed(timeout_s=900)
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    counter = ByteCounter().install()
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch,))

    def barrier():
        if world > 1:
            dist.barrier()

    def sgd(named):
        return torch.optim.SGD(named, lr=0.01, momentum=0.9)

    res: dict[str, Any] = {"P": world}
    if world > 1:  # message hops of three sizes: a scalar, a micro-batch state, a batch state
        state = a.width * 32 * 32
        sizes = [2, max(1, a.batch // a.microbatches) * state, a.batch * state]
        res["hops"] = {str(4 * n): hop_seconds(n) for n in sizes}
    names = [n for n in a.engines if n != "serial" or world == 1]
    engines = {}
    for name in names:
        torch.manual_seed(0)
        kind, cfg = engine_spec(name, a)
        engines[name] = create_engine(kind, chain(a), F.cross_entropy, sgd, cfg)
    for name, eng in engines.items():
        for _ in range(a.warmup):
            eng.step(x, y)
        _settle(eng)
        barrier()
    times: dict[str, list[float]] = {n: [] for n in names}
    snaps: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            eng = engines[name]
            barrier()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                eng.step(x, y)
                snaps[name].append(_snapshot(eng))
            barrier()
            times[name].append((time.perf_counter() - t0) / a.steps)
            _settle(eng)
    mine: dict[str, Any] = {}
    for name, eng in engines.items():
        counter.reset()
        barrier()
        with SavedTensorPeak(_all_params(eng)) as saved:
            eng.step(x, y)
        p2p, coll = counter.p2p, counter.collective
        d = {"times_s": times[name], "median_s": statistics.median(times[name]),
             "phases": {k: statistics.median(s.get(k, 0.0) for s in snaps[name]) for k in snaps[name][0]}
             if snaps[name] and snaps[name][0] else {},
             "probe": {"engine_sent_bytes": int(eng.stats.get("sent_bytes", 0)), "p2p_bytes": p2p,
                       "collective_bytes": coll, "saved_peak_bytes": saved.peak},
             "memory": memory_of(eng)}
        _settle(eng)
        if hasattr(eng, "bounds"):
            d["bounds"] = list(eng.bounds)
        if hasattr(eng, "measured_layer_time"):
            lt = eng.measured_layer_time()  # collective
            if world == 1:
                d["layer_time"] = lt
        mine[name] = d
        barrier()
    mine["cpu_s"] = time.process_time() - cpu0
    parts = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(mine, parts, dst=0)
    else:
        parts = [mine]
    if rank == 0:
        res["cpu_s"] = [p.pop("cpu_s") for p in parts]
        res["engines"] = {n: {"median_s": parts[0][n]["median_s"], "times_s": parts[0][n]["times_s"],
                              "bounds": parts[0][n].get("bounds"), "layer_time": parts[0][n].get("layer_time"),
                              "ranks": [{k: p[n][k] for k in ("phases", "probe", "memory")} for p in parts]}
                          for n in names}
        print("BENCH " + json.dumps(res), flush=True)
    finalize(0)


# ----------------------------------------------------------------------------- cost models
class NetFacts:
    """Layer-level facts of Part A's net the models need (no processes): counted costs (what
    the engines partition by), parameters per layer, bytes of each boundary state per sample."""

    def __init__(self, a) -> None:
        from resprune.parallel import analyze_layers, layer_sequence

        model = chain(a)
        self.seq = layer_sequence(model)
        self.names = [n for n, _ in self.seq]
        info = analyze_layers(model, (1, 3, 32, 32))
        self.costs = info.costs
        self.params = [sum(p.numel() for p in m.parameters()) for _, m in self.seq]
        self.point_bytes = [4 * math.prod(info.point_shape(b, 1)) for b in range(len(self.seq) + 1)]
        self.batch, self.depth, self.cf = a.batch, a.depth, a.cf

    def bounds(self, P: int) -> list[int]:
        from resprune.parallel import balanced_bounds

        return balanced_bounds(self.costs, P)


def _sums(values: list[float], bounds: list[int]) -> list[float]:
    return [sum(values[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


def fit_models(rows: dict[int, dict], net: NetFacts, a) -> dict[str, dict]:
    """Each engine's model parameters from its P = 1 run (rank 0's phase medians), the message
    hop line from the P = 2 job's ping-pongs (the smallest P > 1 measured)."""
    r1 = rows[1]["engines"]
    hop_rows = [rows[P]["hops"] for P in sorted(rows) if "hops" in rows[P]]
    hop = fit_hop({int(k): v for k, v in hop_rows[0].items()}) if hop_rows else fit_hop({})
    fits: dict[str, dict] = {}
    serial_s = r1["serial"]["median_s"] if "serial" in r1 else None
    for name, e in r1.items():
        ph, T1 = e["ranks"][0]["phases"], e["median_s"]
        f: dict[str, Any] = {"T1": T1, "hop": hop}
        if name.startswith(("pipeline", "local")):
            fwd = ph["fwd_compute_s"] if name.startswith("pipeline") else ph["forward"]
            work = ph["pipeline"] if name.startswith("pipeline") else ph["forward"] + ph["backward"]
            lt = [float((e.get("layer_time") or {}).get(n, 0.0)) for n in net.names]
            scale = fwd / sum(lt) if sum(lt) > 0 else 0.0
            f.update(fwd=fwd, r=max(0.0, (work - fwd) / fwd), o=max(0.0, T1 - work), ell=[v * scale for v in lt])
            if name.startswith("pipeline"):
                f["M"] = int(ph.get("microbatches", a.microbatches))
        elif name == "mgrit":
            full = str(4 * a.batch * a.width * 32 * 32)
            adapter = {1: {"serial": {"median_s": serial_s or T1},
                           "simultaneous": {"median_s": T1, "phases": [_lps_phases(ph)]}}}
            for P in sorted(rows):
                if P > 1 and "mgrit" in rows[P]["engines"]:
                    adapter[P] = {"simultaneous": {"phases": [_lps_phases(r["phases"])
                                                              for r in rows[P]["engines"]["mgrit"]["ranks"]]}}
                    if P == min(p for p in rows if p > 1) and full in rows[P].get("hops", {}):
                        adapter[P]["hop_s"] = rows[P]["hops"][full]  # the same job as the others' hop line
            f["lps"] = lps.fit_and_model(adapter, net.depth, net.cf)
            f["adapter"] = adapter
        fits[name] = f
    return fits


def _lps_phases(ph: dict) -> dict:
    """This script's phase medians in layer_parallel_scaling's names."""
    keys = ("fwd_solve", "fwd_sweep", "bwd_solve", "bwd_sweep", "total")
    return {**{k: ph.get(k, 0.0) for k in keys}, "comm_wait": ph.get("comm_wait_s", 0.0)}


def predict(name: str, fit: dict, net: NetFacts, P: int, rho: float = 1.0, bounds: list[int] | None = None,
            steps: int = 1) -> float:
    """Model seconds per step of engine ``name`` at P ranks (see the module docstring)."""
    if name == "serial":
        return fit["T1"]
    if name == "mgrit":
        return lps.model_time(fit["lps"], net.depth, P, net.cf, rho)
    b = bounds or net.bounds(P)
    Fk = _sums(fit["ell"], b)
    share = [s / sum(net.params) for s in _sums(net.params, b)]
    B, hop = net.batch, fit["hop"]
    if name.startswith("pipeline"):
        M = fit["M"]
        t = [(1 + fit["r"]) * f / M for f in Fk]
        comm = 2 * sum(hop_time(hop, net.point_bytes[bb] * B / M) for bb in b[1:-1])
        return rho * (sum(t) + (M - 1) * max(t) + fit["o"] * max(share)) + comm
    overlap = name.endswith("overlap")
    c = []
    for k in range(P):
        o = min(1, b[k] - b[k - 1]) if overlap and k else 0
        Rk = sum(fit["ell"][b[k] - o:b[k]])
        msg = hop_time(hop, net.point_bytes[b[k] - o] * B) if k else 0.0
        if o:  # the overlap layers' parameters in, their gradient back
            nb = 4 * sum(net.params[b[k] - o:b[k]])
            msg += 2 * hop_time(hop, nb)
        c.append(rho * ((1 + fit["r"]) * (Fk[k] + Rk) + fit["o"] * share[k]) + msg)
    fill = rho * sum(Fk[:-1])
    return max(c) + fill / steps


def measured_rho(name: str, fit: dict, net: NetFacts, row: dict) -> float | None:
    """Compute slowdown at a measured P: the engine's own compute timers per rank against the
    P = 1 per-layer times of the same layers (median over ranks)."""
    e = row["engines"].get(name)
    if e is None or name == "serial":
        return None
    if name == "mgrit":
        return lps.contention(fit["adapter"], fit["lps"], net.depth, row["P"])
    b, out = e["bounds"], []
    for k, r in enumerate(e["ranks"]):
        pred = sum(fit["ell"][b[k]:b[k + 1]])
        meas = r["phases"].get("fwd_compute_s" if name.startswith("pipeline") else "forward")
        if pred > 0 and meas:
            out.append(meas / pred)
    return statistics.median(out) if out else None


def formulas(fits: dict, net: NetFacts, a) -> list[str]:
    """The fitted parameters of each model, one markdown bullet each."""
    out = []
    for name, f in fits.items():
        if name == "serial":
            out.append(f"- `serial`: T = T₁ = {f['T1'] * 1e3:.1f} ms (measured)")
        elif name == "mgrit":
            m = f["lps"]
            out.append(f"- `mgrit`: T = ρ·(c·N/cf + (f·N + o)/P) + 2·α·(P − 1) with N = {net.depth}, "
                       f"cf = {net.cf}, "
                       f"c = {m['coarse'] * 1e3:.3f} ms, f = {m['fine'] * 1e3:.3f} ms, o = {m['other'] * 1e3:.1f} ms, "
                       f"α = {m['alpha'] * 1e3:.3f} ms (benchmarks/layer_parallel_scaling.py)")
        else:
            extra = f", M = {f['M']}" if "M" in f else ""
            out.append(f"- `{name}`: forward Σℓ = {f['fwd'] * 1e3:.1f} ms, r = {f['r']:.2f}, "
                       f"o = {f['o'] * 1e3:.1f} ms"
                       f"{extra}")
    h = next(iter(fits.values()))["hop"]
    out.append(f"- message hop α(bytes) = {h['latency_s'] * 1e6:.0f} µs + bytes × {h['s_per_byte'] * 1e9:.3f} ns "
               "(gloo loopback ping-pong, P = 2 job)")
    return out


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def time_summary(rows: dict[int, dict], a, cores: int) -> tuple[str, dict]:
    """Markdown body and JSON summary of Part A's measurements and models (``cores``: physical
    cores of the machine that measured them)."""
    net = NetFacts(a)
    fits = fit_models(rows, net, a)
    serial_s = rows[1]["engines"].get("serial", {}).get("median_s")
    summary: list[dict] = []
    errors: dict[str, dict[str, dict[str, float]]] = {}
    for P in sorted(rows):
        for name, e in rows[P]["engines"].items():
            fit = fits.get(name)
            meas = e["median_s"]
            ranks = e["ranks"]
            rec: dict[str, Any] = {
                "engine": name, "P": P, "oversubscribed": P > cores, "median_s": meas,
                "speedup_vs_serial": serial_s / meas if serial_s else None,
                "memory_total_per_rank": [r["memory"]["total"] for r in ranks],
                "memory_params_per_rank": [r["memory"]["params"] for r in ranks],
                "saved_peak_per_rank": [r["probe"]["saved_peak_bytes"] for r in ranks],
                "engine_sent_bytes_per_rank": [r["probe"]["engine_sent_bytes"] for r in ranks],
                "p2p_bytes_per_rank": [r["probe"]["p2p_bytes"] for r in ranks],
                "collective_bytes_per_rank": [r["probe"]["collective_bytes"] for r in ranks],
                "bounds": e.get("bounds")}
            if fit is not None:
                b = e.get("bounds") if P > 1 else None
                rec["model_s"] = predict(name, fit, net, P, 1.0, b, a.steps)
                rho = measured_rho(name, fit, net, rows[P]) if P > 1 else 1.0
                rec["rho"] = rho
                if rho is not None:
                    rec["model_rho_s"] = predict(name, fit, net, P, rho, b, a.steps)
                rec["model_error"] = rec["model_s"] / meas - 1
                if "model_rho_s" in rec:
                    rec["model_rho_error"] = rec["model_rho_s"] / meas - 1
                if P > 1:
                    errors.setdefault(name, {})[str(P)] = {"rho1": rec["model_error"],
                                                           "rho_measured": rec.get("model_rho_error")}
            summary.append(rec)
    extrap = []
    for name, fit in fits.items():
        if name == "serial":
            continue
        for P in sorted({2, 4, 8, *[p for p in rows if p > 1]}):
            t = predict(name, fit, net, P, 1.0, None, a.steps)
            extrap.append({"engine": name, "P": P, "model_s": t,
                           "speedup_vs_serial": serial_s / t if serial_s else None,
                           "bounds": None if name in ("serial", "mgrit") else net.bounds(P)})
    mb = lambda v: _fmt_bytes(v)  # noqa: E731
    ov = lambda P: f"{P} (oversubscribed)" if P > cores else str(P)  # noqa: E731
    t1 = ["| engine | P | median s/step | speed-up vs serial | model s/step (ρ = 1) | error | ρ measured | "
          "model with measured ρ | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        err = f"{100 * r['model_error']:+.0f}%" if "model_error" in r else "–"
        rho = f"{r['rho']:.2f}" if r.get("rho") is not None else "–"
        mr = f"{r['model_rho_s']:.3f}" if "model_rho_s" in r else "–"
        er = f"{100 * r['model_rho_error']:+.0f}%" if r.get("model_rho_error") is not None else "–"
        sp = f"{r['speedup_vs_serial']:.2f}" if r["speedup_vs_serial"] else "–"
        if r["P"] == 1:  # the run the models are fitted on: they reproduce it by construction
            err, rho, mr, er = "(fit)", "–", "–", "–"
        t1.append(f"| {r['engine']} | {ov(r['P'])} | {r['median_s']:.3f} | {sp} | {r.get('model_s', 0):.3f} | {err} "
                  f"| {rho} | {mr} | {er} |")
    t2 = ["| engine | P | resident per rank (params+buffers+grads+optimizer) | params per rank | peak saved "
          "activations per rank | sent per step, all ranks (engine stats) | at torch.distributed p2p calls | "
          "collective payload |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        rng = lambda v: mb(v[0]) if len(set(v)) == 1 else f"{mb(min(v))} – {mb(max(v))}"  # noqa: E731
        t2.append(f"| {r['engine']} | {r['P']} | {rng(r['memory_total_per_rank'])} "
                  f"| {rng(r['memory_params_per_rank'])} "
                  f"| {rng(r['saved_peak_per_rank'])} | {mb(sum(r['engine_sent_bytes_per_rank']))} "
                  f"| {mb(sum(r['p2p_bytes_per_rank']))} | {mb(sum(r['collective_bytes_per_rank']))} |")
    t3 = ["| engine | " + " | ".join(f"error at P = {P} (ρ = 1 / measured ρ)" for P in sorted(rows) if P > 1) + " |",
          "|---|" + "---|" * sum(1 for P in rows if P > 1)]
    for name in fits:
        if name == "serial":
            continue
        cells = []
        for P in sorted(rows):
            if P == 1:
                continue
            e = errors.get(name, {}).get(str(P))
            if e is None:
                cells.append("–")
            else:
                rm = f"{100 * e['rho_measured']:+.0f}%" if e["rho_measured"] is not None else "–"
                cells.append(f"{100 * e['rho1']:+.0f}% / {rm}{' (oversubscribed)' if P > cores else ''}")
        t3.append(f"| {name} | " + " | ".join(cells) + " |")
    t4 = ["| engine | P | model s/step | model speed-up vs measured serial |", "|---|---|---|---|"]
    for r in extrap:
        sp = f"{r['speedup_vs_serial']:.2f}" if r["speedup_vs_serial"] else "–"
        t4.append(f"| {r['engine']} | {r['P']}{' (MODEL)' if r['P'] == 8 else ''} | {r['model_s']:.3f} | {sp} |")
    t5 = ["| engine | P | rank | phase medians (s per step) | blocked in comm | sent bytes |",
          "|---|---|---|---|---|---|"]
    for P in sorted(rows):
        for name, e in rows[P]["engines"].items():
            for k, r in enumerate(e["ranks"]):
                ph = r["phases"]
                if not ph:
                    continue
                main = ", ".join(f"{k2} {v:.3f}" for k2, v in ph.items()
                                 if k2 not in ("comm_wait_s", "sent_bytes", "microbatches", "fwd_iters", "bwd_iters"))
                t5.append(f"| {name} | {P} | {k} | {main} | {ph.get('comm_wait_s', 0):.3f} | "
                          f"{mb(ph.get('sent_bytes', 0))} |")
    body = "\n".join([
        "## Measured step times and the cost models", "",
        f"Median over {a.repeats} interleaved repeats of {a.steps} consecutive steps (after {a.warmup} warm-up "
        "steps per engine). Speed-up against the serial engine measured at P = 1. Model columns: "
        "fitted on the P = 1 run only (see \"Cost models\"); the error is model / measured − 1.", "",
        *t1, "",
        "How well the models fit the measured P > 1 runs (model / measured − 1):", "", *t3, "",
        "## Memory and bytes per step (probe step after the timing, per rank)", "",
        "Resident = `engine.memory_bytes()` (the serial engine counted alike): what a rank keeps between "
        "steps. Peak saved activations = the most bytes autograd held for backward during the step "
        "(saved tensors except parameters, each storage once): GPipe keeps every micro-batch's graph, 1F1B at "
        "most P; mgrit keeps one graph per owned layer in its final sweep. Sent = point-to-point bytes of one "
        "step summed over ranks, as the engines report them (`stats['sent_bytes']`) and as counted at "
        "`torch.distributed.isend/send` by this script; collective payload = the tensors passed to "
        "`all_reduce`/`broadcast` (the loss; a ring moves about 2·(P − 1)/P of that per rank).", "",
        *t2, "",
        "## Cost models", "",
        "Fitted parameters (P = 1 phase timers; formulas in the script's docstring):", "",
        *formulas(fits, net, a), "",
        "Extrapolation with ρ = 1 (one idle core per rank) and the engines' own partitions: "
        "a MODEL, not a measurement; P = 8 is beyond this machine.", "",
        *t4, "",
        "## Per-rank phase times (medians over the timed steps)", "", *t5, ""])
    data = {"summary": summary, "model_errors": errors, "extrapolation": extrap,
            "fits": {n: {k: v for k, v in f.items() if k not in ("adapter", "ell")} for n, f in fits.items()},
            "layer_seconds": {n: f.get("ell") for n, f in fits.items() if "ell" in f}}
    return body, data


TIME_ARGS = ("depth", "width", "batch", "microbatches", "cf", "levels", "queue", "procs", "repeats", "steps", "warmup",
             "engines")


def run_time(a) -> int:
    """Part A: one torchrun job per P (or the measurements of ``--from-json``), the models, the report."""
    t_start = time.perf_counter()
    if a.from_json:
        d = json.loads(Path(a.from_json).read_text())
        rows = {int(k): v for k, v in d["rows"].items()}
        facts = {k: d[k] for k in FACT_KEYS if k in d}
        for k, v in d["args"].items():
            setattr(a, k, v)
    else:
        _, facts = header("Layer-parallel engines: step time, memory, bytes (Part A)",
                          f"P ∈ {a.procs}, one torchrun job each; per engine {a.warmup} warm-up steps, "
                          f"{a.repeats} interleaved repeats × {a.steps} steps = {a.repeats * a.steps} timed steps, "
                          "1 probe step")
        wargs = {k: getattr(a, k) for k in TIME_ARGS}
        rows = {}
        for P in a.procs:
            rows[P] = torchrun(__file__, P, ["--worker", json.dumps(wargs)], timeout=a.timeout)
            print(f"P={P}: {rows[P]['job_s']:.0f} s (rank CPU s: {', '.join(f'{c:.0f}' for c in rows[P]['cpu_s'])})",
                  file=sys.stderr)
        facts.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t_start)
    if 1 not in rows:
        raise SystemExit("--procs must include 1 (the models are fitted on it)")
    cores = facts.get("physical_cores") or facts["hardware"]["cores"]
    body, data = time_summary(rows, a, cores)
    params = sum(p.numel() for p in chain(a).parameters())
    setup = [
        f"- Net: `resconv_chain`, depth {a.depth} ResConv2d layers of width {a.width} at 32×32 (+ stem, head; "
        f"{params:,} parameters), layer scales 2/depth; one random batch of {a.batch} (3×32×32), 10 classes; "
        "SGD lr 0.01, momentum 0.9; float32, CPU, gloo, one thread per rank",
        f"- Engines: serial (P = 1 only); pipeline GPipe and 1F1B, {a.microbatches} micro-batches; mgrit "
        f"simultaneous, cf {a.cf}, {a.levels} levels, F-relaxation, nested start only (fwd/bwd_iters 0); local "
        f"greedy and overlapping (overlap 1), queue {a.queue}, auxiliary heads pool + linear",
        f"- {cores} physical cores: rows with P > {cores} are oversubscribed (several ranks share a core) and say "
        "nothing about scaling",
        "- Jobs (wall s; CPU s of each rank after start-up): " + "; ".join(
            f"P = {P}: {r['job_s']:.0f} s; {', '.join(f'{c:.0f}' for c in r['cpu_s'])}"
            for P, r in sorted(rows.items()))]
    md = "\n".join([*header_lines(facts), *setup, "", body])
    print(md)
    if a.out:
        write_report(a.out, md, {"part": "time", **facts, "args": {k: getattr(a, k) for k in TIME_ARGS},
                                 "rows": {str(k): v for k, v in rows.items()}, **data})
    return 0


# =============================================================================== Part B
def step_flops(model: torch.nn.Module, bounds: list[int], overlap: int, x: torch.Tensor, y: torch.Tensor,
               aux_hidden: int = 0) -> list[float]:
    """FLOPs (forward + backward, ``torch.utils.flop_counter``) of one training step of each
    rank of the local engine with chunk ``bounds``, computed as the engine computes it: rank
    k's input is the detached state at ``bounds[k]`` (minus ``overlap`` layers, which rank k
    runs as a replica and trains), its loss that of an auxiliary head (pool + linear) or,
    on the last rank, the model's own head. ``bounds = [0, n]`` is serial backprop."""
    from torch.utils.flop_counter import FlopCounterMode

    from resprune.parallel import analyze_layers, layer_sequence
    from resprune.parallel.local import AuxHead

    info = analyze_layers(model, (1, *x.shape[1:]))
    classes = info.out_shapes[-1][0]
    out = []
    for k in range(len(bounds) - 1):
        m = copy.deepcopy(model)
        seq = layer_sequence(m)
        lo, hi = bounds[k], bounds[k + 1]
        o = min(overlap, lo - bounds[k - 1]) if k and overlap else 0
        h = x
        with torch.no_grad():
            for n in range(lo - o):
                h = seq[n][1](h)
        with FlopCounterMode(display=False) as fc:
            for n in range(lo - o, hi):
                h = seq[n][1](h)
            if k < len(bounds) - 2:
                h = AuxHead(info.out_shapes[hi - 1], classes, aux_hidden)(h)
            F.cross_entropy(h, y).backward()
        out.append(float(fc.get_total_flops()))
    return out


def _lr_lambda(total: int):
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / max(1, total)))


def train_variant(a, variant: str, K: int, seed: int, tr, te, norm: dict) -> dict:
    """Train one variant (``backprop`` or local ``greedy``/``overlap`` with K chunks) from
    seed ``seed``; return accuracy, compute and times. Local ranks are threads (ThreadComm)."""
    from resprune.data import DeviceLoader
    from resprune.parallel import LocalConfig, create_engine
    from resprune.parallel.comm import ThreadGroup
    from resprune.train import evaluate

    torch.manual_seed(seed)
    base = rp.create_model(a.model, num_classes=len(tr.classes))
    steps_ep = len(tr) // a.train_batch
    total = a.epochs * steps_ep

    def sgd(named):
        return torch.optim.SGD(named, lr=a.lr, momentum=0.9, nesterov=True, weight_decay=a.wd)

    def loader():  # one per rank, iterated every epoch: the same batches on every rank
        return DeviceLoader(tr, a.train_batch, train=True, augment=True, seed=seed, **norm)

    def train(eng) -> tuple[dict, list[float]]:  # a.epochs of the cosine schedule; state and losses
        sched = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, _lr_lambda(total))
        losses, batches = [], loader()
        for _ in range(a.epochs):
            for x, y in batches:
                losses.append(eng.step(x, y))
                sched.step()
        return eng.full_state_dict(), losses

    cpu0, t0 = time.process_time(), time.perf_counter()
    if variant == "backprop":
        torch.set_num_threads(a.serial_threads)
        sd, losses = train(create_engine("serial", base, F.cross_entropy, sgd))
        bounds = [0, len(base.layer_sequence())]
    else:
        torch.set_num_threads(1)
        group = ThreadGroup(K)
        cfg = LocalConfig(variant=variant, overlap=1, queue=a.queue,
                          input_size=(1, tr.images.shape[-1], *tr.images.shape[1:3]))
        engs = [create_engine("local", copy.deepcopy(base), F.cross_entropy, sgd, cfg, comm=group.comm(k))
                for k in range(K)]  # built here, one after the other: aux-head seeding is not thread-safe

        def work(k: int) -> tuple[dict, list[float]]:
            torch.set_num_threads(1)
            return train(engs[k])

        sd, losses = on_threads(K, work)[0]
        bounds = list(engs[0].bounds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    torch.set_num_threads(a.serial_threads)
    model = copy.deepcopy(base)
    model.load_state_dict(sd)
    test = DeviceLoader(te, 500, train=False, **norm)
    test_loss, test_acc = evaluate(model.eval(), test)
    tail = losses[-max(1, len(losses) // 10):]
    return {"variant": variant, "K": K, "seed": seed, "bounds": bounds, "steps": total, "test_acc": test_acc,
            "test_loss": test_loss, "train_loss_end": statistics.fmean(tail), "wall_s": wall, "cpu_s": cpu}


def _label(variant: str, K: int) -> str:
    return "backprop (serial)" if variant == "backprop" else f"{variant} K = {K}"


def local_accuracy_table(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """Aggregate runs over seeds: one row per (variant, K), accuracy mean / std / min / max,
    FLOPs per step (slowest rank and all ranks; ``flops_per_rank`` of each run) and training
    compute, relative to backprop. Returns (markdown table lines, rows)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["variant"], 1 if r["variant"] == "backprop" else int(r["K"])), []).append(r)
    order = sorted(groups, key=lambda g: (VARIANTS_B.index(g[0]) if g[0] in VARIANTS_B else 9, g[1]))
    rows = []
    for g in order:
        rs = groups[g]
        acc = [float(r["test_acc"]) for r in rs]
        fl = rs[0]["flops_per_rank"]
        steps = statistics.fmean(r["steps"] for r in rs)
        rows.append({"variant": g[0], "K": g[1], "label": _label(*g), "seeds": sorted(r["seed"] for r in rs),
                     "acc_mean": statistics.fmean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "acc_min": min(acc), "acc_max": max(acc), "flops_step_critical": max(fl),
                     "flops_step_total": sum(fl), "train_tflop_critical": max(fl) * steps / 1e12,
                     "train_tflop_total": sum(fl) * steps / 1e12, "steps": steps,
                     "wall_s_mean": statistics.fmean(float(r.get("wall_s", 0.0)) for r in rs),
                     "train_loss_end_mean": statistics.fmean(float(r.get("train_loss_end", float("nan"))) for r in rs)})
    ref = next((r for r in rows if r["variant"] == "backprop"), None)
    for r in rows:
        r["rel_critical"] = r["flops_step_critical"] / ref["flops_step_critical"] if ref else None
        r["rel_total"] = r["flops_step_total"] / ref["flops_step_total"] if ref else None
        r["acc_vs_backprop"] = r["acc_mean"] - ref["acc_mean"] if ref else None
    rel = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
    lines = ["| variant | seeds | test accuracy % (mean ± std) | min – max | vs backprop (points) | "
             "GFLOP/step, slowest rank | rel. | GFLOP/step, all ranks | rel. | training TFLOP (critical path) | "
             "final train loss | wall s (simulated, shared cores) |", "|---" * 12 + "|"]
    for r in rows:
        d = f"{r['acc_vs_backprop']:+.2f}" if r["acc_vs_backprop"] is not None else "–"
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | "
                     f"{r['acc_min']:.2f} – {r['acc_max']:.2f} | {d} | {r['flops_step_critical'] / 1e9:.2f} | "
                     f"{rel(r['rel_critical'])} | {r['flops_step_total'] / 1e9:.2f} | {rel(r['rel_total'])} | "
                     f"{r['train_tflop_critical']:.2f} | {r['train_loss_end_mean']:.3f} | {r['wall_s_mean']:.0f} |")
    return lines, rows


def plot_local_accuracy(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy vs training compute, one point per variant with the standard deviation over
    seeds as error bar; left: the slowest rank's FLOPs (critical path), right: all ranks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    marks = {"backprop": "s", "greedy": "o", "overlap": "^"}
    for i, (key, xl) in enumerate((("train_tflop_critical", "training compute, slowest rank (TFLOP, critical path)"),
                                   ("train_tflop_total", "training compute, all ranks (TFLOP)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in rows:
            ax.errorbar([r[key]], [r["acc_mean"]], yerr=[r["acc_std"]], fmt=marks.get(r["variant"], "o"), capsize=3,
                        label=r["label"])
            ax.annotate(r["label"], (r[key], r["acc_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "local parallelism vs backprop")
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, format="png")


LOCAL_ARGS = ("dataset", "data_dir", "model", "limit", "test_limit", "epochs", "train_batch", "lr", "wd", "ks", "seeds",
              "queue", "serial_threads")


def run_local_accuracy(a) -> int:
    """Part B: every (variant, K, seed) trained and evaluated (or the runs of ``--from-json``),
    the table, the plot."""
    t_start = time.perf_counter()
    if a.from_json:
        d = json.loads(Path(a.from_json).read_text())
        runs, facts, data = d["training_runs"], {k: d[k] for k in FACT_KEYS if k in d}, d["data"]
        for k, v in d["args"].items():
            setattr(a, k, v)
    else:
        from resprune.data import DeviceLoader, load_arrays

        _, facts = header("Local parallelism: accuracy vs compute (Part B)",
                          f"{len(a.seeds) * (1 + 2 * len(a.ks))} training runs: backprop and local greedy/overlap "
                          f"with K ∈ {a.ks}, seeds {a.seeds}")
        tr, te = load_arrays(a.dataset, a.data_dir)
        tr, te = subset(tr, a.limit, 0), subset(te, a.test_limit, 0)
        data = {"train_images": len(tr), "test_images": len(te), "source": str(a.data_dir or os.environ.get(
            "RESPRUNE_DATA", "?"))}
        probe = DeviceLoader(tr, a.train_batch, train=True, augment=True, seed=0)
        norm = dict(mean=tuple(probe.mean.flatten().tolist()), std=tuple(probe.std.flatten().tolist()))
        x, y = next(iter(probe))
        plan = [("backprop", 1)] + [(v, K) for v in ("greedy", "overlap") for K in a.ks]
        flops: dict[tuple[str, int], list[float]] = {}
        runs = []
        for seed in a.seeds:
            for variant, K in plan:
                r = train_variant(a, variant, K, seed, tr, te, norm)
                if (variant, K) not in flops:
                    torch.manual_seed(0)
                    flops[variant, K] = step_flops(rp.create_model(a.model, num_classes=len(tr.classes)), r["bounds"],
                                                   1 if variant == "overlap" else 0, x, y)
                r["flops_per_rank"] = flops[variant, K]
                runs.append(r)
                print(f"seed {seed} {_label(variant, K)}: {r['test_acc']:.2f}% in {r['wall_s']:.0f} s "
                      f"(CPU {r['cpu_s']:.0f} s, {r['steps']} steps)", file=sys.stderr)
        facts.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t_start)
    lines, rows = local_accuracy_table(runs)
    setup = [
        f"- Data: {a.dataset} ({data['source']}), {data['train_images']} training images (seeded subset, the same "
        f"for every run), {data['test_images']} test images; random crop (pad 4) + flip; normalised with the "
        "subset's channel statistics",
        f"- Model: `{a.model}` (ResConv blocks); SGD lr {a.lr}, momentum 0.9 (Nesterov), weight decay {a.wd}, "
        f"batch {a.train_batch}, {a.epochs} epochs ({rows[0]['steps']:.0f} steps), cosine schedule per step; "
        f"backprop with {a.serial_threads} torch thread(s), each local rank with one",
        f"- Local engine: `LocalConfig(variant, overlap=1, queue={a.queue})` (overlap: one entry of "
        "`layer_sequence()`, here a whole block), auxiliary heads pool + linear, chunks balanced by counted cost; "
        "K ranks simulated as threads of one process (`resprune.parallel.comm.ThreadComm`): the same arithmetic "
        "as K processes (messages are matched in step order), not the same wall time",
        "- Compute: FLOPs of one training step per rank counted by `torch.utils.flop_counter` on the rank's own "
        "computation (conv/linear/matmul, forward + backward; BatchNorm, ReLU and the optimizer not counted); "
        "slowest rank = the critical path of a run with one device per rank, all ranks = the total work; "
        "the wall times are of the simulation on shared cores, not a parallel speed"]
    per_run = ["| variant | seed | test acc % | final train loss | bounds | wall s | CPU s |", "|---" * 7 + "|"]
    for r in runs:
        per_run.append(f"| {_label(r['variant'], r['K'])} | {r['seed']} | {r['test_acc']:.2f} | "
                       f"{r['train_loss_end']:.3f} | {r['bounds']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    md = "\n".join([*header_lines(facts), *setup, "", "## Accuracy vs compute", "", *lines, "",
                    "Relative columns: against backprop. The plot (PNG beside this file) shows accuracy against "
                    "training compute on the critical path (left) and in total (right). Final train loss: mean of "
                    "the last tenth of the losses `step()` returned (local: the model's loss of (K − 1)·queue "
                    "steps before).", "",
                    "## Runs", "", *per_run, ""])
    print(md)
    if a.out:
        md_path, _ = write_report(a.out, md, {"part": "local-accuracy", **facts, "data": data, "training_runs": runs,
                                              "rows": rows, "args": {k: getattr(a, k) for k in LOCAL_ARGS}})
        plot_local_accuracy(rows, md_path.with_suffix(".png"), f"{a.model} on {data['train_images']} {a.dataset} "
                            f"images, {a.epochs} epochs, seeds {a.seeds}")
    return 0


# =============================================================================== CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["time", "local-accuracy"], default="time")
    ap.add_argument("--quick", action="store_true", help="dry run with tiny sizes (writes only with --out)")
    ap.add_argument("--out", default=None, help="markdown report (JSON beside it; Part B also PNG); default "
                    "benchmarks/results/engines_time.md or engines_local_accuracy.md, none with --quick")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun job (Part A)")
    ap.add_argument("--from-json", default=None, help="re-print the report of an earlier run's JSON (no measuring)")
    g = ap.add_argument_group("Part A (--part time)")
    g.add_argument("--depth", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--microbatches", type=int)
    g.add_argument("--cf", type=int)
    g.add_argument("--levels", type=int)
    g.add_argument("--procs", type=int, nargs="+")
    g.add_argument("--repeats", type=int)
    g.add_argument("--steps", type=int, help="consecutive steps per timed repeat")
    g.add_argument("--warmup", type=int)
    g.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    g = ap.add_argument_group("Part B (--part local-accuracy)")
    g.add_argument("--data-dir", default=None)
    g.add_argument("--dataset", default="cifar10")
    g.add_argument("--model")
    g.add_argument("--limit", type=int, help="training images (seeded subset)")
    g.add_argument("--test-limit", type=int, help="test images (0: all)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--train-batch", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--wd", type=float)
    g.add_argument("--ks", type=int, nargs="+")
    g.add_argument("--seeds", type=int, nargs="+")
    g.add_argument("--queue", type=int)
    g.add_argument("--serial-threads", type=int, default=1,
                   help="torch threads of the backprop runs (local ranks use one each); more than one only on an "
                   "idle machine: on a busy one OpenMP's spinning made 2 threads 5x slower than 1 in the dry runs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.from_json:  # the part the JSON holds
        a.part = json.loads(Path(a.from_json).read_text())["part"]
    if a.part == "time":
        defaults = QUICK_A if a.quick else DEFAULTS_A
    else:
        defaults = QUICK_B if a.quick else DEFAULTS_B
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.out is None and not a.quick and a.worker is None and a.from_json is None:
        a.out = str(RESULTS / ("engines_time.md" if a.part == "time" else "engines_local_accuracy.md"))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        time_worker(argparse.Namespace(**json.loads(a.worker)))
        return 0
    if a.part == "time":
        return run_time(a)
    return run_local_accuracy(a)


if __name__ == "__main__":
    sys.exit(main())
