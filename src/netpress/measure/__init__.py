"""netpress.measure: parameters, non-zeros, MACs, bytes on disk, latency and task metrics.

Example:
    >>> import torch
    >>> from netpress.measure import count_params
    >>> count_params(torch.nn.Linear(4, 3))
    15
"""

from netpress.measure.count import count_nonzero, count_params
from netpress.measure.latency import LatencyResult, latency_onnx, latency_torch
from netpress.measure.macs import count_macs, macs_by_layer
from netpress.measure.metrics import (
    METRICS,
    collect_outputs,
    compute_metric,
    confident_agreement,
    first_tensor,
)
from netpress.measure.size import file_bytes, state_dict_bytes

__all__ = [
    "METRICS",
    "LatencyResult",
    "collect_outputs",
    "compute_metric",
    "confident_agreement",
    "count_macs",
    "count_nonzero",
    "count_params",
    "file_bytes",
    "first_tensor",
    "latency_onnx",
    "latency_torch",
    "macs_by_layer",
    "state_dict_bytes",
]
