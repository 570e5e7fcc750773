"""Block reconstruction (BRECQ) with QDrop for static W8A8 PTQ (``rounding: brecq``).

Layer-wise AdaRound (:mod:`netpress.quantize.adaround`) fits every layer to its own float output,
so the errors of a deep network's layers add up. BRECQ (Li et al. 2021) reconstructs a whole
*block* at a time (a MobileNetV2 inverted-residual block: expand, depthwise, project, residual
Add): the rounding of all the block's weights is learned jointly so that the block's output, fed
the *quantized* model's block input, matches the *float* model's block output on its float
input::

    loss = mean_{examples, positions} Σ_channels (B~(x_q) - B(x_f))²  +  λ Σ (1 - |2 h(V) - 1|^β)

with ``h(V)`` AdaRound's rectified sigmoid (β annealed 20 -> 2 after a warm-up), and, with
``learn_act``, the step size of every activation quantizer in the block (layer inputs, and the
outputs that feed a residual Add) learned too (LSQ-style straight-through gradients, a log
parametrisation ``s = s0 · exp(u)``). QDrop (Wei et al. 2022): during reconstruction each
activation quantizer is bypassed element-wise with probability ``qdrop`` and the block input is
the float model's value with the same probability, which gives flatter solutions that generalise
beyond the calibration set.

Units: the children of the ``nn.Sequential`` that holds the targeted layers in the most children
(MobileNetV2's ``features``); every targeted layer outside it (the classifier) is a unit on its
own. Units are visited in execution order; the inputs of consecutive children are pushed through
the already reconstructed (hard-rounded) quantized block, so each unit sees the quantized model's
real input. To keep the cost bounded on a CPU, each Adam step uses ``batch`` random calibration
examples and, for feature maps larger than ``patch``, one random ``patch x patch`` window of
them (a convolution block is translation-equivariant; the float target is computed on the same
window, so border effects are shared by both sides).

The result is ordinary int8 codes in ``qweight`` and float32 activation scales in the W8A8
layers' buffers, so the QDQ ONNX export and reload are unchanged.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.ptq import W8A8Conv2d
    >>> torch.manual_seed(0) and None
    >>> f = nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU6()),
    ...                   nn.Sequential(nn.Conv2d(8, 4, 1)))
    >>> q = nn.Sequential(nn.Sequential(W8A8Conv2d.from_float(f[0][0], 8 / 255, 128), nn.ReLU6()),
    ...                   nn.Sequential(W8A8Conv2d.from_float(f[1][0], 6 / 255, 0)))
    >>> rep = brecq(f, q, torch.randn(16, 4, 8, 8), iters=50, batch=8)
    >>> sorted(rep), q[0][0].qweight.dtype
    (['0', '1'], torch.int8)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from netpress.core.errors import ModelError
from netpress.nn.ptq import _W8A8, W8A8Conv2d, W8A8Linear

ZETA, GAMMA = 1.1, -0.1


class _Stop(Exception):
    """Raised by a capture hook once the unit's input is seen."""


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _fq_ste(x: torch.Tensor, s: torch.Tensor, z: float, lo: int, hi: int) -> torch.Tensor:
    """Fake quantization with a straight-through round (LSQ gradient to ``s`` and ``x``)."""
    v = x / s
    r = v + (torch.round(v) - v).detach()
    return (torch.clamp(r + z, lo, hi) - z) * s


def find_units(qmodel: nn.Module, layers: list[str]) -> tuple[list[str], str | None]:
    """Reconstruction units of ``qmodel`` for the W8A8 ``layers`` (see the module doc).

    Returns:
        ``(unit names, prefix of the block Sequential or None)``, units not yet in run order.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
        >>> find_units(net, ["0.0", "1.0"])
        (['0', '1'], '')
    """
    best: tuple[int, str] | None = None
    for prefix, mod in qmodel.named_modules():
        if not isinstance(mod, nn.Sequential) or len(mod) < 2:
            continue
        head = f"{prefix}." if prefix else ""
        kids = {n[len(head):].split(".")[0] for n in layers
                if n.startswith(head) and "." in n[len(head):]}
        if len(kids) >= 2 and (best is None or len(kids) > best[0]):
            best = (len(kids), prefix)
    units: list[str] = []
    if best is not None:
        head = f"{best[1]}." if best[1] else ""
        for child, _ in qmodel.get_submodule(best[1]).named_children():
            name = head + child
            if any(n.startswith(name + ".") for n in layers):
                units.append(name)
    covered = tuple(u + "." for u in units)
    units += [n for n in layers if not n.startswith(covered)]
    return units, None if best is None else best[1]


def _run_order(model: nn.Module, units: list[str], x: torch.Tensor) -> list[str]:
    mods = dict(model.named_modules())
    order: list[str] = []
    hooks = [mods[u].register_forward_pre_hook(
        lambda _m, _a, u=u: order.append(u) if u not in order else None) for u in units]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return order + [u for u in units if u not in order]


@torch.no_grad()
def _capture(model: nn.Module, unit: str, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Input of ``model``'s module ``unit`` for every example of ``x``."""
    mod = model.get_submodule(unit)
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise ModelError(unit, got=f"{len(args)} positional inputs",
                             expected="one tensor input per reconstruction unit",
                             fix="use rounding: adaround for this model")
        got.append(args[0].detach().float().clone())
        raise _Stop

    h = mod.register_forward_pre_hook(pre)
    try:
        for i in range(0, len(x), chunk):
            try:
                model(x[i:i + chunk])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(got)


@torch.no_grad()
def _forward(mod: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([mod(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


class _Soft:
    """The learnable state of one W8A8 layer during reconstruction."""

    def __init__(self, mod: _W8A8, weight: torch.Tensor, qmax: int, learn_act: bool) -> None:
        self.mod, self.qmax = mod, qmax
        w = weight.detach().float()
        view = [-1] + [1] * (w.dim() - 1) if mod.per_channel else []
        self.s_w = mod.weight_scale.detach().float().reshape(view)
        self.base = torch.floor(w / self.s_w)
        frac = (w / self.s_w - self.base).clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)
        self.rtn = torch.clamp(torch.round(w / self.s_w), -qmax, qmax)
        self.s_in0 = float(mod.input_scale)
        self.u_in = torch.zeros((), requires_grad=learn_act)
        self.s_out0 = float(mod.output_scale) if mod.quantize_output else 1.0
        self.u_out = torch.zeros((), requires_grad=learn_act and mod.quantize_output)
        self.drop = 0.0
        self.hard = False

    def act_params(self) -> list[torch.Tensor]:
        return [p for p in (self.u_in, self.u_out) if p.requires_grad]

    def weight(self) -> torch.Tensor:
        h = (self.v >= 0).float() if self.hard else _h(self.v)
        return self.s_w * torch.clamp(self.base + h, -self.qmax, self.qmax)

    def _quant(self, x: torch.Tensor, s: torch.Tensor, z: float, qr: tuple[int, int]
               ) -> torch.Tensor:
        xq = _fq_ste(x, s, z, *qr)
        if self.drop > 0:
            xq = torch.where(torch.rand_like(x) < self.drop, x, xq)
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mod
        xq = self._quant(x, self.s_in0 * torch.exp(self.u_in), float(m.input_zero_point),
                         m.act_qrange)
        y = m._op(xq, self.weight())
        if m.bias is not None:
            y = y + m.bias.detach().reshape(m._channel_view(y))
        if m.quantize_output:
            y = self._quant(y, self.s_out0 * torch.exp(self.u_out), float(m.output_zero_point),
                            m.out_qrange)
        return y

    @torch.no_grad()
    def commit(self) -> dict[str, float]:
        """Write the hard codes and the learned scales into the W8A8 layer."""
        m = self.mod
        codes = torch.clamp(self.base + (self.v >= 0).float(), -self.qmax, self.qmax)
        m.qweight.copy_(codes.reshape(m.qweight.shape).to(torch.int8))
        s_in = self.s_in0 * math.exp(float(self.u_in))
        m.input_scale.fill_(s_in)
        info = {"flipped": float((codes != self.rtn).float().mean()),
                "input_scale_ratio": s_in / self.s_in0}
        if m.quantize_output:
            s_out = self.s_out0 * math.exp(float(self.u_out))
            m.output_scale.fill_(s_out)
            info["output_scale_ratio"] = s_out / self.s_out0
        return info


@contextmanager
def _installed(softs: list[_Soft]) -> Iterator[None]:
    """Route the layers' forwards through their :class:`_Soft` state."""
    for s in softs:
        s.mod.forward = s.forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for s in softs:
            del s.mod.forward


def _window(x: torch.Tensor, patch: int, gen: torch.Generator) -> tuple[slice, slice] | None:
    if x.dim() != 4 or (x.shape[2] <= patch and x.shape[3] <= patch):
        return None
    h, w = x.shape[2], x.shape[3]
    ph, pw = min(patch, h), min(patch, w)
    i = int(torch.randint(0, (h - ph) // 4 + 1, (1,), generator=gen)) * 4
    j = int(torch.randint(0, (w - pw) // 4 + 1, (1,), generator=gen)) * 4
    return slice(i, i + ph), slice(j, j + pw)


def reconstruct_unit(funit: nn.Module, qunit: nn.Module, softs: list[_Soft], xq: torch.Tensor,
                     xf: torch.Tensor, iters: int, batch: int, patch: int, lr: float,
                     act_lr: float, reg: float, qdrop: float, warmup: float,
                     beta: tuple[float, float], gen: torch.Generator) -> dict[str, float]:
    """Learn the rounding (and activation scales) of one unit's layers (see the module doc).

    Returns:
        ``{"loss_before", "loss_after"}``: the reconstruction loss of round-to-nearest with the
        initial scales and of the result, on one fixed evaluation draw (no QDrop).
    """
    n = len(xq)
    opt = torch.optim.Adam([s.v for s in softs], lr=lr)
    acts = [p for s in softs for p in s.act_params()]
    opt_a = torch.optim.Adam(acts, lr=act_lr) if acts else None
    start = int(warmup * iters)
    eval_gen = torch.Generator().manual_seed(1234)
    eval_idx = torch.randperm(n, generator=eval_gen)[:min(n, 4 * batch)]
    eval_win = _window(xq, patch, eval_gen)

    def crop(t: torch.Tensor, idx: torch.Tensor, win: tuple[slice, slice] | None) -> torch.Tensor:
        t = t[idx]
        return t if win is None else t[:, :, win[0], win[1]]

    @torch.no_grad()
    def measure(rtn: bool) -> float:
        for s in softs:
            s.drop, s.hard = 0.0, True
        saved = [s.v.detach().clone() for s in softs] if rtn else []
        if rtn:
            for s in softs:
                s.v.data = torch.where(s.rtn > s.base, 1.0, -1.0)
        xe, fe = crop(xq, eval_idx, eval_win), crop(xf, eval_idx, eval_win)
        tot = 0.0
        for i in range(0, len(xe), batch):
            d = qunit(xe[i:i + batch]) - funit(fe[i:i + batch])
            tot += float((d * d).sum(1).mean()) * len(xe[i:i + batch])
        for s, v in zip(softs, saved, strict=False):
            s.v.data = v
        for s in softs:
            s.hard = False
        return tot / len(xe)

    with _installed(softs):
        before = measure(True)
        for t in range(iters):
            idx = torch.randint(0, n, (min(batch, n),), generator=gen)
            win = _window(xq, patch, gen)
            xb, fb = crop(xq, idx, win), crop(xf, idx, win)
            with torch.no_grad():
                target = funit(fb)
            if qdrop > 0:
                xb = torch.where(torch.rand_like(xb) < qdrop, fb, xb)
            for s in softs:
                s.drop = qdrop
            with torch.enable_grad():
                d = qunit(xb) - target
                loss = (d * d).sum(1).mean()
                if t >= start and reg > 0:
                    b = beta[0] + (beta[1] - beta[0]) * (t - start) / max(iters - start - 1, 1)
                    for s in softs:
                        loss = loss + reg * (1 - (2 * _h(s.v) - 1).abs().pow(b)).sum()
                opt.zero_grad()
                if opt_a is not None:
                    opt_a.zero_grad()
                loss.backward()
                opt.step()
                if opt_a is not None:
                    opt_a.step()
        after = measure(False)
    return {"loss_before": before, "loss_after": after}


def sub_crops(x: torch.Tensor, crop: int, align: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``crop x crop`` window per image of ``x`` (offsets multiples of ``align``).

    Block reconstruction only needs real feature statistics, not whole images: a convolution
    block is translation-equivariant, so a window whose offset is a multiple of the network's
    total stride (32 for MobileNetV2) sees, away from its border, exactly the feature maps of
    the full image, at ``(crop / side)²`` of the cost of propagating the full images.

    Example:
        >>> sub_crops(torch.randn(4, 3, 224, 224), 96, 32, torch.Generator()).shape
        torch.Size([4, 3, 96, 96])
    """
    if x.dim() != 4 or (x.shape[2] <= crop and x.shape[3] <= crop):
        return x
    ch, cw = min(crop, x.shape[2]), min(crop, x.shape[3])
    out = torch.empty(x.shape[0], x.shape[1], ch, cw, dtype=x.dtype)
    for k in range(x.shape[0]):
        i = int(torch.randint(0, (x.shape[2] - ch) // align + 1, (1,), generator=gen)) * align
        j = int(torch.randint(0, (x.shape[3] - cw) // align + 1, (1,), generator=gen)) * align
        out[k] = x[k, :, i:i + ch, j:j + cw]
    return out


def brecq(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor,
          names: list[str] | None = None, iters: int = 400, batch: int = 32, patch: int = 32,
          lr: float = 1e-2, act_lr: float = 1e-3, reg: float = 0.01, qdrop: float = 0.5,
          learn_act: bool = True, warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
          chunk: int = 32, seed: int = 0, qmax: int = 127, crop: int | None = None,
          align: int = 32) -> dict[str, dict[str, float]]:
    """Block-reconstruct the int8 codes (and activation scales) of ``qmodel`` in place.

    Args:
        float_model: the float, BN-folded model with the same module names.
        qmodel: the model with :class:`W8A8Conv2d` / :class:`W8A8Linear` layers (calibrated).
        x: calibration inputs (one tensor; never evaluation data).
        names: W8A8 layers to reconstruct (default: all).
        iters: Adam steps per unit; batch: examples per step; patch: window side (input
            positions) of larger feature maps.
        lr / act_lr: Adam learning rates of the rounding variables and of the log step sizes.
        reg: rounding regulariser λ; qdrop: QDrop probability (0: plain BRECQ).
        learn_act: learn the activation step sizes too.
        warmup, beta: warm-up fraction without the regulariser, β's annealing range.
        chunk: examples per forward when propagating inputs.
        seed: seed of the example / window / drop sampling.
        qmax: largest weight code magnitude (127 for 8-bit).
        crop / align: reconstruct on one random ``crop x crop`` window of each image (offsets
            multiples of ``align``; see :func:`sub_crops`) instead of the whole images.

    Returns:
        unit name -> ``{"loss_before", "loss_after", "flipped", "layers", "seconds"}``
        (``loss_*``: the unit's output reconstruction loss of round-to-nearest with the
        calibrated scales, and of the result, on a fixed draw of calibration examples).

    Raises:
        ModelError: a unit takes more than one input.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if crop is not None:
        x = sub_crops(x, crop, align, gen)
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, (W8A8Conv2d, W8A8Linear))}
    if names is not None:
        keep = set(names)
        qlayers = {n: m for n, m in qlayers.items() if n in keep}
    units, _ = find_units(qmodel, list(qlayers))
    float_model.eval()
    qmodel.eval()
    units = _run_order(qmodel, units, x)
    fmods, qmods = dict(float_model.named_modules()), dict(qmodel.named_modules())
    parents: dict[str, tuple[str, int]] = {}
    for u in units:
        p, _, c = u.rpartition(".")
        parent = qmods[p] if p else qmodel
        if isinstance(parent, nn.Sequential) and c.isdigit():
            parents[u] = (p, int(c))
    report: dict[str, dict[str, float]] = {}
    xq = xf = None
    prev: str | None = None
    for u in units:
        t0 = time.perf_counter()
        chained = (prev is not None and u in parents and prev in parents
                   and parents[u][0] == parents[prev][0] and parents[u][1] == parents[prev][1] + 1)
        if chained and xq is not None and xf is not None:
            xq, xf = _forward(qmods[prev], xq, chunk), _forward(fmods[prev], xf, chunk)
        else:
            xq, xf = _capture(qmodel, u, x, chunk), _capture(float_model, u, x, chunk)
        members = [(n, m) for n, m in qlayers.items() if n == u or n.startswith(u + ".")]
        softs = [_Soft(m, fmods[n].weight, qmax, learn_act) for n, m in members]
        t1 = time.perf_counter()
        rep = reconstruct_unit(fmods[u], qmods[u], softs, xq, xf, iters, batch, patch, lr,
                               act_lr, reg, qdrop, warmup, beta, gen)
        rep["seconds_inputs"] = t1 - t0
        infos = [s.commit() for s in softs]
        rep["flipped"] = sum(i["flipped"] for i in infos) / max(len(infos), 1)
        rep["layers"] = len(softs)
        rep["seconds"] = time.perf_counter() - t0
        report[u] = {k: round(float(v), 6) for k, v in rep.items()}
        prev = u
    return report


__all__ = ["brecq", "find_units", "reconstruct_unit", "sub_crops"]
