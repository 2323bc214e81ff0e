"""ONNX export of fused models, with an onnxruntime equivalence check and a JSON sidecar.

:func:`export_onnx` writes one self-contained ``.onnx`` file (weights inside, no ``.data``
side file) and next to it ``<name>.json``: MACs, params, input shape, opset, op types, the
versions of torch/onnx/onnxruntime, the sha256 of the ONNX file and of the source checkpoint,
the result of the equivalence check and a *fingerprint* (the logits for a fixed numpy input)
that lets :func:`verify_onnx` re-check the function of the file without torch weights.

What the graph of a fused CIFAR ResNet holds (checked by ``tests/test_onnx.py``): ``Conv``
(each with its BN and its ResConv shortcut folded into the weights, DESIGN.md §3), ``Relu``,
``Add`` (the block shortcuts), ``ReduceMean`` (global average pooling), ``Reshape``
(flatten), ``Gemm``, and for each parameter-free option-A block shortcut (the two stage
transitions, or a transition block whose branch was pruned away) one ``MaxPool`` and one
``Pad``. The option-A shortcut ``x[:, :, ::2, ::2]`` plus zero channel padding is written on
the export copy as ``max_pool2d(x, kernel_size=1, stride=2)`` plus a constant ``Pad``: a 1×1
max pool with stride 2 picks exactly the pixels ``(2i, 2j)``, so it is bit-exact, one node
instead of the two ``Slice`` nodes the exporter writes for the strided slice, and costs no
MACs (a 1×1 Dirac conv would also be exact but adds C_in·C_out MACs per pixel).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export tracing, a few seconds per
model), saved as one file with ``external_data=False``; it writes the graph above, each
option-A channel pad as a single ``Pad`` node.

The check (:func:`export_onnx`, :func:`verify_onnx`) accepts a max absolute logit difference
up to ``atol + rtol·max|logit|`` (defaults :data:`DEFAULT_ATOL` = 1e-4 and
:data:`DEFAULT_RTOL` = 1e-6; fp32 rounding grows with the logits: randomly initialised BN
statistics give logits of ~100 and differences of ~1e-4) and a top-1 class that differs
only on samples whose top-2 margin is at most twice that tolerance.

Example:
    >>> import resprune as rp  # doctest: +SKIP
    >>> info = rp.export_onnx(rp.fuse(rp.create_model("resnet20")), "r20.onnx", (1, 3, 32, 32))
    >>> info["check"]["max_abs_diff"] <= 1e-4, sorted(info["op_types"])
    (True, ['Add', 'Conv', 'Gemm', 'MaxPool', 'Pad', 'ReduceMean', 'Relu', 'Reshape'])
    >>> rp.onnx.verify_onnx("r20.onnx")["functional"]  # sha256 + fingerprint from r20.json
    True
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ResPruneError
from .fuse import fuse
from .layers import ConvBN2d, OptionAShortcut, ResConv2d, option_a
from .profile import DEFAULT_INPUT_SIZE, profile
from .util import atomic_write, training_mode
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "OnnxVerificationError", "export_onnx", "verify_onnx", "sidecar_path", "sha256_file",
    "fingerprint_input", "DEFAULT_ATOL", "DEFAULT_RTOL",
]

SIDECAR_FORMAT = "resprune-onnx-sidecar"
SIDECAR_VERSION = 1
DEFAULT_ATOL = 1e-4  # max |onnxruntime − torch| on the logits (fp32) ≤ DEFAULT_ATOL + DEFAULT_RTOL·max|logit|
DEFAULT_RTOL = 1e-6
FINGERPRINT_SEED = 0
FINGERPRINT_BATCH = 2


class OnnxVerificationError(ResPruneError, RuntimeError):
    """An ONNX file that is unreadable, invalid, or does not compute what it should."""


# --------------------------------------------------------------------------- helpers


def sidecar_path(path: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.json``."""
    return Path(path).with_suffix(".json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_input(input_shape: tuple[int, ...], batch: int = FINGERPRINT_BATCH,
                      seed: int = FINGERPRINT_SEED) -> np.ndarray:
    """The fixed input whose logits the sidecar stores (numpy only, reproducible anywhere)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *input_shape[1:])).astype(np.float32)


class _OptionAExport(OptionAShortcut):
    """Option-A shortcut in export-friendly form: 1×1 strided max pool + constant channel pad
    (:func:`resprune.layers.option_a` with ``pool=True``), bit-exact with
    :class:`~resprune.layers.OptionAShortcut`. The graph gets one ``MaxPool`` and one ``Pad``
    node (a channel crop, never built by resprune's models, becomes a ``Slice``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return option_a(x, self.out_channels, self.stride, pool=True)


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter's passes log every step at INFO; keep them out of an INFO-level CLI log."""
    saved = {}
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        lg = logging.getLogger(name)
        saved[name] = lg.level
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _needs_fusion(model: nn.Module) -> bool:
    return any(isinstance(m, (ResConv2d, ConvBN2d, nn.modules.batchnorm._BatchNorm))
               for m in model.modules())


def _deploy_copy(model: nn.Module) -> nn.Module:
    """A fused, eval-mode, float32, CPU copy with export-friendly option-A shortcuts."""
    if _needs_fusion(model):
        logger.info("export_onnx: the model holds ResConv2d/ConvBN2d/BatchNorm; exporting a fused copy")
        deploy = fuse(model)
    else:
        deploy = copy.deepcopy(model)
    left = [n for n, m in deploy.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        logger.warning("export_onnx: BatchNorm not after a conv stays a BatchNormalization node: %s",
                       ", ".join(left))
    deploy = deploy.to(device="cpu", dtype=torch.float32).eval()
    if isinstance(deploy, OptionAShortcut):
        return _OptionAExport(deploy.in_channels, deploy.out_channels, deploy.stride)
    for name, m in list(deploy.named_modules()):
        if isinstance(m, OptionAShortcut):
            deploy.set_submodule(name, _OptionAExport(m.in_channels, m.out_channels, m.stride))
    return deploy


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    try:
        import onnxscript

        oscript = onnxscript.__version__
    except Exception:  # optional for reading, needed by the dynamo exporter
        oscript = None
    return {
        "resprune": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "onnxscript": oscript, "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxVerificationError(f"{path}: onnxruntime cannot load the model: {exc}") from exc


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _compare(ref: np.ndarray, got: np.ndarray, atol: float, what: str) -> tuple[float, int]:
    """max |got − ref| and how many top-1 disagreements count (see :func:`export_onnx`)."""
    if ref.shape != got.shape:
        raise OnnxVerificationError(f"{what}: output shape {got.shape} != expected {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise OnnxVerificationError(f"{what}: onnxruntime output holds NaN or inf")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    flips = 0
    if ref.ndim == 2 and ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * atol  # a flip under 2·atol is within tolerance
        flips = int(np.sum((ref.argmax(1) != got.argmax(1)) & decided))
    return diff, flips


def _check_against_torch(model: nn.Module, sess, input_shape: tuple[int, ...], batches: list[int],
                         atol: float, rtol: float, what: str) -> dict:
    g = torch.Generator().manual_seed(1234)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    worst, flips, n, scale = 0.0, 0, 0, 0.0
    with training_mode(model, False):
        for b in batches:
            x = torch.randn((b, *input_shape[1:]), generator=g)
            with torch.no_grad():
                ref = model(x.to(device=dev, dtype=dtype)).float().cpu().numpy()
            scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
            got = _run(sess, x.numpy())
            d, f = _compare(ref, got, atol + rtol * scale, what)
            worst, flips, n = max(worst, d), flips + f, n + b
    tol = atol + rtol * scale
    if worst > tol or flips:
        hint = (f" (relative to max |logit| {scale:.3g}: {worst / scale:.2g}; for large logits pass rtol=)"
                if scale > 0 else "")
        raise OnnxVerificationError(
            f"{what}: onnxruntime disagrees with the torch model on random inputs of batch sizes "
            f"{batches}: max |difference| {worst:.3g} (tolerance {tol:g}){hint}, top-1 disagreements "
            f"{flips}/{n}. The ONNX file does not compute this model; do not deploy it."
        )
    return {"batch_sizes": batches, "max_abs_diff": worst, "max_abs_logit": scale,
            "top1_disagreements": flips, "atol": atol, "rtol": rtol, "tolerance": tol}


# --------------------------------------------------------------------------- export


def _export_to(deploy: nn.Module, example: torch.Tensor, dynamic_batch: bool, opset: int | None,
               dst: Path) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``deploy`` traced on ``example``, one file at ``dst``."""
    kwargs: dict[str, Any] = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            deploy, (example,), None, dynamo=True, opset_version=opset, verbose=False,
            input_names=["input"], output_names=["logits"], **kwargs,
        )
    program.save(dst, external_data=False)


def _checked_export(file: Path, what: Path):
    """The exported graph at ``file``, after the full ``onnx.checker``."""
    import onnx

    proto = onnx.load(str(file))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise OnnxVerificationError(f"{what}: exported graph fails onnx.checker: {exc}") from exc
    return proto


def _fingerprint(sess, input_size: tuple[int, ...], dynamic_batch: bool, atol: float, rtol: float) -> dict:
    """The sidecar's fingerprint: onnxruntime's logits for :func:`fingerprint_input`, and the
    tolerance :func:`verify_onnx` allows on them."""
    batch = FINGERPRINT_BATCH if dynamic_batch else input_size[0]
    logits = _run(sess, fingerprint_input(input_size, batch))
    return {"seed": FINGERPRINT_SEED, "batch": batch, "atol": atol + rtol * float(np.abs(logits).max()),
            "logits": logits.tolist()}


def _sidecar(path: Path, file: Path, proto, deploy: nn.Module, input_size: tuple[int, ...], dynamic_batch: bool,
             check: dict | None, fingerprint: dict, source, metadata: dict | None) -> dict[str, Any]:
    """The sidecar of the ONNX file ``file`` (about to become ``path``)."""
    prof = profile(deploy, (1, *input_size[1:]))
    info: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "onnx_file": path.name,
        "onnx_sha256": sha256_file(file),
        "onnx_bytes": file.stat().st_size,
        "input_name": "input",
        "output_name": "logits",
        "input_shape": ["batch" if dynamic_batch else input_size[0], *input_size[1:]],
        "dynamic_batch": dynamic_batch,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "exporter": "torch.onnx.export(dynamo=True)",
        "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "macs_per_sample": prof.macs,
        "params": prof.params,
        "versions": _versions(),
        "source": None,
        "check": check,
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if source is not None:
        info["source"] = {"path": str(source), "sha256": sha256_file(source)}
    clash = set(metadata or {}) & set(info)
    if clash:
        raise ValueError(f"export_onnx: metadata key(s) {sorted(clash)} would overwrite the sidecar's own")
    info.update(metadata or {})
    return info


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE,
                dynamic_batch: bool = True, opset: int | None = None, *, verify: bool = True,
                source: str | os.PathLike | None = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                check_batches: tuple[int, int] = (1, 5), metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` to one self-contained ONNX file and check it with onnxruntime.

    A model that still holds ResConv2d, ConvBN2d or BatchNorm layers is fused first, on a
    copy (the caller's model is never modified; its train/eval mode is restored). The file is
    written to a temporary name and renamed to ``path`` only after the checks pass, so a file
    at ``path`` is always a verified one.

    Checks: ``onnx.checker`` (full), then onnxruntime (CPU) against the given model in eval
    mode on random normal inputs of two batch sizes (``check_batches``; with
    ``dynamic_batch=False`` two draws of the fixed batch), with the tolerance and top-1 rule
    of the module docstring; a failure is an :class:`OnnxVerificationError`.

    Args:
        model: the model to export (fused or not).
        path: the ``.onnx`` file to write; the sidecar goes to ``path`` with ``.json``.
        input_size: input shape including the batch (the batch is the export example's
            and, with ``dynamic_batch=False``, the fixed batch).
        dynamic_batch: make the batch dimension symbolic (``"batch"``).
        opset: ONNX opset (default: the exporter's, 20 with torch 2.14; at least 18).
        verify: run the onnxruntime check (``False`` only for experiments).
        source: checkpoint the model was loaded from; its sha256 goes into the sidecar.
        atol: absolute tolerance of the check on the logits.
        rtol: tolerance relative to the largest |logit| of the reference (added to ``atol``).
        check_batches: the two batch sizes of the check.
        metadata: plain data merged into the sidecar (the pipeline adds ``preprocess``,
            ``classes``, ``test_accuracy`` and ``dataset``, so that the ONNX file plus its
            sidecar suffice to classify a raw image: ``export/eval_onnx.py``).

    Returns:
        The sidecar contents (also written to ``<path>.json``).
    """
    path, input_size = Path(path), tuple(int(v) for v in input_size)
    deploy = _deploy_copy(model)
    example = torch.zeros((max(2, input_size[0]) if dynamic_batch else input_size[0], *input_size[1:]))
    with atomic_write(path) as tmp:
        _export_to(deploy, example, dynamic_batch, opset, tmp)
        proto = _checked_export(tmp, path)
        sess = _session(tmp)
        check = None
        if verify:
            batches = list(check_batches) if dynamic_batch else [input_size[0]] * 2
            check = _check_against_torch(model, sess, input_size, batches, atol, rtol, str(path))
        fingerprint = _fingerprint(sess, input_size, dynamic_batch, atol, rtol)
        info = _sidecar(path, tmp, proto, deploy, input_size, dynamic_batch, check, fingerprint, source, metadata)
    sidecar_path(path).write_text(json.dumps(info, indent=1) + "\n")
    logger.info("export_onnx: %s (%d bytes, opset %s, max |diff| %s)", path, info["onnx_bytes"],
                info["opset"], check and f"{check['max_abs_diff']:.2g}")
    return info


# --------------------------------------------------------------------------- verify


def _load_model_arg(model: nn.Module | str | os.PathLike) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from .serialization import load

    return load(model)


def _read_onnx(path: Path):
    """The ONNX graph at ``path`` after the full ``onnx.checker`` (verify steps 1)."""
    import onnx

    if not path.is_file():
        raise OnnxVerificationError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise OnnxVerificationError(f"{path}: not a readable ONNX model (truncated or corrupt?): {exc}") from exc
    if not proto.graph.node:
        raise OnnxVerificationError(f"{path}: not a readable ONNX model (empty graph; truncated or corrupt?)")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise OnnxVerificationError(f"{path}: invalid ONNX model (onnx.checker): {exc}") from exc
    return proto


def read_sidecar(path: Path, sha256: str) -> dict:
    """The sidecar of ``path``, checked to be resprune's and to record the file's ``sha256``."""
    side = sidecar_path(path)
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise OnnxVerificationError(f"{side}: sidecar is not valid JSON: {exc}") from exc
    if info.get("format") != SIDECAR_FORMAT:
        raise OnnxVerificationError(f"{side}: not a resprune ONNX sidecar (format {info.get('format')!r})")
    if info.get("onnx_sha256") != sha256:
        raise OnnxVerificationError(
            f"{path}: sha256 {sha256[:16]}… differs from the one recorded at export in "
            f"{side.name} ({str(info.get('onnx_sha256'))[:16]}…): the file was modified or replaced "
            "after export; re-export it (resprune export) instead of trusting it"
        )
    return info


def _check_fingerprint(path: Path, sess, info: dict, atol: float) -> dict:
    """onnxruntime reproduces the sidecar's fingerprint logits within its tolerance."""
    fp = info["fingerprint"]
    shape = [fp["batch"], *info["input_shape"][1:]]
    got = _run(sess, fingerprint_input(tuple(shape), fp["batch"], fp["seed"]))
    ref = np.asarray(fp["logits"], dtype=np.float32)
    tol = float(fp.get("atol", atol))
    diff, flips = _compare(ref, got, tol, str(path))
    if diff > tol or flips:
        raise OnnxVerificationError(
            f"{path}: onnxruntime output on the fingerprint input differs from the logits recorded "
            f"at export by {diff:.3g} (tolerance {tol:g}, top-1 disagreements {flips})"
        )
    return {"path": str(sidecar_path(path)), "fingerprint_max_abs_diff": diff}


def _check_model(path: Path, sess, model: nn.Module, info: dict | None, atol: float, rtol: float) -> dict:
    """onnxruntime agrees with ``model`` on random inputs (input shape from the sidecar, else the graph)."""
    inp = sess.get_inputs()[0]
    shape = tuple(info["input_shape"]) if info else None
    if shape is None:
        if any(not isinstance(d, int) for d in inp.shape[1:]):
            raise OnnxVerificationError(f"{path}: input shape {inp.shape} is not static; a sidecar is needed")
        shape = (1, *inp.shape[1:])
    batches = [1, 5] if not isinstance(inp.shape[0], int) else [inp.shape[0]] * 2
    return _check_against_torch(model, sess, (1, *shape[1:]), batches, atol, rtol, str(path))


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module | str | os.PathLike | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    use_sidecar: bool = True,
) -> dict[str, Any]:
    """Check that an ONNX file is intact and computes what it should; raise if not.

    Steps, each raising :class:`OnnxVerificationError` with the reason:

    1. the file parses as ONNX and passes ``onnx.checker`` (full check);
    2. onnxruntime can load it;
    3. with a sidecar (``<path>.json``, unless ``use_sidecar=False``): the file's sha256 is
       the one recorded at export, and onnxruntime reproduces the recorded fingerprint logits
       within the sidecar's ``atol``;
    4. with ``model`` (an nn.Module or a resprune checkpoint path): onnxruntime agrees with
       the model on random inputs of two batch sizes within ``atol + rtol·max|logit|``, as in
       :func:`export_onnx`.

    Without sidecar and model only steps 1–2 run; the result says ``"functional": False``.

    Returns:
        A dict with what was checked.
    """
    path = Path(path)
    _read_onnx(path)
    sess = _session(path)
    result: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "checker": True,
                              "sidecar": None, "model_check": None, "functional": False}
    info = None
    if use_sidecar and sidecar_path(path).is_file():
        info = read_sidecar(path, result["sha256"])
        result["sidecar"] = _check_fingerprint(path, sess, info, atol)
        result["functional"] = True
    if model is not None:
        result["model_check"] = _check_model(path, sess, _load_model_arg(model), info, atol, rtol)
        result["functional"] = True
    if not result["functional"]:
        logger.warning("verify_onnx: %s has no sidecar and no model was given; only its structure "
                       "was checked", path)
    return result
