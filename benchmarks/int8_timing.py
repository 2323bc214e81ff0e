"""The timing half of ``benchmarks/int8.py models --timing`` (imported from it).

Per family (ResNet-56, ResNet-110) one interleaved measurement per batch size and thread
count of every case below, with the statistics of ``export/ort_bench.py`` (rounds alternate
the order of the cases, blocks of fresh sessions, medians, interquartile range, the 95%
bootstrap interval of each ratio to the reference widened by its noise floor):

- onnxruntime (CPU provider, graph optimisation ``all``, no spinning): fp32 unpruned (the
  reference of every ratio), fp32 pruned, INT8 pruned and unpruned (U8S8, the published
  files) and INT8 pruned with int8 activations (S8S8, onnxruntime's own default);
- OpenVINO (where installed; static batch, one stream, ``INFERENCE_NUM_THREADS``): the same
  fp32 files with ``INFERENCE_PRECISION_HINT`` f32 and bf16 (on this CPU bf16 runs on AMX;
  OpenVINO's default on AMX CPUs is bf16, so fp32 is asked for explicitly) and the same INT8
  files (their QDQ nodes become OpenVINO's own int8 kernels).

The cases of one runtime sit next to each other in the list, so a round switches runtime
once in its middle (never right before the reference): an idle OpenVINO worker thread that
still spins cannot slow the reference.

It also records which kernels run: the primitive type of every OpenVINO convolution (e.g.
``brgconv_avx512_amx_I8``), and whether onnxruntime asked Linux for the AMX tile state
(``arch_prctl(ARCH_GET_XCOMP_PERM)`` in a fresh process; its MLAS library does so when it
selects its AMX int8 GEMM), and a roofline probe of the CPU: theoretical peaks at the
nominal clock and measured fp32/bf16 GEMM rates and memory bandwidth.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "benchmarks" / "results" / "cifar10"
_spec = importlib.util.spec_from_file_location("ort_bench", ROOT / "export" / "ort_bench.py")
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)

OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# per core and cycle, Intel Sapphire Rapids-class core: 2 AVX-512 FMA ports; VNNI 2 × 64 int8
# MACs; one AMX unit: TDPBF16PS 16×16×32 and TDPBUSD 16×16×64 MACs per 16 cycles
PEAK_MAC_PER_CYCLE = {"fp32 AVX-512 FMA": 32, "int8 AVX-512 VNNI": 128, "bf16 AMX": 512, "int8 AMX": 1024}


# --------------------------------------------------------------------------- runners


class OVRunner:
    """An OpenVINO compiled model with onnxruntime's ``run(None, feed)`` interface."""

    def __init__(self, core, path: Path, batch: int, threads: int, precision: str) -> None:
        m = core.read_model(str(path))
        shape = m.inputs[0].get_partial_shape()
        m.reshape([batch, *(shape[i].get_length() for i in range(1, shape.rank.get_length()))])
        cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_PRECISION_HINT": OV_HINT[precision]}
        self.compiled = core.compile_model(m, "CPU", cfg)
        self.req = self.compiled.create_infer_request()

    def run(self, _names, feed: dict):
        self.req.infer(list(feed.values()))

    def kernels(self) -> dict[str, int]:
        c: Counter = Counter()
        for op in self.compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
            if kind in ("Convolution", "FullyConnected", "MatMul"):
                c[f"{kind}: {rt['primitiveType'].astype(str)}"] += 1
        return dict(c)


def make_runner(case: dict, batch: int, threads: int, ov_core=None):
    if case["runtime"] == "openvino":
        return OVRunner(ov_core, case["path"], batch, threads, case["precision"])
    return ob.make_session(str(case["path"]), threads, ["CPUExecutionProvider"], "all")


def ov_core():
    try:
        import openvino as ov
    except ImportError:
        return None, None
    return ov.Core(), ov.get_version()


# --------------------------------------------------------------------------- timing


def time_cases(cases: list[dict], batch: int, threads: int, args, core) -> list[dict]:
    """One interleaved measurement of ``cases`` (the first is the reference of the ratios)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sizes = np.diff(np.linspace(0, args.runs, min(args.blocks, args.runs) + 1).astype(int))
    blocks = []
    for k, n in enumerate(sizes):
        order = [(k + j) % len(cases) for j in range(len(cases))]  # who is created first rotates
        made = {i: make_runner(cases[i], batch, threads, core) for i in order}
        runners = [made[i] for i in range(len(cases))]
        blocks.append(ob.time_interleaved(runners, [{"input": x}] * len(cases), int(n), args.warmup))
        if k == 0:
            for c, r in zip(cases, runners):
                if isinstance(r, OVRunner):
                    c.setdefault("kernels", r.kernels())
        del runners, made
    rows = []
    for i, c in enumerate(cases):
        t = [v for blk in blocks for v in blk[i]]
        ref = [v for blk in blocks for v in blk[0]]
        ci = ob.ratio_interval([b[0] for b in blocks], [b[i] for b in blocks]) if i else None
        rows.append({"case": c["label"], "runtime": c["runtime"], "precision": c["precision"], "model": c["model"],
                     "batch": batch, "threads": threads, **ob.stats(batch, t),
                     "ratio": float(np.median(t) / np.median(ref)), "ratio_interval": ci})
    return rows


def family_cases(name: str, files: dict[str, Path], runtimes: list[str], core) -> list[dict]:
    """The cases of one family; ``files``: fp32_unpruned, fp32_pruned, int8_unpruned, int8_pruned, s8_pruned."""
    ort = [("fp32", "unpruned", "fp32_unpruned"), ("fp32", "pruned", "fp32_pruned"),
           ("int8", "pruned", "int8_pruned"), ("int8", "unpruned", "int8_unpruned"),
           ("int8 S8S8", "pruned", "s8_pruned")]
    ov = [("fp32", "unpruned", "fp32_unpruned"), ("fp32", "pruned", "fp32_pruned"),
          ("bf16", "unpruned", "fp32_unpruned"), ("bf16", "pruned", "fp32_pruned"),
          ("int8", "pruned", "int8_pruned"), ("int8", "unpruned", "int8_unpruned")]
    cases = [{"label": f"ORT {p} {m}", "runtime": "onnxruntime", "precision": p, "model": m, "path": files[f]}
             for p, m, f in ort if "onnxruntime" in runtimes]
    if "openvino" in runtimes and core is not None:
        cases += [{"label": f"OV {p} {m}", "runtime": "openvino", "precision": p, "model": m, "path": files[f]}
                  for p, m, f in ov]
    return cases


# --------------------------------------------------------------------------- models


def r110_unpruned(work: Path, side_from: Path) -> Path:
    """The unpruned ResNet-110 architecture (fused, fp32) with random weights and the
    published pruned model's preprocessing: latency only (no trained baseline ONNX exists)."""
    import torch

    import resprune as rp

    torch.manual_seed(0)
    m = rp.create_model("resnet110", num_classes=10).eval()
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_var.uniform_(0.5, 2.0)
    side = json.loads(side_from.read_text())
    meta = {k: side[k] for k in ("preprocess", "classes", "dataset")}
    out = work / "resnet110_unpruned_random" / "pruned.onnx"
    rp.export_onnx(rp.fuse(m), out, (1, 3, 32, 32), metadata=meta, rtol=1e-5)
    return out


def family_files(args, data, paths: dict[str, Path], work: Path, quantize) -> dict[str, dict[str, Path]]:
    out = {}
    for fam, (base, pruned) in (("resnet56", ("resnet56_cpu_baseline", "resnet56_cpu")),
                                ("resnet110", (None, "resnet110_cpu"))):
        src = CIFAR / pruned / "pruned.onnx"
        f = {"fp32_pruned": src, "int8_pruned": paths[pruned], "s8_pruned": work / f"{fam}_s8" / "pruned.int8.onnx"}
        quantize(src, f["s8_pruned"], data, method=args.method, images=args.images, activations="int8",
                 check=args.check_images)
        if base:
            f |= {"fp32_unpruned": CIFAR / base / "pruned.onnx", "int8_unpruned": paths[base]}
        else:
            f["fp32_unpruned"] = r110_unpruned(work, src.with_suffix(".json"))
            f["int8_unpruned"] = f["fp32_unpruned"].with_name("pruned.int8.onnx")
            quantize(f["fp32_unpruned"], f["int8_unpruned"], data, method=args.method, images=args.images,
                     min_agreement=0.0, check=args.check_images)  # random weights: agreement says nothing
        out[fam] = f
    return out


# --------------------------------------------------------------------------- AMX and roofline

_AMX_PROBE = r"""
import ctypes, json, sys
def perm():
    v = ctypes.c_uint64(0)
    ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(v))  # arch_prctl(ARCH_GET_XCOMP_PERM)
    return bool(v.value >> 18 & 1)  # XFEATURE_XTILEDATA
out = {"before_import": perm()}
import numpy as np, onnxruntime as ort
out["after_import"] = perm()
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {s.get_inputs()[0].name: np.zeros((64, 3, 32, 32), np.float32)})
out["after_int8_run"] = perm()
print(json.dumps(out))
"""


def ort_amx(int8_model: Path) -> dict:
    """Whether onnxruntime asked for the AMX tile state (a fresh process, nothing else imported)."""
    r = subprocess.run([sys.executable, "-c", _AMX_PROBE, str(int8_model)], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}


def roofline(threads: list[int]) -> dict:
    """Theoretical peaks (nominal clock from /proc/cpuinfo) and measured GEMM rates and copy bandwidth."""
    import torch

    mhz = next((float(ln.split(":")[1]) for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("cpu MHz")), float("nan"))
    out = {"clock_ghz": mhz / 1e3, "measured": {},
           "theoretical_gmac_s_per_core": {k: v * mhz / 1e3 for k, v in PEAK_MAC_PER_CYCLE.items()}}
    a = torch.randn(2048, 2048)
    for t in threads:
        torch.set_num_threads(t)
        for dt in (torch.float32, torch.bfloat16):
            x = a.to(dt)
            torch.mm(x, x)
            t0, n = time.perf_counter(), 5
            for _ in range(n):
                torch.mm(x, x)
            out["measured"][f"{str(dt).split('.')[1]} GEMM 2048³, {t} thread(s), GMAC/s"] = (
                n * 2048 ** 3 / (time.perf_counter() - t0) / 1e9)
    src = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, far beyond the caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    gbs = 5 * 2 * src.nbytes / (time.perf_counter() - t0) / 1e9
    out["measured"]["memory copy, 1 thread, GB/s (read + write)"] = gbs
    return out


# --------------------------------------------------------------------------- report


def _cell(r: dict | None, what: str) -> str:
    if r is None:
        return "–"
    if what == "ms":
        return f"{r['median_ms']:.3f} ({r['q25_ms']:.3f}–{r['q75_ms']:.3f})"
    ci = r.get("ratio_interval")
    return f"{r['ratio']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def family_tables(fam: str, rows: list[dict], files: dict[str, Path]) -> list[str]:
    """Latency (median, IQR) and ratio to onnxruntime fp32 unpruned, per batch and threads."""
    keys = sorted({(r["batch"], r["threads"]) for r in rows})
    by = {(r["case"], r["batch"], r["threads"]): r for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    head = " | ".join(f"b{b} t{t}" for b, t in keys)
    out = []
    for what, title in (("ms", "latency, ms: median (interquartile range)"),
                        ("ratio", "ratio to ORT fp32 unpruned at the same batch and threads (95% noise interval)")):
        out += ["", f"**{fam}**, {title}:", "", f"| case | {head} |", "|---|" + "---:|" * len(keys)]
        out += [f"| {c} | " + " | ".join(_cell(by.get((c, b, t)), what) for b, t in keys) + " |" for c in cases]
    return out


def _med(rows, fam, case, b, t):
    r = next((r for r in rows if r["family"] == fam and r["case"] == case and r["batch"] == b and r["threads"] == t),
             None)
    return r and r["median_ms"]


def compounding(rows: list[dict]) -> list[str]:
    """Within each runtime: pruning alone × INT8 alone against both, relative to its fp32 unpruned."""
    out = ["", "Compounding (within each runtime, relative to its own fp32 unpruned model): pruning alone × "
           "INT8 alone against pruning + INT8 measured:", "",
           "| family | runtime | batch | threads | pruning alone | INT8 alone | product | both, measured |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for fam, b, t in sorted({(r["family"], r["batch"], r["threads"]) for r in rows}):
        for rt in ("ORT", "OV"):
            ref = _med(rows, fam, f"{rt} fp32 unpruned", b, t)
            p, q = _med(rows, fam, f"{rt} fp32 pruned", b, t), _med(rows, fam, f"{rt} int8 unpruned", b, t)
            both = _med(rows, fam, f"{rt} int8 pruned", b, t)
            if None in (ref, p, q, both):
                continue
            out.append(f"| {fam} | {rt} | {b} | {t} | {p / ref:.3f} | {q / ref:.3f} | {p * q / ref ** 2:.3f} | "
                       f"{both / ref:.3f} |")
    return out


def goals(rows: list[dict], acc: list[dict]) -> list[str]:
    """The issue's goals: pruned + INT8 ≤ 0.12× (onnxruntime) and ≤ 0.10× (the faster runtime)
    of the unpruned fp32 model in onnxruntime, at batch 1 and 64; ≤ 0.3 pt below pruned fp32."""
    out = ["", "Goals (ratio to ORT fp32 unpruned; the faster runtime is the faster pruned INT8 of ORT and OV):", "",
           "| family | batch | threads | ORT INT8 pruned (≤ 0.12) | faster runtime (≤ 0.10) |",
           "|---|---:|---:|---|---|"]
    for fam, b, t in sorted({(r["family"], r["batch"], r["threads"]) for r in rows}):
        ref = _med(rows, fam, "ORT fp32 unpruned", b, t)
        ort = _med(rows, fam, "ORT int8 pruned", b, t)
        best = min(x for x in (ort, _med(rows, fam, "OV int8 pruned", b, t)) if x is not None)
        out.append(f"| {fam} | {b} | {t} | {ort / ref:.3f} {'met' if ort / ref <= 0.12 else 'missed'} | "
                   f"{best / ref:.3f} ({'OV' if best != ort else 'ORT'}) {'met' if best / ref <= 0.10 else 'missed'} |")
    out += [f"Accuracy: `{r['folder']}` {r['fp32_acc']:.2f}% → {r['int8_acc']:.2f}% ({r['delta_pt']:+.2f} pt; goal "
            f"≥ −0.3: {'met' if r['delta_pt'] >= -0.3 else 'missed'})  " for r in acc if "cpu" in r["folder"]]
    return out


def roofline_lines(roof: dict, rows: list[dict], macs: dict[str, dict[str, int]]) -> list[str]:
    ghz = roof["clock_ghz"]
    out = ["", f"Roofline of this CPU (nominal {ghz:.2f} GHz, per core; the VM does not report turbo): "
           + ", ".join(f"{k} {v:.0f} GMAC/s" for k, v in roof["theoretical_gmac_s_per_core"].items())
           + ". Measured: " + ", ".join(f"{k}: {v:.1f}" for k, v in roof["measured"].items()) + ".", "",
           "| family | case | batch | threads | GMAC/s achieved | lower bound at the int8 VNNI / AMX peak (ms) |",
           "|---|---|---:|---:|---:|---|"]
    peak = roof["theoretical_gmac_s_per_core"]
    for r in rows:
        if r["case"] not in ("ORT int8 pruned", "OV int8 pruned"):
            continue
        work = macs[r["family"]][r["model"]] * r["batch"]
        lb = [work / (peak[k] * r["threads"] * 1e9) * 1e3 for k in ("int8 AVX-512 VNNI", "int8 AMX")]
        out.append(f"| {r['family']} | {r['case']} | {r['batch']} | {r['threads']} | "
                   f"{work / r['median_ms'] / 1e6:.1f} | {lb[0]:.3f} / {lb[1]:.4f} |")
    return out


def timing_section(args, data, paths: dict[str, Path], work: Path, quantize) -> tuple[list[str], dict]:
    """Build the extra models, time every family, probe kernels and the roofline."""
    core, ov_version = ov_core() if "openvino" in args.runtimes else (None, None)
    files = family_files(args, data, paths, work, quantize)
    amx = ort_amx(files["resnet56"]["int8_pruned"])
    rows, kernels, t0 = [], {}, time.perf_counter()
    for fam, f in files.items():
        cases = family_cases(fam, f, args.runtimes, core)
        for t in args.threads:
            for b in args.batch:
                rows += [{"family": fam, **r} for r in time_cases(cases, b, t, args, core)]
        kernels[fam] = {c["label"]: c["kernels"] for c in cases if c.get("kernels")}
    wall = time.perf_counter() - t0
    roof = roofline(args.threads)
    macs = {fam: {m: json.loads(f[f"fp32_{m}"].with_suffix(".json").read_text())["macs_per_sample"]
                  for m in ("unpruned", "pruned")} for fam, f in files.items()}
    lines = ["## Latency", "", f"onnxruntime {ob.ort.__version__}, OpenVINO {ov_version or 'not installed'}; "
             f"{args.runs} interleaved rounds per batch and thread count in {args.blocks} blocks of fresh sessions "
             f"({args.warmup} warm-up rounds each); timing {wall:.0f} s. The ResNet-110 unpruned rows are the "
             "architecture with random weights (no trained baseline ONNX is published)."]
    for fam in files:
        lines += family_tables(fam, [r for r in rows if r["family"] == fam], files[fam])
    lines += compounding(rows) + goals(rows, args.accuracy_rows) + roofline_lines(roof, rows, macs)
    lines += ["", f"AMX: onnxruntime asked for the AMX tile state: {amx} (MLAS uses AMX only in its U8S8/U8U8 GEMM; "
              "convolutions with symmetric int8 weights run its AVX-512 VNNI kernels). OpenVINO kernels:", "",
              "```", json.dumps(kernels, indent=1), "```"]
    return lines, {"rows": rows, "kernels": kernels, "ort_amx": amx, "roofline": roof, "macs": macs,
                   "files": {f: {k: str(v) for k, v in d.items()} for f, d in files.items()},
                   "openvino": ov_version, "timing_wall_s": wall}
