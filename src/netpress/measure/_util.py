"""Small helpers shared by the measure and export modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout().eval())
        >>> with eval_mode(net):
        ...     net[0].training
        False
        >>> net[0].training, net[1].training
        (True, False)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
