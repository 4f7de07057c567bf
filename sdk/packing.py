"""Bit packing in the exact layout of ONNX Runtime's com.microsoft MatMulNBits.

Layout (docs/ContribOperators.md, re-checked by tests/test_packing_ort.py against a real session):

    B            uint8 [N, n_blocks, block_size * bits / 8]   codes along K, low bits first
    scales       float [N, n_blocks]
    zero_points  uint8 [N, ceil(n_blocks * bits / 8)]          one zero point per block, low bits first

with n_blocks = ceil(K / block_size). When K is not a multiple of the block size the last block is padded
with code 0 (the kernel reads only K values of A, so the padding never reaches the output).

Each pack function has an unpack mirror; `unpack(pack(x)) == x` exactly is a test.
"""

from __future__ import annotations

import numpy as np

from .errors import require


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 `values` (< 2**bits) into bytes, low bits first. Last axis must fill bytes."""
    per_byte = 8 // bits
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    out = (packed[..., None] >> shifts) & mask
    return out.reshape(*packed.shape[:-1], -1)


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Codes uint8 [N, K] -> MatMulNBits B uint8 [N, n_blocks, block_size*bits/8].

    Example:
        >>> pack_codes(np.array([[1, 2, 3, 0] * 4], np.uint8), bits=2, block_size=16).shape
        (1, 1, 4)
    """
    require(codes.ndim == 2, f"codes must be [N, K], got shape {codes.shape}")
    require(int(codes.max(initial=0)) < (1 << bits), f"codes exceed {bits} bits (max {int(codes.max())})")
    n, k = codes.shape
    nb = n_blocks(k, block_size)
    padded = np.zeros((n, nb * block_size), np.uint8)
    padded[:, :k] = codes
    return _pack_rows(padded.reshape(n, nb, block_size), bits)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Mirror of `pack_codes`: B [N, n_blocks, blob] -> codes uint8 [N, K]."""
    n = packed.shape[0]
    return _unpack_rows(packed, bits).reshape(n, -1)[:, :k]


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points uint8 [N, n_blocks] -> uint8 [N, ceil(n_blocks*bits/8)], low bits first."""
    n, nb = zero_points.shape
    per_byte = 8 // bits
    width = n_blocks(nb, per_byte) * per_byte
    padded = np.zeros((n, width), np.uint8)
    padded[:, :nb] = zero_points
    return _pack_rows(padded, bits)


def unpack_zero_points(packed: np.ndarray, bits: int, nb: int) -> np.ndarray:
    """Mirror of `pack_zero_points`."""
    return _unpack_rows(packed, bits)[:, :nb]
