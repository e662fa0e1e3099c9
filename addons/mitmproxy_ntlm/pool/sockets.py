"""A shared pool of authenticated parent connections, lent per request (as CNTLM and Px do).

NTLM authenticates a TCP connection, and mitmproxy keeps server connections per client
connection, so without a pool every new client connection costs a handshake: a logon at the
domain controller and two extra round trips. This module only holds sockets and counts them;
how a connection is lent to a request is `lending`'s business.

Rules kept here:
- entries are keyed by parent (scheme, address) and by the full identity (`Credentials`, hashes
  included): a connection authenticated as alice is never handed to a client of bob, nor to a
  client that claims to be alice with another password;
- an idle entry is checked when taken (EOF, an error or any byte from the parent make it
  unusable: a parent has nothing to say on an idle keep-alive connection) and by a sweeper
  that closes dead and expired entries;
- at most `max_idle` idle connections in all (the oldest is closed first);
- at most `per_key` connections per parent and identity, busy or idle (0: no limit): a request
  that finds them all busy waits for one (`wait`) instead of logging on again; `put` hands a
  returned connection straight to the oldest waiter;
- with `grace`, a request that finds only some of them busy also waits, but only that long,
  before it opens another: a connection usually comes free within milliseconds, and each new
  one is a logon at the domain controller;
- a connection whose client went away in the middle of a response is read to the end of that
  response (`salvage`: at most `salvage_bytes` within `salvage_seconds`, else closed) and
  kept, as Px keeps its connections when a client gives up: a browser that cancels requests
  would otherwise cost a logon per cancel;
- a parent that sent bytes outside any response (`misbehaved`) no longer has its connections
  shared: HTTP/1.1 cannot tell such bytes from the answer to the next request once that is
  sent, so they could reach another client. Each client connection then keeps its own parent
  connection, as with the pool off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..credentials import Credentials
from ..wire import ResponseRest, WireError

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
    uses: int = 1  # times it was lent (to requests or client connections)
    idle_since: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        """Still open and nothing received since it went idle. The transport keeps reading
        without a pending read, so an EOF or a stray byte shows in the reader's state."""
        if self.writer.is_closing() or self.reader.at_eof() or self.reader.exception():
            return False
        return not self.stray()

    def stray(self) -> bool:
        """Bytes arrived while nobody waited for any: the parent misbehaves."""
        return bool(getattr(self.reader, "_buffer", b""))


@dataclass
class PoolStats:
    released: int = 0  # connections that entered the pool (or went straight to a waiter)
    reused: int = 0  # connections handed out again
    expired: int = 0  # idle timeout
    dead: int = 0  # closed by the parent (or sent stray bytes) while idle
    evicted: int = 0  # pool full
    waited: int = 0  # requests that found every connection of their user busy and waited
    wait_timeouts: int = 0  # ... and then opened another one
    graced: int = 0  # requests that found some busy, none idle, and waited up to `grace`
    grace_timeouts: int = 0  # ... and then opened another one
    salvaged: int = 0  # abandoned responses read to the end: the connection was kept
    salvage_failed: int = 0  # ... or could not be (too long, too slow, no framing)


Waiter = asyncio.Future[PooledConnection | None]


class Reservation:
    """Counts a connection that is being opened, so that clients arriving meanwhile see it."""

    def __init__(self) -> None:
        self.released = False

    def release(self) -> None:
        self.released = True

    def is_closing(self) -> bool:  # read as "no longer counts", like a closed writer
        return self.released


class ParentPool:
    """Idle authenticated parent connections, most recently used first per key."""

    def __init__(self, idle_timeout: float, max_idle: int, *, per_key: int,
                 wait_timeout: float, grace: float,
                 salvage_bytes: int = 1 << 20, salvage_seconds: float = 5.0) -> None:
        """The limits come from the ntlm_pool_* options (the addon passes them)."""
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.per_key = per_key
        self.wait_timeout = wait_timeout
        self.grace = grace
        self.salvage_bytes = salvage_bytes
        self.salvage_seconds = salvage_seconds
        self._salvaging: set[asyncio.Task[None]] = set()
        self.stats = PoolStats()
        self._idle: dict[PoolKey, list[PooledConnection]] = {}
        self._order: OrderedDict[PooledConnection, None] = OrderedDict()  # oldest first
        self._live: dict[PoolKey, set[asyncio.StreamWriter | Reservation]] = {}
        self._live_sweep_at = 1000  # keys in _live at which closed connections are dropped
        self._waiters: dict[PoolKey, deque[Waiter]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._misbehaved: dict[tuple[str, tuple[str, int]], str] = {}  # parent -> what it sent

    def __len__(self) -> int:
        return len(self._order)

    # ------------------------------------------------------------ counting and waiting

    def track(self, key: PoolKey, writer: asyncio.StreamWriter) -> None:
        """Count a parent connection of `key` (busy or idle) until its writer closes."""
        self._live.setdefault(key, set()).add(writer)
        if len(self._live) > self._live_sweep_at:
            self._sweep_live()

    def _sweep_live(self) -> None:
        """Forget closed connections of every key: keys are users, and clients can send
        endless user names, so the counts must shrink with the connections open."""
        for key in list(self._live):
            self.live(key)
        self._live_sweep_at = max(1000, 2 * len(self._live))

    def untrack(self, key: PoolKey, writer: asyncio.StreamWriter) -> None:
        """Stop counting a connection that left the shared use (it now carries a tunnel)."""
        writers = self._live.get(key)
        if writers is not None:
            writers.discard(writer)

    def no_logon_needed(self, key: PoolKey, writer: asyncio.StreamWriter) -> None:
        """A connection of `key` went through without a logon: stop counting it, and let
        every request waiting for a connection of `key` open its own (no logon to save)."""
        self.untrack(key, writer)
        while (waiter := self._next_waiter(key)) is not None:
            waiter.set_result(None)

    def reserve(self, key: PoolKey) -> Reservation:
        """Count a connection of `key` that is being opened until `release()`."""
        reservation = Reservation()
        self._live.setdefault(key, set()).add(reservation)
        return reservation

    def live(self, key: PoolKey) -> int:
        writers = self._live.get(key)
        if not writers:
            return 0
        closed = [w for w in writers if w.is_closing()]
        writers.difference_update(closed)
        if not writers:
            del self._live[key]
            return 0
        return len(writers)

    def full(self, key: PoolKey) -> bool:
        """Every connection `key` may have is open (and none idle: callers `take` first)."""
        return self.per_key > 0 and self.shares(key) and self.live(key) >= self.per_key

    def worth_waiting(self, key: PoolKey) -> bool:
        """No idle connection of `key`, but one is busy (or connecting): with `grace`, wait
        that long for it before opening another (callers `take` and check `full` first).
        Not when another request of `key` already waits: demand is above the connections
        open, so the pool grows instead of making every request wait its turn."""
        return (self.grace > 0 and self.shares(key) and not self._waiters.get(key)
                and self.live(key) > 0)

    # ------------------------------------------------------------ misbehaving parents

    def shares(self, key: PoolKey) -> bool:
        """Connections of this parent may serve more than one client connection."""
        return not self._misbehaved or (key.scheme, key.address) not in self._misbehaved

    def misbehaved(self, key: PoolKey, what: str) -> None:
        """The parent of `key` sent `what` outside any response: stop sharing its connections
        (the idle ones are closed) for the rest of this run."""
        parent = (key.scheme, key.address)
        if parent in self._misbehaved:
            return
        self._misbehaved[parent] = what
        log.warning("[ntlm] the parent proxy %s:%d sent %s: its connections are no longer "
                    "shared between client connections", key.address[0], key.address[1], what)
        for entry in [e for e in self._order if (e.key.scheme, e.key.address) == parent]:
            self._drop(entry, "its parent sent bytes outside a response")

    def wait(self, key: PoolKey, grace: bool = False) -> Waiter:
        """A future for the next connection of `key` that comes free (None: one closed, so a
        new one may be opened). Cancel it to stop waiting."""
        if grace:
            self.stats.graced += 1
        else:
            self.stats.waited += 1
        fut: Waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, deque()).append(fut)
        return fut

    async def next_free(self, waiter: Waiter, grace: bool = False) -> PooledConnection | None:
        """What `waiter` receives: a connection, or None when one closed (a new one may be
        opened) or when none came free within `wait_timeout` (`grace`: within `grace`), and
        then `waiter.cancelled()`."""
        try:
            async with asyncio.timeout(self.grace if grace else self.wait_timeout):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                # Handed over just as the time ran out (the timeout's cancel came first): the
                # connection is ours; dropping it would leave it counted as busy for ever.
                return waiter.result()
            if grace:
                self.stats.grace_timeouts += 1
            else:
                self.stats.wait_timeouts += 1
            return None
        except asyncio.CancelledError:  # the waiting request is gone (its client closed)
            if waiter.done() and not waiter.cancelled():
                entry = waiter.result()  # handed over in the same turn: pass it on
                if entry is not None:
                    self.give_back(entry)
            raise

    def closed(self, key: PoolKey) -> None:
        """A connection of `key` closed without coming back: a waiter may open a new one."""
        waiter = self._next_waiter(key)
        if waiter is not None:
            waiter.set_result(None)

    def discard(self, key: PoolKey | None, writer: asyncio.StreamWriter) -> None:
        """Close a connection that does not come back, and tell a waiter of `key`."""
        writer.close()
        if key is not None:
            self.closed(key)

    def _next_waiter(self, key: PoolKey) -> Waiter | None:
        queue = self._waiters.get(key)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                if not queue:
                    del self._waiters[key]
                return fut
        self._waiters.pop(key, None)
        return None

    # ------------------------------------------------------------ idle connections

    def put(self, entry: PooledConnection) -> bool:
        """Keep an idle connection, or hand it to a waiter; False (and the caller closes it)
        when it cannot be kept."""
        if not entry.alive() or not self.shares(entry.key):
            if entry.stray():
                self.misbehaved(entry.key, "bytes after a response, before it was returned")
            return False
        waiter = self._next_waiter(entry.key)
        if waiter is not None:
            self.stats.released += 1
            self.stats.reused += 1
            entry.uses += 1
            waiter.set_result(entry)
            return True
        if self.max_idle <= 0 or self.idle_timeout <= 0:
            return False
        while len(self._order) >= self.max_idle:
            oldest = next(iter(self._order))
            self._drop(oldest, "pool full")
            self.stats.evicted += 1
        entry.idle_since = time.monotonic()
        self._idle.setdefault(entry.key, []).append(entry)
        self._order[entry] = None
        self.stats.released += 1
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return True

    def give_back(self, entry: PooledConnection) -> None:
        """`put`, or close the connection (telling a waiter) when it cannot be kept."""
        if not self.put(entry):
            self.discard(entry.key, entry.writer)

    def take(self, key: PoolKey) -> PooledConnection | None:
        """The most recently used live connection for `key`, removed from the pool."""
        stack = self._idle.get(key)
        while stack:
            entry = stack.pop()
            self._order.pop(entry, None)
            if not stack:
                del self._idle[key]
            if not entry.alive():
                stray = entry.stray()
                self._close(entry, "unexpected data from the parent" if stray
                            else "closed by the parent while idle")
                self.stats.dead += 1
                if stray:
                    self.misbehaved(key, "bytes on an idle connection")
                continue
            self.stats.reused += 1
            entry.uses += 1
            return entry
        return None

    def salvage(self, entry: PooledConnection, rest: ResponseRest) -> None:
        """Read what is left of a response nobody waits for, then `put` the connection (it
        counts as busy meanwhile); close it if that takes too long or too many bytes."""
        task = asyncio.get_running_loop().create_task(self._salvage(entry, rest))
        self._salvaging.add(task)
        task.add_done_callback(self._salvaging.discard)

    async def _salvage(self, entry: PooledConnection, rest: ResponseRest) -> None:
        read = 0
        try:
            async with asyncio.timeout(self.salvage_seconds):
                done = False
                while not done:
                    data = await entry.reader.read(65536)
                    if not data:
                        raise WireError("the parent closed the connection")
                    read += len(data)
                    if read > self.salvage_bytes:
                        raise WireError(f"more than {self.salvage_bytes} bytes left")
                    done = rest.feed(data)
        except asyncio.CancelledError:  # the pool closed
            entry.writer.close()
            raise
        except (TimeoutError, WireError, OSError) as e:
            why = f"not within {self.salvage_seconds:g} s" if isinstance(e, TimeoutError) else e
            self.stats.salvage_failed += 1
            log.debug("[ntlm] closed a connection to %s whose client went away mid-response: %s",
                      entry.key, why)
            self.discard(entry.key, entry.writer)
            return
        log.debug("[ntlm] read the last %d bytes of a response nobody waits for; the "
                  "connection to %s stays authenticated", read, entry.key)
        self.stats.salvaged += 1
        self.give_back(entry)

    def close_all(self) -> None:
        for task in list(self._salvaging):
            task.cancel()
        for entry in list(self._order):
            self._drop(entry, "pool closed")
        for queue in self._waiters.values():
            for fut in queue:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _drop(self, entry: PooledConnection, reason: str) -> None:
        self._order.pop(entry, None)
        stack = self._idle.get(entry.key)
        if stack and entry in stack:
            stack.remove(entry)
            if not stack:
                del self._idle[entry.key]
        self._close(entry, reason)
        self.closed(entry.key)

    @staticmethod
    def _close(entry: PooledConnection, reason: str) -> None:
        try:
            entry.writer.close()
        except Exception:  # pragma: no cover - closing a dead socket
            pass
        log.debug("[ntlm] closed a pooled connection to %s: %s", entry.key, reason)

    async def _sweep(self) -> None:
        """Close idle connections the parent closed, that received stray bytes, or that were
        idle too long; ends when the pool is empty."""
        interval = max(0.05, min(1.0, self.idle_timeout / 4))
        while self._order:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for entry in list(self._order):
                if entry not in self._order:  # closed meanwhile (its parent misbehaved)
                    continue
                if not entry.alive():
                    stray = entry.stray()
                    self.stats.dead += 1
                    self._drop(entry, "unexpected data from the parent" if stray
                               else "closed by the parent")
                    if stray:
                        self.misbehaved(entry.key, "bytes on an idle connection")
                elif now - entry.idle_since >= self.idle_timeout:
                    self.stats.expired += 1
                    self._drop(entry, f"idle for {self.idle_timeout:g} s")
