"""Progress bars for every loop that can take more than a second (rich), switchable off.

Bars go to stderr so they never mix with printed tables or JSON. ``NETPRESS_PROGRESS=0`` (or
:func:`set_enabled`) turns them off; tests do this.

Example:
    >>> from netpress.core.progress import track
    >>> sum(track(range(3), "adding"))
    3
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")

_console = Console(stderr=True)
_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force bars on/off; ``None`` returns to the environment default."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("NETPRESS_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar labelled ``description``."""
    if not enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def status(message: str) -> None:
    """One line of status on stderr (shown only when progress is enabled)."""
    if enabled():
        _console.print(f"[dim]{message}[/dim]")


__all__ = ["track", "status", "set_enabled", "enabled"]
