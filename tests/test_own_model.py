"""A model of your own end to end (docs/own-model.md): a torchvision ResNet-18 converted,
pruned and fused, saved and reloaded with its constructor (``rp.load(path, model=...)``) and
without its class (``rp.save_program`` / ``rp.load_program``, checked archive); entry-point
factories; torchvision nets under the registry."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import randomize_, rel_err
from torch import nn

import resprune as rp

GONE = ("layer1.1.conv1", "layer3.1.conv1")  # first convs of two blocks (identity ResConvs)


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _convert_prune_fuse(m: nn.Module) -> tuple[nn.Module, nn.Module]:
    """convert → (L1 training would zero some scales: zeroed here) → prune → fuse."""
    rp.convert_(m)
    randomize_(m, seed=3)
    with torch.no_grad():
        for n in GONE:
            m.get_submodule(n).scale.zero_()
    rep = rp.prune_(m.eval(), rp.PruneConfig(threshold=1e-2))
    assert rep.removed == list(GONE)
    return m, rp.fuse(m)


def _roundtrip(model: nn.Module, tmp_path: Path, name: str) -> None:
    """Both ways back, outputs checked against the in-memory model at batch 1 and 3."""
    pt, pt2 = tmp_path / f"{name}.pt", tmp_path / f"{name}.pt2"
    rp.save(model, pt)
    with pytest.raises(rp.CheckpointError, match=r"model of your own \(torchvision\.models\.resnet\.ResNet\)"):
        rp.load(pt)  # the class is not resprune's to build
    back = rp.load(pt, model=_resnet18()).eval()
    assert back.state_dict().keys() == model.state_dict().keys()
    rp.save_program(model, pt2, input_size=(1, 3, 32, 32))
    prog = rp.load_program(pt2)
    for b in (1, 3):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            y = model(x)
            assert torch.equal(back(x), y)  # same modules, same weights
            torch.testing.assert_close(prog(x), y, rtol=1e-5, atol=1e-5)  # fp32


def test_torchvision_resnet18_pruned_and_fused_both_ways(tmp_path):
    torch.manual_seed(0)
    pruned, fused = _convert_prune_fuse(_resnet18())
    assert pruned.resprune_arch.to_dict() == {"factory": "user", "class": "torchvision.models.resnet.ResNet",
                                              "kwargs": {}, "ops": [["convert"], ["remove", list(GONE)]]}
    assert fused.resprune_arch.ops[-1] == ["fuse"]  # fuse() recorded on the copy only
    _roundtrip(pruned, tmp_path, "pruned")
    _roundtrip(fused, tmp_path, "fused")
    raw = torch.load(tmp_path / "fused.pt", weights_only=True)
    assert raw["arch"]["factory"] == "user"


def test_pretrained_style_weights_then_convert_prune_fuse(tmp_path):
    """Weights loaded from a file into the torchvision net first (as pretrained ones would be)."""
    torch.manual_seed(1)
    src = randomize_(_resnet18(), seed=11)
    weights = tmp_path / "weights.pth"
    torch.save(src.state_dict(), weights)
    m = _resnet18()
    m.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), src.eval()(x))
    conv_w = m.layer2[0].conv1.weight.clone()
    pruned, fused = _convert_prune_fuse(m)
    assert torch.equal(pruned.layer2[0].conv1.conv.weight, conv_w)  # conversion keeps the weights
    _roundtrip(fused, tmp_path, "fused")


def test_reloaded_module_trains_and_prunes_further(tmp_path):
    """The constructor path gives back a module: fine-tune it, prune it again, save again."""
    torch.manual_seed(2)
    pruned, _ = _convert_prune_fuse(_resnet18())
    rp.save(pruned, tmp_path / "p.pt")
    m = rp.load(tmp_path / "p.pt", model=_resnet18()).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    before = m.fc.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, m.fc.weight)
    with torch.no_grad():
        m.layer2[1].conv1.scale.zero_()
    rp.prune_(m.eval(), rp.PruneConfig(threshold=1e-2))
    rp.save(m, tmp_path / "p2.pt")
    again = rp.load(tmp_path / "p2.pt", model=_resnet18()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    assert isinstance(again.layer2[1].conv1, nn.Identity)


def test_wrong_constructor_is_a_checkpoint_error(tmp_path):
    pruned, _ = _convert_prune_fuse(_resnet18())
    rp.save(pruned, tmp_path / "p.pt")
    with pytest.raises(rp.CheckpointError, match="weights do not match|do not apply") as e:
        rp.load(tmp_path / "p.pt", model=torchvision.models.resnet34(num_classes=10))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="convert_"):
        rp.save(_resnet18(), tmp_path / "plain.pt")  # resprune never touched it: nothing recorded


@pytest.mark.parametrize("when", ["after", "before"])
def test_save_refuses_a_hand_edited_model(tmp_path, when):
    """A conv replaced by hand after ``convert_`` is not in the record: ``rp.load`` could not
    rebuild the module, so ``rp.save`` refuses it in one line naming the module, whether the
    edit came after the last recorded operation or before one (here: before ``prune_``)."""
    m = rp.convert_(_resnet18())
    m.layer2[0].conv1 = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)  # a plain conv again
    if when == "before":
        with torch.no_grad():
            m.layer1[1].conv1.scale.zero_()
        rp.prune_(m.eval(), rp.PruneConfig(threshold=1e-2))
    op = "'convert'" if when == "after" else "'remove'"
    with pytest.raises(rp.CheckpointError, match=rf"cannot save ResNet: the module was changed outside resprune "
                       rf"{when} the recorded {op} operation \(module 'layer2\.0\.conv1' is a Conv2d, the record "
                       r"has a ResConv2d\)") as e:
        rp.save(m, tmp_path / "m.pt")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


class ScaledResidual(nn.Module):
    """A block of your own that resprune does not know: ``relu(a·conv(x) + x)``, with a
    ``fuse()`` method returning its deploy form (the shortcut as a Dirac kernel)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.a = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a * self.conv(x) + x)

    def fuse(self) -> nn.Module:
        c = self.conv.in_channels
        conv = nn.Conv2d(c, c, 3, padding=1).to(self.conv.weight)
        with torch.no_grad():
            conv.weight.copy_(self.a * self.conv.weight + rp.layers.dirac_kernel(c, c, 3).to(self.conv.weight))
            conv.bias.copy_(self.a * self.conv.bias)
        return nn.Sequential(conv, nn.ReLU())


def _net_with_own_blocks() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ScaledResidual(8),
                         nn.Sequential(ScaledResidual(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_block_of_your_own_with_a_fuse_method(tmp_path, dtype, tol):
    """``rp.fuse`` replaces any module with a ``fuse()`` method (nested ones too) by what it
    returns, next to the ResConv2d layers: the fused net is plain convs (max relative
    difference ≤ 1e-5 in float32, ≤ 1e-10 in float64), and save/load replays the fusion."""
    torch.manual_seed(0)
    m = randomize_(rp.convert_(_net_with_own_blocks()), seed=6).to(dtype).eval()
    x = torch.randn(3, 3, 10, 9, dtype=dtype)
    d = rp.fuse(m)
    assert not any(isinstance(t, (ScaledResidual, rp.ResConv2d, nn.BatchNorm2d)) for t in d.modules())
    assert sum(isinstance(t, nn.Conv2d) for t in d.modules()) == 4
    with torch.no_grad():
        assert rel_err(d(x), m(x)) <= tol
    assert d.resprune_arch.ops == [["convert"], ["fuse"]]
    rp.save(d, tmp_path / "d.pt")
    back = rp.load(tmp_path / "d.pt", model=_net_with_own_blocks()).eval()
    with torch.no_grad():
        assert torch.equal(back(x), d(x))


# ----------------------------------------------------------------------------- programs
def _small_program(tmp_path: Path) -> Path:
    m = rp.fuse(randomize_(rp.convert_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))))
    p = tmp_path / "small.pt2"
    rp.save_program(m, p, input_size=(1, 3, 8, 8))
    return p


def _rewrite(src: Path, dst: Path, graph=None, member: tuple[str, bytes] | None = None, config=None) -> Path:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            if member and info.filename.endswith("/" + member[0]):
                continue  # replaced below (the empty sample-input entry)
            data = zi.read(info.filename)
            if graph and info.filename.endswith("models/model.json"):
                g = json.loads(data)
                graph(g)
                data = json.dumps(g).encode()
            if config and info.filename.endswith("weights_config.json"):
                c = json.loads(data)
                config(c)
                data = json.dumps(c).encode()
            zo.writestr(info, data)
        if member:
            zo.writestr(zi.namelist()[0].split("/")[0] + "/" + member[0], member[1])
    return dst


def _set_in_nodes(key: str, value: str):
    def edit(o):
        if isinstance(o, dict):
            if key in o and (key != "target" or "inputs" in o):
                o[key] = value
            for v in o.values():
                edit(v)
        elif isinstance(o, list):
            for v in o:
                edit(v)
    return edit


@pytest.mark.parametrize("edit,match", [
    ({"graph": lambda g: g.__setitem__("guards_code", ["print('guard')"])}, "shape guards"),
    ({"graph": _set_in_nodes("expr_str", "__import__('os').getpid() and Symbol('s0')")}, "symbolic expression"),
    ({"graph": _set_in_nodes("target", "torch.load")}, "a call of 'torch.load'"),
    ({"config": lambda c: [v.__setitem__("use_pickle", True) for v in c["config"].values()]}, "pickled tensor"),
    ({"member": ("data/aotinductor/model/model.so", b"\x7fELF")}, "unexpected member"),
    ({"member": ("data/constants/opaque_obj_0", b"x")}, "unexpected member"),
    ({"member": ("data/sample_inputs/model.pt", b"PK")}, "unexpected member"),
])
def test_load_program_refuses_what_save_program_never_writes(tmp_path, edit, match):
    """torch's loader would evaluate such text or unpickle such payloads (docs/own-model.md)."""
    good = _small_program(tmp_path)
    rp.load_program(good)
    rp.load_program(_rewrite(good, tmp_path / "same.pt2"))  # rewriting alone is fine
    bad = _rewrite(good, tmp_path / "bad.pt2", **edit)
    with pytest.raises(rp.CheckpointError, match=match) as e:
        rp.load_program(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_load_program_refuses_non_programs(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(rp.CheckpointError, match="not a readable program"):
        rp.load_program(junk)
    pt = tmp_path / "m.pt"
    rp.save(rp.create_model("resnet20"), pt)  # a zip too, but torch.save's
    with pytest.raises(rp.CheckpointError, match="not a program file"):
        rp.load_program(pt)


def test_save_program_static_batch_and_mode_restored(tmp_path):
    m = randomize_(rp.create_model("resnet20")).train()
    rp.save_program(m, tmp_path / "s.pt2", input_size=(2, 3, 32, 32), dynamic_batch=False)
    assert m.training
    prog = rp.load_program(tmp_path / "s.pt2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(prog(x), m.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="equal to 2"):
        prog(torch.randn(3, 3, 32, 32))


# ----------------------------------------------------------------------------- registry
def test_torchvision_nets_in_the_registry_are_converted(caplog):
    m = rp.create_model("tv_resnet18")
    assert sum(isinstance(t, rp.ResConv2d) for t in m.modules()) == 9  # stem + first conv of every block
    assert not any(isinstance(t, rp.ResConv2d) for t in rp.create_model("tv_resnet18", resconv=False).modules())
    keys = m.state_dict().keys()
    with caplog.at_level(logging.WARNING, logger="resprune"):
        rp.convert_(m)  # converting again changes nothing and warns about nothing
    assert m.state_dict().keys() == keys and not caplog.records


PLUGIN = '''
import torch.nn as nn
import resprune as rp


def tiny_plugin_net(num_classes=10, width=8):
    return rp.convert_(nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)))
'''


def test_entry_point_factory(tmp_path, monkeypatch):
    """A package declares ``tiny_plugin_net`` under ``resprune.models``: recipes name it, and its
    checkpoints reload by name, without ``model=``."""
    (tmp_path / "rp_plugin_demo.py").write_text(PLUGIN)
    dist = tmp_path / "rp_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rp-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[resprune.models]\ntiny_plugin_net = rp_plugin_demo:tiny_plugin_net\n")
    assert not rp.models.is_model("tiny_plugin_net")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rp.models.is_model("tiny_plugin_net") and "tiny_plugin_net" in rp.list_models("tiny*")
    from resprune.config import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "tiny_plugin_net"\nkwargs = {width = 4}\n')
    assert load_recipe(str(recipe)).model.name == "tiny_plugin_net"
    m = randomize_(rp.create_model("tiny_plugin_net", width=4))
    assert m.resprune_arch.factory == "resprune:tiny_plugin_net"
    with torch.no_grad():
        m[3][0].scale.zero_()
    rp.prune_(m, rp.PruneConfig(threshold=1e-2, min_layers_per_stage=0))
    d = rp.fuse(m)
    rp.save(d, tmp_path / "d.pt")
    back = rp.load(tmp_path / "d.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), d(x))


def test_convert_leaves_residual_branch_ends():
    """A conv whose BN output is added to a shortcut keeps no shortcut of its own: the
    converted ResNet-18 keeps the original's activation scale (~1 instead of ~100 at layer4)."""
    m = _resnet18()
    plan = rp.conversion_plan(m)
    ends = {n for n, t in m.named_modules() if isinstance(t, nn.Conv2d) and (n.endswith("conv2") or "downsample" in n)}
    assert set(plan.skipped) == ends and len(plan.pairs) == 9
    out = {}
    rp.convert_(m).layer4.register_forward_hook(lambda mod, i, o: out.__setitem__("std", float(o.detach().std())))
    torch.manual_seed(0)
    m.train()(torch.randn(8, 3, 32, 32))
    assert out["std"] < 3.0
    assert [u.name for u in rp.prune.removal_units(m)] == [
        "layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]


def test_doc_walkthrough_runs(tmp_path, monkeypatch):
    """The Python walkthrough of docs/own-model.md runs as written."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "own-model.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/own-model.md", "exec"), {})
