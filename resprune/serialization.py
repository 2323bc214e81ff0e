"""``save`` / ``load``: one file with the architecture and the weights.

The architecture is the recipe that rebuilds the module tree: the registry factory and its
arguments, then the structural operations applied since (``convert``, ``remove`` with the
removed unit names, ``fuse``). Loading replays them on a fresh model and loads the weights
strictly, so a pruned or fused model reloads without the code or config that pruned it.
The file is a plain ``torch.save`` dict of tensors, strings and numbers that loads with
``torch.load(weights_only=True)``.

Example:
    >>> import os, tempfile, torch, resprune as rp
    >>> m = rp.fuse(rp.create_model("resnet20"))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> rp.save(m, path)
    >>> m2 = rp.load(path)
    >>> x = torch.rand(1, 3, 32, 32)
    >>> torch.equal(m(x), m2.eval()(x))
    True
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fuse import fuse_
from .models import convert_, create_model
from .prune import remove_units_
from .version import __version__

__all__ = [
    "save", "load", "load_payload", "model_payload", "model_from_payload", "atomic_save",
    "build_from_arch", "CheckpointError", "FORMAT", "torch_load_plain", "remove_stale_temp",
]

FORMAT = "resprune-model"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A file that is not a readable resprune checkpoint.

    The message is one line; torch's text about ``weights_only`` (which suggests loading the
    file with arbitrary code execution) is replaced by a short reason, wherever the message
    was made."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(_one_line(str(message)), *args)


_WEIGHTS_ONLY = re.compile(r"Weights only load failed.*", re.S)


def _one_line(msg: str) -> str:
    m = _WEIGHTS_ONLY.search(msg)
    if m:
        g = re.search(r"GLOBAL ([\w.]+)", m.group(0))
        why = (f"it refers to {g.group(1)}, and resprune loads only tensors and plain data"
               if g else "it holds objects other than tensors and plain data, which resprune does not load")
        msg = msg[: m.start()] + why
    for marker in (" This is an internal miniz error", " If you are seeing this error"):
        msg = msg.split(marker, 1)[0]  # torch's long advice after a zip/stream error
    return " ".join(msg.split())


def torch_load_plain(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that does not load raises
    :class:`CheckpointError` with a one-line reason (never torch's advice to drop
    ``weights_only``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a resprune checkpoint: {exc}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError,
            AttributeError, MemoryError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {exc}") from exc


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files in ``folder`` (written by :func:`atomic_save`,
    ``export_onnx``, ``RunDir.write_json``) whose process is gone, e.g. killed by SIGTERM
    mid-write; return what was removed. Files of live processes are left alone."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for f in folder.glob(".*.tmp-*"):
        pid = f.name.rsplit(".tmp-", 1)[1].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or not f.is_file():
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours
        return True
    return True


def build_from_arch(arch: dict) -> nn.Module:
    """Rebuild the module tree an architecture record describes (random weights)."""
    factory = arch.get("factory", "")
    src, _, name = factory.partition(":")
    if src != "resprune" or not name:
        raise CheckpointError(f"unknown architecture factory {factory!r}")
    model = create_model(name, **arch.get("kwargs", {}))
    for op in arch.get("ops", []):
        if op[0] == "convert":
            convert_(model)
        elif op[0] == "remove":
            remove_units_(model, list(op[1]))
        elif op[0] == "fuse":
            fuse_(model)
        else:
            raise CheckpointError(f"unknown architecture operation {op[0]!r}")
    return model


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (architecture + weights, plus optional ``extra`` plain data) to ``path``.

    The write is atomic: a temporary file next to ``path`` is renamed over it.
    """
    atomic_save(model_payload(model, extra), path)


def model_payload(model: nn.Module, extra: dict[str, Any] | None = None) -> dict:
    """The dict :func:`save` writes: format marker, architecture record, weights, extra."""
    arch = getattr(model, "resprune_arch", None)
    if arch is None:
        raise ValueError(
            "this model carries no architecture record; build it with resprune.create_model "
            "(torchvision nets: create_model('tv_resnet18') then convert_) so it can be saved"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resprune_version": __version__,
        "arch": copy.deepcopy(arch),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict, validated (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    payload = torch_load_plain(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a resprune model file (no '{FORMAT}' format marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer resprune (format {payload['format_version']}); upgrade resprune"
        )
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and return the model saved at ``path`` (in eval mode if it was fused)."""
    return model_from_payload(load_payload(path, map_location), path, map_location)


def model_from_payload(payload: dict, path: Any = "<payload>", map_location: Any = "cpu") -> nn.Module:
    """Rebuild a model from a :func:`model_payload` dict."""
    arch, sd = payload.get("arch"), payload.get("state_dict")
    if not isinstance(arch, dict) or not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor)
                                                                        for v in sd.values()):
        raise CheckpointError(f"{path}: the checkpoint lacks its architecture record or weights")
    try:
        model = build_from_arch(arch)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:  # a tampered or foreign record: bad kwargs, unknown names, bad ops
        raise CheckpointError(f"{path}: the architecture record does not describe a model resprune can "
                              f"build ({type(exc).__name__}: {exc})") from exc
    floats = [v.dtype for v in sd.values() if v.is_floating_point()]
    if floats:
        model.to(floats[0])
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    reshaped = sorted(k for k in set(want) & set(sd) if want[k].shape != sd[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                               (reshaped, "of another shape")) if v]
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: {', '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: {exc}") from exc
    return model.to(map_location)
