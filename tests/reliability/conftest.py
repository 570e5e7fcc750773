"""One real artifact (all five files) shared by the tamper, pickle and determinism tests."""

from __future__ import annotations

import os

import pytest

from netpress.reliability import build_artifact

#: generated recipes per fuzz test in CI (`netpress reliability` runs 1,000)
FUZZ_EXAMPLES = int(os.environ.get("NETPRESS_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("reliability") / "artifact")
