"""Pruning techniques. Importing this package registers ``prune: {method: magnitude}``."""

from netpress.prune.magnitude import MagnitudePruneConfig, keep_masks, prune_count, prune_magnitude

__all__ = ["MagnitudePruneConfig", "keep_masks", "prune_count", "prune_magnitude"]
