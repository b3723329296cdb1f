"""Position-bound 64-bit digests of b×b output tiles, and leaf encoding.

``digest(T, r, ti, tj)`` is two 32-bit lanes. For lane key ``L`` and each element ``x`` (the
INT32 value as an unsigned 32-bit word) at in-tile index ``e = u·b + v``::

    p = mix32(tk(r, ti, tj) ^ (e·K5 mod 2³²) ^ L)      # position key, data independent
    y = mix32(x ^ p)
    y = mix32((y + x) mod 2³²)                          # second, x-dependent round
    lane = Σ y  mod 2³²

* The tile key ``tk`` binds round and tile coordinates, so digests cannot be moved between
  tiles or rounds.
* The mix is non-linear in ``x``, which rules out the linear-sketch shortcut
  ``Σ w·(A_i B_j) = A_i (B_j w)``.
* Collision resistance is not needed: the verifier recomputes the true tile and compares.

Leaf ``(r, ti)`` is the concatenation over ``tj`` of the tile digests of tile-row ``ti``,
each encoded as lane 0 then lane 1, little-endian uint32: ``8·N/b`` bytes.

:func:`tile_key` and :func:`digest_terms` are backend-agnostic (NumPy or torch int64).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from loom.core.challenge.generator import M32, Int32Array, mix32

K5 = 0x2545F491
DIGEST_DOMAIN = 0x6C6F6F6D  # "loom"
LANE_KEYS = (0x3C6EF372, 0x1B873593)
DIGEST_BYTES = 8

_T = TypeVar("_T")

DigestArray = npt.NDArray[np.uint32]
"""Round digests: shape (M/b, N/b, 2), uint32 lanes."""


def round_key(round_index: int) -> int:
    """32-bit key of a round (Python int)."""
    if not 0 <= round_index <= M32:
        raise ValueError("round index out of range")
    return mix32(mix32(round_index ^ DIGEST_DOMAIN) ^ 0x7F4A7C15)


def tile_key(round_index: int, ti: _T, tj: Any) -> _T:
    """32-bit key of tile (ti, tj) of a round; ``ti``/``tj`` may be ints or int64 arrays."""
    t: Any = ti
    h: Any = mix32(round_key(round_index) ^ t)
    result: _T = mix32(h ^ tj)
    return result


def digest_terms(x: _T, tk: Any, e: Any, lane_key: int) -> _T:
    """Per-element terms of one lane; the lane is their sum mod 2³².

    ``x``: element values as int64 in [0, 2³²); ``tk``: tile keys broadcastable to ``x``;
    ``e``: in-tile element indices broadcastable to ``x``.
    """
    xv: Any = x
    p = mix32(tk ^ ((e * K5) & M32) ^ lane_key)
    y = mix32(xv ^ p)
    result: _T = mix32((y + xv) & M32)
    return result


def tile_digest(tile: npt.NDArray[Any], round_index: int, ti: int, tj: int) -> bytes:
    """8-byte digest of one b×b INT32 tile at position (round, ti, tj)."""
    if tile.ndim != 2 or tile.shape[0] != tile.shape[1]:
        raise ValueError("a tile must be a square 2-D array")
    x = tile.astype(np.int64).reshape(-1) & M32
    e = np.arange(x.shape[0], dtype=np.int64)
    tk = tile_key(round_index, ti, tj)
    lanes = [int(digest_terms(x, tk, e, key).sum()) & M32 for key in LANE_KEYS]
    return np.array(lanes, dtype="<u4").tobytes()


def round_digests(
    c: Int32Array,
    round_index: int,
    tile: int,
    *,
    first_tile_row: int = 0,
    chunk_elements: int = 1 << 21,
) -> DigestArray:
    """Digests of every tile of ``c`` (rows of a round's product, int32): (rows/b, N/b, 2).

    ``c`` may be a horizontal slice of C starting at tile-row ``first_tile_row``. Works in
    blocks of tile-rows to bound the int64 temporaries.
    """
    m, n = c.shape
    b = tile
    if m % b or n % b:
        raise ValueError(f"{m}×{n} is not a multiple of the tile size {b}")
    tr_total, tc = m // b, n // b
    out = np.empty((tr_total, tc, 2), dtype=np.uint32)
    e = np.arange(b * b, dtype=np.int64)[None, None, :]
    rows_per_chunk = max(1, chunk_elements // (n * b))
    tj = np.arange(tc, dtype=np.int64)[None, :]
    for t0 in range(0, tr_total, rows_per_chunk):
        t1 = min(tr_total, t0 + rows_per_chunk)
        block = c[t0 * b : t1 * b].astype(np.int64) & M32
        x = block.reshape(t1 - t0, b, tc, b).transpose(0, 2, 1, 3).reshape(t1 - t0, tc, b * b)
        ti = np.arange(first_tile_row + t0, first_tile_row + t1, dtype=np.int64)[:, None]
        tk = tile_key(round_index, ti, tj)[:, :, None]
        for lane, key in enumerate(LANE_KEYS):
            out[t0:t1, :, lane] = (digest_terms(x, tk, e, key).sum(axis=-1) & M32).astype(np.uint32)
    return out


def leaf_bytes(digests: DigestArray, ti: int) -> bytes:
    """Leaf ``ti`` of a round: the tile-row's digests, little-endian uint32 lanes."""
    return np.ascontiguousarray(digests[ti], dtype="<u4").tobytes()


def digest_in_leaf(leaf: bytes, tj: int) -> bytes:
    """The 8-byte digest of tile column ``tj`` inside a leaf."""
    start = tj * DIGEST_BYTES
    if tj < 0 or start + DIGEST_BYTES > len(leaf):
        raise ValueError("tile column outside the leaf")
    return leaf[start : start + DIGEST_BYTES]
