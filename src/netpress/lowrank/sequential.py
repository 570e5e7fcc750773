"""Block-by-block input statistics for the error-corrected (sequential) activation-aware SVD.

:func:`netpress.lowrank.whiten.layer_moments` runs the whole model twice per compressed layer,
which is fine on 100 calibration sentences and slow on thousands. :class:`SequentialMoments` gives
the same ``(X'X'ᵀ, X X'ᵀ, tokens)`` by caching, per batch, the inputs of the repeated block that
holds the layer (a transformer layer: the items of an ``nn.ModuleList``) for both the compressed
model (``X'`` stream) and the original (``X`` stream). A layer's moments then run only its block,
stopped right after the layer's input is seen; moving on to a later block runs the finished blocks
once to carry both streams forward (GPTQ's sequential mode). Layers outside the blocks, or asked
for out of forward order, fall back to :func:`layer_moments`.

It assumes the blocks are chained: block ``i+1`` is called with block ``i``'s output as its first
positional argument and the same other arguments (true of BERT / GPT style layer stacks).

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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError
from netpress.lowrank.whiten import _flat, layer_moments
from netpress.measure.metrics import first_tensor

Call = tuple[tuple[Any, ...], dict[str, Any]]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs was seen."""


def _run_until(target: nn.Module, fn: Any) -> Any:
    """Run ``fn()``; stop at ``target``'s forward pre-hook and return what it saw ``(args, kw)``."""
    seen: list[Call] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, dict(kwargs)))
        raise _Stop

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def _block_list(model: nn.Module, names: Sequence[str]) -> tuple[str, list[str]]:
    """``(list name, item names)`` of the first ``nn.ModuleList`` whose items hold a named layer,
    from its first such item to its last (items between them included: they carry the streams)."""
    for list_name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        prefix = f"{list_name}." if list_name else ""
        idx = [i for i in range(len(mod))
               if any(n.startswith(f"{prefix}{i}.") for n in names)]
        if idx:
            return list_name, [f"{prefix}{i}" for i in range(min(idx), max(idx) + 1)]
    return "", []


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
        _, self.blocks = _block_list(model, names)
        self.pos = -1  # index in self.blocks of the cached streams' block
        self.cur: list[Call] = []
        self.orig: list[Call] = []

    def _block_of(self, name: str) -> int | None:
        for i, b in enumerate(self.blocks):
            if name.startswith(b + "."):
                return i
        return None

    @torch.no_grad()
    def _capture_first(self) -> None:
        first = self.blocks[0]
        self.cur, self.orig = [], []
        for b in self.batches:
            for net, store in ((self.model, self.cur), (self.original, self.orig)):
                call = _run_until(net.get_submodule(first), lambda n=net, bt=b: bt.run(n))
                if call is None or not call[0]:
                    raise ModelError(f"lowrank block {first!r}", got="not called, or called "
                                     "without a positional input", expected="a layer stack "
                                     "block on the forward path", fix="use correct: false")
                store.append(call)
        self.pos = 0

    @torch.no_grad()
    def _advance(self, to: int) -> None:
        if self.pos < 0:
            self._capture_first()
        while self.pos < to:
            name = self.blocks[self.pos]
            for net, store in ((self.model, self.cur), (self.original, self.orig)):
                block = net.get_submodule(name)
                for k, (args, kw) in enumerate(store):
                    out = first_tensor(block(*args, **kw))
                    store[k] = ((out, *args[1:]), kw)
            self.pos += 1

    @torch.no_grad()
    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(X'X'ᵀ, X X'ᵀ, tokens)`` of layer ``name``'s input (padding tokens left out)."""
        at = self._block_of(name)
        if at is None or at < self.pos:
            return layer_moments(self.model, self.original, name, self.batches)
        self._advance(at)
        block_name = self.blocks[at]
        cc = oc = None
        n = 0
        for b, (ac, kc), (ao, ko) in zip(self.batches, self.cur, self.orig, strict=True):
            xs = []
            for net, args, kw in ((self.model, ac, kc), (self.original, ao, ko)):
                block = net.get_submodule(block_name)
                call = _run_until(net.get_submodule(name),
                                  lambda blk=block, a=args, k=kw: blk(*a, **k))
                if call is None:
                    raise DataError(f"lowrank.activation_aware layer {name!r}",
                                    got="no input seen", expected="a layer on the forward path",
                                    fix=f"ignore {name!r}")
                xs.append(_flat(call[0][0].detach(), b.mask).float())  # (N, I)
            xc, xo = xs  # float32 products per batch, summed in float64
            bc, bo = (xc.T @ xc).double(), (xo.T @ xc).double()
            cc = bc if cc is None else cc + bc
            oc = bo if oc is None else oc + bo
            n += xc.shape[0]
        assert cc is not None and oc is not None
        return cc, oc, n


__all__ = ["SequentialMoments"]
