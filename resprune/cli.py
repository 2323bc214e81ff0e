"""The ``resprune`` command.

``resprune run RECIPE`` runs the whole pipeline; each stage is also its own sub-command that
reads and writes files in a run directory (docs/run-dir.md), so a run can stop after any
stage and resume from its output.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

logger = logging.getLogger("resprune")

EPILOG = """examples:
  resprune run quickstart                         # built-in data, CPU, ~2 minutes
  resprune run resnet56_cifar10 --data-dir DIR --set train.epochs=30
  resprune train resnet20_mnist --data-dir DIR --out runs/m   # one stage
  resprune prune runs/m --set prune.target_macs=0.35
  resprune fuse runs/m && resprune export runs/m && resprune bench runs/m && resprune report runs/m
  resprune train quickstart --engine mgrit --nproc 2          # layer-parallel (torchrun)
  resprune train quickstart --engine pipeline --nproc 2       # exact pipeline parallelism
"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name (see `resprune recipes`) or path to a .toml/.json recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--data-dir", default=None, help="data folder (default $RESPRUNE_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: recipe's, 'auto')")
    p.add_argument("--resume", action="store_true", help="continue a run directory from its checkpoints")
    p.add_argument("--engine", default=None,
                   help="training engine: serial (default) or a layer-parallel one: mgrit (multigrid across "
                        "layers), pipeline (exact GPipe/1F1B), local (local losses per chunk); docs/parallel.md")
    p.add_argument("--nproc", type=int, default=None, help="processes for a layer-parallel engine (torchrun)")


def _add_rundir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory written by `resprune run`/`train`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe for this stage (recorded in recipe.json)")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="resprune", description="Layer pruning with ResConv blocks: train sparse, prune, fuse, export, measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"resprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe end to end (train → prune → finetune → fuse → export → bench → report)")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("train", help="sparse training only → RUN_DIR/sparse.pt")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_train)
    for name, helptext in (("prune", "remove layers of RUN_DIR/sparse.pt → pruned.pt, prune.json"),
                           ("finetune", "fine-tune RUN_DIR/pruned.pt → finetuned.pt"),
                           ("fuse", "fuse finetuned.pt (else pruned.pt) → fused.pt, sparse.pt → fused_unpruned.pt")):
        p = sub.add_parser(name, help=helptext)
        _add_rundir_arg(p)
        p.set_defaults(func=cmd_stage, stage=name)

    from . import report

    report.add_export_parser(sub)
    report.add_bench_parser(sub)
    report.add_report_parser(sub)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("recipes", help="list recipes")
    p.set_defaults(func=cmd_recipes)

    from .qmc.cli import add_subparser as add_qmc

    add_qmc(sub)
    return parser


# ----------------------------------------------------------------------------- commands
def _resolve_recipe(args: argparse.Namespace):
    from .config import load_recipe

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.device:
        overrides += [f"train.device={args.device}", f"finetune.device={args.device}"]
    if args.engine:
        overrides.append(f"engine={args.engine}")
    if args.nproc is not None:  # 0 too: the recipe check refuses it
        overrides.append(f"nproc={args.nproc}")
    recipe = load_recipe(args.recipe, overrides)
    if recipe.nproc > 1 and recipe.engine == "serial":
        from .config import RecipeError
        from .parallel.engines import list_engines

        others = ", ".join(e for e in list_engines() if e != "serial")
        raise RecipeError(f"nproc={recipe.nproc} needs a layer-parallel engine (--engine mgrit); "
                          f"the serial engine trains in one process (layer-parallel engines: {others})")
    _check_model_kwargs(recipe)
    return recipe


def _check_model_kwargs(recipe) -> None:
    """Build the recipe's model without memory (meta device) so that a bad ``model.kwargs``
    key or value is a recipe error before any file or process exists."""
    import torch

    from .config import RecipeError
    from .models import create_model

    if "num_classes" in recipe.model.kwargs:
        raise RecipeError("model.kwargs.num_classes: the number of classes comes from the data set; remove it")
    try:
        with torch.device("meta"):
            create_model(recipe.model.name, **{"num_classes": 10, **recipe.model.kwargs})
    except TypeError as exc:
        why = re.sub(r"^[\w.<>]+\(\)\s*", "", str(exc))  # "factory() got an unexpected ..." → "got an ..."
        raise RecipeError(f"model.kwargs {recipe.model.kwargs}: {recipe.model.name} {why}") from exc
    except Exception:  # anything else surfaces when the real model is built
        pass


def _prepare_run_dir(args: argparse.Namespace, recipe):
    from .serialization import remove_stale_temp
    from .train.pipeline import RunDir

    out = args.out or _default_out(recipe)
    if not _is_main():  # torchrun ranks > 0 only read; rank 0 owns the directory
        return RunDir(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    results = _results_in(out)
    if results and not args.resume:
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
    run = RunDir(out)
    if results and (out / "recipe.json").is_file():  # --resume of a run with results
        old = run.recipe()
        if old != recipe:
            raise ValueError(f"--resume: the recipe differs from {out}/recipe.json; resume with the same recipe")
    elif (out / "recipe.json").is_file():
        logger.info("reusing %s: it holds no results (only the recipe.json of a run that failed early)", out)
    for d in (out, out / "checkpoints", out / "onnx"):  # leftovers of a run killed mid-write
        for f in remove_stale_temp(d):
            logger.info("removed %s (a partial file of a run that was killed)", f)
    run.write_json("recipe.json", recipe.to_dict())
    return run


def _default_out(recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _results_in(out: Path) -> list[Path]:
    """Files of ``out`` other than ``recipe.json`` (a run that failed before writing anything
    else holds no results, and its directory may be used again)."""
    if not out.is_dir():
        return []
    return [f for f in out.rglob("*") if f.is_file() and f != out / "recipe.json" and ".tmp-" not in f.name]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _maybe_parallel(args: argparse.Namespace, recipe):
    """Start torchrun for a multi-process engine, or return an engine factory inside it."""
    if recipe.engine == "serial" and recipe.nproc == 1:
        return None, None
    from .parallel import launch
    from .train.pipeline import engine_config, make_engine

    engine_config(recipe)  # bad engine names/options fail here, before torchrun or any file
    if "LOCAL_RANK" not in os.environ:  # not yet under torchrun: start the processes
        argv = sys.argv[1:]
        if args.out is None:  # one run directory for all ranks, named in a failure report
            args.out = _default_out(recipe)
            argv = [*argv, "--out", str(args.out)]
        return _launch_result(args, launch.relaunch_with_torchrun(recipe.nproc, argv)), None
    launch.init_distributed()
    return None, make_engine


def _launch_result(args: argparse.Namespace, failure) -> int:
    """The exit code of a multi-process launch. A failure is one line on stderr: the error line
    a rank recorded, or which rank died or lost its peers and what the run directory holds."""
    from .parallel.launch import REPORTED

    if failure is None:
        return 0
    if failure.exitcode == REPORTED and failure.message:
        print(failure.message, file=sys.stderr)
        return REPORTED
    kept = sorted(f.name for f in (args.out / "checkpoints").glob("*.pt"))
    where = (f"{args.out} keeps the checkpoint of the last finished epoch ({', '.join(kept)}): run the same "
             "command with --resume to continue" if kept else f"no checkpoint was written to {args.out} yet")
    print(f"resprune {args.command}: error: {failure.describe()}; {where}", file=sys.stderr)
    return REPORTED


def cmd_train(args: argparse.Namespace, full: bool = False) -> int:
    from .data import check_data
    from .train import pipeline

    recipe = _resolve_recipe(args)
    check_data(recipe.data.dataset, recipe.data.data_dir)  # before any process or file
    rc, factory = _maybe_parallel(args, recipe)
    if rc is not None:
        return rc
    run = _prepare_run_dir(args, recipe)
    if _is_main():
        logger.info("run directory: %s", run.path)
    if full:  # with an engine: train and fine-tune layer-parallel, the other stages on rank 0
        pipeline.run_all(recipe, run, resume=args.resume, engine_factory=factory)
        if _is_main():
            _print_summary(run)
    else:
        pipeline.stage_train(recipe, run, resume=args.resume, engine_factory=factory)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return cmd_train(args, full=True)


def cmd_stage(args: argparse.Namespace) -> int:
    from .config import apply_overrides
    from .train import pipeline

    run = pipeline.RunDir(args.run_dir)
    recipe = run.recipe()
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
        run.write_json("recipe.json", recipe.to_dict())
    getattr(pipeline, f"stage_{args.stage}")(recipe, run)
    if args.stage == "fuse":
        logger.info("wrote %s and %s", run / "fused.pt", run / "fused_unpruned.pt")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    names = list_models(args.pattern)
    if not names:
        hint = "" if any(c in args.pattern for c in "*?[") else f" (patterns are shell-style: try '*{args.pattern}*')"
        print(f"resprune models: no registered model matches {args.pattern!r}{hint}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import list_recipes

    print("\n".join(list_recipes()))
    return 0


def _print_summary(run) -> None:
    """The closing table of `resprune run`: before/after accuracy, MACs, params, latency."""
    m = run.read_json("metrics.json").get("stages", {})
    bench = run.read_json("bench.json")
    lat = {}
    for r in bench.get("results", []):
        if r.get("batch") == 1:
            lat[Path(r["model"]).stem] = r.get("median_ms")
    before, after = m.get("unpruned_fused") or m.get("sparse", {}), m.get("fused", {})
    acc_after = (m.get("finetuned") or m.get("pruned") or {}).get("test_acc")
    rows = [("", "before", "after", "change")]

    def fmt(a, b, unit, scale=1.0, nd=2):
        if a is None or b is None:
            return (unit, "-", "-", "-")
        return (unit, f"{a / scale:.{nd}f}", f"{b / scale:.{nd}f}",
                f"{100 * (b - a) / a:+.1f}%" if unit != "test accuracy (%)" else f"{b - a:+.2f} pt")

    rows.append(fmt(m.get("sparse", {}).get("test_acc"), acc_after, "test accuracy (%)"))
    rows.append(fmt(before.get("macs"), after.get("macs"), "MACs (M)", 1e6))
    rows.append(fmt(before.get("params"), after.get("params"), "params (M, fused)", 1e6, 3))
    rows.append(fmt(lat.get("unpruned"), lat.get("pruned"), "latency bs=1 (ms, ORT)", 1.0, 3))
    pr = m.get("pruned", {})
    print(f"\nresprune run: {run.path}")
    for r in rows:
        print(f"  {r[0]:<24}{r[1]:>10}{r[2]:>10}{r[3]:>10}")
    print(f"  layers removed per stage: {pr.get('removed_per_stage', {})} ({pr.get('removed', 0)} units)")
    if (run / "report.md").is_file():
        print(f"  report: {run / 'report.md'}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet or not _is_main() else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    from .config import RecipeError
    from .data import DatasetNotFound
    from .serialization import CheckpointError
    from .train import TrainingDiverged

    try:
        code = int(args.func(args) or 0)
    except (RecipeError, DatasetNotFound, CheckpointError, TrainingDiverged, OSError, ValueError, KeyError,
            RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        line = f"resprune {args.command}: error: {msg}"
        if "LOCAL_RANK" in os.environ:  # a torchrun rank: the launcher prints one line for all ranks
            from .parallel.launch import record_error

            code = record_error(line, exc)
        else:
            print(line, file=sys.stderr)
            code = 2
    except KeyboardInterrupt:
        if "LOCAL_RANK" not in os.environ:  # torchrun ranks: the launcher says it once
            print("interrupted", file=sys.stderr)
        code = 130
    if "LOCAL_RANK" in os.environ:  # a torchrun rank: leave through the gloo exit workaround
        from .parallel.launch import finalize

        finalize(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
