"""prune_: exact structural removal, budgets, errors; profile leaves models untouched; save/load."""

import copy
from collections import Counter, OrderedDict

import pytest
import torch
from torch import nn

import resprune as rp
from helpers import count_convs_run, randomize_, rel_err
from resprune.models.arch import signature


@torch.no_grad()
def zero_scales(model, names):
    for n in names:
        model.get_submodule(n).scale.zero_()


def _resnet20_with_zeros():
    torch.manual_seed(0)
    m = randomize_(rp.create_model("resnet20"), seed=3)
    with torch.no_grad():
        for _, rc in rp.sparsity.removable_scales(m):
            rc.scale.clamp_(min=0.2)  # keep the rest well above the threshold
    # a whole branch in a transition block, a first conv, a whole identity block
    zero_scales(m, ["layer2.0.conv2", "layer1.1.conv1", "layer3.2.conv2", "layer1.2.conv1"])
    return m.eval()


def test_threshold_removal_is_exact_and_structural():
    m = _resnet20_with_zeros()
    x = torch.randn(4, 3, 32, 32)
    y = m(x)
    n_tensors, n_convs = len(m.state_dict()), count_convs_run(m, x)
    rep = rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    assert rep.removed == ["layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv2", "layer3.2.conv2"]
    assert rep.removed_per_stage == {"layer1": 2, "layer2": 1, "layer3": 1}
    assert rep.max_removed_scale == 0.0
    assert torch.equal(m(x), y) or rel_err(m(x), y) <= 1e-6
    assert count_convs_run(m, x) == n_convs - 6  # 2 first convs + 2 whole branches
    assert len(m.state_dict()) < n_tensors
    assert isinstance(m.layer2[0], rp.OptionAShortcut)  # transition block → option-A shortcut
    assert "2" not in dict(m.layer3.named_children())  # identity block deleted, keys kept
    assert isinstance(m.layer1[1].conv1, nn.Identity)
    assert rep.macs_after < rep.macs_before and rep.params_after < rep.params_before
    assert rep.macs_after == rp.profile(m).macs
    # pruned and fused: still the same function
    assert rel_err(rp.fuse(m)(x), y) <= 1e-5


def test_plain_resconv_chain_removal():
    m = randomize_(rp.create_model("plainres20"), seed=4).eval()
    zero_scales(m, ["layer1.3", "layer3.5"])
    with torch.no_grad():
        m.layer1[0].scale.fill_(0.5)
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    rep = rp.prune_(m, rp.PruneConfig(threshold=1e-3))
    assert rep.removed == ["layer1.3", "layer3.5"]
    assert list(dict(m.layer1.named_children())) == ["0", "1", "2", "4", "5"]
    assert rel_err(m(x), y) <= 1e-6


def _greedy(units: dict[str, set[str]], key, conv_macs: dict[str, int], total: int,
            budget: int) -> tuple[set[str], int]:
    """The budget rule of prune_'s docstring, written out: units in increasing ``key`` until
    the budget is met, skipping one that would leave its stage (first name part) without a
    conv. Returns the removed convs and the MACs left."""
    per_stage = Counter(c.split(".")[0] for c in conv_macs)
    gone: set[str] = set()
    left = total
    for u in sorted(units, key=key):
        if left <= budget:
            break
        new = units[u] - gone
        stage = u.split(".")[0]
        if per_stage[stage] - len(new) < 1:
            continue
        gone |= new
        per_stage[stage] -= len(new)
        left -= sum(conv_macs[c] for c in new)
    return gone, left


def _budget_net() -> nn.Module:
    """Two stages of removable identity ResConvs of three costs (16×16 input)."""
    return nn.Sequential(OrderedDict(
        stem=rp.ResConv2d(3, 4),
        a=nn.Sequential(*[rp.ResConv2d(4, 4) for _ in range(4)]),
        b=nn.Sequential(rp.ResConv2d(4, 8), *[rp.ResConv2d(8, 8) for _ in range(3)],
                        rp.ResConv2d(8, 8, 1), rp.ResConv2d(8, 8, 1)),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
    ))


BUDGET_NET_SCALES = {"a.0": 0.1, "a.1": 0.3, "a.2": 0.2, "a.3": 0.4, "b.1": 0.9, "b.2": 0.5, "b.3": 0.85,
                     "b.4": 0.05, "b.5": 0.6}


@pytest.mark.parametrize("rank,removed", [
    # by |s|: a.3 is skipped (stage a would keep no conv), then the budget is met at b.3
    ("scale", ["a.0", "a.1", "a.2", "b.2", "b.3", "b.4", "b.5"]),
    # by |s|/MACs: the expensive 3×3 layers of b come earlier, the 1×1 b.5 last
    ("scale_per_mac", ["a.0", "a.2", "b.2", "b.3", "b.4"]),
])
def test_budget_removes_lowest_ranked_units_first(rank, removed):
    m = _budget_net().eval()
    with torch.no_grad():
        for n, v in BUDGET_NET_SCALES.items():
            m.get_submodule(n).scale.fill_(v)
    hw = 16 * 16
    conv_macs = {"stem": 3 * 4 * 9 * hw, "b.0": 4 * 8 * 9 * hw, **{f"a.{i}": 4 * 4 * 9 * hw for i in range(4)},
                 **{f"b.{i}": 8 * 8 * 9 * hw for i in (1, 2, 3)}, "b.4": 8 * 8 * hw, "b.5": 8 * 8 * hw}
    total = sum(conv_macs.values()) + 8 * 10
    assert rp.profile(m, (1, 3, 16, 16)).macs == total
    scales = {n: abs(float(m.get_submodule(n).scale.detach())) for n in BUDGET_NET_SCALES}
    key = (lambda u: scales[u]) if rank == "scale" else (lambda u: scales[u] / conv_macs[u])
    budget = int(0.5 * total)
    gone, left = _greedy({u: {u} for u in scales}, key, conv_macs, total, budget)
    assert sorted(gone) == removed  # the rule on this net, as worked out in the parameters
    rep = rp.prune_(m, rp.PruneConfig(target_macs=0.5, rank=rank, input_size=(1, 3, 16, 16)))
    assert rep.removed == removed
    assert rep.macs_after == left == rp.profile(m, (1, 3, 16, 16)).macs <= budget


@pytest.mark.parametrize("rank", ["scale", "scale_per_mac"])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_with_overlapping_units(rank, seed):
    """resnet20: a block's branch gate removes its first conv too. The convs gone and the MACs
    left are those of the rule, with the units' MACs worked out from the layer shapes."""
    torch.manual_seed(seed)
    m = randomize_(rp.create_model("resnet20"), seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, rc in rp.sparsity.removable_scales(m):
            rc.scale.fill_(float(torch.rand((), generator=g)) + 0.01)
    conv_macs, units = {}, {}
    for name, t in m.named_modules():
        if isinstance(t, rp.ResConv2d):
            side = {"layer1": 32, "layer2": 16, "layer3": 8}[name.split(".")[0]]  # output size
            conv_macs[name] = t.conv.in_channels * t.conv.out_channels * 9 * side * side
    for name, t in m.named_modules():
        if isinstance(t, rp.ResConv2d) and t.removable:
            block = name.rpartition(".")[0]
            units[name] = {name} if t.shortcut else {f"{block}.conv1", f"{block}.conv2"}
    total = rp.profile(m).macs
    assert total == 3 * 16 * 9 * 32 * 32 + sum(conv_macs.values()) + 64 * 10
    scales = {u: abs(float(m.get_submodule(u).scale.detach())) for u in units}
    unit_macs = {u: sum(conv_macs[c] for c in cs) for u, cs in units.items()}
    key = (lambda u: scales[u]) if rank == "scale" else (lambda u: scales[u] / unit_macs[u])
    budget = int(0.5 * total)
    gone, left = _greedy(units, key, conv_macs, total, budget)
    rep = rp.prune_(m, rp.PruneConfig(target_macs=0.5, rank=rank))
    after = {n for n, t in m.named_modules() if isinstance(t, rp.ResConv2d)}
    assert set(conv_macs) - after == gone
    assert rep.macs_after == left == rp.profile(m).macs <= budget


def test_budget_absolute_int():
    m = rp.create_model("resnet20")
    budget = 30_000_000
    rep = rp.prune_(m, rp.PruneConfig(target_macs=budget))
    assert rep.macs_after <= budget


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"threshold": 0.1, "target_macs": 0.5}, "exactly one"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"target_macs": 1.5}, r"\(0, 1\]"),
        ({"target_macs": 0}, "absolute budget"),
        ({"target_macs": True}, "target_macs"),
        ({"threshold": 0.1, "rank": "random"}, "rank"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rp.PruneConfig(**kwargs)


def test_threshold_that_empties_a_stage_is_refused_and_changes_nothing():
    m = rp.create_model("resnet20").eval()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="layer1"):
        rp.prune_(m, rp.PruneConfig(threshold=10.0))  # every scale is 1.0 < 10
    assert m.state_dict().keys() == before.keys()


def test_unreachable_budget_is_refused():
    m = rp.create_model("resnet20")
    with pytest.raises(ValueError, match="cannot be met"):
        rp.prune_(m, rp.PruneConfig(target_macs=0.01))
    assert len(m.layer1) == 3


def test_profile_leaves_model_untouched():
    m = rp.create_model("resnet20")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    p = rp.profile(m)
    assert set(m.state_dict()) == set(sd)
    assert not any(hasattr(t, "total_ops") for t in m.modules())
    m.load_state_dict(sd, strict=True)
    assert p.layers and p.layers[0].name == "stem.conv" and p.layers[-1].kind == "linear"
    assert sum(r.macs for r in p.layers) == p.macs
    assert "total" in p.table()


@pytest.mark.parametrize("stage", ["none", "pruned", "fused", "converted"])
def test_save_load_roundtrip(tmp_path, stage):
    torch.manual_seed(0)
    if stage == "converted":
        m = rp.convert_(rp.create_model("tv_resnet18"))
        x = torch.randn(2, 3, 64, 64)
    else:
        m = _resnet20_with_zeros()
        x = torch.randn(2, 3, 32, 32)
        if stage in ("pruned", "fused"):
            rp.prune_(m, rp.PruneConfig(threshold=1e-2))
        if stage == "fused":
            rp.fuse_(m)
    randomize_(m, seed=7, scales=False)
    m.eval()
    path = tmp_path / "model.pt"
    rp.save(m, path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "resprune-model"
    m2 = rp.load(path).eval()
    assert torch.equal(m2(x), m(x))
    assert m2.state_dict().keys() == m.state_dict().keys()
    # the replayed record rebuilds the same module tree (names, classes, keys, shapes)
    assert signature(m2) == signature(m) and m2.resprune_arch.to_dict() == raw["arch"]


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.layer3.__delitem__(1), r"module 'layer3\.1' \(BasicBlock\) of the record is gone"),
    (lambda m: setattr(m.head, "fc", nn.Linear(64, 5)),
     r"'head\.fc\.weight' has shape \(5, 64\), the record has \(10, 64\)"),
    (lambda m: m.layer1.add_module("9", nn.ReLU()), r"module 'layer1\.9' \(ReLU\) is not in the record"),
])
@pytest.mark.parametrize("fused", [False, True])
def test_save_refuses_a_model_edited_by_hand(tmp_path, edit, match, fused):
    """An edit that ``rp.load`` could not replay (a block deleted, a layer of another shape, a
    layer added) is refused by ``rp.save`` in one line naming the first difference."""
    m = _resnet20_with_zeros()
    rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    if fused:
        rp.fuse_(m)
    rp.save(m, tmp_path / "ok.pt")  # not edited: fine
    edit(m)
    op = "fuse" if fused else "remove"
    want = (rf"^cannot save CifarResNet: the module was changed outside resprune after the recorded '{op}' "
            rf"operation \({match}\), so resprune\.load could not rebuild it")
    with pytest.raises(rp.CheckpointError, match=want) as e:
        rp.save(m, tmp_path / "m.pt")
    assert "\n" not in str(e.value) and not (tmp_path / "m.pt").exists()


def test_load_errors(tmp_path):
    m = rp.create_model("resnet20")
    good = tmp_path / "m.pt"
    rp.save(m, good)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(rp.CheckpointError, match="truncated or corrupt"):
        rp.load(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(rp.CheckpointError, match="not a resprune model file"):
        rp.load(foreign)
    with pytest.raises(rp.CheckpointError, match="no such"):
        rp.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="architecture record"):
        rp.save(nn.Linear(2, 2), tmp_path / "x.pt")


class _Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tampered(tmp_path, name, **arch):
    m = rp.create_model("resnet20")
    p = tmp_path / f"{name}.pt"
    payload = rp.serialization.model_payload(m)
    payload["arch"].update(arch)
    torch.save(payload, p)
    return p


@pytest.mark.parametrize("arch,match", [
    ({"kwargs": {"num_classes": 10, "no_such_arg": 3}}, "TypeError.*no_such_arg"),
    ({"factory": "resprune:no_such_net"}, "no_such_net"),
    ({"ops": [["remove", ["layer9.0.conv1"]]]}, "layer9"),
    ({"ops": [["explode"]]}, "unknown architecture operation 'explode'"),
    ({"kwargs": "not a dict"}, "does not describe a model"),
    ({"ops": [["remove", "layer1.1.conv1"]]}, "does not describe a model.*one list of unit names"),
    ({"ops": "convert"}, "does not describe a model.*not a list of operations"),
])
def test_tampered_architecture_record_is_a_checkpoint_error(tmp_path, arch, match):
    p = _tampered(tmp_path, "t", **arch)
    with pytest.raises(rp.CheckpointError, match=match) as e:
        rp.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_errors_never_suggest_weights_only_false(tmp_path):
    """A checkpoint with code in it is refused in one line, without torch's advice to load it
    with weights_only=False (which would run the code)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "resprune-model", "arch": _Evil(marker)}, evil)
    with pytest.raises(rp.CheckpointError) as e:
        rp.load(evil)
    msg = str(e.value)
    assert not marker.exists()
    assert "weights_only" not in msg and "Weights only" not in msg and "\n" not in msg, msg
    assert str(evil) in msg and "open" in msg and len(msg) < 300, msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(rp.CheckpointError) as e:
        rp.load(junk)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300, str(e.value)
    # wherever the error is made (the trainer's resume wraps torch's message itself)
    try:
        torch.load(evil, weights_only=True)
    except Exception as exc:
        wrapped = rp.CheckpointError(f"x.pt: cannot resume, checkpoint unreadable: {exc}")
    assert "weights_only" not in str(wrapped) and "\n" not in str(wrapped)
    assert str(wrapped).startswith("x.pt: cannot resume, checkpoint unreadable: it refers to")


def test_weights_of_another_architecture_short_message(tmp_path):
    p = tmp_path / "w.pt"
    payload = rp.serialization.model_payload(rp.create_model("resnet20"))
    payload["state_dict"] = rp.serialization.model_payload(rp.create_model("resnet32"))["state_dict"]
    torch.save(payload, p)
    with pytest.raises(rp.CheckpointError, match=r"weights do not match .*unexpected \(e\.g\. ") as e:
        rp.load(p)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
