"""Quantization: the uniform affine scheme (Q1) and the registered quantize techniques.

Importing this package registers every ``quantize: {method: ...}``: int8_weight; ptq (Q2/Q3 static
W8A8 with observers); dynamic (Q4); qat (Q5); rtn, gptq, awq (Q6); binary (Q7); ternary (Q8);
mixed (Q9); weight_sharing and entropy_code (A4 Deep Compression).
"""

from netpress.quantize import (  # noqa: F401  (imported to register their techniques)
    awq,
    binary,
    dynamic,
    gptq,
    mixed,
    ptq,
    qat,
    sharing,
    smooth,
    ternary,
    weight_only,
)
from netpress.quantize.qscheme import QScheme, compute_qparams, dequantize, quantize, sqnr_db
from netpress.quantize.weight import WeightQuantConfig, quantize_int8_weight

__all__ = [
    "QScheme",
    "WeightQuantConfig",
    "compute_qparams",
    "dequantize",
    "quantize",
    "quantize_int8_weight",
    "sqnr_db",
]
