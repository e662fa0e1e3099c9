"""The hidden handshake legs as flows of their own, the way Fiddler lists every 407.

Built from the exchanges the engine recorded (a Type 3's or Kerberos token's value already
redacted there): real heads with their base64 tokens, the start of the parent's 407 page, the
real times. Listed just before the flow they belong to, so the list reads 407 -> 200 -> the
request, and each leg's comment names that flow (whose comment names its legs).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1

from . import messages
from .trace import HandshakeTrace
from .untrusted import PAGE_LIMIT, shown


def _lines(head: bytes) -> list[bytes]:
    return head.rstrip(b"\r\n").split(b"\r\n")


def _token(header_value: str) -> dict[str, Any] | None:
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() not in ("ntlm", "negotiate") or not token:
        return None
    if token.startswith("[Type 3 redacted"):
        return {"type": 3, "responses": "redacted"}
    if token.startswith("[Kerberos token redacted"):
        return {"type": "Kerberos AP-REQ", "token": "redacted"}
    return messages.describe_b64(token)


def _response(head: bytes, body: bytes, started: float | None,
              ended: float | None) -> http.Response:
    response = http1.read_response_head(_lines(head))
    response.raw_content = _dechunked(body) if "chunked" in \
        response.headers.get("transfer-encoding", "").lower() else body
    response.timestamp_start = started
    response.timestamp_end = ended
    return response


def _dechunked(data: bytes) -> bytes:
    """The data of a (possibly cut short) chunked body, for display: as many whole chunks
    as were kept."""
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        try:
            size = int(data[pos:line_end].split(b";")[0], 16) if line_end >= 0 else -1
        except ValueError:
            break
        if size <= 0:
            break
        out += data[line_end + 2:line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return bytes(out)


def _type3_summary(trace: HandshakeTrace) -> dict[str, Any]:
    """The Type 3's names, flags, dialect and response sizes, from the trace's stage."""
    stage = next((s for s in trace.stages if s.get("stage") == "Type 3 sent"), {})
    return {k: v for k, v in stage.items() if k not in ("stage", "ms")}


def parent_answer(trace: HandshakeTrace) -> http.Response | None:
    """The parent's last answer during the handshake (head and the start of its body)."""
    answered = [e for e in trace.exchanges if e.response is not None]
    if not answered:
        return None
    last = answered[-1]
    assert last.response is not None
    return _response(last.response, bytes(last.body), last.answered_at, last.ended_at)


def _what(leg: dict[str, Any], status: str, parent: str) -> str:
    """`Type 1 -> 407 Type 2 challenge from PARENT (DOMAIN)` and the like."""
    sent, received = leg.get("sent"), leg.get("received")
    said = f"Type {sent['type']}" if sent and sent.get("type") != "Kerberos AP-REQ" else \
        "Kerberos token" if sent else "no token"
    if sent and sent.get("type") == 3:
        who = "\\".join(str(x) for x in (sent.get("domain"), sent.get("user")) if x)
        said += f" as {who}" if who else ""
        said += f" ({sent['dialect']}, responses not shown)" if sent.get("dialect") else \
            " (responses not shown)"
    if received and received.get("type") == 2:
        domain = received.get("netbios_domain") or received.get("target") or ""
        heard = f"Type 2 challenge from {parent}" + (f" ({domain})" if domain else "")
    elif received:
        heard = f"Type {received.get('type', '?')}"
    else:
        heard = ""
    return f"{said} -> {status} {heard}".rstrip()


def leg_flows(trace: HandshakeTrace, client: Any, server: Any,
              belongs_to: http.HTTPFlow | None = None) -> list[http.HTTPFlow]:
    """One HTTPFlow per hidden exchange (`client`/`server` are mitmproxy connections), with
    their real times; with `belongs_to`, linked to and ordered just before that flow."""
    mechanism = "Kerberos" if trace.dialect == "Kerberos" else "NTLM"
    if belongs_to is not None:
        target = f"{belongs_to.request.method} {belongs_to.request.pretty_url} " \
                 f"(flow {belongs_to.id[:8]})"
    else:
        target = trace.kind
    flows = []
    total = len(trace.exchanges)
    for number, exchange in enumerate(trace.exchanges, start=1):
        flow = http.HTTPFlow(client, server)
        request = http1.read_request_head(_lines(exchange.request))
        request.timestamp_start = request.timestamp_end = exchange.sent_at
        request.raw_content = b""  # no body (None reads "content missing", with no view run)
        flow.request = request
        leg: dict[str, Any] = {"leg": number, "of": total, "for": trace.kind,
                               "parent": trace.parent}
        sent = _token(request.headers.get("Proxy-Authorization", "")
                      or request.headers.get("Authorization", ""))
        if sent and sent.get("type") == 3:  # what the engine saw of it, without the responses
            sent = {**_type3_summary(trace), **sent}
        if sent:
            leg["sent"] = sent
        status = "no answer"
        if exchange.response is not None:
            flow.response = _response(exchange.response, bytes(exchange.body),
                                      exchange.answered_at, exchange.ended_at)
            status = str(flow.response.status_code)
            for value in [*flow.response.headers.get_all("Proxy-Authenticate"),
                          *flow.response.headers.get_all("WWW-Authenticate")]:
                received = _token(value)
                if received:
                    leg["received"] = received
        if belongs_to is not None:
            leg["flow"] = belongs_to.id
            # The view lists flows by creation time: just before the flow they belong to.
            flow.timestamp_created = belongs_to.timestamp_created - (total - number + 1) * 1e-6
        flow.metadata["ntlm_leg"] = leg
        flow.comment = shown(f"{mechanism} leg {number} of {total} for {target}: "
                             f"{_what(leg, status, trace.parent)}", PAGE_LIMIT)
        flow.live = False
        flows.append(flow)
    return flows
