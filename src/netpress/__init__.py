"""netpress: PyTorch model compression, measured for real.

The public API:
    * :func:`compress` — run a recipe (YAML/JSON path, dict or :class:`Recipe`) and write an artifact.
    * :func:`load` — rebuild the compressed model from an artifact directory, without pickle.
    * :func:`prune`, :func:`quantize` — apply one technique to a model in Python.
    * :class:`Recipe`, :func:`techniques` and the typed errors.

Example:
    >>> import torch.nn as nn
    >>> import netpress
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> model = netpress.prune(model, {"method": "magnitude", "sparsity": 0.5})
    >>> float((model[0].weight == 0).float().mean())
    0.5
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The technique subpackages are imported first: the functions `prune` / `quantize` below then
# shadow the subpackage attributes for good (a later `import netpress.prune` does not rebind them).
import netpress.prune  # noqa: E402, F401
import netpress.quantize  # noqa: E402, F401
from netpress.api import load, prune, quantize  # noqa: E402
from netpress.core import (  # noqa: E402
    ArtifactError,
    ConstraintError,
    DataError,
    ModelError,
    NetpressError,
    Recipe,
    RecipeError,
    techniques,
)
from netpress.pipeline import compress, evaluate_dir  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ConstraintError",
    "DataError",
    "ModelError",
    "NetpressError",
    "Recipe",
    "RecipeError",
    "compress",
    "evaluate_dir",
    "load",
    "prune",
    "quantize",
    "techniques",
    "__version__",
]
