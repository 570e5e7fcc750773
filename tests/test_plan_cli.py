"""``netpress plan`` on the command line: outputs, resume, and exit 1 naming the binding limit."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from netpress import cli
from netpress.search.planner import storage_path

RECIPE = {"model": "zoo:digits_cnn", "data": "zoo:digits", "runtime": "torch", "eval_limit": 64,
          "plan": {"trials": 1, "families": ["int8_weight"],
                   "sensitivity": {"sparsity": [], "bits": [], "ranks": [], "max_examples": 16}}}


@pytest.fixture(autouse=True)
def _fast_latency(monkeypatch):
    from netpress.search.trial import LATENCY

    for k, v in {"warmup": 2, "runs": 5, "max_seconds": 2.0}.items():
        monkeypatch.setitem(LATENCY, k, v)


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["netpress", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_writes_dir_then_resumes_and_fails_on_impossible_size(tmp_path, monkeypatch,
                                                                       capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "plan"
    code, stdout, err = run_cli(monkeypatch, capsys, "plan", str(recipe), "--out", str(out),
                                "--max-drop", "0.05", "--seed", "3")
    assert code == 0, err
    assert "wrote" in stdout and "best: trial 0" in stdout and str(storage_path(out)) in stdout
    for name in ("manifest.json", "model.safetensors", "metrics.json", "report.html", "front.json",
                 "recipe.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "front.json").read_text())["constraints"] == {"max_drop": 0.05}
    # existing DIR without --force: refused before any work (exit 2)
    code, _, err = run_cli(monkeypatch, capsys, "plan", str(recipe), "--out", str(out))
    assert code == 2 and "--force" in err
    # same study (resumed: no new trial), an impossible size: exit 1, the binding limit named
    code, stdout, err = run_cli(monkeypatch, capsys, "plan", str(recipe), "--out", str(out),
                                "--force", "--seed", "3", "--max-size", "0.000001")
    assert code == 1
    assert "binding: max_size_bytes" in err and "trial 0" in err
    front = json.loads((out / "front.json").read_text())
    assert front["new_trials"] == 0 and len(front["trials"]) == 1 and not front["met"]
    assert not (out / "manifest.json").exists()


def test_plan_cli_bad_flags(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "plan", "zoo:digits_cnn", "--out",
                           str(tmp_path / "p"), "--runtime", "tpu")
    assert code == 2 and "runtime" in err
    code, _, err = run_cli(monkeypatch, capsys, "plan", "zoo:digits_cnn", "--out",
                           str(tmp_path / "p"), "--trials", "0")
    assert code == 2 and "trials" in err
    assert not (tmp_path / "p").exists()
