"""A diagnostic report to hand to the IT department when authentication fails (`ntlm.report`).

It says what runs (versions), how it is set up (options), what the parents offered and how the
last handshakes went, stage by stage, with the parent's decoded challenge and its clock skew.
Nothing in it helps anyone log on as the user: a secret option is named, never valued; URLs
lose their user info; handshakes appear as their stage summaries (`messages.describe`: names,
flags, times, sizes), never as tokens.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import authview, messages, options, versions
from .trace import HandshakeTrace
from .untrusted import PAGE_LIMIT, shown

LAST_HANDSHAKES = 10
LAST_FAILURES = 5

MITMPROXY_OPTIONS = ("mode", "listen_host", "listen_port", "connection_strategy", "ssl_insecure",
                     "ssl_verify_upstream_trusted_ca", "ignore_hosts", "allow_hosts")
"""mitmproxy's own options that shape what reaches the parents."""
MITMPROXY_SECRETS = ("upstream_auth", "proxyauth")
"""mitmproxy's own options that may hold credentials: only whether they are set."""

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def without_userinfo(text: str) -> str:
    """`http://user:pw@proxy` -> `http://(user info removed)@proxy`."""
    return _USERINFO.sub("(user info removed)@", text)


def build_report(opts: Any, state: list[str], traces: Iterable[HandshakeTrace]) -> list[str]:
    """The report's lines. `state` is what `ntlm.status` says (users, lockout guard, pool)."""
    now = datetime.datetime.now(datetime.UTC)
    traces = _distinct(traces)
    return [
        f"mitmproxy-ntlm diagnostic report, {now:%Y-%m-%d %H:%M:%S} UTC",
        "(no password, hash, token or ticket is included)",
        "", "== Versions",
        *versions.version_report().splitlines(),
        f"OS {platform.platform()}",
        "", "== mitmproxy options",
        *_option_lines(opts, MITMPROXY_OPTIONS, MITMPROXY_SECRETS),
        "", "== mitmproxy-ntlm options",
        *_option_lines(opts, [o.name for o in options.OPTIONS], options.SECRET),
        "", "== State",
        *state,
        "", "== Schemes the parents offered (last challenge seen)",
        *(_offers(traces) or ["none seen yet"]),
        "", f"== Last handshakes (newest last, up to {LAST_HANDSHAKES})",
        *_handshakes(traces),
    ]


def _option_lines(opts: Any, names: Iterable[str], secret: Iterable[str]) -> list[str]:
    secret = set(secret)
    lines = []
    for name in names:
        if name not in opts:
            continue
        value = getattr(opts, name)
        if name in secret:
            shown_value = "set (value not shown)" if value else "not set"
        else:
            shown_value = shown(without_userinfo(repr(value)), 400)
        default = opts.default(name) if hasattr(opts, "default") else None
        mark = "" if name in secret or value != default else "  (default)"
        lines.append(f"{name} = {shown_value}{mark}")
    return lines


def _distinct(traces: Iterable[HandshakeTrace]) -> list[HandshakeTrace]:
    """Each trace once (several connections may name one), oldest first."""
    seen: set[int] = set()
    out = []
    for t in traces:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _offers(traces: list[HandshakeTrace]) -> list[str]:
    last: dict[str, str] = {}
    for t in traces:
        for stage in t.stages:
            if "offers" in stage:
                last[t.parent] = f"{stage.get('status', '')}: {stage['offers'] or 'nothing'}"
    return [shown(f"{parent}: {offer}", PAGE_LIMIT) for parent, offer in last.items()]


def _handshakes(traces: list[HandshakeTrace]) -> list[str]:
    real = [t for t in traces if t.result != "reused"]
    recent = real[-LAST_HANDSHAKES:]
    failed = [t for t in real[:-LAST_HANDSHAKES] if not t.ok and t.result != "pending"]
    reused = len(traces) - len(real)
    lines = [f"(and {reused} reuses of pooled authenticated connections)"] if reused else []
    if failed:
        lines += [f"Earlier failures (up to {LAST_FAILURES}):"]
        for t in failed[-LAST_FAILURES:]:
            lines += _handshake(t)
    if not recent:
        lines.append("none yet")
    for t in recent:
        lines += _handshake(t)
    return lines


def _handshake(t: HandshakeTrace) -> list[str]:
    wall_start = time.time() - (time.monotonic() - t.started)
    head = (f"{_clock(wall_start)} {t.client} -> {t.parent} {t.kind}: {t.result}"
            + (f" [{t.dialect}]" if t.dialect else "")
            + (f" as {t.principal}" if t.principal else "")
            + f", {t.legs} legs, {t.elapsed_ms:.0f} ms")
    lines = [shown(head, PAGE_LIMIT)]
    elapsed = 0.0
    for stage in t.stages:
        elapsed += float(stage.get("ms", 0))
        details = {k: v for k, v in stage.items() if k not in ("stage", "ms")}
        lines.append(shown(f"    +{elapsed:.1f} ms {stage['stage']}: {messages.one_line(details)}",
                           PAGE_LIMIT))
        skew = _skew(details, wall_start + elapsed / 1000)
        if skew:
            lines.append(f"        clock: {skew}")
    return lines


def _skew(details: dict[str, Any], received: float) -> str:
    """MsvAvTimestamp of a Type 2 (also inside SPNEGO) against this machine's clock."""
    while "timestamp" not in details and isinstance(details.get("token"), dict):
        details = details["token"]
    when = authview.parse_time(str(details.get("timestamp", "")))
    if when is None:
        return ""
    return authview.skew_text(when.timestamp() - received) + \
        " (Kerberos fails beyond 5 minutes)"


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def write_report(path: str, lines: list[str]) -> Path:
    """Write the report to `path` (~ expanded), readable by its owner only."""
    target = Path(path).expanduser()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return target
