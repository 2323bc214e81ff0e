"""Command line of the QMC wing: ``resprune qmc study`` or ``python -m resprune.qmc study``.

``add_subparser(subparsers)`` adds the ``qmc`` command to an argparse sub-parser object
(the main ``resprune`` CLI calls it); :func:`main` runs it standalone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

__all__ = ["add_subparser", "main", "cmd_study"]


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x for x in (p.strip() for p in s.split(",")) if x)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(s))


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in _csv(s))


def _range(s: str) -> tuple[int, int]:
    try:
        lo, _, hi = s.partition(":")
        return int(lo), int(hi or lo)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected LO:HI (log2 of N), got {s!r}") from e


def _add_reference_args(st: argparse.ArgumentParser) -> None:
    """The options of ``--protocol reference`` (the grid ensemble and its training)."""
    st.add_argument("--widths", type=_ints, default=(6, 12, 24), help="reference: hidden widths of the grid")
    st.add_argument("--depths", type=_ints, default=(4, 8, 16), help="reference: linear layers of the grid")
    st.add_argument("--weight-decays", type=_floats, default=(1e-5, 1e-6, 1e-7),
                    help="reference: Adam weight decays of the grid")
    st.add_argument("--inits", type=int, default=2, help="reference: initialisations per grid point")
    st.add_argument("--epochs", type=int, default=20000, help="reference: full-batch Adam epochs")
    st.add_argument("--lr-final", type=float, default=None,
                    help="reference: decay the learning rate to this (cosine); default constant")
    st.add_argument("--scale-targets", action="store_true",
                    help="reference: train on standardised targets (errors stay in the units of G)")


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qmc`` (with sub-command ``study``) to ``subparsers``; returns the ``qmc`` parser."""
    from resprune.qmc.points import list_point_sets
    from resprune.qmc.problems import list_problems

    qmc = subparsers.add_parser(
        "qmc", help="quasi-Monte Carlo training points for DNN surrogates",
        description="Quasi-Monte Carlo training points for DNN surrogates of parametric "
        "PDE data-to-observable maps (see docs/qmc.md).")
    sub = qmc.add_subparsers(dest="qmc_command", metavar="COMMAND")
    sub.required = True
    st = sub.add_parser(
        "study", help="error vs number of training points, fitted rates, table and plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="For each problem, point set and activation train an ensemble of MLP "
        "surrogates on N = 2^LO ... 2^HI points (nested prefixes of one point set per member), "
        "measure the error on an independent Monte Carlo test set, fit the rate of "
        "log(error) vs log(N) and write OUT/NAME.md, OUT/NAME.png and OUT/NAME.json.")
    st.add_argument("--protocol", choices=("project", "reference"), default="project",
                    help="'project': the options below (ensemble of --ensemble, MC test set); 'reference': the "
                    "published protocol (grid ensemble, loss 2 MSE(P_N) + MSE(P_N/2), E_G, E_T and gap, "
                    "bootstrap CIs; options --widths ... --epochs, --lr, --log2-n, --log2-test)")
    st.add_argument("--problems", type=_csv, default=("smooth50", "elliptic16", "elliptic32", "parabolic16"),
                    help=f"comma-separated, from {list_problems()}")
    st.add_argument("--point-sets", type=_csv, default=("mc", "sobol-scrambled", "interlaced2-scrambled"),
                    help=f"comma-separated, from {list_point_sets()}")
    st.add_argument("--activations", type=_csv, default=("tanh",), help="activations run on every problem")
    st.add_argument("--ablation-activations", type=_csv, default=("relu",),
                    help="extra activations, only on --ablation-problems")
    st.add_argument("--ablation-problems", type=_csv, default=("elliptic16",),
                    help="problems that also get the ablation activations ('' for none)")
    st.add_argument("--log2-n", type=_range, default=(4, 10), metavar="LO:HI", help="N = 2^LO ... 2^HI")
    st.add_argument("--ensemble", type=int, default=3, help="members per (problem, points, activation)")
    st.add_argument("--log2-test", type=int, default=13, help="test set of 2^K independent MC points")
    st.add_argument("--width", type=int, default=12)
    st.add_argument("--depth", type=int, default=2, help="hidden layers")
    st.add_argument("--adam-epochs", type=int, default=200)
    st.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate (default 1e-2 with cosine decay; reference: 1e-4, constant)")
    st.add_argument("--lbfgs-iters", type=int, default=600, help="L-BFGS iterations after Adam (0: none)")
    st.add_argument("--weight-decay", type=float, default=1e-2,
                    help="weight decay C; at size N the penalty is C/N * ||W||^2 (see --fixed-decay)")
    st.add_argument("--fixed-decay", action="store_true", help="use --weight-decay as is for every N")
    st.add_argument("--loss", choices=("mse", "extrapolated"), default="mse",
                    help="'extrapolated': 2 L(P_N) - L(P_N/2) on the nested sets")
    _add_reference_args(st)
    st.add_argument("--grid", type=int, default=None, help="override n_grid of the PDE problems")
    st.add_argument("--seed", type=int, default=0, help="base seed of training and test points")
    st.add_argument("--threads", type=int, default=1, help="torch threads")
    st.add_argument("--out", default="runs/qmc", help="output directory")
    st.add_argument("--name", default="qmc_study", help="file name stem of the outputs")
    st.add_argument("--force", action="store_true", help="overwrite OUT/NAME.{md,png,json} if they exist")
    st.add_argument("--quiet", action="store_true", help="no per-member progress lines")
    st.set_defaults(func=cmd_study)
    return qmc


def cmd_study(args: argparse.Namespace) -> int:
    """Run ``qmc study`` from parsed arguments."""
    import torch

    torch.set_num_threads(args.threads)
    _logging(args.quiet)
    opts = ()
    if args.grid is not None:
        opts = tuple((p, (("n_grid", args.grid),)) for p in (*args.problems, *args.ablation_problems)
                     if not p.startswith("smooth"))
    try:
        cfg = _reference_config(args, opts) if args.protocol == "reference" else _project_config(args, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    existing = [p for p in (os.path.join(args.out, f"{args.name}.{x}") for x in ("md", "png", "json"))
                if os.path.exists(p)]
    if existing and not args.force:  # checked before the study runs, so no time is lost on it
        print(f"error: {existing[0]} exists: pass --force to overwrite, or choose another --out or --name "
              "(nothing was overwritten)", file=sys.stderr)
        return 2
    from resprune.qmc import reference, study

    mod: Any = reference if args.protocol == "reference" else study
    result = reference.run_reference(cfg) if args.protocol == "reference" else study.run_study(cfg)
    paths = mod.write_report(result, args.out, args.name)
    print(mod.rate_table(result))
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']} ({result.seconds:.0f} s)")
    return 0


def _logging(quiet: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("resprune.qmc").setLevel(logging.WARNING if quiet else logging.INFO)


def _project_config(args: argparse.Namespace, opts: tuple):
    from resprune.qmc.study import StudyConfig
    from resprune.qmc.surrogate import SurrogateConfig

    sur = SurrogateConfig(width=args.width, depth=args.depth, adam_epochs=args.adam_epochs,
                          lr=SurrogateConfig.lr if args.lr is None else args.lr,
                          lbfgs_iters=args.lbfgs_iters, loss=args.loss,
                          weight_decay=args.weight_decay if args.fixed_decay else SurrogateConfig().weight_decay)
    return StudyConfig(problems=args.problems, point_sets=args.point_sets, activations=args.activations,
                       ablation_activations=args.ablation_activations,
                       ablation_problems=args.ablation_problems, log2_n_min=args.log2_n[0],
                       log2_n_max=args.log2_n[1], ensemble=args.ensemble, log2_test=args.log2_test,
                       surrogate=sur, weight_decay_sum=None if args.fixed_decay else args.weight_decay,
                       problem_options=opts, seed=args.seed)


def _reference_config(args: argparse.Namespace, opts: tuple):
    from resprune.qmc.ensemble import GridConfig
    from resprune.qmc.reference import ReferenceConfig

    grid = GridConfig(widths=args.widths, depths=args.depths, weight_decays=args.weight_decays, inits=args.inits,
                      epochs=args.epochs, lr=GridConfig.lr if args.lr is None else args.lr, lr_final=args.lr_final,
                      scale_targets=args.scale_targets)
    return ReferenceConfig(problems=args.problems, point_sets=args.point_sets, activations=args.activations,
                           ablation_activations=args.ablation_activations,
                           ablation_problems=args.ablation_problems, log2_n_min=args.log2_n[0],
                           log2_n_max=args.log2_n[1], log2_test=args.log2_test, grid=grid,
                           problem_options=opts, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m resprune.qmc study ...``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="python -m resprune.qmc",
                                     description="QMC training points for DNN surrogates.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_subparser(sub)
    # standalone: `python -m resprune.qmc study ...` means `qmc study ...`
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "qmc":
        argv = ["qmc", *argv]
    args = parser.parse_args(argv)
    return int(args.func(args))
