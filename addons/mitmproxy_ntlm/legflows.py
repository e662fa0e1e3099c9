"""The hidden handshake legs as flows of their own, the way Fiddler lists every 407.

Built from the heads the engine recorded (Type 3 values already redacted there). Each flow's
metadata carries the decoded NTLM tokens, so a user reads flags and target info in mitmweb.
"""

from __future__ import annotations

import time
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1

from . import messages
from .trace import HandshakeTrace


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


def leg_flows(trace: HandshakeTrace, client: Any, server: Any) -> list[http.HTTPFlow]:
    """One HTTPFlow per hidden exchange (`client`/`server` are mitmproxy connections)."""
    flows = []
    for number, (request_head, response_head) in enumerate(trace.exchanges, start=1):
        assert request_head is not None
        flow = http.HTTPFlow(client, server)
        request = http1.read_request_head(_lines(request_head))
        request.timestamp_start = request.timestamp_end = time.time()
        flow.request = request
        leg: dict[str, Any] = {"leg": number, "of": trace.kind, "parent": trace.parent}
        sent = _token(request.headers.get("Proxy-Authorization", ""))
        if sent:
            leg["sent"] = sent
        if response_head is not None:
            response = http1.read_response_head(_lines(response_head))
            response.timestamp_start = response.timestamp_end = time.time()
            flow.response = response
            for value in response.headers.get_all("Proxy-Authenticate"):
                received = _token(value)
                if received:
                    leg["received"] = received
        flow.metadata["ntlm_leg"] = leg
        kinds = [f"Type {d['type']}" for d in (leg.get("sent"), leg.get("received")) if d]
        mechanism = "Kerberos" if trace.dialect == "Kerberos" else "NTLM"
        flow.comment = (f"{mechanism} leg {number} to {trace.parent}: "
                        f"{' / '.join(kinds) or 'no token'}")
        flow.live = False
        flows.append(flow)
    return flows
