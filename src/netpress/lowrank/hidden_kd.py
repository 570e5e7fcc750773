"""Hidden-state distillation after low-rank decomposition (MiniLM / TinyBERT style).

The student (the decomposed model) learns to reproduce the teacher's (the original's) block outputs
and its pooled embedding:

    L = hidden · mean_l ‖h_s^l - h_t^l‖² / mean ‖h_t^l‖²   +   cosine · mean_b (1 - cos(e_s, e_t))

over the real tokens (attention mask 1) of every block ``l``; ``e`` is the mean-pooled final output
(token outputs ``(B, T, H)``) or the output itself (``(B, H)``). Blocks default to the children of
an ``nn.ModuleList`` that hold a factorised layer (BERT's ``encoder.layer.i``). Only the low-rank
factors, LayerNorms and biases train by default (``train: lowrank``), with AdamW, a linear warmup
and cosine decay, in eval mode (no dropout: the student copies a deterministic teacher). The
teacher's block outputs are computed once and kept (float16, real tokens only).

Recipe spelling (inside the SVD stage; data: the run's ``train`` split, else calibration)::

    - lowrank: {method: svd, ratio: 0.5, activation_aware: true, statistics: train,
                distill: {epochs: 30, lr: 1e-4, train: all, device: auto}}

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.lowrank.hidden_kd import HiddenDistillConfig, hidden_distill
    >>> from netpress.lowrank.svd import factorize_linear
    >>> _ = torch.manual_seed(0)
    >>> teacher = nn.Sequential(nn.ModuleList([nn.Linear(16, 16)]))
    >>> teacher.forward = lambda x: teacher[0][0](x)
    >>> student = nn.Sequential(nn.ModuleList([factorize_linear(teacher[0][0], 2)]))
    >>> student.forward = lambda x: student[0][0](x)
    >>> data = [Batch((torch.randn(32, 16),)) for _ in range(8)]
    >>> res = hidden_distill(student, teacher, data, HiddenDistillConfig(epochs=5, lr=1e-2),
    ...                      factorised=["0.0"])
    >>> res.losses[-1] < res.losses[0]
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.data import Batch, length_buckets
from netpress.core.errors import DataError, ModelError
from netpress.measure.metrics import first_tensor


class HiddenDistillConfig(BaseModel):
    """The ``distill`` block of ``lowrank: {method: svd}``.

    Attributes:
        epochs: passes over the training batches.
        lr: peak AdamW learning rate.
        warmup: fraction of the steps with a linear warmup (then cosine decay to 0).
        weight_decay: AdamW decay of the factor weights (not of LayerNorms and biases).
        hidden: weight of the per-block hidden-state MSE (normalised by the teacher's mean square).
        cosine: weight of ``1 - cos`` of the pooled embeddings.
        train: ``lowrank`` (factors, LayerNorms, biases) or ``all`` (every parameter except
            embedding tables).
        blocks: module names whose outputs are matched (default: see the module doc).
        grad_clip: clip the gradient norm to this value.
        seed: shuffling seed.
        device: where to train: ``model`` (where the student is), ``cpu``, ``cuda``, or ``auto``
            (cuda when available); student and teacher go there for the run and come back after.
        buckets: regroup token batches by real length before training
            (:func:`~netpress.core.data.length_buckets`; same examples and batch size, far less
            padding: MiniLM's train sentences go from 40 % to 97 % real tokens).
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=3, ge=0, le=1000)
    lr: float = Field(default=3e-4, gt=0, le=1)
    warmup: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    hidden: float = Field(default=1.0, ge=0)
    cosine: float = Field(default=1.0, ge=0)
    train: Literal["lowrank", "all"] = "lowrank"
    blocks: list[str] | None = None
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    device: Literal["model", "auto", "cpu", "cuda"] = "model"
    buckets: bool = True


@dataclass
class HiddenDistillResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    evals: list[float] = field(default_factory=list)  # eval_fn after each epoch (when given)
    blocks: list[str] = field(default_factory=list)
    trained_params: int = 0
    seconds: float = 0.0


def default_blocks(model: nn.Module, factorised: Sequence[str]) -> list[str]:
    """Names of the ``nn.ModuleList`` items that contain a factorised layer, in model order."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = []
    for name, _ in model.named_modules():
        parent, _, child = name.rpartition(".")
        if parent in lists and child.isdigit() and any(f.startswith(name + ".") or f == name
                                                      for f in factorised):
            found.append(name)
    return found


def trainable(model: nn.Module, factorised: Sequence[str], mode: str) -> tuple[list, list]:
    """``(decayed, not_decayed)`` parameters: factor weights, then LayerNorms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        in_factor = any(mod == f or mod.startswith(f + ".") for f in factorised)
        is_norm = isinstance(model.get_submodule(mod), nn.LayerNorm) if mod else False
        is_emb = isinstance(model.get_submodule(mod), nn.Embedding) if mod else False
        if is_emb:
            continue
        if name.endswith("bias") or is_norm:
            no_decay.append(p)
        elif in_factor or mode == "all":
            decay.append(p)
    return decay, no_decay


@contextmanager
def _taps(model: nn.Module, names: Sequence[str], slot: dict[str, torch.Tensor]) -> Iterator[None]:
    def make(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            slot[name] = first_tensor(out)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, H)`` -> real tokens ``(N, H)``; other shapes -> ``(B, ...)`` flattened rows."""
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        return x[mask.bool()]
    return x.reshape(x.shape[0], -1)


def _pooled(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if out.dim() == 3:
        m = (mask if mask is not None and mask.shape == out.shape[:2]
             else torch.ones(out.shape[:2], dtype=out.dtype)).to(out.dtype)[..., None]  # (B, T, 1)
        return (out * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
    return out.reshape(out.shape[0], -1)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batches: Sequence[Batch],
                    blocks: Sequence[str]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per batch: the teacher's block outputs on real tokens (float16) and its pooled output."""
    teacher.eval()
    slot: dict[str, torch.Tensor] = {}
    cache = []
    with _taps(teacher, blocks, slot):
        for b in batches:
            slot.clear()
            out = first_tensor(b.run(teacher)).float()
            if len(slot) != len(blocks):
                missing = sorted(set(blocks) - set(slot))
                raise ModelError("lowrank.distill.blocks", got=f"no output from {missing}",
                                 expected="modules on the forward path",
                                 fix="name blocks the model runs, or leave blocks unset")
            hs = [_tokens(slot[n].float(), b.mask).half() for n in blocks]
            cache.append((hs, _pooled(out, b.mask)))
    return cache


def _loss(student: nn.Module, batch: Batch, target: tuple[list[torch.Tensor], torch.Tensor],
          blocks: Sequence[str], slot: dict[str, torch.Tensor],
          config: HiddenDistillConfig) -> torch.Tensor:
    slot.clear()
    out = first_tensor(batch.run(student)).float()
    hs_t, pooled_t = target
    loss = out.new_zeros(())
    if config.hidden > 0 and blocks:
        terms = []
        for n, t in zip(blocks, hs_t, strict=True):
            s, t = _tokens(slot[n].float(), batch.mask), t.float()
            terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12))
        loss = loss + config.hidden * torch.stack(terms).mean()
    if config.cosine > 0:
        cos = F.cosine_similarity(_pooled(out, batch.mask), pooled_t, dim=-1)  # (B,)
        loss = loss + config.cosine * (1 - cos).mean()
    return loss


def _device(config: HiddenDistillConfig, student: nn.Module) -> torch.device:
    """The training device (see :class:`HiddenDistillConfig`)."""
    home = next(iter(student.parameters()), torch.empty(0)).device
    if config.device == "model":
        return home
    if config.device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else home
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("lowrank.distill.device", got="cuda", expected="a visible CUDA device",
                         fix="use device: auto (falls back to where the model is) or cpu")
    return torch.device(config.device)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with its inputs on ``device`` (the target stays where it is)."""
    if isinstance(batch.inputs, dict):
        return Batch({k: v.to(device) for k, v in batch.inputs.items()}, batch.target)
    return Batch(tuple(v.to(device) for v in batch.inputs), batch.target)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def hidden_distill(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch],
                   config: HiddenDistillConfig, factorised: Sequence[str],
                   eval_fn: Callable[[nn.Module], float] | None = None,
                   log: Callable[[str], None] | None = None) -> HiddenDistillResult:
    """Train ``student`` in place to match ``teacher``'s block outputs and pooled embedding.

    Args:
        student: the decomposed model (left in eval mode).
        teacher: the original model (not changed).
        batches: training batches (unlabelled is fine).
        config: see :class:`HiddenDistillConfig`.
        factorised: names of the factorised modules (their parameters train).
        eval_fn: called after every epoch with the student (on the training device), e.g. the
            cosine on held-out data; kept in ``evals``.
        log: progress lines.

    Raises:
        DataError: no batches.
        ModelError: a block does not run in the forward pass.
    """
    if not batches:
        raise DataError("lowrank.distill", got="no batches", expected="training batches",
                        fix="use a zoo data set with a train split, or drop distill")
    t0 = time.perf_counter()
    blocks = list(config.blocks) if config.blocks is not None else default_blocks(student,
                                                                                  factorised)
    names = {n for n, _ in student.named_modules()}
    missing = [n for n in blocks if n not in names]
    if missing:
        raise ModelError("lowrank.distill.blocks", got=f"no module {missing}",
                         expected="names of the model's blocks (e.g. bert.encoder.layer.0)",
                         fix="fix the names, or leave blocks unset")
    result = HiddenDistillResult(blocks=blocks)
    decay, no_decay = trainable(student, factorised, config.train)
    result.trained_params = sum(p.numel() for p in decay + no_decay)
    if config.epochs == 0 or not decay + no_decay:
        return result
    frozen = {p: p.requires_grad for p in student.parameters()}
    chosen = {id(p) for p in decay + no_decay}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    if config.buckets:
        batches = length_buckets(list(batches))
    dev = _device(config, student)
    home = next(iter(student.parameters())).device
    teacher_home = next(iter(teacher.parameters()), torch.empty(0)).device
    if dev != home:
        batches = [to_device(b, dev) for b in batches]
    try:
        teacher.to(dev)
        targets = teacher_targets(teacher, batches, blocks)
    finally:
        teacher.to(teacher_home)
    student.to(dev)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    total = config.epochs * len(batches)
    warm = int(config.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warm))
    gen = torch.Generator().manual_seed(config.seed)
    slot: dict[str, torch.Tensor] = {}
    student.eval()  # no dropout: the targets are deterministic
    try:
        with _taps(student, blocks, slot):
            for epoch in range(config.epochs):
                running = 0.0
                for i in torch.randperm(len(batches), generator=gen).tolist():
                    loss = _loss(student, batches[i], targets[i], blocks, slot, config)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(decay + no_decay, config.grad_clip)
                    opt.step()
                    sched.step()
                    result.steps += 1
                    running += float(loss.detach())
                result.losses.append(running / len(batches))
                if eval_fn is not None:
                    result.evals.append(float(eval_fn(student)))
                if log is not None:
                    ev = f", eval {result.evals[-1]:.4f}" if eval_fn is not None else ""
                    log(f"distill epoch {epoch + 1}/{config.epochs}: loss "
                        f"{result.losses[-1]:.5f}{ev} ({time.perf_counter() - t0:.0f} s)")
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        student.to(home).eval()
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["HiddenDistillConfig", "HiddenDistillResult", "default_blocks", "hidden_distill",
           "teacher_targets", "to_device", "trainable"]
