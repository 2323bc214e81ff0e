"""Convergence study: generalisation error of surrogates versus the number of training points.

For every problem, point set and activation, and for every ensemble member ``e``:

1. draw ``N_max = 2^log2_n_max`` training points of the set (member ``e`` uses seed
   ``seed * 1000 + e``: a new Monte Carlo sample or a new scrambling), solve the problem
   on them once (cached in memory for the whole run);
2. for ``N = 2^log2_n_min, ..., N_max`` train a surrogate on the first ``N`` points (a
   prefix: a net for the Sobol' kinds) with initialisation seed ``e``;
3. measure the error on an independent Monte Carlo test set of ``2^log2_test`` points
   (its own random stream, shared by all point sets of a problem).

The error of ``(problem, point set, activation, N)`` is the geometric mean over the
members; the rate is minus the least-squares slope of ``log(error)`` against ``log(N)``.

Example:
    >>> from resprune.qmc.study import StudyConfig, run_study
    >>> cfg = StudyConfig(problems=("smooth50",), log2_n_min=4, log2_n_max=5, ensemble=1,
    ...                   log2_test=8, ablation_problems=())
    >>> res = run_study(cfg)          # doctest: +SKIP
    >>> res.rates()[0]["rate"]        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from resprune.qmc.points import LABELS, PointSetConfig, generate_points, list_point_sets
from resprune.qmc.problems import create_problem, list_problems
from resprune.qmc.surrogate import (
    SurrogateConfig,
    normalised_rmse,
    relative_l2_error,
    train_surrogate,
)
from resprune.util import hardware as util_hardware

logger = logging.getLogger(__name__)

__all__ = ["StudyConfig", "StudyResult", "run_study", "fit_rate", "write_report", "hardware"]



def check_names(config: Any, base: Any) -> None:
    """Validate a study config's names (duck-typed: ``problems``, ``ablation_problems``,
    ``point_sets``, ``activations``, ``ablation_activations``); ``base`` is the network config
    whose ``activation`` field validates an activation name. ValueError names the culprit."""
    for p in (*config.problems, *config.ablation_problems):
        if p not in list_problems():
            raise ValueError(f"unknown problem {p!r}; choose from {list_problems()}")
    for k in config.point_sets:
        if k not in list_point_sets():
            raise ValueError(f"unknown point set {k!r}; choose from {list_point_sets()}")
    for a in (*config.activations, *config.ablation_activations):
        replace(base, activation=a)  # validates the name
    if not config.problems or not config.point_sets or not config.activations:
        raise ValueError("need at least one problem, point set and activation")


@dataclass(frozen=True)
class StudyConfig:
    """What to run.

    Args:
        problems: names from :func:`resprune.qmc.problems.list_problems`.
        point_sets: names from :func:`resprune.qmc.points.list_point_sets`.
        activations: activations run on every problem.
        ablation_activations: extra activations, run only on ``ablation_problems``.
        ablation_problems: problems that also get the ablation activations.
        log2_n_min, log2_n_max: training sizes ``N = 2^k``.
        ensemble: members per (problem, point set, activation) (seeds ``0..ensemble-1``).
        log2_test: test set size ``2^log2_test`` (independent Monte Carlo points).
        surrogate: network and optimiser settings (``seed`` is set per member).
        weight_decay_sum: if set, the weight decay used at size ``N`` is
            ``weight_decay_sum / N`` (a fixed penalty against the *sum* of squared errors,
            as in ridge regression), overriding ``surrogate.weight_decay``; ``None`` uses
            ``surrogate.weight_decay`` for every ``N``.
        problem_options: per-problem dataclass overrides, ``(("elliptic16", (("n_grid", 16),)),)``.
        seed: base seed of training and test points.
        version: schema version.
    """

    problems: tuple[str, ...] = ("smooth50", "elliptic16", "elliptic32", "parabolic16")
    point_sets: tuple[str, ...] = ("mc", "sobol-scrambled", "interlaced2-scrambled")
    activations: tuple[str, ...] = ("tanh",)
    ablation_activations: tuple[str, ...] = ("relu",)
    ablation_problems: tuple[str, ...] = ("elliptic16",)
    log2_n_min: int = 4
    log2_n_max: int = 11
    ensemble: int = 3
    log2_test: int = 13
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    weight_decay_sum: float | None = 1e-2
    problem_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        check_names(self, self.surrogate)
        if not 1 <= self.log2_n_min <= self.log2_n_max <= 20:
            raise ValueError("need 1 <= log2_n_min <= log2_n_max <= 20")
        if self.ensemble < 1 or not 2 <= self.log2_test <= 20:
            raise ValueError("need ensemble >= 1 and 2 <= log2_test <= 20")
        if self.weight_decay_sum is not None and self.weight_decay_sum < 0:
            raise ValueError("weight_decay_sum must be >= 0")

    def runs(self) -> Iterator[tuple[str, str, str]]:
        """``(problem, point set, activation)`` triples in execution order."""
        for p in self.problems:
            acts = self.activations + (self.ablation_activations if p in self.ablation_problems else ())
            for a in acts:
                for k in self.point_sets:
                    yield p, k, a

    def sizes(self) -> list[int]:
        return [2**k for k in range(self.log2_n_min, self.log2_n_max + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_rate(ns: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """Least-squares fit ``log e = log C - rate * log N``; returns ``(rate, C)``."""
    ns, errors = np.asarray(ns, dtype=float), np.asarray(errors, dtype=float)
    if len(ns) < 2:
        return math.nan, math.nan
    slope, icpt = np.polyfit(np.log(ns), np.log(errors), 1)
    return float(-slope), float(np.exp(icpt))


def hardware() -> dict[str, Any]:
    """CPU model, core count, machine, Python, torch (and its threads) and the numpy and scipy
    versions (:func:`resprune.util.hardware`)."""
    import scipy

    return util_hardware(numpy=np.__version__, scipy=scipy.__version__)


@dataclass
class StudyResult:
    """Per-member records plus what is needed to report them."""

    config: StudyConfig
    records: list[dict[str, Any]]
    seconds: float
    data_seconds: float
    info: dict[str, Any]  # hardware()

    def errors(self, problem: str, kind: str, act: str, metric: str = "nrmse") -> tuple[np.ndarray, np.ndarray]:
        """``(N, error)`` with errors ``(members, sizes)``."""
        ns = np.array(self.config.sizes())
        e = np.full((self.config.ensemble, len(ns)), np.nan)
        for r in self.records:
            if (r["problem"], r["point_set"], r["activation"]) == (problem, kind, act):
                e[r["member"], int(np.searchsorted(ns, r["n"]))] = r[metric]
        return ns, e

    def rates(self, metric: str = "nrmse") -> list[dict[str, Any]]:
        """One row per run: geometric-mean errors and the fitted rate."""
        rows = []
        for p, k, a in self.config.runs():
            ns, e = self.errors(p, k, a, metric)
            gm = np.exp(np.nanmean(np.log(e), axis=0))
            ok = np.isfinite(gm)
            rate, c = fit_rate(ns[ok], gm[ok])
            rows.append({"problem": p, "point_set": k, "activation": a, "rate": rate,
                         "const": c, "n": ns.tolist(), "error": gm.tolist()})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "records": self.records, "seconds": self.seconds,
                "data_seconds": self.data_seconds, "info": self.info, "rates": self.rates()}


def _problem(config: StudyConfig, name: str) -> Any:
    opts = dict(dict(config.problem_options).get(name, ()))
    return create_problem(name, **opts)


def run_study(config: StudyConfig) -> StudyResult:
    """Run every (problem, point set, activation, member, N) of ``config``.

    Returns:
        A :class:`StudyResult`; nothing is written (see :func:`write_report`).
    """
    t_start = time.perf_counter()
    data_seconds = 0.0
    records: list[dict[str, Any]] = []
    n_max = 2**config.log2_n_max
    for pname in config.problems:
        problem = _problem(config, pname)
        t0 = time.perf_counter()
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2**31 - 1]))
        y_test = rng.random((2**config.log2_test, problem.dim)) - 0.5
        g_test = problem(y_test)
        train: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for kind in config.point_sets:
            for e in range(config.ensemble):
                y = generate_points(PointSetConfig(kind, problem.dim, seed=config.seed * 1000 + e), n_max)
                train[kind, e] = (y, problem(y))
        dt = time.perf_counter() - t0
        data_seconds += dt
        logger.info("%s: d=%d, %d test + %d training solves in %.1f s", pname, problem.dim,
                    len(y_test), n_max * len(train), dt)
        for p, kind, act in config.runs():
            if p != pname:
                continue
            for e in range(config.ensemble):
                y, g = train[kind, e]
                t1 = time.perf_counter()
                line = []
                for n in config.sizes():
                    wd = config.surrogate.weight_decay if config.weight_decay_sum is None else config.weight_decay_sum / n
                    sc = replace(config.surrogate, activation=act, seed=e, weight_decay=wd)
                    s = train_surrogate(y[:n], g[:n], sc)
                    pred = s.predict(y_test)
                    train_rms = float(np.sqrt(np.mean((s.predict(y[:n]) - g[:n]) ** 2)))
                    rec = {"problem": p, "point_set": kind, "activation": act, "member": e, "n": n,
                           "nrmse": normalised_rmse(pred, g_test), "rel_l2": relative_l2_error(pred, g_test),
                           "train_nrmse": train_rms / float(np.std(g_test)),
                           "train_loss": s.train_loss, "seconds": s.seconds}
                    records.append(rec)
                    line.append(f"{rec['nrmse']:.1e}")
                logger.info("%-11s %-22s %-4s member %d  %5.1f s  err %s", p, kind, act, e,
                            time.perf_counter() - t1, " ".join(line))
    return StudyResult(config, records, time.perf_counter() - t_start, data_seconds, hardware())


# --------------------------------------------------------------------------- reporting
def rate_table(result: StudyResult, metric: str = "nrmse") -> str:
    """Markdown table: fitted rate and the errors at the smallest and largest ``N``."""
    ns = result.config.sizes()
    out = [f"| problem | d | points | act. | rate | err N={ns[0]} | err N={ns[-1]} |",
           "|---|---:|---|---|---:|---:|---:|"]
    dims = {p: _problem(result.config, p).dim for p in result.config.problems}
    for r in result.rates(metric):
        out.append(f"| {r['problem']} | {dims[r['problem']]} | {LABELS.get(r['point_set'], r['point_set'])} "
                   f"| {r['activation']} | {r['rate']:.2f} | {r['error'][0]:.2e} | {r['error'][-1]:.2e} |")
    return "\n".join(out)


def error_table(result: StudyResult, metric: str = "nrmse") -> str:
    """Markdown table of the geometric-mean error for every ``N``."""
    ns = result.config.sizes()
    out = ["| problem | points | act. | " + " | ".join(f"N={n}" for n in ns) + " |",
           "|---|---|---|" + "---:|" * len(ns)]
    for r in result.rates(metric):
        out.append(f"| {r['problem']} | {LABELS.get(r['point_set'], r['point_set'])} | {r['activation']} | "
                   + " | ".join(f"{v:.1e}" for v in r["error"]) + " |")
    return "\n".join(out)


def plot(result: StudyResult, path: str | Path, metric: str = "nrmse") -> Path:
    """Log-log error vs ``N``, one panel per problem (tanh solid, others dashed); PNG at ``path``."""
    fig = figure(result, metric)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def figure(result: StudyResult, metric: str = "nrmse"):
    """The figure of :func:`plot` (matplotlib ``Figure`` on an Agg canvas, no pyplot state).
    Each panel's legend sits under it, outside the axes, so it hides no curve, and
    constrained layout keeps titles, tick labels and legends apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = result.config.problems
    rates = result.rates(metric)
    n_leg = max(sum(r["problem"] == p for r in rates) for p in probs)
    fig = Figure(figsize=(3.4 * len(probs), 2.9 + 0.12 * n_leg), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(probs), height_ratios=[2.6, 0.3 + 0.12 * n_leg])
    colors = {k: f"C{i}" for i, k in enumerate(result.config.point_sets)}
    for i, p in enumerate(probs):
        ax, below = fig.add_subplot(grid[0, i]), fig.add_subplot(grid[1, i])
        for r in rates:
            if r["problem"] != p:
                continue
            style = "-" if r["activation"] == result.config.activations[0] else "--"
            ax.loglog(np.array(r["n"]), r["error"], style, marker="o", ms=3, color=colors[r["point_set"]],
                      label=f"{LABELS.get(r['point_set'], r['point_set'])} {r['activation']} ({r['rate']:.2f})")
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("N training points", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("test RMSE / std(G)" if metric == "nrmse" else "relative L2 error", fontsize=8)
        below.axis("off")  # the legend's own row: aligned panels, no curve hidden
        below.legend(*ax.get_legend_handles_labels(), fontsize=6, loc="upper center", title="points, act. (rate)",
                     title_fontsize=6)
    return fig


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return asdict(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def write_report(result: StudyResult, out_dir: str | Path, name: str = "qmc_rates",
                 json_dir: str | Path | None = None, title: str = "QMC training points: measured rates") -> dict[str, Path]:
    """Write ``{name}.md`` (tables, hardware, resolved config), ``{name}.png`` and the raw
    records as ``{name}.json`` (into ``json_dir``, default ``out_dir``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, info = result.config, result.info
    png = plot(result, out_dir / f"{name}.png")
    js = Path(json_dir or out_dir) / f"{name}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(result.to_dict(), indent=1, default=_json_default))
    s = c.surrogate
    md = [
        f"# {title}", "",
        f"Date {time.strftime('%Y-%m-%d')}. Hardware: {info['cpu']} ({info['cores']} cores, {info['machine']}), "
        f"torch {info['torch']} ({info['torch_threads']} thread), scipy {info['scipy']}, numpy {info['numpy']}.",
        f"Wall time {result.seconds / 60:.1f} min (of which PDE solves {result.data_seconds:.0f} s); "
        f"ensemble of {c.ensemble} per point (new point set and initialisation each); "
        f"N = 2^{c.log2_n_min} ... 2^{c.log2_n_max}; test set 2^{c.log2_test} independent MC points.",
        f"Network: {s.depth} x {s.width} MLP, Adam {s.adam_epochs} epochs (lr {s.lr}, cosine) then "
        f"L-BFGS {s.lbfgs_iters} iterations, weight decay "
        + (f"{s.weight_decay:g}" if c.weight_decay_sum is None else f"{c.weight_decay_sum:g} / N")
        + f", loss {s.loss}, {s.dtype}.", "",
        "Error = RMS(G - surrogate) / std(G) on the test set, geometric mean over the ensemble; "
        "rate = minus the least-squares slope of log(error) against log(N) over all N.", "",
        rate_table(result), "", "## Error per N", "", error_table(result), "",
        "## Relative L2 error ||G - surrogate|| / ||G|| (the reference's metric)", "",
        rate_table(result, "rel_l2"), "",
        f"![error vs N]({png.name})", "", "## Resolved config", "", "```json",
        json.dumps(c.to_dict(), indent=1, default=_json_default), "```", "",
    ]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    return {"md": md_path, "png": png, "json": js}
