"""The ``distill`` stage (SPEC D1-D4): response KD and FitNets feature KD through the shared loop.

Recipe spelling::

    - distill: {method: kd, teacher: original, temperature: 4, alpha: 0.7, epochs: 2}
    - distill: {method: feature_kd, features: [["2", "3"]], beta: 1.0, student: {derive: {width: 0.5}}}

The stage's input model is the student (D4: after pruning or quantization it recovers from the
original model, ``teacher: original``); with ``student: {derive: ...}`` a narrower / shallower fresh
student is derived from it instead, and with ``student: {model: my_student.pt2}`` your own student
is trained (D3; the run's artifact then rebuilds that student). Pruned weights stay zero while
training (``keep_sparsity``).
Classification outputs use the Hinton loss; embedding outputs (task ``embedding``) use
``1 - cosine`` per token (or MSE). Training runs through :func:`netpress.train.fine_tune` (DDP and
checkpoints included).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.distill import distill
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(256, 8); y = (X[:, 0] > 0).long()
    >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> student, result = distill(student, teacher, (X, y), {"method": "kd", "epochs": 3, "lr": 0.01})
    >>> result.losses[-1] < result.losses[0]
    True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch, as_batches
from netpress.core.errors import DataError, RecipeError
from netpress.distill.augment import AugmentConfig, Mix, augment_batch, mixed_ce
from netpress.distill.features import FeatureTaps, build_adapters, hint_loss
from netpress.distill.losses import embedding_loss, kd_loss
from netpress.distill.student import StudentConfig, derive_student
from netpress.measure.metrics import first_tensor
from netpress.train.callbacks import KeepSparsity
from netpress.train.loop import TrainConfig, TrainResult, fine_tune


class DistillConfig(TechniqueConfig):
    """Config of ``distill: {method: kd | feature_kd}``.

    Attributes:
        teacher: ``original`` (the uncompressed model; D4) or ``input`` (a frozen copy of the
            stage's input model, e.g. to distil it into a derived student).
        temperature: ``T`` of the softened distributions.
        alpha: weight of the distillation term (``1 - alpha`` on the label cross-entropy).
        form: ``kl`` or ``soft_ce`` (soft-target cross-entropy; same gradient).
        loss: ``auto`` (Hinton KD for classification, cosine for embeddings), ``kd``, ``cosine``, ``mse``.
        features: ``[[student_layer, teacher_layer], ...]`` for ``feature_kd``.
        beta: weight of the hint (feature) loss.
        adapter: allow learned 1x1 conv / linear adapters between mismatched features.
        student: ``{derive: {width, depth}}`` to derive a student instead of using the input model,
            or ``{model: zoo:NAME | path.pt2}`` to train your own (:class:`StudentConfig`).
        keep_sparsity: keep weights that are zero at the start at zero (recovery after pruning).
        data: ``train`` (the data's fine-tuning split) or ``calibration``.
        augment: input augmentation (shift / noise / mixup / affine warps of images; see
            :mod:`netpress.distill.augment`): teacher and student see the same perturbed batch.
        epochs, lr, optimizer, weight_decay, max_steps, seed: the training run.
        checkpoint_dir, checkpoint_every: resumable training (see :class:`TrainConfig`).
        device: where teacher and student train (``cpu``, ``cuda``, ``cuda:N``, ``auto``; see
            :class:`TrainConfig`); the student comes back on the CPU.
    """

    method: Literal["kd", "feature_kd"] = "kd"
    teacher: Literal["original", "input"] = "original"
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.7, ge=0, le=1)
    form: Literal["kl", "soft_ce"] = "kl"
    loss: Literal["auto", "kd", "cosine", "mse"] = "auto"
    features: list[tuple[str, str]] = Field(default_factory=list)
    beta: float = Field(default=1.0, ge=0)
    adapter: bool = True
    student: StudentConfig | None = None
    keep_sparsity: bool = True
    data: Literal["train", "calibration"] = "train"
    augment: AugmentConfig | None = None
    epochs: int = Field(default=2, ge=0, le=10_000)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$")

    @model_validator(mode="after")
    def _features_match_method(self) -> DistillConfig:
        if self.method == "feature_kd" and not self.features:
            raise ValueError("feature_kd needs `features: [[student_layer, teacher_layer], ...]`")
        if self.method == "kd" and self.features:
            raise ValueError("`features` needs method: feature_kd")
        return self

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer,
                           weight_decay=self.weight_decay, max_steps=self.max_steps,
                           seed=self.seed, checkpoint_dir=self.checkpoint_dir,
                           checkpoint_every=self.checkpoint_every, device=self.device)


def _loss_kind(config: DistillConfig, out: torch.Tensor, task: str | None) -> str:
    if config.loss != "auto":
        return config.loss
    if task == "embedding" or out.dim() != 2:
        return "cosine"
    return "kd"


def _response(kind: str, config: DistillConfig, s: torch.Tensor, t: torch.Tensor,
              batch: Batch, mix: Mix | None = None) -> torch.Tensor:
    if kind == "kd":
        if mix is None or batch.target is None or config.alpha >= 1.0:
            return kd_loss(s, t, batch.target, config.temperature, config.alpha, config.form)
        soft = kd_loss(s, t, None, config.temperature, 1.0, config.form)
        return (1.0 - config.alpha) * mixed_ce(s, batch.target, mix) + config.alpha * soft
    return embedding_loss(s, t, batch.mask, kind)


def distill(student: nn.Module, teacher: nn.Module, data: Any,
            config: DistillConfig | dict[str, Any] | None = None, *, task: str | None = None,
            callbacks: tuple[Any, ...] = (),
            train: TrainConfig | None = None) -> tuple[nn.Module, TrainResult]:
    """Train ``student`` to imitate ``teacher`` on ``data`` (in place; also returned).

    Args:
        student: the model trained (a user-given smaller model, a pruned / quantized model).
        teacher: frozen reference; its outputs must have the student's shape.
        data: training batches (anything :func:`netpress.core.data.as_batches` accepts).
        config: :class:`DistillConfig` or its dict (``student`` derivation is not applied here).
        task: ``classification`` or ``embedding`` (``None``: guessed from the output shape).
        callbacks: extra fine-tuning callbacks.
        train: the training run's settings (default: ``config``'s epochs, lr, ...); QAT with
            ``distill`` passes its own ``finetune`` here.

    Returns:
        ``(student, TrainResult)``.

    Raises:
        ModelError: incompatible teacher / student outputs, or feature shapes that cannot be adapted.
        RecipeError: bad config, unknown feature layer names, mismatched features with ``adapter: false``.
        DataError: no data.
    """
    if not isinstance(config, DistillConfig):
        config = DistillConfig.from_dict({"method": "kd", **(config or {})}, "distill")
    batches = as_batches(data, where="distillation data")
    was_training, flags = teacher.training, [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        return _distill(student, teacher, batches, config, task, callbacks, train)
    finally:  # the teacher is the caller's model (often the original): leave it as it was
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _frozen_weights_warning(student: nn.Module) -> None:
    trainable = [p for p in student.parameters() if p.requires_grad]
    if trainable and not any(p.dim() >= 2 for p in trainable):
        warnings.warn("distill: the student has no trainable weight matrix (its layers hold "
                      "frozen quantized codes), so only biases and norms train. To distill "
                      "through quantization, use quantize: {method: qat, distill: {...}} "
                      "(the original model teaches the fake-quantized one).", stacklevel=3)


def _distill(student: nn.Module, teacher: nn.Module, batches: list[Batch], config: DistillConfig,
             task: str | None, callbacks: tuple[Any, ...],
             train: TrainConfig | None) -> tuple[nn.Module, TrainResult]:
    _frozen_weights_warning(student)
    cbs = list(callbacks)
    if config.keep_sparsity:
        cbs.append(KeepSparsity(student))
    probe = batches[0].slice(2)
    with torch.no_grad():
        was = student.training
        student.eval()
        s_out, t_out = first_tensor(probe.run(student)), first_tensor(probe.run(teacher))
        student.train(was)
    kind = _loss_kind(config, t_out, task)
    _response(kind, config, s_out, t_out, probe)  # raises on incompatible outputs
    with FeatureTaps(student, teacher, config.features) as taps:
        adapters = nn.ModuleList()
        if config.features:
            with torch.no_grad():
                probe.run(student)
                probe.run(teacher)
            adapters = build_adapters(taps, config.adapter)

        gen = torch.Generator().manual_seed(config.seed)
        aug = config.augment

        def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
            mix = None
            if aug is not None and aug.active:
                batch, mix = augment_batch(batch, aug, gen)
            with torch.no_grad():
                t = first_tensor(batch.run(teacher))
            s = first_tensor(batch.run(model))
            loss = _response(kind, config, s, t, batch, mix)
            if config.features:
                loss = loss + config.beta * hint_loss(taps, adapters)
            return loss

        params = [*student.parameters(), *adapters.parameters()]
        result = fine_tune(student, batches, train or config.train_config(), loss_fn, cbs,
                           params=params, companions=[teacher])
    return student.eval(), result


def stage_teacher(kind: str, model: nn.Module, ctx: StageContext, where: str, fix: str
                  ) -> nn.Module:
    """The teacher a stage names: ``original`` (the run's uncompressed model, ``ctx.original``)
    or ``input`` (a copy of the model the stage received). Shared by ``distill`` and QAT's
    ``distill`` block.

    Raises:
        RecipeError: ``original`` where the run has no original model (``where`` / ``fix``).
    """
    if kind == "input":
        return copy.deepcopy(model)
    if ctx.original is None:
        raise RecipeError(where, got="original", expected="a run with an original model", fix=fix)
    return ctx.original


@register("distill", "kd", DistillConfig, summary="response KD: (1-a)*CE + a*T^2*KL(p_t(T)||p_s(T)) "
          "from the original model (or cosine for embeddings); D4 recovery or a derived student")
@register("distill", "feature_kd", DistillConfig,
          summary="FitNets hints: MSE of named student/teacher features via learned 1x1 adapters, plus KD")
def distill_stage(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Registered handler of the ``distill`` stage (see the module doc)."""
    assert isinstance(config, DistillConfig)
    advanced = ctx.advanced if isinstance(ctx.advanced, dict) else {}
    data = advanced.get("train") if config.data == "train" else None
    data = data or ctx.data
    if not data:
        raise DataError("distill stage", got="no training data", expected="fine-tuning batches",
                        fix="use a zoo data set with a train split, or pass data")
    teacher = stage_teacher(config.teacher, model, ctx, "distill.teacher",
                            fix="use teacher: input, or the Python API distill()")
    student = model
    if config.student is not None and config.student.model is not None:
        from netpress.pipeline import resolve_model

        student, source = resolve_model(config.student.model)
        ctx.report["student_source"] = source  # the artifact rebuilds this model, not the input
        ctx.report["student_params"] = sum(p.numel() for p in student.parameters())
    elif config.student is not None and config.student.derive is not None:
        d = config.student.derive
        student = derive_student(model, d.width, d.depth, d.seed)
        ctx.report["student_params"] = sum(p.numel() for p in student.parameters())
    student, result = distill(student, teacher, data, config, task=advanced.get("task"))
    ctx.report.update(steps=result.steps, losses=[round(v, 5) for v in result.losses])
    return student


__all__ = ["DistillConfig", "distill", "distill_stage", "stage_teacher"]
