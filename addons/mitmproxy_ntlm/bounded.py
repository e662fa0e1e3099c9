"""Bounded per-key memory: traces, rejections, CONNECT flows, PAC answers, what peers offer.

A proxy runs for weeks and meets unbounded numbers of connections and peers; every map keyed by
them keeps only the most recent entries.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def bounded_set(store: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert or refresh `key`, dropping the oldest entries beyond `limit`."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)


def approx_size(obj: Any, depth: int = 0) -> int:
    """Bytes `obj` holds, roughly: containers and dataclasses summed over their contents
    (a few levels deep), everything else by `sys.getsizeof`."""
    size = sys.getsizeof(obj)
    if depth >= 4 or isinstance(obj, str | bytes | bytearray | int | float):
        return size
    if isinstance(obj, dict):
        return size + sum(approx_size(k, depth + 1) + approx_size(v, depth + 1)
                          for k, v in obj.items())
    if isinstance(obj, tuple | list | set | frozenset):
        return size + sum(approx_size(x, depth + 1) for x in obj)
    if dataclasses.is_dataclass(obj):
        return size + sum(approx_size(getattr(obj, f.name), depth + 1)
                          for f in dataclasses.fields(obj))
    return size


class BoundedMap(Generic[K, V]):
    """A dict for state keyed by what clients send (users, connections): it keeps at most
    `max_entries` entries and about `max_bytes` (keys and values, by `approx_size`), dropping
    the least recently stored first, and forgets entries not stored again for `ttl` seconds.

    Storing the very object a key already holds only refreshes it (no new size estimate), so
    objects that grow after they are stored are measured once, when first stored; `size`
    replaces `approx_size` for values that have a cheaper estimate. An entry larger than
    `max_bytes` on its own is not kept.
    """

    def __init__(self, max_entries: int, max_bytes: int, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 size: Callable[[K, V], int] | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._size = size or (lambda key, value: approx_size(key) + approx_size(value))
        self._data: OrderedDict[K, tuple[float, int, V]] = OrderedDict()  # (stored, size, v)
        self.bytes = 0

    def __setitem__(self, key: K, value: V) -> None:
        now = self._clock()
        old = self._data.pop(key, None)
        if old is not None and old[2] is value:
            size = old[1]
        else:
            size = self._size(key, value)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return  # could only be kept by dropping everything else
        self._data[key] = (now, size, value)
        self.bytes += size
        self._trim(now)

    def _expired(self, stored: float, now: float) -> bool:
        return self.ttl is not None and now - stored > self.ttl

    def _trim(self, now: float) -> None:
        data = self._data
        while data:
            stored, size, _ = next(iter(data.values()))
            if len(data) <= self.max_entries and self.bytes <= self.max_bytes and \
                    not self._expired(stored, now):
                return
            data.popitem(last=False)
            self.bytes -= size

    def has_room(self, entries: int, size: int) -> bool:
        """Whether `entries` more entries of `size` bytes in all fit without dropping any
        (entries idle beyond `ttl` are forgotten first): for maps that must not forget."""
        self._trim(self._clock())
        return len(self._data) + entries <= self.max_entries and \
            self.bytes + size <= self.max_bytes

    def get(self, key: K, default: Any = None) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return default
        if self._expired(entry[0], self._clock()):
            self.pop(key)
            return default
        return entry[2]

    def __getitem__(self, key: K) -> V:
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        missing = object()
        return self.get(key, missing) is not missing  # type: ignore[arg-type]

    def pop(self, key: K, default: Any = None) -> Any:
        entry = self._data.pop(key, None)
        if entry is None:
            return default
        self.bytes -= entry[1]
        return entry[2]

    def __delitem__(self, key: K) -> None:
        if self.pop(key, self) is self:
            raise KeyError(key)

    def __len__(self) -> int:
        self._trim(self._clock())
        return len(self._data)

    def __bool__(self) -> bool:
        # Asked on every request ("anyone rejected or blocked?"), empty nearly always: no
        # clock, no trim then.
        return bool(self._data) and len(self) > 0

    def __iter__(self) -> Iterator[K]:
        return iter(list(self.keys()))

    def keys(self) -> list[K]:
        self._trim(self._clock())
        return list(self._data)

    def values(self) -> list[V]:
        self._trim(self._clock())
        return [entry[2] for entry in self._data.values()]

    def items(self) -> list[tuple[K, V]]:
        self._trim(self._clock())
        return [(key, entry[2]) for key, entry in self._data.items()]

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0
