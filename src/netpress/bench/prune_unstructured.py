"""``netpress bench prune`` (unstructured part): SparseGPT / Wanda / magnitude on MiniLM, gradual
pruning of the digits and MNIST-1D CNNs vs ``torch.nn.utils.prune``, and the lottery ticket.

Cases (quality always on the held-out ``evaluation`` split; calibration / training on the other
splits; anchors run in this process on the same models and data):

* ``minilm_50pct_*`` / ``minilm_2of4_*``: one-shot, no fine-tuning, all 36 encoder Linear layers;
  mean cosine of the mean-pooled sentence embeddings to the dense model on the evaluation split;
  calibration: the calibration split plus ``MINILM_TRAIN_SENTENCES`` train-split sentences.
  Anchor: ``torch.nn.utils.prune.l1_unstructured``.
* ``digits_90pct_*`` / ``mnist1d_90pct_*``: 90% of the conv/linear weights (global), netpress
  cubic schedule + fine-tuning vs ``torch.nn.utils.prune.global_unstructured`` one-shot; accuracy
  and artifact bytes (bitmask + values) vs dense.
* ``mnist1d_lottery_*``: ticket (80% pruned, rewound, retrained) vs the same mask on a fresh random
  init vs the dense network trained the same way; 3 seeds, mean and per-seed in the notes.

Example:
    >>> from netpress.bench.prune_unstructured import run  # doctest: +SKIP
    >>> rows = run(quick=True)
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
from netpress.core.config import StageContext, get_technique, parse_config

SUITE = "prune"


def _bytes(model: nn.Module, name: str) -> int:
    from netpress.export.artifact import save_artifact

    with tempfile.TemporaryDirectory(prefix="netpress-bench-") as d:
        save_artifact(model, Path(d) / "a", source={"kind": "zoo", "name": name}, recipe={})
        return sum(p.stat().st_size for p in (Path(d) / "a").glob("*.safetensors"))


def _apply(model: nn.Module, cfg: dict[str, Any], data: list, original: nn.Module,
           train: list | None = None, seed: int = 0) -> tuple[nn.Module, float, dict]:
    conf = parse_config("prune", cfg)
    ctx = StageContext(data=data, original=original, seed=seed,
                       advanced={"train": train} if train else None)
    t0 = time.perf_counter()
    out = get_technique("prune", conf.method).handler(copy.deepcopy(model), conf, ctx)
    return out.eval(), time.perf_counter() - t0, ctx.report


def _sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _row(case: str, tool: str, method: str, metric_name: str, metric: float, size: int,
         seconds: float | None, notes: str, threads: int) -> dict[str, Any]:
    return row(suite=SUITE, case=case, tool=tool, method=method, metric_name=metric_name,
               metric=round(float(metric), 6), size_bytes=int(size), latency_ms=None,
               speedup_vs_fp32=None,
               compress_seconds=None if seconds is None else round(seconds, 2),
               runtime="torch", threads=threads, batch=32, notes=notes)


# ------------------------------------------------------------------------------------ MiniLM
#: calibration for the MiniLM one-shot rows: the 100 calibration sentences (help() prose) plus this
#: many sentences of the ``train`` split (stdlib docstrings), none of them in the evaluation split.
#: The 100 alone are ~2.5k tokens, too few for the 1536-input FFN output projections' Hessians
#: (SparseGPT 50%, scratch runs: 100 -> 0.9321, 512 train -> 0.9338, 2048 train -> 0.9357); with
#: dense target + LayerNorm refit + bias + exact refit, 416 -> 0.9649 and 1024 -> 0.9691
MINILM_TRAIN_SENTENCES = 1024

#: the previous best SparseGPT variant: fit the dense model's outputs, refit the LayerNorms, bias
#: correction
DENSE_SPARSEGPT = {"target": "dense", "refit_norms": True, "bias_correction": True}
#: the best: the same, with the kept weights re-solved exactly once the mask is chosen
BEST_SPARSEGPT = {**DENSE_SPARSEGPT, "exact_refit": True}

#: Wanda with closed-form fixes that leave the pruned matrices' kept weights alone: the mask search
#: and the bias correction aim at the dense model's outputs, LayerNorms after pruned layers refit
WANDA_NORMS = {"target": "dense", "refit_norms": True, "bias_correction": True}

#: MiniLM's six Linear types (patterns as ``targets``); Q/K/V/attention-out are 384x384 each,
#: FFN-in 1536x384 and FFN-out 384x1536, so fractions with ``q + k + v + o + 4·(in + out) = 6·0.5``
#: keep the overall sparsity at exactly 0.5
MINILM_TYPES = {"query": r"re:.*\.attention\.self\.query", "key": r"re:.*\.attention\.self\.key",
                "value": r"re:.*\.attention\.self\.value",
                "attn_out": r"re:.*\.attention\.output\.dense",
                "ffn_in": r"re:.*\.intermediate\.dense", "ffn_out": r"re:.*\.layer\.\d+\.output\.dense"}
#: per-type fractions of the ``types`` row (overall 0.5), chosen from one-type-at-a-time
#: sensitivity on the *calibration* sentences: plain SparseGPT at 0.6 on one type (all 6 blocks),
#: the rest dense, 1 - cosine per 384x384 of weights: query 0.0036, key 0.0041, FFN-out 0.0044,
#: FFN-in 0.0118, value 0.0198, attention-out 0.0226 (cosine 0.9964 / 0.9959 / 0.9823 /
#: 0.9529 / 0.9802 / 0.9774)
TYPE_SPARSITY = {"query": 0.65, "key": 0.65, "value": 0.4, "attn_out": 0.4, "ffn_in": 0.45,
                 "ffn_out": 0.525}


def _minilm_variants() -> list[tuple[str, Any, str, dict[str, Any]]]:
    """``(case, sparsity, method, extra config)`` of the MiniLM rows, most telling first."""
    units = {"query": 1, "key": 1, "value": 1, "attn_out": 1, "ffn_in": 4, "ffn_out": 4}
    overall = sum(units[k] * v for k, v in TYPE_SPARSITY.items()) / sum(units.values())
    assert abs(overall - 0.5) < 1e-9, f"TYPE_SPARSITY must keep the overall 0.5, got {overall}"
    out: list[tuple[str, Any, str, dict[str, Any]]] = []
    types = {MINILM_TYPES[k]: v for k, v in TYPE_SPARSITY.items()}
    for case, sp in (("minilm_50pct", 0.5), ("minilm_2of4", "2:4")):
        out += [(case, sp, "sparsegpt", dict(BEST_SPARSEGPT)),
                (case, sp, "sparsegpt", {**BEST_SPARSEGPT, "mask": "wanda"}),
                (case, sp, "wanda", {}), (case, sp, "magnitude", {}),
                (case, sp, "sparsegpt", dict(DENSE_SPARSEGPT)), (case, sp, "sparsegpt", {}),
                (case, sp, "wanda", {"bias_correction": True})]
        if case == "minilm_50pct":
            out += [(case, sp, "wanda", {**WANDA_NORMS, "mask_refine": 256, "mask_candidates": 4,
                                          "type_sparsity": types}),
                    (case, sp, "wanda", {**WANDA_NORMS, "mask_refine": 64}),
                    (case, sp, "wanda", {**WANDA_NORMS, "mask_refine": 256, "mask_candidates": 4}),
                    (case, sp, "wanda", dict(WANDA_NORMS)),
                    (case, sp, "wanda", {"score": "ria"}),
                    (case, sp, "wanda", {"type_sparsity": types}),
                    (case, sp, "wanda", {"sequential": True, "bias_correction": True}),
                    (case, sp, "wanda", {"update": "obs", "bias_correction": True}),
                    (case, sp, "sparsegpt", {**BEST_SPARSEGPT, "type_sparsity": types})]
    return out


def _tag(extra: dict[str, Any], method: str = "sparsegpt") -> tuple[str, str]:
    """Case suffix and the notes' description of a variant's options."""
    if "owl_lambda" in extra:
        return "_owl", f"OWL λ={extra['owl_lambda']} M={extra['owl_m']}; "
    tags, how = [], []
    if extra.get("score") == "ria":
        tags.append("ria")
        how.append("RIA score (|w|/Σrow|w| + |w|/Σcol|w|)·‖x‖^0.5 instead of |w|·‖x‖")
    if extra.get("sequential"):
        tags.append("seq")
        how.append("input norms through the pruned earlier layers")
    if extra.get("mask_refine"):
        cand = extra.get("mask_candidates", 1)
        tags.append(f"maskrefine{extra['mask_refine']}" + (f"x{cand}" if cand > 1 else ""))
        how.append(f"mask swap search (DSnoT-style, weights unchanged): up to "
                   f"{extra['mask_refine']} swaps per row of a pruned and a kept weight "
                   f"(best pair of {cand} grow candidates), each only if the row's quadratic "
                   "output error on the calibration inputs falls")
    if extra.get("mask") == "wanda":
        tags.append("wandamask")
        how.append("Wanda's mask (|w|·‖x‖, each row half) with SparseGPT's weight updates "
                   "(not plain Wanda: the kept weights change)")
    if extra.get("type_sparsity"):
        names = {v: k for k, v in MINILM_TYPES.items()}
        tags.append("types")
        how.append("per-type sparsity " + ", ".join(
            f"{names.get(k, k)} {v}" for k, v in extra["type_sparsity"].items())
            + " (overall 0.5: same weight count as uniform)")
    if extra.get("update") == "obs":
        tags.append("obs")
        how.append("Wanda's mask, kept weights updated by SparseGPT's OBS sweep (not plain Wanda)")
    if extra.get("target") == "dense" and method == "wanda":
        tags.append("densetarget")
        how.append("the mask search and bias aim at the dense model's layer outputs (inputs of "
                   "a dense copy); no weight of a pruned matrix is refit")
    elif extra.get("target") == "dense":
        tags.append("densetarget")
        how.append("fits the dense model's layer outputs (W' = W·G·H⁻¹, inputs of a dense copy)")
    if extra.get("refit_norms"):
        tags.append("refitnorms")
        how.append("each LayerNorm after a pruned layer refit per feature to the dense outputs "
                   "(closed form, LayerNorm weight/bias only)")
    if extra.get("bias_correction"):
        tags.append("biascorr")
        how.append("bias += mean output shift on the calibration inputs")
    if extra.get("exact_refit"):
        tags.append("exactrefit")
        how.append("kept weights re-solved per row by least squares once the mask is chosen")
    return "".join(f"_{t}" for t in tags), "".join(f"{h}; " for h in how)


def minilm(quick: bool = False, cases: tuple[str, ...] = ("minilm_50pct", "minilm_2of4"),
           anchors: bool = True, only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One-shot 50% and 2:4 on all-MiniLM-L6-v2 (all 36 encoder Linear layers).

    ``cases`` / ``anchors`` pick a part (the dense and torch rows are the anchors), so the parts
    can run as separate processes on a busy machine; ``only`` (full row case names, e.g.
    ``"minilm_50pct_wanda"``) runs just those variants.
    """
    from torch.nn.utils import prune as tprune

    from netpress import zoo
    from netpress.measure import collect_outputs, compute_metric

    threads = torch.get_num_threads()
    model = zoo.load_model("minilm")
    bundle = zoo.load_data("sentences")
    evaluation = bundle.evaluation[:4] if quick else bundle.evaluation
    n_eval = sum(b.size for b in evaluation)
    ref = collect_outputs(model, evaluation)
    calib = bundle.calibration + bundle.train[: (32 if quick else MINILM_TRAIN_SENTENCES) // 32]
    n_cal = sum(b.size for b in calib)
    n_tok = sum(int(b.mask.sum()) for b in calib if b.mask is not None)

    def cos(m: nn.Module) -> float:
        return compute_metric("cosine", collect_outputs(m, evaluation), evaluation, ref)

    n_split = sum(b.size for b in bundle.calibration)
    base = (f"{n_eval} held-out sentences; calibration {n_cal} sentences ({n_tok} tokens): the "
            f"{n_split} calibration + {n_cal - n_split} train-split (stdlib docstring) ones")
    rows = [_row("minilm_dense", "netpress", "dense fp32", "cosine", 1.0, _bytes(model, "minilm"),
                 None, base, threads)] if anchors else []
    if anchors:
        anchor = copy.deepcopy(model)
        t0 = time.perf_counter()
        for m in anchor.modules():
            if isinstance(m, nn.Linear):
                tprune.l1_unstructured(m, "weight", amount=0.5)
                tprune.remove(m, "weight")
        secs = time.perf_counter() - t0
        rows.append(_row("minilm_50pct_torch_l1", "torch.nn.utils.prune", "l1_unstructured 0.5",
                         "cosine", cos(anchor), _bytes(anchor, "minilm"), secs,
                         f"per-layer magnitude, the anchor; {base}", threads))
    for case, spars, method, extra in _minilm_variants():
        tag, how = _tag(extra, method)
        if case not in cases or (only is not None and f"{case}_{method}{tag}" not in only):
            continue
        pruned, secs, rep = _apply(model, {"method": method, "sparsity": spars, **extra},
                                   calib, model)
        seq = "sequential (inputs through the pruned earlier layers); " \
            if rep[method].get("sequential") or method == "sparsegpt" else ""
        if extra.get("type_sparsity"):  # a per-type split must remove the same weight count
            assert abs(_sparsity(pruned) - 0.5) < 1e-4, f"{case}{tag}: {_sparsity(pruned)}"
        rows.append(_row(f"{case}_{method}{tag}", "netpress", f"{method} {spars}{tag}", "cosine",
                         cos(pruned), _bytes(pruned, "minilm"), secs,
                         f"one-shot, no fine-tune; {seq}{how}all 36 encoder Linear layers "
                         f"(Q/K/V/attention-out/FFN-in/FFN-out x 6); sparsity "
                         f"{_sparsity(pruned):.3f}; {base}", threads))
    return rows


# ------------------------------------------------------------------------------------ CNNs
def _accuracy(model: nn.Module, batches: list) -> float:
    from netpress.measure import collect_outputs, compute_metric

    return compute_metric("accuracy", collect_outputs(model, batches), batches)


def cnn(data: str, name: str, quick: bool = False) -> list[dict[str, Any]]:
    """90% global sparsity: netpress cubic schedule + fine-tune vs torch one-shot."""
    from torch.nn.utils import prune as tprune

    from netpress import zoo

    threads = torch.get_num_threads()
    model = zoo.load_model(name)
    bundle = zoo.load_data(data)
    ev = bundle.evaluation
    dense_acc, dense_bytes = _accuracy(model, ev), _bytes(model, name)
    n_ev = sum(b.size for b in ev)
    rows = [_row(f"{data}_dense", "netpress", "dense fp32", "accuracy", dense_acc, dense_bytes,
                 None, f"{n_ev} held-out examples", threads)]
    # digits: 15 epochs, lr 2e-3, prune over the first 60%; MNIST-1D needed longer (15 epochs
    # at 2e-3 gave a 1.8 pt drop): 20 epochs, lr 3e-3, prune over the first 50%
    epochs, lr, end = (15, 2e-3, 0.6) if data == "digits" else (20, 3e-3, 0.5)
    epochs = 2 if quick else epochs
    cfg = {"method": "magnitude", "sparsity": 0.9, "scope": "global", "schedule": "cubic",
           "prune_steps": 10, "prune_end": end,
           "finetune": {"epochs": epochs, "lr": lr, "optimizer": "adam"}}
    pruned, secs, rep = _apply(model, cfg, bundle.calibration, model, train=bundle.train)
    acc = _accuracy(pruned, ev)
    size = _bytes(pruned, name)
    rows.append(_row(f"{data}_90pct_cubic", "netpress", "magnitude 0.9 global, cubic schedule",
                     "accuracy", acc, size, secs,
                     f"{epochs} fine-tune epochs on the train split; sparsity "
                     f"{_sparsity(pruned):.3f}; drop {100 * (dense_acc - acc):.2f} pt; "
                     f"{size / dense_bytes:.1%} of dense bytes", threads))
    one, secs1, _ = _apply(model, {"method": "magnitude", "sparsity": 0.9, "scope": "global"},
                           bundle.calibration, model)
    acc1 = _accuracy(one, ev)
    rows.append(_row(f"{data}_90pct_oneshot", "netpress", "magnitude 0.9 global, one-shot",
                     "accuracy", acc1, _bytes(one, name), secs1,
                     f"no fine-tune; drop {100 * (dense_acc - acc1):.2f} pt", threads))
    anchor = copy.deepcopy(model)
    t0 = time.perf_counter()
    params = [(m, "weight") for m in anchor.modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.9)
    for m, p in params:
        tprune.remove(m, p)
    secs2 = time.perf_counter() - t0
    acc2 = _accuracy(anchor, ev)
    rows.append(_row(f"{data}_90pct_torch_global", "torch.nn.utils.prune",
                     "global_unstructured L1 0.9 one-shot", "accuracy", acc2,
                     _bytes(anchor, name), secs2,
                     f"the anchor; drop {100 * (dense_acc - acc2):.2f} pt", threads))
    return rows


# ------------------------------------------------------------------------------------ lottery
def lottery(quick: bool = False, seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict[str, Any]]:
    """Lottery ticket on the MNIST-1D CNN: ticket vs random re-init vs dense, per seed."""
    from netpress import zoo
    from netpress.prune.lottery import random_reinit, ticket_masks, train_masked
    from netpress.train.loop import TrainConfig
    from netpress.zoo.trained import build_trained

    threads = torch.get_num_threads()
    bundle = zoo.load_data("mnist1d")
    ev, train = bundle.evaluation, bundle.train
    seeds = seeds[:1] if quick else seeds
    epochs = 1 if quick else 6
    ft = {"epochs": epochs, "lr": 3e-3, "optimizer": "adam"}
    res: dict[str, list[float]] = {"dense": [], "ticket": [], "random": []}
    secs_all, sizes, sparsity = 0.0, {}, 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        init = build_trained("mnist1d_cnn")  # θ0: fresh random weights
        dense = copy.deepcopy(init)
        ctx = StageContext(data=train, seed=seed)
        train_masked(dense, {}, train, TrainConfig(seed=seed, **ft), ctx)
        res["dense"].append(_accuracy(dense.eval(), ev))
        cfg = {"method": "lottery", "sparsity": 0.8, "rounds": 2, "rewind_steps": 100,
               "finetune": {**ft, "seed": seed}}
        ticket, secs, rep = _apply(init, cfg, train, init, train=train, seed=seed)
        secs_all += secs
        res["ticket"].append(_accuracy(ticket, ev))
        names = list(rep["lottery"]["layers"])
        control = random_reinit(ticket, ticket_masks(ticket, names), seed=1000 + seed)
        train_masked(control, ticket_masks(ticket, names), train, TrainConfig(seed=seed, **ft),
                     StageContext(data=train, seed=seed))
        res["random"].append(_accuracy(control.eval(), ev))
        sparsity = rep["lottery"]["sparsity"]
        sizes = {"dense": _bytes(dense, "mnist1d_cnn"), "ticket": _bytes(ticket, "mnist1d_cnn"),
                 "random": _bytes(control, "mnist1d_cnn")}
    rows = []
    for key, method in (("dense", "dense, same training"),
                        ("ticket", "lottery ticket 80% (2 rounds, rewind to step 100)"),
                        ("random", "same mask, fresh random init")):
        vals = res[key]
        mean = sum(vals) / len(vals)
        rows.append(_row(f"mnist1d_lottery_{key}", "netpress", method, "accuracy", mean,
                         sizes[key], secs_all if key == "ticket" else None,
                         f"mean of seeds {list(seeds)}: {[round(v, 4) for v in vals]}; "
                         f"{epochs} epochs per training run; weights kept "
                         f"{1 - (sparsity if key != 'dense' else 0):.3f}", threads))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All unstructured-pruning cases (see the module doc)."""
    rows = []
    rows += cnn("digits", "digits_cnn", quick)
    rows += cnn("mnist1d", "mnist1d_cnn", quick)
    rows += lottery(quick)
    rows += minilm(quick)
    return rows


__all__ = ["cnn", "lottery", "minilm", "run"]
