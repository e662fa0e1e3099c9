"""The tunnel layer to the parent proxy that answers its 407 with NTLM or Negotiate.

mitmproxy has no public hook that sees the parent's 407, and NTLM must answer it on the same
connection. `HttpUpstreamProxy` (a private tunnel layer) builds every connection to the parent,
for CONNECT tunnels and for absolute-form plain http; `mitmproxy_internals` swaps in
`NtlmUpstreamProxy`, which runs `engine.AuthEngine` on the connection and carries out its
actions. Around the legs it adds failover to the next parent, roaming, and the pool: a
plain-http parent connection is lent between requests (`pool.lending.ParentLender`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer, tunnel
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook
from mitmproxy.utils import human

from .. import engine as eng
from .. import mitmproxy_internals as internals
from ..parents import unreachable
from ..policy import AuthUnavailable
from ..pool import PooledConnection, PoolKey
from ..pool.lending import ParentLender, ParentStreams
from ..runtime import Runtime
from ..wire import ResponseRest
from .origin_auth import OriginAuthLayer, run_step

log = logging.getLogger("mitmproxy_ntlm")


def _nothing() -> layer.CommandGenerator[None]:
    yield from ()


class OpenBeforeAnswer(events.Event):
    """Asks a new parent tunnel to open and authenticate before the CONNECT is answered."""


@dataclass
class TunnelVerdict:
    """How the tunnel of a waiting CONNECT ended: open (`error` None), or the status, headers
    and text the client gets instead of `200 Connection established`."""

    error: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class NtlmUpstreamProxy(internals.ORIGINAL_UPSTREAM_LAYER):  # type: ignore[misc,valid-type]
    """`HttpUpstreamProxy` that authenticates to the parent with NTLM."""

    runtime: ClassVar[Runtime | None] = None  # set by mitmproxy_internals.sync

    def __init__(self, ctx, tunnel_conn: connection.Server, send_connect: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx, tunnel_conn, send_connect)
        runtime = type(self).runtime
        assert runtime is not None  # installed only with one
        self.rt = runtime
        self.engine: eng.AuthEngine | None = None
        self._tunnel_open = False  # CONNECT established: bytes bypass the engine
        self._retired: set[connection.Connection] = set()
        self._timers: dict[commands.RequestWakeup, int] = {}
        self._pending_failure: str | None = None
        self._direct = False  # roaming: no parent answered, the tunnel goes to the target
        pool = runtime.pool
        self.lender = ParentLender(pool, runtime.openings) if pool is not None else None
        # A CONNECT whose answer waits for this tunnel (see `connect_answer`): how the
        # handshake ended, and whether the child layer is yet to start on the open tunnel.
        self.verdict: TunnelVerdict | None = None
        self._answer_waits = False
        self._start_pending = False

    # ------------------------------------------------------------------ setup

    def _new_engine(self) -> eng.AuthEngine | None:
        policy = self.rt.policy
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
        engine.reuse.track = self._may_return_to_pool()
        return engine

    # ------------------------------------------------------------------ connection pool

    def _absolute_form(self) -> bool:
        """Plain http to the parent (no CONNECT), as `start_handshake` decides it."""
        return not self.send_connect or isinstance(
            self.child_layer, internals.ORIGINAL_HTTP_CLIENT | OriginAuthLayer)

    def _pool_scheme_ok(self) -> bool:
        """Only plain-TCP parents: a TLS session to an https parent lives in this handler's
        TLS layer and cannot move to another client connection."""
        via = self.context.server.via
        return self.lender is not None and (via is None or via[0] == "http")

    def _may_return_to_pool(self) -> bool:
        """Plain http through an http parent. Not with automatic logon to the origin: the
        parent pins the origin's authenticated connection to this one (as Squid does)."""
        return (self._pool_scheme_ok() and self._absolute_form() and not self._direct
                and not isinstance(self.child_layer, OriginAuthLayer))

    def _pool_key(self) -> PoolKey | None:
        """This parent and this client's current identity; None without a pool."""
        policy = self.rt.policy
        address = self.tunnel_connection.address
        if policy is None or not self._pool_scheme_ok() or not address:
            return None
        try:
            creds = policy.credentials(self.context.client.id)
        except AuthUnavailable:
            return None  # the normal path explains it to the client
        return PoolKey("http", (address[0], address[1]), creds)

    def streams_opened(self, streams: ParentStreams) -> None:
        """mitmproxy now reads and writes the parent connection through `streams`."""
        if streams.conn is not self.tunnel_connection or self.lender is None:
            return
        key = self._pool_key()
        if key is not None:
            self.lender.track(streams, key)

    def pool_release(self, conn: connection.Connection, reader: Any, writer: Any
                     ) -> tuple[PooledConnection, ResponseRest | None] | None:
        """Called when mitmproxy closes a parent connection of this layer: the pool entry to
        keep instead (see `ParentLender.entry_to_keep`)."""
        engine = self.engine
        if (conn != self.tunnel_connection or engine is None or self._tunnel_open
                or self._direct or self.lender is None):
            return None
        return self.lender.entry_to_keep(engine, conn, reader, writer)

    def _open_parent(self, conn: connection.Server,
                     key: PoolKey | None = None) -> layer.CommandGenerator[str | None]:
        """OpenConnection for a parent connection. With `key` (plain http, pool on) the pool
        may give one of that parent and user instead (`lender.adopted` then says which)."""
        lender = self.lender
        releaser = self if self._may_return_to_pool() else None
        if lender is None or (releaser is None and key is None):
            if lender is not None:
                lender.adopted = None
            return (yield commands.OpenConnection(conn))
        opening = lender.prepare(conn, key, releaser)
        err = yield commands.OpenConnection(conn)
        lender.opened(conn, opening, err)
        return err

    def _connect_request_head(self) -> layer.CommandGenerator[bytes]:
        """mitmproxy's own CONNECT head, taken from the SendData its `start_handshake` would
        send (other addons' `http_connect_upstream` hooks run on it as usual), for the engine
        to add the legs' header to."""
        handshake = internals.ORIGINAL_UPSTREAM_LAYER.start_handshake(self)
        reply: Any = None
        while True:
            command = handshake.send(reply)
            if isinstance(command, commands.SendData) \
                    and command.connection is self.tunnel_connection:
                handshake.close()
                return command.data
            if isinstance(command, HttpConnectUpstreamHook):
                _bracket_ipv6_authority(command.flow.request)
            reply = yield command

    # ------------------------------------------------------------------ tunnel hooks

    def start_handshake(self) -> layer.CommandGenerator[None]:
        if self._direct:
            self.send_connect = False
            return (yield from super().start_handshake())
        if self.send_connect and isinstance(
                self.child_layer, internals.ORIGINAL_HTTP_CLIENT | OriginAuthLayer):
            # Regular/SOCKS mode routed via a parent: plain http goes absolute-form, as in
            # upstream mode, not CONNECT to port 80 (which real parents refuse).
            self.send_connect = False
        self.engine = self._new_engine()
        if self.engine is None:
            return (yield from super().start_handshake())
        adopted = self.lender.adopted if self.lender is not None else None
        if adopted is not None:
            self.lender.uses = adopted.uses  # type: ignore[union-attr]
            self.engine.adopt(adopted.key.creds, adopted.authenticated_at, adopted.uses,
                              connect=self.send_connect)
            self._report_trace()
        if not self.send_connect:
            # Plain http: the tunnel opens at once; the engine works on each request.
            return (yield from super().start_handshake())
        raw = yield from self._connect_request_head()
        failure = yield from self._run(self._step(self.engine.start_connect, raw))
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
        actions = self._step(self.engine.from_parent, data)
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

    # The four overrides every event, command and byte of a request passes (_handle_event,
    # _handle_command, send_data, receive_data) return the generator to run instead of being
    # one: no extra frame per command. Measured with bench/ab_cpu.py --pin (keep-alive, 6
    # alternating rounds): 0.90x the CPU per request of plain generators.

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
        if (self.engine is not None and not self._tunnel_open
              and isinstance(event, events.ConnectionClosed)
              and event.connection == self.tunnel_connection):
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
            streams = self.lender.streams if self.lender is not None else None
            why = streams.gave_up if streams is not None and streams.conn == event.connection \
                else None
            failure = yield from self._run(self._step(self.engine.pooled_connection_lost, why))
            if failure and self.send_connect:
                yield from self._abort_handshake(failure)
            return
        if self.send_connect:
            actions = self._step(self.engine.parent_closed)
            failure = next((a.reason for a in actions if isinstance(a, eng.Failed)), None)
            if failure:
                yield from self._abort_handshake(failure)
                self.tunnel_state = self.tunnel_state.CLOSED
                return
        yield from super()._handle_event(event)

    def _on_timeout(self, generation: int) -> layer.CommandGenerator[None]:
        assert self.engine is not None
        actions = self._step(self.engine.timed_out, generation)
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
        if (isinstance(command, commands.OpenConnection) and command.connection == self.conn
                and self.rt.policy is not None):
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
        self.rt.failed_tunnels[self.conn] = (status, err)

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
            yield from super()._handshake_finished(err)
            return
        self._answer_waits = False
        self.tunnel_state = tunnel.TunnelState.CLOSED if err else tunnel.TunnelState.OPEN
        self._start_pending = err is None
        self.verdict = self._verdict(err)

    def _verdict(self, err: str | None) -> TunnelVerdict:
        """What the client's CONNECT is answered: the policy's 407 challenge for rejected or
        withheld credentials, 504 for a parent that did not answer in time, else 502."""
        if err is None:
            return TunnelVerdict()
        failure = self.engine.failure if self.engine is not None else None
        policy = self.rt.policy
        if failure is not None and failure.auth_failure and policy is not None:
            status, headers = policy.failure_response()
            return TunnelVerdict(err, status, headers)
        return TunnelVerdict(err, failure.status if failure is not None else 502)

    def _start_on_open_tunnel(self, event: events.Start) -> layer.CommandGenerator[None]:
        """The CONNECT was answered 200: the child layer starts on the open connection, as
        with connection_strategy=eager (see `connect_answer.ServerTlsFirst`), then gets what
        the parent sent after its 200 (held back until now)."""
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
        parents = self.rt.parents
        via = self.context.server.via
        scheme = via[0] if via else "http"
        tried: list[str] = []
        first = (scheme, self.tunnel_connection.address)
        candidates = parents.failover(first) if parents is not None else [first]
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
        if self.rt.roaming and self.conn.address:
            self.tunnel_connection = connection.Server(address=self.conn.address)
            err = yield commands.OpenConnection(self.tunnel_connection)
            if not err:
                log.warning("[ntlm] no parent proxy answers: %s goes direct (ntlm_roaming)",
                            human.format_address(self.conn.address))
                self._direct = True
                return None
            tried.append(f"direct: {err}")
        return unreachable(len(candidates), tried)

    # plain http: every byte of the child's requests and the parent's responses passes here

    def send_data(self, data: bytes) -> layer.CommandGenerator[None]:
        if self.engine is None or self._tunnel_open:
            return super().send_data(data)
        lender = self.lender
        if lender is not None and lender.streams is not None and lender.streams.lent:
            lender.reacquire(self._pool_key(), self.engine)
        return self._run(self._step(self.engine.from_child, data))

    def receive_data(self, data: bytes) -> layer.CommandGenerator[None]:
        if self.engine is None or self._tunnel_open:
            return super().receive_data(data)
        streams = self.lender.streams if self.lender is not None else None
        if streams is not None:
            streams.seen += len(data)
        return self._run(self._step(self.engine.from_parent, data), lend=True)

    def receive_close(self) -> layer.CommandGenerator[None]:
        if self.engine is not None and not self._tunnel_open:
            yield from self._run(self._step(self.engine.parent_closed))
        yield from super().receive_close()

    # ------------------------------------------------------------------ actions

    def _step(self, step: Callable[..., list[eng.Action]], *args: Any) -> list[eng.Action]:
        assert self.engine is not None
        return run_step(self.engine, step, *args)

    def _report_trace(self) -> None:
        """Hand a finished handshake to the addon once (flow annotations, leg flows)."""
        trace = self.engine.trace if self.engine else None
        policy = self.rt.policy
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
        response) lend the connection if it is idle; returns a CONNECT failure reason, if any."""
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
                policy = self.rt.policy
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
        engine, lender = self.engine, self.lender
        if lend and lender is not None and lender.streams is not None and engine is not None:
            if engine.reusable():
                lender.lend(self)
            elif engine.state is eng.ConnState.NO_AUTH_NEEDED:
                lender.no_logon_needed()
        return failure

    def _note_stray(self) -> None:
        """The engine saw bytes outside any response: tell the pool (see `stray_seen`)."""
        engine = self.engine
        if engine is None or engine.reuse.stray is None:
            return
        if self.lender is not None:
            self.lender.stray_seen(engine.reuse.stray, self._pool_key())
        engine.reuse.stray = None

    def _reconnect(self) -> layer.CommandGenerator[str | None]:
        """Replace the parent connection after a 407 that closed it, and restart the legs."""
        assert self.engine is not None
        old = self.tunnel_connection
        self._retired.add(old)
        if old.connected:
            yield commands.CloseConnection(old)
        fresh = connection.Server(address=old.address)
        self.tunnel_connection = fresh
        lender = self.lender
        if lender is not None:
            lender.replaced()
        err = yield from self._open_parent(fresh, self._pool_key())
        entry = lender.adopted if lender is not None else None
        if entry is not None:  # the pool had one of this user after all: no logon
            lender.uses = entry.uses  # type: ignore[union-attr]
            return (yield from self._run(self._step(
                self.engine.reconnected_pooled, entry.key.creds, entry.authenticated_at,
                entry.uses)))
        return (yield from self._run(self._step(self.engine.reconnected, err)))


def _bracket_ipv6_authority(request: http.Request) -> None:
    """mitmproxy 11 writes an IPv6 CONNECT target bare (`::1:443`); 12.3 brackets it."""
    host = request.host
    if ":" not in host or request.authority.startswith("["):
        return
    bare = request.authority
    request.authority = f"[{host}]:{request.port}"
    if request.headers.get("Host") == bare:
        request.headers["Host"] = request.authority


def parent_tunnel(context: Any) -> layer.Layer:
    """The parent tunnel (CONNECT with NTLM) for a regular-mode CONNECT or a SOCKS5 connection,
    as upstream mode builds it for its CONNECTs; mitmproxy picks the layer under it."""
    return NtlmUpstreamProxy.make(context, True)[0]


def answer_failed_tunnel(runtime: Runtime, flow: http.HTTPFlow) -> None:
    """Answer a request inside a tunnel that failed (intercepted https) with the failure,
    e.g. 504 for a silent parent, instead of mitmproxy's generic 502."""
    if not runtime.failed_tunnels or flow.response is not None:
        return
    failed = runtime.failed_tunnels.get(flow.server_conn)
    if failed is not None:
        status, text = failed
        flow.response = http.Response.make(status, text + "\n", {
            "Content-Type": "text/plain; charset=utf-8", "X-Mitmproxy-Ntlm": "error"})
