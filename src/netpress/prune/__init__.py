"""Pruning techniques. Importing this package registers every ``prune: {method: ...}``:
magnitude (P1, with N:M and cubic schedules), gradient / taylor (P2), obd / sparsegpt / wanda (P3),
structured (P4), lottery (P6), l1 / group_lasso / bn_gamma (P7).
"""

from netpress.prune import (  # noqa: F401  (imported to register their techniques)
    gradient,
    lottery,
    regularize,
    sparsegpt,
    structured,
    wanda,
)
from netpress.prune.magnitude import MagnitudePruneConfig, keep_masks, prune_count, prune_magnitude

__all__ = ["MagnitudePruneConfig", "keep_masks", "prune_count", "prune_magnitude"]
