"""Pruning a trained net (issue 27): start from trained weights (``model.init``), the public prox
step and its momentum reset, the λ ramp, BN recalibration after pruning, the gain and Taylor
rankings, distillation from the unpruned net, learning-rate rewinding; and their bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.cli import main
from resprune.config import RecipeError, TrainConfig, load_recipe
from resprune.prune import PruneError, prune_, recalibrate_bn_, removal_units, taylor_scores
from resprune.serialization import CheckpointError, load_weights_, read_weights, save_weights
from resprune.sparsity import LayerScaleL1, removable_scales
from resprune.train.distill import distill_loss
from resprune.train.loop import lr_lambda, param_groups

FAST = ["--set", "train.epochs=2", "--set", "finetune.epochs=1", "--set", "export.bench_runs=3",
        "--set", "export.bench_warmup=1", "--set", "export.bench_batches=[1]"]


def _opt(model, lr=0.1, momentum=0.9):
    return torch.optim.SGD(param_groups(model, 5e-4), lr=lr, momentum=momentum)


# ----------------------------------------------------------------------------- prox step
def test_prox_gives_exact_zeros_in_a_users_own_loop():
    torch.manual_seed(0)
    model = rp.create_model("resnet20", num_classes=10)
    opt, reg = _opt(model), LayerScaleL1(0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(4):  # the prox shrinks by lr·λ/(1−β) = 0.5 a step: scales near 1 hit 0 in 2–3 steps
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        reg.prox_(model, opt)
    values = [float(m.scale.detach()) for _, m in removable_scales(model)]
    assert values and all(v == 0.0 for v in values)  # λ far above the task gradient: all exactly 0
    report = rp.prune_(model, rp.PruneConfig(threshold=1e-12, min_layers_per_stage=0))
    assert len(report.removed) == len(removal_units(rp.create_model("resnet20")))


@pytest.mark.parametrize("reset", [False, True])
def test_momentum_reset_keeps_a_zeroed_scale_at_zero(reset):
    """A scale just zeroed with momentum gathered on its way down: under a task gradient below
    λ the reset keeps it at 0 for good; without it the momentum revives it for some steps."""
    s = torch.nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.SGD([s], lr=0.1, momentum=0.9)
    opt.state[s]["momentum_buffer"] = torch.tensor(-5.0)  # pushed down hard before it hit 0
    reg, revived = LayerScaleL1(0.05), 0
    reg.prox_([s], opt, reset_momentum=reset)  # the prox step that zeroed it
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        s.grad = 0.02 * torch.randn((), generator=gen)  # task gradient noise below λ
        opt.step()
        reg.prox_([s], opt, reset_momentum=reset)
        revived += bool(s != 0)
    assert (revived == 0) if reset else revived > 5


def test_prox_refuses_a_scale_the_optimizer_does_not_hold():
    model = rp.create_model("resnet20")
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        LayerScaleL1(0.1).prox_(model, opt)


def test_l1_ramps_over_its_warmup_epochs():
    from resprune.config import DataConfig
    from resprune.data import ArrayDataset, DeviceLoader
    from resprune.train import Trainer

    ds = ArrayDataset(torch.randint(0, 255, (64, 8, 8, 1), dtype=torch.uint8).numpy(),
                      torch.randint(0, 10, (64,)).numpy(), [str(i) for i in range(10)])
    loader = DeviceLoader.from_config(ds, DataConfig(batch_size=16), train=True, device=torch.device("cpu"), seed=0)
    t = Trainer(rp.create_model("resnet20", in_chans=1), loader, loader,
                TrainConfig(epochs=3, l1=0.2, l1_warmup_epochs=2, bf16=False, device="cpu"))
    lams = []
    for x, y in loader:  # one epoch = 4 steps of the 8-step ramp
        t._step(x, y)
        t.scheduler.step()
        lams.append(t.l1.lam)
    assert lams == pytest.approx([0.2 * k / 8 for k in (1, 2, 3, 4)])


# ----------------------------------------------------------------------------- after pruning
def test_recalibration_sets_bn_statistics_to_the_data_seen():
    torch.manual_seed(0)
    model = rp.create_model("resnet20", num_classes=10).eval()
    for m in model.modules():  # stale statistics, as after removing layers upstream
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(0.1, 5)
    batches = [torch.rand(16, 3, 32, 32) for _ in range(3)]
    recalibrate_bn_(model, batches)
    first = model.stem.bn
    z = torch.cat([model.stem.conv(b) for b in batches])
    assert torch.allclose(first.running_mean, z.mean((0, 2, 3)), atol=1e-5)  # cumulative over all batches
    assert not model.training and first.momentum == 0.1  # modes and momentum restored


def test_gain_ranks_by_the_branch_output_not_the_scale_alone():
    model = rp.create_model("resnet20")
    units = {u.name: u for u in removal_units(model)}
    victim = "layer2.1.conv1"
    with torch.no_grad():
        model.get_submodule(victim).bn.weight.mul_(1e-3)  # weight decay shrank γ, β; s stayed 1
        model.get_submodule(victim).bn.bias.zero_()
    by_scale = prune_(rp.create_model("resnet20"), rp.PruneConfig(target_macs=40_000_000, rank="scale"))
    by_gain = prune_(model, rp.PruneConfig(target_macs=40_000_000, rank="gain"))
    assert by_gain.removed == [victim] and by_scale.removed != [victim]
    assert units[victim].gain == pytest.approx(1.0)  # |s|·RMS(γ, β) with γ = 1, β = 0


def test_taylor_scores_are_zero_for_a_zero_scale_and_needed_for_taylor_rank():
    torch.manual_seed(0)
    model = rp.create_model("resnet20", num_classes=10)
    with torch.no_grad():
        model.layer1[1].conv2.scale.zero_()
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    scores = taylor_scores(model, batches)
    dead = {"layer1.1.conv2", "layer1.1.conv1"}  # the zero gate, and the conv that only feeds its branch
    assert all(scores[k] == 0.0 for k in dead) and min(v for k, v in scores.items() if k not in dead) > 0
    with pytest.raises(PruneError, match="rank='taylor' needs scores"):
        prune_(model, rp.PruneConfig(target_macs=0.8, rank="taylor"))
    report = prune_(model, rp.PruneConfig(target_macs=0.95, rank="taylor"), scores=scores)
    assert report.removed and set(report.removed) <= dead  # the least important by the scores: a dead unit


# ----------------------------------------------------------------------------- fine-tuning
def test_distill_loss_is_ce_plus_scaled_kl():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    ce = F.cross_entropy(s, y)
    assert float(distill_loss(s, t, ce, 0.0, 4.0)) == pytest.approx(float(ce))
    p = F.softmax(t / 2, 1)
    kl = (p * (p.log() - F.log_softmax(s / 2, 1))).sum(1).mean()
    assert float(distill_loss(s, t, ce, 0.7, 2.0)) == pytest.approx(float(0.3 * ce + 0.7 * 4 * kl), rel=1e-5)


def test_lr_rewinding_follows_the_tail_of_the_longer_cosine():
    cfg = TrainConfig(epochs=10, lr=0.1, rewind_of=30)
    f = lr_lambda(cfg, steps_per_epoch=5)
    assert f(0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 30)))  # where epoch 21 of 30 started
    assert f(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 149 / 150))) and f(50) == pytest.approx(0.0)
    with pytest.raises(RecipeError, match="rewind_of=5 rewinds"):
        TrainConfig(epochs=10, rewind_of=5)


@pytest.mark.parametrize("kw,match", [
    ({"distill": 1.5}, "distill must be a weight in"),
    ({"teacher": "other"}, "teacher must be"),
    ({"distill_temperature": 0}, "distill_temperature must be"),
    ({"l1_warmup_epochs": -1}, "l1_warmup_epochs must be"),
    ({"rewind_of": 10, "warmup_epochs": 1}, "needs schedule"),
])
def test_bad_fine_tune_options(kw, match):
    with pytest.raises(RecipeError, match=match):
        TrainConfig(epochs=5, **kw)


# ----------------------------------------------------------------------------- trained weights
def test_weights_round_trip_and_mismatches_name_what_differs(tmp_path):
    m = rp.create_model("resnet20", num_classes=10)
    save_weights(m, tmp_path / "w.safetensors", metadata={"test_accuracy": "12.5"})
    m2 = load_weights_(rp.create_model("resnet20", num_classes=10), tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    torch.save(m.state_dict(), tmp_path / "w.pt")
    assert read_weights(tmp_path / "w.pt").keys() == m.state_dict().keys()
    with pytest.raises(CheckpointError, match=r"of another shape \(e.g. head.fc.bias: \[10\] in the file, \[100\]"):
        load_weights_(rp.create_model("resnet20", num_classes=100), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_weights_(rp.create_model("resnet32", num_classes=10), tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A trained quickstart net (no L1): its run directory and its weights as safetensors."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert main(["-q", "train", "quickstart", "--out", str(out), "--set", "train.epochs=3",
                 "--set", "train.l1=0"]) == 0
    save_weights(rp.load(out / "sparse.pt"), out.parent / "teacher.safetensors")
    return out


def test_prune_a_trained_net_end_to_end(teacher, tmp_path):
    """model.init from published weights → short sparsify with a λ ramp → budget pruning by gain
    with BN recalibration → fine-tuning distilled from the teacher with LR rewinding."""
    out = tmp_path / "p"
    acc0 = json.loads((teacher / "metrics.json").read_text())["stages"]["sparse"]["test_acc"]
    assert main(["-q", "run", "quickstart", "--out", str(out), *FAST,
                 "--set", f"model.init={teacher.parent / 'teacher.safetensors'}",
                 "--set", "train.epochs=1", "--set", "train.l1_warmup_epochs=0.5", "--set", "train.l1_reset_momentum=true",
                 "--set", "prune.target_macs=0.6", "--set", "prune.rank=gain", "--set", "prune.recalibrate_batches=4",
                 "--set", "finetune.distill=0.5", "--set", "finetune.teacher=init", "--set", "finetune.lr=0.05",
                 "--set", "finetune.rewind_of=4", "--set", "finetune.epochs=2"]) == 0
    m = json.loads((out / "metrics.json").read_text())["stages"]
    assert m["sparse"]["history"][0]["train_acc"] > 50 and acc0 > 50  # started trained, not from scratch
    assert m["pruned"]["macs"] <= 0.6 * m["sparse"]["macs"] and "before_recalibration" in m["pruned"]
    assert m["finetuned"]["history"][0]["lr"] < 0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 4)) + 1e-9
    assert json.loads((out / "recipe.json").read_text())["finetune"]["distill"] == 0.5


@pytest.mark.parametrize("setting,match", [
    ("model.init={w}", "head.fc.bias: [10] in the file, [100] in the model"),
    ("model.init=/nonexistent/w.safetensors", "model.init='/nonexistent/w.safetensors': no such weights file"),
    ("finetune.distill=0.5", "finetune.teacher = \"init\" distils from model.init's weights, but model.init is not set"),
])
def test_bad_trained_weights_fail_before_anything_is_written(teacher, tmp_path, capsys, setting, match):
    w = teacher.parent / "teacher.safetensors"
    extra = ["--set", "finetune.teacher=init"] if "distill" in setting else []
    data = ["--set", "data.dataset=cifar100", "--data-dir", str(tmp_path)] if "{w}" in setting else []
    assert main(["run", "quickstart", "--out", str(tmp_path / "r"), "--set", setting.format(w=w), *extra, *data]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_teacher_sparse_is_refused_in_train():
    with pytest.raises(RecipeError, match="would distil from the model being trained"):
        load_recipe("quickstart", ["train.distill=0.5"])
