"""SHA-256 Merkle trees over one round's leaves, with leaf/node domain separation.

* leaf hash ``H(0x00 ‖ leaf)``, node hash ``H(0x01 ‖ left ‖ right)``, so a node can never
  be passed off as a leaf or the other way round;
* an odd node at the end of a level is carried up unchanged (never duplicated), so no two
  leaf lists of the same length share a root (the duplicated-last-node malleability of
  Bitcoin-style trees does not exist here);
* a proof is checked against a known leaf count, so its shape is fixed by (index, count)
  and its length must match exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_BYTES = 32


def hash_leaf(leaf: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def hash_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class MerkleTree:
    """All levels of the tree over ``leaves`` (kept to answer openings)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        level = [hash_leaf(leaf) for leaf in leaves]
        self.levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
            self.levels.append(level)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def leaf_count(self) -> int:
        return len(self.levels[0])

    def path(self, index: int) -> list[bytes]:
        """Sibling hashes from the leaf up, skipping levels where the node is carried."""
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"leaf index {index} outside 0..{self.leaf_count - 1}")
        out: list[bytes] = []
        idx = index
        for level in self.levels[:-1]:
            size = len(level)
            if not (idx == size - 1 and size % 2):
                out.append(level[idx ^ 1])
            idx //= 2
        return out


def root_from_path(leaf: bytes, index: int, leaf_count: int, path: Sequence[bytes]) -> bytes | None:
    """The root that ``leaf`` at ``index`` and ``path`` lead to, or None if malformed."""
    if leaf_count < 1 or not 0 <= index < leaf_count:
        return None
    h = hash_leaf(leaf)
    idx, size, used = index, leaf_count, 0
    while size > 1:
        if not (idx == size - 1 and size % 2):
            if used >= len(path) or len(path[used]) != HASH_BYTES:
                return None
            sibling = path[used]
            used += 1
            h = hash_node(h, sibling) if idx % 2 == 0 else hash_node(sibling, h)
        idx //= 2
        size = (size + 1) // 2
    if used != len(path):
        return None
    return h


def verify_path(
    leaf: bytes, index: int, leaf_count: int, path: Sequence[bytes], root: bytes
) -> bool:
    """True when ``path`` proves that ``leaf`` sits at ``index`` under ``root``."""
    return root_from_path(leaf, index, leaf_count, path) == root
