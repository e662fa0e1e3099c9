"""Passed-through CONNECT tunnels relayed by the addon, outside mitmproxy's layers.

A tunnel to an `ignore_hosts` host is what a CNTLM replacement carries all day (IDEs, npm,
docker pulls over HTTPS). mitmproxy still runs its HTTP layer, the http_connect, next_layer and
server hooks over every addon, a tunnel and a TCP layer for it, and passes each chunk through
its event machinery: stock mitmdump alone spends more CPU per such tunnel than Px does in all.

So in mitmdump (nothing lists flows) with one identity for every client and an http parent in
upstream mode, the first bytes of each client connection are looked at here, after mitmproxy's
`client_connected` hook (its block_global and our Allow/Deny lists still decide who may
connect). A complete CONNECT head to a host that `ignore_hosts` names is answered here: the
engine logs on to the parent on a connection of our own (lockout guard, failover, Kerberos as
usual), the client gets mitmproxy's `200 Connection established` or the failure, and two
loops copy the bytes. Anything else goes to mitmproxy as it came: the first read is handed
to it as its own first read would have been. `ntlm_direct_tunnels=false` turns this off.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import events, mode_specs
from mitmproxy.utils import human

from . import engine as eng
from . import mitmproxy_internals, options
from .layers.origin_auth import run_step
from .parents import unreachable
from .policy import AuthUnavailable
from .pool import PooledConnection, PoolKey
from .runtime import Runtime
from .untrusted import shown

log = logging.getLogger("mitmproxy_ntlm")

HEAD_LIMIT = 65535  # mitmproxy's read size: a CONNECT head not complete in it goes to mitmproxy
CHUNK = 65536

HandleConnection = Callable[[Any, connection.Connection], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class DirectTunnels:
    """Which CONNECTs the addon relays itself (built from the options by `DirectTunnelSwitch`)."""

    ignore: tuple[re.Pattern[str], ...]
    send_host_header: bool

    def wanted(self, host: str, port: int) -> bool:
        """mitmproxy would pass host:port through: an `ignore_hosts` pattern matches it (as
        mitmproxy's next_layer matches the CONNECT address; SNI can only add matches)."""
        address = f"{host}:{port}"
        return any(rex.search(address) for rex in self.ignore)

    def serve(self, handler: Any, runtime: Runtime,
              original: HandleConnection) -> Coroutine[Any, Any, None]:
        """Stands in for `ConnectionHandler.handle_connection(client)`."""
        return serve(handler, runtime, self, original)


class Refused(Exception):
    """The tunnel could not be opened: `status` and `text` are the client's answer."""

    def __init__(self, text: str, status: int = 502, headers: dict[str, str] | None = None):
        super().__init__(text)
        self.status = status
        self.headers = headers or {}


def connect_target(data: bytes) -> tuple[http.Request, bytes] | None:
    """The CONNECT request at the start of `data` and the bytes after its head, or None when
    `data` is not a complete, well-formed CONNECT head (mitmproxy then reads it itself)."""
    if not data.startswith(b"CONNECT "):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    try:
        request = http1.read_request_head(lines)
    except ValueError:
        return None
    if request.method != "CONNECT" or not request.host or not request.port:
        return None
    return request, data[end + 4:]


def upstream_parent(client: connection.Client) -> tuple[str, int] | None:
    """The plain-http parent of an upstream-mode client, else None."""
    mode = client.proxy_mode
    if isinstance(mode, mode_specs.UpstreamMode) and mode.scheme == "http":
        return mode.address
    return None


async def serve(handler: Any, runtime: Runtime, tunnels: DirectTunnels,
                original: HandleConnection) -> None:
    """Stands in for `ConnectionHandler.handle_connection(client)` (see the module docstring)."""
    client = handler.client
    io = handler.transports[client]
    reader, writer = io.reader, io.writer
    parent = upstream_parent(client)
    policy = runtime.policy
    if (parent is None or policy is None or not policy.enabled or policy.multiuser
            or not isinstance(reader, asyncio.StreamReader)):
        return await original(handler, client)
    try:
        data = await reader.read(HEAD_LIMIT)
    except OSError:
        data = b""  # mitmproxy's own read meets the same error
    except asyncio.CancelledError:
        await _closed(handler, client, writer)
        raise
    found = connect_target(data) if data else None
    if found is None or not tunnels.wanted(found[0].host, found[0].port):
        if data:  # mitmproxy's first read, as its own loop would have done it
            try:
                await handler.server_event(events.DataReceived(client, data))
                await handler.drain_writers()
            except asyncio.CancelledError:
                await _closed(handler, client, writer)
                raise
        return await original(handler, client)
    request, early = found
    relay = Relay(handler, runtime, tunnels, request, parent, reader, writer)
    try:
        await relay.run(early)
    finally:
        await _closed(handler, client, writer)


async def _closed(handler: Any, client: connection.Client, writer: Any) -> None:
    """What mitmproxy does when it stops reading a client: its layers hear of the close, the
    transport is closed and forgotten."""
    client.state = connection.ConnectionState.CLOSED
    try:
        await handler.server_event(events.ConnectionClosed(client))
    finally:
        try:
            writer.close()
        except OSError:  # pragma: no cover - already gone
            pass
        handler.transports.pop(client, None)


class Relay:
    """One tunnel: the logon to the parent (driving `engine.AuthEngine`), the answer, the copy."""

    def __init__(self, handler: Any, runtime: Runtime, tunnels: DirectTunnels,
                 request: http.Request, parent: tuple[str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.handler = handler
        self.rt = runtime
        self.tunnels = tunnels
        self.request = request
        self.parent = parent
        self.client_reader = reader
        self.client_writer = writer
        self.parent_reader: asyncio.StreamReader | None = None
        self.parent_writer: asyncio.StreamWriter | None = None
        self.counts = runtime.direct_counts

    # ------------------------------------------------------------------ the whole tunnel

    async def run(self, early: bytes) -> None:
        client = self.handler.client
        target = human.format_address((self.request.host, self.request.port))
        counts = self.counts
        try:
            leftover = await self.open()
        except Refused as e:  # the engine (or `_connect`) has logged why
            counts.failed += 1
            await self._answer_failure(e)
            self._close_parent()
            return
        except BaseException:
            self._close_parent()
            raise
        counts.opened += 1
        counts.open_now += 1
        log.debug("[ntlm] %s: tunnel to %s relayed directly",
                  human.format_address(client.peername), shown(target))
        try:
            self.client_writer.write(b"%s 200 Connection established\r\n\r\n"
                                     % self.request.data.http_version)
            if leftover:
                self.client_writer.write(leftover)
            assert self.parent_writer is not None
            if early:
                self.parent_writer.write(early)
            await self.copy()
        finally:
            counts.open_now -= 1
            self._close_parent()

    # ------------------------------------------------------------------ logon

    async def open(self) -> bytes:
        """Connect and authenticate the tunnel; the parent's first tunnel bytes, if any. An
        idle authenticated connection from the pool needs no logon (NTLM authenticates the
        connection, so the parent takes a CONNECT on it; it never returns to the pool)."""
        policy = self.rt.policy
        assert policy is not None
        pooled = self._pooled_connection()
        if pooled is None:
            await self._connect()
        client = self.handler.client
        engine = eng.AuthEngine(  # target_host: the parent's (Kerberos asks for HTTP/<parent>)
            policy, human.format_address(self.parent), human.format_address(client.peername),
            target_host=self.parent[0], client_id=client.id, trace_key=client.id)
        if pooled is not None:
            engine.adopt(pooled.key.creds, pooled.authenticated_at, pooled.uses, connect=True)
        self.engine = engine
        self.timers: list[tuple[float, int]] = []
        actions = run_step(engine, engine.start_connect, self._connect_head())
        while True:
            done = await self._carry_out(actions)
            if done is not None:
                return done
            actions = await self._next_actions()

    def _pooled_connection(self) -> PooledConnection | None:
        pool, policy = self.rt.pool, self.rt.policy
        if pool is None or policy is None:
            return None
        try:
            creds = policy.credentials(self.handler.client.id)
        except AuthUnavailable:
            return None  # the engine says why
        key = PoolKey("http", self.parent, creds)
        entry = pool.take(key)
        if entry is not None:
            pool.untrack(key, entry.writer)  # it carries a tunnel now: no longer shared
            self.parent_reader, self.parent_writer = entry.reader, entry.writer
        return entry

    def _connect_head(self) -> bytes:
        """The CONNECT that mitmproxy's own parent layer would send."""
        host = self.request.host
        name = host.encode("idna") if ":" not in host else b"[%s]" % host.encode()
        authority = b"%s:%d" % (name, self.request.port)
        host_header = b"Host: %s\r\n" % authority if self.tunnels.send_host_header else b""
        return b"CONNECT %s HTTP/1.1\r\n%s\r\n" % (authority, host_header)

    async def _connect(self) -> None:
        """Open a connection to the parent, else (failover) to the next one."""
        policy = self.rt.policy
        parents = self.rt.parents
        first = ("http", self.parent)
        candidates = parents.failover(first) if parents is not None else [first]
        tried = []
        timeout = policy.handshake_timeout if policy is not None else 30.0
        for number, spec in enumerate(candidates):
            if number:
                log.info("[ntlm] trying the next parent %s", human.format_address(spec[1]))
            try:
                self.parent_reader, self.parent_writer = await asyncio.wait_for(
                    asyncio.open_connection(*spec[1]), timeout)
            except (TimeoutError, OSError) as e:
                err = str(e) or f"no answer within {timeout:g} s"
                if parents is not None:
                    parents.failed(spec, err)
                tried.append(f"{human.format_address(spec[1])}: {err}")
                continue
            self.parent = spec[1]
            if parents is not None:
                parents.succeeded(spec)
            return
        text = unreachable(len(candidates), tried)
        log.warning("[ntlm] %s", text)
        raise Refused(text)

    async def _carry_out(self, actions: list[eng.Action]) -> bytes | None:
        """Do what the engine asks; the tunnel's first bytes once it is established."""
        for action in actions:
            if isinstance(action, eng.ToParent):
                assert self.parent_writer is not None
                self.parent_writer.write(action.data)
            elif isinstance(action, eng.StartTimer):
                policy = self.rt.policy
                delay = action.delay or (policy.handshake_timeout if policy else 30.0)
                self.timers.append((time.monotonic() + delay, action.generation))
            elif isinstance(action, eng.Reconnect):
                self._close_parent()
                err = None
                try:
                    await self._connect()
                except Refused as e:
                    err = str(e)
                return await self._carry_out(run_step(self.engine, self.engine.reconnected, err))
            elif isinstance(action, eng.Failed):
                self._refuse(action)
            elif isinstance(action, eng.Established):
                return action.leftover
            # CloseParent: the tunnel is closed when its handshake fails; ToChild: not for
            # CONNECT.
        return None

    def _refuse(self, failure: eng.Failed) -> None:
        policy = self.rt.policy
        if failure.auth_failure and policy is not None:
            status, headers = policy.failure_response()
            raise Refused(failure.reason, status, headers)
        raise Refused(failure.reason, failure.status)

    async def _next_actions(self) -> list[eng.Action]:
        """The engine's answer to the parent's next bytes, its close, or a timer."""
        engine = self.engine
        assert self.parent_reader is not None
        timeout = None
        if self.timers:
            self.timers.sort()
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        try:
            data = await asyncio.wait_for(self.parent_reader.read(CHUNK), timeout)
        except TimeoutError:  # ours, or the socket's ETIMEDOUT
            if not self.timers or self.timers[0][0] > time.monotonic():
                data = b""
            else:
                _, generation = self.timers.pop(0)
                return run_step(engine, engine.timed_out, generation)
        except OSError:
            data = b""
        if data:
            return run_step(engine, engine.from_parent, data)
        if engine.lost_before_answer():  # the parent had dropped the pooled connection
            return run_step(engine, engine.pooled_connection_lost, None)
        actions = run_step(engine, engine.parent_closed)
        if not any(isinstance(a, eng.Failed) for a in actions):
            actions.append(eng.Failed(f"The parent proxy {engine.parent} closed the connection "
                                      f"before the tunnel opened."))
        return actions

    async def _answer_failure(self, e: Refused) -> None:
        response = http.Response.make(e.status, str(e) + "\n",
                                      {"Content-Type": "text/plain", **e.headers})
        response.http_version = self.request.http_version
        try:
            self.client_writer.write(http1.assemble_response(response))
            await self.client_writer.drain()
        except OSError:
            pass

    # ------------------------------------------------------------------ the open tunnel

    async def copy(self) -> None:
        """Copy both ways until both have ended (a half close is passed on), or one fails."""
        assert self.parent_reader is not None and self.parent_writer is not None
        up = asyncio.ensure_future(self._copy(self.client_reader, self.parent_writer))
        try:
            await self._copy(self.parent_reader, self.client_writer)
            await up
        finally:
            up.cancel()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        activity = self.handler.timeout_watchdog.register_activity
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                activity()
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()
            other = self.client_writer if writer is self.parent_writer else self.parent_writer
            if other is not None:
                other.close()

    def _close_parent(self) -> None:
        if self.parent_writer is not None:
            self.parent_writer.close()


class DirectTunnelSwitch:
    """Owns `ntlm_direct_tunnels`: sets the runtime's `direct` when the options allow it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def load(self, loader: Any) -> None:
        options.declare(loader, options.TUNNELS)

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if not updated & options.READ_BY_TUNNELS:
            return
        tunnels = direct_tunnels(ctx.options, ctx.master.addons.get("view") is not None)
        if tunnels != self.runtime.direct:
            self.runtime.direct = tunnels
            mitmproxy_internals.sync(self.runtime)


def direct_tunnels(opts: Any, lists_flows: bool) -> DirectTunnels | None:
    """What the options let the addon relay itself: nothing where anyone would miss mitmproxy's
    handling (a flow list, client or parent Basic auth, per-client identities, roaming)."""
    if (not opts.ntlm_direct_tunnels or lists_flows or not opts.ignore_hosts
            or opts.allow_hosts or opts.proxyauth or opts.upstream_auth
            or opts.ntlm_multiuser or opts.ntlm_roaming):
        return None
    if not any(mode_specs.ProxyMode.parse(m).type_name == "upstream" for m in opts.mode):
        return None
    return DirectTunnels(
        ignore=tuple(re.compile(x, re.IGNORECASE) for x in opts.ignore_hosts),
        send_host_header=bool(opts.http_connect_send_host_header),
    )
