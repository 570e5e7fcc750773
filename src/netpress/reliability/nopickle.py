"""No pickle: artifacts load with every unpickling entry point patched to raise; malicious pickles
passed as a model are refused with the safe alternative and never run.

Example:
    >>> from netpress.reliability.nopickle import run_pickle  # doctest: +SKIP
    >>> run_pickle().failures  # doctest: +SKIP
    []
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from netpress.reliability.common import Section
from netpress.reliability.tamper import build_artifact


class _Evil:
    """Unpickling this object creates ``marker`` (what a malicious model file would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@contextlib.contextmanager
def no_pickle_anywhere() -> Iterator[list[str]]:
    """Every unpickling entry point raises (and is recorded) inside the block."""
    import pickle

    import torch

    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def f(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called while loading an artifact")
        return f

    class NoUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse("pickle.Unpickler")()

    saved = (pickle.Unpickler, pickle.loads, pickle.load, torch.load)
    pickle.Unpickler, pickle.loads, pickle.load = NoUnpickler, refuse("pickle.loads"), refuse(
        "pickle.load")  # type: ignore[misc,assignment]
    torch.load = refuse("torch.load")  # type: ignore[assignment]
    try:
        yield calls
    finally:
        pickle.Unpickler, pickle.loads, pickle.load, torch.load = saved  # type: ignore[misc]


def evil_model_files(d: Path, marker: Path) -> list[Path]:
    """Model files whose loading by pickle would create ``marker``: raw pickles under every
    accepted suffix, a ``torch.save`` zip, and a ``.pt2`` whose pickled members were replaced."""
    import pickle
    import zipfile

    import torch
    import torch.nn as nn

    blob = pickle.dumps(_Evil(str(marker)))
    out = []
    for suffix in (".pt", ".pth", ".bin", ".pkl", ".pt2", ".safetensors"):
        (d / f"raw{suffix}").write_bytes(blob)
        out.append(d / f"raw{suffix}")
    torch.save({"weight": _Evil(str(marker))}, d / "zip.pt")
    out.append(d / "zip.pt")
    prog = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(prog, d / "good.pt2")
    evil_zip = (d / "zip.pt").read_bytes()
    with zipfile.ZipFile(d / "good.pt2") as src, zipfile.ZipFile(d / "evil.pt2", "w") as dst:
        for info in src.infolist():  # the torch.save'd sample inputs become the evil pickle
            data = src.read(info)
            dst.writestr(info, evil_zip if data[:2] == b"PK" else data)
    out.append(d / "evil.pt2")
    return out


def run_pickle() -> Section:
    section = Section("no pickle")
    start = time.perf_counter()
    import netpress
    from netpress.core.errors import ModelError
    from netpress.export.modelfile import load_model_file

    with tempfile.TemporaryDirectory(prefix="netpress-pickle-") as tmp:
        d = Path(tmp)
        art = build_artifact(d / "artifact")
        with no_pickle_anywhere() as calls:
            try:
                netpress.load(art)
                section.check(f"unpickling called: {calls}" if calls else None)
            except BaseException as exc:  # noqa: BLE001
                section.check(f"artifact load with pickle disabled: {type(exc).__name__}: {exc}")
        marker = d / "PWNED"
        for path in evil_model_files(d, marker):
            try:
                load_model_file(path)
                section.check(f"{path.name}: loaded")
            except ModelError as exc:
                msg = str(exc)
                ok = "pickle" in msg.lower() and ("torch.export" in msg or "safetensors" in msg)
                section.check(None if ok else f"{path.name}: message lacks reason/alternative: {msg}")
            except BaseException as exc:  # noqa: BLE001
                section.check(f"{path.name}: {type(exc).__name__}: {exc}")
            if marker.exists():
                section.check(f"{path.name}: the pickle RAN (marker file created)")
                marker.unlink()
    section.seconds = time.perf_counter() - start
    section.notes.append("artifact loaded with pickle.Unpickler/loads/load and torch.load raising; "
                         "malicious pickles as .pt/.pth/.bin/.pkl/.pt2/.safetensors, a torch.save "
                         "zip and a .pt2 with its pickled members replaced")
    return section


