"""ggml's block quantizations -> float32, vectorized over all blocks of a tensor with numpy.

A quantized tensor is a run of fixed-size blocks along its last (contiguous) dimension: `block` elements in
`nbytes` bytes each (gguf.GGML_QUANT_SIZES). Each decoder below takes the blocks as a [blocks, nbytes] uint8
array and returns [blocks, block] float32, doing the arithmetic in the order ggml's reference C decoder does
(`d * q`, `(d * scale) * q - dmin * min`, ...), so the floats come out bit for bit the same as llama.cpp's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of each block, as float32 [blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles (ggml's 4-bit layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.int8) - 8).astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 `qh` is the fifth bit of element j, as 16 or 0."""
    word = np.ascontiguousarray(qh).view("<u4")
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    return _f16(b, 0) * (q.astype(np.int8) - 16).astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_sub_blocks(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 128 bytes -> [blocks, 8, 32]: each 32 bytes give sub-block 2j (low nibbles), 2j+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _k_sub_blocks(b[:, 16:144]).astype(np.float32)
    out = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return out.reshape(-1, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    scales, mins = _k_scales_mins(b[:, 4:16])
    # bit i of qh[l] is the fifth bit of element l of sub-block i
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (_k_sub_blocks(b[:, 48:176]) | (high << 4)).astype(np.float32)
    out = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return out.reshape(-1, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # Two halves of 128 elements; in half n, element 32k + l (k < 4, l < 32) takes the low or high nibble
    # (k // 2) of ql[64n + 32(k % 2) + l], bits 2k..2k+1 of qh[32n + l] above it, and scale 8n + 2k + l // 16.
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    high = (b[:, None, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(-1, 2, 4, 2, 16)
    scales = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)
    return ((_f16(b, 208)[:, :, None, None, None] * scales) * q).reshape(-1, 256)


def _two_bit_groups(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: 64 bytes -> [blocks, 2, 4, 32]: in half n, bits 2j..2j+1 of qs[32n + l] for group j."""
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def _q2_k(b: np.ndarray) -> np.ndarray:
    # Element 32j + 16h + r of half n: 2-bit value, 4-bit scale and min from byte 8n + 2j + h of `scales`.
    q = _two_bit_groups(b[:, 16:80]).astype(np.float32).reshape(-1, 2, 4, 2, 16)
    s = b[:, 0:16].reshape(-1, 2, 4, 2, 1)
    d, dmin = _f16(b, 80)[:, :, None, None, None], _f16(b, 82)[:, :, None, None, None]
    return ((d * (s & 0x0F).astype(np.float32)) * q - dmin * (s >> 4).astype(np.float32)).reshape(-1, 256)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: 12 bytes -> 16 six-bit scales, less 32: low nibbles of bytes 0-7, then high nibbles, each with
    two bits from bytes 8-11 above it."""
    top = s[:, 8:12]
    low = np.concatenate([s[:, 0:4] & 0x0F, s[:, 4:8] & 0x0F, s[:, 0:4] >> 4, s[:, 4:8] >> 4], axis=1)
    high = np.concatenate([top & 3, (top >> 2) & 3, (top >> 4) & 3, (top >> 6) & 3], axis=1)
    return ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)


def _q3_k(b: np.ndarray) -> np.ndarray:
    # Element 32j + 16h + r of half n: 2 bits from qs, minus 4 unless bit 4n + j of hmask[16h + r] is set,
    # times scale 8n + 2j + h.
    mask_bits = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _two_bit_groups(b[:, 32:96]).astype(np.int8) - 4 * (1 - mask_bits.reshape(-1, 2, 4, 32).astype(np.int8))
    scales = _q3_k_scales(b[:, 96:108]).reshape(-1, 2, 4, 2, 1)
    d = _f16(b, 108)[:, :, None, None, None]
    return ((d * scales) * q.astype(np.float32).reshape(-1, 2, 4, 2, 16)).reshape(-1, 256)


_BLOCK_DECODERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
_PLAIN = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64}
SUPPORTED_TYPES: tuple[T, ...] = (*_PLAIN, T.BF16, *_BLOCK_DECODERS)


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw bytes (uint8) in ggml type `qtype` -> float32 array of the row-major `shape`."""
    qtype = T(qtype)
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"ggml type {qtype.name} cannot be dequantized by sgjax (supported: {names})")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape))
    if shape and shape[-1] % block:
        raise ValueError(f"a {qtype.name} tensor's rows must be a multiple of {block} elements; shape is {shape}")
    if raw.size != count // block * nbytes:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {count // block * nbytes} bytes, "
                         f"got {raw.size}")
    raw = np.ascontiguousarray(raw).reshape(-1)
    if qtype in _PLAIN:
        return raw.view(_PLAIN[qtype]).astype(np.float32).reshape(shape)
    if qtype == T.BF16:  # bfloat16 is the top half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return _BLOCK_DECODERS[qtype](raw.reshape(-1, nbytes)).reshape(shape)
