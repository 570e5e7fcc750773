"""Malformed recipes: only RecipeError naming a key path and a fix, exit 2, nothing written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from netpress.core.recipe import Recipe, parse_text
from netpress.reliability import (
    BASE_RECIPE,
    RECIPE_NAME,
    Malformed,
    check_case,
    check_from_dict,
    malformed_recipes,
)

from .conftest import FUZZ_EXAMPLES


def test_base_recipe_is_valid():
    # every generated case is this recipe plus one mutation, so the mutation is what is wrong
    assert Recipe.from_dict(BASE_RECIPE).to_dict()["model"] == "zoo:digits_cnn"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed_recipes())
def test_malformed_recipes_give_only_recipe_error(case):
    with tempfile.TemporaryDirectory() as d:
        assert check_case(case, Path(d)) == []


def _deep(n):
    v = 1
    for _ in range(n):
        v = [v]
    return v


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))

# the cases that failed before the fixes of this issue (each was a crash, a hang or a bad message)
def test_deep_python_object_regression():
    # repr() of the value in the message raised RecursionError (not YAML-dumpable: from_dict only)
    case = Malformed("deep nesting", "model", {**BASE_RECIPE, "model": _deep(100_000)})
    assert check_from_dict(case) is None


REGRESSIONS = [
    Malformed("alias bomb: repr of 9**9 leaves hung", RECIPE_NAME, text=BOMB + "model: *i\n"),
    Malformed("5000-digit int: ValueError from YAML", RECIPE_NAME,
              text="model: zoo:x\nseed: 1" + "0" * 5000 + "\n"),
    Malformed("impossible date: ValueError from YAML", RECIPE_NAME, text="model: 2020-02-30\n"),
    Malformed("!!timestamp: AttributeError from YAML", RECIPE_NAME, text="model: !!timestamp x\n"),
    Malformed("!!int: ValueError from YAML", RECIPE_NAME, text="model: zoo:x\nseed: !!int abc\n"),
    Malformed("rich markup in a key crashed the CLI", "x[/red]", {**BASE_RECIPE, "x[/red]": 1}),
    Malformed("rich markup in a key was swallowed", "[bold]x", {**BASE_RECIPE, "[bold]x": 1}),
    Malformed("200 kB key printed whole", "kkkk", {**BASE_RECIPE, "k" * 200_000: 1}),
    Malformed("deep brackets took seconds", RECIPE_NAME,
              text="model: zoo:x\nbogus: " + "[" * 3000 + "]" * 3000 + "\n"),
]


@pytest.mark.parametrize("case", REGRESSIONS, ids=[c.kind for c in REGRESSIONS])
def test_regressions(case, tmp_path):
    assert check_case(case, tmp_path) == []


def test_check_can_fail(tmp_path):
    # the checker itself: a valid recipe is reported as accepted (and never run)
    failures = check_case(Malformed("valid", "model", dict(BASE_RECIPE)), tmp_path)
    assert failures and "accepted a malformed recipe" in failures[0]


def test_deep_brackets_are_refused_before_yaml():
    with pytest.raises(Exception, match="nested more than 64 deep"):
        parse_text("a: " + "{b: " * 65 + "1" + "}" * 65, "r.yaml")
