"""Crash safety: a kill at any moment of writing DIR leaves the previous DIR or no DIR."""

from __future__ import annotations

import signal

import pytest

from netpress import pipeline
from netpress.reliability import MOMENTS, crash_case, swap_crash_case

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


@pytest.mark.parametrize("previous", [True, False], ids=["previous-dir", "no-dir"])
@pytest.mark.parametrize("moment", range(len(MOMENTS)), ids=[m.replace(" ", "-") for m in MOMENTS])
@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_kill_while_writing(tmp_path, sig, moment, previous):
    assert crash_case(tmp_path / "c", sig, moment, previous) is None


def test_kill_between_the_renames_is_restored(tmp_path):
    assert swap_crash_case(tmp_path / "s") is None


def test_stale_dirs_of_hyphenated_names_are_swept(tmp_path):
    # before this issue the pid was parsed from name.split("-")[1]: "out" of ".my-out.tmp-..."
    stale = tmp_path / ".my-out.tmp-999999999-abc"
    stale.mkdir()
    pipeline._sweep_stale(tmp_path / "my-out")
    assert not stale.exists()


def test_live_runs_are_not_swept(tmp_path):
    import os

    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    live.mkdir()
    pipeline._sweep_stale(tmp_path / "out")
    assert live.exists()


def test_interrupt_inside_a_command_exits_130(monkeypatch, capsys):
    # typer turns KeyboardInterrupt into a returned 130; main() used to exit 0 ("success")
    import sys

    import netpress.inspect
    from netpress import cli

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(netpress.inspect, "inspect_target", boom)
    monkeypatch.setattr(sys, "argv", ["netpress", "inspect", "zoo:digits_cnn"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
