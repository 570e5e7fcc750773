"""AdaRound for static W8A8 PTQ (``quantize: {method: ptq, rounding: adaround}``).

Round-to-nearest is not the best rounding of a layer's weights once its *output* is what counts
(Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"). AdaRound keeps
each weight code at ``floor(w / s)`` or ``floor(w / s) + 1`` and learns which, per weight, by
minimising the layer's output reconstruction error on calibration inputs::

    h(V)  = clamp(sigmoid(V) · (ζ - γ) + γ, 0, 1)              ζ = 1.1, γ = -0.1
    W~    = s · clamp(floor(W / s) + h(V), -127, 127)
    loss  = ‖W x_f - W~ x_q‖² / N  +  λ Σ (1 - |2 h(V) - 1|^β)     β: 20 -> 2 after a warm-up

with ``x_q`` the layer's input in the quantized model, quantized by the layer's own input
quantizer, and ``x_f`` by default the same ``x_q`` (the layer's own rounding error only), or with
``asymmetric`` the layer's input in the float (BN-folded) model (the paper's asymmetric
reconstruction: the rounding also absorbs upstream error). ``N`` is the number of
examples, so the first term is the squared output error summed over channels and positions per
example, as in BRECQ's layer reconstruction.

Because the loss is quadratic in ``W~``, netpress does not keep the calibration activations: one
pass over the calibration examples (in chunks) accumulates, per layer and per group of the
convolution, ``H_qq = Σ x_q x_qᵀ`` and ``H_fq = Σ x_f x_qᵀ`` over im2col rows (at most
``positions`` random spatial positions per example), and the optimisation then runs on these
``K × K`` matrices with exact full-batch gradients (a few hundred Adam steps per layer). The rows
of every layer are taken with all *other* layers rounded to nearest (one pass, not the paper's
layer-by-layer sequence, which would need the whole calibration set's activations in memory).

With ``correct_bias`` the statistics are centred and each layer's bias moves by
``E[W x_f] - E[W~ x_q]`` per output channel (empirical bias correction on the same rows).

Conv2d (any ``groups``, depthwise included) and Linear layers of
:class:`netpress.nn.ptq.W8A8Conv2d` / ``W8A8Linear`` are handled; the result is ordinary int8 codes
in ``qweight``, so export and reload are unchanged.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.ptq import W8A8Conv2d
    >>> torch.manual_seed(0) and None
    >>> conv = nn.Conv2d(8, 8, 3, padding=1)
    >>> qnet = nn.Sequential(W8A8Conv2d.from_float(conv, 6 / 255, 128))
    >>> x = torch.randn(16, 8, 8, 8)
    >>> rep = adaround(nn.Sequential(conv), qnet, x, iters=200)
    >>> rep["0"]["error_vs_nearest"] < 1.0
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.ptq import _W8A8, W8A8Conv2d, W8A8Linear, fake_quant

ZETA, GAMMA = 1.1, -0.1


@dataclass
class _Stats:
    """Sums over im2col rows of one layer, per group: ``(G, K, K)`` and ``(G, K)``."""

    hqq: torch.Tensor
    hfq: torch.Tensor
    sq: torch.Tensor
    sf: torch.Tensor
    rows: int = 0


def im2col_rows(mod: _W8A8 | nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as im2col rows per group: ``(G, M, K)`` (``G = 1`` for a Linear)."""
    if isinstance(mod, (W8A8Conv2d, nn.Conv2d)):
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, CK, L)
        n, ck, length = cols.shape
        g = mod.groups
        return cols.view(n, g, ck // g, length).permute(1, 0, 3, 2).reshape(g, n * length, ck // g)
    return x.reshape(1, -1, x.shape[-1])


def _positions(mod: _W8A8, x: torch.Tensor) -> int:
    """Rows per example of the layer's im2col matrix."""
    if isinstance(mod, W8A8Conv2d):
        h, w = x.shape[-2:]
        oh = (h + 2 * mod.padding[0] - mod.dilation[0] * (mod.kernel_size[0] - 1) - 1) // mod.stride[0] + 1
        ow = (w + 2 * mod.padding[1] - mod.dilation[1] * (mod.kernel_size[1] - 1) - 1) // mod.stride[1] + 1
        return oh * ow
    return int(x[0].numel() // x.shape[-1]) if x.dim() > 1 else 1


@torch.no_grad()
def collect_stats(float_model: nn.Module, qmodel: nn.Module, names: list[str], x: torch.Tensor,
                  positions: int = 256, chunk: int = 4, seed: int = 0,
                  float_inputs: bool = True) -> dict[str, _Stats]:
    """Accumulate the reconstruction statistics of the named W8A8 layers (see the module doc).

    Args:
        float_model: float model with the same layer names (BN folded).
        qmodel: the W8A8 model (rounded to nearest).
        names: W8A8 layers to collect.
        x: calibration inputs (one tensor), run ``chunk`` examples at a time.
        positions: at most this many random im2col rows (output positions) per example.
        seed: seed of the position sampling.
        float_inputs: run ``float_model`` for ``x_f`` (else ``H_fq`` is ``H_qq``).

    Returns:
        layer name -> its statistics.
    """
    fmods, qmods = dict(float_model.named_modules()), dict(qmodel.named_modules())
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, _Stats] = {}
    cache: dict[str, torch.Tensor] = {}
    hooks = [fmods[n].register_forward_pre_hook(
        lambda _m, a, n=n: cache.__setitem__(n, a[0])) for n in names] if float_inputs else []

    def observe(mod: _W8A8, args: tuple, name: str) -> None:
        xq_raw = args[0]
        lo, hi = mod.act_qrange
        xq = fake_quant(xq_raw, mod.input_scale, mod.input_zero_point, lo, hi)
        rq = im2col_rows(mod, xq.float())
        rf = im2col_rows(mod, cache.pop(name).float()) if float_inputs else rq
        per = _positions(mod, xq_raw)
        n = xq_raw.shape[0]
        if per > positions:  # the same random positions of every example in both streams
            pick = torch.cat([i * per + torch.randperm(per, generator=gen)[:positions]
                              for i in range(n)])
            rq, rf = rq[:, pick], rf[:, pick]
        st = stats.get(name)
        if st is None:
            g, _, k = rq.shape
            st = stats[name] = _Stats(torch.zeros(g, k, k), torch.zeros(g, k, k),
                                      torch.zeros(g, k), torch.zeros(g, k))
        st.hqq += rq.transpose(1, 2) @ rq
        st.hfq += rf.transpose(1, 2) @ rq
        st.sq += rq.sum(1)
        st.sf += rf.sum(1)
        st.rows += rq.shape[1]

    hooks += [qmods[n].register_forward_pre_hook(
        lambda m, a, n=n: observe(m, a, n)) for n in names]
    try:
        float_model.eval()
        qmodel.eval()
        for i in range(0, len(x), chunk):
            if float_inputs:
                float_model(x[i:i + chunk])
            qmodel(x[i:i + chunk])
            cache.clear()
    finally:
        for h in hooks:
            h.remove()
    return stats


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def optimize_rounding(weight: torch.Tensor, scale: torch.Tensor, groups: int, st: _Stats,
                      examples: int, iters: int = 500, lr: float = 1e-2, reg: float = 0.01,
                      warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                      correct_bias: bool = False, qmax: int = 127, asymmetric: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Learn the rounding of one layer from its statistics.

    Args:
        weight: the float weight ``(O, ...)``; scale: per-channel ``(O,)`` or per-tensor ``()``.
        groups: convolution groups (1 for Linear).
        st: the layer's statistics (:func:`collect_stats`); examples: how many examples made them.
        iters, lr, reg, warmup, beta: Adam steps, learning rate, λ, the warm-up fraction without
            the rounding regulariser and β's annealing range.
        correct_bias: centre the statistics and return the bias shift.
        qmax: largest code magnitude.
        asymmetric: target ``W x_f`` (float input) instead of ``W x_q``.

    Returns:
        ``(codes, bias_shift or None, info)``: int8 codes shaped like ``weight``, the per-channel
        bias shift, and ``info`` with ``error_vs_nearest`` (reconstruction error of the learned
        rounding / round-to-nearest's, both with the constant term) and ``flipped`` (fraction of
        codes that differ from round-to-nearest).
    """
    if not asymmetric:
        st = _Stats(st.hqq, st.hqq, st.sq, st.sq, st.rows)
    o = weight.shape[0]
    w = weight.detach().float().reshape(groups, o // groups, -1)  # (G, Og, K)
    s = (scale.float().expand(o) if scale.dim() == 0 else scale.float()).reshape(groups, -1, 1)
    hqq, hfq = st.hqq.double(), st.hfq.double()
    if correct_bias:
        m = max(st.rows, 1)
        hqq = hqq - st.sq.double().unsqueeze(2) * st.sq.double().unsqueeze(1) / m
        hfq = hfq - st.sf.double().unsqueeze(2) * st.sq.double().unsqueeze(1) / m
    hqq, a = hqq.float(), (w.double() @ hfq).float()  # a = W H_fq: (G, Og, K)
    norm = 1.0 / max(examples, 1)

    def rec(ws: torch.Tensor) -> torch.Tensor:  # reconstruction error up to a constant
        return (((ws @ hqq) * ws).sum() - 2 * (a * ws).sum()) * norm

    base = torch.floor(w / s)
    frac = (w / s - base).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iters)
    with torch.enable_grad():
        for t in range(iters):
            h = _h(v)
            loss = rec(s * torch.clamp(base + h, -qmax, qmax))
            if t >= start:
                b = beta[0] + (beta[1] - beta[0]) * (t - start) / max(iters - start - 1, 1)
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        codes = torch.clamp(base + (v >= 0).float(), -qmax, qmax)
        nearest = torch.clamp(torch.round(w / s), -qmax, qmax)
        const = _constant(w, st, correct_bias) * norm
        e_new, e_rtn = float(rec(s * codes)) + const, float(rec(s * nearest)) + const
        shift = None
        if correct_bias:
            m = max(st.rows, 1)
            mf, mq = (st.sf / m).unsqueeze(2), (st.sq / m).unsqueeze(2)  # (G, K, 1)
            shift = ((w @ mf) - ((s * codes) @ mq)).reshape(o)
        info = {"error_vs_nearest": e_new / e_rtn if e_rtn > 0 else 1.0,
                "flipped": float((codes != nearest).float().mean())}
    return codes.reshape(weight.shape).to(torch.int8), shift, info


def _constant(w: torch.Tensor, st: _Stats, centred: bool) -> float:
    """``Σ (W x_f)²`` is not collected; its value only shifts both errors equally, so the ratio
    uses the best error reachable, ``tr(W H_fq H_qq⁺ H_fqᵀ Wᵀ)`` (the least-squares optimum of a
    float W~), as the constant: the ratio is then (error - optimum) / (RTN error - optimum)."""
    hqq, hfq = st.hqq.double(), st.hfq.double()
    if centred:
        m = max(st.rows, 1)
        hqq = hqq - st.sq.double().unsqueeze(2) * st.sq.double().unsqueeze(1) / m
        hfq = hfq - st.sf.double().unsqueeze(2) * st.sq.double().unsqueeze(1) / m
    a = w.double() @ hfq  # (G, Og, K)
    sol = a @ torch.linalg.pinv(hqq, hermitian=True)  # (G, Og, K)
    return float((sol * a).sum())


def adaround(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor,
             names: list[str] | None = None, iters: int = 500, lr: float = 1e-2,
             reg: float = 0.01, positions: int = 256, correct_bias: bool = False,
             chunk: int = 4, seed: int = 0, qmax: int = 127,
             asymmetric: bool = False) -> dict[str, dict[str, float]]:
    """Re-round the int8 weights of ``qmodel``'s W8A8 layers in place (see the module doc).

    Args:
        float_model: the float, BN-folded model with the same layer names.
        qmodel: the model holding :class:`W8A8Conv2d` / :class:`W8A8Linear` layers (codes rounded
            to nearest, activation quantizers calibrated).
        x: calibration inputs (one tensor; never evaluation data).
        names: layers to re-round (default: every W8A8 layer).
        iters, lr, reg: Adam steps per layer, learning rate, rounding regulariser λ.
        positions: im2col rows sampled per example and layer.
        correct_bias: also shift each bias by the output-mean error (centred statistics).
        chunk: examples per forward pass while collecting.
        seed: seed of the position sampling.
        qmax: largest code magnitude (127 for 8-bit weights).
        asymmetric: reconstruct the float model's output ``W x_f`` (absorbing upstream
            activation error) instead of ``W x_q``, the layer's own float weights on its
            quantized input (the default: with the one-pass statistics the asymmetric target
            over-compensates once upstream layers are re-rounded too; measured worse on a small
            CNN's held-out output).

    Returns:
        layer name -> ``{"error_vs_nearest", "flipped", "bias_shift"}``.
    """
    qmods = {n: m for n, m in qmodel.named_modules() if isinstance(m, (W8A8Conv2d, W8A8Linear))}
    if names is not None:
        keep = set(names)
        qmods = {n: m for n, m in qmods.items() if n in keep}
    floats = dict(float_model.named_modules())
    stats = collect_stats(float_model, qmodel, list(qmods), x, positions, chunk, seed,
                          float_inputs=asymmetric)
    report: dict[str, dict[str, float]] = {}
    for name, mod in qmods.items():
        if name not in stats:  # the layer never ran on these inputs
            continue
        groups = mod.groups if isinstance(mod, W8A8Conv2d) else 1
        codes, shift, info = optimize_rounding(
            floats[name].weight, mod.weight_scale, groups, stats[name], len(x), iters, lr, reg,
            correct_bias=correct_bias and mod.bias is not None, qmax=qmax, asymmetric=asymmetric)
        with torch.no_grad():
            mod.qweight.copy_(codes)
            if shift is not None and mod.bias is not None:
                mod.bias.add_(shift.to(mod.bias.dtype))
        info["bias_shift"] = float(shift.abs().max()) if shift is not None else 0.0
        report[name] = {k: round(v, 5) for k, v in info.items()}
    return report


__all__ = ["adaround", "collect_stats", "optimize_rounding"]
