"""A shared pool of idle, authenticated parent connections (what CNTLM and Px keep).

NTLM authenticates a TCP connection, and mitmproxy keeps server connections per client
connection, so without a pool every new client connection costs a handshake: a logon at the
domain controller and two extra round trips. This module only holds sockets; which connection
may enter and how it is handed to a new client connection is `mitmproxy_internals`' business.

Rules kept here:
- entries are keyed by parent (scheme, address) and by the full identity (`Credentials`, hashes
  included): a connection authenticated as alice is never handed to a client of bob, nor to a
  client that claims to be alice with another password;
- an idle entry is watched: EOF or any byte from the parent (a parent has nothing to say on an
  idle keep-alive connection) or the idle timeout closes and drops it;
- the pool is bounded: beyond `max_idle` the oldest idle connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .credentials import Credentials

log = logging.getLogger("mitmproxy_ntlm")


@dataclass(frozen=True)
class PoolKey:
    """Who a pooled connection may serve: same parent, same identity (hashes included)."""

    scheme: str
    address: tuple[str, int]
    creds: Credentials

    def __str__(self) -> str:  # no secrets: Credentials' repr/str hide the hashes
        host, port = self.address[0], self.address[1]
        return f"{self.scheme}://{host}:{port} as {self.creds.principal}"


@dataclass(eq=False)
class PooledConnection:
    """An authenticated, idle parent connection (asyncio streams) and where it came from."""

    key: PoolKey
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    authenticated_at: float  # wall clock, shown on flows that reuse the connection
    uses: int = 1  # client connections served so far
    idle_since: float = field(default_factory=time.monotonic)
    watcher: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        """Nothing seen from the parent since the connection went idle, and still open."""
        if self.watcher is not None and self.watcher.done():
            return False
        if self.writer.is_closing() or self.reader.at_eof() or self.reader.exception():
            return False
        return not getattr(self.reader, "_buffer", b"")  # bytes on an idle connection: unusable


@dataclass
class PoolStats:
    released: int = 0  # connections that entered the pool
    reused: int = 0  # connections handed to a new client connection
    expired: int = 0  # idle timeout
    dead: int = 0  # closed by the parent (or sent stray bytes) while idle
    evicted: int = 0  # pool full


class ParentPool:
    """Idle authenticated parent connections, most recently used first per key."""

    def __init__(self, idle_timeout: float, max_idle: int) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.stats = PoolStats()
        self._idle: dict[PoolKey, list[PooledConnection]] = {}
        self._order: OrderedDict[PooledConnection, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._order)

    def put(self, entry: PooledConnection) -> bool:
        """Keep an idle connection; False (and the caller closes it) when it cannot be kept."""
        if self.max_idle <= 0 or self.idle_timeout <= 0 or not entry.alive():
            return False
        while len(self._order) >= self.max_idle:
            oldest = next(iter(self._order))
            self._drop(oldest, "pool full")
            self.stats.evicted += 1
        entry.idle_since = time.monotonic()
        entry.watcher = asyncio.get_running_loop().create_task(self._watch(entry))
        self._idle.setdefault(entry.key, []).append(entry)
        self._order[entry] = None
        self.stats.released += 1
        log.debug("[ntlm] pooled the connection to %s (%d idle)", entry.key, len(self._order))
        return True

    def take(self, key: PoolKey) -> PooledConnection | None:
        """The most recently used live connection for `key`, removed from the pool.

        Its watcher is cancelled; `claim()` waits for that before the streams are read again.
        """
        stack = self._idle.get(key)
        while stack:
            entry = stack.pop()
            self._order.pop(entry, None)
            if not stack:
                del self._idle[key]
            if not entry.alive():
                self._close(entry, "closed by the parent while idle")
                self.stats.dead += 1
                continue
            if entry.watcher is not None:
                entry.watcher.cancel()
            self.stats.reused += 1
            entry.uses += 1
            return entry
        return None

    async def claim(self, entry: PooledConnection) -> bool:
        """Wait until the idle watcher has let go of the streams; False if the connection died
        meanwhile (it is then closed)."""
        if entry.watcher is not None:
            await asyncio.wait([entry.watcher])
            if not entry.watcher.cancelled():
                return False  # the watcher saw EOF/data first and closed it
            entry.watcher = None
        if not entry.alive():
            self._close(entry, "closed by the parent while idle")
            return False
        return True

    def close_all(self) -> None:
        for entry in list(self._order):
            self._drop(entry, "pool closed")

    def _drop(self, entry: PooledConnection, reason: str) -> None:
        self._order.pop(entry, None)
        stack = self._idle.get(entry.key)
        if stack and entry in stack:
            stack.remove(entry)
            if not stack:
                del self._idle[entry.key]
        self._close(entry, reason)

    @staticmethod
    def _close(entry: PooledConnection, reason: str) -> None:
        if entry.watcher is not None and not entry.watcher.done():
            if entry.watcher is not asyncio.current_task():
                entry.watcher.cancel()
        try:
            entry.writer.close()
        except Exception:  # pragma: no cover - closing a dead socket
            pass
        log.debug("[ntlm] closed a pooled connection to %s: %s", entry.key, reason)

    async def _watch(self, entry: PooledConnection) -> None:
        """Drop the entry on EOF, stray bytes or the idle timeout; cancelled by `take()`."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                data = await entry.reader.read(1)
            reason = "unexpected data from the parent" if data else "closed by the parent"
            self.stats.dead += 1
        except TimeoutError:
            reason = f"idle for {self.idle_timeout:g} s"
            self.stats.expired += 1
        except OSError as e:
            reason = f"error: {e}"
            self.stats.dead += 1
        self._drop(entry, reason)
