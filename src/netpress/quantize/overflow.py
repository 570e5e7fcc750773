"""int8 overflow on CPUs without VNNI, and the weight range that avoids it.

x86-64 CPUs without VNNI (AVX2, or AVX-512 without ``avx512_vnni``: e.g. the AMD EPYC that
netpress's CI runs on) multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds
each *pair* of products into a saturating int16: ``2·255·127 = 64770`` does not fit in 32767, so
an int8 layer can come out wrong. Both runtimes netpress measures are affected:

  * ONNX Runtime: :func:`netpress.export.onnx.make_session` turns on its exact u8·u8 kernels
    (``session.x64quantprecision``) where :func:`u8s8_saturates`;
  * OpenVINO (oneDNN) has no such switch. The documented remedy (NNCF's ``overflow_fix``) is on
    the quantizer's side: 7-bit weight codes (``|q| <= 63``, so ``2·255·63 = 32130`` fits),
    still stored and executed as int8.

``weights: {overflow_fix: auto | on | off}`` of ``ptq``, ``smoothquant`` and ``qat`` picks the
8-bit weight range: ``auto`` (default) uses 7-bit codes when *this* CPU saturates (where netpress
measures), ``on`` always (for a deployment target without VNNI), ``off`` never (VNNI/AMX targets;
the full int8 range). Weights of fewer than 8 bits never overflow and are left alone. Measured on
that EPYC, the W8A8 test CNN of ``tests/test_ptq.py`` on OpenVINO: 8.4 % of the output range off
the integer simulation with 8-bit codes, 0.30 % with 7-bit codes. MobileNetV2, default ``ptq``,
400 held-out photo crops, top-1 agreement with fp32 (all / where fp32's max-prob >= 0.5):
8-bit codes on OpenVINO 0.5925 / 0.8177 while their torch simulation gives 0.8325 / 0.9704 (the
runtime, not the model, is wrong; ONNX Runtime's exact kernels 0.8275 / 0.9557, its default ones
0.6475 / 0.8818); 7-bit codes 0.7525 / 0.9458 on OpenVINO, as their simulation. The bit could
come off the activations instead (``activations: {bits: 7}``, ``overflow_fix: off``; the QDQ
export puts a ``Clip`` at 0..127 before their QuantizeLinear): OpenVINO 0.7975 / 0.9409 against
its simulation's 0.8175 / 0.9458, better on all crops but not on the confident ones, and still
off the simulation, so it is not the default.

Example:
    >>> weight_qmax(8, "off"), weight_qmax(8, "on"), weight_qmax(4, "on")
    (127, 63, 7)
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

OverflowFix = Literal["auto", "on", "off"]


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this CPU sums int8 products in saturating int16 pairs: x86-64 without VNNI (no
    ``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` flag). Reads ``/proc/cpuinfo``; ``False``
    elsewhere (ARM, other systems).

    Example:
        >>> isinstance(u8s8_saturates(), bool)
        True
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), None)
    return flags is not None and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def weight_bits(bits: int, fix: OverflowFix) -> int:
    """The weight code width to use: 7 for 8-bit weights when the fix applies, else ``bits``."""
    applies = fix == "on" or (fix == "auto" and u8s8_saturates())
    return 7 if bits == 8 and applies else bits


def weight_qmax(bits: int, fix: OverflowFix) -> int:
    """The largest symmetric weight code, ``2^(b-1) - 1`` with ``b = weight_bits(bits, fix)``."""
    return (1 << (weight_bits(bits, fix) - 1)) - 1


def overflow_note(bits: int, fix: OverflowFix) -> str | None:
    """One report line when the fix changed the weight range, else ``None``."""
    if weight_bits(bits, fix) == bits:
        return None
    why = "this CPU has no VNNI" if fix == "auto" else "overflow_fix: on"
    return (f"8-bit weights use 7-bit codes (|q| <= 63, int8 storage): {why}, and its int8 "
            "kernels add pairs of products in saturating int16 (set overflow_fix: off for a "
            "VNNI/AMX target)")


__all__ = ["OverflowFix", "overflow_note", "u8s8_saturates", "weight_bits", "weight_qmax"]
