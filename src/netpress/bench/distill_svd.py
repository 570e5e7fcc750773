"""``svd_minilm`` (part of ``netpress bench distill``): MiniLM with every FFN Linear factorised by SVD.

Activation-aware (whitened, error-corrected) SVD of the 12 FFN Linears of MiniLM at 50 % of their
weights (statistics from the 100 calibration sentences), then a short hidden-state distillation from
the original (per-block MSE + pooled-embedding cosine, :mod:`netpress.lowrank.hidden_kd`) on the
2048 ``train`` sentences. The cosine to the original's mean-pooled embeddings is measured on the
573 ``evaluation`` sentences (disjoint from both) before and after, and after every epoch (reported
in the notes only, never used to choose anything). One process, one thread, batch 32.

``STATS = "train"`` takes the SVD statistics from the 2048 train + 100 calibration sentences in one
pass instead (``correct: false``): the 100 calibration sentences over-fit the 1536-dim moments (the
SVD alone scores cosine 0.970 on them, 0.896 on the evaluation sentences, 0.818 on train ones).

Example:
    >>> from netpress.bench.distill_svd import FFN_PATTERNS
    >>> FFN_PATTERNS[0]
    're:.*\\\\.intermediate\\\\.dense'
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from netpress.bench import row
from netpress.core.config import StageContext, get_technique
from netpress.measure import collect_outputs, compute_metric, count_params

SUITE = "distill"
FFN_PATTERNS = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]
RATIO = 0.5
DISTILL = {"epochs": 3, "lr": 3e-4, "warmup": 0.1}
STATS = "calibration"  # or "train" (see the module doc)


def _ffn_weights(model: nn.Module) -> int:
    """Weights of the FFN Linears (dense or factorised), biases excluded."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ("intermediate.dense" in name or
                                           (".output.dense" in name and "attention" not in name)):
            total += mod.weight.numel()
    return total


def _artifact_bytes(model: nn.Module, scratch: Path) -> int:
    from netpress.export.artifact import save_artifact

    save_artifact(model, scratch, source={"kind": "zoo", "name": "minilm"}, recipe={}, metrics=None)
    return sum(p.stat().st_size for p in scratch.glob("*.safetensors"))


def _row(method: str, metric: float, size: int, seconds: float | None, notes: str) -> dict[str, Any]:
    return row(suite=SUITE, case="svd_minilm", tool="netpress", method=method, metric_name="cosine",
               metric=round(metric, 4), size_bytes=int(size), latency_ms=None, speedup_vs_fp32=None,
               compress_seconds=None if seconds is None else round(seconds, 1), runtime="torch",
               threads=1, batch=32, notes=notes)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The two ``svd_minilm`` rows: SVD alone, SVD + hidden-state distillation (``quick``: one
    epoch on the first 16 train batches)."""
    from netpress import zoo

    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, bundle = zoo.load_model("minilm").eval(), zoo.load_data("sentences")
        ref = collect_outputs(model, bundle.evaluation)

        def cosine(m: nn.Module) -> float:
            return compute_metric("cosine", collect_outputs(m, bundle.evaluation),
                                  bundle.evaluation, ref)

        tech = get_technique("lowrank", "svd")
        train = bundle.train[:16] if quick else bundle.train
        big = STATS == "train"
        cfg = tech.config_cls.from_dict({"method": "svd", "ratio": RATIO, "targets": FFN_PATTERNS,
                                         "activation_aware": True, "correct": not big}, "lowrank")
        stats = train + bundle.calibration if big else bundle.calibration
        ctx = StageContext(data=stats, original=model)
        t0 = time.perf_counter()
        low = tech.handler(copy.deepcopy(model), cfg, ctx).eval()
        svd_secs = time.perf_counter() - t0
        before = cosine(low)
        ffn, ffn_low = _ffn_weights(model), _ffn_weights(low)

        from netpress.lowrank.hidden_kd import HiddenDistillConfig, hidden_distill

        dcfg = HiddenDistillConfig(**dict(DISTILL, epochs=1 if quick else DISTILL["epochs"]))
        res = hidden_distill(low, model, train, dcfg, list(ctx.report["ranks"]), eval_fn=cosine)
        secs = svd_secs + res.seconds
        after = cosine(low)
        with tempfile.TemporaryDirectory(prefix="netpress-bench-svd-") as d:
            size = _artifact_bytes(low, Path(d))
            size_fp32 = _artifact_bytes(model, Path(d) / "fp32")
    finally:
        torch.set_num_threads(before_threads)
    ranks = sorted(set(ctx.report["ranks"].values()))
    ffn_note = f"FFN weights {ffn} -> {ffn_low} ({ffn_low / ffn:.1%}), ranks {ranks}"
    sizes = f"artifact {size} B vs fp32 {size_fp32} B"
    per_epoch = ", ".join(f"{loss:.4f}/{ev:.4f}" for loss, ev in zip(res.losses, res.evals,
                                                                     strict=True))
    return [
        _row(f"activation-aware svd ratio {RATIO} (FFN), no distillation", before, size, svd_secs,
             f"{ffn_note}; {sizes}; model params {count_params(model)} -> {count_params(low)}"),
        _row(f"activation-aware svd ratio {RATIO} (FFN) + hidden-state distillation "
             f"({dcfg.epochs} ep, {len(train) * 32} train sentences)", after, size, secs,
             f"{ffn_note}; train loss/eval cosine per epoch {per_epoch}; lr {dcfg.lr} AdamW, "
             f"warmup {dcfg.warmup}, {res.trained_params} trained params (factors, LayerNorms, "
             f"biases); {sizes}"),
    ]


__all__ = ["run"]
