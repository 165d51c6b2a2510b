"""Facts about this machine's CPU, without importing torch (a warm simulation's main process never does)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def has_native_bf16() -> bool:
    """This CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16, from /proc/cpuinfo): torch's
    bf16 kernels are then faster than fp32; elsewhere they are emulated and slower. A machine fact, read once."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
