"""Bench part of suite ``prune``: structured pruning (P4) of MobileNetV2 and MiniLM, with anchors.

Cases (all latencies in ONNX Runtime fp32, 2 threads, measured interleaved in this process):
  * ``mobilenet_v2_structured_*`` — 2x fewer MACs; batch-1 latency vs the unpruned model; top-1
    agreement with the original on the held-out photo crops before and after a short recovery:
    BatchNorm statistics re-estimated on the calibration crops, then ``netpress.train.fine_tune``
    on them with a KL loss (T=2) to the original's logits at lr 1e-3. The 0.0 agreement is not
    an arithmetic bug of this bench: MobileNetV2 pruned this way predicts nearly one class for
    every crop (already at ratio 0.1), and neither the earlier recovery (lr 1e-4, 24 steps) nor
    this one (measured at ratio 0.3: BN re-estimation 0.0, + 1 epoch KD 0.0 on 64 held-out crops)
    brings it back. Group-L2 importance carries almost no signal on the pretrained model:
    removing the 128 lowest / highest / random channels of the ``features.18.0`` group changes
    the logits by 0.20 / 0.27 / 0.18 (relative L2). An activation-aware importance and a longer
    distillation are the open work. Anchor: torch-pruning ``MagnitudePruner`` (group L2) at the
    same MAC reduction.
  * ``minilm_structured_*`` — heads + FFN neurons for 2x fewer MACs; batch-32 latency; mean
    cosine to the original sentence embeddings before and after a short recovery (MSE to the
    original token embeddings on the calibration sentences).

Example:
    >>> from netpress.bench import SUITES
    >>> "netpress.bench.prune_structured:run" in SUITES["prune"]
    True
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.bench import row
from netpress.core.data import Batch
from netpress.measure.macs import count_macs, macs_by_layer
from netpress.measure.metrics import collect_outputs, compute_metric

THREADS = 2


def _onnx_latency(models: dict[str, nn.Module], example: Batch, d: Path, rounds: int,
                  runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median over interleaved rounds of each model's ORT median latency; ONNX bytes."""
    from netpress.export.onnx import export_onnx
    from netpress.measure.latency import latency_onnx

    paths = {k: export_onnx(m, example, d / f"{k}.onnx") for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, p in paths.items():
            times[k].append(latency_onnx(p, example, threads=THREADS, warmup=5, runs=runs,
                                         max_seconds=60).median_ms)
    return ({k: float(np.median(v)) for k, v in times.items()},
            {k: p.stat().st_size for k, p in paths.items()})


def recalibrate_bn(model: nn.Module, batches: list[Batch]) -> None:
    """Re-estimate every BatchNorm's running mean / variance on ``batches`` (no gradient).

    Channel removal changes the statistics the next layers see; the stored ones are stale.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for b in batches:
            b.run(model)
    model.eval()
    for m, mom in zip(norms, saved, strict=True):
        m.momentum = mom


def _kd_recover(student: nn.Module, teacher: nn.Module, batches: list[Batch], epochs: int,
                kind: str) -> float:
    """Short recovery with the shared loop; loss to the teacher's outputs. Returns seconds.

    ``kl`` (classifiers): BN statistics re-estimated first, then KD at lr 1e-3.
    """
    from netpress.train import TrainConfig, fine_tune

    t0 = time.perf_counter()
    if kind == "kl":
        recalibrate_bn(student, batches)
    with torch.no_grad():
        ref = {id(b): b.run(teacher) for b in batches}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        out, tgt = batch.run(model), ref[id(batch)]
        if kind == "kl":  # logits (B, C): T²·KL(p_t(T) ‖ p_s(T)), T = 2
            t = 2.0
            return F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(tgt / t, 1),
                            log_target=True, reduction="batchmean") * t * t
        mask = batch.mask
        w = mask.unsqueeze(-1).float() if mask is not None else torch.ones_like(out[..., :1])
        return ((out - tgt).pow(2) * w).sum() / (w.sum() * out.shape[-1])  # masked MSE

    fine_tune(student, batches, TrainConfig(epochs=epochs, lr=1e-3 if kind == "kl" else 2e-4,
                                            optimizer="adam"), loss_fn=loss)
    return time.perf_counter() - t0


def _tp_anchor(model: nn.Module, x: torch.Tensor, reduction: float) -> tuple[nn.Module, float]:
    """torch-pruning MagnitudePruner (group L2, defaults) at ``reduction`` fewer MACs."""
    import warnings

    import torch_pruning as tp

    base = count_macs(model, Batch((x,)))
    lo, hi, best = 0.0, 0.8, None
    for _ in range(6):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=mid,
                ignored_layers=[m.classifier[1]])
            pruner.step()
        r = base / count_macs(m, Batch((x,)))
        if r >= reduction:
            hi, best = mid, (m, r)
        else:
            lo = mid
    assert best is not None
    return best


def _mobilenet(quick: bool) -> list[dict[str, Any]]:
    from netpress.api import prune
    from netpress.zoo import load_data, load_model

    original = load_model("mobilenet_v2")
    data = load_data("photos")
    evaluation = data.evaluation[:4] if quick else data.evaluation
    ex = data.calibration[0].slice(1)
    base_macs = count_macs(original, ex)
    ref = collect_outputs(original, evaluation)
    models: dict[str, nn.Module] = {"unpruned": original}
    epochs, n_eval = 1 if quick else 3, sum(b.size for b in evaluation)
    info: dict[str, dict[str, Any]] = {}
    for rnd in (8, 16):
        t0 = time.perf_counter()
        cfg = {"method": "structured", "macs_reduction": 2.0, "importance": "l2", "round_to": rnd}
        pruned = prune(original, cfg, data=data.calibration[:2])
        secs = time.perf_counter() - t0
        before = compute_metric("top1_agreement", collect_outputs(pruned, evaluation), evaluation,
                                ref)
        rec = _kd_recover(pruned, original, data.train, epochs, "kl")
        after = compute_metric("top1_agreement", collect_outputs(pruned, evaluation), evaluation,
                               ref)
        key = f"netpress_r{rnd}"
        models[key] = pruned
        info[key] = {"secs": secs + rec, "before": before, "after": after,
                     "macs": base_macs / count_macs(pruned, ex), "rnd": rnd, "rec": rec}
    t0 = time.perf_counter()
    anchor, anchor_r = _tp_anchor(original, ex.inputs[0], 2.0)
    anchor_secs = time.perf_counter() - t0
    anchor_agree = compute_metric("top1_agreement", collect_outputs(anchor, evaluation),
                                  evaluation, ref)
    models["torch_pruning"] = anchor
    with tempfile.TemporaryDirectory() as d:
        lat, size = _onnx_latency(models, ex, Path(d), 2 if quick else 5, 10 if quick else 40)
    common = {"suite": "prune", "runtime": "onnxruntime", "threads": THREADS, "batch": 1,
              "metric_name": "top1_agreement"}
    rows = [row(**common, case="mobilenet_v2_structured_unpruned", tool="onnxruntime",
                method="fp32 (unpruned)", metric=1.0, size_bytes=size["unpruned"],
                latency_ms=lat["unpruned"], speedup_vs_fp32=1.0, compress_seconds=0.0,
                notes=f"{base_macs / 1e6:.0f} MMACs")]
    for key, v in info.items():
        for stage, metric in (("before recovery", v["before"]), ("after recovery", v["after"])):
            rows.append(row(
                **common, case=f"mobilenet_v2_structured_2x_r{v['rnd']}", tool="netpress",
                method=f"structured macs_reduction 2.0, l2, round_to {v['rnd']}, {stage}",
                metric=metric, size_bytes=size[key], latency_ms=lat[key],
                speedup_vs_fp32=lat["unpruned"] / lat[key], compress_seconds=v["secs"],
                notes=f"{v['macs']:.2f}x fewer MACs; recovery: BN re-estimation + {epochs} epochs "
                      f"KD (T=2, lr 1e-3) on {len(data.train)} calibration batches, "
                      f"{v['rec']:.0f} s; agreement on {n_eval} held-out crops",
            ))
    rows.append(row(
        **common, case="mobilenet_v2_structured_2x_anchor", tool="torch-pruning",
        method="MagnitudePruner group L2 (defaults), no recovery", metric=anchor_agree,
        size_bytes=size["torch_pruning"], latency_ms=lat["torch_pruning"],
        speedup_vs_fp32=lat["unpruned"] / lat["torch_pruning"], compress_seconds=anchor_secs,
        notes=f"{anchor_r:.2f}x fewer MACs",
    ))
    return rows


def _linear_macs(model: nn.Module, ex: Batch) -> int:
    per = macs_by_layer(model, ex)
    return sum(v for k, v in per.items()
               if isinstance(dict(model.named_modules()).get(k), nn.Linear))


def _minilm(quick: bool) -> list[dict[str, Any]]:
    from netpress.api import prune
    from netpress.zoo import load_data, load_model

    original = load_model("minilm")
    data = load_data("sentences")
    evaluation = data.evaluation[:2] if quick else data.evaluation
    ref = collect_outputs(original, evaluation)
    ex1 = data.calibration[0].slice(1)
    t0 = time.perf_counter()
    pruned = prune(original, {"method": "structured", "macs_reduction": 2.0, "importance": "l1"},
                   data=data.calibration)
    secs = time.perf_counter() - t0
    before = compute_metric("cosine", collect_outputs(pruned, evaluation), evaluation, ref)
    rec = _kd_recover(pruned, original, data.train, 2 if quick else 8, "mse")
    after = compute_metric("cosine", collect_outputs(pruned, evaluation), evaluation, ref)
    macs_r = count_macs(original, ex1) / count_macs(pruned, ex1)
    lin_r = _linear_macs(original, ex1) / _linear_macs(pruned, ex1)
    ex32 = evaluation[0]
    with tempfile.TemporaryDirectory() as d:
        lat, size = _onnx_latency({"unpruned": original, "netpress": pruned}, ex32, Path(d),
                                  2 if quick else 5, 5 if quick else 20)
    common = {"suite": "prune", "runtime": "onnxruntime", "threads": THREADS,
              "batch": ex32.size, "metric_name": "cosine"}
    rows = [row(**common, case="minilm_structured_unpruned", tool="onnxruntime",
                method="fp32 (unpruned)", metric=1.0, size_bytes=size["unpruned"],
                latency_ms=lat["unpruned"], speedup_vs_fp32=1.0, compress_seconds=0.0,
                notes=f"batch of {ex32.size} sentences, T={ex32.inputs['input_ids'].shape[1]}")]
    for stage, metric in (("before recovery", before), ("after recovery", after)):
        rows.append(row(
            **common, case="minilm_structured_2x", tool="netpress",
            method=f"structured heads + FFN, macs_reduction 2.0, l1, {stage}", metric=metric,
            size_bytes=size["netpress"], latency_ms=lat["netpress"],
            speedup_vs_fp32=lat["unpruned"] / lat["netpress"], compress_seconds=secs + rec,
            notes=f"{lin_r:.2f}x fewer Linear MACs, {macs_r:.2f}x fewer MACs; recovery: masked "
                  f"MSE to the original on {len(data.train)} calibration batches, {rec:.0f} s",
        ))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of the structured cases of suite ``prune``."""
    torch.manual_seed(0)
    return _mobilenet(quick) + _minilm(quick)


__all__ = ["run"]
