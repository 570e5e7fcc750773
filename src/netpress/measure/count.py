"""Parameter and non-zero counts that stay meaningful after compression.

Counting rule (the same for :func:`count_params` and :func:`count_nonzero`):

1. every ``nn.Parameter`` counts, once (tied/shared parameters are not counted twice);
2. every *buffer* whose own name contains ``"weight"`` (``weight``, ``qweight``, ``weight_int8``,
   ``packed_weight``...) also counts, because netpress' quantized modules keep their integer
   weights as buffers; buffers whose name also says ``scale``, ``zero``, ``mask``, ``min``/``max``
   or ``observer`` are metadata and do not count, nor does anything else (BN running stats,
   ``num_batches_tracked``, masks, observers);
3. a module may override the rule for its own direct tensors by defining
   ``netpress_weight_counts(self) -> tuple[int, int]`` returning ``(total, nonzero)`` *logical*
   weights. Packed modules should do this: an int4 buffer holds two weights per byte, so its
   element count is half the number of weights.

``torch.nn.utils.prune`` reparametrisation is understood: ``weight_orig`` counts, and its non-zeros
are those of ``weight_orig * weight_mask``.

Example:
    >>> import torch
    >>> from netpress.measure.count import count_params, count_nonzero
    >>> lin = torch.nn.Linear(4, 3)
    >>> count_params(lin)
    15
    >>> with torch.no_grad():
    ...     _ = lin.weight.zero_()
    ...     _ = lin.bias.fill_(0.5)
    >>> count_nonzero(lin)  # only the 3 biases
    3
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

_META_WORDS = ("scale", "zero", "mask", "min", "max", "observer", "zp")


def is_weight_buffer(name: str) -> bool:
    """Whether a buffer called ``name`` (its own name, not dotted) holds weights.

    Args:
        name: the buffer's attribute name, e.g. ``"qweight"`` or ``"weight_scale"``.

    Returns:
        True for ``weight``-like names that are not scales, zero points, masks or observer state.

    Example:
        >>> is_weight_buffer("qweight"), is_weight_buffer("weight_scale")
        (True, False)
    """
    lowered = name.lower()
    return "weight" in lowered and not any(word in lowered for word in _META_WORDS)


def _counted_tensors(model: nn.Module) -> Iterator[tuple[int, int]]:
    """Yield ``(numel, nonzero)`` for every counted tensor of ``model`` (see the module doc)."""
    seen: set[int] = set()
    for module in model.modules():
        custom = getattr(module, "netpress_weight_counts", None)
        if callable(custom):
            total, nonzero = custom()
            yield int(total), int(nonzero)
            # Mark the module's own tensors as seen so shared ones are not counted elsewhere.
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            seen.update(id(t) for t in own)
            continue
        buffers = dict(module.named_buffers(recurse=False))
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            values: torch.Tensor = param.detach()
            mask = buffers.get(name[: -len("_orig")] + "_mask") if name.endswith("_orig") else None
            if mask is not None and mask.shape == values.shape:
                values = values * mask  # torch.nn.utils.prune reparametrisation
            yield values.numel(), int(torch.count_nonzero(values))
        for name, buf in buffers.items():
            if buf is None or id(buf) in seen or not is_weight_buffer(name):
                continue
            seen.add(id(buf))
            yield buf.numel(), int(torch.count_nonzero(buf))


def count_params(model: nn.Module) -> int:
    """Number of weights of ``model``: parameters plus weight buffers (module doc has the rule).

    Args:
        model: any ``nn.Module``; netpress quantized modules included.

    Returns:
        The number of scalar weights.

    Example:
        >>> import torch
        >>> count_params(torch.nn.Linear(4, 3))  # 4*3 weights + 3 biases
        15
    """
    return sum(numel for numel, _ in _counted_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero weights of ``model``, counted over the same tensors as :func:`count_params`.

    Integer weight buffers count their non-zero *codes*; for asymmetric quantization a zero code is
    not a zero weight, so prune first and quantize symmetrically to keep this figure exact.

    Args:
        model: any ``nn.Module``.

    Returns:
        The number of weights that are not exactly zero.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3, bias=False)
        >>> with torch.no_grad():
        ...     lin.weight[0] = 0.0
        >>> count_nonzero(lin)
        8
    """
    return sum(nonzero for _, nonzero in _counted_tensors(model))


def float_weight_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose ``weight`` is still a float matrix / kernel (``dim >= 2``), name -> type.

    After a quantization stage these are the layers it left in float (a Conv1d that ``ptq`` does
    not take, an ``Embedding``, names in ``ignore``, ...): the stage report lists them.

    Example:
        >>> import torch.nn as nn
        >>> float_weight_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Embedding(3, 2)))
        {'0': 'Linear', '2': 'Embedding'}
    """
    out = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.dtype.is_floating_point:
            out[name] = type(module).__name__
    return out


__all__ = ["count_params", "count_nonzero", "float_weight_layers", "is_weight_buffer"]
