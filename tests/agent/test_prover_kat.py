"""Known-answer vectors: the bytes every prover backend must produce for a fixed challenge.

The vectors pin the wire format (challenge id, round seed, generator, digest, Merkle root).
They were produced by the NumPy implementation and are cross-checked here against a
scalar pure-Python re-implementation written straight from the definitions, so a change
to any of them is a protocol change. The PyTorch prover must reproduce them bit for bit.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from loom.agent.prover import NumpyProver, Prover, TorchProver, cuda_available, torch_available
from loom.core.challenge import ChallengeParams, ChallengeSpec, NonceRelease, round_seed
from loom.core.challenge.digest import leaf_bytes
from loom.core.challenge.generator import MAT_A, MAT_B, gen_int8

KAT_PARAMS = ChallengeParams(
    device_class="kat",
    m=64,
    n=64,
    k=64,
    tile=8,
    rounds=6,
    window=3,
    depth=1,
    lam=0.5,
    openings=8,
    openings_in_window=4,
    reference_rate=1e6,
)
KAT_SEED0 = bytes(range(16))
KAT_DEVICE = "kat-device"
KAT_NONCES = [bytes([0xA0 + r]) * 16 for r in range(KAT_PARAMS.rounds)]
KAT_CHALLENGE_ID = "13815a88d2dc205e8732f53eab614559"
# round -> (round seed, root, A row 0 [:16], Bt row 5 [:16], digest (0,0), digest (7,3))
KAT_ROUNDS = {
    0: (
        "6b4e2582674458befd6b0b8b74a2e9f2e2dae949957a0f745a2d59177d5a8531",
        "6c2ac440c0a8ef9a278d31451799a8146e715f88733c6ed6af9b5f1189b972c8",
        "3af658abbbf0210d598059e6ea8d05ff",
        "62cdb364fe42c58407d18c53df8d9c00",
        "9b30a57a85302e00",
        "13cac3e3084fcb67",
    ),
    1: (
        "26ba4f8da2adc47c291ca355cc98a98041fa67429040bd22190717d353b68782",
        "94a304230e327c03e818e75c4d15dde4d7b3276d21f2da365488fca9ff963f1b",
        "6bb649d032d297b2f754526a444ad6a1",
        "5462b532ef6e4716b630aca79adb1126",
        "95df7336363d1f57",
        "d390141625839fd8",
    ),
}


def _spec() -> ChallengeSpec:
    return ChallengeSpec.create(KAT_DEVICE, KAT_PARAMS, KAT_SEED0)


def _check_prover(prover: Prover) -> None:
    spec = prover.spec
    for r, (seed_hex, root_hex, _, _, d00, d73) in KAT_ROUNDS.items():
        prover.add_nonce(NonceRelease(challenge_id=spec.challenge_id, round=r, nonce=KAT_NONCES[r]))
        commit = prover.compute_round(r)
        assert round_seed(spec.challenge_id, spec.seed0, r, KAT_NONCES[r]).hex() == seed_hex
        opening = prover.open(r, 0, 0)
        assert opening.leaf[:8].hex() == d00
        assert prover.open(r, 7, 3).leaf[24:32].hex() == d73
        assert commit.root.hex() == root_hex, f"round {r} root differs"


def test_challenge_id_vector() -> None:
    assert _spec().challenge_id.hex() == KAT_CHALLENGE_ID


def test_generator_vectors() -> None:
    for r, (seed_hex, _, a0, bt5, _, _) in KAT_ROUNDS.items():
        rseed = bytes.fromhex(seed_hex)
        assert gen_int8(rseed, MAT_A, [0], 0, 16).tobytes().hex() == a0, r
        assert gen_int8(rseed, MAT_B, [5], 0, 16).tobytes().hex() == bt5, r


def test_numpy_prover_reproduces_vectors() -> None:
    _check_prover(NumpyProver(_spec(), lambda _m: bytes(64)))


# ---------------------------------------------------------------- independent reference
M32 = 0xFFFFFFFF
K1, K2, K3, K4, K5 = 0x5BD1E995, 0x27D4EB2D, 0x165667B1, 0x61C88647, 0x2545F491


def _mix(x: int) -> int:
    x ^= x >> 16
    x = (x * K1) & M32
    x ^= x >> 13
    x = (x * K2) & M32
    return x ^ (x >> 16)


def _py_element(rseed: bytes, mat: int, row: int, col: int) -> int:
    s = [int.from_bytes(rseed[4 * i : 4 * i + 4], "little") for i in range(4)]
    h = _mix(((row * K3) & M32) ^ s[0] ^ mat)
    for word in s[1:]:
        h = _mix(h ^ word)
    w = col // 4
    h = _mix(_mix(h ^ ((w * K4) & M32)))
    return ((h >> (8 * (col % 4))) & 0xFF) - 128


def _py_digest(tile: list[list[int]], r: int, ti: int, tj: int) -> bytes:
    rk = _mix(_mix(r ^ 0x6C6F6F6D) ^ 0x7F4A7C15)
    tk = _mix(_mix(rk ^ ti) ^ tj)
    out = b""
    for lane_key in (0x3C6EF372, 0x1B873593):
        acc = 0
        for e, value in enumerate(v for row in tile for v in row):
            x = value & M32
            p = _mix(tk ^ ((e * K5) & M32) ^ lane_key)
            y = _mix(x ^ p)
            acc = (acc + _mix((y + x) & M32)) & M32
        out += acc.to_bytes(4, "little")
    return out


def test_vectors_match_scalar_python_reference() -> None:
    """Tile (7, 3) of round 1, computed element by element with Python integers."""
    seed_hex, *_, d73 = KAT_ROUNDS[1]
    rseed = bytes.fromhex(seed_hex)
    b, k = KAT_PARAMS.tile, KAT_PARAMS.k
    a = [[_py_element(rseed, 0x1A2B3C4D, 7 * b + i, c) for c in range(k)] for i in range(b)]
    bt = [[_py_element(rseed, 0x5E6F7081, 3 * b + j, c) for c in range(k)] for j in range(b)]
    tile = [[sum(x * y for x, y in zip(ai, bj, strict=True)) for bj in bt] for ai in a]
    assert _py_digest(tile, 1, 7, 3).hex() == d73
    np_a = gen_int8(rseed, MAT_A, np.arange(7 * b, 8 * b), 0, k)
    assert np_a.tolist() == a


def test_merkle_root_vector_from_leaves() -> None:
    """The root is the documented tree over the round's leaves (domain-separated SHA-256)."""
    prover = NumpyProver(_spec(), lambda _m: bytes(64))
    prover.add_nonce(
        NonceRelease(challenge_id=prover.spec.challenge_id, round=0, nonce=KAT_NONCES[0])
    )
    commit = prover.compute_round(0)
    leaves = [leaf_bytes(prover._digests[0], ti) for ti in range(KAT_PARAMS.tile_rows)]
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:  # 8 leaves: a perfect tree
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level), 2)
        ]
    assert level[0] == commit.root


# ---------------------------------------------------------------- PyTorch backend
requires_torch = pytest.mark.skipif(
    not torch_available(), reason="PyTorch is not installed (optional GPU prover dependency)"
)


@requires_torch
def test_torch_prover_on_cpu_reproduces_vectors() -> None:
    _check_prover(TorchProver(_spec(), lambda _m: bytes(64), device="cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs PyTorch with a CUDA GPU")
def test_torch_prover_on_cuda_reproduces_vectors() -> None:
    prover = TorchProver(_spec(), lambda _m: bytes(64), device="cuda")
    assert prover.use_int_mm, "torch._int_mm should be used on CUDA for these shapes"
    _check_prover(prover)
