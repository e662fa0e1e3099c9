"""Human-readable summaries of NTLM messages for logs and flow annotations.

Decoding uses pyspnego's message structures. A summary never carries a response, a session key
or a MIC: only names, flags and sizes, so it is safe to log at any level.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from spnego._ntlm_raw.messages import (
    Authenticate,
    AvId,
    Challenge,
    Negotiate,
    NegotiateFlags,
)

_SIGNATURE = b"NTLMSSP\x00"


def flag_names(flags: int) -> list[str]:
    """Names of the negotiate flags that are set, e.g. ['unicode', 'ntlm', ...]."""
    names = []
    for flag in NegotiateFlags:
        if flag.value and flags & flag.value == flag.value and flag.name:
            names.append(flag.name)
    return names


def message_type(token: bytes) -> int | None:
    if len(token) < 12 or not token.startswith(_SIGNATURE):
        return None
    return int.from_bytes(token[8:12], "little")


def _safe(getter: Any) -> Any:
    """pyspnego raises on fields that point outside the message; show those as None."""
    try:
        return getter()
    except Exception:
        return None


def describe_negotiate(token: bytes) -> dict[str, Any]:
    msg = Negotiate.unpack(token)
    return {
        "type": 1,
        "flags": flag_names(msg.flags),
        "domain": _safe(lambda: msg.domain_name),
        "workstation": _safe(lambda: msg.workstation),
    }


def describe_challenge(token: bytes) -> dict[str, Any]:
    msg = Challenge.unpack(token)
    summary: dict[str, Any] = {
        "type": 2,
        "flags": flag_names(msg.flags),
        "target": _safe(lambda: msg.target_name),
    }
    info = _safe(lambda: msg.target_info)
    if info:
        names = {
            AvId.nb_domain_name: "netbios_domain",
            AvId.nb_computer_name: "netbios_computer",
            AvId.dns_domain_name: "dns_domain",
            AvId.dns_computer_name: "dns_computer",
        }
        for av_id, key in names.items():
            if av_id in info:
                summary[key] = str(info[av_id])
        if AvId.timestamp in info:
            summary["timestamp"] = str(info[AvId.timestamp])
    else:
        summary["target_info"] = "none"
    return summary


def dialect_of(msg: Authenticate) -> str:
    """NTLMv2 responses are longer than 24 bytes; 24-byte ones are NTLMv1 or NTLM2 session."""
    nt = _safe(lambda: msg.nt_challenge_response) or b""
    if len(nt) > 24:
        return "NTLMv2"
    if msg.flags & NegotiateFlags.extended_session_security:
        return "NTLM2SR"
    return "NTLMv1"


def describe_authenticate(token: bytes) -> dict[str, Any]:
    msg = Authenticate.unpack(token)
    return {
        "type": 3,
        "user": _safe(lambda: msg.user_name),
        "domain": _safe(lambda: msg.domain_name),
        "workstation": _safe(lambda: msg.workstation),
        "dialect": dialect_of(msg),
        "nt_response_bytes": len(_safe(lambda: msg.nt_challenge_response) or b""),
        "lm_response_bytes": len(_safe(lambda: msg.lm_challenge_response) or b""),
        "flags": flag_names(msg.flags),
    }


def describe(token: bytes) -> dict[str, Any]:
    """Summary of any NTLM message; {'error': ...} when it is not one."""
    kind = message_type(token)
    try:
        if kind == 1:
            return describe_negotiate(token)
        if kind == 2:
            return describe_challenge(token)
        if kind == 3:
            return describe_authenticate(token)
    except Exception as e:
        return {"type": kind, "error": f"undecodable ({type(e).__name__})"}
    gss = describe_gss(token)
    if gss:
        return gss
    return {"error": "not an NTLMSSP message"}


_KRB5_OID = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2
_SPNEGO_OID = bytes.fromhex("06062b0601050502")  # 1.3.6.1.5.5.2


def describe_gss(token: bytes) -> dict[str, Any]:
    """Name a Kerberos or SPNEGO token by its framing only (its content is a credential)."""
    if token[:1] == b"\x60" and _SPNEGO_OID in token[:24]:
        inner = "Kerberos AP-REQ" if _KRB5_OID in token[:96] else "other mechanism"
        return {"type": "SPNEGO NegTokenInit", "carries": inner, "bytes": len(token)}
    if token[:1] == b"\x60" and _KRB5_OID in token[:24]:
        return {"type": "Kerberos AP-REQ", "bytes": len(token)}
    if token[:1] == b"\xa1":
        return {"type": "SPNEGO NegTokenResp", "bytes": len(token)}
    return {}


def describe_b64(value: str) -> dict[str, Any]:
    """Summary of a base64 token as found in a header (scheme prefix allowed)."""
    parts = value.strip().split()
    if len(parts) == 2 and parts[0].lower() in ("ntlm", "negotiate"):
        value = parts[1]
    try:
        token = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return {"error": "not valid base64"}
    return describe(token)


def one_line(summary: dict[str, Any]) -> str:
    """`key=value` text for a log line, flags shortened."""
    parts = []
    for key, value in summary.items():
        if key == "flags":
            value = "|".join(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)
