"""Data adapters: whatever the user has becomes a list of :class:`Batch`.

Accepted: a ``torch.utils.data.DataLoader`` (or any iterable) yielding tensors, ``(inputs, target)``
tuples or dicts of tensors (Hugging Face style, ``labels`` taken as the target); a list of such
items; a numpy array or tensor of inputs; a pair ``(X, y)`` of arrays/tensors (batched here).

Example:
    >>> import numpy as np
    >>> from netpress.core.data import as_batches
    >>> X = np.zeros((10, 4), dtype=np.float32); y = np.arange(10)
    >>> batches = as_batches((X, y), batch_size=4)
    >>> [b.size for b in batches], batches[0].target.tolist()
    ([4, 4, 2], [0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from netpress.core.errors import DataError


@dataclass
class Batch:
    """One batch: positional tensor inputs or keyword tensor inputs, and an optional target."""

    inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
    target: torch.Tensor | None = None

    def run(self, model: torch.nn.Module) -> Any:
        """``model(*inputs)`` or ``model(**inputs)``."""
        if isinstance(self.inputs, dict):
            return model(**self.inputs)
        return model(*self.inputs)

    @property
    def size(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs[0]
        return int(first.shape[0])

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask of token inputs, when there is one."""
        return self.inputs.get("attention_mask") if isinstance(self.inputs, dict) else None

    def slice(self, n: int) -> Batch:
        """The first ``n`` examples."""
        inputs: Any
        if isinstance(self.inputs, dict):
            inputs = {k: v[:n] for k, v in self.inputs.items()}
        else:
            inputs = tuple(v[:n] for v in self.inputs)
        return Batch(inputs, None if self.target is None else self.target[:n])


def _tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise DataError(where, got=type(x).__name__, expected="a torch.Tensor or numpy array",
                    fix="convert the item to a tensor")


def _item_to_batch(item: Any, where: str) -> Batch:
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict):
        if not item:
            raise DataError(where, got="an empty dict", expected="a dict of input tensors",
                            fix="yield e.g. {'input_ids': ..., 'attention_mask': ...}")
        target = item.get("labels")
        inputs = {k: _tensor(v, f"{where}[{k!r}]") for k, v in item.items() if k != "labels"}
        return Batch(inputs, None if target is None else _tensor(target, f"{where}['labels']"))
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return Batch((_tensor(item[0], where),), _tensor(item[1], where))
        if len(item) == 1:
            return Batch((_tensor(item[0], where),))
        raise DataError(where, got=f"a {len(item)}-tuple", expected="(inputs,) or (inputs, target)",
                        fix="yield (x, y) pairs, a tensor, or a dict of tensors")
    return Batch((_tensor(item, where),))


def as_batches(
    data: Any, batch_size: int = 32, limit: int | None = None, where: str = "data"
) -> list[Batch]:
    """Normalise ``data`` into a list of :class:`Batch`, checking it is non-empty and finite.

    Args:
        data: see the module doc for accepted forms.
        batch_size: used only when ``data`` is a whole array/tensor or an ``(X, y)`` pair.
        limit: stop after this many examples.
        where: name used in errors (e.g. ``"calibration data"``).

    Raises:
        DataError: empty, malformed, or containing NaN/Inf.
    """
    if data is None:
        raise DataError(where, got=None, expected="calibration/evaluation data",
                        fix="pass data=..., or use a zoo data name in the recipe")
    if isinstance(data, (np.ndarray, torch.Tensor)):
        data = (data,)
    if (
        isinstance(data, tuple)
        and 1 <= len(data) <= 2
        and all(isinstance(d, (np.ndarray, torch.Tensor)) for d in data)
    ):
        tensors = [_tensor(d, where) for d in data]
        if len({int(t.shape[0]) for t in tensors}) != 1:
            raise DataError(where, got=[tuple(t.shape) for t in tensors],
                            expected="inputs and targets with the same first dimension",
                            fix="pass (X, y) with len(X) == len(y)")
        n = int(tensors[0].shape[0])
        items: Iterable[Any] = [
            tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)
        ]
    else:
        items = data
    if not isinstance(items, Iterable):
        raise DataError(where, got=type(data).__name__,
                        expected="a DataLoader, an iterable of batches, or arrays",
                        fix="wrap your data in a torch DataLoader")
    out: list[Batch] = []
    seen = 0
    for i, item in enumerate(items):
        batch = _item_to_batch(item, f"{where}[{i}]")
        if limit is not None and seen + batch.size > limit:
            batch = batch.slice(limit - seen)
        _check_finite(batch, f"{where}[{i}]")
        if batch.size:
            out.append(batch)
        seen += batch.size
        if limit is not None and seen >= limit:
            break
    if not out:
        raise DataError(where, got="no examples", expected="at least one batch",
                        fix="check the dataset is not empty")
    return out


def _check_finite(batch: Batch, where: str) -> None:
    values = batch.inputs.values() if isinstance(batch.inputs, dict) else batch.inputs
    for t in values:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(where, got="NaN or Inf values", expected="finite inputs",
                            fix="clean or drop the non-finite examples")


def example_inputs(batches: list[Batch], n: int = 1) -> Batch:
    """A small batch (the first ``n`` examples) for tracing, export and latency."""
    return batches[0].slice(n)


def take_examples(batches: list[Batch], limit: int) -> list[Batch]:
    """The first ``limit`` examples of ``batches``, the last batch sliced to fit.

    Example:
        >>> bs = [Batch((torch.zeros(4, 2),)), Batch((torch.zeros(4, 2),))]
        >>> [b.size for b in take_examples(bs, 6)]
        [4, 2]
    """
    out, seen = [], 0
    for b in batches:
        if seen >= limit:
            break
        n = min(b.size, limit - seen)
        out.append(b.slice(n) if n < b.size else b)
        seen += n
    return out


def length_buckets(batches: list[Batch], size: int | None = None) -> list[Batch]:
    """Token batches regrouped by real length: the same examples, sorted by their attention
    mask's length, ``size`` a batch (default: the first batch's), each cut to its longest real
    sequence; targets move with their rows. Padding is compute the model throws away: MiniLM's
    2048 training sentences in batches of 32 are 40 % real tokens, 97 % once bucketed. Anything
    but right-padded token batches (a dict with an ``attention_mask`` whose ones come first, every
    input ``(B, T)``) comes back unchanged.

    Example:
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
        >>> b = Batch({"input_ids": torch.arange(16).reshape(4, 4), "attention_mask": mask})
        >>> [tuple(x.inputs["input_ids"].shape) for x in length_buckets([b], 2)]
        [(2, 2), (2, 4)]
    """
    if not batches or not all(_right_padded(b) for b in batches):
        return batches
    size = size or batches[0].size
    rows = []  # (length, batch index, row)
    for i, b in enumerate(batches):
        assert b.mask is not None
        rows += [(int(n), i, r) for r, n in enumerate(b.mask.sum(1).tolist())]
    rows.sort()
    out = []
    for k in range(0, len(rows), size):
        group = rows[k:k + size]
        width = max(1, group[-1][0])
        first = batches[group[0][1]]
        assert isinstance(first.inputs, dict)
        inputs = {}
        for key, v in first.inputs.items():
            inputs[key] = v.new_zeros((len(group), width))  # padding: zeros, masked out
            for j, (n, i, r) in enumerate(group):
                inputs[key][j, :n] = batches[i].inputs[key][r, :n]  # type: ignore[index]
        targets = [batches[i].target for _, i, _ in group]
        target = None if any(t is None for t in targets) else torch.stack(
            [t[r] for t, (_, _, r) in zip(targets, group, strict=True)])
        out.append(Batch(inputs, target))
    return out


def _right_padded(batch: Batch) -> bool:
    mask = batch.mask
    if mask is None or mask.dim() != 2 or not isinstance(batch.inputs, dict):
        return False
    if any(v.shape[:2] != mask.shape or v.dim() != 2 for v in batch.inputs.values()):
        return False
    keep = mask.bool()
    return bool((keep[:, 1:] <= keep[:, :-1]).all())  # no real token after a padded one


__all__ = ["Batch", "as_batches", "example_inputs", "length_buckets", "take_examples"]
