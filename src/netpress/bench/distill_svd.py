"""``svd_minilm`` (part of ``netpress bench distill``): MiniLM with every FFN Linear factorised by SVD.

Activation-aware, error-corrected SVD (SVD-LLM style whitening; each layer least-squares fitted to
the original's output on the inputs the already-compressed blocks feed it, block by block) of the
12 FFN Linears of MiniLM at 50 % of their weights, statistics from the 2048 ``train`` sentences
(``STATS``; the 100 calibration sentences over-fit the 1536-dim moments: that SVD scores cosine
0.970 on them and 0.896 on the evaluation sentences), then a hidden-state distillation from the
original (per-block MSE + pooled-embedding cosine, every non-embedding parameter trained, AdamW
lr 1e-4, :mod:`netpress.lowrank.hidden_kd`; batches regrouped by sentence length, 97 % real
tokens instead of 40 %) on the same train sentences: ``EPOCHS_GPU`` epochs on a CUDA device when
one is visible, else ``EPOCHS_CPU`` on the CPU (``THREADS`` threads). The cosine to the
original's mean-pooled embeddings is measured on the 573 ``evaluation`` sentences (disjoint from
both; help() prose like the calibration ones, while train sentences are stdlib docstrings) before
and after, and after every epoch (in the notes only, never used to choose anything; the settings
were chosen on the calibration sentences' cosine). SVD, distillation and evaluation: one process,
``THREADS`` threads, batch 32.

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
from netpress.lowrank.hidden_kd import HiddenDistillConfig, hidden_distill, to_device
from netpress.measure import collect_outputs, compute_metric, count_params

SUITE = "distill"
FFN_PATTERNS = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]
RATIO = 0.5
DISTILL = {"lr": 1e-4, "warmup": 0.1, "train": "all", "device": "auto"}
EPOCHS_GPU = 30  # ~1 s an epoch on an H100
# ~21 s an epoch on 2 idle AMD EPYC cores with length buckets (54 s without). On the calibration
# sentences 12 epochs gave 0.9444 (0.9455 without buckets, twice the time), 24 epochs 0.9489.
EPOCHS_CPU = 24
THREADS = 2  # the machine's cores: the case runs alone, after the one-thread KD workers
STATS = "train"  # or "calibration" (see the module doc)


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
               threads=THREADS, batch=32, notes=notes)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The two ``svd_minilm`` rows: SVD alone, SVD + hidden-state distillation (``quick``: one
    epoch on the first 16 train batches)."""
    from netpress import zoo

    before_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model, bundle = zoo.load_model("minilm").eval(), zoo.load_data("sentences")
        ref = collect_outputs(model, bundle.evaluation)

        moved: dict[torch.device, list] = {torch.device("cpu"): bundle.evaluation}

        def cosine(m: nn.Module) -> float:  # on the model's device (the GPU while distilling)
            dev = next(m.parameters()).device
            if dev not in moved:
                moved[dev] = [to_device(b, dev) for b in bundle.evaluation]
            return compute_metric("cosine", collect_outputs(m, moved[dev]), bundle.evaluation, ref)

        tech = get_technique("lowrank", "svd")
        train = bundle.train[:16] if quick else bundle.train
        cfg = tech.config_cls.from_dict({"method": "svd", "ratio": RATIO, "targets": FFN_PATTERNS,
                                         "activation_aware": True, "statistics": STATS},
                                        "lowrank")
        ctx = StageContext(data=bundle.calibration, original=model, advanced={"train": train})
        t0 = time.perf_counter()
        low = tech.handler(copy.deepcopy(model), cfg, ctx).eval()
        svd_secs = time.perf_counter() - t0
        before = cosine(low)
        ffn, ffn_low = _ffn_weights(model), _ffn_weights(low)


        gpu = torch.cuda.is_available()
        epochs = 1 if quick else EPOCHS_GPU if gpu else EPOCHS_CPU
        where = torch.cuda.get_device_name() if gpu else f"CPU, {THREADS} threads"
        dcfg = HiddenDistillConfig(**DISTILL, epochs=epochs)
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
    stats_note = (f"SVD statistics from the {len(train) * 32} train sentences" if STATS == "train"
                  else "SVD statistics from the 100 calibration sentences")
    per_epoch = ", ".join(f"{ev:.4f}" for ev in res.evals)
    return [
        _row(f"activation-aware svd ratio {RATIO} (FFN), no distillation", before, size, svd_secs,
             f"{ffn_note}; {stats_note}, error-corrected block by block; {sizes}; model params "
             f"{count_params(model)} -> {count_params(low)}"),
        _row(f"activation-aware svd ratio {RATIO} (FFN) + hidden-state distillation "
             f"({dcfg.epochs} ep, {len(train) * 32} train sentences, {where})", after, size, secs,
             f"{ffn_note}; seconds = SVD {svd_secs:.1f} (CPU, {THREADS} threads) + distillation "
             f"{res.seconds:.1f} ({where}, incl. per-epoch evaluation there); evaluation cosine "
             f"per epoch {per_epoch}; final train loss {res.losses[-1]:.4f}; lr {dcfg.lr} AdamW, "
             f"warmup {dcfg.warmup}, cosine decay, {res.trained_params} trained params "
             f"({dcfg.train}); {'length-bucketed' if dcfg.buckets else 'padded'} batches of 32; "
             f"{sizes}"),
    ]


__all__ = ["run"]
