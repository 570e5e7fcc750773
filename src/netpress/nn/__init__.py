"""netpress's own serializable modules and the spec registry that rebuilds modules without pickle.

Example:
    >>> import torch.nn as nn
    >>> from netpress.nn import QuantLinear, build_module, module_spec
    >>> q = QuantLinear.from_float(nn.Linear(8, 4))
    >>> module_spec(q)["class"]
    'netpress.nn.QuantLinear'
    >>> type(build_module(module_spec(q))).__name__
    'QuantLinear'
"""

from netpress.nn.lowbit import DynamicQuantLinear, LowBitLinear  # noqa: F401  (Q4, Q6)
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear  # noqa: F401  (Q3 static W8A8 PTQ)
from netpress.nn.qat import PackedConv1d, PackedConv2d, PackedLinear  # noqa: F401  (Q5/Q7/Q8/Q9)
from netpress.nn.quant import QUANT_CLASSES, QuantConv1d, QuantConv2d, QuantLinear
from netpress.nn.registry import (
    TORCH_MODULES,
    build_module,
    is_serializable,
    module_spec,
    serializable,
)
from netpress.nn.shared import SharedConv, SharedLinear  # noqa: F401  (A4 weight sharing)
from netpress.nn.smooth import SmoothQuantLinear  # noqa: F401  (Q3 SmoothQuant W8A8)
from netpress.nn.structured import PrunedBertSelfAttention  # noqa: F401  (P4 heads)

__all__ = [
    "QUANT_CLASSES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "TORCH_MODULES",
    "build_module",
    "is_serializable",
    "module_spec",
    "serializable",
]
