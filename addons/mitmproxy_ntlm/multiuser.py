"""Multi-user mode: each client's `Proxy-Authorization: Basic` becomes its NTLM identity.

CNTLM's "NTLM-to-basic": one shared proxy, each person's own account towards the parent. The
Basic header is taken off the flow at once (it must not show in mitmweb or reach the parent),
the password is reduced to its NT/LM hashes, and the identity is pinned to the client
connection, which is what the connection layers ask for.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

from mitmproxy import http

from .credentials import (
    CredentialError,
    Credentials,
    check_client_names,
    hashes_from_password,
    split_principal,
)
from .policy import UpstreamPolicy

log = logging.getLogger("mitmproxy_ntlm")


# The longest Basic header value read: a UPN (1024 characters) and a long password fit.
MAX_BASIC_BYTES = 4096


def decode_basic(value: str) -> tuple[str, str]:
    """(user, password) from a `Basic <base64(user:password)>` header value."""
    if len(value) > MAX_BASIC_BYTES:
        raise CredentialError(f"the Basic credentials are too long ({len(value)} bytes; at "
                              f"most {MAX_BASIC_BYTES})")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        raise CredentialError("only Basic proxy authentication is accepted from clients")
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialError("the Basic credentials are not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, _, password = text.partition(":")
    return user, password


def client_credentials(user: str, password: str, default_domain: str,
                       workstation: str, keep_password: bool = False) -> Credentials:
    """NTLM credentials for a client's user name and password (hashes only, unless Kerberos
    tickets are to be obtained with the password)."""
    name, domain = split_principal(user, "")
    check_client_names(name, domain)
    if not password:
        raise CredentialError("the password is empty")
    lm, nt = hashes_from_password(password)
    return Credentials(user=name, domain=domain or default_domain, workstation=workstation,
                       nt_hash=nt, lm_hash=lm,
                       kerberos_password=password if keep_password else None)


class ClientLogins:
    """Reads clients' Basic credentials and pins them to client connections."""

    def __init__(self, policy: UpstreamPolicy, default_domain: str, workstation: str,
                 keep_passwords: bool = False) -> None:
        self.policy = policy
        self.default_domain = default_domain
        self.workstation = workstation
        self.keep_passwords = keep_passwords  # for Kerberos tickets per user

    def authenticate(self, flow: http.HTTPFlow) -> str | None:
        """Pin the flow's client to its Basic identity; an error text when that fails."""
        header = flow.request.headers.pop("Proxy-Authorization", None)
        if header is None:
            if flow.client_conn.id in self.policy.identities:
                return None  # e.g. requests inside a CONNECT tunnel the client opened as this user
            return ("Proxy authentication required: send your user name (DOMAIN\\user or "
                    "user@domain) and password; mitmproxy-ntlm logs on to the parent proxy "
                    "with them (NTLM).")
        try:
            user, password = decode_basic(header)
        except CredentialError as e:
            return f"Proxy authentication failed: {e}."
        return self.pin(flow.client_conn, user, password, flow.request.http_version)

    def pin(self, client: Any, user: str, password: str,
            http_version: str = "HTTP/1.1") -> str | None:
        """Make these credentials the identity of `client`; an error text when they can't be."""
        client_id = client.id
        pinned = self.policy.identities.get(client_id)
        try:
            creds = client_credentials(user, password, self.default_domain, self.workstation,
                                       self.keep_passwords)
        except CredentialError as e:
            return f"Proxy authentication failed: {e}."
        if pinned is not None and pinned != creds and not http_version.startswith("HTTP/1"):
            # Streams of one HTTP/2 connection run concurrently: one user per connection.
            return ("This connection is already used by another user; open a new connection "
                    "for different credentials.")
        if pinned != creds:
            log.info("[ntlm] client %s authenticates as %s",
                     client.peername[0] if client.peername else "?", creds.principal)
        # The same object again when nothing changed: the bounded map need not measure it.
        self.policy.identities[client_id] = pinned if pinned == creds else creds
        return None

    def forget(self, client_id: str) -> None:
        self.policy.identities.pop(client_id, None)
