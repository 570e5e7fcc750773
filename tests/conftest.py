"""Shared fixtures: no progress bars, a private cache, and no files left behind by any test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netpress.core import progress

REPO = Path(__file__).resolve().parents[1]


_SOURCE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".txt")


def _snapshot() -> set[Path]:
    skip = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
            ".mypy_cache"}
    out = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        # source and docs are written by people, not by tests; what a test leaks is outputs
        out.update(Path(root) / f for f in files if not f.endswith(_SOURCE_SUFFIXES))
    return out


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Fail any test that leaves new files in the repository (tests write under tmp_path)."""
    progress.set_enabled(False)
    before = _snapshot()
    yield
    new = sorted(str(p.relative_to(REPO)) for p in _snapshot() - before)
    progress.set_enabled(None)
    assert not new, f"test left files behind: {new[:5]}"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Zoo models trained on first use are cached here for the session, not in ~/.cache."""
    if "NETPRESS_CACHE" not in os.environ:
        os.environ["NETPRESS_CACHE"] = str(tmp_path_factory.mktemp("netpress-cache"))
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (training tests: steadier and kinder to a shared box).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
