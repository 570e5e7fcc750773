"""Bench part of suite ``prune``: structured pruning (P4) of MobileNetV2 and MiniLM, with anchors.

Cases (all latencies in ONNX Runtime fp32, 2 threads, measured interleaved in this process):
  * ``mobilenet_v2_structured_*`` — 2x fewer MACs; batch-1 latency vs the unpruned model; top-1
    agreement with the original on the held-out photo crops (all, and the crops where the original
    is confident, p >= 0.5) right after pruning, after BatchNorm re-estimation on the training
    crops, and after KD (:func:`netpress.prune.structured.recover.kd_recover`: logits at T=1 plus
    every block's output on its kept channels, AdamW with a cosine schedule, fresh Mixup / CutMix
    random-resized views of the training photos and of 13 scikit-image pictures in neither photo
    split, time-bounded). Importance ``activation``: the output variance a channel feeds its
    consumers on calibration crops, with the removed channels' mean moved into the next BN.
    MobileNetV2 does not survive 2x uniform removal without retraining (agreement ~0), and KD on
    four training photos over-fits them: on fresh views of the training photos the KD'd model
    agrees with the original far more often than on the held-out photos (both are reported).
    Anchor: torch-pruning ``MagnitudePruner`` (group L2) at the same MAC reduction.
  * ``minilm_structured_*`` — heads + FFN neurons for 2x fewer MACs; batch-32 latency; mean
    cosine to the original sentence embeddings before and after a short recovery (MSE to the
    original token embeddings on the training sentences). Importance ``activation`` (output
    variance fed to the output projections, mean moved into their biases): cosine before recovery
    0.749 vs 0.494 with ``l1`` (measured here).

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

from netpress.bench import row
from netpress.core.data import Batch
from netpress.measure.macs import count_macs, macs_by_layer
from netpress.measure.metrics import collect_outputs, compute_metric, confident_agreement

THREADS = 2
KD_STEPS = 400  # KD steps of KD_BATCH fresh views (fewer when KD_SECONDS runs out)
KD_BATCH = 32
KD_RES = 112  # side of the KD views (cheaper steps; BN statistics re-estimated at full size)
KD_LR = 2e-3  # peak; linear warm-up then cosine decay
KD_SECONDS = 480.0  # time budget of the KD run (the steps that ran are reported)
#: bundled scikit-image pictures in neither photo split, added to the KD sources (on an H100,
#: 1000 KD steps: 0.005 agreement on the held-out crops with the 4 training photos alone, 0.05
#: with them)
EXTRA_IMAGES = ("brick", "camera", "cell", "clock", "coins", "colorwheel", "grass", "gravel",
                "horse", "logo", "moon", "page", "text")
MSE_EPOCHS = 1  # MiniLM recovery epochs over the training sentences


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


def kd_images() -> tuple[list[torch.Tensor], list[str]]:
    """Normalised ``(3, H, W)`` source images the KD views are drawn from: the photos of the
    ``photos`` training split, plus :data:`EXTRA_IMAGES` of scikit-image (in neither split).

    Never an evaluation photo: the extra names are checked against the evaluation split.
    """
    import skimage.data

    from netpress.zoo.data import IMAGENET_MEAN, IMAGENET_STD
    from netpress.zoo.sources import EVALUATION_PHOTOS, photo_sources

    named = list(photo_sources("calibration"))
    for name in EXTRA_IMAGES:
        assert f"skimage:{name}" not in EVALUATION_PHOTOS, name
        a = np.asarray(getattr(skimage.data, name)())
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]  # grey -> RGB
        named.append((f"skimage:{name}", a.astype(np.uint8)))
    mean = torch.from_numpy(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).view(3, 1, 1)
    out = [(torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255 - mean) / std
           for _, a in named]
    return out, [n for n, _ in named]


#: blocks whose output error ``_kd_classifier`` reports (ends of MobileNetV2's stages)
ERR_BLOCKS = (3, 6, 10, 13, 16, 18)


def _kd_classifier(student: nn.Module, teacher: nn.Module, held: torch.Tensor, quick: bool
                   ) -> tuple[dict[str, Any], float, str, str]:
    """KD recovery (:func:`netpress.prune.structured.recover.kd_recover`): logits (T=1) plus
    every block's output on its kept channels, on fresh Mixup / CutMix random-resized views of
    :func:`kd_images` (no BatchNorm re-estimation after it: at full size on the KD images it
    lowered the held-out agreement, 0.05 -> 0.02 on an H100). Returns the run's stats, the
    agreement on 256 fresh full-size views of the training photos (over-fitting check), and the
    relative error of the outputs of :data:`ERR_BLOCKS` before / after KD on ``held`` (held-out
    crops) and on 32 fresh views of the training photos."""
    from netpress.prune.structured.recover import (
        feature_errors,
        kd_recover,
        mobilenet_feature_map,
        random_views,
    )

    images, names = kd_images()
    feats = mobilenet_feature_map(teacher, student)
    train_photos = images[:len(images) - len(EXTRA_IMAGES)]
    gen = torch.Generator().manual_seed(1)
    views = random_views(train_photos, held.shape[0], 224, gen)
    picked = {f"features.{i}": feats[f"features.{i}"] for i in ERR_BLOCKS}

    def errors() -> str:
        e_held = feature_errors(student, teacher, picked, held)
        e_train = feature_errors(student, teacher, picked, views)
        return ", ".join(f"{k.split('.')[1]}: {e_held[k]:.2f} / {e_train[k]:.2f}" for k in picked)

    was = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        before = errors()
        stats = kd_recover(student, teacher, images, steps=20 if quick else KD_STEPS,
                           batch=KD_BATCH, res=KD_RES, lr=KD_LR, beta=1.0, features=feats,
                           mix=True, max_seconds=60 if quick else KD_SECONDS)
        after = errors()
        with torch.no_grad():
            probe = [random_views(train_photos, 32, 224, gen) for _ in range(2 if quick else 8)]
            agree = float(torch.cat([student(x).argmax(1) == teacher(x).argmax(1)
                                     for x in probe]).float().mean())
    finally:
        torch.set_num_threads(was)
    stats["images"] = names
    return stats, agree, before, after


def _mse_recover(student: nn.Module, teacher: nn.Module, batches: list[Batch],
                 epochs: int) -> float:
    """Short recovery of an encoder: masked MSE to the teacher's token outputs. Returns seconds."""
    from netpress.train import TrainConfig, fine_tune

    t0 = time.perf_counter()
    with torch.no_grad():
        ref = {id(b): b.run(teacher) for b in batches}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        out, tgt = batch.run(model), ref[id(batch)]
        mask = batch.mask
        w = mask.unsqueeze(-1).float() if mask is not None else torch.ones_like(out[..., :1])
        return ((out - tgt).pow(2) * w).sum() / (w.sum() * out.shape[-1])  # masked MSE

    fine_tune(student, batches, TrainConfig(epochs=epochs, lr=2e-4, optimizer="adam"),
              loss_fn=loss)
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


def _agreement(model: nn.Module, evaluation: list[Batch], ref: list[torch.Tensor]
               ) -> tuple[float, float, int]:
    """Top-1 agreement on all crops, on the crops where the original is confident (p ≥ 0.5)."""
    out = collect_outputs(model, evaluation)
    conf, n = confident_agreement(out, ref, 0.5)
    return compute_metric("top1_agreement", out, evaluation, ref), conf, n


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
    n_eval = sum(b.size for b in evaluation)
    t0 = time.perf_counter()
    cfg = {"method": "structured", "macs_reduction": 2.0, "importance": "activation",
           "round_to": 16}
    pruned = prune(original, cfg, data=data.calibration[:2])
    secs = time.perf_counter() - t0
    stages = {"pruned (no recovery)": _agreement(pruned, evaluation, ref)}
    n_held = evaluation[0].size
    recalibrate_bn(pruned, data.train)
    stages["+ BN re-estimation"] = _agreement(pruned, evaluation, ref)
    kd, train_agree, err_before, err_after = _kd_classifier(
        pruned, original, evaluation[0].inputs[0], quick)
    rec = kd["seconds"]
    stages[f"+ KD {kd['steps']} steps"] = _agreement(pruned, evaluation, ref)
    models["netpress"] = pruned
    macs_r = base_macs / count_macs(pruned, ex)
    t0 = time.perf_counter()
    anchor, anchor_r = _tp_anchor(original, ex.inputs[0], 2.0)
    anchor_secs = time.perf_counter() - t0
    anchor_agree = _agreement(anchor, evaluation, ref)
    models["torch_pruning"] = anchor
    with tempfile.TemporaryDirectory() as d:
        lat, size = _onnx_latency(models, ex, Path(d), 2 if quick else 3, 10 if quick else 40)
    common = {"suite": "prune", "runtime": "onnxruntime", "threads": THREADS, "batch": 1,
              "metric_name": "top1_agreement"}
    rows = [row(**common, case="mobilenet_v2_structured_unpruned", tool="onnxruntime",
                method="fp32 (unpruned)", metric=1.0, size_bytes=size["unpruned"],
                latency_ms=lat["unpruned"], speedup_vs_fp32=1.0, compress_seconds=0.0,
                notes=f"{base_macs / 1e6:.0f} MMACs")]
    for stage, (agree, conf, n_conf) in stages.items():
        rows.append(row(
            **common, case="mobilenet_v2_structured_2x", tool="netpress",
            method=f"structured macs_reduction 2.0, activation importance (mean-compensated), "
                   f"uniform, round_to 16, {stage}",
            metric=agree, size_bytes=size["netpress"], latency_ms=lat["netpress"],
            speedup_vs_fp32=lat["unpruned"] / lat["netpress"],
            compress_seconds=secs + (rec if stage.startswith("+ KD") else 0.0),
            agreement_confident=conf,
            notes=f"{macs_r:.2f}x fewer MACs; agreement {conf:.3f} on the {n_conf} crops the "
                  f"original is confident on (p >= 0.5), all {n_eval} held-out crops otherwise"
                  + (f"; KD: logits T=1 + every block's output on its kept channels, AdamW lr "
                     f"{KD_LR:g} cosine, {kd['steps']} steps x {KD_BATCH} fresh {KD_RES}px "
                     f"Mixup/CutMix random-resized views of {len(kd['images'])} images (the "
                     f"{len(kd['images']) - len(EXTRA_IMAGES)} training photos + "
                     f"{len(EXTRA_IMAGES)} scikit-image pictures in neither split), "
                     f"{THREADS} threads, {rec:.0f} s; agreement on fresh 224px views of the "
                     f"training photos {train_agree:.3f}" if stage.startswith("+ KD") else "")
                  + (f"; relative error of block outputs (block: {n_held} held-out crops / "
                     f"{n_held} views of the training photos) "
                     f"{err_after if stage.startswith('+ KD') else err_before}"
                     if stage != "pruned (no recovery)" else ""),
        ))
    agree, conf, n_conf = anchor_agree
    rows.append(row(
        **common, case="mobilenet_v2_structured_2x_anchor", tool="torch-pruning",
        method="MagnitudePruner group L2 (defaults), no recovery", metric=agree,
        size_bytes=size["torch_pruning"], latency_ms=lat["torch_pruning"],
        speedup_vs_fp32=lat["unpruned"] / lat["torch_pruning"], compress_seconds=anchor_secs,
        agreement_confident=conf,
        notes=f"{anchor_r:.2f}x fewer MACs; confident agreement {conf:.3f} ({n_conf} crops)",
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
    pruned = prune(original, {"method": "structured", "macs_reduction": 2.0,
                              "importance": "activation"}, data=data.calibration)
    secs = time.perf_counter() - t0
    before = compute_metric("cosine", collect_outputs(pruned, evaluation), evaluation, ref)
    epochs = 1 if quick else MSE_EPOCHS
    rec = _mse_recover(pruned, original, data.train, epochs)
    after = compute_metric("cosine", collect_outputs(pruned, evaluation), evaluation, ref)
    macs_r = count_macs(original, ex1) / count_macs(pruned, ex1)
    lin_r = _linear_macs(original, ex1) / _linear_macs(pruned, ex1)
    ex32 = evaluation[0]
    with tempfile.TemporaryDirectory() as d:
        lat, size = _onnx_latency({"unpruned": original, "netpress": pruned}, ex32, Path(d),
                                  2 if quick else 3, 5 if quick else 15)
    common = {"suite": "prune", "runtime": "onnxruntime", "threads": THREADS,
              "batch": ex32.size, "metric_name": "cosine"}
    rows = [row(**common, case="minilm_structured_unpruned", tool="onnxruntime",
                method="fp32 (unpruned)", metric=1.0, size_bytes=size["unpruned"],
                latency_ms=lat["unpruned"], speedup_vs_fp32=1.0, compress_seconds=0.0,
                notes=f"batch of {ex32.size} sentences, T={ex32.inputs['input_ids'].shape[1]}")]
    for stage, metric in (("before recovery", before), ("after recovery", after)):
        rows.append(row(
            **common, case="minilm_structured_2x", tool="netpress",
            method=f"structured heads + FFN, macs_reduction 2.0, activation importance, {stage}",
            metric=metric,
            size_bytes=size["netpress"], latency_ms=lat["netpress"],
            speedup_vs_fp32=lat["unpruned"] / lat["netpress"],
            compress_seconds=secs + (rec if stage == "after recovery" else 0.0),
            notes=f"{lin_r:.2f}x fewer Linear MACs, {macs_r:.2f}x fewer MACs; recovery: masked "
                  f"MSE to the original token outputs, Adam lr 2e-4, {epochs} epoch(s) over "
                  f"{len(data.train)} training batches, {rec:.0f} s",
        ))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of the structured cases of suite ``prune``."""
    torch.manual_seed(0)
    return _mobilenet(quick) + _minilm(quick)


__all__ = ["run"]
