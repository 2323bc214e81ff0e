"""CLI and study of resprune.qmc: argument wiring, report files, and a small MC-vs-QMC study."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from resprune.qmc.cli import add_subparser, main
from resprune.qmc.study import StudyConfig, fit_rate


def test_add_subparser_wires_qmc_study() -> None:
    parser = argparse.ArgumentParser(prog="resprune")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["qmc", "study", "--problems", "smooth50,elliptic16", "--log2-n", "3:6"])
    assert args.problems == ("smooth50", "elliptic16") and args.log2_n == (3, 6)
    assert callable(args.func)


def test_fit_rate_recovers_power_law() -> None:
    ns = 2.0 ** np.arange(4, 12)
    rate, c = fit_rate(ns, 3.0 * ns**-1.3)
    assert rate == pytest.approx(1.3, abs=1e-12) and c == pytest.approx(3.0, rel=1e-12)


def test_study_config_validation() -> None:
    with pytest.raises(ValueError):
        StudyConfig(problems=("nope",))
    with pytest.raises(ValueError):
        StudyConfig(point_sets=("halton",))
    with pytest.raises(ValueError):
        StudyConfig(log2_n_min=5, log2_n_max=4)
    runs = list(StudyConfig(problems=("smooth50", "elliptic16")).runs())
    assert len(runs) == 3 + 6  # ReLU ablation only on elliptic16


def test_cli_study_writes_report(tmp_path: Path) -> None:
    rc = main(["study", "--problems", "smooth50,parabolic16", "--ablation-problems", "parabolic16",
               "--log2-n", "3:4", "--ensemble", "1", "--log2-test", "7", "--adam-epochs", "10",
               "--lbfgs-iters", "5", "--grid", "8", "--out", str(tmp_path), "--name", "t", "--quiet"])
    assert rc == 0
    md = (tmp_path / "t.md").read_text()
    assert "| parabolic16 | 16 | MC | relu |" in md and "torch" in md and "Resolved config" in md
    assert (tmp_path / "t.png").stat().st_size > 1000
    data = json.loads((tmp_path / "t.json").read_text())
    assert len(data["records"]) == (3 + 6) * 2  # runs x sizes, one member
    assert all(math.isfinite(r["nrmse"]) for r in data["records"])
    assert main(["study", "--problems", "nope", "--out", str(tmp_path)]) == 2


def test_standalone_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0 and "--point-sets" in capsys.readouterr().out
