"""When one authenticated parent connection may go back to the pool (no I/O, no mitmproxy).

The engine runs the handshake legs on a connection; this object keeps, beside it, what the
pool needs to know about that connection: whether it came from the pool (and since when it
is authenticated, how often used), where the response being passed to the client ends, and
anything seen that rules out lending it to another request (bytes outside a response, a
response that ends with the connection). The engine tells it what passes; the layer asks the
engine (`AuthEngine.reusable`, `unfinished_response`), which adds its own state: no request
half-sent, no handshake running (`reusable` reads `possible`, `reused` and `framer` itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import wire

if TYPE_CHECKING:
    from ..trace import HandshakeTrace


class ConnectionReuse:
    """Pool bookkeeping of one parent connection, owned by its `AuthEngine`."""

    def __init__(self) -> None:
        self.track = False  # frame passed responses: the layer may lend this connection
        self.authenticated_at: float | None = None  # wall clock, of the logon in use
        self.uses = 1  # times the pool lent it
        self.reused = False  # this connection came from the pool
        self.answered = False  # the parent sent something since it was lent
        self.possible = True  # nothing seen that rules out keeping the connection
        self.stray: str | None = None  # bytes outside any response seen: what they were
        self.new_connection = False  # the next request needs a new parent connection
        self.framer: wire.BodyFramer | None = None  # of the response being passed on

    def adopted(self, authenticated_at: float | None, uses: int) -> None:
        """The connection came from the pool, authenticated at `authenticated_at` (None: one
        still to come free) and lent `uses` times."""
        self.reused = True
        self.answered = False
        if authenticated_at is not None:
            self.authenticated_at = authenticated_at
            self.uses = uses

    def mark(self, trace: HandshakeTrace | None) -> bool:
        """Note on a pending `trace` that it runs on a pooled connection; True when noted,
        so the caller records the trace."""
        if trace is None or trace.result != "pending" or self.authenticated_at is None:
            return False
        trace.reused_pooled(self.authenticated_at, self.uses)
        return True

    def track_response(self, head: wire.Head, request: wire.Head | None, rest: bytes) -> int:
        """Frame a passed response from its `head` on, to know when it ends (rule out reuse
        when that cannot be known); `rest` came after the head: how many of its bytes came
        after the end of the response (see `frame`). A malformed framing header raises
        `wire.WireError`."""
        framer = self.framer = wire.keepalive_framer(head, request) if request is not None \
            else None
        if framer is None:
            self.possible = False
        return self.frame(rest)

    def frame(self, data: bytes) -> int:
        """How many bytes at the end of `data` (response bytes for the client) came after
        the end of the response: they belong to no request. Mostly 0."""
        framer = self.framer
        if framer is None or not data:
            return 0
        try:
            return len(data) - framer.feed(data)
        except wire.WireError:  # this client's own malformed body: mitmproxy judges it
            self.possible = False
            self.framer = None
            return 0

    def saw_stray(self, what: str) -> None:
        """Bytes outside any response (`what`): the connection is closed, never lent, and
        the layer tells the pool (`stray`) so it stops sharing this parent's connections."""
        self.stray = what
        self.possible = False
        self.framer = None

    def unfinished(self, request: wire.Head, challenge: int, passing: bool,
                   head_bytes: bytes) -> wire.ResponseRest | None:
        """What is left of a response the client went away from (`passing`: its head was
        passed on; else `head_bytes` of it came), to read it to the end and pool the
        connection; None when it cannot be (`challenge`: the status that needs a logon)."""
        if not self.track or not self.possible:
            return None
        if passing:
            framer = self.framer
            if framer is None or framer.done:
                return None
            return wire.ResponseRest(request, challenge, framer=framer)
        return wire.ResponseRest(request, challenge, head_bytes=head_bytes)
