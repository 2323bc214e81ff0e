"""INT8 quantization of an exported fp32 ONNX model with ONNX Runtime's static quantizer.

:func:`quantize_onnx` turns a verified fp32 file of :func:`resprune.onnx.export_onnx` (its
sidecar beside it) into an INT8 model: ``onnxruntime.quantization.quant_pre_process``
(shape inference, graph optimisation), then ``quantize_static`` in QDQ format with
per-channel symmetric int8 weights and activations calibrated on *training* images put
through the sidecar's ``preprocess`` (the arithmetic of ``export/eval_onnx.py``, so the
calibration sees exactly what a deployed model sees). The calibration method (``minmax``,
``percentile``, ``entropy``) and the number of images are options; the defaults are the
measurement of ``benchmarks/int8.py calibration`` (benchmarks/results/int8_calibration.md).

The INT8 file is then checked against the fp32 one on held-out images (the test split,
never used for calibration): their top-1 predictions must agree on at least
``min_agreement`` of them (a threshold, not bit equality: INT8 rounds). It gets a sidecar
of its own (``pruned.int8.onnx`` → ``pruned.int8.json``) in the format of the fp32 one, so
:func:`resprune.onnx.verify_onnx` and ``export/eval_onnx.py`` read it unchanged, plus
``precision``, ``quantization`` (method, images, split, activation and weight types, nodes
kept in fp32) and ``source`` (the fp32 file's path, sha256 and accuracy).

Bad input is a :class:`QuantizeError` (one line, nothing written, the fp32 file untouched):
a missing fp32 file or sidecar, a file whose sha256 differs from its sidecar's, a sidecar
without ``preprocess`` (it cannot say how images become inputs), an opset below 13 (the
quantizer would rewrite the model to write per-channel QDQ) or above what the installed
onnx knows, no calibration images, images of another size than the model's input.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ResPruneError
from .util import atomic_write
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["QuantizeError", "quantize_onnx", "read_fp32", "check_images", "keep_nodes", "preprocess",
           "calibration_subset", "predict", "int8_path", "METHODS", "ACTIVATIONS", "DEFAULT_METHOD",
           "DEFAULT_IMAGES", "DEFAULT_ACTIVATIONS", "DEFAULT_MIN_AGREEMENT"]

METHODS = ("minmax", "percentile", "entropy")
ACTIVATIONS = ("int8", "uint8")
DEFAULT_METHOD = "minmax"  # measured: benchmarks/results/int8_calibration.md
DEFAULT_IMAGES = 500
DEFAULT_ACTIVATIONS = "uint8"  # U8S8: OpenVINO 2026.4 cannot compile the S8S8 QDQ graph (docs/export.md)
DEFAULT_MIN_AGREEMENT = 0.98  # top-1 agreement INT8 vs fp32 on held-out images
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute)
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 100  # images per calibration run; the histograms are merged batch by batch
FINGERPRINT_RTOL = 0.05  # of max|logit|: INT8 kernels of other CPUs (VNNI, AMX, AVX2) round differently
QUANTIZABLE = ("Conv", "Gemm", "MatMul")
PRECISION = "int8"


class QuantizeError(ResPruneError, ValueError):
    """An fp32 model or calibration set the quantizer cannot use, or an INT8 model that does
    not agree with its fp32 model (the message says which and why)."""


def int8_path(fp32: str | os.PathLike) -> Path:
    """``pruned.onnx`` → ``pruned.int8.onnx`` (its sidecar: ``pruned.int8.json``)."""
    p = Path(fp32)
    return p.with_name(f"{p.stem}.{PRECISION}.onnx")


def preprocess(images: np.ndarray, pre: dict) -> np.ndarray:
    """uint8 images (N, H, W, C) or (N, H, W) → the float32 network input of the sidecar's
    ``preprocess``, with the arithmetic of ``export/eval_onnx.py``."""
    x = images.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    x = (x * np.float32(pre["scale"]) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre["layout"] == "NCHW" else x)


def _opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def read_fp32(path: str | os.PathLike) -> dict:
    """The sidecar of the fp32 model at ``path``, after the checks of the module docstring."""
    import onnx

    from .onnx import OnnxVerificationError, read_sidecar, sha256_file, sidecar_path

    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise QuantizeError(f"{path}: no such ONNX file (run `resprune export` first)")
    if not side.is_file():
        raise QuantizeError(f"{path}: its sidecar {side.name} is missing, so the file cannot be checked against "
                            "what was exported; re-export it (resprune export)")
    try:  # resprune's sidecar, recording this file's sha256
        info = read_sidecar(path, sha256_file(path))
    except OnnxVerificationError as exc:
        raise QuantizeError(str(exc)) from exc
    if info.get("precision", "fp32") != "fp32":
        raise QuantizeError(f"{path}: already {info['precision']} (quantize the fp32 model it was made from)")
    if "preprocess" not in info:
        raise QuantizeError(f"{side}: no 'preprocess' field, so calibration images cannot be turned into inputs; "
                            "re-export the model with a current resprune")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise QuantizeError(f"{path}: not a readable ONNX model: {exc}") from exc
    opset, top = _opset(proto), onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= top:
        raise QuantizeError(f"{path}: opset {opset}: the INT8 quantizer takes opset {MIN_OPSET}..{top} (per-channel "
                            f"QDQ needs {MIN_OPSET}); re-export with `resprune export --opset {max(MIN_OPSET, 18)}`")
    return info


def check_images(images: np.ndarray, info: dict, what: str) -> None:
    """``images`` (uint8, N×H×W×C) are there and fit the model's input (C, H, W)."""
    if images is None or len(images) == 0:
        raise QuantizeError(f"no {what} images: the quantizer needs training images to calibrate with")
    c, h, w = (int(v) for v in info["input_shape"][1:])
    got = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    if tuple(got) != (h, w, c):
        raise QuantizeError(f"{what} images are {got[0]}x{got[1]} with {got[2]} channel(s), but the model takes "
                            f"{h}x{w} with {c}: not the data set it was trained on")


def calibration_subset(n: int, count: int, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """Indices of ``count`` training images (all ``n`` when fewer), a fixed random draw."""
    if count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


class _Reader:
    """onnxruntime's CalibrationDataReader over preprocessed batches, with the ``set_range``
    that lets the calibrator collect (and merge) one batch at a time."""

    def __init__(self, name: str, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self.batches = [{name: x[i:i + batch]} for i in range(0, len(x), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def keep_nodes(path: Path, keep: tuple[str, ...]) -> list[str]:
    """Node names of ``keep``: ``first`` / ``last`` (the first / last Conv, Gemm or MatMul in
    graph order) or node names of the graph at ``path``."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    compute = [n.name for n in nodes if n.op_type in QUANTIZABLE]
    names = {n.name for n in nodes}
    out = []
    for k in keep:
        name = {"first": compute[:1], "last": compute[-1:]}.get(k, [k] if k in names else None)
        if not name:
            more = ", ..." if len(compute) > 6 else ""
            raise QuantizeError(f"quantize.keep_fp32: {k!r} is neither first, last nor a node of the model "
                                f"(its Conv/Gemm/MatMul nodes: {', '.join(compute[:6])}{more})")
        out += [n for n in name if n not in out]
    return out


@contextlib.contextmanager
def _quiet():
    """The quantizer prints progress to stdout and logs through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantize(src: Path, dst: Path, x: np.ndarray, method: str, activations: str, keep: tuple[str, ...]) -> list[str]:
    """quant_pre_process + quantize_static (QDQ, per-channel int8 weights) of ``src`` → ``dst``
    calibrated on the inputs ``x``; returns the names of the nodes kept in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    cal = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}[method]
    act = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activations]
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="resprune-int8-") as td, _quiet():
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:
            raise QuantizeError(f"{src}: onnxruntime's quant_pre_process refuses the model: {exc}") from exc
        excluded = keep_nodes(pre, keep)
        try:
            quantize_static(str(pre), str(dst), _Reader(name, x), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8, calibrate_method=cal,
                            nodes_to_exclude=excluded, extra_options={"CalibStridedMinMax": 1})
        except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
            raise QuantizeError(f"{src}: onnxruntime's quantizer refuses the model: {exc}") from exc
    return excluded


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise QuantizeError(f"{path}: onnxruntime cannot load the model: {exc}") from exc


def predict(path: str | os.PathLike, x: np.ndarray, batch: int = 500, sess=None) -> np.ndarray:
    """The logits onnxruntime (CPU) computes for the inputs ``x``, ``batch`` at a time."""
    sess = sess or _session(Path(path))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _agreement(src: Path, dst: Path, x: np.ndarray, labels: np.ndarray | None, min_agreement: float,
               what: str) -> dict:
    """Top-1 agreement of the INT8 model with the fp32 one on the held-out inputs ``x`` (and
    both accuracies when ``labels`` are given); :class:`QuantizeError` below ``min_agreement``."""
    ref, got = predict(src, x).argmax(1), predict(dst, x).argmax(1)
    agree = float(np.mean(ref == got))
    res: dict[str, Any] = {"images": int(len(x)), "top1_agreement": agree, "min_agreement": min_agreement,
                           "disagreements": int(np.sum(ref != got))}
    if labels is not None:
        res["fp32_accuracy"] = round(100.0 * float(np.mean(ref == labels)), 2)
        res["int8_accuracy"] = round(100.0 * float(np.mean(got == labels)), 2)
    if agree < min_agreement:
        raise QuantizeError(f"{what}: INT8 and fp32 agree on the top-1 class of only {agree:.2%} of {len(x)} "
                            f"held-out images (at least {min_agreement:.2%} required); try another calibration "
                            "method, more images, or quantize.keep_fp32=[\"first\", \"last\"]")
    return res


def _fingerprint(path: Path, info: dict) -> dict:
    """The sidecar's fingerprint (:func:`resprune.onnx.fingerprint_input`), with a tolerance
    for INT8 kernels of other CPUs."""
    from .onnx import FINGERPRINT_BATCH, FINGERPRINT_SEED, fingerprint_input

    batch = FINGERPRINT_BATCH if info.get("dynamic_batch", True) else int(info["input_shape"][0])
    shape = (batch, *(int(v) for v in info["input_shape"][1:]))
    logits = predict(path, fingerprint_input(shape, batch))
    return {"seed": FINGERPRINT_SEED, "batch": batch, "atol": 1e-4 + FINGERPRINT_RTOL * float(np.abs(logits).max()),
            "logits": logits.tolist()}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"resprune": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


COPIED = ("format", "format_version", "input_name", "output_name", "input_shape", "dynamic_batch",
          "macs_per_sample", "params", "preprocess", "classes", "dataset")


def _sidecar(src: Path, dst: Path, file: Path, fp32: dict, quant: dict, check: dict) -> dict:
    """The INT8 sidecar: the fp32 one's description of input, output, MACs, preprocessing
    and classes, this file's hash, graph and check, and where it came from."""
    import onnx

    from .onnx import sha256_file

    proto = onnx.load(str(file))
    info: dict[str, Any] = {k: fp32[k] for k in COPIED if k in fp32}
    info.update({
        "onnx_file": dst.name, "onnx_sha256": sha256_file(file), "onnx_bytes": file.stat().st_size,
        "precision": PRECISION, "opset": _opset(proto),
        "exporter": "onnxruntime.quantization (quant_pre_process, quantize_static)",
        "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "quantization": quant, "versions": _versions(),
        "source": {"path": str(src), "sha256": fp32["onnx_sha256"], "onnx_bytes": fp32.get("onnx_bytes"),
                   "test_accuracy": fp32.get("test_accuracy")},
        "check": check, "fingerprint": _fingerprint(file, fp32),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    if check.get("int8_accuracy") is not None and check.get("split_images") == check["images"]:
        info["test_accuracy"] = check["int8_accuracy"]  # the whole test split: what eval_onnx.py reproduces
    return info


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike | None, calibration: np.ndarray,
                  held_out: np.ndarray, labels: np.ndarray | None = None, *, method: str = DEFAULT_METHOD,
                  activations: str = DEFAULT_ACTIVATIONS, keep_fp32: tuple[str, ...] = (),
                  min_agreement: float = DEFAULT_MIN_AGREEMENT, calibration_info: dict | None = None,
                  split_images: int | None = None, shown: str | None = None) -> dict[str, Any]:
    """Quantize the fp32 model ``src`` to INT8 at ``dst`` (default :func:`int8_path`), check it
    and write its sidecar; nothing is written when anything fails.

    Args:
        src: fp32 ONNX file with its sidecar (:func:`read_fp32`'s checks).
        dst: the INT8 file (its sidecar: ``dst`` with ``.json``).
        calibration: uint8 training images (N, H, W, C), preprocessed with the sidecar's
            ``preprocess``; all are used (pick them with :func:`calibration_subset`).
        held_out: uint8 images never used for calibration (the test split) for the check.
        labels: their labels (the check then records both accuracies).
        method: ``minmax``, ``percentile`` (99.999th) or ``entropy``.
        activations: ``int8`` (S8S8) or ``uint8`` (U8S8) activations; weights are int8.
        keep_fp32: nodes left in fp32: ``first``, ``last`` or node names.
        min_agreement: least top-1 agreement INT8 vs fp32 on ``held_out``.
        calibration_info: recorded in the sidecar's ``quantization.calibration`` (data set,
            split, how the images were drawn).
        split_images: size of the split ``held_out`` comes from; when it is all of it, the
            INT8 accuracy becomes the sidecar's ``test_accuracy``.
        shown: how error messages name ``dst`` (default: ``dst``).

    Returns:
        The INT8 sidecar (also written beside ``dst``).
    """
    from .onnx import sidecar_path

    if method not in METHODS or activations not in ACTIVATIONS:
        raise QuantizeError(f"method must be one of {', '.join(METHODS)} and activations one of "
                            f"{', '.join(ACTIVATIONS)}, got {method!r}, {activations!r}")
    src = Path(src)
    dst = Path(dst) if dst is not None else int8_path(src)
    fp32 = read_fp32(src)
    check_images(calibration, fp32, "calibration")
    check_images(held_out, fp32, "held-out")
    pre = fp32["preprocess"]
    quant = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
             "weights": "int8 (symmetric)", "activations": activations, "method": method,
             **({"percentile": 99.999} if method == "percentile" else {}),
             "calibration": {**(calibration_info or {}), "images": int(len(calibration))}}
    with atomic_write(dst) as tmp:
        quant["fp32_nodes"] = _quantize(src, tmp, preprocess(calibration, pre), method, activations, tuple(keep_fp32))
        check = _agreement(src, tmp, preprocess(held_out, pre), labels, min_agreement, shown or str(dst))
        check.update(split="held-out (never calibrated on)", split_images=split_images)
        info = _sidecar(src, dst, tmp, fp32, quant, check)
        with atomic_write(sidecar_path(dst)) as side:
            side.write_text(json.dumps(info, indent=1) + "\n")
    logger.info("quantize: %s → %s (%d → %d bytes, top-1 agreement %.2f%%)", src, dst, fp32.get("onnx_bytes", 0),
                info["onnx_bytes"], 100 * check["top1_agreement"])
    return info
