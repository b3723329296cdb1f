"""Counter-based INT8 matrix generator and the exact INT8×INT8→INT32 product.

The generator is a pure function of (round seed, matrix id, row index, column index), so any
block of a matrix can be produced on its own and the bytes are the same however the matrix
is tiled. All arithmetic is on int64 with only ``+ * ^ >> &`` and every multiplication
operand below 2³¹, so the very same expressions run unchanged on NumPy arrays (verifier,
CPU prover) and on ``torch.int64`` tensors (GPU prover): :func:`mix32`, :func:`row_state`
and :func:`word_hash` are written to be backend-agnostic for that reason.

Layout (``hardware-challenge.md`` §6.3):

* ``A`` is M×K, element (i, k) = byte ``k mod 4`` of ``word_hash(row_state(A, i), k // 4)``
  minus 128;
* ``B`` is K×N and is generated **per column**: B(k, j) is built like A with row index j
  and matrix id ``MAT_B``. We therefore always handle ``Bt`` (N×K) and compute
  ``C = A @ Bt.T``.
* The round seed is 128 bits (four 32-bit words); all four words are folded into the
  per-row state, so two rounds with different seeds share no rows (up to 32-bit state
  collisions, which buy a cheater nothing: products need the pair of row and column).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

M32 = 0xFFFFFFFF
"""Mask for the low 32 bits."""

# 31-bit odd multipliers: a 32-bit value times one of these stays below 2**63.
K1 = 0x5BD1E995
K2 = 0x27D4EB2D
K3 = 0x165667B1
K4 = 0x61C88647

MAT_A = 0x1A2B3C4D
MAT_B = 0x5E6F7081

MAX_K = 131071
"""Largest inner dimension for which |C| ≤ K·128² fits a signed INT32."""

_T = TypeVar("_T")

Int64Array = npt.NDArray[np.int64]
Int8Array = npt.NDArray[np.int8]
Int32Array = npt.NDArray[np.int32]


def _mul32(x: Any, k: int) -> Any:
    """``x * k mod 2**32`` for x in [0, 2**32) and k < 2**31, without int64 overflow."""
    return ((x & 0x7FFFFFFF) * k + (((x >> 31) * k) << 31)) & M32


def mix32(x: _T) -> _T:
    """32-bit avalanche (murmur-style) on int64 values in [0, 2**32).

    Backend-agnostic: works on Python ints, NumPy int64 arrays and torch int64 tensors.
    """
    y: Any = x
    y = y ^ (y >> 16)
    y = _mul32(y, K1)
    y = y ^ (y >> 13)
    y = _mul32(y, K2)
    y = y ^ (y >> 16)
    result: _T = y
    return result


def seed_words(round_seed: bytes) -> tuple[int, int, int, int]:
    """The four little-endian 32-bit words of the first 16 bytes of a round seed."""
    if len(round_seed) < 16:
        raise ValueError("round seed must be at least 16 bytes")
    return (
        int.from_bytes(round_seed[0:4], "little"),
        int.from_bytes(round_seed[4:8], "little"),
        int.from_bytes(round_seed[8:12], "little"),
        int.from_bytes(round_seed[12:16], "little"),
    )


def row_state(words: tuple[int, int, int, int], mat: int, rows: _T) -> _T:
    """32-bit state of each row (int64 array/tensor of row indices < 2**31)."""
    s0, s1, s2, s3 = words
    r: Any = rows
    h: Any = mix32(((r * K3) & M32) ^ (s0 ^ mat))
    h = mix32(h ^ s1)
    h = mix32(h ^ s2)
    h = mix32(h ^ s3)
    result: _T = h
    return result


def word_hash(state: _T, words: Any) -> _T:
    """32-bit hash of column word ``words`` (index k // 4) of the rows whose state is given.

    Broadcasts like the operands: pass ``state[:, None]`` and ``words[None, :]``. Word
    indices are below K/4 < 2¹⁵, so ``words * K4`` cannot overflow.
    """
    s: Any = state
    h: Any = mix32(s ^ ((words * K4) & M32))
    result: _T = mix32(h)
    return result


def gen_int8(round_seed: bytes, mat: int, rows: npt.ArrayLike, k0: int, klen: int) -> Int8Array:
    """Rows ``rows`` × columns ``k0 .. k0+klen`` of the seeded matrix ``mat``, as int8.

    ``rows`` are indices along M for ``A`` and along N for ``B`` (``Bt``). ``k0`` and
    ``klen`` must be multiples of 4 (one 32-bit hash yields four int8 values).
    """
    if k0 % 4 or klen % 4 or k0 < 0 or klen < 0:
        raise ValueError("k0 and klen must be non-negative multiples of 4")
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    state = row_state(seed_words(round_seed), mat, r)
    w = np.arange(k0 // 4, (k0 + klen) // 4, dtype=np.int64)
    h = word_hash(state[:, None], w[None, :])
    out = np.empty((r.shape[0], klen // 4, 4), dtype=np.int8)
    for t in range(4):
        out[:, :, t] = (((h >> (8 * t)) & 0xFF) - 128).astype(np.int8)
    return out.reshape(r.shape[0], klen)


def exact_matmul_t(a: Int8Array, bt: Int8Array) -> Int32Array:
    """Exact ``a @ bt.T`` for int8 operands, as int32.

    Uses float64 BLAS: every product is an integer of magnitude ≤ 2¹⁴ and every partial
    sum, in any summation order (blocked, FMA, pairwise), is an integer of magnitude
    ≤ K·2¹⁴ ≤ 2³¹ < 2⁵³, so each floating-point operation is exact. This is *not* true of
    float32 (2²⁴), which is why float32 is never used here.
    """
    if a.ndim != 2 or bt.ndim != 2 or a.shape[1] != bt.shape[1]:
        raise ValueError(f"shapes do not match: {a.shape} and {bt.shape}ᵀ")
    if a.shape[1] > MAX_K:
        raise ValueError(f"K={a.shape[1]} exceeds {MAX_K}: INT32 could overflow")
    c = a.astype(np.float64) @ bt.astype(np.float64).T
    return c.astype(np.int32)


def exact_matmul_t_int64(a: Int8Array, bt: Int8Array) -> Int32Array:
    """Slow integer-only reference for :func:`exact_matmul_t` (used by tests)."""
    c = a.astype(np.int64) @ bt.astype(np.int64).T
    return c.astype(np.int32)
