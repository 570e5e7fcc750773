"""Latency of one forward pass: median of warm runs, with the runtime, threads and batch stated.

Both runners follow the same protocol: ``warmup`` untimed runs, then up to ``runs`` timed runs,
each timed alone with ``time.perf_counter``. A time cap (``max_seconds``, warm-up included) stops a
slow model early, but never before ``min(3, runs)`` timed runs, so every result has a median.

Example:
    >>> import torch
    >>> from netpress.core.data import Batch
    >>> from netpress.measure.latency import latency_torch
    >>> res = latency_torch(torch.nn.Linear(8, 4), Batch((torch.zeros(1, 8),)), warmup=2, runs=5)
    >>> (res.runtime, res.threads, res.batch, res.runs)
    ('torch', 2, 1, 5)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress.core.data import Batch
from netpress.core.errors import RecipeError
from netpress.measure._util import eval_mode

MIN_RUNS = 3


@dataclass
class LatencyResult:
    """Latency statistics of warm runs, in milliseconds.

    Attributes:
        median_ms: median of the timed runs (the figure reports use).
        p90_ms: 90th percentile (linear interpolation).
        mean_ms: arithmetic mean.
        runs: number of timed runs actually done (fewer than asked when the time cap hit).
        runtime: ``"torch"`` or ``"onnxruntime"``.
        threads: intra-op threads used.
        batch: examples per run.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    runtime: str
    threads: int
    batch: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)


def _check_args(threads: int, warmup: int, runs: int, max_seconds: float) -> None:
    if not isinstance(threads, int) or threads < 1:
        raise RecipeError("latency threads", got=threads, expected="an int >= 1", fix="use e.g. threads=2")
    if warmup < 0 or runs < 1:
        raise RecipeError(
            "latency runs",
            got={"warmup": warmup, "runs": runs},
            expected="warmup >= 0 and runs >= 1",
            fix="use e.g. warmup=10, runs=50",
        )
    if not max_seconds > 0:
        raise RecipeError(
            "latency max_seconds",
            got=max_seconds,
            expected="a positive number",
            fix="use e.g. max_seconds=30",
        )


def time_runs(fn: Callable[[], Any], warmup: int, runs: int, max_seconds: float) -> list[float]:
    """Call ``fn`` ``warmup`` times, then time up to ``runs`` calls; returns seconds per call.

    Warm-up stops once it has used a quarter of ``max_seconds`` (after at least one call); timed
    runs stop once the total passes ``max_seconds``, after at least ``min(3, runs)`` runs.

    Args:
        fn: the work to time (no arguments).
        warmup: untimed calls first.
        runs: timed calls at most.
        max_seconds: time cap for warm-up and timed runs together.

    Returns:
        The duration of each timed call, in seconds.

    Example:
        >>> len(time_runs(lambda: None, warmup=1, runs=4, max_seconds=5.0))
        4
    """
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start > 0.25 * max_seconds:
            break
    times: list[float] = []
    min_runs = min(MIN_RUNS, runs)
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - start > max_seconds:
            break
    return times


def summarise(times_s: list[float], runtime: str, threads: int, batch: int) -> LatencyResult:
    """Turn per-run seconds into a :class:`LatencyResult` (milliseconds).

    Example:
        >>> summarise([0.001, 0.002, 0.003], "torch", 2, 1).median_ms
        2.0
    """
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return LatencyResult(
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        runs=int(ms.size),
        runtime=runtime,
        threads=threads,
        batch=batch,
    )


def latency_torch(
    model: nn.Module,
    example: Batch,
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
    max_seconds: float = 30.0,
) -> LatencyResult:
    """Latency of ``model`` in PyTorch eager mode on ``example``.

    Runs under ``torch.inference_mode`` in eval mode with ``torch.set_num_threads(threads)``; the
    previous thread count and the model's training flag are restored afterwards.

    Args:
        model: the model (on CPU).
        example: inputs of one run; its batch size is reported.
        threads: intra-op threads.
        warmup: untimed runs first.
        runs: timed runs at most.
        max_seconds: time cap (see the module doc).

    Returns:
        A :class:`LatencyResult` with ``runtime="torch"``.

    Raises:
        RecipeError: a non-positive ``threads``/``runs``/``max_seconds`` or negative ``warmup``.

    Example:
        >>> import torch
        >>> res = latency_torch(torch.nn.Linear(8, 4), Batch((torch.zeros(4, 8),)), runs=3)
        >>> res.batch, res.median_ms > 0
        (4, True)
    """
    _check_args(threads, warmup, runs, max_seconds)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eval_mode(model), torch.inference_mode():
            times = time_runs(lambda: example.run(model), warmup, runs, max_seconds)
    finally:
        torch.set_num_threads(previous_threads)
    return summarise(times, "torch", threads, example.size)


def latency_onnx(
    path: str | os.PathLike[str],
    feeds: dict[str, np.ndarray] | Batch,
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
    max_seconds: float = 30.0,
) -> LatencyResult:
    """Latency of an ONNX file in ONNX Runtime (CPU provider).

    The session uses ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential
    execution and ``ORT_ENABLE_ALL`` graph optimisations (see :func:`netpress.export.onnx.make_session`).

    Args:
        path: the ``.onnx`` file.
        feeds: ``{input name: array}`` as ``InferenceSession.run`` takes it, or a :class:`Batch`
            (converted with :meth:`netpress.export.onnx.OnnxRunner.feeds`).
        threads: intra-op threads.
        warmup: untimed runs first.
        runs: timed runs at most.
        max_seconds: time cap (see the module doc).

    Returns:
        A :class:`LatencyResult` with ``runtime="onnxruntime"``; ``batch`` is the first feed's
        leading dimension.

    Raises:
        RecipeError: bad ``threads``/``warmup``/``runs``/``max_seconds``.
        ArtifactError: ``path`` is missing.
        ModelError: ONNX Runtime cannot load the file, or the feeds do not match its inputs.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from netpress.export.onnx import export_onnx
        >>> batch = Batch((torch.zeros(1, 8),))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     onnx_path = export_onnx(torch.nn.Linear(8, 4), batch, pathlib.Path(d, "m.onnx"))
        ...     latency_onnx(onnx_path, batch, runs=3).runtime
        'onnxruntime'
    """
    from netpress.export.onnx import OnnxRunner  # local: export imports measure

    _check_args(threads, warmup, runs, max_seconds)
    runner = OnnxRunner(path, threads=threads)
    arrays = runner.feeds(feeds) if isinstance(feeds, Batch) else runner.check_feeds(feeds)
    session = runner.session
    times = time_runs(lambda: session.run(None, arrays), warmup, runs, max_seconds)
    first = next(iter(arrays.values()))
    batch = int(first.shape[0]) if first.ndim else 1
    return summarise(times, "onnxruntime", threads, batch)


__all__ = ["LatencyResult", "latency_torch", "latency_onnx", "time_runs", "summarise"]
