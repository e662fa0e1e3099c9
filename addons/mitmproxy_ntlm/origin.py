"""Automatic authentication to intranet servers (401 NTLM/Negotiate), as Fiddler does it.

Only for the hosts the user lists: credentials are never offered to other sites. The
credentials default to the upstream ones (or, in multi-user mode, the client's); a host pattern
can have its own. Those hosts are kept on HTTP/1.1 on both sides, because NTLM authenticates a
connection and HTTP/2 multiplexes requests of any origin over one.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.utils import human

from . import engine as eng
from . import mitmproxy_internals, options
from .credentials import (
    CredentialError,
    Credentials,
    SecretSources,
    build_credentials,
    read_secret_text,
)
from .handshake import Dialect
from .policy import UpstreamPolicy, new_guard
from .runtime import Runtime

log = logging.getLogger("mitmproxy_ntlm")


def read_credentials_file(path: str, workstation: str) -> Credentials:
    """A 0600 file: `DOMAIN\\user` on the first line, the password on the second."""
    lines = read_secret_text(path, "file").splitlines()
    if len(lines) < 2 or not lines[0] or not lines[1]:
        raise CredentialError(f"{path}: expected DOMAIN\\user on line 1, the password on line 2")
    return build_credentials(lines[0], "", workstation, SecretSources(password=lines[1]))


class OriginAuth:
    """Answers 401 NTLM/Negotiate challenges of the servers listed in ntlm_origin_hosts."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime if runtime is not None else Runtime()
        self.hosts: list[str] = []
        self.own_credentials: list[tuple[str, Credentials]] = []
        self.fallback_policy: UpstreamPolicy | None = None

    def load(self, loader: Loader) -> None:
        options.declare(loader, options.ORIGIN)

    def configure(self, updated: set[str]) -> None:
        if not updated & options.READ_BY_ORIGIN:
            return
        opts = ctx.options
        self.hosts = [h.lower() for h in options.items(opts.ntlm_origin_hosts)]
        self.own_credentials = []
        for item in options.items(opts.ntlm_origin_credentials):
            pattern, sep, path = item.partition("=")
            if not sep:
                raise exceptions.OptionsError(
                    f"ntlm_origin_credentials: {item!r} is not pattern=FILE")
            try:
                creds = read_credentials_file(path.strip(), opts.ntlm_workstation.upper())
            except CredentialError as e:
                raise exceptions.OptionsError(f"ntlm_origin_credentials: {e}") from None
            self.own_credentials.append((pattern.strip().lower(), creds))
        self.fallback_policy = UpstreamPolicy(creds=None, dialect=Dialect(opts.ntlm_dialect),
                                              guard=new_guard(opts))
        self.runtime.origin_engines = self.engine_for if self.hosts else None
        mitmproxy_internals.sync(self.runtime)
        if self.hosts:
            log.info("[ntlm] automatic logon to servers: %s", ", ".join(self.hosts))

    def done(self) -> None:
        self.runtime.origin_engines = None
        mitmproxy_internals.sync(self.runtime)

    def listed(self, host: str) -> bool:
        host = host.lower()
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts)

    def engine_for(self, context: Any) -> eng.AuthEngine | None:
        """An engine for this server connection when its host is listed, else None."""
        server = context.server
        host = server.sni or (server.address[0] if server.address else "")
        if not host or not self.listed(host):
            return None
        upstream = self.runtime.policy
        own = next((c for p, c in self.own_credentials if fnmatch.fnmatchcase(host.lower(), p)),
                   None)
        policy = upstream if upstream is not None else self.fallback_policy
        assert policy is not None
        if own is None and (upstream is None or not upstream.enabled):
            log.warning("[ntlm] no credentials for the server %s: set ntlm_username or "
                        "ntlm_origin_credentials", host)
            return None
        return eng.AuthEngine(
            policy, human.format_address(server.address),
            human.format_address(context.client.peername), target_host=host,
            can_reconnect=False, client_id=context.client.id, target=eng.ORIGIN, creds=own,
            trace_key=f"{server.id}/origin")

    def idle_hooks(self) -> set[str]:
        """No servers listed: nothing to prepare per TLS handshake (see script.AddonGroup)."""
        return set() if self.hosts else {"tls_clienthello"}

    def tls_clienthello(self, data: Any) -> None:
        """Keep listed hosts on HTTP/1.1 on both sides: connect the server first, offering
        only http/1.1, so the client is answered with what the server chose."""
        sni = data.client_hello.sni or ""
        if sni and self.listed(sni):
            data.context.server.alpn_offers = (b"http/1.1",)
            data.establish_server_tls_first = True
