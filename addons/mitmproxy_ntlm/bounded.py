"""Bounded per-key memory: traces, rejections, CONNECT flows, PAC answers, what peers offer.

A proxy runs for weeks and meets unbounded numbers of connections and peers; every map keyed by
them keeps only the most recent entries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def bounded_set(store: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert or refresh `key`, dropping the oldest entries beyond `limit`."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)
