"""Helpers for the tests that launch ``torchrun`` workers (tests/test_ddp.py, tests/test_gpu.py)."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import sys
from pathlib import Path
from types import ModuleType


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_worker(tmp_path: Path, name: str, source: str) -> tuple[Path, ModuleType]:
    """Write the worker script ``source`` as ``tmp_path/name.py`` and import it (fresh each time)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module(name)
        importlib.reload(mod)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    return path, mod


def clean_env() -> dict[str, str]:
    """This process's environment without any distributed variables, one thread per worker."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun() -> str:
    """The ``torchrun`` next to this interpreter (else the one on PATH)."""
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
