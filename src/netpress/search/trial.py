"""One planner trial, as a picklable top-level function: compress, export, measure quality and bytes.

:func:`run_trial` runs wherever the executor puts it (in-process or a Ray worker). It resolves the
recipe's workload (cached per process, with the original model's outputs on the target runtime as
the reference), applies the stages, exports the model for the runtime and measures the metrics on
the **evaluation** split and the artifact's weight bytes, exactly as ``netpress compress`` does.

Latency is *not* measured here for the ONNX runtimes: trials may run in parallel (two Ray workers
on two cores would disturb each other's timings), so the ONNX file comes back as bytes and the
driver times it serially, paired with the original model (see :mod:`netpress.search.planner`). For
``runtime: torch`` the latency is timed here (one trial at a time in-process; with Ray workers the
timings of concurrent trials can disturb each other, which the report states).

Example:
    >>> from netpress.search.trial import run_trial  # doctest: +SKIP
    >>> out = run_trial({"recipe": {"model": "zoo:digits_cnn", "data": "zoo:digits",
    ...     "stages": [{"quantize": {"method": "int8_weight"}}]}})  # doctest: +SKIP
    >>> sorted(out)[:3]  # doctest: +SKIP
    ['compress_seconds', 'latency_ms', 'macs']
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from netpress.core.recipe import Recipe

_CACHE: dict[str, Any] = {}


LATENCY = {"warmup": 10, "runs": 50, "max_seconds": 20.0}  # per measurement (median kept)


def latency(runtime: str, threads: int, target: Any, example: Any) -> float:
    """Median latency (ms) of an ONNX file (or, for ``torch``, a module) on ``runtime``."""
    from netpress.measure import latency_onnx, latency_torch

    if runtime == "torch":
        return latency_torch(target, example, threads=threads, **LATENCY).median_ms
    if runtime == "openvino":
        from netpress.export.openvino import latency_openvino

        return latency_openvino(target, example, threads=threads, **LATENCY).median_ms
    return latency_onnx(target, example, threads=threads, **LATENCY).median_ms


def _weights_bytes(art_dir: Path) -> int:
    from netpress.measure import file_bytes

    return sum(file_bytes(p) for p in art_dir.glob("*.safetensors"))


def workload(recipe: Recipe, validation: float | None = None
             ) -> tuple[Any, list[torch.Tensor], dict[str, Any]]:
    """(workload, reference outputs of the original on the runtime, the original's quality).

    With ``validation`` (a fraction, see :mod:`netpress.search.validation`) the workload is the
    search split: calibration and train without the held-out examples, and those examples in
    place of the evaluation split (outputs and quality measured on them).

    Cached per process by model, data, metric, seed, eval_limit, runtime, threads and batch (the
    full and the search split of one recipe share the loaded model and data).
    """
    from netpress.pipeline import deploy, quality, resolve_workload
    from netpress.search.validation import search_split

    d = recipe.to_dict()
    key = json.dumps({k: d[k] for k in ("model", "data", "metric", "seed", "eval_limit",
                                         "runtime", "threads", "batch")}, sort_keys=True)
    if _CACHE.get("key") != key:
        _CACHE.clear()  # one workload at a time: models can be large
        _CACHE["key"], _CACHE["resolved"] = key, resolve_workload(recipe)
    if validation not in _CACHE:
        work = _CACHE["resolved"]
        if validation is not None:
            work = search_split(work, validation)
        example = _CACHE["resolved"].evaluation[0].slice(recipe.batch)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="netpress-plan-ref-") as tmp:
            dep = deploy(work.model, example, recipe.runtime, recipe.threads, Path(tmp) / "o.onnx")
            value, secondary, ref = quality(work, dep, None)
        _CACHE[validation] = (work, ref, {**secondary, work.metric: value})
        _CACHE[("seconds", validation)] = time.perf_counter() - t0
    return _CACHE[validation]


def measure_seconds(recipe: Recipe, validation: float | None = None) -> float:
    """Seconds the cached :func:`workload` took to export and measure the original on that split
    (0.0 if it is not cached)."""
    d = recipe.to_dict()
    key = json.dumps({k: d[k] for k in ("model", "data", "metric", "seed", "eval_limit",
                                         "runtime", "threads", "batch")}, sort_keys=True)
    return float(_CACHE.get(("seconds", validation), 0.0)) if _CACHE.get("key") == key else 0.0


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Compress ``payload["recipe"]`` and measure it (see the module doc).

    Args:
        payload: ``{"recipe": recipe dict, "threads": torch threads for compression (optional),
            "validation": held-out fraction of the calibration split (optional; the metrics are
            then measured on those examples, which the stages never see, instead of the
            evaluation split)}``.

    Returns:
        ``metrics`` (the main metric and the secondary ones by name), ``size_bytes``,
        ``params``, ``nonzero_params``, ``macs``,
        ``compress_seconds``, ``onnx`` (bytes, or None for runtime torch) and ``latency_ms``
        (None unless runtime torch).

    Raises:
        Any error of the stages or the export (the executor records it as a failed trial).
    """
    from netpress.export.artifact import save_artifact
    from netpress.measure import count_macs, count_nonzero, count_params
    from netpress.pipeline import apply_stages, check_finite, deploy, quality

    recipe = Recipe.from_dict(payload["recipe"])
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    torch.manual_seed(recipe.seed)
    work, ref, _orig = workload(recipe, payload.get("validation"))
    example = work.evaluation[0].slice(recipe.batch)  # an input of the right shape
    t0 = time.perf_counter()
    model, _notes = apply_stages(work.model, recipe, work)
    seconds = time.perf_counter() - t0
    check_finite(model, [])
    with tempfile.TemporaryDirectory(prefix="netpress-plan-trial-") as tmp_name:
        tmp = Path(tmp_name)
        dep = deploy(model, example, recipe.runtime, recipe.threads, tmp / "trial.onnx")
        value, secondary, outputs = quality(work, dep, ref)
        check_finite(model, outputs)
        save_artifact(model, tmp / "artifact", source=work.source, recipe=recipe.to_dict())
        size = _weights_bytes(tmp / "artifact")
        onnx = dep.onnx_path.read_bytes() if dep.onnx_path is not None else None
        lat_ms = latency("torch", recipe.threads, model, example) if recipe.runtime == "torch" \
            else None
    return {"metrics": {k: float(v) for k, v in {**secondary, work.metric: value}.items()},
            "size_bytes": int(size), "params": count_params(model),
            "nonzero_params": count_nonzero(model), "macs": count_macs(model, example),
            "compress_seconds": round(seconds, 3), "onnx": onnx, "latency_ms": lat_ms}


__all__ = ["LATENCY", "latency", "measure_seconds", "run_trial", "workload"]
