"""The README's Python example and the docstring examples of the public modules run."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("mod", [
    "resprune", "resprune.layers", "resprune.models.registry", "resprune.models.convert", "resprune.models.arch",
    "resprune.sparsity", "resprune.prune", "resprune.fuse", "resprune.profile",
    "resprune.serialization", "resprune.config", "resprune.data.loader", "resprune.rundir", "resprune.util",
])
def test_docstring_examples(mod):
    m = importlib.import_module(mod)
    res = doctest.testmod(m, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0


def test_readme_recipe_reference_names_every_field():
    from dataclasses import fields

    from resprune.config import SECTIONS, Recipe

    text = (ROOT / "README.md").read_text()
    ref = text[text.index("**Recipe reference**"):]
    ref = ref[:ref.index("\n\n", ref.index("| key |"))]
    names = {f"`{s}.{f.name}`" for s, cls in SECTIONS.items() if s != "finetune" for f in fields(cls)}
    names |= {f"`{f.name}`" for f in fields(Recipe) if f.name not in SECTIONS}
    missing = sorted(n for n in names if n not in ref)
    assert not missing, f"README recipe reference lacks {missing}"


def test_guarantees_name_tests_that_exist():
    """Every `tests/test_x.py[::name]` the README's Guarantees section names exists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Guarantees"):]
    section = section[:section.index("\n## ", 1)]
    named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", section)
    assert len(named) >= 15
    for file, name in named:
        path = ROOT / "tests" / file
        assert path.is_file(), file
        if name:
            assert re.search(rf"^def {name}\(", path.read_text(), re.M), f"{file}::{name}"
