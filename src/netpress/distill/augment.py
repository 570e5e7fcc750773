"""Input augmentation for distillation and its label-only baseline: ``augment: {shift, noise, mixup,
rotate, scale, translate}``.

KD transfers the teacher's *function*; showing the student the teacher's answers on perturbed inputs
(shifted, noisy, mixed examples) transfers more of it than the training points alone (Beyer et al.
2022, "function matching"). The label-only baseline gets the very same augmentation (mixup with
mixed labels), so a comparison stays fair.

* ``shift``: circular shift by a uniform integer in ``[-shift, shift]`` along the last axis (1-D
  signals) or each of the last two (images), one draw per batch.
* ``rotate`` / ``scale`` / ``translate`` (images only): a random affine warp per example, angle
  uniform in ``[-rotate, rotate]`` degrees, zoom in ``[1-scale, 1+scale]``, sub-pixel offset in
  ``[-translate, translate]`` pixels along each axis (bilinear, zero outside the image).
* ``noise``: Gaussian noise of ``noise`` times the batch's standard deviation.
* ``mixup``: convex mixes ``λ·x + (1-λ)·x[perm]``, ``λ ~ Beta(mixup, mixup)`` per example;
  the label term then uses ``λ·CE(y) + (1-λ)·CE(y[perm])``.

Only batches with one floating-point positional input are augmented (token ids cannot be).

Example:
    >>> import torch
    >>> from netpress.core.data import Batch
    >>> from netpress.distill.augment import AugmentConfig, augment_batch
    >>> b = Batch((torch.arange(8.0).reshape(2, 1, 4),), torch.tensor([0, 1]))
    >>> out, mix = augment_batch(b, AugmentConfig(shift=1), torch.Generator().manual_seed(0))
    >>> out.inputs[0].shape, mix is None
    (torch.Size([2, 1, 4]), True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.data import Batch
from netpress.core.errors import DataError

Mix = tuple[torch.Tensor, torch.Tensor]  # (λ (B,), permutation (B,))


class AugmentConfig(BaseModel):
    """``augment: {shift: 3, noise: 0.05, mixup: 1.0}`` (all off by default)."""

    model_config = ConfigDict(extra="forbid")

    shift: int = Field(default=0, ge=0, le=1000)
    noise: float = Field(default=0.0, ge=0, le=10)
    mixup: float = Field(default=0.0, ge=0, le=100)
    rotate: float = Field(default=0.0, ge=0, le=180)
    scale: float = Field(default=0.0, ge=0, lt=1)
    translate: float = Field(default=0.0, ge=0, le=1000)

    @property
    def active(self) -> bool:
        return bool(self.shift or self.noise or self.mixup or self.warps)

    @property
    def warps(self) -> bool:
        return bool(self.rotate or self.scale or self.translate)


def _warp(x: torch.Tensor, config: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """A random affine warp per example of an image batch ``(B, C, H, W)``."""
    if x.dim() != 4:
        raise DataError("distill.augment", got=f"inputs of shape {tuple(x.shape)} with rotate / "
                        "scale / translate", expected="image batches (B, C, H, W)",
                        fix="use shift / noise / mixup for non-image data")
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * bound

    angle = torch.deg2rad(uniform(config.rotate))
    zoom = 1.0 + uniform(config.scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]: a pixel is 2/W (2/H) wide
    tx, ty = uniform(config.translate) * 2 / w, uniform(config.translate) * 2 / h
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(batch: Batch, config: AugmentConfig,
                  gen: torch.Generator) -> tuple[Batch, Mix | None]:
    """The augmented batch and, with mixup, ``(λ, perm)`` for the label term.

    Raises:
        DataError: the batch has keyword or integer inputs (e.g. token ids).
    """
    if not config.active:
        return batch, None
    if isinstance(batch.inputs, dict) or len(batch.inputs) != 1 or \
            not batch.inputs[0].is_floating_point():
        raise DataError("distill.augment", got="token / keyword / multi-input batches",
                        expected="one floating-point input tensor (signals, images)",
                        fix="drop the augment block for this data")
    x = batch.inputs[0]
    if config.shift:
        dims = (-1,) if x.dim() <= 3 else (-2, -1)
        s = torch.randint(-config.shift, config.shift + 1, (len(dims),), generator=gen).tolist()
        x = torch.roll(x, tuple(s), dims=dims)
    if config.warps:
        x = _warp(x, config, gen)
    if config.noise:
        x = x + config.noise * x.std() * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    mix = None
    if config.mixup:
        n = x.shape[0]
        beta = torch.distributions.Beta(config.mixup, config.mixup)
        lam = beta.sample((n,)).to(x.device, x.dtype)  # (B,) (Beta sampling uses the global RNG)
        perm = torch.randperm(n, generator=gen).to(x.device)
        view = (n,) + (1,) * (x.dim() - 1)
        x = lam.view(view) * x + (1 - lam.view(view)) * x[perm]
        mix = (lam, perm)
    return Batch((x,), batch.target), mix


def mixed_ce(logits: torch.Tensor, target: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """Cross-entropy against ``target``, or its mixup form ``λ·CE(y) + (1-λ)·CE(y[perm])``."""
    if mix is None:
        return F.cross_entropy(logits, target)
    lam, perm = mix
    ce = F.cross_entropy(logits, target, reduction="none")
    ce_p = F.cross_entropy(logits, target[perm], reduction="none")
    return (lam * ce + (1 - lam) * ce_p).mean()


def augmented_ce(config: AugmentConfig | dict, seed: int = 0) -> Callable[[nn.Module, Batch],
                                                                         torch.Tensor]:
    """A ``loss_fn`` for :func:`netpress.train.fine_tune`: cross-entropy on augmented batches (the
    label-only baseline of an augmented distillation).

    Example:
        >>> import torch, torch.nn as nn
        >>> from netpress.core.data import Batch
        >>> loss_fn = augmented_ce({"noise": 0.1, "mixup": 1.0})
        >>> b = Batch((torch.randn(4, 6),), torch.tensor([0, 1, 0, 1]))
        >>> float(loss_fn(nn.Linear(6, 2), b)) > 0
        True
    """
    cfg = config if isinstance(config, AugmentConfig) else AugmentConfig(**config)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.target is None:
            raise DataError("augmented fine-tuning", got="batches without labels",
                            expected="(inputs, labels) batches", fix="pass labelled data")
        b, mix = augment_batch(batch, cfg, gen)
        return mixed_ce(b.run(model), b.target, mix)

    return loss_fn


__all__ = ["AugmentConfig", "augment_batch", "augmented_ce", "mixed_ce"]
