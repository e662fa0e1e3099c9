"""A multi-user CONNECT through an http parent, answered with the parent's verdict.

mitmproxy answers a CONNECT `200` before the tunnel to the parent exists. Browsers ask for
proxy credentials only on the CONNECT's own answer; inside the tunnel a 407 is never shown,
and a passthrough client would only see its TLS handshake fail. So `mitmproxy_internals` wraps
`HttpStream.handle_connect_regular` and `handle_connect_finish` with the functions here: the
tunnel opens and authenticates first, and the client gets `200`, or the `407` Basic challenge
for credentials the parent rejected (`AnswerAfterParent`).
"""

from __future__ import annotations

import logging
from typing import Any

import mitmproxy
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.utils import human

from .. import mitmproxy_internals as internals
from .upstream import NtlmUpstreamProxy, OpenBeforeAnswer, TunnelVerdict, parent_tunnel

log = logging.getLogger("mitmproxy_ntlm")

HELD_BEFORE_ANSWER = 64 * 1024
"""Bytes a client may send after its CONNECT before the answer (a TLS ClientHello fits many
times over); more closes its connection, so a client cannot stream into memory meanwhile."""


def _answers_after_parent(stream: http_layers.HttpStream) -> bool:
    """Multi-user CONNECTs not answered yet wait for the parent: the parent's verdict on the
    client's own credentials must be the answer (a 407 there is where browsers prompt)."""
    runtime = NtlmUpstreamProxy.runtime
    policy = runtime.policy if runtime is not None else None
    return policy is not None and policy.multiuser and not stream.flow.response


def handle_connect_regular(stream: http_layers.HttpStream) -> layer.CommandGenerator[None]:
    """Stands in for `HttpStream.handle_connect_regular`: a CONNECT routed to an http parent
    (`via`, set by routing.py) gets the parent tunnel now instead of after the answer."""
    via = stream.context.server.via
    if via is None or via[0] != "http" or not _answers_after_parent(stream):
        return (yield from internals.ORIGINAL_CONNECT_REGULAR(stream))
    stream.child_layer = parent_tunnel(stream.context)
    yield from stream.handle_connect_finish()


def handle_connect_finish(stream: http_layers.HttpStream) -> layer.CommandGenerator[None]:
    """Stands in for `HttpStream.handle_connect_finish`, which answers the CONNECT: with an
    http parent tunnel under it, the answer waits for the tunnel (`AnswerAfterParent`)."""
    child = stream.child_layer
    if not isinstance(child, NtlmUpstreamProxy) or not _answers_after_parent(stream):
        return (yield from internals.ORIGINAL_CONNECT_FINISH(stream))
    waiting = AnswerAfterParent(stream, child)
    yield from waiting.forward(OpenBeforeAnswer())


def _http1_server(stream: http_layers.HttpStream) -> http_layers.Http1Server | None:
    """The HTTP/1 layer reading the client of `stream` (None for HTTP/2 clients)."""
    for owner in reversed(stream.context.layers):
        if isinstance(owner, http_layers.HttpLayer):
            conn = owner.connections.get(stream.context.client)
            return conn if isinstance(conn, http_layers.Http1Server) else None
    return None


class AnswerAfterParent:
    """Stands in for a CONNECT stream's event handler while its parent tunnel opens, then
    answers: 200 and the tunnel, or the verdict (407 with the Basic challenge for credentials
    the parent rejected) before any tunnel. What the client sends meanwhile is bounded by
    `HELD_BEFORE_ANSWER`: mitmproxy's HTTP/1 layer buffers it, HTTP/2 data is held here."""

    def __init__(self, stream: http_layers.HttpStream, tunnel_: NtlmUpstreamProxy) -> None:
        self.stream = stream
        self.tunnel = tunnel_
        self.held: list[events.Event] = []  # the client's HTTP events, for after the answer
        self.held_bytes = 0
        internals.redirect_events(stream, self.handle_event)
        self.http1 = _http1_server(stream)
        if self.http1 is not None:  # its wait state buffers the client's bytes unbounded
            internals.redirect_events(self.http1, self._http1_event)

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.RequestProtocolError):
            yield from self._client_gone(event)
        elif isinstance(event, http_layers.HttpEvent):
            self.held.append(event)
            if isinstance(event, http_layers.RequestData):
                self.held_bytes += len(event.data)
                if self.held_bytes > HELD_BEFORE_ANSWER:
                    yield from self._too_much()
        else:
            yield from self.forward(event)  # the tunnel's connection, hooks and timers

    def _http1_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        http1 = self.http1
        assert http1 is not None
        if isinstance(event, events.DataReceived) and http1.state != http1.passthrough \
                and len(http1.buf) + len(event.data) > HELD_BEFORE_ANSWER:
            yield from self._too_much()
        else:
            yield from type(http1)._handle_event(http1, event)

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
        if self.http1 is not None:
            internals.restore_events(self.http1)

    def forward(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.tunnel.handle_event(event)
        verdict = self.tunnel.verdict
        if verdict is not None:
            yield from self._answer(verdict)

    def _answer(self, verdict: TunnelVerdict) -> layer.CommandGenerator[None]:
        stream = self.stream
        self._stop_bounding()
        if verdict.error is None:
            internals.restore_events(stream)  # the 200 switches it to passthrough
        else:
            stream.flow.response = http.Response.make(
                verdict.status, verdict.error + "\n",
                {"Content-Type": "text/plain", **verdict.headers})
            internals.redirect_events(stream, self._after_failure)
        yield from internals.ORIGINAL_CONNECT_FINISH(stream)
        for event in self.held:
            yield from stream._handle_event(event)

    def _after_failure(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Late events of the failed tunnel (its close, its timers) end here."""
        if isinstance(event, http_layers.HttpEvent):
            yield from http_layers.HttpStream._handle_event(self.stream, event)

    def _client_gone(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The client left before the answer: close the parent connection, end the flow."""
        stream = self.stream
        self._stop_bounding()
        internals.redirect_events(stream, self._after_failure)
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


class ServerTlsFirst:
    """Under a tunnel opened before its CONNECT was answered, the server connection is open
    when the layers under it start, as with connection_strategy=eager; so TLS to the server
    is set up first too, as eager does. (With lazy, mitmproxy's HTTP layer would send into a
    server TLS layer that never started.) mitmproxy's TlsConfig decides this from
    connection_strategy after all scripts: this addon is added after it, by
    `mitmproxy_internals.sync`, when connection_strategy is lazy."""

    name = "ntlm_server_tls_first"

    def tls_clienthello(self, data: Any) -> None:
        if data.context.server.tls and _opened_before_answer(data.context):
            data.establish_server_tls_first = True
