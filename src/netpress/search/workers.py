"""Trial executors: run independent trials in-process or as Ray tasks, never crashing the caller.

The planner and the student NAS hand a picklable top-level function and a list of items to
``make_executor(spec).map(fn, items)`` and get one :class:`TrialOutcome` per item, in item order.
A trial that raises (or, on Ray, whose worker process dies) comes back as ``ok=False`` with the
error text; the other trials still complete.

``workers`` spec:

- ``None`` or ``"inprocess"``: sequential, in this process (the default).
- ``"ray"``: a local Ray cluster started here (``num_cpus`` CPUs, no dashboard) and shut down by
  :meth:`RayExecutor.close`. If Ray is already initialised in this process it is reused, not shut down.
- ``"ray://host:port"`` (Ray client) or ``"host:port"`` (a cluster's GCS address): connect to it.

Each Ray task runs with ``threads_per_task`` torch threads (1 by default: on a 2-core box two
tasks with 2 threads each would fight over the cores and make latency measurements meaningless).

Example:
    >>> from netpress.search.workers import make_executor
    >>> with make_executor(None) as ex:
    ...     outs = ex.map(abs, [-1, 2, -3])
    >>> [o.value for o in outs], all(o.ok for o in outs)
    ([1, 2, 3], True)
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from netpress.core.errors import ConstraintError, RecipeError

__all__ = ["TrialOutcome", "Executor", "InProcessExecutor", "RayExecutor", "make_executor"]

_ADDRESS = re.compile(r"^(?:ray://)?(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")
_SPEC_HELP = "None, 'inprocess', 'ray', 'ray://HOST:PORT' or 'HOST:PORT'"


@dataclass
class TrialOutcome:
    """What one trial produced.

    Attributes:
        ok: the trial returned normally.
        value: its return value (``None`` when ``ok`` is false).
        error: ``Type: message`` plus the traceback tail, or ``None`` when ``ok``.
        seconds: wall time of the trial itself (on Ray: measured inside the worker when it
            returned or raised; from submission to failure when the worker died).
    """

    ok: bool
    value: Any
    error: str | None
    seconds: float


def _error_text(exc: BaseException) -> str:
    """``Type: message`` followed by the last lines of the traceback (bounded)."""
    head = f"{type(exc).__name__}: {exc}".strip()
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    text = head if not tail else f"{head}\n{tail}"
    return text[:4000]


def _run_one(fn: Callable[[Any], Any], item: Any) -> TrialOutcome:
    """Call ``fn(item)``; any exception becomes ``ok=False`` (KeyboardInterrupt still propagates)."""
    start = time.perf_counter()
    try:
        value = fn(item)
    except Exception as exc:  # noqa: BLE001 - a trial crash is data, never the end of the study
        return TrialOutcome(False, None, _error_text(exc), time.perf_counter() - start)
    return TrialOutcome(True, value, None, time.perf_counter() - start)


def _run_in_worker(fn: Callable[[Any], Any], item: Any, threads: int) -> TrialOutcome:
    """Ray task body: pin torch threads, then run the trial (module level so Ray can pickle it)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return _run_one(fn, item)


class Executor:
    """Base class: ``map`` runs ``fn`` over ``items``; ``close`` releases resources.

    Attributes:
        parallelism: how many trials may run at once (1 for in-process).
    """

    parallelism: int = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[TrialOutcome]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs trials one after another in this process.

    Example:
        >>> InProcessExecutor().map(int, ["1", "x"])[1].ok
        False
    """

    parallelism = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[TrialOutcome]:
        """Run ``fn`` on each item in order; never raises for a failing trial."""
        return [_run_one(fn, item) for item in items]


class RayExecutor(Executor):
    """Runs each trial as a Ray task (1 CPU each, no retries); see the module docstring.

    Args:
        address: ``None`` for a local cluster started here, else a Ray address.
        num_cpus: CPUs of a local cluster (default: all cores); ignored with ``address``.
        threads_per_task: torch threads inside each task.

    Raises:
        RecipeError: Ray is not installed.
        ConstraintError: the cluster at ``address`` cannot be reached or Ray fails to start.
    """

    def __init__(
        self, address: str | None = None, *, num_cpus: int | None = None, threads_per_task: int = 1
    ) -> None:
        try:
            import ray
        except ImportError:
            raise RecipeError(
                "workers: ray", got="ray is not installed", expected="the ray package",
                fix="pip install 'netpress[ray]', or run without --workers (in-process)",
            ) from None
        self._ray = ray
        self._threads = max(1, int(threads_per_task))
        self._started = False
        self._closed = False
        if ray.is_initialized():
            pass  # the caller owns this Ray session; reuse it and leave it running on close()
        elif address is None:
            cpus = int(num_cpus or os.cpu_count() or 1)
            self._init(num_cpus=cpus, include_dashboard=False, where="workers: ray (local cluster)")
            self._started = True
        else:
            _probe(address)
            self._init(address=address, where=f"workers: {address}")
            self._started = True
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_run_in_worker)

    def _init(self, *, where: str, **kwargs: Any) -> None:
        # A local cluster's workers inherit this environment: they import what the driver can and
        # start with the task's thread count. (A runtime_env would do the same but costs ~30 s of
        # set-up before the first task; a remote cluster's workers get threads pinned per task.)
        env = {"OMP_NUM_THREADS": str(self._threads), "MKL_NUM_THREADS": str(self._threads),
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        saved = {key: os.environ.get(key) for key in env}
        if "address" not in kwargs:
            os.environ.update(env)
        try:
            self._ray.init(logging_level=logging.WARNING, log_to_driver=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ray raises many kinds; all mean "no cluster"
            raise ConstraintError(
                where, got=f"{type(exc).__name__}: {exc}", expected="a running Ray cluster",
                fix="check the address (ray status on the head node), or use --workers inprocess",
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[TrialOutcome]:
        """Submit every item as a task; collect in item order; task or worker deaths become ok=False."""
        if self._closed:
            raise RecipeError("workers: ray", got="a closed executor", expected="an open one",
                              fix="create a new executor with make_executor()")
        ray = self._ray
        submitted = []
        for item in items:
            t0 = time.perf_counter()
            try:
                submitted.append((self._remote.remote(fn, item, self._threads), t0, None))
            except Exception as exc:  # noqa: BLE001 - e.g. fn or item cannot be pickled
                submitted.append((None, t0, _error_text(exc)))
        outcomes = []
        for ref, t0, err in submitted:
            if ref is None:
                outcomes.append(TrialOutcome(False, None, err, 0.0))
                continue
            try:
                outcomes.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - worker died, node lost, object lost...
                outcomes.append(TrialOutcome(False, None, _error_text(exc), time.perf_counter() - t0))
        return outcomes

    def close(self) -> None:
        """Shut Ray down if this executor started it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._ray.shutdown()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of Ray's long retry loop) when nothing listens at ``address``."""
    match = _ADDRESS.match(address)
    assert match is not None  # make_executor validated the spec
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConstraintError(
            f"workers: {address}", got=f"cannot connect ({exc})", expected="a reachable Ray cluster",
            fix="start the cluster (ray start --head) and check host and port, "
                "or use --workers ray for a local cluster",
        ) from None


def make_executor(
    workers: str | None = None, *, num_cpus: int | None = None, threads_per_task: int = 1
) -> Executor:
    """Build the executor named by ``workers`` (see the module docstring).

    Args:
        workers: ``None``/``"inprocess"``, ``"ray"``, ``"ray://HOST:PORT"`` or ``"HOST:PORT"``.
        num_cpus: CPUs for a local Ray cluster (default: all cores).
        threads_per_task: torch threads in each Ray task.

    Returns:
        An :class:`Executor`; use it as a context manager or call ``close()``.

    Raises:
        RecipeError: a malformed spec, or Ray not installed.
        ConstraintError: the Ray cluster cannot be reached.

    Example:
        >>> ex = make_executor("inprocess")
        >>> ex.map(len, ["ab", None])[0].value, ex.map(len, [None])[0].ok
        (2, False)
        >>> ex.close()
    """
    spec = workers.strip() if isinstance(workers, str) else workers
    if spec is None or (isinstance(spec, str) and spec.lower() in ("", "inprocess", "in-process")):
        return InProcessExecutor()
    if not isinstance(spec, str):
        raise RecipeError("workers", got=workers, expected=_SPEC_HELP, fix="pass e.g. --workers ray")
    if spec.lower() == "ray":
        return RayExecutor(None, num_cpus=num_cpus, threads_per_task=threads_per_task)
    match = _ADDRESS.match(spec)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise RecipeError(
            "workers", got=workers, expected=_SPEC_HELP,
            fix="use --workers ray for a local cluster or --workers ray://HOST:10001 for a remote one",
        )
    return RayExecutor(spec, threads_per_task=threads_per_task)
