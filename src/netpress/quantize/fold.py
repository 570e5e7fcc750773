"""Batch-norm folding (Q3's first step): ``Conv -> BN`` becomes one ``Conv`` with a bias.

For a conv ``y = W * x + b`` followed by ``BN(y) = γ (y - μ) / sqrt(σ² + ε) + β`` (eval mode,
running statistics), the folded conv has, per output channel ``o``::

    k_o  = γ_o / sqrt(σ²_o + ε)
    W'_o = k_o · W_o                       # (O, I/g, kh, kw) scaled row by row
    b'_o = k_o · (b_o - μ_o) + β_o

The BN module is replaced by ``nn.Identity`` (so module names and the artifact layout stay stable).
Pairs are found inside ``nn.Sequential`` containers (torchvision's ``Conv2dNormActivation``,
``InvertedResidual.conv``, plain ``Sequential`` CNNs): a ``Conv1d``/``Conv2d`` directly followed by
a ``BatchNorm1d``/``BatchNorm2d`` of the same width (with running statistics); and in the graph of
a loaded ``.pt2`` program, a conv whose only user is such a BatchNorm (ResNet's ``conv1 -> bn1``).
This is the one folding routine (PTQ, QAT, binary / ternary, weight sharing, int8 weights).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.quantize.fold import fold_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> net[1].running_mean.uniform_(-1, 1); net[1].running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
    tensor(...)
    tensor(...)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> ref = net(x)
    >>> folded = fold_batchnorm(net)
    >>> folded, type(net[1]).__name__, bool((net(x) - ref).abs().max() < 1e-5)
    (['0'], 'Identity', True)
"""

from __future__ import annotations

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Fold ``bn`` (running statistics) into ``conv`` in place; the caller drops ``bn``.

    Args:
        conv: the convolution (its bias is created when missing).
        bn: the batch norm that follows it, with ``bn.num_features == conv.out_channels``.
    """
    assert bn.num_features == conv.out_channels
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)  # (O,)
    w = conv.weight  # (O, I/g, *kernel)
    conv.weight.copy_(w * k.reshape(-1, *([1] * (w.dim() - 1))))
    b = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    new_bias = k * (b - mean) + beta  # (O,)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype))
    else:
        conv.bias.copy_(new_bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and isinstance(bn, _BNS) and bn.track_running_stats
            and bn.num_features == conv.out_channels
            and getattr(conv, "padding_mode", "zeros") == "zeros")  # others stay float anyway


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every ``Conv -> BatchNorm`` pair, in place: adjacent in an ``nn.Sequential``, or a
    conv whose only user is a BatchNorm in an ``fx`` graph (a loaded ``.pt2`` program).

    Args:
        model: the float model (put in eval mode; BN uses its running statistics).

    Returns:
        The qualified names of the convolutions that absorbed a batch norm.
    """
    model.eval()
    folded: list[str] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if _foldable(conv, bn):
                fold_conv_bn(conv, bn)
                seq._modules[b] = nn.Identity()
                folded.append(f"{prefix}.{a}" if prefix else a)
    return folded + _fold_graph(model)


def _fold_graph(model: nn.Module) -> list[str]:
    """The ``fx`` graph case of :func:`fold_batchnorm` (the BN node is dropped from the graph and
    its module becomes ``nn.Identity``, so names and the artifact layout stay stable)."""
    graph = getattr(model, "graph", None)
    folded: list[str] = []
    for node in list(graph.nodes) if graph is not None and hasattr(model, "recompile") else []:
        users = list(node.users)
        if node.op != "call_module" or len(users) != 1 or users[0].op != "call_module" \
                or users[0].args[:1] != (node,) or len(users[0].args) != 1:
            continue
        conv, bn = model.get_submodule(node.target), model.get_submodule(users[0].target)
        if not _foldable(conv, bn):
            continue
        fold_conv_bn(conv, bn)
        model.set_submodule(users[0].target, nn.Identity())
        users[0].replace_all_uses_with(node)
        graph.erase_node(users[0])
        folded.append(node.target)
    if folded:
        model.recompile()
    return folded


__all__ = ["fold_batchnorm", "fold_conv_bn"]
