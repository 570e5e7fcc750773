"""Shared pieces of the benchmark suites: a workload, and measuring a model or an ONNX file on it.

Every suite measures netpress and its anchors through these same functions in one process, so
metric, bytes and latency are taken the same way for every tool.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from netpress.bench import row
from netpress.core.recipe import Recipe
from netpress.pipeline import Deployed, Workload, deploy, quality, resolve_workload


@dataclass
class Bench:
    """One suite's context: the workload, a scratch dir, the fp32 reference outputs and latency."""

    suite: str
    work: Workload
    runtime: str
    threads: int
    batch: int
    scratch: Path
    reference: list[torch.Tensor] | None = None
    fp32_latency_ms: float | None = None

    @property
    def example(self):
        return self.work.evaluation[0].slice(self.batch)

    def deployed(self, model: nn.Module, tag: str) -> Deployed:
        return deploy(model, self.example, self.runtime, self.threads, self.scratch / f"{tag}.onnx")

    def onnx_file(self, path: Path) -> Deployed:
        """An ONNX file made by an anchor tool, run on this suite's runtime."""
        from netpress.export.onnx import OnnxRunner

        model = self.work.model
        return Deployed(self.runtime, self.threads, model, path, OnnxRunner(path, threads=self.threads))

    def measure(
        self,
        case: str,
        tool: str,
        method: str,
        deployed: Deployed,
        size_bytes: int,
        compress_seconds: float | None,
        notes: str = "",
    ) -> dict[str, Any]:
        value, secondary, outputs = quality(self.work, deployed, self.reference)
        if self.reference is None:
            self.reference = outputs
        latency = deployed.latency_ms(self.example)
        if self.fp32_latency_ms is None:
            self.fp32_latency_ms = latency
        extra = {k: round(v, 4) for k, v in secondary.items() if k != self.work.metric}
        return row(
            suite=self.suite, case=case, tool=tool, method=method, metric_name=self.work.metric,
            metric=round(value, 4), size_bytes=int(size_bytes), latency_ms=round(latency, 3),
            speedup_vs_fp32=round(self.fp32_latency_ms / latency, 3),
            compress_seconds=None if compress_seconds is None else round(compress_seconds, 2),
            runtime=self.runtime, threads=self.threads, batch=self.batch,
            notes="; ".join(filter(None, [notes, ", ".join(f"{k} {v}" for k, v in extra.items())])),
        )


def open_bench(suite: str, model: str, data: str, metric: str | None = None, runtime: str = "onnxruntime",
               threads: int = 2, batch: int = 1, eval_limit: int | None = None) -> tuple[Bench, Any]:
    """Resolve a zoo workload; returns the :class:`Bench` and the scratch TemporaryDirectory."""
    recipe = Recipe.from_dict({"model": model, "data": data, "metric": metric, "runtime": runtime,
                               "threads": threads, "batch": batch, "eval_limit": eval_limit})
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix=f"netpress-bench-{suite}-")
    work = resolve_workload(recipe)
    return Bench(suite, work, runtime, threads, batch, Path(tmp.name)), tmp


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def artifact_bytes(model: nn.Module, bench: Bench, tag: str) -> int:
    """Bytes of the netpress artifact's tensor files for ``model``."""
    from netpress.export.artifact import save_artifact
    from netpress.measure import file_bytes

    d = bench.scratch / f"artifact-{tag}"
    save_artifact(model, d, source=bench.work.source, recipe={})
    return sum(file_bytes(p) for p in d.glob("*.safetensors"))


def plain_safetensors_bytes(model: nn.Module, bench: Bench, tag: str) -> int:
    """Bytes of ``model.state_dict()`` saved with plain safetensors (what an anchor user gets)."""
    from safetensors.torch import save_file

    path = bench.scratch / f"plain-{tag}.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path.stat().st_size


__all__ = ["Bench", "open_bench", "timed", "artifact_bytes", "plain_safetensors_bytes"]
