"""Generator, exact product, digests and Merkle trees of the hardware challenge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.challenge.digest import (
    digest_in_leaf,
    leaf_bytes,
    round_digests,
    tile_digest,
)
from loom.core.challenge.generator import (
    MAT_A,
    MAT_B,
    MAX_K,
    exact_matmul_t,
    exact_matmul_t_int64,
    gen_int8,
    mix32,
)
from loom.core.challenge.merkle import MerkleTree, root_from_path, verify_path

SEED = bytes.fromhex("00112233445566778899aabbccddeeff") * 2


# ---------------------------------------------------------------- generator
@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.integers(0, 200), min_size=1, max_size=12),
    k0=st.integers(0, 16).map(lambda x: 4 * x),
    klen=st.integers(0, 16).map(lambda x: 4 * x),
    mat=st.sampled_from([MAT_A, MAT_B]),
)
def test_generator_is_identical_however_tiled(
    rows: list[int], k0: int, klen: int, mat: int
) -> None:
    full = gen_int8(SEED, mat, np.arange(201), 0, 128)
    part = gen_int8(SEED, mat, np.array(rows), k0, klen)
    assert part.dtype == np.int8
    np.testing.assert_array_equal(part, full[rows][:, k0 : k0 + klen])


def test_generator_depends_on_seed_matrix_and_position() -> None:
    a = gen_int8(SEED, MAT_A, np.arange(8), 0, 64)
    assert not np.array_equal(a, gen_int8(SEED, MAT_B, np.arange(8), 0, 64))
    other = bytes([SEED[0] ^ 1]) + SEED[1:]
    assert not np.array_equal(a, gen_int8(other, MAT_A, np.arange(8), 0, 64))
    last_word = bytes(SEED[:15]) + bytes([SEED[15] ^ 0x80]) + SEED[16:]
    assert not np.array_equal(a, gen_int8(last_word, MAT_A, np.arange(8), 0, 64))
    assert len({row.tobytes() for row in a}) == 8


def test_generator_bytes_look_uniform() -> None:
    a = gen_int8(SEED, MAT_A, np.arange(64), 0, 1024).astype(np.int64)
    counts = np.bincount(a.reshape(-1) + 128, minlength=256)
    expected = a.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 dof: mean 255, sd ≈ 22.6
    assert a.min() == -128
    assert a.max() == 127


def test_generator_rejects_unaligned_columns() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        gen_int8(SEED, MAT_A, [0], 2, 8)


def test_mix32_matches_plain_modular_arithmetic() -> None:
    xs = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF], dtype=np.int64)

    def plain(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x5BD1E995) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0x27D4EB2D) & 0xFFFFFFFF
        return x ^ (x >> 16)

    assert mix32(xs).tolist() == [plain(int(x)) for x in xs]
    assert mix32(0xDEADBEEF) == plain(0xDEADBEEF)


# ---------------------------------------------------------------- exact product
def test_exact_product_at_the_extremes() -> None:
    k = 4096
    a = np.full((2, k), -128, dtype=np.int8)
    bt = np.full((2, k), -128, dtype=np.int8)
    bt[1] = 127
    c = exact_matmul_t(a, bt)
    assert c.tolist() == [[k * 16384, -k * 16256]] * 2


def test_exact_product_matches_integer_reference() -> None:
    a = gen_int8(SEED, MAT_A, np.arange(16), 0, 2048)
    bt = gen_int8(SEED, MAT_B, np.arange(24), 0, 2048)
    np.testing.assert_array_equal(exact_matmul_t(a, bt), exact_matmul_t_int64(a, bt))


def test_exact_product_refuses_overflowing_k() -> None:
    a = np.zeros((1, MAX_K + 1), dtype=np.int8)
    with pytest.raises(ValueError, match="INT32"):
        exact_matmul_t(a, a)


# ---------------------------------------------------------------- digests
def _product(m: int, n: int, k: int) -> np.ndarray:
    return exact_matmul_t(
        gen_int8(SEED, MAT_A, np.arange(m), 0, k), gen_int8(SEED, MAT_B, np.arange(n), 0, k)
    )


def test_round_digests_equal_per_tile_digests_in_any_chunking() -> None:
    c, b = _product(32, 48, 64), 8
    whole = round_digests(c, 3, b)
    assert whole.shape == (4, 6, 2)
    np.testing.assert_array_equal(whole, round_digests(c, 3, b, chunk_elements=1))
    for ti in range(4):
        for tj in range(6):
            tile = c[ti * b : (ti + 1) * b, tj * b : (tj + 1) * b]
            assert digest_in_leaf(leaf_bytes(whole, ti), tj) == tile_digest(tile, 3, ti, tj)
    half = round_digests(c[16:], 3, b, first_tile_row=2)
    np.testing.assert_array_equal(half, whole[2:])


def test_digest_is_bound_to_position_and_value() -> None:
    tile = _product(8, 8, 64)
    d = tile_digest(tile, 1, 2, 3)
    assert len(d) == 8
    assert d != tile_digest(tile, 2, 2, 3)
    assert d != tile_digest(tile, 1, 3, 2)
    assert d != tile_digest(tile, 1, 2, 4)
    changed = tile.copy()
    changed[7, 7] += 1
    assert d != tile_digest(changed, 1, 2, 3)
    swapped = tile.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert d != tile_digest(swapped, 1, 2, 3)


# ---------------------------------------------------------------- Merkle
leaf_lists = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=37)


@settings(max_examples=60, deadline=None)
@given(leaves=leaf_lists, data=st.data())
def test_merkle_proofs_round_trip(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    path = tree.path(i)
    assert verify_path(leaves[i], i, len(leaves), path, tree.root)
    assert len(path) <= max(1, (len(leaves) - 1).bit_length())
    assert not verify_path(leaves[i] + b"x", i, len(leaves), path, tree.root)
    if path:
        j = data.draw(st.integers(0, len(path) - 1))
        bad = list(path)
        bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
        assert not verify_path(leaves[i], i, len(leaves), bad, tree.root)
        assert not verify_path(leaves[i], i, len(leaves), path[:-1], tree.root)
        assert not verify_path(leaves[i], i, len(leaves), [*path, path[0]], tree.root)
    if len(set(leaves)) == len(leaves) and len(leaves) > 1:
        other = (i + 1) % len(leaves)
        assert not verify_path(leaves[i], other, len(leaves), path, tree.root)


def test_merkle_domain_separation_and_no_duplicate_malleability() -> None:
    a, b, c = b"a", b"b", b"c"
    assert MerkleTree([a, b, c]).root != MerkleTree([a, b, c, c]).root
    two = MerkleTree([a, b])
    # An inner node presented as a leaf does not verify: leaves and nodes hash differently.
    inner = two.levels[0][0] + two.levels[0][1]
    assert MerkleTree([inner]).root != two.root
    assert root_from_path(a, 5, 2, []) is None
    assert root_from_path(a, 0, 2, [b"short"]) is None
    with pytest.raises(IndexError):
        two.path(2)
    with pytest.raises(ValueError, match="at least one leaf"):
        MerkleTree([])
