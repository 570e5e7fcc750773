"""Low-rank decomposition (SPEC L1, L2). Importing this package registers ``lowrank: {method: svd |
tucker}``."""

from netpress.lowrank.svd import SvdConfig, factorize_linear, lowrank_svd, svd_rank
from netpress.lowrank.tucker import TuckerConfig, decompose_conv, lowrank_tucker, tucker2

__all__ = ["SvdConfig", "TuckerConfig", "decompose_conv", "factorize_linear", "lowrank_svd",
           "lowrank_tucker", "svd_rank", "tucker2"]
