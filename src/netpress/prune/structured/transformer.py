"""Structured pruning of BERT-family encoders: attention heads and FFN neurons.

For every transformer layer ``P`` (found by module names, the Hugging Face BERT layout):
  * heads: ``P.attention.self`` (``query``/``key``/``value``, rows ``h·d .. (h+1)·d``) and the
    input columns of ``P.attention.output.dense``; the attention module is replaced by a
    :class:`netpress.nn.structured.PrunedBertSelfAttention` with the kept head count;
  * FFN neurons: rows of ``P.intermediate.dense`` and input columns of ``P.output.dense``.
The hidden size (residual stream, LayerNorms, embeddings) is left unchanged.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                  intermediate_size=64, vocab_size=50)
    >>> cfg._attn_implementation = "eager"
    >>> bert = BertModel(cfg, add_pooling_layer=False).eval()
    >>> blocks = find_blocks(bert)
    >>> [b.prefix for b in blocks], blocks[0].heads, blocks[0].neurons
    (['encoder.layer.0'], 4, 64)
    >>> prune_block(bert, blocks[0], keep_heads=[1, 3], keep_neurons=list(range(32)))
    >>> bert(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from netpress.nn.structured import PrunedBertSelfAttention
from netpress.prune.structured.importance import weight_score


@dataclass
class BertBlock:
    """One transformer layer's prunable parts (qualified names)."""

    prefix: str
    heads: int
    head_size: int
    neurons: int

    @property
    def attention(self) -> str:
        return f"{self.prefix}.attention.self"

    @property
    def attn_out(self) -> str:
        return f"{self.prefix}.attention.output.dense"

    @property
    def ffn_in(self) -> str:
        return f"{self.prefix}.intermediate.dense"

    @property
    def ffn_out(self) -> str:
        return f"{self.prefix}.output.dense"


def find_blocks(model: nn.Module) -> list[BertBlock]:
    """The BERT layers of ``model`` (empty when it has none)."""
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        if not name.endswith(".attention.self") or not hasattr(m, "attention_head_size"):
            continue
        prefix = name[: -len(".attention.self")]
        ffn_in, ffn_out = modules.get(f"{prefix}.intermediate.dense"), modules.get(
            f"{prefix}.output.dense")
        attn_out = modules.get(f"{prefix}.attention.output.dense")
        if not all(isinstance(x, nn.Linear) for x in (ffn_in, ffn_out, attn_out)):
            continue
        if not all(isinstance(getattr(m, k, None), nn.Linear) for k in ("query", "key", "value")):
            continue
        out.append(BertBlock(prefix, int(m.num_attention_heads), int(m.attention_head_size),
                             int(ffn_in.out_features)))  # type: ignore[union-attr]
    return out


Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (E[x_c], Var[x_c]) input


def _output_variance(lin: nn.Module, var: torch.Tensor) -> torch.Tensor:
    """``Σ_o W[o, c]² · Var[x_c]`` per input column ``c`` of a Linear."""
    return lin.weight.detach().float().pow(2).sum(0) * var  # type: ignore[operator]


def head_scores(model: nn.Module, block: BertBlock, kind: str,
                grads: dict[int, torch.Tensor] | None, moments: Moments | None = None
                ) -> torch.Tensor:
    """Importance of each head ``(heads,)``: q/k/v rows plus output-projection columns, or
    (``activation``) the output variance its context columns feed the output projection."""
    modules = dict(model.named_modules())
    att, out = modules[block.attention], modules[block.attn_out]
    d = block.head_size
    if kind == "activation" and moments is not None and block.attn_out in moments:
        v = _output_variance(out, moments[block.attn_out][1])  # (H*d,)
        return v.reshape(block.heads, d).sum(1).float()
    total = torch.zeros(block.heads, dtype=torch.float64)
    for lin in (att.query, att.key, att.value):
        g = None if grads is None else grads.get(id(lin.weight))
        s = weight_score(lin.weight.detach(), g, kind).sum(1)  # (H*d,)
        total += s.reshape(block.heads, d).sum(1).double()
    g = None if grads is None else grads.get(id(out.weight))
    s = weight_score(out.weight.detach(), g, kind).sum(0)  # (H*d,)
    total += s.reshape(block.heads, d).sum(1).double()
    return total.float()


def neuron_scores(model: nn.Module, block: BertBlock, kind: str,
                  grads: dict[int, torch.Tensor] | None, moments: Moments | None = None
                  ) -> torch.Tensor:
    """Importance of each FFN neuron ``(neurons,)``: input-layer rows plus output-layer columns,
    or (``activation``) the output variance it feeds the output layer."""
    modules = dict(model.named_modules())
    fin, fout = modules[block.ffn_in], modules[block.ffn_out]
    if kind == "activation" and moments is not None and block.ffn_out in moments:
        return _output_variance(fout, moments[block.ffn_out][1]).float()
    s_in = weight_score(fin.weight.detach(), None if grads is None else
                        grads.get(id(fin.weight)), kind).sum(1)  # (N,)
    s_out = weight_score(fout.weight.detach(), None if grads is None else
                         grads.get(id(fout.weight)), kind).sum(0)  # (N,)
    return (s_in + s_out).float()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _keep_cols(lin: nn.Linear, cols: torch.Tensor, mean: torch.Tensor | None = None
               ) -> nn.Linear:
    """``lin`` with input columns ``cols``; with the input ``mean``, the removed columns' mean
    contribution moves into the bias."""
    new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, cols])  # (out, kept)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
            if mean is not None:
                gone = torch.ones(lin.in_features, dtype=torch.bool)
                gone[cols] = False
                new.bias.add_(lin.weight[:, gone].float() @ mean[gone].float())
    return new.train(lin.training)


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])  # (kept, in)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new.train(lin.training)


def prune_block(model: nn.Module, block: BertBlock, keep_heads: list[int],
                keep_neurons: list[int], moments: Moments | None = None) -> None:
    """Keep only ``keep_heads`` and ``keep_neurons`` of ``block`` (in place); with ``moments``
    (input means of the output projections) the removed parts' mean output goes to the biases."""
    modules = dict(model.named_modules())
    moments = moments or {}

    def mean(name: str) -> torch.Tensor | None:
        return moments[name][0] if name in moments else None

    if len(keep_heads) < block.heads:
        d = block.head_size
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(keep_heads)])
        _set(model, block.attention,
             PrunedBertSelfAttention.from_attention(modules[block.attention], keep_heads))
        _set(model, block.attn_out, _keep_cols(modules[block.attn_out], cols,
                                                   mean(block.attn_out)))
    if len(keep_neurons) < block.neurons:
        idx = torch.as_tensor(sorted(keep_neurons), dtype=torch.long)
        _set(model, block.ffn_in, _keep_rows(modules[block.ffn_in], idx))
        _set(model, block.ffn_out, _keep_cols(modules[block.ffn_out], idx, mean(block.ffn_out)))


__all__ = ["BertBlock", "find_blocks", "head_scores", "neuron_scores", "prune_block"]
