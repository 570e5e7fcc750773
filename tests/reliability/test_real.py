"""The console script on a zoo recipe: killed mid-write, re-run deterministically, --max-drop."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netpress
from netpress.export.artifact import verify_artifact
from netpress.reliability import BASE_RECIPE, covered_digest

RECIPE = {**BASE_RECIPE, "runtime": "torch", "eval_limit": 256}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.real
def test_console_script_killed_while_writing_keeps_previous_dir(tmp_path):
    exe = Path(sys.executable).with_name("netpress")
    exe = exe if exe.exists() else Path(shutil.which("netpress") or "netpress")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(RECIPE))
    out = tmp_path / "out-dir"
    out.mkdir()
    (out / "manifest.json").write_text("the previous good artifact")
    before = _snapshot(out)
    codes = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen([str(exe), "compress", str(recipe), "--out", str(out), "--force"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(f".out-dir.tmp-{proc.pid}-*")):
            assert proc.poll() is None, "the run ended before writing its output"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if sig == signal.SIGTERM:  # this run swept the SIGKILLed run's temp dir on its way
            assert [p.name for p in tmp_path.glob(".out-dir.tmp-*")] == [
                p.name for p in tmp_path.glob(f".out-dir.tmp-{proc.pid}-*")]
        proc.send_signal(sig)
        codes[sig] = proc.wait(timeout=120)
        assert _snapshot(out) == before  # the previous DIR, byte for byte
    assert codes[signal.SIGKILL] == -signal.SIGKILL
    assert codes[signal.SIGTERM] == 130  # SIGTERM became "interrupted: nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-dir", "r.json"]


@pytest.mark.real
def test_same_recipe_and_seed_give_identical_artifacts(tmp_path):
    netpress.compress(RECIPE, tmp_path / "a")
    netpress.compress(RECIPE, tmp_path / "b")
    a, b = covered_digest(tmp_path / "a"), covered_digest(tmp_path / "b")
    assert len(a) == 4 and a == b


@pytest.mark.real
def test_max_drop_cli_exit_1_and_keep_failed(tmp_path, monkeypatch, capsys):
    from netpress import cli

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**RECIPE, "export": ["artifact"], "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.99, "scope": "global"}}]}))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["netpress", "compress", str(recipe), "--out", str(out),
                                      "--max-drop", "0.01", "--keep-failed"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 1 and "dropped" in err and "Traceback" not in err
    verify_artifact(out)  # kept, complete and hash-consistent
