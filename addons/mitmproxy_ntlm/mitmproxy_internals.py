"""The one module that patches mitmproxy: the layer that talks to the parent proxy.

mitmproxy has no public hook that sees the parent's 407, and NTLM must answer it on the same
connection. `HttpUpstreamProxy` (a private tunnel layer) builds every connection to the parent,
for CONNECT tunnels and for absolute-form plain http, and mitmproxy looks the class up through
its module at call time; so `install()` swaps in a subclass that runs `engine.AuthEngine`
on the connection, and `uninstall()` puts the original back. Verified on the versions in
`versions.TESTED_MITMPROXY`; `check_version()` refuses others with a clear message.

Connection pool (`set_pool`): mitmproxy ties server sockets to one client connection's
`ConnectionHandler`, so an authenticated parent connection would serve one client only. Two
methods of `mitmproxy.proxy.server.ConnectionHandler` (identical in all supported versions)
are wrapped:
- `handle_connection`: for a plain-http parent connection of our layer, mitmproxy's reader and
  writer are replaced by `_ParentStreams`. mitmproxy keeps one server connection for the
  client's lifetime; behind it, the layer lends the socket to the pool after each complete
  response and borrows one of the same parent and user before the next request (waiting for
  one when the user has `ntlm_pool_connections` busy, and `ntlm_pool_grace` long when some
  are), as CNTLM and Px do. When mitmproxy
  closes it, an idle authenticated socket goes to the pool instead of being closed.
- `open_connection`: when our layer opens a parent connection and the pool has one of this
  user (or one comes free while it waits), the pooled streams are installed in this handler
  (hooks and events as for a fresh socket) instead of connecting.
Everything else (requests, CONNECT) runs through the layer as on a fresh connection, with the
engine starting authenticated.

CONNECT answered after the parent (multi-user): mitmproxy answers a CONNECT `200` before the
tunnel to the parent exists. `install()` wraps `HttpStream.handle_connect_regular` and
`handle_connect_finish` (identical in all supported versions) so that a multi-user CONNECT
through an http parent opens and authenticates its tunnel first and is answered with the
outcome: `200`, or the `407` Basic challenge for credentials the parent rejected (see
`_AnswerAfterParent`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mitmproxy
from mitmproxy import connection, http
from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, server, server_hooks, tunnel
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _upstream_proxy
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook
from mitmproxy.utils import human

from . import engine as eng
from .parents import ParentList
from .policy import AuthUnavailable, UpstreamPolicy
from .pool import ParentPool, PooledConnection, PoolKey, Reservation, Waiter
from .versions import NEWEST_MITMPROXY, TESTED_MITMPROXY, mitmproxy_tested
from .wire import ResponseRest

log = logging.getLogger("mitmproxy_ntlm")

SUPPORTED = TESTED_MITMPROXY
"""mitmproxy release lines this layer was tested against (tunnel.py is identical in all; of
`_upstream_proxy.py`, only the CONNECT head differs, which `_connect_request_head` builds)."""

_ORIGINAL: type[_upstream_proxy.HttpUpstreamProxy] = getattr(
    _upstream_proxy.HttpUpstreamProxy, "_ntlm_original", _upstream_proxy.HttpUpstreamProxy
)


_ORIGINAL_CLIENT: type[layer.Layer] = getattr(
    http_layers.HttpClient, "_ntlm_original", http_layers.HttpClient
)


def run_step(engine: eng.AuthEngine, step: Callable[..., list[eng.Action]],
             *args: Any) -> list[eng.Action]:
    """Run an engine step; an unexpected exception fails this connection cleanly."""
    try:
        return step(*args)
    except Exception:
        log.exception("[ntlm] internal error on the connection to %s", engine.parent)
        return engine.internal_error()


async def _drained() -> None:
    return None


def _nothing() -> layer.CommandGenerator[None]:
    """A command generator that does nothing (for an event that is ignored)."""
    yield from ()


class UnsupportedMitmproxy(RuntimeError):
    pass


def mitmproxy_version() -> str:
    from mitmproxy import version

    return getattr(version, "VERSION", getattr(mitmproxy, "__version__", "unknown"))


def check_version(version: str | None = None) -> None:
    """Refuse to patch a mitmproxy whose private layers we have not tested."""
    version = version or mitmproxy_version()
    if not mitmproxy_tested(version):
        tested = ", ".join(v + "x" for v in SUPPORTED)
        newest = " or ".join(f"'mitmproxy=={v}' (Python {py})"
                             for py, v in NEWEST_MITMPROXY.items())
        raise UnsupportedMitmproxy(
            f"mitmproxy-ntlm replaces a private mitmproxy layer and is tested with mitmproxy "
            f"{tested}; this is mitmproxy {version}. Install a tested version, e.g. "
            f"pip install {newest}."
        )
    for name in ("_handshake_finished", "on_handshake_error", "event_to_child"):
        if not hasattr(_ORIGINAL, name):  # pragma: no cover - guards against silent drift
            raise UnsupportedMitmproxy(f"mitmproxy {version}: TunnelLayer.{name} is missing")
    for name in ("open_connection", "handle_connection", "server_event", "handle_hook"):
        if not hasattr(server.ConnectionHandler, name):  # pragma: no cover
            raise UnsupportedMitmproxy(f"mitmproxy {version}: ConnectionHandler.{name} is missing")
    for name in ("handle_connect_regular", "handle_connect_finish"):
        if not hasattr(http_layers.HttpStream, name):  # pragma: no cover
            raise UnsupportedMitmproxy(f"mitmproxy {version}: HttpStream.{name} is missing")


class NtlmUpstreamProxy(_ORIGINAL):  # type: ignore[misc,valid-type]
    """`HttpUpstreamProxy` that authenticates to the parent with NTLM."""

    _ntlm_original: ClassVar[type] = _ORIGINAL
    policy: ClassVar[UpstreamPolicy | None] = None
    parents: ClassVar[ParentList | None] = None
    roaming: ClassVar[bool] = False
    origin_engines: ClassVar[OriginEngineFactory | None] = None
    pool: ClassVar[ParentPool | None] = None

    def __init__(self, ctx, tunnel_conn: connection.Server, send_connect: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx, tunnel_conn, send_connect)
        self.engine: eng.AuthEngine | None = None
        self._tunnel_open = False  # CONNECT established: bytes bypass the engine
        self._retired: set[connection.Connection] = set()
        self._timers: dict[commands.RequestWakeup, int] = {}
        self._pending_failure: str | None = None
        self._direct = False  # roaming: no parent answered, the tunnel goes to the target
        self._adopted: PooledConnection | None = None  # pooled connection now in use
        self._uses = 1  # times this parent connection was handed out
        self._streams: _ParentStreams | None = None  # lends the connection between requests
        # A CONNECT whose answer waits for this tunnel (see `_AnswerAfterParent`): how the
        # handshake ended, and whether the child layer is yet to start on the open tunnel.
        self.verdict: TunnelVerdict | None = None
        self._answer_waits = False
        self._start_pending = False

    # ------------------------------------------------------------------ setup

    def _new_engine(self) -> eng.AuthEngine | None:
        policy = type(self).policy
        if policy is None or not policy.enabled:
            return None
        parent = human.format_address(self.tunnel_connection.address)
        client = human.format_address(self.context.client.peername)
        host = self.tunnel_connection.address[0] if self.tunnel_connection.address else ""
        via = self.context.server.via
        engine = eng.AuthEngine(
            policy, parent, client, target_host=host,
            can_reconnect=not (via and via[0] == "https"), client_id=self.context.client.id,
            trace_key=self.conn.id,
        )
        engine.track_reuse = self._may_return_to_pool()
        return engine

    # ------------------------------------------------------------------ connection pool

    def _absolute_form(self) -> bool:
        """Plain http to the parent (no CONNECT), as `start_handshake` decides it."""
        return not self.send_connect or isinstance(
            self.child_layer, _ORIGINAL_CLIENT | OriginAuthLayer)

    def _pool_scheme_ok(self) -> bool:
        """Only plain-TCP parents: a TLS session to an https parent lives in this handler's
        TLS layer and cannot move to another client connection."""
        via = self.context.server.via
        return type(self).pool is not None and (via is None or via[0] == "http")

    def _may_return_to_pool(self) -> bool:
        """Plain http through an http parent. Not with automatic logon to the origin: the
        parent pins the origin's authenticated connection to this one (as Squid does)."""
        return (self._pool_scheme_ok() and self._absolute_form() and not self._direct
                and not isinstance(self.child_layer, OriginAuthLayer))

    def _pool_key(self) -> PoolKey | None:
        """This parent and this client's current identity; None without a pool."""
        pool, policy = type(self).pool, type(self).policy
        address = self.tunnel_connection.address
        if pool is None or policy is None or not self._pool_scheme_ok() or not address:
            return None
        try:
            creds = policy.credentials(self.context.client.id)
        except AuthUnavailable:
            return None  # the normal path explains it to the client
        return PoolKey("http", (address[0], address[1]), creds)

    def streams_opened(self, streams: _ParentStreams) -> None:
        """mitmproxy now reads and writes the parent connection through `streams`."""
        pool = type(self).pool
        if streams.conn is not self.tunnel_connection or pool is None:
            return
        key = self._pool_key()
        if key is None:
            return
        streams.key = key
        assert streams.phys_writer is not None
        pool.track(key, streams.phys_writer)
        self._streams = streams

    def _lend(self) -> None:
        """The response is complete: the connection goes back to the pool until the next
        request (of any client of the same user) needs it."""
        streams, pool = self._streams, type(self).pool
        if streams is None or pool is None or streams.lent:
            return
        if streams.key is not None and not pool.shares(streams.key):
            return  # the parent misbehaved: this connection stays with this client
        pair = streams.detach()
        if pair is None:
            return
        released = self.pool_release(streams.conn, *pair)
        if released is None or released[1] is not None or not pool.put(released[0]):
            pool.discard(streams.key, pair[1])

    def _reacquire(self) -> None:
        """A request on a lent connection: attach an idle one of this user, else wait for one
        when the user has all connections allowed, else open a new one (a logon)."""
        streams, pool, engine = self._streams, type(self).pool, self.engine
        assert streams is not None and engine is not None
        key = self._pool_key()
        if pool is None or key is None:
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
            engine.resume_pooled(key.creds, None, self._uses)
        else:
            engine.needs_new_connection()

    def pool_release(self, conn: connection.Connection, reader: Any, writer: Any
                     ) -> tuple[PooledConnection, ResponseRest | None] | None:
        """Called when mitmproxy closes a parent connection of this layer: the pool entry to
        keep instead, if the connection is authenticated and idle (rest None), or in the
        middle of a response that can be read to its end first (the client went away)."""
        engine = self.engine
        if (conn != self.tunnel_connection or engine is None or self._tunnel_open
                or self._direct or not engine.track_reuse or engine.creds is None
                or not conn.address):
            return None
        rest = None
        if not engine.reusable():
            rest = engine.unfinished_response()
            if rest is None:
                return None
        key = PoolKey("http", (conn.address[0], conn.address[1]), engine.creds)
        entry = PooledConnection(key, reader, writer,
                                 authenticated_at=engine.authenticated_at or time.time(),
                                 uses=self._uses)
        return entry, rest

    def _open_parent(self, conn: connection.Server,
                     key: PoolKey | None = None) -> layer.CommandGenerator[str | None]:
        """OpenConnection for a parent connection. With `key` (plain http, pool on): an idle
        connection of that parent and user is taken instead of connecting, or, when the user
        already has all the connections allowed, one that comes free is waited for. The
        connection is registered so that its socket can be lent to the pool between requests.
        `self._adopted` tells whether a pooled connection was used."""
        self._adopted = None
        releaser = self if self._may_return_to_pool() else None
        pool = type(self).pool
        opening = None
        if pool is not None and (releaser is not None or key is not None):
            opening = _Opening(releaser, pool)
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
            _OPENING[conn] = opening
        err = yield commands.OpenConnection(conn)
        unused = _OPENING.pop(conn, None)
        if unused is not None:  # never reached open_connection
            unused.release(close_entry=True)
        if opening is not None and opening.adopted and not err:
            self._adopted = opening.entry
        return err

    def _connect_request_head(self) -> layer.CommandGenerator[bytes]:
        """Build the CONNECT like mitmproxy does and let other addons edit it once."""
        assert self.conn.address
        host, port = self.conn.address[0], self.conn.address[1]
        host_text = f"[{host}]" if ":" in host else host
        authority = host_text.encode("idna") + f":{port}".encode()
        headers = http.Headers()
        if getattr(self.context.options, "http_connect_send_host_header", True):
            headers.insert(0, b"Host", authority)
        flow = http.HTTPFlow(self.context.client, self.tunnel_connection)
        flow.request = http.Request(
            host=host, port=port, method=b"CONNECT", scheme=b"", authority=authority,
            path=b"", http_version=b"HTTP/1.1", headers=headers, content=b"",
            trailers=None, timestamp_start=time.time(), timestamp_end=time.time(),
        )
        yield HttpConnectUpstreamHook(flow)
        return http1.assemble_request(flow.request)

    # ------------------------------------------------------------------ tunnel hooks

    def start_handshake(self) -> layer.CommandGenerator[None]:
        if self._direct:
            self.send_connect = False
            return (yield from super().start_handshake())
        if self.send_connect and isinstance(self.child_layer, _ORIGINAL_CLIENT | OriginAuthLayer):
            # Regular/SOCKS mode routed via a parent: plain http goes absolute-form, as in
            # upstream mode, not CONNECT to port 80 (which real parents refuse).
            self.send_connect = False
        self.engine = self._new_engine()
        if self.engine is None:
            return (yield from super().start_handshake())
        if self._adopted is not None:
            entry = self._adopted
            self._uses = entry.uses
            self.engine.adopt(entry.key.creds, entry.authenticated_at, entry.uses,
                              connect=self.send_connect)
            self._report_trace()
        if not self.send_connect:
            # Plain http: the tunnel opens at once; the engine works on each request.
            return (yield from super().start_handshake())
        raw = yield from self._connect_request_head()
        failure = yield from self._run(self._safely(self.engine.start_connect, raw))
        if failure:
            # Report through the normal path so the tunnel state is kept consistent.
            self._pending_failure = failure
            yield from self._handle_event(events.DataReceived(self.tunnel_connection, b""))

    def receive_handshake_data(
        self, data: bytes
    ) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if self.engine is None or not self.send_connect:
            return (yield from super().receive_handshake_data(data))
        if self._pending_failure:
            failure, self._pending_failure = self._pending_failure, None
            return False, failure
        if not data:
            return False, None
        actions = self._safely(self.engine.from_parent, data)
        established = next((a for a in actions if isinstance(a, eng.Established)), None)
        failure = yield from self._run([a for a in actions if not isinstance(a, eng.Established)])
        if failure:
            return False, failure
        if established is not None:
            self._tunnel_open = True
            if established.leftover:
                yield from super().receive_data(established.leftover)
            return True, None
        return False, None

    # The overrides below that every request passes (events, commands, data) are not generators
    # themselves: they return the generator to run, so the usual case adds no frame to the
    # chain that each command of a request climbs.

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.tunnel_state is tunnel.TunnelState.INACTIVE and isinstance(event, OpenBeforeAnswer):
            return self._open_before_answer()
        if self._start_pending and isinstance(event, events.Start):
            return self._start_on_open_tunnel(event)
        if self._timers and isinstance(event, events.Wakeup) and event.command in self._timers:
            return self._on_wakeup(event.command)
        if self._retired and isinstance(event, events.ConnectionEvent) \
                and event.connection in self._retired:
            return _nothing()  # a parent connection we replaced after a closing 407
        if (
            self.engine is not None
            and not self._tunnel_open
            and isinstance(event, events.ConnectionClosed)
            and event.connection == self.tunnel_connection
        ):
            return self._on_parent_closed(event)
        return super()._handle_event(event)

    def _on_wakeup(self, command: commands.RequestWakeup) -> layer.CommandGenerator[None]:
        generation = self._timers.pop(command)
        if self.engine is not None:
            yield from self._on_timeout(generation)

    def _on_parent_closed(self, event: events.ConnectionClosed) -> layer.CommandGenerator[None]:
        """The parent connection closed before the tunnel opened or a plain request ended."""
        assert self.engine is not None
        # Closed by mitmproxy (its client went away, or the flow was killed), not by the
        # parent: the parent may be working on the request, so it must not be sent again.
        by_parent = bool(event.connection.state & connection.ConnectionState.CAN_WRITE)
        if by_parent and self.engine.lost_before_answer():
            # A pooled connection the parent had closed while it was idle, or no connection came
            # free for a request that waited: replay on a new one.
            streams = self._streams
            why = streams.gave_up if streams is not None and streams.conn == event.connection \
                else None
            failure = yield from self._run(self._safely(self.engine.pooled_connection_lost, why))
            if failure and self.send_connect:
                yield from self._abort_handshake(failure)
            return
        if self.send_connect:
            actions = self._safely(self.engine.parent_closed)
            failure = next((a.reason for a in actions if isinstance(a, eng.Failed)), None)
            if failure:
                yield from self._abort_handshake(failure)
                self.tunnel_state = self.tunnel_state.CLOSED
                return
        yield from super()._handle_event(event)

    def _on_timeout(self, generation: int) -> layer.CommandGenerator[None]:
        assert self.engine is not None
        actions = self._safely(self.engine.timed_out, generation)
        if not actions:
            return
        failure = next((a.reason for a in actions if isinstance(a, eng.Failed)), None)
        if self.send_connect and not self._tunnel_open and failure is not None:
            yield from self._abort_handshake(failure)
        else:  # a timeout, or the legs starting after a wait for the lockout guard
            yield from self._run(actions)

    def _abort_handshake(self, err: str) -> layer.CommandGenerator[None]:
        """End a CONNECT handshake with `err` outside receive_handshake_data."""
        if self.tunnel_state is not self.tunnel_state.ESTABLISHING:
            return
        if self.conn != self.tunnel_connection:
            self.conn.state = connection.ConnectionState.CLOSED
        if self.tunnel_connection.connected:
            yield commands.CloseConnection(self.tunnel_connection)
        self._report_trace()
        yield from self._handshake_finished(err)

    def _handle_command(self, command: commands.Command) -> layer.CommandGenerator[None]:
        if (
            isinstance(command, commands.OpenConnection)
            and command.connection == self.conn
            and type(self).policy is not None
        ):
            return self._open_tunnel(command)
        return super()._handle_command(command)

    def _open_tunnel(self, command: commands.OpenConnection) -> layer.CommandGenerator[None]:
        """As TunnelLayer does, plus failover to the next parent, roaming, and an error that
        names the parents instead of a bare errno."""
        self.command_to_reply_to = command
        self.tunnel_state = tunnel.TunnelState.ESTABLISHING
        err = yield from self._connect_to_a_parent()
        if err:
            log.warning("[ntlm] %s", err)
            self._tunnel_failed(err)
            yield from self.event_to_child(events.OpenConnectionCompleted(command, err))
            self.tunnel_state = tunnel.TunnelState.CLOSED
        else:
            yield from self.start_handshake()

    def _tunnel_failed(self, err: str) -> None:
        """The tunnel of an answered CONNECT failed. For intercepted https, mitmproxy's TLS
        layer opened it early and its HTTP layer would open it again for the first request:
        a second handshake timeout, or a second failed logon. `conn.error` is mitmproxy's
        own "this server connection failed" (its HTTP layer then does not reconnect), and the
        requests inside get this failure's status and text (`answer_failed_tunnel`)."""
        if not self.send_connect or self.conn is self.tunnel_connection or self._direct:
            return
        failure = self.engine.failure if self.engine is not None else None
        status = failure.status if failure is not None and not failure.auth_failure else 502
        self.conn.error = err
        _FAILED_TUNNELS[self.conn] = (status, err)

    # ------------------------------------------------------------------ CONNECT answered after it

    def _open_before_answer(self) -> layer.CommandGenerator[None]:
        """Open and authenticate the tunnel before the client's CONNECT is answered; the
        outcome goes to `self.verdict` (nothing is passed to the child layer until Start)."""
        self._answer_waits = True
        self.tunnel_state = tunnel.TunnelState.ESTABLISHING
        err = yield from self._connect_to_a_parent()
        if err:
            log.warning("[ntlm] %s", err)
            yield from self._handshake_finished(err)
        else:
            yield from self.start_handshake()

    def _handshake_finished(self, err: str | None) -> layer.CommandGenerator[None]:
        if not self._answer_waits:
            if err:
                self._tunnel_failed(err)
            return super()._handshake_finished(err)
        self._answer_waits = False
        self.tunnel_state = tunnel.TunnelState.CLOSED if err else tunnel.TunnelState.OPEN
        self._start_pending = err is None
        self.verdict = self._verdict(err)
        return _nothing()

    def _verdict(self, err: str | None) -> TunnelVerdict:
        """What the client's CONNECT is answered: the policy's 407 challenge for rejected or
        withheld credentials, 504 for a parent that did not answer in time, else 502."""
        if err is None:
            return TunnelVerdict()
        failure = self.engine.failure if self.engine is not None else None
        policy = type(self).policy
        if failure is not None and failure.auth_failure and policy is not None:
            status, headers = policy.failure_response()
            return TunnelVerdict(err, status, headers)
        return TunnelVerdict(err, failure.status if failure is not None else 502)

    def _start_on_open_tunnel(self, event: events.Start) -> layer.CommandGenerator[None]:
        """The CONNECT was answered 200: the child layer starts on the open connection, as
        with connection_strategy=eager (see `_ServerTlsFirst`), then gets what the parent
        sent after its 200 (held back until now)."""
        self._start_pending = False
        yield from self.event_to_child(event)
        held, self._event_queue = self._event_queue, []
        for held_event in held:
            yield from self.event_to_child(held_event)

    @property
    def opened_before_answer(self) -> bool:
        return self.verdict is not None and self.verdict.error is None

    def _connect_to_a_parent(self) -> layer.CommandGenerator[str | None]:
        """Open the parent connection: the chosen parent, else the others in order, else
        (with roaming) the target itself. Returns an error text when nothing answered."""
        parents = type(self).parents
        via = self.context.server.via
        scheme = via[0] if via else "http"
        tried: list[str] = []
        candidates = [(scheme, self.tunnel_connection.address)]
        if parents is not None and scheme == "http":
            # A TLS layer above us is bound to the first parent: failover only for http ones.
            candidates += [s for s in parents.ordered() if s != candidates[0] and s[0] == "http"]
        for number, spec in enumerate(candidates):
            if number:
                log.info("[ntlm] trying the next parent %s", human.format_address(spec[1]))
                self.tunnel_connection = connection.Server(address=spec[1])
            key = self._pool_key() if number == 0 else None
            err = yield from self._open_parent(self.tunnel_connection, key)
            if not err:
                if parents is not None:
                    parents.succeeded(spec)
                return None
            if parents is not None:
                parents.failed(spec, err)
            tried.append(f"{human.format_address(spec[1])}: {err}")
        if type(self).roaming and self.conn.address:
            self.tunnel_connection = connection.Server(address=self.conn.address)
            err = yield commands.OpenConnection(self.tunnel_connection)
            if not err:
                log.warning("[ntlm] no parent proxy answers: %s goes direct (ntlm_roaming)",
                            human.format_address(self.conn.address))
                self._direct = True
                return None
            tried.append(f"direct: {err}")
        which = "the parent proxy" if len(candidates) == 1 else "any parent proxy"
        return f"Cannot reach {which} ({'; '.join(tried)})"

    # plain http: every byte of the child's requests and the parent's responses passes here

    def send_data(self, data: bytes) -> layer.CommandGenerator[None]:
        if self.engine is None or self._tunnel_open:
            return super().send_data(data)
        if self._streams is not None and self._streams.lent:
            self._reacquire()
        return self._run(self._safely(self.engine.from_child, data))

    def receive_data(self, data: bytes) -> layer.CommandGenerator[None]:
        if self.engine is None or self._tunnel_open:
            return super().receive_data(data)
        streams = self._streams
        if streams is not None:
            streams.seen += len(data)
        return self._run(self._safely(self.engine.from_parent, data), lend=True)

    def receive_close(self) -> layer.CommandGenerator[None]:
        if self.engine is not None and not self._tunnel_open:
            yield from self._run(self._safely(self.engine.parent_closed))
        yield from super().receive_close()

    # ------------------------------------------------------------------ actions

    def _safely(self, step: Callable[..., list[eng.Action]], *args: Any) -> list[eng.Action]:
        assert self.engine is not None
        return run_step(self.engine, step, *args)

    def _report_trace(self) -> None:
        """Hand a finished handshake to the addon once (flow annotations, leg flows)."""
        trace = self.engine.trace if self.engine else None
        policy = type(self).policy
        if trace is None or trace.emitted or trace.result == "pending" or policy is None:
            return
        trace.emitted = True
        if policy.on_finished is not None:
            try:
                policy.on_finished(trace, self.context.client, self.tunnel_connection)
            except Exception:  # annotations must never break the connection
                log.exception("[ntlm] could not annotate the flows of %s", trace.kind)

    def _run(self, actions: Iterable[eng.Action],
             lend: bool = False) -> layer.CommandGenerator[str | None]:
        """Carry out engine actions, then report a finished handshake and (`lend`, after a
        response) lend the connection if it is idle; returns a CONNECT failure reason, if any.
        (One generator: every command of a request passes it.)"""
        failure: str | None = None
        for action in actions:
            if isinstance(action, eng.ToParent):
                yield commands.SendData(self.tunnel_connection, action.data)
            elif isinstance(action, eng.ToChild):
                yield from super().receive_data(action.data)
            elif isinstance(action, eng.CloseParent):
                self._note_stray()
                if self.send_connect and not self._tunnel_open:
                    continue  # the tunnel layer closes it when the handshake fails
                if self.tunnel_connection.connected:
                    yield commands.CloseConnection(self.tunnel_connection)
            elif isinstance(action, eng.StartTimer):
                policy = type(self).policy
                timeout = action.delay or (policy.handshake_timeout if policy else 30.0)
                wakeup = commands.RequestWakeup(timeout)
                self._timers[wakeup] = action.generation
                yield wakeup
            elif isinstance(action, eng.Reconnect):
                self._note_stray()
                failure = yield from self._reconnect()
            elif isinstance(action, eng.Failed):
                failure = action.reason
        self._report_trace()
        engine = self.engine
        if lend and self._streams is not None and engine is not None and engine.reusable():
            self._lend()
        return failure

    def _note_stray(self) -> None:
        """The engine saw bytes outside any response: the pool stops sharing this parent's
        connections between clients (see `ParentPool.misbehaved`)."""
        engine, pool = self.engine, type(self).pool
        if engine is None or engine.stray is None:
            return
        streams = self._streams
        key = streams.key if streams is not None and streams.key else self._pool_key()
        if pool is not None and key is not None:
            pool.misbehaved(key, engine.stray)
        engine.stray = None

    def _reconnect(self) -> layer.CommandGenerator[str | None]:
        """Replace the parent connection after a 407 that closed it, and restart the legs."""
        assert self.engine is not None
        old = self.tunnel_connection
        self._retired.add(old)
        if old.connected:
            yield commands.CloseConnection(old)
        fresh = connection.Server(address=old.address)
        self.tunnel_connection = fresh
        self._streams = None
        self._uses = 1
        err = yield from self._open_parent(fresh, self._pool_key())
        entry = self._adopted
        if entry is not None:  # the pool had one of this user after all: no logon
            self._uses = entry.uses
            return (yield from self._run(self._safely(
                self.engine.reconnected_pooled, entry.key.creds, entry.authenticated_at,
                entry.uses)))
        return (yield from self._run(self._safely(self.engine.reconnected, err)))


# ---------------------------------------------------------------------- pool: ConnectionHandler


@dataclass(eq=False)
class _Opening:
    """What `_open_connection` should do for one parent `Server` our layer opens."""

    releaser: NtlmUpstreamProxy | None  # the layer that lends the socket between requests
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


_OPENING: dict[connection.Connection, _Opening] = {}
_OPENED: dict[connection.Connection, _Opening] = {}  # until handle_connection starts


class _ParentStreams:
    """The reader and writer (one object, as mitmproxy_rs streams are) that mitmproxy holds
    for a plain-http parent connection of our layer.

    Behind them is one physical parent connection at a time: after each response the layer
    lends it to the pool (`detach`), and before the next request it attaches whichever
    connection the pool has for this user (`attach`), or waits for one (`wait_for`). mitmproxy
    sees one server connection for the client's lifetime. When mitmproxy closes it, an idle
    authenticated physical connection goes to the pool instead of being closed.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: connection.Connection, layer_: NtlmUpstreamProxy) -> None:
        self.conn = conn
        self.layer: NtlmUpstreamProxy | None = layer_
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

    def wait_for(self, waiter: Waiter) -> None:
        """Requests are written ahead while the pool finds a connection (`waiter`)."""
        self._waiter = waiter
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
        pool = NtlmUpstreamProxy.pool
        try:
            entry = await pool.next_free(waiter) if pool is not None else None
        finally:
            self._waiter = None
        if entry is None:
            self.gave_up = (f"no connection came free within {pool.wait_timeout:g} s"
                            if pool is not None and waiter.cancelled()
                            else "a connection closed, so a new one may be opened")
        elif self.closed and pool is not None:
            pool.discard(entry.key, entry.writer)
            return None
        elif not entry.alive() and pool is not None:  # closed, or bytes came since `put`
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
        layer_, self.layer = self.layer, None
        if self._waiter is not None:
            self._waiter.cancel()
        self._wakeup()
        reader, writer = self.phys_reader, self.phys_writer
        self.phys_reader = self.phys_writer = None
        if writer is None or reader is None:
            return
        pool = NtlmUpstreamProxy.pool
        released = None
        if layer_ is not None and pool is not None and not self._eof_sent:
            try:
                released = layer_.pool_release(self.conn, reader, writer)
            except Exception:  # never let pooling break a close
                log.exception("[ntlm] could not return a parent connection to the pool")
        if pool is None:
            writer.close()
        elif released is None:
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


async def _open_connection(self: server.ConnectionHandler,
                           command: commands.OpenConnection) -> None:
    """Wraps `ConnectionHandler.open_connection` (see the module docstring)."""
    opening = _OPENING.pop(command.connection, None)
    if opening is None:
        return await _ORIGINAL_OPEN(self, command)
    conn, pool = command.connection, opening.pool
    _OPENED[conn] = opening
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
                return await _open_pooled(self, command, entry)
            pool.discard(entry.key, entry.writer)
            log.debug("[ntlm] the pooled connection to %s died; connecting", entry.key)
            if opening.releaser is not None:  # counted while it connects; a tunnel never is
                opening.reservation = pool.reserve(entry.key)
        return await _ORIGINAL_OPEN(self, command)
    except BaseException:
        opening.release(close_entry=True)  # cancelled (client gone) while waiting: no leak
        raise
    finally:
        _OPENED.pop(conn, None)
        opening.release()


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


def _handle_connection(self: server.ConnectionHandler,
                       connection_: connection.Connection) -> Coroutine[Any, Any, None]:
    """Wraps `ConnectionHandler.handle_connection`: our parent connections get a writer that
    can return them to the pool when mitmproxy closes them. Not a coroutine itself: it returns
    mitmproxy's, so each read of every connection (clients' too) passes no extra frame.
    (mitmproxy calls it once the connection's transports are set, in all supported versions.)"""
    opening = _OPENED.pop(connection_, None)
    if opening is not None and opening.releaser is not None:
        io = self.transports.get(connection_)
        if (io is not None and isinstance(io.writer, asyncio.StreamWriter)
                and isinstance(io.reader, asyncio.StreamReader)):
            streams = _ParentStreams(io.reader, io.writer, connection_, opening.releaser)
            io.reader = io.writer = streams  # type: ignore[assignment]
            opening.releaser.streams_opened(streams)
        opening.release()  # counted as a live connection from here on
    return _ORIGINAL_HANDLE(self, connection_)  # type: ignore[no-any-return]


_ORIGINAL_OPEN = getattr(server.ConnectionHandler.open_connection, "_ntlm_original",
                         server.ConnectionHandler.open_connection)
_ORIGINAL_HANDLE = getattr(server.ConnectionHandler.handle_connection, "_ntlm_original",
                           server.ConnectionHandler.handle_connection)
_open_connection._ntlm_original = _ORIGINAL_OPEN  # type: ignore[attr-defined]
_handle_connection._ntlm_original = _ORIGINAL_HANDLE  # type: ignore[attr-defined]


def set_pool(pool: ParentPool | None) -> None:
    """Share idle authenticated parent connections across client connections (None: off)."""
    old = NtlmUpstreamProxy.pool
    if old is not None and old is not pool:
        old.close_all()
    NtlmUpstreamProxy.pool = pool
    if pool is None:
        server.ConnectionHandler.open_connection = _ORIGINAL_OPEN  # type: ignore[method-assign]
        server.ConnectionHandler.handle_connection = _ORIGINAL_HANDLE  # type: ignore[method-assign]
    else:
        check_version()
        server.ConnectionHandler.open_connection = _open_connection  # type: ignore[method-assign]
        server.ConnectionHandler.handle_connection = _handle_connection  # type: ignore[method-assign]


def parent_tunnel(context: Any) -> layer.Layer:
    """The parent tunnel (CONNECT with NTLM) for a regular-mode CONNECT or a SOCKS5 connection,
    as upstream mode builds it for its CONNECTs; mitmproxy picks the layer under it."""
    return NtlmUpstreamProxy.make(context, True)[0]


# ---------------------------------------------------------------------- failed tunnels

_FAILED_TUNNELS: weakref.WeakKeyDictionary[connection.Connection, tuple[int, str]] = \
    weakref.WeakKeyDictionary()
"""Server connections whose tunnel failed after the CONNECT was answered: status and text."""


def answer_failed_tunnel(flow: http.HTTPFlow) -> None:
    """Answer a request inside a tunnel that failed (intercepted https) with the failure,
    e.g. 504 for a silent parent, instead of mitmproxy's generic 502."""
    if not _FAILED_TUNNELS or flow.response is not None:
        return
    failed = _FAILED_TUNNELS.get(flow.server_conn)
    if failed is not None:
        status, text = failed
        flow.response = http.Response.make(status, text + "\n", {
            "Content-Type": "text/plain; charset=utf-8", "X-Mitmproxy-Ntlm": "error"})


# ---------------------------------------------------------------------- CONNECT: answer after


class OpenBeforeAnswer(events.Event):
    """Asks a new parent tunnel to open and authenticate before the CONNECT is answered."""


@dataclass
class TunnelVerdict:
    """How the tunnel of a waiting CONNECT ended: open (`error` None), or the status, headers
    and text the client gets instead of `200 Connection established`."""

    error: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def _answers_after_parent(stream: http_layers.HttpStream) -> bool:
    """Multi-user CONNECTs not answered yet wait for the parent: the parent's verdict on the
    client's own credentials must be the answer (a 407 there is where browsers prompt)."""
    policy = NtlmUpstreamProxy.policy
    return policy is not None and policy.multiuser and not stream.flow.response


def _handle_connect_regular(self: http_layers.HttpStream) -> layer.CommandGenerator[None]:
    """Wraps `HttpStream.handle_connect_regular`: a CONNECT routed to an http parent
    (`via`, set by routing.py) gets the parent tunnel now instead of after the answer."""
    via = self.context.server.via
    if via is None or via[0] != "http" or not _answers_after_parent(self):
        return (yield from _ORIGINAL_CONNECT_REGULAR(self))
    self.child_layer = parent_tunnel(self.context)
    yield from self.handle_connect_finish()


def _handle_connect_finish(self: http_layers.HttpStream) -> layer.CommandGenerator[None]:
    """Wraps `HttpStream.handle_connect_finish`, which answers the CONNECT: with an http
    parent tunnel under it, the answer waits for the tunnel (see `_AnswerAfterParent`)."""
    child = self.child_layer
    if not isinstance(child, NtlmUpstreamProxy) or not _answers_after_parent(self):
        return (yield from _ORIGINAL_CONNECT_FINISH(self))
    waiting = _AnswerAfterParent(self, child)
    self._handle_event = waiting.handle_event  # type: ignore[method-assign]
    yield from waiting.forward(OpenBeforeAnswer())


HELD_BEFORE_ANSWER = 64 * 1024
"""Bytes a client may send after its CONNECT before the answer (a TLS ClientHello fits many
times over); more closes its connection, so a client cannot stream into memory meanwhile."""


def _http1_server(stream: http_layers.HttpStream) -> http_layers.Http1Server | None:
    """The HTTP/1 layer reading the client of `stream` (None for HTTP/2 clients)."""
    for owner in reversed(stream.context.layers):
        if isinstance(owner, http_layers.HttpLayer):
            conn = owner.connections.get(stream.context.client)
            return conn if isinstance(conn, http_layers.Http1Server) else None
    return None


class _AnswerAfterParent:
    """Stands in for a CONNECT stream's event handler while its parent tunnel opens, then
    answers: 200 and the tunnel, or the verdict (407 with the Basic challenge for credentials
    the parent rejected) before any tunnel. Browsers ask for proxy credentials only on the
    CONNECT's own answer; inside the tunnel a 407 is never shown, and a passthrough client
    would only see its TLS handshake fail. What the client sends meanwhile is bounded by
    `HELD_BEFORE_ANSWER`: mitmproxy's HTTP/1 layer buffers it, HTTP/2 data is held here."""

    def __init__(self, stream: http_layers.HttpStream, tunnel_: NtlmUpstreamProxy) -> None:
        self.stream = stream
        self.tunnel = tunnel_
        self.held: list[events.Event] = []  # the client's HTTP events, for after the answer
        self.held_bytes = 0
        self.http1 = _http1_server(stream)
        if self.http1 is not None:  # its wait state buffers the client's bytes unbounded
            self.http1._handle_event = self._http1_event  # type: ignore[method-assign]

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.RequestProtocolError):
            return self._client_gone(event)
        if isinstance(event, http_layers.HttpEvent):
            self.held.append(event)
            if isinstance(event, http_layers.RequestData):
                self.held_bytes += len(event.data)
                if self.held_bytes > HELD_BEFORE_ANSWER:
                    return self._too_much()
            return _nothing()
        return self.forward(event)  # the tunnel's connection, hooks and timers

    def _http1_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        http1 = self.http1
        assert http1 is not None
        if isinstance(event, events.DataReceived) and http1.state != http1.passthrough:
            if len(http1.buf) + len(event.data) > HELD_BEFORE_ANSWER:
                return self._too_much()
        return type(http1)._handle_event(http1, event)

    def _too_much(self) -> layer.CommandGenerator[None]:
        """Close the client connection (mitmproxy then closes the parent connection too)."""
        client = self.stream.context.client
        if client.connected:
            log.warning("[ntlm] %s sent more than %d bytes before its CONNECT was answered: "
                        "connection closed", human.format_address(client.peername),
                        HELD_BEFORE_ANSWER)
            self.held.clear()
            yield commands.CloseConnection(client)

    def _stop_bounding(self) -> None:
        if self.http1 is not None and "_handle_event" in vars(self.http1):
            del self.http1._handle_event  # its own again

    def forward(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.tunnel.handle_event(event)
        verdict = self.tunnel.verdict
        if verdict is not None:
            yield from self._answer(verdict)

    def _answer(self, verdict: TunnelVerdict) -> layer.CommandGenerator[None]:
        stream = self.stream
        self._stop_bounding()
        if verdict.error is None:
            del stream._handle_event  # HttpStream's own again; the 200 switches to passthrough
        else:
            stream.flow.response = http.Response.make(
                verdict.status, verdict.error + "\n",
                {"Content-Type": "text/plain", **verdict.headers})
            stream._handle_event = self._after_failure  # type: ignore[method-assign]
        yield from _ORIGINAL_CONNECT_FINISH(stream)
        for event in self.held:
            yield from stream._handle_event(event)

    def _after_failure(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Late events of the failed tunnel (its close, its timers) end here."""
        if isinstance(event, http_layers.HttpEvent):
            return http_layers.HttpStream._handle_event(self.stream, event)
        return _nothing()

    def _client_gone(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The client left before the answer: close the parent connection, end the flow."""
        stream = self.stream
        self._stop_bounding()
        stream._handle_event = self._after_failure  # type: ignore[method-assign]
        stream.client_state = stream.state_errored
        if self.tunnel.tunnel_connection.connected:
            yield commands.CloseConnection(self.tunnel.tunnel_connection)
        assert isinstance(event, http_layers.RequestProtocolError)
        stream.flow.error = mitmproxy.flow.Error(event.message)
        yield http_layers.HttpErrorHook(stream.flow)
        stream.flow.live = False
        yield http_layers.DropStream(stream.stream_id)


def _opened_before_answer(context: Any) -> bool:
    return any(isinstance(x, NtlmUpstreamProxy) and x.opened_before_answer
               for x in context.layers)


class _ServerTlsFirst:
    """Under a tunnel opened before its CONNECT was answered, the server connection is open
    when the layers under it start, as with connection_strategy=eager; so TLS to the server
    is set up first too, as eager does. (With lazy, mitmproxy's HTTP layer would send into a
    server TLS layer that never started.) mitmproxy's TlsConfig decides this from
    connection_strategy after all scripts: this addon is added after it, by `install`."""

    name = "ntlm_server_tls_first"

    def tls_clienthello(self, data: Any) -> None:
        if data.context.server.tls and _opened_before_answer(data.context):
            data.establish_server_tls_first = True


_ORIGINAL_CONNECT_REGULAR = getattr(http_layers.HttpStream.handle_connect_regular,
                                    "_ntlm_original", http_layers.HttpStream.handle_connect_regular)
_ORIGINAL_CONNECT_FINISH = getattr(http_layers.HttpStream.handle_connect_finish,
                                   "_ntlm_original", http_layers.HttpStream.handle_connect_finish)
_handle_connect_regular._ntlm_original = _ORIGINAL_CONNECT_REGULAR  # type: ignore[attr-defined]
_handle_connect_finish._ntlm_original = _ORIGINAL_CONNECT_FINISH  # type: ignore[attr-defined]


class OriginAuthLayer(tunnel.TunnelLayer):
    """Answers an allow-listed server's `401 WWW-Authenticate: NTLM/Negotiate` on its own
    connection (Fiddler's "Automatically Authenticate"), between TLS and the HTTP client."""

    def __init__(self, context: Any, engine: eng.AuthEngine) -> None:
        super().__init__(context, tunnel_connection=context.server, conn=context.server)
        self.engine = engine
        self._waits: dict[commands.RequestWakeup, int] = {}  # generation of each wait

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._waits and isinstance(event, events.Wakeup) and event.command in self._waits:
            generation = self._waits.pop(event.command)
            return self._run(self._safely(self.engine.timed_out, generation))
        return super()._handle_event(event)

    def send_data(self, data: bytes) -> layer.CommandGenerator[None]:
        yield from self._run(self._safely(self.engine.from_child, data))

    def receive_data(self, data: bytes) -> layer.CommandGenerator[None]:
        yield from self._run(self._safely(self.engine.from_parent, data))

    def receive_close(self) -> layer.CommandGenerator[None]:
        yield from self._run(self._safely(self.engine.parent_closed))
        yield from super().receive_close()

    def _safely(self, step: Callable[..., list[eng.Action]], *args: Any) -> list[eng.Action]:
        return run_step(self.engine, step, *args)

    def _run(self, actions: Iterable[eng.Action]) -> layer.CommandGenerator[None]:
        for action in actions:
            if isinstance(action, eng.ToParent):
                yield commands.SendData(self.tunnel_connection, action.data)
            elif isinstance(action, eng.ToChild):
                yield from super().receive_data(action.data)
            elif isinstance(action, eng.CloseParent | eng.Reconnect):
                # a server connection cannot be replaced from here: close it, the client retries
                if self.tunnel_connection.connected:
                    yield commands.CloseConnection(self.tunnel_connection)
            elif isinstance(action, eng.StartTimer) and action.delay:
                # a wait for the account's logons in progress (the lockout guard); a server
                # that stalls is covered by mitmproxy's own timeouts
                wakeup = commands.RequestWakeup(action.delay)
                self._waits[wakeup] = action.generation
                yield wakeup


OriginEngineFactory = Callable[[Any], "eng.AuthEngine | None"]


def _http_client_with_origin_auth(context: Any) -> layer.Layer:
    """Stands in for `HttpClient(context)` in mitmproxy's HTTP layer."""
    factory = NtlmUpstreamProxy.origin_engines
    engine = factory(context) if factory is not None else None
    if engine is None:
        return _ORIGINAL_CLIENT(context)
    auth = OriginAuthLayer(context, engine)  # created first: the HTTP client stays layers[-1]
    auth.child_layer = _ORIGINAL_CLIENT(context)
    return auth


_http_client_with_origin_auth._ntlm_original = _ORIGINAL_CLIENT  # type: ignore[attr-defined]


def set_origin_auth(factory: OriginEngineFactory | None) -> None:
    """Authenticate to allow-listed servers: `factory(context)` gives an engine or None."""
    NtlmUpstreamProxy.origin_engines = factory
    if factory is None:
        http_layers.HttpClient = _ORIGINAL_CLIENT  # type: ignore[misc]
    else:
        check_version()
        http_layers.HttpClient = _http_client_with_origin_auth  # type: ignore[assignment,misc]


def set_routing(parents: ParentList | None, roaming: bool) -> None:
    """Failover list and roaming for the parent layer (set by the routing addon)."""
    NtlmUpstreamProxy.parents = parents
    NtlmUpstreamProxy.roaming = roaming


def install(policy: UpstreamPolicy) -> None:
    """Route every new parent connection through NtlmUpstreamProxy with `policy`."""
    check_version()
    NtlmUpstreamProxy.policy = policy
    _upstream_proxy.HttpUpstreamProxy = NtlmUpstreamProxy  # type: ignore[misc]
    stream = http_layers.HttpStream
    stream.handle_connect_regular = _handle_connect_regular  # type: ignore[method-assign]
    stream.handle_connect_finish = _handle_connect_finish  # type: ignore[method-assign]
    addons = mitmproxy_ctx.master.addons
    if addons.get(_ServerTlsFirst.name) is None:
        addons.add(_ServerTlsFirst())


def uninstall() -> None:
    """Put mitmproxy's own layer back (addon unloaded or script reloaded)."""
    set_pool(None)
    NtlmUpstreamProxy.policy = None
    _upstream_proxy.HttpUpstreamProxy = _ORIGINAL  # type: ignore[misc]
    stream = http_layers.HttpStream
    stream.handle_connect_regular = _ORIGINAL_CONNECT_REGULAR  # type: ignore[method-assign]
    stream.handle_connect_finish = _ORIGINAL_CONNECT_FINISH  # type: ignore[method-assign]
    master = getattr(mitmproxy_ctx, "master", None)
    tls_first = master.addons.get(_ServerTlsFirst.name) if master is not None else None
    if tls_first is not None:
        master.addons.remove(tls_first)


def installed() -> bool:
    return _upstream_proxy.HttpUpstreamProxy is NtlmUpstreamProxy
