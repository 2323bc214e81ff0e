"""The reference protocol of the published study, with Monte Carlo points beside the QMC ones.

For every problem, activation and point set (one set of ``2^log2_n_max`` points per kind,
solved once; ``P_N`` is its prefix of ``N`` points and ``P_{N/2}`` the first half of ``P_N``,
so the two are nested as the extrapolated loss needs):

1. train every member of the grid (:class:`~resprune.qmc.ensemble.GridConfig`: width x
   depth x weight decay x initialisation) on ``P_N`` with the loss
   ``2 MSE(P_N) + MSE(P_{N/2})``; members of one shape are trained together, over all point
   sets at once (:func:`~resprune.qmc.ensemble.train_batched`);
2. per member: ``E_G`` = RMSE on a test set of ``2^log2_test`` scrambled Sobol' points (its
   own scrambling, shared by every point set of the problem), ``E_T = sqrt|2 MSE(P_N) -
   MSE(P_{N/2})|`` (absolute errors in the units of ``G``, as the reference; with
   ``grid.scale_targets`` the nets learn standardised targets and are scaled back first);
3. per ``N``: arithmetic means of ``E_G`` and ``E_T`` over the members, and the gap
   ``|mean E_G - mean E_T|``; rates = minus the least-squares slope of log(error) against
   log(N); bootstrap confidence intervals by resampling the members (with replacement, the
   same draw at every ``N``).

Example:
    >>> from resprune.qmc.ensemble import GridConfig
    >>> from resprune.qmc.reference import ReferenceConfig, run_reference
    >>> cfg = ReferenceConfig(problems=("smooth50",), log2_n_min=3, log2_n_max=4, log2_test=8,
    ...                       grid=GridConfig(widths=(6,), depths=(3,), epochs=50, lr=1e-3))
    >>> res = run_reference(cfg)            # doctest: +SKIP
    >>> res.summary()[0]["rates"]["E_G"]    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from resprune.qmc.ensemble import GridConfig, forward, init_members, reference_errors, reference_loss_weights, train_batched
from resprune.qmc.points import LABELS, PointSetConfig, generate_points
from resprune.qmc.problems import create_problem
from resprune.qmc.study import _json_default, check_names, fit_rate, hardware

logger = logging.getLogger(__name__)

__all__ = ["ReferenceConfig", "ReferenceResult", "run_reference", "bootstrap_rates", "PAPER"]

METRICS = ("E_G", "E_T", "gap")

#: Rates recomputed from the reference's saved results (see docs/qmc.md): ``(problem,
#: activation) -> {metric: rate}``. ReLU is its activation test (N = 16..256, tanh 2.18 there).
PAPER: dict[tuple[str, str], dict[str, float]] = {
    ("elliptic16", "tanh"): {"E_G": 1.36, "gap": 2.14},
    ("elliptic32", "tanh"): {"E_G": 1.27, "gap": 2.09},
    ("parabolic16", "tanh"): {"E_G": 1.76},
    ("smooth50", "tanh"): {"E_G": 2.13},
    ("elliptic16", "relu"): {"E_G": 0.91},
}


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference-protocol study runs.

    Args:
        problems: names from :func:`resprune.qmc.problems.list_problems`.
        point_sets: names from :func:`resprune.qmc.points.list_point_sets` (QMC and ``mc``).
        activations: run on every problem.
        ablation_activations: run only on ``ablation_problems``.
        ablation_problems: problems that also get the ablation activations.
        log2_n_min, log2_n_max: training sizes ``N = 2^k`` (``k >= 2``).
        log2_test: test set of ``2^log2_test`` scrambled Sobol' points.
        grid: the ensemble and its training (the reference's by default).
        n_boot: bootstrap resamples of the members.
        problem_options: per-problem dataclass overrides, ``(("elliptic16", (("n_grid", 16),)),)``.
        seed: seed of the point sets (training sets ``seed``, test set ``seed + 7919``).
        version: schema version.
    """

    problems: tuple[str, ...] = ("elliptic16",)
    point_sets: tuple[str, ...] = ("interlaced2-scrambled", "mc")
    activations: tuple[str, ...] = ("tanh",)
    ablation_activations: tuple[str, ...] = ("relu",)
    ablation_problems: tuple[str, ...] = ("elliptic16",)
    log2_n_min: int = 4
    log2_n_max: int = 11
    log2_test: int = 13
    grid: GridConfig = field(default_factory=GridConfig)
    n_boot: int = 2000
    problem_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        check_names(self, self.grid)
        if not 2 <= self.log2_n_min < self.log2_n_max <= 20:
            raise ValueError("need 2 <= log2_n_min < log2_n_max <= 20 (two sizes at least, N/2 even)")
        if not 4 <= self.log2_test <= 20 or self.n_boot < 1:
            raise ValueError("need 4 <= log2_test <= 20 and n_boot >= 1")

    def runs(self) -> Iterator[tuple[str, str]]:
        """``(problem, activation)`` pairs; every point set is trained within each."""
        for p in self.problems:
            yield from ((p, a) for a in self.activations)
            if p in self.ablation_problems:
                yield from ((p, a) for a in self.ablation_activations)

    def sizes(self) -> list[int]:
        return [2**k for k in range(self.log2_n_min, self.log2_n_max + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_rates(ns: np.ndarray, e_g: np.ndarray, e_t: np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Rates of the member means of ``E_G``, ``E_T`` and of their gap, with 95% bootstrap CIs.

    Args:
        ns: training sizes ``(S,)``.
        e_g, e_t: per-member errors ``(M, S)`` (member ``m`` is the same net at every ``N``).
        n_boot: resamples of the ``M`` members (with replacement, one draw for all ``N``).
        seed: RNG seed of the resampling.

    Returns:
        ``{metric: {"rate", "lo", "hi", "const"}}`` for ``E_G``, ``E_T``, ``gap``; ``lo, hi``
        are the 2.5% and 97.5% percentiles of the resampled rates.
    """
    e_g, e_t = np.asarray(e_g, dtype=float), np.asarray(e_t, dtype=float)

    def curves(idx: np.ndarray) -> dict[str, np.ndarray]:
        g, t = e_g[idx].mean(0), e_t[idx].mean(0)
        return {"E_G": g, "E_T": t, "gap": np.abs(g - t)}

    def rate(y: np.ndarray) -> float:
        ok = np.isfinite(y) & (y > 0)
        return fit_rate(ns[ok], y[ok])[0] if ok.sum() >= 2 else np.nan

    m = len(e_g)
    point = curves(np.arange(m))
    rng = np.random.default_rng(seed)
    boot = {k: [] for k in METRICS}
    for _ in range(n_boot):
        for k, y in curves(rng.integers(0, m, m)).items():
            boot[k].append(rate(y))
    out = {}
    for k in METRICS:
        ok = point[k] > 0
        r, c = fit_rate(ns[ok], point[k][ok])
        lo, hi = np.nanpercentile(boot[k], [2.5, 97.5]) if np.isfinite(boot[k]).any() else (np.nan, np.nan)
        out[k] = {"rate": r, "lo": float(lo), "hi": float(hi), "const": c}
    return out


@dataclass
class ReferenceResult:
    """Per-member records of a reference-protocol run."""

    config: ReferenceConfig
    records: list[dict[str, Any]]
    seconds: float
    data_seconds: float
    info: dict[str, Any]

    def errors(self, problem: str, kind: str, act: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(N, E_G, E_T)`` with errors ``(members, sizes)`` in :meth:`GridConfig.members` order."""
        ns = np.array(self.config.sizes())
        members = self.config.grid.members()
        e_g, e_t = np.full((len(members), len(ns)), np.nan), np.full((len(members), len(ns)), np.nan)
        index = {m: i for i, m in enumerate(members)}
        for r in self.records:
            if (r["problem"], r["point_set"], r["activation"]) == (problem, kind, act):
                i, j = index[r["width"], r["depth"], r["weight_decay"], r["init"]], int(np.searchsorted(ns, r["n"]))
                e_g[i, j], e_t[i, j] = r["E_G"], r["E_T"]
        return ns, e_g, e_t

    def summary(self) -> list[dict[str, Any]]:
        """One row per (problem, activation, point set): member means per ``N`` and rates with CIs."""
        rows = []
        for p, a in self.config.runs():
            for k in self.config.point_sets:
                ns, e_g, e_t = self.errors(p, k, a)
                g, t = np.nanmean(e_g, 0), np.nanmean(e_t, 0)
                rates = bootstrap_rates(ns, e_g, e_t, self.config.n_boot, self.config.seed)
                rows.append({"problem": p, "activation": a, "point_set": k, "n": ns.tolist(),
                             "E_G": g.tolist(), "E_T": t.tolist(), "gap": np.abs(g - t).tolist(),
                             "rates": rates, "paper": PAPER.get((p, a), {}) if k != "mc" else {}})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "records": self.records, "seconds": self.seconds,
                "data_seconds": self.data_seconds, "info": self.info, "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceResult:
        """Inverse of :meth:`to_dict` (the JSON a report wrote)."""
        c = dict(d["config"])
        c["grid"] = GridConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["grid"].items()})
        c["problem_options"] = tuple((p, tuple(tuple(kv) for kv in o)) for p, o in c["problem_options"])
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        return cls(ReferenceConfig(**c), d["records"], d["seconds"], d["data_seconds"], d["info"])

    def restrict(self, log2_n_max: int) -> ReferenceResult:
        """The same run with only the sizes ``N <= 2^log2_n_max`` (to compare with a shorter run)."""
        cfg = replace(self.config, log2_n_max=log2_n_max)
        return ReferenceResult(cfg, [r for r in self.records if r["n"] <= 2**log2_n_max], self.seconds,
                               self.data_seconds, self.info)


def _problem(config: ReferenceConfig, name: str) -> Any:
    return create_problem(name, **dict(dict(config.problem_options).get(name, ())))


def _data(config: ReferenceConfig, problem: Any, cache_dir: str | Path | None = None
          ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Training ``{kind: (y, G(y))}`` of ``2^log2_n_max`` points each, and the test set.

    With ``cache_dir`` the solves are kept in ``cache_dir/<key>.npz`` (key: the problem's
    fields, point set, seed and test size) and a later run reuses them, taking a prefix when
    it needs fewer training points (every point set is a sequence)."""
    n_max, test = 2**config.log2_n_max, PointSetConfig("sobol-scrambled", problem.dim, seed=config.seed + 7919)
    train = {}
    for kind in config.point_sets:
        cfg = PointSetConfig(kind, problem.dim, seed=config.seed)
        train[kind] = _cached(cache_dir, f"{problem!r}|{cfg!r}", n_max, lambda n: _solve(problem, cfg, n))
    y_test, g_test = _cached(cache_dir, f"{problem!r}|test|{test!r}", 2**config.log2_test,
                             lambda n: _solve(problem, test, n), exact=True)
    return train, y_test, g_test


def _solve(problem: Any, cfg: PointSetConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = generate_points(cfg, n)
    return y, problem(y)


def _cached(cache_dir: str | Path | None, key: str, n: int, make: Any, exact: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    if cache_dir is None:
        return make(n)
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as z:
            if len(z["y"]) == n or (len(z["y"]) > n and not exact):
                return z["y"][:n], z["g"][:n]
    y, g = make(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, y=y, g=g)
    return y, g


def _train_shape(config: ReferenceConfig, grid: GridConfig, train: dict, y_test: np.ndarray, g_test: np.ndarray,
                 width: int, depth: int, n: int) -> list[dict[str, Any]]:
    """Every (point set, weight decay, init) member of one shape at one ``N``, in one batch."""
    dtype, kinds = grid.torch_dtype, config.point_sets
    combos = [(k, wd, i) for k in kinds for wd in grid.weight_decays for i in range(grid.inits)]
    dim = y_test.shape[1]
    layers = init_members(dim, width, depth, [i for _, _, i in combos], dtype)
    x = torch.as_tensor(np.stack([train[k][0][:n] for k, _, _ in combos]), dtype=dtype)
    g = np.stack([train[k][1][:n] for k, _, _ in combos])
    mean, std = (g.mean(1, keepdims=True), g.std(1, keepdims=True)) if grid.scale_targets else (0.0, 1.0)
    t = torch.as_tensor((g - mean) / std, dtype=dtype).unsqueeze(-1)
    w = torch.as_tensor(reference_loss_weights(n), dtype=dtype).view(1, n, 1).expand(len(combos), n, 1)
    wd = torch.tensor([wd for _, wd, _ in combos], dtype=torch.float64)
    t0 = time.perf_counter()
    trained = train_batched(layers, x, t, w, wd, grid)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        r_train = (forward(trained, x, grid.activation) - t).squeeze(-1).double().numpy() * std
        out_test = forward(trained, torch.as_tensor(y_test, dtype=dtype), grid.activation)
        r_test = out_test.squeeze(-1).double().numpy() * std + mean - g_test
    e_t, e_g = reference_errors(r_train, r_test)
    return [{"point_set": k, "activation": grid.activation, "n": n, "width": width, "depth": depth,
             "weight_decay": wd_, "init": i, "E_G": float(e_g[b]), "E_T": float(e_t[b]),
             "seconds": seconds / len(combos)} for b, (k, wd_, i) in enumerate(combos)]


def run_reference(config: ReferenceConfig, cache_dir: str | Path | None = None) -> ReferenceResult:
    """Run every problem, activation, shape and ``N`` of ``config`` (only the optional data
    cache of :func:`_data` is written)."""
    t_start = time.perf_counter()
    records: list[dict[str, Any]] = []
    data_seconds = 0.0
    for pname in config.problems:
        problem = _problem(config, pname)
        t0 = time.perf_counter()
        train, y_test, g_test = _data(config, problem, cache_dir)
        data_seconds += time.perf_counter() - t0
        logger.info("%s: d=%d, data in %.1f s", pname, problem.dim, time.perf_counter() - t0)
        for p, act in config.runs():
            if p != pname:
                continue
            grid = replace(config.grid, activation=act)
            for n in config.sizes():
                t1 = time.perf_counter()
                for width, depth in grid.shapes():
                    for r in _train_shape(config, grid, train, y_test, g_test, width, depth, n):
                        records.append({"problem": p, **r})
                mine = [r for r in records if (r["problem"], r["activation"], r["n"]) == (p, act, n)]
                means = {k: np.mean([r["E_G"] for r in mine if r["point_set"] == k]) for k in config.point_sets}
                logger.info("%-11s %-4s N=%-5d %5.1f s  mean E_G %s", p, act, n, time.perf_counter() - t1,
                            "  ".join(f"{LABELS.get(k, k)} {v:.2e}" for k, v in means.items()))
    return ReferenceResult(config, records, time.perf_counter() - t_start, data_seconds, hardware())


# --------------------------------------------------------------------------- reporting
def _ci(r: dict[str, float]) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def rate_table(result: ReferenceResult | list[dict[str, Any]]) -> str:
    """Markdown: rates of ``E_G``, ``E_T`` and the gap with 95% bootstrap CIs, the paper's rates
    (from a result or from :meth:`ReferenceResult.summary` rows)."""
    rows = result.summary() if isinstance(result, ReferenceResult) else result
    out = ["| problem | act. | points | N | E_G rate [95% CI] | E_T rate [95% CI] | gap rate [95% CI] "
           "| paper E_G / gap | mean E_G at smallest / largest N |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = " / ".join(f"{r['paper'][k]:.2f}" if k in r["paper"] else "–" for k in ("E_G", "gap"))
        out.append(f"| {r['problem']} | {r['activation']} | {LABELS.get(r['point_set'], r['point_set'])} | "
                   f"{r['n'][0]}–{r['n'][-1]} | " + " | ".join(_ci(r["rates"][k]) for k in METRICS)
                   + f" | {paper if r['paper'] else '(none)'} | {r['E_G'][0]:.2e} / {r['E_G'][-1]:.2e} |")
    return "\n".join(out)


def error_table(result: ReferenceResult) -> str:
    """Markdown: member-mean ``E_G`` (and gap) for every ``N``."""
    ns = result.config.sizes()
    out = ["| problem | act. | points | error | " + " | ".join(f"N={n}" for n in ns) + " |",
           "|---|---|---|---|" + "---:|" * len(ns)]
    for r in result.summary():
        for k in METRICS:
            out.append(f"| {r['problem']} | {r['activation']} | {LABELS.get(r['point_set'], r['point_set'])} | {k} | "
                       + " | ".join(f"{v:.1e}" for v in r[k]) + " |")
    return "\n".join(out)


def figure(result: ReferenceResult | list[dict[str, Any]]):
    """Log-log ``E_G`` (solid) and gap (dotted) against ``N``: one panel per (problem,
    activation), one colour per point set, fitted rates in the legend (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.summary() if isinstance(result, ReferenceResult) else result
    runs = list(dict.fromkeys((r["problem"], r["activation"]) for r in rows))
    fig = Figure(figsize=(3.3 * len(runs), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    colors = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(r["point_set"] for r in rows))}
    for ax, (p, a) in zip(axes, runs):
        for r in (r for r in rows if (r["problem"], r["activation"]) == (p, a)):
            lab, c = LABELS.get(r["point_set"], r["point_set"]), colors[r["point_set"]]
            ax.loglog(r["n"], r["E_G"], "-o", ms=3, color=c, label=f"{lab} E_G ({r['rates']['E_G']['rate']:.2f})")
            ax.loglog(r["n"], r["gap"], ":s", ms=3, color=c, label=f"{lab} gap ({r['rates']['gap']['rate']:.2f})")
        ax.set_title(f"{p}, {a}", fontsize=9)
        ax.set_xlabel("N training points", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, title="points, error (rate)", title_fontsize=6)
    axes[0].set_ylabel("member mean (absolute RMSE)", fontsize=8)
    return fig


def write_report(result: ReferenceResult, out_dir: str | Path, name: str = "qmc_reference",
                 title: str = "QMC surrogates under the reference protocol", note: str = "") -> dict[str, Path]:
    """Write ``{name}.md`` (tables, hardware, resolved config), ``{name}.png`` and ``{name}.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    figure(result).savefig(png, dpi=90)
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(result.to_dict(), indent=1, default=_json_default))
    c, g, info = result.config, result.config.grid, result.info
    md = [
        f"# {title}", "",
        f"Date {time.strftime('%Y-%m-%d')}. Hardware: {info['cpu']} ({info['cores']} cores, {info['machine']}), "
        f"torch {info['torch']} ({info['torch_threads']} thread), scipy {info['scipy']}, numpy {info['numpy']}. "
        f"Wall time {result.seconds / 60:.1f} min (data {result.data_seconds:.0f} s), one run.",
        f"Grid: widths {list(g.widths)} x depths {list(g.depths)} (linear layers) x weight decay "
        f"{list(g.weight_decays)} x {g.inits} inits = {len(g.members())} members per N and point set; "
        f"Adam {g.epochs} epochs, lr {g.lr:g}, full batch, {g.dtype}; loss 2 MSE(P_N) + MSE(P_N/2) on nested sets; "
        f"N = 2^{c.log2_n_min} ... 2^{c.log2_n_max}; test set 2^{c.log2_test} scrambled Sobol' points.",
        "E_G = test RMSE, E_T = sqrt|2 MSE(P_N) - MSE(P_N/2)|, both arithmetic means over the members; "
        "gap = |mean E_G - mean E_T|; rate = minus the least-squares slope of log error vs log N; "
        f"[95% CI] from {c.n_boot} bootstrap resamples of the members.", "", *([note, ""] if note else []),
        rate_table(result), "", "## Member means per N", "", error_table(result), "",
        f"![error vs N]({png.name})", "", "## Resolved config", "", "```json",
        json.dumps(c.to_dict(), indent=1, default=_json_default), "```", "",
    ]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    return {"md": md_path, "png": png, "json": js}
