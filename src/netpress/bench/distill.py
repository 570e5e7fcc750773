"""``netpress bench distill``: KD, feature KD, SVD, Tucker-2, Deep Compression, prune → distill → QAT.

Every number is measured here, on the zoo bundles' held-out ``evaluation`` split; training uses the
``train`` split only. Training runs on one thread (tiny models; two OpenMP threads spin against
other processes on a shared machine). Rows follow DESIGN §2; ``notes`` carry the derived figures
(gap recovered, MACs ratio, size ratio) and the per-seed values.

Cases:
  * ``kd_<data>`` / ``feature_kd_<data>``: a student derived from the zoo CNN (width 0.4, >= 4x
    fewer parameters) trained on labels alone (row ``labels_only``), with Hinton KD, and with KD +
    FitNets hints; 3 seeds; "gap recovered" = (KD - labels) / (teacher - labels), of the means.
  * ``svd_minilm``: SVD of every FFN Linear of MiniLM at 50 % of its parameters, then a short
    cosine distillation from the original on the ``sentences`` calibration split.
  * ``tucker_<data>``: Tucker-2 (ratio 0.5) of the CNN's k>1 convs + 3 fine-tuning epochs.
  * ``deep_compression_<model>``: magnitude pruning + masked fine-tuning (KD from the original),
    5-bit weight sharing, entropy-coded indices; bytes of the artifact's safetensors vs fp32.
  * ``prune_distill_qat_mnist1d``: magnitude pruning → KD recovery → 4-bit weight-only QAT, the
    integer codes entropy-coded (``quantize: {method: entropy_code}``).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from netpress.bench import row
from netpress.core.config import StageContext, get_technique
from netpress.measure import collect_outputs, compute_metric, count_macs, count_params
from netpress.train import TrainConfig, fine_tune

SUITE = "distill"
SEEDS = (0, 1, 2)


def _acc(model: nn.Module, batches: list, metric: str = "accuracy", ref: Any = None) -> float:
    return compute_metric(metric, collect_outputs(model, batches), batches, ref)


def _stage(stage: str, model: nn.Module, cfg: dict, bundle: Any, original: nn.Module,
           task: str = "classification") -> nn.Module:
    tech = get_technique(stage, cfg["method"])
    config = tech.config_cls.from_dict(cfg, stage)
    ctx = StageContext(data=bundle.calibration, original=original,
                       advanced={"train": bundle.train, "task": task})
    return tech.handler(model, config, ctx).eval()


def _artifact_bytes(model: nn.Module, source: dict, scratch: Path, tag: str) -> tuple[int, nn.Module]:
    from netpress.export.artifact import load, save_artifact

    d = scratch / tag
    save_artifact(model, d, source=source, recipe={}, metrics=None)
    return sum(p.stat().st_size for p in d.glob("*.safetensors")), load(d)


def _row(case: str, tool: str, method: str, metric_name: str, metric: float, size: int,
         seconds: float | None, notes: str) -> dict[str, Any]:
    return row(suite=SUITE, case=case, tool=tool, method=method, metric_name=metric_name,
               metric=round(metric, 4), size_bytes=int(size), latency_ms=None,
               speedup_vs_fp32=None, compress_seconds=None if seconds is None else round(seconds, 1),
               runtime="torch", threads=1, batch=32, notes=notes)


def _nbytes(model: nn.Module) -> int:
    return 4 * count_params(model)


def kd_cases(data: str, quick: bool) -> list[dict[str, Any]]:
    from netpress import zoo
    from netpress.distill import derive_student, distill

    name = {"digits": "digits_cnn", "mnist1d": "mnist1d_cnn"}[data]
    teacher, bundle = zoo.load_model(name), zoo.load_data(data)
    epochs = {"digits": 15, "mnist1d": 8}[data] // (3 if quick else 1)
    t_acc = _acc(teacher, bundle.evaluation)
    feat = {"digits": [["5", "5"], ["9", "9"]], "mnist1d": [["5", "5"], ["11", "11"]]}[data]
    res: dict[str, list[float]] = {"labels": [], "kd": [], "feature_kd": []}
    secs: dict[str, float] = {k: 0.0 for k in res}
    n_student = 0
    for seed in SEEDS[: 1 if quick else 3]:
        for kind in res:
            student = derive_student(teacher, width=0.4, seed=seed)
            n_student = count_params(student)
            t0 = time.perf_counter()
            cfg = TrainConfig(epochs=epochs, lr=0.01, seed=seed)
            if kind == "labels":
                fine_tune(student, bundle.train, cfg)
            else:
                dcfg: dict[str, Any] = {"method": kind, "epochs": epochs, "lr": 0.01, "seed": seed,
                                        "temperature": 4.0, "alpha": 0.7}
                if kind == "feature_kd":
                    dcfg.update(features=feat, beta=1.0)
                distill(student, teacher, bundle.train, dcfg)
            secs[kind] += time.perf_counter() - t0
            res[kind].append(_acc(student, bundle.evaluation))
    mean = {k: statistics.mean(v) for k, v in res.items()}
    gap = t_acc - mean["labels"]
    ratio = count_params(teacher) / n_student
    rows = [_row(f"kd_{data}", "netpress", "teacher (zoo fp32)", "accuracy", t_acc,
                 _nbytes(teacher), None, f"{count_params(teacher)} params")]
    for kind, method in (("labels", "labels_only (student, CE)"), ("kd", "kd T=4 a=0.7"),
                         ("feature_kd", "feature_kd (hints + kd)")):
        rec = (mean[kind] - mean["labels"]) / gap if gap > 0 else float("nan")
        note = (f"student {n_student} params ({ratio:.1f}x smaller); seeds "
                f"{[round(v, 4) for v in res[kind]]}")
        if kind != "labels":
            note += f"; gap recovered {rec:.0%} (teacher {t_acc:.4f}, labels-only {mean['labels']:.4f})"
        if kind == "feature_kd":
            note += f"; gain over kd {mean['feature_kd'] - mean['kd']:+.4f}"
        case = f"{'feature_kd' if kind == 'feature_kd' else 'kd'}_{data}"
        rows.append(_row(case, "netpress" if kind != "labels" else "baseline", method, "accuracy",
                         mean[kind], _nbytes(student), secs[kind] / len(res[kind]), note))
    return rows


def svd_minilm(quick: bool) -> list[dict[str, Any]]:
    from netpress import zoo

    model, bundle = zoo.load_model("minilm"), zoo.load_data("sentences")
    ref = collect_outputs(model, bundle.evaluation)
    targets = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]
    t0 = time.perf_counter()
    low = _stage("lowrank", copy.deepcopy(model), {"method": "svd", "ratio": 0.5, "targets": targets},
                 bundle, model, "embedding")
    before = _acc(low, bundle.evaluation, "cosine", ref)
    ffn = sum(m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and ("intermediate.dense" in n or
                                               (n.endswith("output.dense") and "attention" not in n)))
    ffn_low = sum(m.weight.numel() for n, m in low.named_modules()
                  if isinstance(m, nn.Linear) and ("intermediate.dense" in n or
                                                   ("output.dense" in n and "attention" not in n)))
    # short distillation on real sentences (calibration split); cosine on the evaluation split
    low = _stage("distill", low, {"method": "kd", "data": "calibration", "epochs": 2 if quick else 6,
                                  "lr": 1e-4, "loss": "cosine"}, bundle, model, "embedding")
    secs = time.perf_counter() - t0
    after = _acc(low, bundle.evaluation, "cosine", ref)
    return [
        _row("svd_minilm", "netpress", "svd ratio 0.5 (FFN), no distillation", "cosine", before,
             _nbytes(low), None, f"FFN weights {ffn} -> {ffn_low} ({ffn_low / ffn:.0%})"),
        _row("svd_minilm", "netpress", "svd ratio 0.5 (FFN) + cosine distillation", "cosine", after,
             _nbytes(low), secs, f"model params {count_params(model)} -> {count_params(low)}"),
    ]


def tucker(data: str, quick: bool) -> list[dict[str, Any]]:
    from netpress import zoo

    name = {"digits": "digits_cnn", "mnist1d": "mnist1d_cnn"}[data]
    model, bundle = zoo.load_model(name), zoo.load_data(data)
    base = _acc(model, bundle.evaluation)
    t0 = time.perf_counter()
    ratio = {"digits": 0.5, "mnist1d": 0.4}[data]  # MNIST-1D: its first conv and head stay dense
    cfg = {"method": "tucker", "ratio": ratio, "finetune": {"epochs": 1 if quick else 3, "lr": 1e-3}}
    low = _stage("lowrank", copy.deepcopy(model), cfg, bundle, model)
    secs = time.perf_counter() - t0
    ex = bundle.evaluation[0].slice(1)
    macs = count_macs(model, ex) / count_macs(low, ex)
    acc = _acc(low, bundle.evaluation)
    return [
        _row(f"tucker_{data}", "netpress", "fp32 original", "accuracy", base, _nbytes(model), None,
             f"MACs {count_macs(model, ex)}"),
        _row(f"tucker_{data}", "netpress", f"tucker-2 ratio {ratio} + 3 ep fine-tune", "accuracy", acc,
             _nbytes(low), secs, f"MACs {count_macs(low, ex)} ({macs:.2f}x fewer); "
             f"drop {100 * (base - acc):+.2f} pt"),
    ]


def mlp_300_100(n_in: int = 64) -> nn.Sequential:
    """LeNet-300-100 on 8x8 digits (flattened)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def deep_compression(which: str, quick: bool, scratch: Path) -> list[dict[str, Any]]:
    from netpress import zoo

    bundle = zoo.load_data("digits")
    if which == "mlp":
        torch.manual_seed(0)
        model = mlp_300_100()
        fine_tune(model, bundle.train, TrainConfig(epochs=10 if quick else 30, lr=3e-3,
                                                   weight_decay=1e-4))
        source = {"kind": "module", "factory": "netpress.bench.distill:mlp_300_100"}
        sparsity = 0.96
    else:
        model = zoo.load_model("digits_cnn")
        source = {"kind": "zoo", "name": "digits_cnn"}
        sparsity = 0.94
    model.eval()
    base = _acc(model, bundle.evaluation)
    fp32_bytes, _ = _artifact_bytes(model, source, scratch, f"{which}-fp32")
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    for step in (0.8, sparsity):  # iterative: prune, recover by KD from the original, prune more
        m = _stage("prune", m, {"method": "magnitude", "sparsity": step, "scope": "global"},
                   bundle, model)
        m = _stage("distill", m, {"method": "kd", "epochs": 3 if quick else 10, "lr": 2e-3,
                                  "alpha": 0.5}, bundle, model)
    m = _stage("quantize", m, {"method": "weight_sharing", "bits": 5}, bundle, model)
    secs = time.perf_counter() - t0
    size, reloaded = _artifact_bytes(m, source, scratch, f"{which}-dc")
    acc = _acc(reloaded, bundle.evaluation)
    case = f"deep_compression_{'mlp300_100' if which == 'mlp' else 'digits_cnn'}"
    return [
        _row(case, "netpress", "fp32 original", "accuracy", base, fp32_bytes, None,
             f"{count_params(model)} params"),
        _row(case, "netpress",
             f"prune 80% -> {sparsity:.0%} (KD after each) + 5-bit sharing + entropy coding",
             "accuracy", acc, size, secs, f"{fp32_bytes / size:.1f}x smaller than fp32 safetensors; "
             f"drop {100 * (base - acc):+.2f} pt (reloaded artifact)"),
    ]


def prune_distill_qat(quick: bool, scratch: Path) -> list[dict[str, Any]]:
    from netpress import zoo

    model, bundle = zoo.load_model("mnist1d_cnn"), zoo.load_data("mnist1d")
    source = {"kind": "zoo", "name": "mnist1d_cnn"}
    base = _acc(model, bundle.evaluation)
    fp32_bytes, _ = _artifact_bytes(model, source, scratch, "pdq-fp32")
    t0 = time.perf_counter()
    m = _stage("prune", copy.deepcopy(model), {"method": "magnitude", "sparsity": 0.8,
                                               "scope": "global"}, bundle, model)
    m = _stage("distill", m, {"method": "kd", "epochs": 2 if quick else 6, "lr": 1e-3}, bundle, model)
    m = _stage("quantize", m, {"method": "qat", "weights": {"bits": 4}, "activations": None,
                               "finetune": {"epochs": 1 if quick else 3, "lr": 5e-4}}, bundle, model)
    m = _stage("quantize", m, {"method": "entropy_code"}, bundle, model)
    secs = time.perf_counter() - t0
    size, reloaded = _artifact_bytes(m, source, scratch, "pdq")
    acc = _acc(reloaded, bundle.evaluation)
    return [
        _row("prune_distill_qat_mnist1d", "netpress", "fp32 original", "accuracy", base, fp32_bytes,
             None, ""),
        _row("prune_distill_qat_mnist1d", "netpress",
             "prune 80% -> KD -> QAT w4 (weight-only) -> entropy-coded codes", "accuracy", acc,
             size, secs, f"{fp32_bytes / size:.1f}x smaller than fp32 safetensors; "
             f"drop {100 * (base - acc):+.2f} pt (reloaded artifact)"),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All cases of the suite (``quick``: one seed, fewer epochs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="netpress-bench-distill-") as d:
            scratch = Path(d)
            for data in ("digits", "mnist1d"):
                rows += kd_cases(data, quick)
            for data in ("digits", "mnist1d"):
                rows += tucker(data, quick)
            rows += deep_compression("mlp", quick, scratch)
            rows += deep_compression("cnn", quick, scratch)
            rows += prune_distill_qat(quick, scratch)
            rows += svd_minilm(quick)
    finally:
        torch.set_num_threads(threads)
    return rows


__all__ = ["run", "mlp_300_100"]
