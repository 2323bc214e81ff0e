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


def _markdown_code(text: str) -> list[str]:
    """The lines of the fenced code blocks and the inline code spans of a Markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return [ln for b in blocks for ln in b.splitlines()] + [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]


def _resprune_commands(text: str) -> list[list[str]]:
    """The argument lists of the ``resprune …`` commands a Markdown text shows (also after
    ``python -m`` / ``torchrun … -m``; ``a | resprune b`` and ``a && b`` are two), without the
    comments, the ``[ ]`` and ``|`` of optional parts and ``...``."""
    cmds = []
    for line in _markdown_code(text):
        for part in re.split(r"\s\|\s(?=resprune)|&&", line.split(" #")[0]):
            m = re.match(r"(?:.*\s-m\s+)?resprune\s+(.*)", part.strip())
            if m:
                toks = m.group(1).replace("[", " ").replace("]", " ").split()
                cmds.append([t for t in toks if t not in ("...", "…", "|")])
    return cmds


def _is_recipe_key(key: str) -> bool:
    """``section.field`` (a dict field takes any sub-key) or a top-level field of a recipe."""
    from dataclasses import fields

    from resprune.config import SECTIONS, Recipe

    head, _, rest = key.partition(".")
    if head in SECTIONS:
        return rest.split(".")[0] in {f.name for f in fields(SECTIONS[head])}
    return head in {f.name for f in fields(Recipe)}


def _check_command(root, argv: list[str], recipes: list[str]) -> None:
    """``argv`` names a real sub-command chain, real options of it, a real recipe (unless a
    placeholder such as RECIPE) and real recipe keys in ``--set``."""
    import argparse

    parser, opts, positional, words = root, {}, [], iter(argv)
    opts.update({s: a for a in root._actions for s in a.option_strings})
    for tok in words:
        if tok.startswith("-"):
            flag, _, inline = tok.partition("=")
            assert flag in opts, f"resprune {' '.join(argv)}: no option {flag}"
            value = inline or (next(words, "") if opts[flag].nargs != 0 else "")
            key = value.partition("=")[0]
            if flag == "--set" and key not in ("key", "KEY"):
                assert _is_recipe_key(key), f"resprune {' '.join(argv)}: no recipe key {key}"
            continue
        sub = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and not positional:
            assert tok in sub, f"resprune {' '.join(argv)}: no sub-command {tok}"
            parser = sub[tok]
            opts.update({s: a for a in parser._actions for s in a.option_strings})
        else:
            positional.append(tok)
    if parser.prog.split()[-1] in ("run", "train") and positional and positional[0] != positional[0].upper():
        assert positional[0] in recipes, f"resprune {' '.join(argv)}: no recipe {positional[0]}"


def test_readme_commands_name_real_subcommands_recipes_and_options():
    """Every `resprune …` command in the README (code blocks and inline code) parses as a real
    sub-command with real options, recipe names and `--set` keys."""
    from resprune.cli import build_parser
    from resprune.config import list_recipes

    cmds = _resprune_commands((ROOT / "README.md").read_text())
    assert len(cmds) >= 20 and {c[0] for c in cmds} >= {"run", "train", "prune", "fuse", "export", "bench",
                                                         "report", "models", "recipes", "qmc"}
    root, recipes = build_parser(), list_recipes()
    for argv in cmds:
        _check_command(root, argv, recipes)


def test_check_command_catches_what_it_should():
    """The checker of the test above refuses a wrong sub-command, option, recipe and --set key."""
    from resprune.cli import build_parser
    from resprune.config import list_recipes

    root, recipes = build_parser(), list_recipes()
    _check_command(root, ["run", "quickstart", "--set", "train.epochs=1", "--out", "DIR"], recipes)
    for bad in (["trian", "quickstart"], ["run", "quickstart", "--epochs", "3"], ["run", "no_such_recipe"],
                ["run", "quickstart", "--set", "train.epoch=1"], ["qmc", "studdy"]):
        with pytest.raises(AssertionError):
            _check_command(root, bad, recipes)


def test_readme_paths_exist():
    """The repository files the README links to or names (scripts, docs, recipes) exist."""
    text = (ROOT / "README.md").read_text()
    links = [p for p in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in p]
    named = re.findall(r"\b((?:benchmarks|export|docs|recipes|tests)/[\w./-]*\w\.(?:py|md|toml|sh))\b", text)
    assert len(links) >= 5 and len(named) >= 5
    missing = sorted({p for p in links + named if not (ROOT / p).exists()})
    assert not missing, f"README names files that do not exist: {missing}"
