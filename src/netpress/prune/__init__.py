"""Pruning techniques. Importing this package registers ``prune: {method: magnitude}``."""

from netpress.prune.magnitude import MagnitudePruneConfig, keep_masks, prune_count, prune_magnitude
from netpress.prune import structured  # noqa: E402, F401, I001  (P4 structured)

__all__ = ["MagnitudePruneConfig", "keep_masks", "prune_count", "prune_magnitude"]

from netpress.prune import gradient, lottery, regularize, sparsegpt, wanda  # noqa: E402, F401
