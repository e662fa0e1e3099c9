"""The NTLM, SPNEGO and Kerberos tokens in a message's auth headers, as lines of text.

What the content view (contentview.py) shows, Fiddler's Auth inspector style: per header, the
decoded message with its flags in words, names, target info and timestamps as dates. Decoding is
`messages.describe`, so the same rule holds: no response, session key, MIC, ticket or
authenticator bytes, only their sizes or presence. Basic and other credentials are never shown.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import Any

from mitmproxy import http

from . import messages
from .untrusted import LOG_LIMIT, shown

AUTH_HEADERS = ("Proxy-Authorization", "Authorization", "Proxy-Authenticate", "WWW-Authenticate")
TOKEN_SCHEMES = ("ntlm", "negotiate", "kerberos")
CHALLENGE_STATUS = (401, 407)

_NTLM_TYPES = {1: "NTLM Type 1 (Negotiate)", 2: "NTLM Type 2 (Challenge)",
               3: "NTLM Type 3 (Authenticate)"}
_LABELS = {
    "target": "target name", "netbios_domain": "NetBIOS domain",
    "netbios_computer": "NetBIOS computer", "dns_domain": "DNS domain",
    "dns_computer": "DNS computer", "dns_tree": "DNS tree", "spn": "target SPN",
    "av_flags": "target info flags", "target_info": "target info", "version": "OS version",
    "nt_response_bytes": "NT response", "lm_response_bytes": "LM response",
    "session_key": "session key", "mic": "MIC", "ticket_enctype": "ticket enctype",
    "ticket_kvno": "ticket key version", "authenticator_enctype": "authenticator enctype",
    "client_realm": "client realm", "server_time": "server time",
}
_NOT_SHOWN = ("nt_response_bytes", "lm_response_bytes")
_PRESENCE = ("session_key", "mic")
_TARGET_INFO = ("netbios_domain", "netbios_computer", "dns_domain", "dns_computer", "dns_tree",
                "spn", "timestamp", "av_flags")
_COMMA_OUTSIDE_QUOTES = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')


def _items(value: str) -> list[tuple[str, str]]:
    """(scheme, rest) per challenge or credential in one header value; auth-params after a
    comma (`realm="a", charset=...`) stay with their scheme."""
    items: list[tuple[str, str]] = []
    for part in _COMMA_OUTSIDE_QUOTES.split(value):
        part = part.strip()
        if not part:
            continue
        first, _, rest = part.partition(" ")
        if "=" in first.rstrip("=") and items:  # an auth-param, not a scheme
            items[-1] = (items[-1][0], f"{items[-1][1]}, {part}")
        else:
            items.append((first, rest.strip()))
    return items


def token_headers(message: http.Message | None) -> list[tuple[str, str, str]]:
    """(header, scheme, token or "") for every NTLM/Negotiate/Kerberos item of the message."""
    if message is None:
        return []
    found = []
    for header in AUTH_HEADERS:
        for value in message.headers.get_all(header):
            found += [(header, scheme, rest) for scheme, rest in _items(value)
                      if scheme.lower() in TOKEN_SCHEMES]
    return found


def priority(message: http.Message | None, data: bytes) -> float:
    """Chosen automatically for a message whose auth headers carry a token and whose body is
    empty or a 401/407 page; selectable (0) for other token-carrying messages."""
    if not any(token for _, _, token in token_headers(message)):
        return -1
    if not data or getattr(message, "status_code", None) in CHALLENGE_STATUS:
        return 2
    return 0


def render(message: http.Message | None, flow: Any = None, data: bytes = b"") -> list[str]:
    """The view's text, one string per line."""
    if message is None:
        return ["No HTTP message."]
    lines: list[str] = []
    for header in AUTH_HEADERS:
        for value in message.headers.get_all(header):
            for scheme, rest in _items(value):
                lines += _item(header, scheme, rest, message, flow)
    if not lines:
        lines.append("No authentication headers.")
    if data:
        lines += ["", f"Body: {len(data)} bytes (choose another view to see it)."]
    return lines


def _item(header: str, scheme: str, rest: str, message: http.Message, flow: Any) -> list[str]:
    scheme_shown = shown(scheme, 40)
    if scheme.lower() not in TOKEN_SCHEMES:
        if header.endswith("Authenticate"):
            return [f"{header}: offers {shown(f'{scheme} {rest}'.strip(), 200)}"]
        return [f"{header}: {scheme_shown} credentials (not shown)"]
    if not rest:
        return [f"{header}: offers {scheme_shown} (no token yet)"]
    if rest.startswith("["):  # mitmproxy-ntlm's stand-in for a token it did not keep
        return _stand_in(header, scheme_shown, rest, flow)
    return _token_lines(f"{header}: {scheme_shown}", rest, _received_at(message))


def decode_lines(value: str) -> list[str]:
    """One token as a person pastes it (`ntlm.decode`): base64, after its scheme word or not."""
    scheme, _, token = value.strip().partition(" ")
    if not token:
        scheme, token = "token", scheme
    return _token_lines(shown(scheme, 40), token.strip(), None)


def _token_lines(title: str, text: str, received: float | None) -> list[str]:
    try:
        token = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return [f"{title}, not valid base64 ({len(text)} characters)"]
    summary = messages.describe(token)
    return [f"{title}, {len(token)} bytes", *_summary_lines(summary, 1, received)]


def _stand_in(header: str, scheme: str, rest: str, flow: Any) -> list[str]:
    lines = [f"{header}: {scheme} {shown(rest, 200)}",
             "    the token was not kept (it proves the user's identity)"]
    leg = getattr(flow, "metadata", {}).get("ntlm_leg") if flow is not None else None
    sent = leg.get("sent") if isinstance(leg, dict) else None
    if isinstance(sent, dict) and len(sent) > 2:  # a summary made before it was dropped
        lines += _summary_lines(sent, 1, None)
    return lines


def _received_at(message: http.Message) -> float | None:
    return getattr(message, "timestamp_start", None)


def _summary_lines(summary: dict[str, Any], depth: int, received: float | None) -> list[str]:
    pad = "    " * depth
    kind = summary.get("type")
    lines = [f"{pad}{_NTLM_TYPES.get(kind, shown(kind)) if kind is not None else 'token'}"]
    info = [k for k in _TARGET_INFO if k in summary]  # a Type 2's target info, as one block
    for key, value in summary.items():
        if key == "type" or key in info[1:]:
            continue
        if key in info:
            lines.append(f"{pad}    target info:")
            lines += [f"{pad}        {_label(k) + ':':<18} {_value(k, summary[k], received)}"
                      for k in info]
        elif isinstance(value, dict):  # the token inside a SPNEGO message
            lines.append(f"{pad}    {_label(key)}:")
            lines += _summary_lines(value, depth + 2, received)
        else:
            lines.append(f"{pad}    {_label(key) + ':':<22} {_value(key, value, received)}")
    return lines


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " "))


def _value(key: str, value: Any, received: float | None = None) -> str:
    if key in _NOT_SHOWN:
        return f"{value} bytes (not shown)"
    if key in _PRESENCE:
        return f"{value} (not shown)" if value == "present" else str(value)
    if key in ("timestamp", "server_time"):
        return _date(str(value), received)
    if isinstance(value, list):
        return ", ".join(shown(v) for v in value) or "none"
    if value is None:
        return "-"
    return shown(value, LOG_LIMIT)


def parse_time(text: str) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def skew_text(seconds: float) -> str:
    """How the peer's clock relates to ours, for a person (Kerberos allows 5 minutes)."""
    if abs(seconds) < 1:
        return "peer clock within 1 s of this machine's"
    direction = "ahead of" if seconds > 0 else "behind"
    return f"peer clock {abs(seconds):.0f} s {direction} this machine's"


def _date(text: str, received: float | None) -> str:
    when = parse_time(text)
    if when is None:
        return shown(text, 80)
    out = when.strftime("%Y-%m-%d %H:%M:%S UTC")
    if received:
        out += f" ({skew_text(when.timestamp() - received)})"
    return out
