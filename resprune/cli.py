"""The ``resprune`` command: every argument parser of the package (the stages are
:mod:`resprune.stages`).

``resprune run RECIPE`` runs the whole pipeline; each stage is also its own sub-command that
reads and writes files in a run directory (docs/run-dir.md), so a run can stop after any
stage and resume from its output.

Errors: resprune's own (:class:`resprune.ResPruneError`: bad input, a missing or out-of-date
file, a run that cannot go on) and the operating system's (:class:`OSError`: a read-only
``--out``, a missing file) are printed as one line, exit status 2 (``--debug``: with their
traceback). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import traceback
from pathlib import Path

__all__ = ["main", "build_parser"]

logger = logging.getLogger("resprune")

EPILOG = """examples:
  resprune run quickstart                         # built-in data, CPU, ~2 minutes
  resprune run resnet56_cifar10 --data-dir DIR --set train.epochs=30
  resprune train resnet20_mnist --data-dir DIR --out runs/m   # one stage
  resprune prune runs/m --set prune.target_macs=0.35
  resprune fuse runs/m && resprune export runs/m && resprune bench runs/m && resprune report runs/m
  resprune quantize runs/m --set quantize.method=entropy     # INT8 models beside the fp32 ones
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
                        "layers), pipeline (exact GPipe/1F1B), local (local losses per chunk), auxvar (auxiliary "
                        "variables, then serial correction); docs/parallel.md")
    p.add_argument("--nproc", type=int, default=None, help="processes for a layer-parallel engine (torchrun)")


def _add_rundir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory written by `resprune run`/`train`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe for this stage (recorded in recipe.json)")


def build_parser() -> argparse.ArgumentParser:
    from .config import ExportConfig
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="resprune", description="Layer pruning with ResConv blocks: train sparse, prune, fuse, export, measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"resprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of resprune's own errors too (bad input, missing files), "
                             "not just their one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe end to end (train → prune → finetune → fuse → export → "
                                   "[quantize] → bench → report)")
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

    cfg = ExportConfig()
    _add_export_parser(sub, cfg)
    _add_quantize_parser(sub)
    _add_bench_parser(sub, cfg)
    _add_report_parser(sub)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("recipes", help="list recipes")
    p.set_defaults(func=cmd_recipes)

    from .qmc.cli import add_subparser as add_qmc

    add_qmc(sub)
    return parser


def _add_run_dir_parser(sub, cmd, helptext: str, run_dir_help: str, **fmt):
    """The sub-command of ``cmd`` (``cmd_NAME``), whose first argument is a run directory; its
    description is ``cmd``'s docstring (formatted with ``fmt`` when given)."""
    doc = " ".join(cmd.__doc__.split())
    p = sub.add_parser(cmd.__name__.removeprefix("cmd_"), help=helptext,
                       description=doc.format(**fmt) if fmt else doc)
    p.add_argument("run_dir", type=Path, help=run_dir_help)
    p.set_defaults(func=cmd)
    return p


def _add_export_parser(sub, cfg) -> None:
    p = _add_run_dir_parser(sub, cmd_export, "export fused.pt / fused_unpruned.pt to verified ONNX files",
                            "run directory (docs/run-dir.md)", cfg=cfg)
    p.add_argument("--input-size", nargs=4, type=int, metavar=("N", "C", "H", "W"),
                   help="input shape (default: the one each checkpoint records)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, >= 18)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to N")
    p.add_argument("--atol", type=float,
                   help=f"onnxruntime check: absolute tolerance on the logits (default {cfg.atol:g})")
    p.add_argument("--rtol", type=float,
                   help=f"onnxruntime check: tolerance relative to the largest |logit| (added to --atol; "
                        f"default {cfg.rtol:g})")


def _add_quantize_parser(sub) -> None:
    from .config import QuantizeConfig

    p = _add_run_dir_parser(sub, cmd_quantize, "INT8 models of onnx/*.onnx → int8/*.int8.onnx (+ .json)",
                            "run directory with onnx/ (from `resprune export`)", cfg=QuantizeConfig())
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of [quantize] (or [data]), e.g. --set quantize.method=entropy; recorded in "
                        "recipe.json when the stage succeeds")
    p.add_argument("--data-dir", default=None,
                   help="folder of the recipe's data set (default: the recipe's data.data_dir, else $RESPRUNE_DATA)")


def _add_bench_parser(sub, cfg) -> None:
    p = _add_run_dir_parser(sub, cmd_bench, "time onnx/unpruned.onnx and onnx/pruned.onnx side by side → bench.json",
                            "run directory with onnx/ (from `resprune export`)")
    p.add_argument("--batch", nargs="+", type=int,
                   help=f"batch sizes (default: {' '.join(map(str, cfg.bench_batches))})")
    p.add_argument("--runs", type=int, help=f"timed runs per model and batch (default {cfg.bench_runs})")
    p.add_argument("--warmup", type=int, help=f"warm-up runs (default {cfg.bench_warmup})")
    p.add_argument("--threads", type=int,
                   help="onnxruntime intra-op threads (default 0: the physical cores; always set explicitly and "
                        "recorded)")
    p.add_argument("--providers", nargs="+", help="onnxruntime execution providers (default: CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--tool", help="path of ort_bench.py (default: the repository's export/ort_bench.py)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="time ONNX files that have no sidecar (.json), which cannot be checked against the "
                        "export; by default such a file is refused")


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="report.md, report.json and plots from one or several run directories",
        description="Write report.md, report.json and plots/*.png (layer scales with the threshold, "
                    "MACs/params/latency/accuracy before and after, layers removed per stage; with "
                    "several runs also accuracy against MACs) from prune.json, metrics.json and "
                    "bench.json.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", help="output directory (default: RUN_DIR; required with several runs)")
    p.add_argument("--baseline", metavar="RUN_DIR|ACC",
                   help="baseline: a run directory of the same schedule without L1 (or its accuracy in %%); "
                        "default: the recipe's report.baseline")
    p.add_argument("--no-latency", action="store_true",
                   help="report without bench.json (no latency); by default a missing bench.json is an error")
    p.set_defaults(func=cmd_report)


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
    _check_model(recipe)
    return recipe


def _check_model(recipe) -> None:
    """Build the recipe's model so that a bad ``model.kwargs`` key or value, or a
    ``model.remove`` name that is not a unit, is a recipe error before any file or process
    exists. Without memory (meta device) unless units are removed: their names are read off
    real layer scales."""
    import torch

    from .config import RecipeError
    from .data.sources import IN_CHANS, NUM_CLASSES
    from .models import create_model
    from .train.pipeline import init_model_, remove_named_units_

    if "num_classes" in recipe.model.kwargs:
        raise RecipeError("model.kwargs.num_classes: the number of classes comes from the data set; remove it")
    classes = NUM_CLASSES.get(recipe.data.dataset)
    init = recipe.model.init and classes is not None  # checked here when the class count is known
    try:
        with torch.device("cpu" if recipe.model.remove or init else "meta"):
            kw = {"num_classes": classes or 10, **recipe.model.kwargs}
            if IN_CHANS.get(recipe.data.dataset, 3) != 3 and not recipe.model.name.startswith("tv_"):
                kw.setdefault("in_chans", IN_CHANS[recipe.data.dataset])  # as build_model does
            model = create_model(recipe.model.name, **kw)
    except TypeError as exc:
        why = re.sub(r"^[\w.<>]+\(\)\s*", "", str(exc))  # "factory() got an unexpected ..." → "got an ..."
        raise RecipeError(f"model.kwargs {recipe.model.kwargs}: {recipe.model.name} {why}") from exc
    except Exception:  # anything else surfaces when the real model is built
        return
    if init:
        init_model_(model, recipe.model)
    else:
        remove_named_units_(model, recipe.model.remove)


def _prepare_run_dir(args: argparse.Namespace, recipe):
    from .rundir import RunDir, default_out

    out = args.out or default_out(recipe)
    if not _is_main():  # torchrun ranks > 0 only read; rank 0 owns the directory
        return RunDir(out)
    return RunDir.create(out, recipe, resume=args.resume)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _maybe_parallel(args: argparse.Namespace, recipe):
    """Start torchrun for a multi-process engine, or return an engine factory inside it."""
    if recipe.engine == "serial" and recipe.nproc == 1:
        return None, None
    from .parallel import launch
    from .rundir import default_out
    from .train.pipeline import engine_config, make_engine

    engine_config(recipe)  # bad engine names/options fail here, before torchrun or any file
    if "LOCAL_RANK" not in os.environ:  # not yet under torchrun: start the processes
        argv = sys.argv[1:]
        if args.out is None:  # one run directory for all ranks, named in a failure report
            args.out = default_out(recipe)
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
    from . import stages
    from .data import check_data

    recipe = _resolve_recipe(args)
    check_data(recipe.data.dataset, recipe.data.data_dir)  # before any process or file
    rc, factory = _maybe_parallel(args, recipe)
    if rc is not None:
        return rc
    run = _prepare_run_dir(args, recipe)
    if _is_main():
        logger.info("run directory: %s", run.path)
    if full:  # with an engine: train and fine-tune layer-parallel, the other stages on rank 0
        stages.run_all(recipe, run, resume=args.resume, engine_factory=factory)
        if _is_main():
            from .report import run_summary

            print("\n".join(run_summary(run)))
    else:
        stages.stage_train(recipe, run, resume=args.resume, engine_factory=factory)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return cmd_train(args, full=True)


def cmd_stage(args: argparse.Namespace) -> int:
    """``resprune prune|finetune|fuse RUN_DIR``: the stage with the run's recipe (``--set``
    overrides are written to its recipe.json first)."""
    from . import stages
    from .config import apply_overrides
    from .rundir import RunDir

    run = RunDir(args.run_dir)
    recipe = run.recipe()
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
        run.write_json("recipe.json", recipe.to_dict())
    getattr(stages, f"stage_{args.stage}")(recipe, run)
    if args.stage == "fuse":
        logger.info("wrote %s and %s", run / "fused.pt", run / "fused_unpruned.pt")
    return 0


def _export_config(**given):
    """:class:`ExportConfig` with the options given on the command line (None: its default)."""
    from .config import ExportConfig

    return dataclasses.replace(ExportConfig(), **{k: v for k, v in given.items() if v is not None})


def cmd_export(args: argparse.Namespace) -> int:
    """Export RUN_DIR/fused_unpruned.pt and RUN_DIR/fused.pt to RUN_DIR/onnx/unpruned.onnx
    and RUN_DIR/onnx/pruned.onnx (one self-contained file each, plus a .json sidecar with
    MACs, params, opset, versions and the checkpoint's sha256). Each file is checked with
    onnx.checker and against onnxruntime on random inputs (max |diff| <=
    {cfg.atol:g} + {cfg.rtol:g}·max|logit|, same top-1)."""
    from .stages import stage_export
    from .stages.export import ONNX_FILES

    res = stage_export(args.run_dir, _export_config(opset=args.opset, atol=args.atol, rtol=args.rtol),
                       input_size=tuple(args.input_size) if args.input_size else None,
                       dynamic_batch=not args.static_batch)
    for key, info in res.items():
        chk = info["check"]
        print(f"{key:>9}: {args.run_dir / ONNX_FILES[key][1]}  opset {info['opset']}, "
              f"{info['macs_per_sample'] / 1e6:.2f} M MACs, {info['params'] / 1e6:.3f} M params, "
              f"onnxruntime max |diff| {chk['max_abs_diff']:.2g} (tol {chk['atol']:g}), ops "
              + ", ".join(f"{k}×{v}" for k, v in info["op_types"].items()))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize RUN_DIR/onnx/unpruned.onnx and RUN_DIR/onnx/pruned.onnx to INT8 with
    onnxruntime's static quantizer (QDQ, per-channel int8 weights, {cfg.activations}
    activations calibrated on {cfg.images} training images, method {cfg.method}: the recipe's
    [quantize] section) → RUN_DIR/int8/unpruned.int8.onnx and RUN_DIR/int8/pruned.int8.onnx,
    each with a .json sidecar. Each INT8 model must agree with its fp32 model on the top-1
    class of at least {cfg.min_agreement:.0%} of the test images. A missing or modified fp32
    file or sidecar, missing calibration data or images of the wrong size are refused before
    anything is written."""
    from .config import apply_overrides
    from .rundir import RunDir
    from .stages import stage_quantize

    run = RunDir(args.run_dir)
    saved = run.recipe()
    here = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    recipe = apply_overrides(saved, [*args.overrides, *here])
    res = stage_quantize(recipe, run)
    if args.overrides:  # the --data-dir of this machine is not the run's
        run.write_json("recipe.json", apply_overrides(saved, args.overrides).to_dict())
    for key, info in res.items():
        c = info["check"]
        size = info["onnx_bytes"]
        print(f"{key:>13}: {run / 'int8' / info['onnx_file']}  {size / 1024:.0f} KiB "
              f"({size / info['source']['onnx_bytes']:.2f}× fp32), accuracy {c['fp32_accuracy']:.2f}% → "
              f"{c['int8_accuracy']:.2f}%, top-1 agreement {c['top1_agreement']:.2%} on {c['images']} test images")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Verify RUN_DIR/onnx/{unpruned,pruned}.onnx (and RUN_DIR/int8/*.int8.onnx where
    `resprune quantize` wrote them) against their sidecars, then time them interleaved with
    export/ort_bench.py (onnxruntime, medians, peak memory) and write
    RUN_DIR/bench.json. On a target device run export/ort_bench.py itself (see
    export/README.md)."""
    from .stages import stage_bench

    cfg = _export_config(bench_batches=args.batch, bench_runs=args.runs, bench_warmup=args.warmup,
                         bench_threads=args.threads)
    stage_bench(args.run_dir, cfg, providers=args.providers, memory=not args.no_memory, tool=args.tool,
                allow_unverified=args.allow_unverified)
    print(f"wrote {args.run_dir / 'bench.json'}")
    return 0


def _baseline_arg(v: str | None) -> str | float | None:
    """``--baseline``: an accuracy figure when it parses as a number, else a run directory."""
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v


def cmd_report(args: argparse.Namespace) -> int:
    from .stages import stage_report

    rep = stage_report(args.run_dirs, args.out, latency=not args.no_latency, baseline=_baseline_arg(args.baseline))
    print(f"wrote {Path(rep['out']) / 'report.md'}, report.json and "
          f"{sum(len(v) for v in rep['plots']['per_run'].values()) + bool(rep['plots']['acc_vs_macs'])} plots")
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


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet or not _is_main() else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    from .errors import ResPruneError

    rank = "LOCAL_RANK" in os.environ  # a torchrun rank: the launcher prints one line for all ranks
    try:
        code = int(args.func(args) or 0)
    except (ResPruneError, OSError) as exc:  # bad input, a missing or unwritable file: one line
        if args.debug:
            traceback.print_exc()
        code = _error_line(args, exc, rank)
    except KeyboardInterrupt:
        if not rank:  # torchrun ranks: the launcher says it once
            print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # a bug: its traceback (a rank also records its line for the launcher)
        if not rank:
            raise
        from .parallel.launch import is_peer_failure

        if not is_peer_failure(exc):  # a rank that only lost a dead peer stays quiet
            traceback.print_exc()
        code = _error_line(args, exc, rank)
    if rank:  # leave through the gloo exit workaround
        from .parallel.launch import finalize

        finalize(code)
    return code


def _error_line(args: argparse.Namespace, exc: BaseException, rank: bool) -> int:
    """Print (in a torchrun rank: record) the one-line error; the exit code."""
    line = f"resprune {args.command}: error: {exc}"
    if rank:
        from .parallel.launch import record_error

        return record_error(line, exc)  # PEER_LOST when another rank broke the connection
    print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
