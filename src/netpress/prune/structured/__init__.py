"""Structured pruning (SPEC P4): physical removal of channels, neurons and attention heads.

Importing this package registers ``prune: {method: structured, ...}``; see
:mod:`netpress.prune.structured.prune` for the recipe keys.
"""

from netpress.prune.structured.prune import StructuredPruneConfig, kept, prune_structured

__all__ = ["StructuredPruneConfig", "kept", "prune_structured"]
