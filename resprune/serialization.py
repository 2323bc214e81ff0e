"""``save`` / ``load``: one file with the architecture and the weights; ``save_program`` /
``load_program``: a ``torch.export`` program that reloads without any Python class.

The architecture is the recipe that rebuilds the module tree: the registry factory and its
arguments, then the structural operations applied since (``convert``, ``remove`` with the
removed unit names, ``fuse``), kept as ``model.resprune_arch``
(:class:`~resprune.models.arch.ArchRecord`). Saving checks the record against the module
and refuses a module changed by hand since its last recorded operation; loading replays the
operations on a fresh model and loads the weights strictly, so a pruned or fused model
reloads without the code or config that pruned it.
The file is a plain ``torch.save`` dict of tensors, strings and numbers that loads with
``torch.load(weights_only=True)``. A model of your own (not from the registry: factory
``"user"``, recorded from :func:`resprune.convert_` on) reloads the same way onto a fresh
instance you pass: ``load(path, model=YourNet())``.

A program file (``.pt2``, :func:`torch.export.save`) holds the traced graph and the weights:
it runs without the model's class, but it is a graph, not the module (no further pruning,
fusion or ordinary fine-tuning), and torch's loader runs Python text from the file (shape
guards, symbolic expressions) and may unpickle; :func:`load_program` therefore checks the
archive against what :func:`save_program` writes first (docs/own-model.md).

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

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ResPruneError
from .fuse import fuse_
from .models import convert_, create_model
from .models.arch import ArchRecord
from .profile import DEFAULT_INPUT_SIZE
from .prune import remove_units_
from .util import atomic_write, training_mode
from .version import __version__

__all__ = [
    "save", "load", "load_payload", "model_payload", "model_from_payload", "atomic_save",
    "build_from_arch", "CheckpointError", "FORMAT", "torch_load_plain", "remove_stale_temp",
    "save_program", "load_program", "check_program", "save_weights", "read_weights", "load_weights_",
]

FORMAT = "resprune-model"
FORMAT_VERSION = 1


class CheckpointError(ResPruneError, RuntimeError):
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


def build_from_arch(arch: dict, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the module tree an architecture record (the dict of
    :meth:`~resprune.models.arch.ArchRecord.to_dict`) describes, with random weights: the
    registry factory's model, or ``model`` (a fresh instance of the user's class, as it was
    before :func:`resprune.convert_`), then the recorded operations replayed on it."""
    try:
        rec = ArchRecord.from_dict(arch)
    except ValueError as exc:
        raise CheckpointError(f"the architecture record does not describe a model resprune can build: {exc}") from exc
    if model is not None:
        ArchRecord.attach(model, rec.factory, rec.kwargs, rec.user_class)  # the replay records the ops again
    elif rec.factory == "user":
        raise CheckpointError(
            f"it holds a model of your own ({rec.user_class or 'class not recorded'}), which resprune does "
            "not build: pass a fresh instance, resprune.load(path, model=YourNet(...)) (docs/own-model.md)")
    else:
        src, _, name = rec.factory.partition(":")
        if src != "resprune" or not name:
            raise CheckpointError(f"unknown architecture factory {rec.factory!r}")
        model = create_model(name, **rec.kwargs)
    for op in rec.ops:
        if op[0] == "convert":
            convert_(model)
        elif op[0] == "remove":
            remove_units_(model, list(op[1]))
        else:  # "fuse" (from_dict admits no other)
            fuse_(model)
    return model


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (architecture + weights, plus optional ``extra`` plain data) to ``path``.

    The write is atomic: a temporary file next to ``path`` is renamed over it. A model changed
    by hand since its last recorded operation is refused (:class:`CheckpointError`, see
    :func:`model_payload`).
    """
    atomic_save(model_payload(model, extra), path)


def model_payload(model: nn.Module, extra: dict[str, Any] | None = None) -> dict:
    """The dict :func:`save` writes: format marker, architecture record, weights, extra.

    The record is checked against ``model`` first (:meth:`~resprune.models.arch.ArchRecord.problem`):
    a module changed by hand (a layer replaced, added or deleted outside ``convert_``,
    ``prune_`` and ``fuse_``) is a :class:`CheckpointError` naming the first difference, since
    :func:`load` could not rebuild it.
    """
    record = ArchRecord.of(model)
    if record is None:
        raise ValueError(
            "this model carries no architecture record: resprune neither built nor converted it. Build it "
            "with resprune.create_model, or call resprune.convert_ on it before pruning and fusing "
            "(then resprune.load(path, model=YourNet()) reloads it); save_program needs no record"
        )
    problem = record.problem(model)
    if problem is not None:
        raise CheckpointError(
            f"cannot save {type(model).__name__}: {problem}, so resprune.load could not rebuild it; change "
            "structure with convert_, prune_ or fuse_ only, or save the weights alone (torch.save(model.state_dict()))")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resprune_version": __version__,
        "arch": record.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``
    (:func:`resprune.util.atomic_write`: on an error the temporary file is removed)."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


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


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         model: nn.Module | None = None) -> nn.Module:
    """Rebuild and return the model saved at ``path`` (in eval mode if it was fused).

    ``model``: a fresh instance of the saved model's class, needed for a model of your own
    (factory ``"user"``): the recorded conversion, pruning and fusion are replayed on it and
    the weights loaded strictly. It is changed in place and returned.
    """
    return model_from_payload(load_payload(path, map_location), path, map_location, model)


def model_from_payload(payload: dict, path: Any = "<payload>", map_location: Any = "cpu",
                       model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model from a :func:`model_payload` dict (onto ``model``, see :func:`load`)."""
    arch, sd = payload.get("arch"), payload.get("state_dict")
    if not isinstance(arch, dict) or not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor)
                                                                        for v in sd.values()):
        raise CheckpointError(f"{path}: the checkpoint lacks its architecture record or weights")
    given = model is not None
    try:
        model = build_from_arch(arch, model)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:  # a tampered or foreign record: bad kwargs, unknown names, bad ops
        what = ("the recorded operations do not apply to the model passed (another class, or not a fresh "
                "instance?)" if given else "the architecture record does not describe a model resprune can build")
        raise CheckpointError(f"{path}: {what} ({type(exc).__name__}: {exc})") from exc
    floats = [v.dtype for v in sd.values() if v.is_floating_point()]
    if floats:
        model.to(floats[0])
    _load_strict(model, sd, f"{path}: weights do not match the recorded architecture")
    return model.to(map_location)


def _load_strict(model: nn.Module, sd: dict, what: str) -> None:
    """``model.load_state_dict(sd, strict=True)``, or a :class:`CheckpointError` that starts
    with ``what`` and counts the missing, unexpected and reshaped entries, naming one of each."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    reshaped = sorted(k for k in set(want) & set(sd) if want[k].shape != sd[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(v)} {kind} (e.g. {v[0]})" for v, kind in ((missing, "missing"), (unexpected, "unexpected"))
                 if v]
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {list(sd[k].shape)} in the file, "
                         f"{list(want[k].shape)} in the model)")
        raise CheckpointError(f"{what}: {', '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what}: {exc}") from exc


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as a ``.safetensors`` file (tensors only: no code, no pickle),
    written atomically; ``metadata``: strings stored in its header (e.g. accuracy, recipe)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file, a resprune checkpoint (its weights),
    a plain state dict saved with ``torch.save`` (read with ``weights_only``), or a run
    directory (its ``sparse.pt``: the trained, unpruned model)."""
    p = Path(path)
    if p.is_dir():
        p = p / "sparse.pt"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: not a readable safetensors file: {exc}") from exc
    obj = torch_load_plain(p)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj.get("state_dict")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: holds no state dict (a dict of tensors)")
    return obj


def load_weights_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` (see :func:`read_weights`) into ``model``, strictly: a file
    for another architecture or another number of classes is a :class:`CheckpointError` that
    names what differs. Returns ``model``."""
    sd = read_weights(path)
    _load_strict(model, sd, f"{path}: weights do not fit {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------- programs
PROGRAM_MAX_BATCH = 1 << 16

# what save_program writes (torch's .pt2 archive: JSON graph and configs, raw weight bytes)
_PROGRAM_FILE = re.compile(r"[^/]+/(?:\.data/(?:version|serialization_id)|archive_format|archive_version|byteorder"
                           r"|models/\w+\.json|data/(?:weights|constants)/(?:weight_\d+|tensor_\d+|\w+_config\.json))")
_PROGRAM_INPUTS = re.compile(r"[^/]+/data/sample_inputs/\w+\.pt")  # allowed empty: example input not stored
_PROGRAM_OP = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem")
_PROGRAM_EXPR = re.compile(r"Symbol\('s\d+', positive=True, integer=True\)|(?!.*\*\*)[s\d+*() -]{1,64}")


def save_program(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE,
                 dynamic_batch: bool = True) -> None:
    """Trace the eval-mode ``model`` with :func:`torch.export.export` and write the program
    to ``path`` (a ``.pt2`` archive, atomically), to be run by :func:`load_program` without
    the model's class. ``dynamic_batch``: the program takes any batch size from 1 to
    65,536 (else only ``input_size[0]``). The example input is not stored, so nothing in the
    file is pickled. The model's train/eval mode is restored."""
    p = next(model.parameters(), None)
    like = p if p is not None and p.is_floating_point() else torch.zeros(())
    shape = (max(2, input_size[0]), *input_size[1:]) if dynamic_batch else tuple(input_size)  # 1 would specialise
    x = torch.randn(*shape, device=like.device, dtype=like.dtype)
    dyn = ({0: torch.export.Dim("batch", min=1, max=PROGRAM_MAX_BATCH)},) if dynamic_batch else None
    with training_mode(model, False):
        ep = torch.export.export(model, (x,), dynamic_shapes=dyn)
    ep.example_inputs = None
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(ep, f)


def check_program(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless the ``.pt2`` file at ``path`` holds only what
    :func:`save_program` writes: no pickled tensors or objects, no compiled code, no shape
    guards (Python source that torch runs), symbolic shapes only as plain batch symbols,
    graph nodes only ATen operators. torch's loader trusts its file (it may unpickle, and it
    evaluates expressions and guards from it); this whitelist keeps it to files of the kind
    save_program writes (docs/own-model.md)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            odd = [i.filename for i in z.infolist() if not _PROGRAM_FILE.fullmatch(i.filename)
                   and not (_PROGRAM_INPUTS.fullmatch(i.filename) and i.file_size == 0)]
            if odd or not any(n.endswith("/archive_format") for n in names):
                raise CheckpointError(f"{path}: not a program file written by resprune.save_program "
                                      f"({'unexpected member ' + repr(odd[0]) if odd else 'no pt2 archive marker'})")
            for n in names:
                if n.endswith(".json"):
                    _check_program_json(path, json.loads(z.read(n)))
    except (OSError, zipfile.BadZipFile, ValueError, RecursionError) as exc:  # ValueError: bad JSON
        raise CheckpointError(f"{path}: not a readable program file: {exc}") from exc


def _check_program_json(path: Any, o: Any) -> None:
    if isinstance(o, list):
        for v in o:
            _check_program_json(path, v)
        return
    if not isinstance(o, dict):
        return
    why = None
    if o.get("use_pickle"):
        why = "a pickled tensor"
    elif o.get("guards_code"):
        why = "shape guards (Python source)"
    elif {"target", "inputs", "outputs"} <= o.keys() and not _PROGRAM_OP.fullmatch(str(o["target"])):
        why = f"a call of {str(o['target'])[:80]!r} (only ATen operators are allowed)"
    elif "expr_str" in o and not _PROGRAM_EXPR.fullmatch(str(o["expr_str"])):
        why = f"the symbolic expression {str(o['expr_str'])[:80]!r}"
    if why:
        raise CheckpointError(f"{path}: refused: the program holds {why}, which resprune.save_program never writes")
    for v in o.values():
        _check_program_json(path, v)


def load_program(path: str | os.PathLike) -> nn.Module:
    """The program at ``path`` (from :func:`save_program`) as a callable module, after
    :func:`check_program`. It computes what the saved model computed in eval mode; it is a
    ``torch.fx.GraphModule``, not the saved class: it cannot be pruned or fused further and
    its batch norms (if any) stay in eval mode."""
    check_program(path)
    try:
        with open(path, "rb") as f:
            ep = torch.export.load(f)
    except Exception as exc:  # torch version mismatch, truncated file ...
        raise CheckpointError(f"{path}: torch.export could not load the program ({type(exc).__name__}: {exc})") from exc
    return ep.module()
