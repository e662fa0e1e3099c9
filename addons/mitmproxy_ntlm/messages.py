"""Human-readable summaries of NTLM, SPNEGO and Kerberos tokens for logs, flows and views.

Decoding uses pyspnego's message structures. A summary never carries a response, a session key,
a MIC, a ticket or an authenticator: only names, flags, times and sizes, so it is safe to log at
any level and to show in mitmweb.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .spnego_internals import (
    Authenticate,
    AvFlags,
    AvId,
    Challenge,
    GSSMech,
    InitialContextToken,
    KerberosV5Msg,
    KrbApRep,
    KrbApReq,
    KrbError,
    Negotiate,
    NegotiateFlags,
    NegTokenInit,
    NegTokenResp,
    PrincipalName,
    Version,
    parse_enum,
    parse_flags,
    unpack_token,
)

_SIGNATURE = b"NTLMSSP\x00"


# (value, name) of each flag, read once: iterating an enum.Flag and reading its members'
# values costs 20 us per message on Python 3.11, a tenth of a logon's own CPU.
_NEGOTIATE_FLAGS = tuple((int(f.value), f.name) for f in NegotiateFlags if f.value and f.name)
_AV_FLAGS = tuple((int(f.value), f.name) for f in AvFlags if f.value and f.name)
_EXTENDED_SESSION_SECURITY = int(NegotiateFlags.extended_session_security)


def flag_names(flags: int) -> list[str]:
    """Names of the negotiate flags that are set, e.g. ['unicode', 'ntlm', ...]."""
    flags = int(flags)
    return [name for value, name in _NEGOTIATE_FLAGS if flags & value == value]


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


def _version(version: Version | None) -> dict[str, str]:
    """The sender's OS version (e.g. 10.0.19041), when the message carries one."""
    if not version:
        return {}
    return {"version": f"{version.major}.{version.minor}.{version.build} "
                       f"(NTLM revision {version.revision})"}


def describe_negotiate(token: bytes) -> dict[str, Any]:
    msg = Negotiate.unpack(token)
    return {
        "type": 1,
        "flags": flag_names(msg.flags),
        "domain": _safe(lambda: msg.domain_name),
        "workstation": _safe(lambda: msg.workstation),
        **_version(_safe(lambda: msg.version)),
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
            AvId.dns_tree_name: "dns_tree",
            AvId.target_name: "spn",
        }
        for av_id, key in names.items():
            if av_id in info:
                summary[key] = str(info[av_id])
        if AvId.timestamp in info:
            summary["timestamp"] = str(info[AvId.timestamp])  # ISO 8601, UTC (MsvAvTimestamp)
        if AvId.flags in info:
            av_flags = int(info[AvId.flags])
            summary["av_flags"] = [name for value, name in _AV_FLAGS if av_flags & value]
    else:
        summary["target_info"] = "none"
    summary.update(_version(_safe(lambda: msg.version)))
    return summary


def dialect_of(msg: Authenticate) -> str:
    """NTLMv2 responses are longer than 24 bytes; 24-byte ones are NTLMv1 or NTLM2 session."""
    nt = _safe(lambda: msg.nt_challenge_response) or b""
    if len(nt) > 24:
        return "NTLMv2"
    if int(msg.flags) & _EXTENDED_SESSION_SECURITY:
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
        # Whether they are there, never their bytes.
        "session_key": "present" if _safe(lambda: msg.encrypted_random_session_key) else "none",
        "mic": "present" if (_safe(lambda: msg.mic) or b"\0").strip(b"\0") else "none",
        "flags": flag_names(msg.flags),
        **_version(_safe(lambda: msg.version)),
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


def describe_gss(token: bytes) -> dict[str, Any]:
    """A SPNEGO or Kerberos token, decoded by pyspnego; {} when it is neither. Kerberos shows
    names, realms, encryption types and times; never a ticket's or authenticator's bytes."""
    try:
        parsed = unpack_token(token, unwrap=True)
    except Exception:
        return {}
    try:
        return _describe_gss(parsed, token)
    except Exception as e:
        return {"type": "GSS token", "error": f"undecodable ({type(e).__name__})",
                "bytes": len(token)}


def _describe_gss(parsed: Any, token: bytes) -> dict[str, Any]:
    if isinstance(parsed, InitialContextToken):  # GSS framing: SPNEGO, or raw Kerberos
        inner = parsed.token
        if isinstance(inner, NegTokenInit | NegTokenResp | KerberosV5Msg):
            return _describe_gss(inner, token)
        return {"type": "GSS token", "mechanism": _mech_name(parsed.this_mech),
                "bytes": len(token)}
    if isinstance(parsed, NegTokenInit):
        summary: dict[str, Any] = {
            "type": "SPNEGO NegTokenInit",
            "mechanisms": [_mech_name(m) for m in parsed.mech_types or []],
        }
        if parsed.mech_token:
            summary["token"] = describe(parsed.mech_token)
        if parsed.hint_name:
            summary["hint"] = parsed.hint_name.decode("utf-8", "replace")
        return summary
    if isinstance(parsed, NegTokenResp):
        summary = {"type": "SPNEGO NegTokenResp"}
        if parsed.neg_state is not None:
            summary["state"] = parsed.neg_state.name
        if parsed.supported_mech:
            summary["mechanism"] = _mech_name(parsed.supported_mech)
        if parsed.response_token:
            summary["token"] = describe(parsed.response_token)
        if parsed.mech_list_mic:
            summary["mic"] = "present"
        return summary
    if isinstance(parsed, KerberosV5Msg):
        return describe_kerberos(parsed)
    return {}


def _mech_name(oid: str) -> str:
    try:
        return GSSMech.native_labels()[GSSMech.from_oid(oid)]
    except (KeyError, ValueError):
        return oid


def _principal(name: PrincipalName | None) -> str | None:
    return "/".join(v.decode("utf-8", "replace") for v in name.value) if name else None


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None


def describe_kerberos(msg: KerberosV5Msg) -> dict[str, Any]:
    """The clear-text fields of a Kerberos message. An AP-REQ's client principal is inside its
    encrypted authenticator: only the realm and service of the ticket are in clear."""
    if isinstance(msg, KrbApReq):
        ticket = msg.ticket
        return {
            "type": "Kerberos AP-REQ",
            "realm": _text(ticket.realm),
            "service": _principal(ticket.sname),
            "ticket_enctype": parse_enum(ticket.enc_part.etype),
            "ticket_kvno": ticket.enc_part.kvno,
            "authenticator_enctype": parse_enum(msg.authenticator.etype),
            "options": parse_flags(msg.ap_options)["flags"],
        }
    if isinstance(msg, KrbApRep):
        return {"type": "Kerberos AP-REP", "enctype": parse_enum(msg.enc_part.etype)}
    if isinstance(msg, KrbError):
        summary = {
            "type": "Kerberos KRB-ERROR",
            "error": parse_enum(msg.error_code),
            "realm": _text(msg.realm),
            "service": _principal(msg.sname),
            "client_realm": _text(msg.crealm),
            "client": _principal(msg.cname),
            "server_time": msg.stime.isoformat() if msg.stime else None,
            "text": _text(msg.e_text),
        }
        return {k: v for k, v in summary.items() if v is not None}
    return {"type": f"Kerberos {parse_enum(msg.MESSAGE_TYPE)}"}


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
    """`key=value` text for a log line, lists joined with |, nested tokens in brackets."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, list):
            value = "|".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = f"[{one_line(value)}]"
        parts.append(f"{key}={value}")
    return " ".join(parts)
