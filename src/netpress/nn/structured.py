"""Serializable modules whose non-tensor attributes structured pruning changes.

``PrunedBertSelfAttention`` is a Hugging Face ``BertSelfAttention`` with fewer heads: the same
children (``query``, ``key``, ``value``, ``dropout``) and state-dict keys, ``num_attention_heads``
and ``all_head_size`` set to the kept heads, and the forward of the transformers class (imported
lazily, so importing netpress does not import transformers). Its spec records the BERT config and
the head counts, so an artifact rebuilds it without pickle.

Example:
    >>> from transformers import BertConfig
    >>> from transformers.models.bert.modeling_bert import BertSelfAttention
    >>> cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    >>> cfg._attn_implementation = "eager"
    >>> att = PrunedBertSelfAttention.from_attention(BertSelfAttention(cfg), keep_heads=[0, 2])
    >>> att.num_attention_heads, tuple(att.query.weight.shape)
    (2, (16, 32))
    >>> from netpress.nn import build_module, module_spec
    >>> type(build_module(module_spec(att))).__name__
    'PrunedBertSelfAttention'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from netpress.nn.registry import serializable


def _slice_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    out = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight[rows])  # (kept, in)
        if lin.bias is not None:
            out.bias.copy_(lin.bias[rows])
    return out


@serializable
class PrunedBertSelfAttention(nn.Module):
    """BERT self-attention with ``num_heads`` heads of ``head_size`` (fewer than the config's).

    Args:
        config: the ``transformers`` BERT config (its ``_attn_implementation`` is used).
        num_heads: heads kept (>= 1).
        head_size: dimensions per head (unchanged by head pruning).
        is_causal: as in ``BertSelfAttention``.
        layer_idx: as in ``BertSelfAttention``.
    """

    def __init__(self, config: Any, num_heads: int, head_size: int, is_causal: bool = False,
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_attention_heads = int(num_heads)
        self.attention_head_size = int(head_size)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        hidden = int(config.hidden_size)
        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(hidden, self.all_head_size)
        self.value = nn.Linear(hidden, self.all_head_size)
        self.dropout = nn.Dropout(float(config.attention_probs_dropout_prob))
        self.is_decoder = bool(getattr(config, "is_decoder", False))
        self.is_causal = bool(is_causal)
        self.layer_idx = layer_idx

    @classmethod
    def from_attention(cls, att: nn.Module, keep_heads: list[int]) -> PrunedBertSelfAttention:
        """A copy of ``att`` (a ``BertSelfAttention``) keeping the heads ``keep_heads``."""
        d = int(att.attention_head_size)
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(keep_heads)])
        new = cls(att.config, len(keep_heads), d, bool(getattr(att, "is_causal", False)),
                  getattr(att, "layer_idx", None))
        new.query = _slice_rows(att.query, rows)
        new.key = _slice_rows(att.key, rows)
        new.value = _slice_rows(att.value, rows)
        new.dropout = att.dropout
        return new.train(att.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The transformers ``BertSelfAttention.forward`` on the kept heads."""
        from transformers.models.bert.modeling_bert import BertSelfAttention

        return BertSelfAttention.forward(self, *args, **kwargs)  # type: ignore[arg-type]

    def spec(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        cfg["_attn_implementation"] = getattr(self.config, "_attn_implementation", None)
        return {"config": cfg, "num_heads": self.num_attention_heads,
                "head_size": self.attention_head_size, "is_causal": self.is_causal,
                "layer_idx": self.layer_idx}

    @classmethod
    def from_spec(cls, kwargs: dict[str, Any]) -> PrunedBertSelfAttention:
        from transformers import BertConfig

        cfg_dict = dict(kwargs["config"])
        attn = cfg_dict.pop("_attn_implementation", None)
        config = BertConfig.from_dict(cfg_dict)
        if attn:
            config._attn_implementation = attn
        return cls(config, int(kwargs["num_heads"]), int(kwargs["head_size"]),
                   bool(kwargs.get("is_causal", False)), kwargs.get("layer_idx"))


__all__ = ["PrunedBertSelfAttention"]
