"""core/: recipes, config registry, targeting, data adapters, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from netpress.core import (
    DataError,
    Recipe,
    RecipeError,
    as_batches,
    get_technique,
    select,
    techniques,
)
from netpress.core.recipe import parse_text

GOOD = {
    "model": "zoo:digits_cnn",
    "data": "zoo:digits",
    "metric": "accuracy",
    "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "global"}},
        {"quantize": {"method": "int8_weight", "bits": 8, "granularity": "per_channel"}},
    ],
    "export": ["artifact", "onnx"],
}


def test_recipe_round_trip():
    r = Recipe.from_dict(GOOD)
    assert [s.kind for s in r.stages] == ["prune", "quantize"]
    again = Recipe.from_dict(r.to_dict())
    assert again == r
    assert again.to_dict() == r.to_dict()


def test_recipe_yaml_and_json_are_the_same(tmp_path):
    import json

    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    assert Recipe.load(tmp_path / "r.yaml") == Recipe.load(tmp_path / "r.json")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"modle": "x"}, "modle"),  # unknown top-level key
        ({"threads": "two"}, "threads"),  # wrong type
        ({"threads": 0}, "threads"),  # out of range
        ({"metric": "f1"}, "metric"),
        ({"stages": [{"prune": {"method": "nope"}}]}, "magnitude"),  # names registered methods
        ({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5, "spars": 1}}]}, "spars"),
        ({"stages": [{"prune": {"method": "magnitude", "sparsity": 1.5}}]}, "sparsity"),
        ({"stages": [{"squash": {"method": "x"}}]}, "stage kind"),
        ({"stages": ["prune"]}, "one-key mapping"),
        ({"export": ["tflite"]}, "export"),
    ],
)
def test_recipe_errors_name_the_problem(change, needle):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({**GOOD, **change})
    assert needle in str(info.value)
    assert "Fix:" in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: zoo:digits_cnn\nstages:\n  - prune: {method: magnitude\n")
    with pytest.raises(RecipeError, match="line"):
        Recipe.load(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        Recipe.load(tmp_path / "missing.yaml")


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_dict(parse_text("- a\n- b\n", "x"))


def test_registry_lists_and_rejects():
    names = {(t.stage, t.method) for t in techniques()}
    assert ("prune", "magnitude") in names and ("quantize", "int8_weight") in names
    with pytest.raises(RecipeError, match="magnitude"):
        get_technique("prune", "does-not-exist")


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)
    )


def test_targeting_class_name_regex_and_ignore():
    m = _net()
    assert [n for n, _ in select(m)] == ["0", "3", "4"]
    assert [n for n, _ in select(m, targets=["Linear"])] == ["3", "4"]
    assert [n for n, _ in select(m, targets=["re:[34]"], ignore=["4"])] == ["3"]
    # ignore wins over targets
    assert select(m, targets=["Conv2d"], ignore=["Conv2d"]) == []


def test_targeting_errors():
    with pytest.raises(RecipeError, match="regex"):
        select(_net(), targets=["re:("])
    with pytest.raises(RecipeError, match="inspect"):
        select(_net(), targets=["features.99"])


def test_targeting_patterns_that_select_nothing_are_errors():
    """An ``ignore`` that matches nothing used to be skipped silently, so a glob such as
    ``*intermediate*`` quantized the very layers the user meant to keep."""
    with pytest.raises(RecipeError, match=r"re:\.\*3\.\*") as err:
        select(_net(), ignore=["*3*"])
    assert err.value.where.endswith("ignore[0]")
    with pytest.raises(RecipeError, match="inspect"):
        select(_net(), ignore=["features.1"])
    with pytest.raises(RecipeError, match="whole"):
        select(_net(), ignore=["re:lin"])
    with pytest.raises(RecipeError, match="at least one"):
        select(_net(), targets=["re:classifier.*"])
    assert [n for n, _ in select(_net(), ignore=["re:.*3.*"])] == ["0", "4"]


def test_as_batches_forms():
    X = np.random.rand(10, 3).astype(np.float32)
    y = np.arange(10)
    assert [b.size for b in as_batches((X, y), batch_size=4)] == [4, 4, 2]
    assert as_batches(torch.zeros(5, 3), batch_size=2)[0].target is None
    dicts = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2)}]
    b = as_batches(dicts)[0]
    assert set(b.inputs) == {"input_ids"} and b.target is not None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 2),
                                                                        torch.zeros(6)),
                                         batch_size=4)
    assert sum(b.size for b in as_batches(loader, limit=5)) == 5


def test_as_batches_errors():
    with pytest.raises(DataError, match="no examples"):
        as_batches([])
    with pytest.raises(DataError, match="NaN"):
        as_batches(torch.tensor([[float("nan")]]))
    with pytest.raises(DataError, match="same first dimension"):
        as_batches((np.zeros((3, 2)), np.zeros(4)))
    with pytest.raises(DataError):
        as_batches(None)
