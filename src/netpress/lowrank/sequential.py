"""Block-by-block input statistics for the error-corrected (sequential) activation-aware SVD.

:func:`netpress.lowrank.whiten.layer_moments` runs the whole model twice per compressed layer,
which is fine on 100 calibration sentences and slow on thousands. :class:`SequentialMoments` gives
the same ``(X'X'ᵀ, X X'ᵀ, tokens)`` from two :class:`~netpress.quantize.sequential.BlockCache` s
(the block inputs GPTQ and SparseGPT cache), one for the compressed model (``X'`` stream) and one
for the original (``X`` stream): a layer's moments then run only its block (a transformer layer,
an item of an ``nn.ModuleList``), stopped right after the layer's input is seen; moving on to a
later block runs the finished blocks once to carry both streams forward. Layers outside the
blocks, asked for out of forward order, or a model whose blocks are not chained (the cache's data
flow check: block ``i+1`` gets block ``i``'s output and block 0's other arguments) fall back to
:func:`layer_moments`.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.lowrank.sequential import SequentialMoments
    >>> from netpress.lowrank.whiten import layer_moments
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    ...                                      for _ in range(2)])
    ...     def forward(self, x):
    ...         for block in self.layers:
    ...             x = block(x)
    ...         return x
    >>> _ = torch.manual_seed(0)
    >>> net = Net(); data = [Batch((torch.randn(8, 4),))]
    >>> seq = SequentialMoments(net, net, ["layers.0.0", "layers.1.0"], data)
    >>> cc, oc, n = seq.moments("layers.1.0")
    >>> bool(torch.allclose(cc, layer_moments(net, net, "layers.1.0", data)[0], rtol=1e-5)), n
    (True, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import DataError
from netpress.lowrank.whiten import _flat, layer_moments
from netpress.quantize.sequential import BlockCache


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs was seen."""


def _input_of(target: nn.Module, fn: Callable[[], Any]) -> torch.Tensor | None:
    """Run ``fn()``, stopped at ``target``'s first call; the first input it saw (or ``None``)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        raise _Stop

    handle = target.register_forward_pre_hook(hook)
    try:
        fn()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


class SequentialMoments:
    """Moments of each named layer's inputs, compressed model vs original, block by block.

    Args:
        model: the model being compressed (changed in place by the caller between calls).
        original: the unchanged original (same architecture and names).
        names: the layers that will be asked for, in forward order.
        batches: the statistics data.

    Raises:
        DataError: no batches.
    """

    def __init__(self, model: nn.Module, original: nn.Module, names: Sequence[str],
                 batches: Sequence[Batch]) -> None:
        if not batches:
            raise DataError("lowrank.activation_aware", got="no statistics data",
                            expected="calibration (or train) batches",
                            fix="use a zoo data set or pass data")
        self.model, self.original, self.batches = model, original, list(batches)
        cur = BlockCache.build(model, self.batches, list(names), min_blocks=1)
        orig = BlockCache.build(original, self.batches, list(names), min_blocks=1)
        #: the two streams' caches (compressed, original), or ``None``: whole-model passes
        self.caches = (cur, orig) if cur and orig and cur.prefix == orig.prefix else None

    @torch.no_grad()
    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(X'X'ᵀ, X X'ᵀ, tokens)`` of layer ``name``'s input (padding tokens left out)."""
        at = self.caches[0].block_of(name) if self.caches else None
        if self.caches is None or at is None or at < self.caches[0].index:
            return layer_moments(self.model, self.original, name, self.batches)
        streams = []
        for net, cache in zip((self.model, self.original), self.caches, strict=True):
            cache.advance_to(net, at)
            streams.append((net.get_submodule(name), cache.runs()))
        (mine, cur), (theirs, orig) = streams
        cc = oc = None
        n = 0
        for (run_c, mask), (run_o, _) in zip(cur, orig, strict=True):
            xc, xo = _input_of(mine, run_c), _input_of(theirs, run_o)
            if xc is None or xo is None:
                raise DataError(f"lowrank.activation_aware layer {name!r}",
                                got="no input seen", expected="a layer on the forward path",
                                fix=f"ignore {name!r}")
            xc, xo = _flat(xc.detach(), mask).float(), _flat(xo.detach(), mask).float()  # (N, I)
            bc, bo = (xc.T @ xc).double(), (xo.T @ xc).double()  # float32 per batch, float64 sum
            cc = bc if cc is None else cc + bc
            oc = bo if oc is None else oc + bo
            n += xc.shape[0]
        assert cc is not None and oc is not None
        return cc, oc, n


__all__ = ["SequentialMoments"]
