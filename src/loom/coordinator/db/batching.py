"""Bounded IN-lists: no query's argument list grows with the network's size.

PostgreSQL refuses more than 32,767 bind parameters per statement and SQLite's default
limit is 32,766; a list of node or device ids is therefore sent in chunks of at most
:data:`CHUNK` ids, one query per chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

CHUNK = 1000


def chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size`` (none for an empty input)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
