"""Config base and registry, recipes, targeting, typed errors and data adapters."""

from netpress.core.config import StageContext, TechniqueConfig, get_technique, register, techniques
from netpress.core.data import Batch, as_batches
from netpress.core.errors import (
    ArtifactError,
    ConstraintError,
    DataError,
    ModelError,
    NetpressError,
    RecipeError,
)
from netpress.core.recipe import Recipe, Stage
from netpress.core.targeting import select

__all__ = [
    "ArtifactError", "Batch", "ConstraintError", "DataError", "ModelError", "NetpressError",
    "Recipe", "RecipeError", "Stage", "StageContext", "TechniqueConfig", "as_batches",
    "get_technique", "register", "select", "techniques",
]
