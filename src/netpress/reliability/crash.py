"""Crash safety: SIGINT / SIGTERM / SIGKILL at each moment of writing an output directory leave
the previous DIR byte-identical or no DIR, and a later run sweeps what a SIGKILL left.

Example:
    >>> from netpress.reliability.crash import run_crash  # doctest: +SKIP
    >>> run_crash().failures  # doctest: +SKIP
    []
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from netpress.reliability.common import Section

CRASH_FILES = 4  # files the child writes into the hidden temporary directory, one per step
MOMENTS = ("before the temp dir", "temp dir created", *(f"{k} of {CRASH_FILES} files written"
           for k in range(1, CRASH_FILES + 1)), "never (control)")


def _dir_bytes(d: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else None


_CATCHABLE = {signal.SIGINT, signal.SIGTERM}


def _child_write(out: Path, step: float) -> None:
    """In a forked child: write ``out`` through the real ``atomic_dir``, slowly."""
    from netpress.pipeline import atomic_dir

    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:  # a signal held back across fork lands at the unblock: it must end here, via os._exit
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CATCHABLE)
        time.sleep(step)
        with atomic_dir(out, force=True) as tmp:
            for i in range(CRASH_FILES):
                (tmp / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
                time.sleep(step)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001
        code = 3
    os._exit(code)


def crash_case(root: Path, sig: int, moment: int, previous: bool, step: float = 0.15) -> str | None:
    """Kill a child writing ``root/out-dir`` at ``MOMENTS[moment]``; check what is left."""
    out = root / "out-dir"  # a hyphen in the name: the stale sweep must still parse the pid
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if previous:
        out.mkdir()
        (out / "old.bin").write_bytes(b"previous good artifact")
    before = _dir_bytes(out)
    new = {f"part{i}.bin": bytes([i]) * 1000 for i in range(CRASH_FILES)}
    # a signal sent right after fork must meet the child's own SIGINT handler, not the parent's
    # (e.g. the CLI's when `netpress reliability` runs this): blocked until the child set it
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, _CATCHABLE)
    pid = os.fork()
    if pid == 0:
        _child_write(out, step)
    signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    name = f"{MOMENTS[moment]} / {signal.Signals(sig).name} / previous={previous}"
    deadline = time.monotonic() + 30
    tmps: list[Path] = []
    while MOMENTS[moment] != "never (control)" and time.monotonic() < deadline:
        tmps = list(root.glob(".out-dir.tmp-*"))
        written = len(list(tmps[0].glob("part*.bin"))) if tmps else -1
        if moment == 0 or (moment == 1 and tmps) or (moment >= 2 and written >= moment - 1):
            os.kill(pid, sig)
            break
        time.sleep(0.002)
    _, status = os.waitpid(pid, 0)
    after = _dir_bytes(out)
    if after not in (before, new):
        return f"{name}: DIR is half-written: {sorted(after or {})}"
    if sig != signal.SIGKILL and list(root.glob(".out-dir.tmp-*")):
        return f"{name}: temporary dir left behind after a catchable signal"
    if sig == signal.SIGKILL or MOMENTS[moment] == "never (control)":
        from netpress.pipeline import atomic_dir

        with atomic_dir(root / "out-dir", force=True) as tmp:  # a later run sweeps stale dirs
            (tmp / "later.bin").write_bytes(b"x")
        left = [p.name for p in root.iterdir() if p.name != "out-dir"]
        if left:
            return f"{name}: a later run did not sweep {left}"
    return None


def swap_crash_case(root: Path) -> str | None:
    """SIGKILL between the two renames of a replace (simulated): the next run restores DIR."""
    from netpress import pipeline

    out = root / "out-dir"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out.mkdir()
    (out / "old.bin").write_bytes(b"previous")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    os.replace(out, root / f".out-dir.old-{dead}")  # what a kill after the first rename leaves
    pipeline._sweep_stale(out)
    if _dir_bytes(out) != {"old.bin": b"previous"}:
        return "kill between the renames: previous DIR not restored by the next run"
    return None


def run_crash() -> Section:
    section = Section("crash safety (fault injection)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="netpress-crash-") as tmp:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            for moment in range(len(MOMENTS)):
                for previous in (True, False):
                    section.check(crash_case(Path(tmp) / "c", sig, moment, previous))
        section.check(swap_crash_case(Path(tmp) / "s"))
    section.seconds = time.perf_counter() - start
    section.notes.append("forked writers through pipeline.atomic_dir, killed at: "
                         + "; ".join(MOMENTS) + "; plus a kill between the two renames")
    return section


