"""Which HTTPS `mitm-ntlm start` intercepts: none by default, as CNTLM and Px (`--intercept`).

Passthrough is mitmproxy's `ignore_hosts`: the tunnel to the parent still gets the NTLM
CONNECT, the client sees the server's own certificate, and no CA has to be trusted.
`--intercept a.example,*.corp.example` becomes `allow_hosts` (only those are decrypted);
`--intercept all` leaves both options alone (mitmproxy's default: decrypt everything).
"""

from __future__ import annotations

import re

ALL = "all"


class InterceptError(ValueError):
    pass


def host_pattern(host: str) -> str:
    """A regex for mitmproxy's `allow_hosts`, which matches `host:port` strings.
    `*.corp.example` matches the subdomains of corp.example."""
    host = host.strip().lower()
    if not host or not re.fullmatch(r"(\*\.)?[a-z0-9_.-]+", host):
        raise InterceptError(f"--intercept: {host!r} is not a host name (e.g. example.com, "
                             "*.corp.example, or all)")
    if host.startswith("*."):
        return r"^[^:]+\." + re.escape(host[2:]) + r":\d+$"
    return "^" + re.escape(host) + r":\d+$"


def tls_options(intercept: str | None) -> list[str]:
    """mitmproxy options for `--intercept` (None: pass every HTTPS connection through)."""
    if intercept is None:
        return ["--set", "ignore_hosts=.*"]
    if intercept.strip().lower() == ALL:
        return []
    hosts = [h for h in intercept.split(",") if h.strip()]
    if not hosts:
        raise InterceptError("--intercept: give host names (comma-separated) or all")
    options: list[str] = []
    for host in hosts:
        options += ["--set", f"allow_hosts={host_pattern(host)}"]
    return options
