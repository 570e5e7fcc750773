"""Distillation losses (SPEC D1, D2).

Response KD (Hinton et al. 2015)::

    L = (1 - α)·CE(y, p_s) + α·T²·KL(p_t(T) ‖ p_s(T)),   p(T) = softmax(z / T)

The soft-target cross-entropy form replaces the KL term by ``T²·(-Σ_i p_t,i(T)·log p_s,i(T))``.
The two differ by ``T²·H(p_t(T))``, the teacher's entropy, which does not depend on the student,
so their gradients with respect to the student's logits are identical (``T·(p_s(T) - p_t(T))``
per example, before averaging); ``tests/test_distill.py`` checks this numerically. Without labels
(``y`` is ``None``) only the distillation term is used.

For embedding models (outputs ``(B, T, H)`` or ``(B, H)`` that are not class logits) the response
loss is ``1 - cos(s, t)`` per token (masked by the attention mask) or the MSE.

Example:
    >>> import torch
    >>> from netpress.distill.losses import kd_loss
    >>> t = torch.tensor([[2.0, 0.0, -1.0]]); y = torch.tensor([0])
    >>> float(kd_loss(t, t, y, temperature=4.0, alpha=1.0))   # same logits: KL is 0
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from netpress.core.errors import ModelError


def check_compatible(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Teacher and student outputs must have the same shape to be compared.

    Raises:
        ModelError: the shapes differ (e.g. 10 vs 100 classes).
    """
    if student.shape != teacher.shape:
        raise ModelError("distillation outputs", got=f"student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}", expected="outputs of the same shape (same "
                         "classes / embedding size)",
                         fix="give the student the teacher's output layer size, or pick a "
                             "teacher trained on the same task")


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(p_t(T) ‖ p_s(T))``, mean over examples; logits ``(B, C)``."""
    t = temperature
    log_ps = F.log_softmax(student / t, dim=-1)  # (B, C)
    log_pt = F.log_softmax(teacher / t, dim=-1)  # (B, C)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * t * t


def soft_target_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·(-Σ p_t(T)·log p_s(T))``, mean over examples: the KL form plus ``T²·H(p_t)``."""
    t = temperature
    pt = F.softmax(teacher / t, dim=-1)  # (B, C)
    return -(pt * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * t * t


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
            temperature: float = 4.0, alpha: float = 0.7, form: str = "kl") -> torch.Tensor:
    """Response KD loss (see the module doc).

    Args:
        student: student logits ``(B, C)``.
        teacher: teacher logits ``(B, C)`` (no gradient needed).
        target: class labels ``(B,)`` or ``None`` (then ``α`` is taken as 1).
        temperature: ``T`` > 0.
        alpha: weight of the distillation term in [0, 1].
        form: ``"kl"`` or ``"soft_ce"`` (same gradient).

    Returns:
        Scalar loss.

    Raises:
        ModelError: incompatible shapes.
    """
    check_compatible(student, teacher)
    teacher = teacher.detach()
    soft = kd_kl(student, teacher, temperature) if form == "kl" else soft_target_ce(
        student, teacher, temperature)
    if target is None or alpha >= 1.0:
        return soft
    return (1.0 - alpha) * F.cross_entropy(student, target) + alpha * soft


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                   kind: str = "cosine") -> torch.Tensor:
    """``mean(1 - cos)`` over tokens (or examples), or the MSE, for embedding outputs.

    Args:
        student, teacher: ``(B, T, H)`` token embeddings or ``(B, H)``.
        mask: ``(B, T)`` attention mask (padding tokens excluded).
        kind: ``"cosine"`` or ``"mse"``.
    """
    check_compatible(student, teacher)
    teacher = teacher.detach()
    if kind == "mse":
        per = (student - teacher).pow(2).mean(-1)  # (B, T) or (B,)
    else:
        per = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # (B, T) or (B,)
    if mask is not None and per.dim() == 2:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp(min=1)
    return per.mean()


__all__ = ["check_compatible", "embedding_loss", "kd_kl", "kd_loss", "soft_target_ce"]
