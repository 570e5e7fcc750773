"""No pickle: artifacts load with unpickling disabled; malicious pickles are refused, never run."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import netpress
from netpress import cli
from netpress.core.errors import ModelError
from netpress.export.modelfile import load_model_file
from netpress.reliability import evil_model_files, no_pickle_anywhere


def test_artifact_loads_without_any_unpickling(artifact):
    reference = netpress.load(artifact)
    with no_pickle_anywhere() as calls:
        model = netpress.load(artifact)
    assert calls == []
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), reference(x))


def test_patch_is_effective():
    import pickle

    with no_pickle_anywhere() as calls, pytest.raises(AssertionError):
        pickle.loads(pickle.dumps(1))
    assert calls == ["pickle.loads"]


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    return evil_model_files(d, d / "PWNED"), d / "PWNED"


def test_malicious_pickles_are_refused(evil):
    files, marker = evil
    assert len(files) == 8
    for path in files:
        with pytest.raises(ModelError) as info:
            load_model_file(path)
        msg = str(info.value)
        assert "pickle" in msg.lower(), msg
        assert "torch.export" in msg or "safetensors" in msg, msg
        assert not marker.exists(), path.name


def test_malicious_pickle_through_the_cli(evil, tmp_path, monkeypatch, capsys):
    files, marker = evil
    for path in files:
        recipe = tmp_path / "r.json"
        recipe.write_text(json.dumps({"model": str(path), "data": "zoo:digits"}))
        monkeypatch.setattr(sys, "argv", ["netpress", "compress", str(recipe), "--out",
                                          str(tmp_path / "out")])
        with pytest.raises(SystemExit) as info:
            cli.main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err and "pickle" in err.lower()
        assert not marker.exists() and not (tmp_path / "out").exists()
