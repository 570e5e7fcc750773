"""The runnable examples in the docstrings of the public API actually run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "netpress.core.errors",
    "netpress.core.config",
    "netpress.core.recipe",
    "netpress.core.targeting",
    "netpress.core.data",
    "netpress.core.progress",
    "netpress.report.metrics",
    "netpress.report.html",
    "netpress.quantize.pack",
    "netpress.quantize.weight_search",
    "netpress.train.loop",
    "netpress.api",
    "netpress.search.workers",
    "netpress.search.nas",
    "netpress",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
