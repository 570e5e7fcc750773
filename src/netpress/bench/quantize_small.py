"""Suite ``quantize``, small real CNNs: QAT W4A8, binary, ternary and mixed precision.

Cases (``digits_*``: the zoo digits CNN on sklearn digits; ``mnist1d_*``: the zoo MNIST-1D CNN):
fp32, ONNX Runtime ``quantize_static`` (QDQ, per-channel, MinMax, no training: the anchor in the same
process), netpress ``qat`` W4A8 (max-scaled STE, and LSQ), ``binary`` BWN and XNOR (first/last layer
8-bit; BWN also with 4-bit first/last, and 8-bit first with a 4- or 2-bit last layer), ``ternary``
TWN, ``mixed`` {2, 4, 8} bits at 1/10 of the fp32
weight bytes. Fine-tuning uses the bundle's ``train`` split; calibration/sensitivity the
``calibration`` split; accuracy is measured on the held-out ``evaluation`` split *in ONNX Runtime*
on the exported file (QDQ int8 for QAT; DequantizeLinear on int8 codes for the low-bit weights).

``size_bytes`` is the artifact's tensor file (``model.safetensors``: packed codes, scales, biases,
BN); the notes give the weight bytes (packed codes + per-channel scales of every Linear/Conv,
8-bit first/last layers included) against the fp32 weights of the same layers, the biases and BN
bytes left out of that count, the gap to fp32 in points and held-out examples, and for binary with
8-bit first/last layers the best ratio the architecture allows. With
``NETPRESS_BENCH_SEEDS=3`` the fine-tuned methods run with 3 seeds (batch order) and the notes give
the mean torch accuracy on the evaluation split.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch

from netpress.bench.common import Bench, artifact_bytes, open_bench, plain_safetensors_bytes, timed
from netpress.core.config import StageContext, get_technique, parse_config

THREADS = 1  # these models take ~0.1 ms: one thread, stable on a shared machine


def _accuracy(model: torch.nn.Module, b: Bench) -> float:
    with torch.no_grad():
        hits = sum(int((x.run(model).argmax(-1) == x.target).sum()) for x in b.work.evaluation)
    return hits / sum(x.size for x in b.work.evaluation)


def _compress(b: Bench, config: dict[str, Any], seed: int) -> tuple[torch.nn.Module, dict, float]:
    cfg = parse_config("quantize", config)
    if hasattr(cfg, "finetune"):
        cfg.finetune = cfg.finetune.model_copy(update={"seed": seed})
    tech = get_technique("quantize", cfg.method)
    ctx = StageContext(data=b.work.calibration, original=b.work.model, seed=seed,
                       advanced={"train": b.work.train, "task": b.work.task})
    torch.manual_seed(seed)
    model, secs = timed(lambda: tech.handler(copy.deepcopy(b.work.model), cfg, ctx).eval())
    return model, ctx.report, secs


def _netpress(b: Bench, case: str, method: str, config: dict[str, Any], seeds: int,
              note: str = "") -> dict[str, Any]:
    model, report, secs = _compress(b, config, 0)
    rep = next(iter(report.values()))
    accs = [_accuracy(model, b)]
    for seed in range(1, seeds):
        accs.append(_accuracy(_compress(b, config, seed)[0], b))
    d = b.deployed(model, case)
    notes = [note, f"weight bytes {rep['weight_bytes']:,} vs fp32 {rep['fp32_weight_bytes']:,} "
             f"({rep['weight_ratio']:.1f}x smaller)"]
    if "other_tensor_bytes" in rep:
        total = rep["weight_bytes"] + rep["other_tensor_bytes"]
        notes.append(f"weight bytes = packed codes + fp16 per-channel scales of every Conv/Linear; "
                     f"biases + BN (float32) {rep['other_tensor_bytes']:,} B more "
                     f"({rep['fp32_weight_bytes'] / total:.1f}x counting them)")
    if seeds > 1:
        notes.append(f"torch accuracy over {seeds} seeds: mean {np.mean(accs):.4f} "
                     f"(min {min(accs):.4f}, max {max(accs):.4f})")
    if "bits_per_layer" in rep and method.startswith("mixed"):
        notes.append("bits per layer " + ", ".join(f"{k}:{v}" for k, v in
                                                   rep["bits_per_layer"].items()))
    if rep.get("kept_float"):
        notes.append(f"kept float: {[k['name'] for k in rep['kept_float']]}")
    return b.measure(case, "netpress", method, d, artifact_bytes(model, b, case), secs,
                     "; ".join(filter(None, notes)))


def _ort_static_anchor(b: Bench, case: str, fp32_onnx: str) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.items = iter([{name: x.inputs[0][i:i + 1].numpy()} for x in b.work.calibration
                               for i in range(x.size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    reader = Reader(onnx.load(fp32_onnx).graph.input[0].name)
    dst = b.scratch / f"{case}-ort-static.onnx"
    _, secs = timed(lambda: quantize_static(fp32_onnx, str(dst), reader,
                                            quant_format=QuantFormat.QDQ, per_channel=True))
    return b.measure(case, "onnxruntime", "quantize_static W8A8 QDQ per-channel MinMax (no training)",
                     b.onnx_file(dst), dst.stat().st_size, secs,
                     "size is the .onnx file; PTQ contrast, calibration split")


def _cases(b: Bench, prefix: str, epochs: int, seeds: int) -> list[dict[str, Any]]:
    ft = {"epochs": epochs, "lr": 1e-3}
    ft_bin = {"epochs": epochs + 2, "lr": 1e-3}
    rows = []
    fp32 = b.deployed(b.work.model, f"{prefix}-fp32")
    weights = sum(m.weight.numel() * 4 for m in b.work.model.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)))
    rows.append(b.measure(f"{prefix}_fp32", "onnxruntime", "fp32", fp32,
                          plain_safetensors_bytes(b.work.model, b, prefix), None,
                          f"fp32 Linear/Conv weight bytes {weights:,}"))
    rows.append(_ort_static_anchor(b, f"{prefix}_ptq_int8", str(fp32.onnx_path)))
    rows.append(_netpress(b, f"{prefix}_qat_w4a8", "qat W4A8 per-channel (STE)",
                          {"method": "qat", "weights": {"bits": 4}, "activations": {"bits": 8},
                           "finetune": ft}, seeds, "ORT QDQ: int8 codes, uint8 activations"))
    rows.append(_netpress(b, f"{prefix}_qat_w4a8_lsq", "qat W4A8 per-channel (LSQ)",
                          {"method": "qat", "learn_scale": True, "finetune": ft}, seeds,
                          "ORT QDQ: int8 codes, uint8 activations"))
    rows.append(_netpress(b, f"{prefix}_binary_bwn", "binary BWN, first/last 8-bit",
                          {"method": "binary", "variant": "bwn", "finetune": ft_bin}, seeds,
                          "codes unpacked at load, float activations"))
    rows.append(_netpress(b, f"{prefix}_binary_bwn_fl4", "binary BWN, first/last 4-bit",
                          {"method": "binary", "variant": "bwn", "first_last_bits": 4,
                           "finetune": ft_bin}, 1, "codes unpacked at load, float activations"))
    for last in (4, 2):
        rows.append(_netpress(b, f"{prefix}_binary_bwn_l{last}", f"binary BWN, first 8-bit, "
                              f"last {last}-bit", {"method": "binary", "variant": "bwn",
                                                   "last_bits": last, "finetune": ft_bin}, 1,
                              "codes unpacked at load, float activations"))
    rows.append(_netpress(b, f"{prefix}_binary_xnor", "binary XNOR (binary activations)",
                          {"method": "binary", "variant": "xnor", "finetune": ft_bin}, 1,
                          "inputs of binary layers: {0,1}·s (learned s) after ReLU"))
    rows.append(_netpress(b, f"{prefix}_ternary", "ternary TWN, first/last 8-bit",
                          {"method": "ternary", "finetune": ft_bin}, seeds,
                          "codes unpacked at load, float activations"))
    rows.append(_netpress(b, f"{prefix}_mixed", "mixed {2,4,8} bits, size_ratio 10",
                          {"method": "mixed", "bits": [2, 4, 8], "size_ratio": 10,
                           "finetune": ft}, 1, "sensitivity on the calibration split"))
    n = sum(x.size for x in b.work.evaluation)
    for r in rows[1:]:  # the gap a target is about, and how fine the evaluation split resolves it
        gap = (rows[0]["metric"] - r["metric"]) * 100
        r["notes"] = (f"fp32 minus this: {gap:+.2f} pts ({round(gap * n / 100):+d} of {n} held-out "
                      f"examples; 1 example = {100 / n:.2f} pts); " + r["notes"])
    bound = _binary_bound(b.work.model)
    for r in rows:
        if r["case"].endswith("_binary_bwn"):
            r["notes"] += "; " + bound
    return rows


def _binary_bound(model: torch.nn.Module) -> str:
    """The best weight-byte ratio binary with 8-bit first/last layers can reach on ``model``."""
    layers = [m for m in model.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    fp32 = sum(m.weight.numel() * 4 for m in layers)
    edge = layers[0].weight.numel() + layers[-1].weight.numel()  # 1 byte each at 8 bits
    middle = sum(m.weight.numel() for m in layers[1:-1]) / 8
    return (f"bound with first/last 8-bit: their codes {edge:,} B + binary codes {middle:,.0f} B "
            f"-> at most {fp32 / (edge + middle):.1f}x even with free scales (the last layer "
            f"holds {layers[-1].weight.numel() * 4 / fp32:.0%} of the fp32 weights)")


def run(quick: bool = False) -> list[dict[str, Any]]:
    seeds = 1 if quick else int(os.environ.get("NETPRESS_BENCH_SEEDS", "1"))
    rows: list[dict[str, Any]] = []
    for model, data, prefix, epochs in (("digits_cnn", "digits", "digits", 3),
                                        ("mnist1d_cnn", "mnist1d", "mnist1d", 3)):
        b, tmp = open_bench("quantize", f"zoo:{model}", f"zoo:{data}", threads=THREADS)
        with tmp:
            rows += _cases(b, prefix, 1 if quick else epochs, seeds)
    return rows


__all__ = ["run"]
