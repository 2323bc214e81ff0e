"""Recipes: every shipped recipe loads; overrides; unknown keys and bad values are errors."""

import json

import pytest

from resprune.config import RecipeError, apply_overrides, list_recipes, load_recipe


def test_shipped_recipes_load():
    names = list_recipes()
    assert {"quickstart", "resnet56_cifar10", "resnet110_cifar10", "resnet110_cifar100",
            "plainres56_cifar10", "resnet20_mnist"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.name == n


def test_overrides():
    r = load_recipe("quickstart", ["train.epochs=3", "train.lr=0.05", "model.kwargs.resconv=false",
                                   "export.bench_batches=[1, 8]", "prune.target_macs=0.5"])
    assert (r.train.epochs, r.train.lr, r.model.kwargs, r.export.bench_batches) == (3, 0.05, {"resconv": False}, (1, 8))
    assert r.prune.target_macs == 0.5 and r.prune.threshold is None  # one rule replaces the other
    r2 = load_recipe("quickstart", ["engine=mgrit", "engine_options.cf=4", "nproc=2"])
    assert r2.engine == "mgrit" and r2.engine_options == {"cf": 4} and r2.nproc == 2


def test_engine_override_drops_the_recipe_engines_options():
    # the recipe's engine_options are its own engine's: --engine serial must not inherit mgrit's
    r = load_recipe("mnist_chain256_mgrit", ["engine=serial", "nproc=1"])
    assert r.engine == "serial" and r.engine_options == {}
    r2 = load_recipe("mnist_chain256_mgrit", ["engine=mgrit", "nproc=2"])  # same engine: kept
    assert r2.engine_options["cf"] == 4
    r3 = load_recipe("mnist_chain256_mgrit", ["engine=local", "engine_options={}"])
    assert r3.engine == "local" and r3.engine_options == {}


@pytest.mark.parametrize("item,match", [
    ("train.epoch=3", "unknown recipe key 'train.epoch'"),
    ("trian.epochs=3", "unknown recipe section"),
    ("foo=1", "unknown recipe key"),
    ("train.epochs", "key=value"),
    ("train.lr=-1", "lr must be"),
    ("train.epochs=1.5", "epochs must be"),
    ("data.dataset=imagenet", "unknown"),
    ("model.name=resnet7", "not registered"),
    ("prune.threshold=0", "threshold"),
    ("engine=magic", "engine"),
    ("nproc=0", "nproc"),
    ("data.train_limit=0", "train_limit"),
    ("model.remove=3", "model.remove must be a list of unit names or a prune.json path"),
    ("model.remove=[1]", "model.remove must be a list"),
])
def test_bad_overrides(item, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("quickstart", [item])


def test_json_roundtrip_and_unknown_section(tmp_path):
    r = load_recipe("resnet56_cifar10")
    p = tmp_path / "r.json"
    p.write_text(r.to_json())
    assert load_recipe(str(p)) == r
    d = json.loads(r.to_json())
    d["pruning"] = {}
    p.write_text(json.dumps(d))
    with pytest.raises(RecipeError, match="unknown recipe section"):
        load_recipe(str(p))
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe("nonexistent_recipe")
    assert apply_overrides(r, []) == r
