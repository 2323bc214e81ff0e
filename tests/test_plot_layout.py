"""Plot layout: no two drawn labels overlap (bounding boxes from the Agg renderer) in the
report plots and the QMC plot for crowded but representative inputs; legends stay off the
data; ``qmc study`` refuses to overwrite its output without ``--force``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.legend import Legend
from matplotlib.text import Text

import resprune.plots as P
from resprune.qmc import study as S
from resprune.qmc.cli import main as qmc_main


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts (and legend boxes) whose window extents overlap; a legend's own
    entries and title are inside it by design, tick labels of ticks outside the view are not
    drawn."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * abs(hi - lo)
            for t in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - eps <= t.get_loc() <= hi + eps:
                    hidden |= {id(t.label1), id(t.label2)}
    owner, items = {}, []
    for lg in fig.findobj(Legend):
        items.append(("<legend>", lg.get_window_extent(r), lg))
        owner.update({id(t): lg for t in [*lg.get_texts(), lg.get_title()]})
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and id(t) not in hidden:
            items.append((t.get_text(), t.get_window_extent(r), owner.get(id(t))))
    return [(a, b) for i, (a, ba, la) in enumerate(items) for b, bb, lb in items[i + 1:]
            if ba.overlaps(bb) and not (a == "<legend>" and lb is la) and not (b == "<legend>" and la is lb)]


def legends_on_data(fig) -> bool:
    r = fig.canvas.get_renderer()
    return any(lg.get_window_extent(r).overlaps(ax.get_window_extent(r))
               for lg in fig.findobj(Legend) for ax in fig.axes if ax.axison)


CROWDED = {  # ratios near and above the 100% line, many batch sizes, accuracies near 100%
    "name": "tv_resnet18_imagefolder_with_a_long_name",
    "before": {"macs": 100, "params": 100, "test_acc": 100.0, "stage": "sparse"},
    "after": {"macs": 40, "params": 99, "test_acc": 99.9, "stage": "finetuned"},
    "latency": {str(b): {"ratio": q} for b, q in ((1, 1.01), (8, 0.97), (64, 0.5), (256, 1.2), (1024, 0.45))},
}


@pytest.mark.parametrize("run", [
    CROWDED,
    {**CROWDED, "latency": {}, "after": {"macs": 40, "params": 99, "test_acc": None}},
    {**CROWDED, "before": {**CROWDED["before"], "test_acc": 30.0}},
])
def test_before_after_labels_do_not_overlap(run, tmp_path):
    fig = P.before_after_figure(run)
    assert text_overlaps(fig) == []
    assert not legends_on_data(fig)
    assert P.plot_before_after(run, tmp_path / "ba.png").stat().st_size > 1000


def test_other_report_plots_labels_do_not_overlap():
    names = [f"layer{s}.{i}.conv{c}" for s in (1, 2, 3) for i in range(9) for c in (1, 2)]
    run = {"name": "resnet56", "scales": {"names": names, "values": [0.3 * (i % 3) for i in range(len(names))],
                                          "threshold": 0.01},
           "removed": names[::3], "max_removed_scale": 0.0, "units_per_stage": {"layer1": 18, "layer2": 17, "layer3": 17},
           "removed_per_stage": {"layer1": 15, "layer2": 12, "layer3": 8},
           "before": {"macs": 125e6, "test_acc": 85.5}, "after": {"macs": 43e6, "test_acc": 83.7}}
    figs = []
    keep = P._save
    try:
        P._save = lambda fig, path: figs.append(fig)
        P.plot_scales(run, "unused.png")
        P.plot_removed_per_stage(run, "unused.png")
        P.plot_acc_vs_macs([dict(run, name=f"run{i}", after={"macs": (43 + 9 * i) * 1e6, "test_acc": 83.7 - i})
                            for i in range(3)], "unused.png")
    finally:
        P._save = keep
    assert [text_overlaps(f) for f in figs] == [[], [], []]


def synthetic_study(problems=("smooth50", "elliptic16", "elliptic32", "parabolic16")) -> S.StudyResult:
    """A study result with made-up errors (no training): ReLU ablation on elliptic16."""
    cfg = S.StudyConfig(problems=problems, log2_n_min=4, log2_n_max=10, ensemble=2)
    rng = np.random.default_rng(0)
    recs = [{"problem": p, "point_set": k, "activation": a, "member": e, "n": n, "rel_l2": 0.1,
             "nrmse": float(n ** -rng.uniform(0.8, 1.3) * rng.uniform(0.5, 2))}
            for p, k, a in cfg.runs() for e in range(cfg.ensemble) for n in cfg.sizes()]
    return S.StudyResult(cfg, recs, 1.0, 0.5, S.hardware())


@pytest.mark.parametrize("problems", [("smooth50", "elliptic16", "elliptic32", "parabolic16"), ("elliptic16",)])
def test_qmc_plot_labels_do_not_overlap(problems):
    fig = S.figure(synthetic_study(problems))
    assert text_overlaps(fig) == []
    assert not legends_on_data(fig)  # each legend in its own row under its panel
    r = fig.canvas.get_renderer()
    heights = {round(ax.get_window_extent(r).height) for ax in fig.axes if ax.axison}
    assert len(heights) == 1  # panels aligned although their legends differ in length


def test_qmc_study_refuses_to_overwrite(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "t.md"
    out.write_text("an earlier study")
    argv = ["study", "--problems", "smooth50", "--ablation-problems", "", "--out", str(tmp_path), "--name", "t",
            "--quiet"]
    monkeypatch.setattr(S, "run_study", lambda cfg: pytest.fail("the study ran before the check"))
    assert qmc_main(argv) == 2
    err = capsys.readouterr().err
    assert "t.md exists" in err and "--force" in err and "nothing was overwritten" in err
    assert out.read_text() == "an earlier study"
    monkeypatch.setattr(S, "run_study", lambda cfg: synthetic_study(("smooth50",)))
    assert qmc_main([*argv, "--force"]) == 0
    assert "| smooth50 |" in out.read_text() and (tmp_path / "t.png").is_file()
    (tmp_path / "t.md").unlink()
    (tmp_path / "t.json").unlink()  # any one of the three outputs is protected
    assert qmc_main(argv) == 2 and "t.png exists" in capsys.readouterr().err
