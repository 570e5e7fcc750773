"""Bench part of suite ``quantize``: MobileNetV2 static W8A8 PTQ on real photo crops.

Rows (case ``mobilenet_v2_w8a8*``), all in one process, latencies interleaved:

* ``onnxruntime`` fp32 — the reference every ``speedup_vs_fp32`` is relative to;
* ``openvino`` fp32 at OpenVINO's default precision (bf16 on an AMX CPU) and strict f32; the
  int8 models (netpress and NNCF) run on OpenVINO with the same ``INFERENCE_PRECISION_HINT=f32``
  for their float ops, and every OpenVINO row notes the precision OpenVINO reports back (on a
  CPU without AMX / AVX512-BF16 the default already is f32);
* ``netpress`` PTQ (BN folding, per-channel int8 weights, calibrated uint8 activations, quantized
  residual Adds): the QDQ ONNX file on ONNX Runtime and on OpenVINO; the accuracy options of
  ``VARIANTS`` (AdaRound, BRECQ + QDrop, ...) on OpenVINO, each with its own PTQ seconds;
* anchor ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, MinMax) on ORT;
* anchor ``nncf.quantize`` (defaults) on the OpenVINO model read from the fp32 ONNX.

Quality: top-1 agreement with the fp32 torch model on the held-out ``photos`` evaluation crops
(calibration uses only the calibration split); the agreement on crops where fp32's max
probability is >= 0.5 is in ``notes``. Latency: batch 1, 2 threads; each candidate is timed in
``ROUNDS`` interleaved rounds and the lowest round median is kept (the machine is shared).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netpress.bench import row

SUITE, THREADS, ROUNDS = "quantize", 2, 3

#: netpress PTQ variants: case tag -> (extra ``ptq`` config, label). ``""`` is the default recipe
#: (also run on ONNX Runtime); the others run on OpenVINO only.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "": ({}, ""),
    "_adaround": ({"rounding": "adaround"}, " + AdaRound (rounding: adaround)"),
    "_mse": ({"activations": {"observer": "mse"}}, ", activation observer mse"),
    "_mse_search": ({"activations": {"observer": "mse", "search": True}},
                    ", activation observer mse + output-aware range search"),
    "_mse_search_adaround": ({"activations": {"observer": "mse", "search": True},
                              "rounding": "adaround"},
                             ", activation observer mse + range search + AdaRound"),
    "_wsearch": ({"weights": {"observer": "output_mse"}},
                 ", weight scales by layer-output error (weights: {observer: output_mse})"),
    "_brecq": ({"rounding": "brecq"},
               " + BRECQ block reconstruction with QDrop 0.5 and learned activation steps "
               "(rounding: brecq)"),
}
#: Measured in stop-12 side runs and left out of the suite (see the BENCHMARKS.md text): BRECQ on
#: all 256 calibration crops as one aligned 96x96 window each (``brecq: {examples: 256, crop:
#: 96}``): 2.5x cheaper, 1.5 points below ``_brecq``; the first conv left in float lowers BRECQ.


def _agreement(out: np.ndarray, ref: torch.Tensor) -> tuple[float, float, int]:
    pred = torch.as_tensor(np.asarray(out, dtype=np.float32)).argmax(1)
    same = (pred == ref.argmax(1)).float()
    conf = ref.softmax(1).amax(1) >= 0.5
    return float(same.mean()), float(same[conf].mean()) if conf.any() else float("nan"), int(
        conf.sum())


def _ov_size(model: Any, tmp: Path) -> int:
    import openvino as ov

    xml = tmp / "nncf.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of the MobileNetV2 W8A8 comparison (see the module doc)."""
    import nncf
    import onnxruntime.quantization as oq
    import openvino as ov

    from netpress.export.onnx import OnnxRunner, export_onnx
    from netpress.export.openvino import OpenVinoRunner
    from netpress.measure.latency import time_runs
    from netpress.quantize.qdq_onnx import export_qdq_onnx
    from netpress.zoo import load_data, load_model

    torch.set_num_threads(THREADS)
    model, data = load_model("mobilenet_v2"), load_data("photos")
    evaluation = data.evaluation[:4] if quick else data.evaluation
    calibration = data.calibration
    example = evaluation[0].slice(1)
    with torch.inference_mode():
        ref = torch.cat([model(b.inputs[0]) for b in evaluation]).float()
    tmp = Path(tempfile.mkdtemp(prefix="netpress-bench-ptq-"))
    cands: dict[str, dict[str, Any]] = {}

    fp32 = export_onnx(model, example, tmp / "fp32.onnx")

    # ---- netpress PTQ: the default recipe and the accuracy options (VARIANTS)
    from netpress.core.config import StageContext, get_technique, parse_config

    np_runs: dict[str, tuple[Path, float, dict[str, Any], str]] = {}
    cpu: dict[str, float] = {}
    load: dict[str, float] = {}
    for tag, (extra, label) in VARIANTS.items():
        ctx_report: dict[str, Any] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        cfg = parse_config("quantize", {"method": "ptq", "weights": {"bits": 8,
                                        "granularity": "per_channel"},
                                        "activations": {"bits": 8, "observer": "percentile"},
                                        "rounding": "nearest", **extra})
        ctx = StageContext(data=calibration, report=ctx_report)
        qmodel = get_technique("quantize", "ptq").handler(copy.deepcopy(model), cfg, ctx)
        cpu[tag], load[tag] = time.process_time() - c0, os.getloadavg()[0]
        qpath = export_qdq_onnx(qmodel, example, tmp / f"netpress_w8a8{tag}.onnx")
        np_runs[tag] = (qpath, time.perf_counter() - t0, ctx_report.get("ptq", {}), label)

    # ---- ORT quantize_static anchor
    class _Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": b.inputs[0][i:i + 1].numpy()} for b in calibration
                               for i in range(b.size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    t0 = time.perf_counter()
    ort_q = tmp / "ort_static.onnx"
    oq.quantize_static(str(fp32), str(ort_q), _Reader(), quant_format=oq.QuantFormat.QDQ,
                       per_channel=True, calibrate_method=oq.CalibrationMethod.MinMax)
    ort_seconds = time.perf_counter() - t0

    # ---- NNCF -> OpenVINO anchor
    t0 = time.perf_counter()
    ov_model = ov.Core().read_model(str(fp32))
    calib_items = [b.inputs[0][i:i + 1].numpy() for b in calibration for i in range(b.size)]
    nncf_model = nncf.quantize(ov_model, nncf.Dataset(calib_items))
    nncf_seconds = time.perf_counter() - t0

    runners = {
        "ort_fp32": (OnnxRunner(fp32, THREADS), "onnxruntime", "fp32", "fp32", fp32, None),
        "ov_default": (OpenVinoRunner(fp32, THREADS), "openvino", "fp32",
                       "fp32 model, OpenVINO default precision (bf16 where the CPU has it)", fp32, None),
        "ov_f32": (OpenVinoRunner(fp32, THREADS, precision="f32"), "openvino", "fp32",
                   "fp32 model, strict f32", fp32, None),
        **{f"np{tag}_ort": (OnnxRunner(p, THREADS), "netpress", "ptq",
                            f"W8A8 QDQ{label} on ONNX Runtime", p, sec)
           for tag, (p, sec, _rep, label) in np_runs.items() if tag == ""},
        **{f"np{tag}_ov": (OpenVinoRunner(p, THREADS, precision="f32"), "netpress", "ptq",
                           f"W8A8 QDQ{label} on OpenVINO, f32 hint for its float ops", p, sec)
           for tag, (p, sec, _rep, label) in np_runs.items()},
        "ort_static": (OnnxRunner(ort_q, THREADS), "onnxruntime", "quantize_static",
                       "QDQ per-channel MinMax on ONNX Runtime", ort_q, ort_seconds),
        "nncf_ov": (OpenVinoRunner(nncf_model, THREADS, precision="f32"), "nncf", "nncf.quantize",
                    "defaults, OpenVINO int8, f32 hint for its float ops (as netpress)", None,
                    nncf_seconds),
    }
    runtimes = {"ort_fp32": "onnxruntime", "np_ort": "onnxruntime", "ort_static": "onnxruntime"}
    tags = {f"np{tag}_{rt}": tag for tag in np_runs for rt in ("ort", "ov")}
    for key, (runner, *_rest) in runners.items():
        out = np.concatenate([runner.run(b) for b in evaluation])
        cands[key] = {"quality": _agreement(out, ref), "lat": []}
    for _ in range(ROUNDS):
        for key, (runner, *_rest) in runners.items():
            feeds = runner.feeds(example)
            if isinstance(runner, OpenVinoRunner):
                fn = partial(runner.request.infer, list(feeds.values()))
            else:
                fn = partial(runner.session.run, None, feeds)
            times = time_runs(fn, 10, 30 if quick else 100, 20.0)
            cands[key]["lat"].append(float(np.median(times)) * 1000.0)
    base = min(cands["ort_fp32"]["lat"])
    rows = []
    for key, (_runner, tool, method, desc, path, seconds) in runners.items():
        all_, conf, n_conf = cands[key]["quality"]
        lat = min(cands[key]["lat"])
        size = Path(path).stat().st_size if path is not None else _ov_size(nncf_model, tmp)
        if isinstance(_runner, OpenVinoRunner):  # what OpenVINO actually chose (no bf16 w/o AMX)
            desc += ("; OpenVINO INFERENCE_PRECISION_HINT read back: "
                     f"{_runner.compiled.get_property('INFERENCE_PRECISION_HINT')}")
        notes = (f"{desc}; top-1 agreement on confident crops (fp32 max-prob >= 0.5, n={n_conf}): "
                 f"{conf:.4f}; {len(ref)} held-out crops; latency: min of {ROUNDS} interleaved "
                 "round medians")
        if key in tags:
            rep = np_runs[tags[key]][2]
            notes += (f"; calibration {rep.get('calibration_examples')} crops, observer "
                      f"{rep.get('observer')}, {len(rep.get('quantized', []))} layers int8, "
                      f"kept float: {sorted(rep.get('kept_float', {})) or 'none'}; PTQ stage "
                      f"{rep.get('seconds')} s wall, {cpu[tags[key]]:.1f} s CPU (all threads; "
                      f"1-min load average {load[tags[key]]:.1f} right after it)")
            if rep.get("adaround"):
                notes += f" of which AdaRound {rep['adaround']['seconds']} s"
            if rep.get("brecq"):
                b = rep["brecq"]
                notes += f" of which BRECQ {b['seconds']} s ({len(b['units'])} units)"
        rows.append(row(
            suite=SUITE, case="mobilenet_v2_w8a8" + ("" if key == "ort_fp32" else f"_{key}"),
            tool=tool, method=method, metric_name="top1_agreement", metric=round(all_, 4),
            size_bytes=int(size), latency_ms=round(lat, 3), speedup_vs_fp32=round(base / lat, 3),
            compress_seconds=None if seconds is None else round(seconds, 2),
            runtime=runtimes.get(key, "openvino"), threads=THREADS, batch=1, notes=notes,
            top1_agreement_confident=round(conf, 4)))
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


__all__ = ["run"]
