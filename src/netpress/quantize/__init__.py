"""Quantization: the uniform affine scheme (Q1) and the registered quantize techniques.

Importing this package registers ``quantize: {method: int8_weight}``.
"""

from netpress.quantize.qscheme import QScheme, compute_qparams, dequantize, quantize, sqnr_db
from netpress.quantize.weight import WeightQuantConfig, quantize_int8_weight
from netpress.quantize import qat, binary, ternary, mixed  # noqa: F401, E402, I001  (Q5, Q7, Q8, Q9)
from netpress.quantize import weight_only, gptq, awq, dynamic  # noqa: F401, E402, I001  (Q4, Q6)
from netpress.quantize import ptq  # noqa: F401, E402, I001  (Q2/Q3: observers, static W8A8 PTQ)
from netpress.quantize import sharing  # noqa: F401, E402, I001  (A4: weight sharing, Deep Compression)

__all__ = [
    "QScheme",
    "WeightQuantConfig",
    "compute_qparams",
    "dequantize",
    "quantize",
    "quantize_int8_weight",
    "sqnr_db",
]
