"""The story of one authentication exchange: logged stage by stage, summarised for the flow.

Users run this tool because authentication fails and nobody can tell why, so every leg is
logged with the parent, the client and a timing, and the outcome lands on the flows. Tokens are
described with `messages.describe` (names, flags, sizes) and never printed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import messages

log = logging.getLogger("mitmproxy_ntlm")

# How much of a hidden response's body (a parent's 407 page) is kept to show on its leg flow.
BODY_LIMIT = 4096


@dataclass
class Exchange:
    """One hidden request/response of the handshake, as a leg flow shows it: the heads (a
    Type 3 or Kerberos token already replaced by a summary), the start of the response body
    as received (still chunked if it was), and wall-clock times."""

    request: bytes
    sent_at: float = field(default_factory=time.time)
    response: bytes | None = None
    answered_at: float | None = None  # the response head arrived
    body: bytearray = field(default_factory=bytearray)
    ended_at: float | None = None  # the response body was read to its end

    def __len__(self) -> int:
        return len(self.request) + len(self.response or b"") + len(self.body)


@dataclass
class HandshakeTrace:
    """Stages of one NTLM exchange on one parent connection."""

    parent: str
    client: str
    kind: str  # "CONNECT host:port" or "GET http://..."
    principal: str = ""
    dialect: str = ""  # NTLMv2 etc., or Kerberos
    scheme: str = ""  # header scheme used: NTLM or Negotiate
    why: str = ""  # why that scheme and mechanism were chosen
    legs: int = 0  # messages exchanged: Type 1, 2, 3 (NTLM) or 1 (Kerberos)
    result: str = "pending"  # authenticated | reused | rejected | no auth needed | failed: ...
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)
    stages: list[dict[str, Any]] = field(default_factory=list)
    # The hidden exchanges, for showing them as flows (Type 3 values are replaced by a summary
    # before they get here).
    exchanges: list[Exchange] = field(default_factory=list)
    emitted: bool = False
    key: str = ""  # id of the mitmproxy connection the flows use (flow.server_conn.id)
    authenticated_at: float | None = None  # wall clock; set for a reused pooled connection
    total_ms: float | None = None  # the exchange's duration, fixed when it ends
    error_status: int = 0  # a failure's status for the client (502, 504), set when it fails
    shown_on: str = ""  # id of the first listed flow that shows this handshake (its mark)
    # comment and metadata for the flows, made once per result (every request shows them)
    _summary: tuple[str, str, dict[str, Any]] | None = field(default=None, repr=False,
                                                              compare=False)

    def _stage(self, name: str, details: dict[str, Any], level: int = logging.INFO) -> None:
        now = time.monotonic()
        entry = {"stage": name, "ms": round((now - self._last) * 1000, 1), **details}
        self._last = now
        self.stages.append(entry)
        if not log.isEnabledFor(level):
            return  # formatting is the costly part; the stage is kept for the flow anyway
        text = messages.one_line(details) if details else ""
        log.log(
            level,
            "[ntlm] %s -> %s %s: %s %s (+%.1f ms)",
            self.client,
            self.parent,
            self.kind,
            name,
            text,
            entry["ms"],
        )

    def sent(self, request_head: bytes) -> None:
        self.exchanges.append(Exchange(request_head))

    def received(self, response_head: bytes) -> None:
        if self.exchanges and self.exchanges[-1].response is None:
            exchange = self.exchanges[-1]
            exchange.response = response_head
            exchange.answered_at = exchange.ended_at = time.time()

    def received_body(self, data: bytes | bytearray, done: bool = True) -> None:
        """Body bytes of the last hidden response (kept up to BODY_LIMIT); `done`: its end."""
        if not self.exchanges or self.exchanges[-1].response is None:
            return
        exchange = self.exchanges[-1]
        room = BODY_LIMIT - len(exchange.body)
        if room > 0:
            exchange.body += data[:room]
        if done:
            exchange.ended_at = time.time()

    def chose(self, mechanism: str, scheme: str, why: str) -> None:
        self.scheme = scheme
        self.why = why
        self._stage("scheme chosen", {"mechanism": mechanism, "scheme": scheme, "why": why},
                    logging.DEBUG)

    def note(self, stage: str, text: str) -> None:
        self._stage(stage, {"detail": text}, logging.INFO)

    def sent_kerberos(self, token: bytes, principal: str) -> None:
        """The one Kerberos leg; the ticket's principal is the identity the parent sees."""
        self.legs += 1
        self.dialect = "Kerberos"
        self.principal = principal
        self._stage("Kerberos token sent", messages.describe(token), logging.DEBUG)

    def sent_without_logon(self) -> None:
        """The request went without credentials: the parent let a new connection through
        without a logon and has not asked one for this host (a 407 now starts the legs)."""
        self._stage("sent without credentials",
                    {"why": "the parent let a new connection through without a logon and has "
                            "not asked one for this host"}, logging.DEBUG)

    def sent_type1(self, token: bytes) -> None:
        self.legs += 1
        self._stage("Type 1 sent", messages.describe(token), logging.DEBUG)

    def got_challenge(self, status_line: str, schemes: list[str]) -> None:
        """A 407 (parent) or 401 (server) with the schemes it offers."""
        self._stage(f"{status_line[:3]} received",
                    {"status": status_line, "offers": ", ".join(schemes)}, logging.DEBUG)

    def got_type2(self, token: bytes) -> None:
        self.legs += 1
        self._stage("Type 2 received", messages.describe(token), logging.DEBUG)

    def sent_type3(self, token: bytes) -> None:
        self.legs += 1
        summary = messages.describe(token)
        self.dialect = str(summary.get("dialect", ""))
        self._stage("Type 3 sent", summary, logging.DEBUG)

    def reused_pooled(self, authenticated_at: float, uses: int) -> None:
        """No handshake: the connection came from the pool, authenticated earlier and lent
        `uses` times so far (to requests of any client connection of the same user)."""
        self.authenticated_at = authenticated_at
        self.result = "reused"
        self.total_ms = round(self.elapsed_ms, 1)
        self._stage("reused pooled connection",
                    {"user": self.principal or "-", "authenticated_at": self._when(),
                     "times_lent": uses}, logging.DEBUG)

    def _when(self) -> str:
        if self.authenticated_at is None:
            return ""
        return time.strftime("%H:%M:%S", time.localtime(self.authenticated_at))

    def finish(self, result: str, level: int = logging.INFO) -> None:
        self.result = result
        self.total_ms = round(self.elapsed_ms, 1)
        self._stage("result", {"result": result, "user": self.principal or "-",
                               "total_ms": self.total_ms}, level)

    @property
    def elapsed_ms(self) -> float:
        """How long the exchange took (so far, while it runs)."""
        if self.total_ms is not None:
            return self.total_ms
        return (time.monotonic() - self.started) * 1000

    @property
    def ok(self) -> bool:
        return self.result in ("authenticated", "reused", "no auth needed")

    def annotation(self) -> tuple[dict[str, Any], str, bool]:
        """What a flow shows, once per flow: `flow.metadata["ntlm"]` (a dict of its own; the
        stages list is shared), one line for mitmweb's comment field, and `ok`."""
        _, comment, metadata = self._summarized()
        return dict(metadata), comment, self.ok

    def _summarized(self) -> tuple[str, str, dict[str, Any]]:
        summary = self._summary
        if summary is None or summary[0] != self.result or self.result == "pending":
            summary = (self.result, self._comment(), self._metadata())
            self._summary = summary
        return summary

    def _comment(self) -> str:
        if self.result == "authenticated":
            legs = "1 leg" if self.legs == 1 else f"{self.legs} legs"
            return (f"{self.dialect or 'NTLM'} as {self.principal} via {self.parent}, "
                    f"{legs}, {self.elapsed_ms:.0f} ms")
        if self.result == "reused":
            return (f"reused pooled connection to {self.parent}, authenticated as "
                    f"{self.principal} at {self._when()} (no new handshake)")
        if self.result == "no auth needed":
            return f"parent {self.parent} needed no authentication"
        if self.result == "rejected":
            return f"parent {self.parent} rejected credentials for {self.principal}"
        return f"NTLM to {self.parent} {self.result}"

    def _metadata(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "principal": self.principal,
            "dialect": self.dialect,
            "scheme": self.scheme,
            "why": self.why,
            "result": self.result,
            "legs": self.legs,
            "ms": round(self.elapsed_ms, 1),
            "stages": self.stages,
            **({"pooled": True, "authenticated_at": self.authenticated_at}
               if self.result == "reused" else {}),
        }
