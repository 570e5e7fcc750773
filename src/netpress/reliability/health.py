"""Determinism (same recipe and seed -> byte-identical covered files) and numerical health (NaN/Inf
refused before export; ``--max-drop`` keeps no artifact).

Example:
    >>> from netpress.reliability.health import run_health  # doctest: +SKIP
    >>> run_health(full=False).failures  # doctest: +SKIP
    []
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netpress.reliability.common import BASE_RECIPE, Section
from netpress.reliability.tamper import build_artifact

TIMING_KEYS = (("original", "latency_ms"), ("compressed", "latency_ms"), ("ratios", "latency"),
               ("compress_seconds",))
COVERED = "model.safetensors, model.onnx, manifest.json minus measured timings, metrics.json minus timings"


def covered_digest(art: Path) -> dict[str, str]:
    """SHA-256 of what must be byte-identical between two runs of one recipe and seed.

    ``model.safetensors`` and ``model.onnx`` whole; ``metrics.json`` and the manifest without the
    measured latencies and wall-clock seconds (and without the hashes of ``metrics.json`` and
    ``report.html``, which contain them). ``report.html`` is not covered (timings, chart).
    """
    def strip(metrics: Any) -> Any:
        metrics = json.loads(json.dumps(metrics))
        for path in TIMING_KEYS:
            node = metrics
            for p in path[:-1]:
                node = node.get(p, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(path[-1], None)
        return metrics

    out = {}
    for name in ("model.safetensors", "model.onnx"):
        if (art / name).is_file():
            out[name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    manifest["metrics"] = strip(manifest.get("metrics") or {})
    for name in ("metrics.json", "report.html"):
        manifest["files"].pop(name, None)
    out["manifest.json (covered part)"] = hashlib.sha256(
        json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    if (art / "metrics.json").is_file():
        metrics = strip(json.loads((art / "metrics.json").read_text()))
        out["metrics.json (minus timings)"] = hashlib.sha256(
            json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    return out


def run_determinism(full: bool) -> Section:
    """Two runs, same recipe and seed: the covered parts hash equal."""
    section = Section("determinism")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="netpress-det-") as tmp:
        digests = []
        for i in range(2):
            if full:
                import netpress

                recipe = {**BASE_RECIPE, "runtime": "torch", "eval_limit": 256}
                netpress.compress(recipe, Path(tmp) / f"run{i}")
            else:
                build_artifact(Path(tmp) / f"run{i}")
            digests.append(covered_digest(Path(tmp) / f"run{i}"))
        for name in digests[0]:
            section.check(None if digests[0][name] == digests[1].get(name)
                          else f"{name} differs between two runs")
    section.seconds = time.perf_counter() - start
    section.notes.append(("netpress.compress of the digits CNN recipe twice" if full else
                          "the tamper artifact built twice") + f"; covered: {COVERED}")
    return section


# =============================================================================== numerical health
def run_health(full: bool) -> Section:
    """NaN/Inf in weights, buffers, outputs or data is refused before anything is exported."""
    import torch
    import torch.nn as nn

    import netpress
    from netpress.core.data import as_batches
    from netpress.core.errors import ConstraintError, DataError, ModelError
    from netpress.pipeline import check_finite

    section = Section("numerical health")
    start = time.perf_counter()

    def expect(err: type[BaseException], fn: Callable[[], Any], name: str) -> None:
        try:
            fn()
        except err:
            section.check(None)
        except BaseException as exc:  # noqa: BLE001
            section.check(f"{name}: {type(exc).__name__}: {exc}")
        else:
            section.check(f"{name}: accepted")

    for bad in (float("nan"), float("inf"), float("-inf")):
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        with torch.no_grad():
            m[0].weight[1, 2] = bad
        expect(ModelError, lambda m=m: check_finite(m, []), f"{bad} weight")
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        m[1].running_var[0] = bad
        expect(ModelError, lambda m=m: check_finite(m, []), f"{bad} buffer")
        expect(ModelError, lambda b=bad: check_finite(nn.Linear(2, 2), [torch.tensor([1.0, b])]),
               f"{bad} output")
        x = torch.randn(8, 4)
        x[3, 1] = bad
        expect(DataError, lambda x=x: as_batches(x), f"{bad} data tensor")
        expect(DataError, lambda x=x: as_batches([{"input_ids": x}]), f"{bad} data dict")
        expect(DataError, lambda x=x: netpress.quantize(nn.Linear(4, 2), {"method": "int8_weight"},
                                                        data=(x, torch.zeros(8))),
               f"{bad} calibration data through netpress.quantize")
    if full:
        with tempfile.TemporaryDirectory(prefix="netpress-health-") as tmp:
            recipe = {**BASE_RECIPE, "runtime": "torch", "export": ["artifact"], "eval_limit": 256,
                      "stages": [{"prune": {"method": "magnitude", "sparsity": 0.99}}]}
            out = Path(tmp) / "out"
            expect(ConstraintError, lambda: netpress.compress(recipe, out, max_drop=0.01),
                   "--max-drop")
            section.check("--max-drop kept an artifact" if out.exists() else None)
            expect(ConstraintError, lambda: netpress.compress(recipe, out, max_drop=0.01,
                                                              keep_failed=True), "--keep-failed")
            section.check(None if (out / "manifest.json").is_file() else
                          "--keep-failed kept no artifact")
    section.seconds = time.perf_counter() - start
    return section


