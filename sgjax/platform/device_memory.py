"""Device memory as the CUDA driver reports it, for when XLA's allocator does not say.

XLA's VMM allocator (used with SKIP_TEMP command buffers, see xla_flags.py) reports no `bytes_limit`
in `memory_stats()`, so the engine could not size its KV pool from it. The driver knows the device's
total and free memory; this asks it through ctypes (no extra package), in XLA's own primary context.
The allocator still keeps to JAX's share of the device (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by
default): on an H100, a pool sized from the whole 85 GB ran out of its "PA budget" of 63.8 GB.
"""

from __future__ import annotations

import ctypes
import os

DEFAULT_CLIENT_MEM_FRACTION = 0.75  # JAX's default share of a GPU's memory


def xla_memory_limit(total_bytes: int) -> int:
    """The bytes XLA's allocator may use on a device of `total_bytes` (JAX's client memory fraction)."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_CLIENT_MEM_FRACTION))
    return int(total_bytes * fraction)


def cuda_memory_info(ordinal: int) -> tuple[int, int] | None:
    """(free, total) bytes of the CUDA device with this ordinal, or None where no driver answers."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, context = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), ordinal):
        return None
    if lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
        return None
    try:
        if lib.cuCtxPushCurrent_v2(context):
            return None
        try:
            if lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)):
                return None
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(device)
    return free.value, total.value


def host_available_bytes() -> int | None:
    """Memory the host can still give without swapping (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
