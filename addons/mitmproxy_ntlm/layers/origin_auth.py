"""Automatic logon to allow-listed intranet servers (Fiddler's "Automatically Authenticate").

mitmproxy's HTTP layer creates an `HttpClient` per server connection; `mitmproxy_internals`
swaps in `http_client_with_origin_auth`, which puts `OriginAuthLayer` between TLS and that
client when the runtime's factory gives an engine for the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from mitmproxy.proxy import commands, events, layer, tunnel

from .. import engine as eng
from .. import mitmproxy_internals as internals
from ..runtime import Runtime

log = logging.getLogger("mitmproxy_ntlm")


def run_step(engine: eng.AuthEngine, step: Callable[..., list[eng.Action]],
             *args: Any) -> list[eng.Action]:
    """Run an engine step; an unexpected exception fails this connection cleanly."""
    try:
        return step(*args)
    except Exception:
        log.exception("[ntlm] internal error on the connection to %s", engine.parent)
        return engine.internal_error()


class OriginAuthLayer(tunnel.TunnelLayer):
    """Answers an allow-listed server's `401 WWW-Authenticate: NTLM/Negotiate` on its own
    connection, between TLS and the HTTP client."""

    runtime: ClassVar[Runtime | None] = None  # set by mitmproxy_internals.sync

    def __init__(self, context: Any, engine: eng.AuthEngine) -> None:
        super().__init__(context, tunnel_connection=context.server, conn=context.server)
        self.engine = engine
        self._waits: dict[commands.RequestWakeup, int] = {}  # generation of each wait

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._waits and isinstance(event, events.Wakeup) and event.command in self._waits:
            generation = self._waits.pop(event.command)
            yield from self._run(self._step(self.engine.timed_out, generation))
        else:
            yield from super()._handle_event(event)

    def send_data(self, data: bytes) -> layer.CommandGenerator[None]:
        yield from self._run(self._step(self.engine.from_child, data))

    def receive_data(self, data: bytes) -> layer.CommandGenerator[None]:
        yield from self._run(self._step(self.engine.from_parent, data))

    def receive_close(self) -> layer.CommandGenerator[None]:
        yield from self._run(self._step(self.engine.parent_closed))
        yield from super().receive_close()

    def _step(self, step: Callable[..., list[eng.Action]], *args: Any) -> list[eng.Action]:
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


def http_client_with_origin_auth(context: Any) -> layer.Layer:
    """Stands in for `HttpClient(context)` in mitmproxy's HTTP layer."""
    runtime = OriginAuthLayer.runtime
    factory = runtime.origin_engines if runtime is not None else None
    engine = factory(context) if factory is not None else None
    if engine is None:
        return internals.ORIGINAL_HTTP_CLIENT(context)
    auth = OriginAuthLayer(context, engine)  # created first: the HTTP client stays layers[-1]
    auth.child_layer = internals.ORIGINAL_HTTP_CLIENT(context)
    return auth
