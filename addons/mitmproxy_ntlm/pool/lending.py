"""How an authenticated parent socket moves between client connections and the pool.

mitmproxy ties server sockets to one client connection's `ConnectionHandler`, so an
authenticated parent connection would serve one client only. Two of its methods are wrapped
(the swaps are in `mitmproxy_internals`; the work is here):
- `handle_connection`: for a plain-http parent connection of our layer, mitmproxy's reader and
  writer are replaced by `ParentStreams`. mitmproxy keeps one server connection for the
  client's lifetime; behind it, the layer lends the socket to the pool after each complete
  response and borrows one of the same parent and user before the next request (waiting for
  one when the user has `ntlm_pool_connections` busy, and `ntlm_pool_grace` long when some
  are), as CNTLM and Px do. When mitmproxy closes it, an idle authenticated socket goes to the
  pool instead of being closed.
- `open_connection`: when our layer opens a parent connection and the pool has one of this
  user (or one comes free while it waits), the pooled streams are installed in this handler
  (hooks and events as for a fresh socket) instead of connecting.
`ParentLender` is the layer's side: one per parent layer, it decides what to open, lends and
borrows between requests, and says which entry to keep when mitmproxy closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mitmproxy import connection
from mitmproxy.proxy import commands, events, server, server_hooks
from mitmproxy.utils import human

from ..wire import ResponseRest
from .sockets import ParentPool, PooledConnection, PoolKey, Reservation, Waiter

if TYPE_CHECKING:
    from ..engine import AuthEngine

log = logging.getLogger("mitmproxy_ntlm")


class Releaser(Protocol):
    """The layer that lends a parent socket between requests: what to keep when it closes."""

    def pool_release(self, conn: connection.Connection, reader: Any, writer: Any
                     ) -> tuple[PooledConnection, ResponseRest | None] | None: ...

    def streams_opened(self, streams: ParentStreams) -> None: ...


@dataclass(eq=False)
class Opening:
    """What `open_connection` should do for one parent `Server` our layer opens."""

    releaser: Releaser | None  # the layer that lends the socket between requests
    pool: ParentPool
    entry: PooledConnection | None = None  # pooled streams to use instead of connecting
    wait_for: PoolKey | None = None  # this user has all connections allowed: wait for one
    grace: bool = False  # ... or has some, all busy: wait for one only ntlm_pool_grace long
    reservation: Reservation | None = None  # counts the connection while it connects
    adopted: bool = False

    def release(self, close_entry: bool = False) -> None:
        if self.reservation is not None:
            self.reservation.release()
        if close_entry and self.entry is not None and not self.adopted:
            self.pool.discard(self.entry.key, self.entry.writer)


class Openings:
    """Parent connections our layers are opening: from the layer's OpenConnection to mitmproxy's
    `open_connection` (`pending`), then until its `handle_connection` starts (`opened`)."""

    def __init__(self) -> None:
        self.pending: dict[connection.Connection, Opening] = {}
        self.opened: dict[connection.Connection, Opening] = {}


class ParentLender:
    """The pool side of one parent layer: what it opens, and which physical connection is
    behind mitmproxy's server connection between requests."""

    def __init__(self, pool: ParentPool, openings: Openings) -> None:
        self.pool = pool
        self.openings = openings
        self.streams: ParentStreams | None = None  # lends the connection between requests
        self.adopted: PooledConnection | None = None  # pooled connection now in use
        self.uses = 1  # times this parent connection was handed out

    def prepare(self, conn: connection.Server, key: PoolKey | None,
                releaser: Releaser | None) -> Opening:
        """Before OpenConnection(conn): take an idle connection of `key` (the user, plain http)
        instead of connecting, or wait for one when the user already has all allowed, or
        reserve a place for the new one. `releaser` lends the socket between requests."""
        self.adopted = None
        pool = self.pool
        opening = Opening(releaser, pool)
        if key is not None:
            opening.entry = pool.take(key)
            if opening.entry is not None and releaser is None:
                pool.untrack(key, opening.entry.writer)  # a tunnel: no longer shared
            elif opening.entry is None and releaser is not None:
                if pool.full(key):
                    opening.wait_for = key
                elif pool.worth_waiting(key):  # ntlm_pool_grace: a logon saved, usually
                    opening.wait_for, opening.grace = key, True
                else:  # counted from now on: other clients see it while it connects
                    opening.reservation = pool.reserve(key)
        self.openings.pending[conn] = opening
        return opening

    def opened(self, conn: connection.Server, opening: Opening, err: str | None) -> None:
        """OpenConnection(conn) answered: `adopted` tells whether a pooled one was used."""
        unused = self.openings.pending.pop(conn, None)
        if unused is not None:  # never reached open_connection
            unused.release(close_entry=True)
        if opening.adopted and not err:
            self.adopted = opening.entry

    def track(self, streams: ParentStreams, key: PoolKey) -> None:
        """mitmproxy now reads and writes the parent connection through `streams`."""
        streams.key = key
        assert streams.phys_writer is not None
        self.pool.track(key, streams.phys_writer)
        self.streams = streams

    def lend(self, releaser: Releaser) -> None:
        """The response is complete: the connection goes back to the pool until the next
        request (of any client of the same user) needs it."""
        streams, pool = self.streams, self.pool
        if streams is None or streams.lent:
            return
        if streams.key is not None and not pool.shares(streams.key):
            return  # the parent misbehaved: this connection stays with this client
        pair = streams.detach()
        if pair is None:
            return
        released = releaser.pool_release(streams.conn, *pair)
        if released is None or released[1] is not None or not pool.put(released[0]):
            pool.discard(streams.key, pair[1])

    def no_logon_needed(self) -> None:
        """The parent answered on this connection without asking for a logon. It stays with
        its client connection, as with stock mitmproxy, and no longer counts against the
        user's `ntlm_pool_connections`: that limit saves logons, and this connection made
        none, so requests waiting for one of the user's connections open their own."""
        streams = self.streams
        if streams is None:
            return
        self.streams = None
        key, streams.key = streams.key, None
        if key is not None and streams.phys_writer is not None:
            self.pool.no_logon_needed(key, streams.phys_writer)

    def reacquire(self, key: PoolKey | None, engine: AuthEngine) -> None:
        """A request on a lent connection: attach an idle one of this user, else wait for one
        when the user has all connections allowed, else open a new one (a logon)."""
        streams, pool = self.streams, self.pool
        assert streams is not None
        if key is None:
            engine.needs_new_connection()  # the engine explains why there is no identity
            return
        if key != streams.key:
            log.info("[ntlm] %s -> %s: new user on this client connection (%s)",
                     engine.client, engine.parent, key.creds.principal)
            streams.key = key
        entry = pool.take(key)
        if entry is not None:
            streams.attach(entry)
            engine.resume_pooled(key.creds, entry.authenticated_at, entry.uses)
        elif pool.full(key):
            streams.wait_for(pool.wait(key))
            engine.resume_pooled(key.creds, None, self.uses)
        elif pool.worth_waiting(key):
            # Some are busy: one usually comes free long before a new mitmproxy server
            # connection would be set up (hooks and all); after ntlm_pool_grace, a new one.
            streams.wait_for(pool.wait(key, grace=True), grace=True)
            engine.resume_pooled(key.creds, None, self.uses)
        else:
            engine.needs_new_connection()

    def entry_to_keep(self, engine: AuthEngine, conn: connection.Connection, reader: Any,
                      writer: Any) -> tuple[PooledConnection, ResponseRest | None] | None:
        """The pool entry to keep when mitmproxy closes `conn`: authenticated and idle (rest
        None), or in the middle of a response that can be read to its end first."""
        if not engine.reuse.track or engine.creds is None or not conn.address:
            return None
        rest = None
        if not engine.reusable():
            rest = engine.unfinished_response()
            if rest is None:
                return None
        key = PoolKey("http", (conn.address[0], conn.address[1]), engine.creds)
        entry = PooledConnection(key, reader, writer,
                                 authenticated_at=engine.reuse.authenticated_at or time.time(),
                                 uses=self.uses)
        return entry, rest

    def stray_seen(self, what: str, key: PoolKey | None) -> None:
        """Bytes outside any response: the pool stops sharing this parent's connections
        between clients (see `ParentPool.misbehaved`)."""
        streams = self.streams
        key = streams.key if streams is not None and streams.key else key
        if key is not None:
            self.pool.misbehaved(key, what)

    def replaced(self) -> None:
        """The layer replaced its parent connection (after a 407 that closed it)."""
        self.streams = None
        self.uses = 1


async def _drained() -> None:
    return None


class ParentStreams:
    """The reader and writer (one object, as mitmproxy_rs streams are) that mitmproxy holds
    for a plain-http parent connection of our layer.

    Behind them is one physical parent connection at a time: after each response the layer
    lends it to the pool (`detach`), and before the next request it attaches whichever
    connection the pool has for this user (`attach`), or waits for one (`wait_for`). mitmproxy
    sees one server connection for the client's lifetime. When mitmproxy closes it, an idle
    authenticated physical connection goes to the pool instead of being closed.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: connection.Connection, releaser: Releaser, pool: ParentPool) -> None:
        self.conn = conn
        self.pool = pool
        self.releaser: Releaser | None = releaser
        self.key: PoolKey | None = None  # set by the layer: whose connections these are
        self.phys_reader: asyncio.StreamReader | None = reader
        self.phys_writer: asyncio.StreamWriter | None = writer
        self._first_writer = writer  # for get_extra_info once nothing is attached
        self.closed = False
        self.gave_up: str | None = None  # waited in vain: the read side ends, the layer replays
        self._eof_sent = False
        self._in_read = False
        self._pending = bytearray()  # written while waiting for a connection
        self.delivered = 0  # bytes mitmproxy read through these streams ...
        self.seen = 0  # ... and those the layer's engine got (fewer: some wait in a queue)
        self._waiter: Waiter | None = None
        self._grace = False  # the waiter waits only ntlm_pool_grace long
        self._wake: asyncio.Future[None] | None = None

    @property
    def lent(self) -> bool:
        """Nothing attached and nothing asked for: the last physical connection went back to
        the pool. (While the pool finds one, the rest of the request is written ahead.)"""
        return (self.phys_writer is None and self._waiter is None and not self.closed
                and not self.gave_up)

    def detach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Give up the physical connection (the response is complete); None while mitmproxy
        is inside a read of it (it stays attached then)."""
        if self._in_read or self.closed or self.phys_writer is None or self._eof_sent:
            return None
        assert self.phys_reader is not None
        pair = self.phys_reader, self.phys_writer
        self.phys_reader = self.phys_writer = None
        return pair

    def attach(self, entry: PooledConnection) -> None:
        self.phys_reader, self.phys_writer = entry.reader, entry.writer
        if self._pending:
            entry.writer.write(bytes(self._pending))
            self._pending.clear()
        self._wakeup()

    def wait_for(self, waiter: Waiter, grace: bool = False) -> None:
        """Requests are written ahead while the pool finds a connection (`waiter`; `grace`:
        only for ntlm_pool_grace)."""
        self._waiter = waiter
        self._grace = grace
        self._wakeup()

    def give_up(self, why: str) -> None:
        self.gave_up = why
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def read(self, n: int) -> bytes:
        while True:
            if self.closed or self.gave_up:
                return b""
            reader = self.phys_reader
            if reader is not None:
                self._in_read = True
                try:
                    data = await reader.read(n)
                finally:
                    self._in_read = False
                self.delivered += len(data)
                return data
            if self._waiter is not None:
                entry = await self._await_waiter(self._waiter)
                if entry is not None:
                    self.attach(entry)
                continue
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
            self._wake = None

    async def _await_waiter(self, waiter: Waiter) -> PooledConnection | None:
        pool = self.pool
        grace = self._grace
        try:
            entry = await pool.next_free(waiter, grace=grace)
        finally:
            self._waiter = None
        if entry is None and grace and self.key is not None:
            entry = pool.take(self.key)  # as the open path does after a grace wait
        if entry is None:
            within = f"{pool.grace * 1000:g} ms" if grace else f"{pool.wait_timeout:g} s"
            self.gave_up = (f"no connection came free within {within}" if waiter.cancelled()
                            else "a connection closed, so a new one may be opened")
        elif self.closed:
            pool.discard(entry.key, entry.writer)
            return None
        elif not entry.alive():  # closed, or bytes came since `put`
            if entry.stray():
                pool.misbehaved(entry.key, "bytes on a connection as it was lent")
            pool.discard(entry.key, entry.writer)
            self.gave_up = "the connection that came free was no longer usable"
            return None
        return entry

    def write(self, data: bytes) -> None:
        writer = self.phys_writer
        if writer is not None:
            writer.write(data)
        elif self._waiter is not None:
            self._pending += data
        elif self.gave_up:
            pass  # the layer replays the whole request on a new connection
        elif not self.closed:  # pragma: no cover - the layer attaches before it writes
            log.error("[ntlm] a request reached a lent parent connection; replaying it")
            self.give_up("internal: nothing attached")

    def is_closing(self) -> bool:
        writer = self.phys_writer
        return self.closed or (writer is not None and writer.is_closing())

    def drain(self) -> Awaitable[None]:
        """The physical writer's own drain (no coroutine of ours in between, once per
        request); nothing to wait for while none is attached."""
        writer = self.phys_writer
        return writer.drain() if writer is not None else _drained()

    def write_eof(self) -> None:
        self._eof_sent = True  # half-closed by us: never reusable
        if self.phys_writer is not None:
            self.phys_writer.write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.phys_writer or self._first_writer).get_extra_info(name, default)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        releaser, self.releaser = self.releaser, None
        if self._waiter is not None:
            self._waiter.cancel()
        self._wakeup()
        reader, writer = self.phys_reader, self.phys_writer
        self.phys_reader = self.phys_writer = None
        if writer is None or reader is None:
            return
        pool = self.pool
        released = None
        if releaser is not None and not self._eof_sent:
            try:
                released = releaser.pool_release(self.conn, reader, writer)
            except Exception:  # never let pooling break a close
                log.exception("[ntlm] could not return a parent connection to the pool")
        if released is None:
            pool.discard(self.key, writer)
        elif released[1] is not None:
            # Read to its end only what the engine framed in full so far: bytes mitmproxy read
            # but never handed on would go missing from the count.
            if self._in_read or self.seen != self.delivered:
                pool.discard(self.key, writer)
            else:
                pool.salvage(*released)
        elif not pool.put(released[0]):
            pool.discard(self.key, writer)


# ---------------------------------------------------------------------- ConnectionHandler side

OpenConnection = Callable[[server.ConnectionHandler, commands.OpenConnection],
                          Coroutine[Any, Any, None]]
HandleConnection = Callable[[server.ConnectionHandler, connection.Connection],
                            Coroutine[Any, Any, None]]


async def open_connection(handler: server.ConnectionHandler, command: commands.OpenConnection,
                          openings: Openings, original: OpenConnection) -> None:
    """`ConnectionHandler.open_connection` for a parent connection our layer prepared
    (`ParentLender.prepare`): a pooled one, one that comes free, or a new one."""
    opening = openings.pending.pop(command.connection, None)
    if opening is None:
        return await original(handler, command)
    conn, pool = command.connection, opening.pool
    openings.opened[conn] = opening
    try:
        if opening.wait_for is not None:
            key = opening.wait_for
            opening.entry = pool.take(key) or await _wait_for_connection(pool, key,
                                                                         opening.grace)
            if opening.entry is None:
                opening.reservation = pool.reserve(key)
        entry = opening.entry
        if entry is not None:
            # mitmproxy 12 starts tasks eagerly: let server_event finish registering this
            # connection (it sets transports[conn] after creating this task) before ours.
            await asyncio.sleep(0)
            if entry.alive():
                opening.adopted = True
                return await _open_pooled(handler, command, entry)
            pool.discard(entry.key, entry.writer)
            log.debug("[ntlm] the pooled connection to %s died; connecting", entry.key)
            if opening.releaser is not None:  # counted while it connects; a tunnel never is
                opening.reservation = pool.reserve(entry.key)
        return await original(handler, command)
    except BaseException:
        opening.release(close_entry=True)  # cancelled (client gone) while waiting: no leak
        raise
    finally:
        openings.opened.pop(conn, None)
        opening.release()


async def _open_pooled(handler: server.ConnectionHandler, command: commands.OpenConnection,
                       entry: PooledConnection) -> None:
    """`ConnectionHandler.open_connection` on pooled streams: the same hooks and events as
    for a fresh socket, without connecting."""
    conn = command.connection
    hook_data = server_hooks.ServerConnectionHookData(client=handler.client, server=conn)
    await handler.handle_hook(server_hooks.ServerConnectHook(hook_data))
    if err := conn.error:
        entry.writer.close()
        handler.log(f"server connection to {human.format_address(conn.address)} killed before "
                    f"connect: {err}")
        await handler.handle_hook(server_hooks.ServerConnectErrorHook(hook_data))
        await handler.server_event(events.OpenConnectionCompleted(command,
                                                                  f"Connection killed: {err}"))
        return
    now = time.time()
    conn.timestamp_start = now
    conn.timestamp_tcp_setup = now
    conn.state = connection.ConnectionState.OPEN
    conn.peername = entry.writer.get_extra_info("peername")
    conn.sockname = entry.writer.get_extra_info("sockname")
    handler.transports[conn] = server.ConnectionIO(
        handler=asyncio.current_task(), reader=entry.reader, writer=entry.writer)
    addr = human.format_address(conn.address)
    handler.log(f"server connect {addr} (pooled, authenticated as {entry.key.creds.principal})")
    await handler.handle_hook(server_hooks.ServerConnectedHook(hook_data))
    await handler.server_event(events.OpenConnectionCompleted(command, None))
    try:
        await handler.handle_connection(conn)
    finally:
        handler.log(f"server disconnect {addr}")
        conn.timestamp_end = time.time()
        await handler.handle_hook(server_hooks.ServerDisconnectedHook(hook_data))


async def _wait_for_connection(pool: ParentPool, key: PoolKey,
                               grace: bool = False) -> PooledConnection | None:
    """Every connection `key` may have is busy (`grace`: some are): wait for one, else
    (timeout) open another. A grace wait that ends with all connections taken meanwhile
    waits once more, as any request that finds them all busy does."""
    if grace:
        waiter = pool.wait(key, grace=True)
        entry = await pool.next_free(waiter, grace=True) or pool.take(key)
        if entry is not None or not pool.full(key):
            if entry is None and waiter.cancelled():
                log.debug("[ntlm] no connection to %s came free within %g ms; opening another",
                          key, pool.grace * 1000)
            return entry
    waiter = pool.wait(key)
    entry = await pool.next_free(waiter)
    if entry is None and waiter.cancelled():
        log.info("[ntlm] no connection to %s came free within %g s; opening another",
                 key, pool.wait_timeout)
    return entry


def handle_connection(handler: server.ConnectionHandler, conn: connection.Connection,
                      openings: Openings, original: HandleConnection
                      ) -> Coroutine[Any, Any, None]:
    """`ConnectionHandler.handle_connection`: our parent connections get streams that can
    return them to the pool when mitmproxy closes them. Not a coroutine itself: it returns
    mitmproxy's, so each read of every connection (clients' too) passes no extra frame.
    (mitmproxy calls it once the connection's transports are set, in all supported versions.)"""
    opening = openings.opened.pop(conn, None)
    if opening is not None and opening.releaser is not None:
        io = handler.transports.get(conn)
        if (io is not None and isinstance(io.writer, asyncio.StreamWriter)
                and isinstance(io.reader, asyncio.StreamReader)):
            streams = ParentStreams(io.reader, io.writer, conn, opening.releaser, opening.pool)
            io.reader = io.writer = streams  # type: ignore[assignment]
            opening.releaser.streams_opened(streams)
        opening.release()  # counted as a live connection from here on
    return original(handler, conn)
