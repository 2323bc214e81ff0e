"""One run-directory type for every stage: provenance, invalidation of later results when a
stage is re-run, refusals that name the stage to re-run, fine-tuning that starts from
pruned.pt every time. First on small made-up files, then on a finished (shortened) quickstart."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import resprune as rp
from resprune.cli import main
from resprune.rundir import OUTPUTS, RunDir, RunDirError


def _stage(run: RunDir, stage: str, content: str, inputs=()) -> None:
    """Run a made-up ``stage`` that writes ``content`` into each of its results."""
    with run.writing(stage, {"content": content}, inputs):
        for rel in OUTPUTS[stage]:
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_text(f"{rel}: {content}")
        key = {"train": "sparse", "prune": "pruned", "fuse": "fused"}.get(stage)
        if key:
            m = run.read_json("metrics.json")
            m.setdefault("stages", {})[key] = content
            run.write_json("metrics.json", m)


def _pipeline(tmp_path) -> RunDir:
    run = RunDir(tmp_path)
    _stage(run, "train", "t")
    _stage(run, "prune", "p1", ["sparse.pt"])
    _stage(run, "fuse", "f", ["sparse.pt", "pruned.pt"])
    _stage(run, "export", "e", ["fused.pt", "fused_unpruned.pt"])
    _stage(run, "bench", "b", ["onnx/unpruned.onnx", "onnx/pruned.onnx"])
    return run


def test_rerun_with_new_results_moves_later_results_away(tmp_path):
    run = _pipeline(tmp_path)
    assert all(run.current(s) for s in ("train", "prune", "fuse", "export", "bench"))
    rec = run.records()["fuse"]
    assert rec["inputs"] == {"pruned.pt": run.sha256("pruned.pt"), "sparse.pt": run.sha256("sparse.pt")}
    assert rec["outputs"]["fused.pt"] == run.sha256("fused.pt") and rec["config"] == {"content": "f"}
    _stage(run, "prune", "p1", ["sparse.pt"])  # the same results again: nothing later is touched
    assert run.current("bench") and (run / "bench.json").is_file()
    _stage(run, "prune", "p2", ["sparse.pt"])  # other results: fuse, export, bench are moved away
    for stage in ("fuse", "export", "bench"):
        assert run.records()[stage]["state"] == "invalidated" and run.records()[stage]["by"] == "prune"
        for rel in OUTPUTS[stage]:
            assert not (run / rel).exists() and (run / "stale" / stage / rel).is_file()
    assert set(run.read_json("metrics.json")["stages"]) == {"sparse", "pruned"}
    assert json.loads((run / "stale" / "fuse" / "metrics.json").read_text()) == {"fused": "f"}
    with pytest.raises(RunDirError) as e:
        run.need("bench.json", "report")
    msg = str(e.value)
    assert "bench.json is out of date: the bench results were moved to stale/bench/ when `prune` was re-run" in msg
    assert msg.endswith(f"re-run `resprune fuse {tmp_path}`, then export, bench") and "\n" not in msg
    assert run.need("pruned.pt", "fuse")  # prune itself is current


def test_changed_input_and_unfinished_stage_are_refused(tmp_path):
    run = _pipeline(tmp_path)
    (run / "pruned.pt").write_text("replaced by hand")
    with pytest.raises(RunDirError, match=r"`fuse` made its results from another pruned.pt .*re-run `resprune fuse "
                                          r".*`, then export, bench"):
        run.need("bench.json", "report")
    assert not run.current("prune")  # its result is not the one it wrote
    run = _pipeline(tmp_path / "b")
    run._put("export", {"state": "running", "time": "T"})  # a process killed mid-write
    with pytest.raises(RunDirError, match=r"`export` did not finish writing its results \(started T\); re-run "
                                          r"`resprune export .*`, then bench$"):
        run.need("bench.json", "report")


def test_a_stage_that_fails_without_writing_keeps_its_record_and_metrics(tmp_path):
    run = _pipeline(tmp_path)
    before = run.records()["prune"]
    with pytest.raises(ValueError), run.writing("prune", {}, ["sparse.pt"]):
        raise ValueError("threshold would empty a stage")
    assert run.records()["prune"] == before and run.read_json("metrics.json")["stages"]["pruned"] == "p1"
    assert run.current("bench")
    with pytest.raises(ValueError), run.writing("prune", {}, ["sparse.pt"]):
        (run / "pruned.pt").write_text("half")
        raise ValueError("died after the first file")
    assert run.records()["prune"]["state"] == "failed"
    with pytest.raises(RunDirError, match="`prune` did not finish"):
        run.need("prune.json", "report")


def test_missing_file_names_the_stage_and_a_legacy_directory_is_read(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=r"fused.pt is missing: run `resprune fuse .*` first \(`export` needs it\)"):
        run.need("fused.pt", "export")
    (tmp_path / "fused.pt").write_text("written before provenance existed")
    assert run.need("fused.pt", "export") == tmp_path / "fused.pt"
    for rel in ("pruned.pt", "prune.json"):
        (tmp_path / rel).write_text("old")
    with run.writing("prune", {}, []):  # re-run there with the same results: nothing later is touched
        for rel in ("pruned.pt", "prune.json"):
            (tmp_path / rel).write_text("old")
    assert (tmp_path / "fused.pt").is_file() and run.current("prune")
    with run.writing("prune", {}, []):  # other results: the fused model of the old one goes
        (tmp_path / "pruned.pt").write_text("new")
    assert not (tmp_path / "fused.pt").exists() and (tmp_path / "stale" / "fuse" / "fused.pt").is_file()


# --------------------------------------------------------------------------- a real run

FAST = ["--set", "train.epochs=2", "--set", "finetune.epochs=2", "--set", "prune.target_macs=0.8",
        "--set", "export.bench_runs=3", "--set", "export.bench_warmup=1", "--set", "export.bench_batches=[1]"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(1)  # the fine-tuning comparison is bitwise
    out = tmp_path_factory.mktemp("runs") / "qs"
    assert main(["-q", "run", "quickstart", "--out", str(out), *FAST]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_reprune_invalidates_fused_onnx_bench_and_report(finished, tmp_path, capsys):
    """README's example: `resprune prune RUN --set prune.target_macs=...` on a finished run.
    The fine-tuned, fused, exported and timed results of the old model are moved away; report
    and bench refuse with one line naming the stage to re-run; a report without latency shows
    the new pruning only; re-running the stages gives a report of the new model."""
    d = _copy(finished, tmp_path / "run")
    old = json.loads((d / "report.json").read_text())["runs"][0]
    assert main(["-q", "prune", str(d), "--set", "prune.target_macs=0.5"]) == 0
    new_macs = json.loads((d / "prune.json").read_text())["macs_after"]
    assert new_macs <= 0.5 * old["before"]["macs"] < old["after"]["macs"]
    for stage, rel in (("finetune", "finetuned.pt"), ("finetune", "checkpoints/finetune.pt"), ("fuse", "fused.pt"),
                       ("export", "onnx/pruned.onnx"), ("bench", "bench.json"), ("report", "report.md")):
        assert not (d / rel).exists() and (d / "stale" / stage / rel).is_file(), rel
    assert set(json.loads((d / "metrics.json").read_text())["stages"]) == {"sparse", "pruned"}
    plan = f"re-run `resprune finetune {d}`, then fuse, export"
    for argv, needs in ((["report", str(d)], "bench.json"), (["bench", str(d)], "onnx/unpruned.onnx")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{d / needs} is out of date" in err and "when `prune` was re-run" in err and plan in err
        assert err.count("\n") == 1
    assert main(["-q", "report", str(d), "--no-latency"]) == 0
    r = json.loads((d / "report.json").read_text())["runs"][0]
    assert r["after"]["stage"] == "pruned" and r["after"]["macs"] == new_macs and r["latency"] == {}
    assert f"{old['after']['macs'] / 1e6:.2f}" not in (d / "report.md").read_text().split("| MACs (M) |")[1][:40]
    for stage in ("finetune", "fuse", "export", "bench", "report"):
        assert main(["-q", stage, str(d)]) == 0, stage
    r = json.loads((d / "report.json").read_text())["runs"][0]
    assert r["after"]["stage"] == "finetuned" and r["after"]["macs"] == new_macs
    bench = json.loads((d / "bench.json").read_text())
    assert {m["name"]: m["sha256"] for m in bench["models"]} == {
        k: RunDir(d).sha256(f"onnx/{k}.onnx") for k in ("unpruned", "pruned")}
    assert json.loads((d / "onnx" / "pruned.json").read_text())["macs_per_sample"] == new_macs


def test_finetune_twice_starts_from_pruned_pt(finished, tmp_path):
    """Fine-tuning again trains `finetune.epochs` epochs from pruned.pt, not from the
    fine-tuned model: the same model as the first time, and metrics say how it was made."""
    d = _copy(finished, tmp_path / "run")
    pruned = (d / "pruned.pt").read_bytes()
    first = rp.load(d / "finetuned.pt").state_dict()
    assert main(["-q", "finetune", str(d)]) == 0
    assert main(["-q", "finetune", str(d)]) == 0
    m = json.loads((d / "metrics.json").read_text())["stages"]["finetuned"]
    assert m["epochs"] == 2 and len(m["history"]) == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["from"] == {"file": "pruned.pt", "sha256": RunDir(d).sha256("pruned.pt")}
    assert (d / "pruned.pt").read_bytes() == pruned
    again = rp.load(d / "finetuned.pt").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not (d / "fused.pt").exists() and (d / "stale" / "fuse" / "fused.pt").is_file()
