"""OpenVINO as a second CPU runtime: run and time the same ONNX files (fp32 or QDQ int8).

OpenVINO reads ONNX directly (``ov.Core().read_model(path)``); a QDQ graph (``QuantizeLinear`` /
``DequantizeLinear``) is turned into its low-precision transformations and runs on int8 kernels
(VNNI / AMX). The compiled model uses ``INFERENCE_NUM_THREADS=threads`` and
``PERFORMANCE_HINT=LATENCY``, and one infer request is reused for every call.

``precision``: ``"default"`` leaves OpenVINO's choice (on a CPU with AMX it runs float layers in
bf16), ``"f32"`` forces strict fp32 (``INFERENCE_PRECISION_HINT=f32``). For int8 (QDQ) models
netpress's benchmarks pass ``f32`` so that the float ops between the integer kernels are not
silently run in bf16, and give NNCF's model the same setting. On a CPU without AMX or
AVX512-BF16 (the 2-core Xeon the benchmarks ran on: AVX512-VNNI only) OpenVINO's default already
is f32: ``compiled.get_property("INFERENCE_PRECISION_HINT")`` reads back ``f32`` either way, and
MobileNetV2's W8A8 agreement was identical under both hints (0.840 / 0.970).

Example:
    >>> import tempfile, pathlib, torch
    >>> from netpress.core.data import Batch
    >>> from netpress.export.onnx import export_onnx
    >>> batch = Batch((torch.ones(2, 4),))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = export_onnx(torch.nn.Linear(4, 3), batch, pathlib.Path(d, "m.onnx"))
    ...     OpenVinoRunner(p, threads=1).run(batch).shape
    (2, 3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, ModelError, RecipeError

PRECISIONS = ("default", "f32", "bf16")


def _ov() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError("runtime openvino", got="openvino is not installed",
                         expected="the openvino package", fix="pip install openvino") from exc
    return ov


class OpenVinoRunner:
    """Run an ONNX file (or an ``ov.Model``) with OpenVINO on :class:`Batch` objects.

    Args:
        path: the ``.onnx`` file, or an already built ``openvino.Model`` (e.g. NNCF's output).
        threads: ``INFERENCE_NUM_THREADS``.
        precision: ``default`` (OpenVINO's choice), ``f32`` or ``bf16``.

    Attributes:
        compiled: the compiled model; request: the reused infer request;
        input_names: the graph's input names, in order.

    Raises:
        ArtifactError: missing file. ModelError: OpenVINO cannot read or compile it.
        RecipeError: bad ``threads`` or ``precision``.
    """

    def __init__(self, path: str | os.PathLike[str] | Any, threads: int = 2,
                 precision: str = "default") -> None:
        ov = _ov()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise RecipeError("openvino threads", got=threads, expected="an integer >= 1",
                              fix="use threads: 2")
        if precision not in PRECISIONS:
            raise RecipeError("openvino precision", got=precision,
                              expected=f"one of {PRECISIONS}", fix="use precision: default")
        core = ov.Core()
        if isinstance(path, (str, os.PathLike)):
            self.path: Path | None = Path(path)
            if not self.path.is_file():
                raise ArtifactError(str(path), got="no such file", expected="an .onnx file",
                                    fix="export the model first (netpress export DIR)")
            try:
                model = core.read_model(str(self.path))
            except Exception as exc:
                raise ModelError(f"{path}", got=f"OpenVINO cannot read it ({exc})"[:300],
                                 expected="an ONNX model OpenVINO supports",
                                 fix="re-export it with export_onnx (opset 17/18)") from exc
        else:
            self.path, model = None, path
        self.threads, self.precision = threads, precision
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise ModelError(f"{path}", got=f"OpenVINO cannot compile it ({exc})"[:300],
                             expected="a model the CPU plugin supports",
                             fix="run it with runtime: onnxruntime instead") from exc
        self.request = self.compiled.create_infer_request()
        self.input_names: list[str] = [p.any_name for p in self.compiled.inputs]
        self._types = [p.get_element_type().to_dtype() for p in self.compiled.inputs]

    def _array(self, i: int, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.ascontiguousarray(value).astype(self._types[i], copy=False)

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """``{input name: array}`` for ``batch`` (dict inputs by name, positional in order).

        Raises:
            ModelError: an input the graph needs is missing.
        """
        if isinstance(batch.inputs, dict):
            missing = [n for n in self.input_names if n not in batch.inputs]
            if missing:
                raise ModelError("openvino inputs", got=sorted(batch.inputs),
                                 expected=f"keys {self.input_names}", fix=f"add {missing}")
            return {n: self._array(i, batch.inputs[n]) for i, n in enumerate(self.input_names)}
        if len(batch.inputs) < len(self.input_names):
            raise ModelError("openvino inputs", got=f"{len(batch.inputs)} tensors",
                             expected=f"{len(self.input_names)} ({self.input_names})",
                             fix="pass every input the model was exported with")
        return {n: self._array(i, t) for i, (n, t) in
                enumerate(zip(self.input_names, batch.inputs, strict=False))}

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """First output for prepared feeds (the reused infer request)."""
        self.request.infer(list(feeds.values()))
        return self.request.get_output_tensor(0).data

    def run(self, batch: Batch) -> np.ndarray:
        """The first output of the graph on ``batch`` (a copy)."""
        return np.array(self.infer(self.feeds(batch)))


def latency_openvino(path: str | os.PathLike[str] | Any, feeds: dict[str, np.ndarray] | Batch,
                     threads: int = 2, warmup: int = 10, runs: int = 50,
                     max_seconds: float = 30.0, precision: str = "default") -> Any:
    """Latency of an ONNX file (or ``ov.Model``) in OpenVINO with a reused infer request.

    Returns:
        A :class:`netpress.measure.latency.LatencyResult` with ``runtime="openvino"``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from netpress.export.onnx import export_onnx
        >>> b = Batch((torch.zeros(1, 8),))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_onnx(torch.nn.Linear(8, 4), b, pathlib.Path(d, "m.onnx"))
        ...     latency_openvino(p, b, threads=1, runs=3).runtime
        'openvino'
    """
    from netpress.measure.latency import _check_args, summarise, time_runs

    _check_args(threads, warmup, runs, max_seconds)
    runner = OpenVinoRunner(path, threads=threads, precision=precision)
    arrays = runner.feeds(feeds) if isinstance(feeds, Batch) else {
        n: runner._array(i, feeds[n]) for i, n in enumerate(runner.input_names)}
    values = list(arrays.values())
    times = time_runs(lambda: runner.request.infer(values), warmup, runs, max_seconds)
    first = values[0]
    return summarise(times, "openvino", threads, int(first.shape[0]) if first.ndim else 1)


__all__ = ["OpenVinoRunner", "PRECISIONS", "latency_openvino"]
