"""The run directory (docs/run-dir.md): which stage writes which file, and what each stage's
results were made from.

Every stage reads its inputs with :meth:`RunDir.need` and writes its results inside
:meth:`RunDir.writing`, which records in ``provenance.json`` the sha256 of each input and
result, the config the stage used and the time. When a stage's results change, the results
of every later stage are moved to ``stale/STAGE/`` (their ``metrics.json`` entries with them)
and recorded as invalidated, so no later file shows numbers of an earlier model. ``need``
refuses a file whose stage did not finish, was invalidated, or was made from inputs that have
changed since, with one line naming the stage(s) to re-run. Directories written before
provenance existed have no records; their files are taken as they are.

Example:
    >>> import tempfile
    >>> run = RunDir(tempfile.mkdtemp())
    >>> run.need("pruned.pt", "fuse")
    Traceback (most recent call last):
    ...
    resprune.rundir.RunDirError: .../pruned.pt is missing: run `resprune prune ...` first (`fuse` needs it)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ResPruneError
from .util import atomic_write, hardware

logger = logging.getLogger(__name__)

__all__ = ["RunDir", "RunDirError", "StageError", "STAGES", "OUTPUTS", "BENCH_FILES", "producer", "stage_config",
           "default_out"]

STAGES = ("train", "prune", "finetune", "fuse", "export", "quantize", "bench", "report")  # each depends on those before
OUTPUTS = {  # the results of each stage (recorded with their sha256; moved to stale/ when invalidated)
    "train": ("sparse.pt",),
    "prune": ("pruned.pt", "prune.json"),
    "finetune": ("finetuned.pt",),
    "fuse": ("fused.pt", "fused_unpruned.pt"),
    "export": ("onnx/unpruned.onnx", "onnx/unpruned.json", "onnx/pruned.onnx", "onnx/pruned.json"),
    "quantize": ("int8/unpruned.int8.onnx", "int8/unpruned.int8.json", "int8/pruned.int8.onnx", "int8/pruned.int8.json"),
    "bench": ("bench.json",),
    "report": ("report.md", "report.json", "plots"),
}
#: bench.json's model labels → their files (the INT8 ones only where the quantize stage wrote them)
BENCH_FILES = {"unpruned": "onnx/unpruned.onnx", "pruned": "onnx/pruned.onnx",
               "unpruned_int8": "int8/unpruned.int8.onnx", "pruned_int8": "int8/pruned.int8.onnx"}
RESUME_STATE = {"finetune": ("checkpoints/finetune.pt",)}  # moved along: never resume from an invalid model
METRICS = {"train": ("sparse",), "prune": ("pruned",), "finetune": ("finetuned",), "fuse": ("fused", "unpruned_fused")}
CONFIG = {"train": ("model", "data", "train", "engine", "nproc", "engine_options"), "prune": ("prune",),
          "finetune": ("finetune",), "quantize": ("quantize",)}  # the recipe sections a stage's results depend on
PROVENANCE = "provenance.json"


class RunDirError(ResPruneError, FileNotFoundError):
    """A run directory lacks a file a stage needs, or holds one that is out of date (the
    message names the stage(s) to re-run)."""


class StageError(ResPruneError, ValueError):
    """A stage cannot do what it was asked with these inputs or options (a pruning threshold
    that would empty a network stage, a checkpoint without its input size, several run
    directories without ``--out``); the message says what to change."""


def producer(rel: str) -> str | None:
    """The stage that writes ``rel`` (None for files every stage writes, e.g. metrics.json)."""
    return next((s for s, outs in OUTPUTS.items() if rel in outs), None)


def stage_config(recipe, stage: str) -> dict:
    """The recipe sections ``stage``'s results depend on (recorded in its provenance)."""
    d = recipe.to_dict()
    return {k: d[k] for k in CONFIG.get(stage, ())}


def default_out(recipe) -> Path:
    """``runs/<recipe>-<time>``: the run directory when none is given."""
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _results_in(out: Path) -> list[Path]:
    """Files of ``out`` other than ``recipe.json`` (a run that failed before writing anything
    else holds no results, and its directory may be used again)."""
    if not out.is_dir():
        return []
    return [f for f in out.rglob("*") if f.is_file() and f != out / "recipe.json" and ".tmp-" not in f.name]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


class RunDir:
    """Paths, JSON files and provenance of one run directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._sha: dict[Path, tuple[tuple[int, int], str]] = {}

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:  # a RunDir is accepted wherever a path is (``RunDir(run)`` too)
        return str(self.path)

    @classmethod
    def create(cls, out: str | os.PathLike, recipe, resume: bool = False) -> RunDir:
        """The run directory ``out`` of a new run (``resume``: of a run to continue), with
        ``recipe.json`` written. Refused with :class:`OSError`: ``out`` is a file, is not
        writable, or holds results and ``resume`` is not set (nothing is overwritten); with
        :class:`~resprune.config.RecipeError`: ``resume`` with another recipe. Partial files
        of a killed run are removed."""
        from .config import RecipeError
        from .serialization import remove_stale_temp

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file, not a directory")
        results = _results_in(out)
        if results and not resume:
            raise FileExistsError(f"run directory {out} exists and is not empty: pass --resume to continue it, "
                                  "or choose another --out (nothing was overwritten)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(f"cannot write the run directory {out}: {exc.strerror or exc}; "
                                  "choose a writable --out") from None
        run = cls(out)
        if results and (out / "recipe.json").is_file():  # --resume of a run with results
            if run.recipe() != recipe:
                raise RecipeError(f"--resume: the recipe differs from {out}/recipe.json; resume with the same recipe")
        elif (out / "recipe.json").is_file():
            logger.info("reusing %s: it holds no results (only the recipe.json of a run that failed early)", out)
        for d in (out, out / "checkpoints", out / "onnx"):  # leftovers of a run killed mid-write
            for f in remove_stale_temp(d):
                logger.info("removed %s (a partial file of a run that was killed)", f)
        run.write_json("recipe.json", recipe.to_dict())
        return run

    def command(self, stage: str) -> str:
        """How to (re-)run ``stage`` on this directory."""
        return f"resprune train RECIPE --out {self.path}" if stage == "train" else f"resprune {stage} {self.path}"

    # ------------------------------------------------------------------ JSON files
    def read_json(self, name: str) -> dict:
        p = self.path / name
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{p}: not valid JSON ({exc}); re-run the stage that writes it") from exc

    def write_json(self, name: str, data: dict) -> None:
        with atomic_write(self.path / name) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=float))

    def update_metrics(self, key: str, values: dict) -> None:
        m = self.read_json("metrics.json")
        m.setdefault("stages", {})[key] = values
        m["hardware"] = hardware()
        self.write_json("metrics.json", m)

    def recipe(self):
        from .config import recipe_from_dict

        return recipe_from_dict(json.loads(self.need("recipe.json", "this stage").read_text()))

    # ------------------------------------------------------------------ reading
    def sha256(self, rel: str) -> str | None:
        """sha256 of a file (None when it does not exist), cached by size and mtime."""
        p = self.path / rel
        try:
            st = p.stat()
        except OSError:
            return None
        if not p.is_file():
            return None
        key = (st.st_size, st.st_mtime_ns)
        if self._sha.get(p, (None,))[0] != key:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            self._sha[p] = (key, h.hexdigest())
        return self._sha[p][1]

    def records(self) -> dict[str, dict]:
        return self.read_json(PROVENANCE).get("stages", {})

    def need(self, rel: str, by: str, stage: str | None = None) -> Path:
        """``rel`` if it exists and its stage's results are current, else :class:`RunDirError`
        (one line: the file, why, and the stage(s) to re-run). ``stage``: check that stage
        instead of the file's producer (e.g. a stage's entry in metrics.json)."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run directory")
        p, stage = self.path / rel, stage or producer(rel)
        why = self.stale(stage) if stage else None
        if why:
            what = f"{p} ({stage} results)" if stage != producer(rel) else str(p)
            raise RunDirError(f"{what} is out of date: {why}")
        if not p.is_file():
            if rel == "recipe.json":
                raise RunDirError(f"{p} is missing: not a run directory of `resprune run`/`resprune train`")
            if stage is None:
                raise RunDirError(f"{p} is missing: every stage writes it (`resprune run` from training on)")
            raise RunDirError(f"{p} is missing: run `{self.command(stage)}` first (`{by}` needs it)")
        return p

    def need_json(self, rel: str, by: str) -> dict:
        self.need(rel, by)
        return self.read_json(rel)

    def stale(self, stage: str) -> str | None:
        """Why ``stage``'s results are out of date and what to re-run; None when they are
        current or were never recorded."""
        recs = self.records()
        bad = self._stale(stage, recs)
        if not bad:
            return None
        first = min(bad, key=STAGES.index)
        plan = [s for s in STAGES[STAGES.index(first): STAGES.index(stage) + 1] if s in recs or s == stage]
        then = f", then {', '.join(plan[1:])}" if len(plan) > 1 else ""
        return f"{bad.get(stage) or bad[first]}; re-run `{self.command(plan[0])}`{then}"

    def _stale(self, stage: str, recs: dict) -> dict[str, str]:
        """{stage: reason} for ``stage`` and the stages its recorded inputs came from."""
        rec = recs.get(stage)
        if rec is None:
            return {}
        if rec["state"] == "invalidated":  # its inputs are gone: every earlier stage out of date counts
            out = {s: why for s in STAGES[:STAGES.index(stage)] if (why := self._own(s, recs.get(s)))}
        else:
            out = {}
            for rel in rec.get("inputs", {}):
                out.update(self._stale(producer(rel), recs) if producer(rel) else {})
        if why := self._own(stage, rec):
            out[stage] = why
        return out

    def _own(self, stage: str, rec: dict | None) -> str | None:
        if rec is None:
            return None
        if rec["state"] == "invalidated":
            return f"the {stage} results were moved to stale/{stage}/ when `{rec['by']}` was re-run ({rec['time']})"
        if rec["state"] != "done":
            return f"`{stage}` did not finish writing its results (started {rec['time']})"
        for rel, h in rec.get("inputs", {}).items():
            if self.sha256(rel) not in (None, h):  # a deleted input cannot be checked, a changed one can
                return f"`{stage}` made its results from another {rel} than the one now in the run directory"
        return None

    def current(self, stage: str, config: dict | None = None) -> bool:
        """True when ``stage`` finished, its results are all present and unchanged, made from
        current inputs (and with ``config``, when given): ``--resume`` need not run it again."""
        rec = self.records().get(stage)
        return (rec is not None and rec["state"] == "done" and not self.stale(stage)
                and (config is None or rec.get("config") == _plain(config))
                and all(self.sha256(rel) == h for rel, h in rec.get("outputs", {}).items()))

    # ------------------------------------------------------------------ writing
    def _put(self, stage: str, rec: dict) -> None:
        doc = self.read_json(PROVENANCE) or {"format": "resprune-provenance", "version": 1, "stages": {}}
        doc["stages"][stage] = rec
        self.write_json(PROVENANCE, doc)

    def drop_metrics(self, stage: str) -> dict:
        """Remove ``stage``'s entries from metrics.json; returns them."""
        m = self.read_json("metrics.json")
        old = {k: m["stages"].pop(k) for k in METRICS.get(stage, ()) if k in m.get("stages", {})}
        if old:
            self.write_json("metrics.json", m)
        return old

    @contextlib.contextmanager
    def writing(self, stage: str, config: dict, inputs: Iterable[str],
                outputs: Iterable[str] | None = None) -> Iterator[None]:
        """Write ``stage``'s results inside this block (``outputs``, default all of
        ``OUTPUTS[stage]``; older results it does not write are moved to stale/).

        While the block runs the stage is recorded as running, so a process killed mid-write
        leaves results that every reader refuses. On success the record holds the inputs' and
        results' sha256, ``config`` and the time; if the results differ from the previous
        ones (those recorded, or in a directory without a record those found before the
        block), every later stage is invalidated. On an exception that changed nothing, the
        previous record stands. The block writes the stage's metrics.json entries itself.
        """
        outputs = tuple(OUTPUTS[stage] if outputs is None else outputs)
        prev = self.records().get(stage)
        before = ({rel: self.sha256(rel) for rel in outputs} if prev is None  # a directory without records
                  else prev.get("outputs") if prev["state"] == "done" else None)
        ins = {rel: self.sha256(rel) for rel in inputs}
        self._put(stage, {**(prev or {}), "state": "running", "time": _now()})
        try:
            yield
        except BaseException:
            same = prev and prev["state"] == "done" and all(
                self.sha256(r) == h for r, h in prev.get("outputs", {}).items())
            self._put(stage, prev if same else {"state": "failed", "time": _now()})
            raise
        self._move([r for r in OUTPUTS[stage] if r not in outputs], stage)
        outs = {rel: self.sha256(rel) for rel in outputs}
        self._put(stage, {"state": "done", "time": _now(), "config": _plain(config), "inputs": ins,
                          "outputs": outs})
        if before != outs:
            for later in STAGES[STAGES.index(stage) + 1:]:
                self.invalidate(later, by=stage)

    def _move(self, rels: list[str], stage: str) -> list[str]:
        rels = [r for r in rels if (self.path / r).exists()]
        dest = self.path / "stale" / stage
        if rels:
            shutil.rmtree(dest, ignore_errors=True)
        for rel in rels:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.path / rel), str(dest / rel))
        return rels

    def invalidate(self, stage: str, by: str) -> None:
        """Move ``stage``'s results (and its metrics.json entries) to ``stale/STAGE/`` and
        record why: they were made from results of ``by`` that have been replaced."""
        rec = self.records().get(stage)
        moved = self._move([*OUTPUTS[stage], *RESUME_STATE.get(stage, ())], stage)
        old = self.drop_metrics(stage)
        if old:
            (self.path / "stale" / stage).mkdir(parents=True, exist_ok=True)
            (self.path / "stale" / stage / "metrics.json").write_text(json.dumps(old, indent=1, default=float))
        if moved or old or (rec and rec["state"] != "invalidated"):
            self._put(stage, {"state": "invalidated", "by": by, "time": _now(), "moved": moved})
            logger.info("[%s] the %s results were made from replaced %s results: moved to %s", by, stage, by,
                        self.path / "stale" / stage)

    @contextlib.contextmanager
    def new_folder(self, rel: str) -> Iterator[Path]:
        """A temporary folder that replaces the folder ``rel`` as a whole when the block
        succeeds; on failure it is removed and ``rel`` is untouched (one left by a killed
        process is removed the next time)."""
        for d in self.path.glob(f".{rel}.tmp-*"):  # of killed processes
            pid = d.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
        tmp, old = self.path / f".{rel}.tmp-{os.getpid()}", self.path / f".{rel}.tmp-old-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            target = self.path / rel
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
