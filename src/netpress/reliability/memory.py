"""Peak memory of GPTQ / SparseGPT on MiniLM, measured in a fresh subprocess.

The child imports torch, netpress and the MiniLM tokenizer (``tokenizer``), then the model's code
(transformers' ``BertModel`` / ``AutoModel`` modules: ~130 MiB of Python modules, the same for a
model of any size), records its RSS (``base``: library state), loads the ``sentences``
calibration split and MiniLM, records the RSS again (``loaded``), resets the kernel's
high-water mark (``/proc/self/clear_refs``), runs the stage in place with 2 threads and reads
``VmHWM`` from ``/proc/self/status`` (``peak``). The issue-6 target is
``(peak - base) / (model + calibration bytes) < 2``: everything the job holds at its worst moment
(the model itself included) beyond the libraries, against the bytes it was given. The ratio
against the RSS before the model's code was imported (``ratio_before_model_code``) is reported
too. MiniLM's weights are memory-mapped from its safetensors file by transformers: they become
resident (file-backed pages, counted in RSS) as the stage first reads them; the sequential
methods unmap the clean pages of each float weight they replace
(:func:`netpress.quantize.sequential.release_file_pages`; the page cache keeps them).

Example:
    >>> from netpress.reliability.memory import peak_rss  # doctest: +SKIP
    >>> peak_rss("quantize", "gptq")["ratio"] < 2  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from netpress.reliability.common import Section

#: what the child runs (argv: stage, method); prints one JSON line
_RSS_SCRIPT = r"""
import json, os, sys, time


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


import torch
import netpress
import netpress.zoo as zoo
from netpress.api import apply

from netpress.zoo.models import tokenizer

torch.set_num_threads(2)
imports = status("VmRSS")
tokenizer("minilm")  # library state (vocabulary), not the job's data
tok = status("VmRSS")
from transformers import AutoModel, BertModel  # noqa: F401  the model's code, not its bytes
base = status("VmRSS")
bundle = zoo.load_data("sentences")
model = zoo.load_model("minilm")
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
data_bytes = sum(t.numel() * t.element_size() for b in bundle.calibration
                 for t in (b.inputs.values() if isinstance(b.inputs, dict) else b.inputs))
loaded = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    reset = True
except OSError:
    reset = False
stage, method = sys.argv[1], sys.argv[2]
config = {"method": method, **({"sparsity": 0.5} if stage == "prune" else {})}
t0 = time.perf_counter()
apply(stage, model, config, data=bundle.calibration, inplace=True)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"imports": imports, "tokenizer": tok, "base": base, "loaded": loaded, "peak": peak,
                  "model": model_bytes, "data": data_bytes, "seconds": seconds, "hwm_reset": reset,
                  "sentences": sum(len(b.inputs["input_ids"]) for b in bundle.calibration)}))
"""


def peak_rss(stage: str, method: str, timeout: float = 1500) -> dict[str, Any]:
    """Peak RSS of ``stage: {method}`` on MiniLM in a fresh subprocess (``VmHWM``).

    Args:
        stage, method: e.g. ``("quantize", "gptq")`` (default config of the method).
        timeout: seconds before the child is killed.

    Returns:
        ``{"status": "not available yet"}`` when the method is not registered, a status line when
        the child fails or times out, else the bytes (``base``, ``loaded``, ``peak``, ``model``,
        ``data``), the stage's wall ``seconds`` and ``ratio = (peak - base) / (model + data)``.

    Example:
        >>> r = peak_rss("quantize", "gptq")  # doctest: +SKIP
        >>> r["status"], r["ratio"] < 2  # doctest: +SKIP
        ('measured', True)
    """
    import subprocess

    from netpress.core.config import techniques

    if (stage, method) not in {(t.stage, t.method) for t in techniques()}:
        return {"status": "not available yet"}
    try:
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, stage, method],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s (not measured)"}
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["ratio"] = (r["peak"] - r["base"]) / (r["model"] + r["data"])
    r["ratio_before_model_code"] = (r["peak"] - r["tokenizer"]) / (r["model"] + r["data"])
    r["status"] = "measured"
    return r


def run_memory() -> Section:
    """GPTQ and SparseGPT on MiniLM: peak RSS against 2x (model + calibration bytes)."""
    section = Section("memory (MiniLM, peak RSS)")
    start = time.perf_counter()
    for stage, method in (("quantize", "gptq"), ("prune", "sparsegpt")):
        r = peak_rss(stage, method)
        if r["status"] != "measured":
            section.notes.append(f"{stage} {method}: {r['status']} {r.get('error', '')}")
            section.check(f"{stage} {method}: {r['status']}" if r["status"] != "not available yet"
                          else None)
            continue
        unmapped = "; the clean pages of each float weight replaced are unmapped"
        mb = {k: r[k] / 2**20 for k in ("imports", "tokenizer", "base", "loaded", "peak", "model",
                                        "data")}
        section.notes.append(
            f"{stage} {method} ({r['sentences']} calibration sentences, 2 threads, "
            f"{r['seconds']:.0f} s): peak RSS {mb['peak']:.0f} MiB (VmHWM"
            f"{', reset after loading' if r['hwm_reset'] else ''}); after imports "
            f"{mb['imports']:.0f} MiB, + tokenizer {mb['tokenizer']:.0f} MiB, + the model's code "
            f"(transformers BertModel) {mb['base']:.0f} MiB (base), + data and model "
            f"{mb['loaded']:.0f} MiB (weights memory-mapped, resident once read"
            f"{unmapped if stage == 'quantize' else ''}); model "
            f"{mb['model']:.1f} MiB + calibration {mb['data']:.2f} MiB -> (peak - base) / "
            f"(model + data) = {r['ratio']:.2f}x (target < 2x; "
            f"{r['ratio_before_model_code']:.2f}x counting the model's code as the job's); the "
            f"stage added {(mb['peak'] - mb['loaded']):.0f} MiB over the loaded model")
        section.check(None if r["ratio"] < 2 else f"{stage} {method}: {r['ratio']:.2f}x >= 2x")
    section.seconds = time.perf_counter() - start
    return section
