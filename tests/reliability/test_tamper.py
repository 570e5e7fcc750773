"""A damaged artifact never loads: ArtifactError (SHA-256 / size / structure), never a model."""

from __future__ import annotations

import pytest
import torch

import netpress
from netpress.core.errors import ArtifactError
from netpress.reliability import (
    ARTIFACT_FILES,
    _flip,
    _truncate,
    check_tamper,
    tamper_cases,
)


def test_untouched_artifact_loads(artifact):
    model = netpress.load(artifact)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert {p.name for p in artifact.iterdir()} == set(ARTIFACT_FILES)


@pytest.mark.parametrize("name", ARTIFACT_FILES)
@pytest.mark.parametrize("pos", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_flipped_byte(artifact, tmp_path, name, pos):
    assert check_tamper(artifact, _flip(name, pos, 0x01), tmp_path) is None


@pytest.mark.parametrize("name", ARTIFACT_FILES)
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated(artifact, tmp_path, name, keep):
    assert check_tamper(artifact, _truncate(name, keep), tmp_path) is None


def test_sha_mismatch_is_the_reason(artifact, tmp_path):
    d = tmp_path / "a"
    import shutil

    shutil.copytree(artifact, d)
    data = bytearray((d / "model.onnx").read_bytes())
    data[100] ^= 1
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        netpress.load(d)


def test_every_other_case(artifact, tmp_path):
    # appended bytes, deletion, a directory in place of a file, every manifest leaf edited, an
    # added tensor (with and without a re-signed manifest), re-signed structural edits
    cases = tamper_cases(artifact)
    assert len(cases) > 150  # measured: 334
    failures = [f for c in cases if (f := check_tamper(artifact, c, tmp_path))]
    assert failures == []


def test_checker_can_fail(artifact, tmp_path):
    from netpress.reliability import Tamper

    assert "loaded a model" in check_tamper(artifact, Tamper("nothing", lambda d: None), tmp_path)
