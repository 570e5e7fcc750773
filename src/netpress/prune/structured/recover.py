"""Recovery of a structurally pruned CNN by distillation from the unpruned original.

After channel removal the pruned network is a *sub-network* of the original: every channel it
keeps is one of the original's, so its intermediate feature maps can be compared with the
original's directly on the kept channels — no adapter to learn. :func:`kd_recover` trains the
pruned model on

* the Hinton KD loss ``T² · KL(p_teacher(T) || p_student(T))`` on the logits, plus
* ``beta`` x the mean over the matched feature maps of the MSE between the student's feature and
  the teacher's on the kept channels, normalised by the teacher's feature energy,

with Adam and a cosine learning-rate schedule (linear warm-up), on fresh random-resized,
flipped views (:func:`random_views`) of the *training* source images drawn at every step (few
source photos give thousands of distinct views). :func:`kept_channels` finds which original
channels a pruned BatchNorm kept (its affine parameters are copied, not changed, by removal).

The module only needs ``torch`` (it also runs on a GPU machine without the rest of netpress).

Example:
    >>> import torch, torch.nn as nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    >>> images = [torch.randn(3, 40, 50)]
    >>> stats = kd_recover(student, teacher, images, steps=3, batch=4, res=16,
    ...                    features={"2": ("2", torch.arange(4))})
    >>> len(stats["loss"]), stats["steps"]
    (3, 3)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def random_views(images: Sequence[torch.Tensor], n: int, res: int, gen: torch.Generator,
                 scale: tuple[float, float] = (0.1, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` random-resized crops (area fraction in ``scale``, log-uniform aspect in ``ratio``,
    random position, horizontal flip half the time) of ``images`` (each ``(C, H, W)``, already
    normalised), resized to ``res`` x ``res`` with antialiasing. Returns ``(n, C, res, res)``.

    Example:
        >>> views = random_views([torch.zeros(3, 30, 40)], 2, 8, torch.Generator().manual_seed(0))
        >>> tuple(views.shape)
        (2, 3, 8, 8)
    """
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        hh, ww = img.shape[-2:]
        area = float(torch.empty(1).uniform_(*scale, generator=gen)) * hh * ww
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                         generator=gen)))
        h = max(1, min(hh, round(math.sqrt(area / aspect))))
        w = max(1, min(ww, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, hh - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, ww - w + 1, (1,), generator=gen))
        crop = img[None, :, top:top + h, left:left + w]
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out.append(F.interpolate(crop.float(), size=(res, res), mode="bilinear",
                                 align_corners=False, antialias=True))
    return torch.cat(out)


def mix_views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mixup (half of the time) or CutMix of a batch of views with a shuffled copy of itself,
    mixing weight uniform in [0, 1]: new images whose teacher outputs spread over more classes.

    Example:
        >>> mix_views(torch.zeros(4, 3, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 8, 8])
    """
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    lam = float(torch.rand(1, generator=gen))
    if float(torch.rand(1, generator=gen)) < 0.5:
        return lam * x + (1 - lam) * x[perm]
    h, w = x.shape[-2:]
    ch, cw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    out = x.clone()
    out[..., top:top + ch, left:left + cw] = x[perm][..., top:top + ch, left:left + cw]
    return out


def kept_channels(original: nn.Module, pruned: nn.Module) -> torch.Tensor:
    """Indices of the original BatchNorm's channels that the pruned one kept.

    Channel removal copies the kept channels' ``weight`` / ``bias``; they are matched exactly.

    Raises:
        ValueError: a pruned channel matches no original channel, or several (ambiguous).

    Example:
        >>> a = nn.BatchNorm2d(4)
        >>> with torch.no_grad():
        ...     _ = a.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> b = nn.BatchNorm2d(2)
        >>> with torch.no_grad():
        ...     _ = b.weight.copy_(torch.tensor([2.0, 4.0]))
        >>> kept_channels(a, b).tolist()
        [1, 3]
    """
    def params(m: nn.Module) -> torch.Tensor:
        w = m.weight.detach().float() if getattr(m, "weight", None) is not None else None
        b = m.bias.detach().float() if getattr(m, "bias", None) is not None else None
        cols = [t for t in (w, b) if t is not None]
        if not cols:
            raise ValueError(f"{type(m).__name__} has no affine parameters to match")
        return torch.stack(cols, 1)  # (C, 1 or 2)

    a, b = params(original), params(pruned)
    if a.shape == b.shape and bool((a == b).all()):
        return torch.arange(a.shape[0])  # nothing removed
    eq = (b[:, None, :] == a[None, :, :]).all(-1)  # (C_pruned, C_original)
    hits = eq.sum(1)
    if bool((hits != 1).any()):
        bad = int((hits != 1).nonzero()[0])
        raise ValueError(f"pruned channel {bad} matches {int(hits[bad])} original channels "
                         "(expected exactly one: was the pruned model trained already?)")
    return eq.float().argmax(1)


def _taps(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    store: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = []
    for n in names:
        if n not in mods:
            raise ValueError(f"no module named {n!r} to match features at")

        def hook(_m: nn.Module, _a: Any, out: torch.Tensor, key: str = n) -> None:
            store[key] = out
        handles.append(mods[n].register_forward_hook(hook))
    return store, handles


def kd_recover(student: nn.Module, teacher: nn.Module, images: Sequence[torch.Tensor], *,
               steps: int, batch: int = 32, res: int = 128, lr: float = 1e-3,
               temperature: float = 1.0, beta: float = 1.0,
               features: dict[str, tuple[str, torch.Tensor]] | None = None,
               warmup: int = 50, weight_decay: float = 0.0, seed: int = 0,
               scale: tuple[float, float] = (0.1, 1.0), mix: bool = False,
               device: str = "cpu", max_seconds: float | None = None,
               log_every: int = 0) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (in place) on fresh views of ``images`` every step.

    Args:
        student: the pruned model (trained; BatchNorm in train mode during the run).
        teacher: the original (frozen, eval mode).
        images: training source images ``(C, H, W)``, normalised as the model expects.
        steps, batch, res: optimisation steps, views per step, side of the views.
        lr, warmup, weight_decay: Adam(W) peak learning rate, linear warm-up steps, then cosine
            decay to zero.
        temperature: KD temperature (the loss is scaled by ``T²``).
        beta: weight of the feature term.
        features: ``{student module: (teacher module, kept teacher channel indices)}``: the
            student's output is matched with the teacher's output on those channels.
        seed: views and their order.
        scale: area fraction range of the views.
        mix: Mixup / CutMix the views of each step (:func:`mix_views`).
        device: where to train (the models are moved there and back to the CPU).
        max_seconds: time budget: after 3 steps, ``steps`` is lowered to what fits (the
            schedule follows the lowered count; ``"steps"`` in the result says how many ran).
        log_every: print the mean loss every this many steps (0: quiet).

    Returns:
        ``{"steps", "seconds", "loss": per-step total loss, "kd": last KD term, "feat": last
        feature term}``.
    """
    features = features or {}
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    teacher_was = teacher.training
    teacher = teacher.to(dev).eval()
    student = student.to(dev).train()
    frozen = [(p, p.requires_grad) for p in teacher.parameters()]
    for p, _ in frozen:  # restored at the end: the caller's model keeps its trainable flags
        p.requires_grad_(False)
    s_store, s_handles = _taps(student, list(features))
    t_store, t_handles = _taps(teacher, [t for t, _ in features.values()])
    idx = {k: i.to(dev) for k, (_, i) in features.items()}
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)

    total = [steps]
    warmup = min(warmup, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total[0] - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    kd_v = feat_v = 0.0
    t0 = time.perf_counter()
    try:
        step = 0
        while step < total[0]:
            if max_seconds is not None and step == 3:
                per = (time.perf_counter() - t0) / 3
                total[0] = max(4, min(steps, int(max_seconds / per)))
            x = random_views(images, batch, res, gen, scale).to(dev)
            if mix:
                x = mix_views(x, gen)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / temperature, 1),
                          F.log_softmax(t_logits / temperature, 1), log_target=True,
                          reduction="batchmean") * temperature ** 2
            feat = torch.zeros((), device=dev)
            for s_name, (t_name, _) in features.items():
                t_f = t_store[t_name].index_select(1, idx[s_name])
                feat = feat + (s_store[s_name] - t_f).pow(2).mean() / t_f.pow(2).mean().clamp_min(
                    1e-8)
            if features:
                feat = feat / len(features)
            loss = kd + beta * feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            kd_v, feat_v = float(kd.detach()), float(feat.detach())
            if log_every and step % log_every == 0:
                print(f"step {step}: loss {sum(losses[-log_every:]) / log_every:.4f} "
                      f"(kd {kd_v:.4f}, feat {feat_v:.4f}) {time.perf_counter() - t0:.0f} s",
                      flush=True)
    finally:
        for h in s_handles + t_handles:
            h.remove()
        student.to("cpu").eval()
        teacher.to("cpu").train(teacher_was)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {"steps": total[0], "seconds": time.perf_counter() - t0, "loss": losses, "kd": kd_v,
            "feat": feat_v}


def feature_errors(student: nn.Module, teacher: nn.Module,
                   features: dict[str, tuple[str, torch.Tensor]], x: torch.Tensor
                   ) -> dict[str, float]:
    """Per matched feature map, ``||s - t[:, kept]||² / ||t[:, kept]||²`` on inputs ``x`` (eval
    mode, no gradient): where along the network the pruned model departs from the original.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
        >>> feature_errors(net, net, {"0": ("0", torch.arange(4))}, torch.randn(2, 3, 4, 4))
        {'0': 0.0}
    """
    s_store, s_handles = _taps(student, list(features))
    t_store, t_handles = _taps(teacher, [t for t, _ in features.values()])
    was_s, was_t = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            student(x)
            teacher(x)
    finally:
        for h in s_handles + t_handles:
            h.remove()
        student.train(was_s)
        teacher.train(was_t)
    out = {}
    for s_name, (t_name, idx) in features.items():
        t_f = t_store[t_name].index_select(1, idx.to(t_store[t_name].device))
        out[s_name] = float((s_store[s_name] - t_f).pow(2).sum() / t_f.pow(2).sum().clamp_min(
            1e-12))
    return out


def mobilenet_feature_map(original: nn.Module, pruned: nn.Module,
                          blocks: Sequence[int] | None = None
                          ) -> dict[str, tuple[str, torch.Tensor]]:
    """Feature pairs of a pruned torchvision MobileNetV2 for :func:`kd_recover`: the output of
    ``features[i]`` (``blocks``; default every block) matched on its kept channels, found from
    the block's last BatchNorm.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.mobilenet_v2(num_classes=10)
        >>> {k: len(i) for k, (_, i) in mobilenet_feature_map(net, net, [1, 18]).items()}
        {'features.1': 16, 'features.18': 1280}
    """
    out: dict[str, tuple[str, torch.Tensor]] = {}
    o_mods, p_mods = dict(original.named_modules()), dict(pruned.named_modules())
    n_blocks = len(original.features)  # type: ignore[arg-type]
    for i in (range(n_blocks) if blocks is None else blocks):
        name = f"features.{i}"
        norms = [n for n, m in o_mods[name].named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        last = f"{name}.{norms[-1]}"
        out[name] = (name, kept_channels(o_mods[last], p_mods[last]))
    return out


__all__ = ["feature_errors", "kd_recover", "kept_channels", "mix_views", "mobilenet_feature_map",
           "random_views"]
