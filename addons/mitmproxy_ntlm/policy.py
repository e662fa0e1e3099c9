"""What the connection layers ask the addon: whose credentials, may they be sent, what happened.

The layers are created by mitmproxy per connection; this object is the single place that
holds configuration and cross-connection state (the lockout guard, recent handshake traces).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bounded import bounded_set
from .credentials import Credentials
from .handshake import Dialect
from .schemes import Choice, SchemeChooser, SchemeMode
from .trace import HandshakeTrace

log = logging.getLogger("mitmproxy_ntlm")


class LockoutGuard:
    """Stops offering a principal's credentials after `limit` consecutive rejections.

    Every rejected Type 3 is a failed logon at the domain controller; a few in a row lock the
    account. With `cooldown` None the block lasts until `reset()` (an options change).
    """

    def __init__(self, limit: int, cooldown: float | None = None) -> None:
        self.limit = limit
        self.cooldown = cooldown
        self._failures: dict[str, int] = {}
        self._blocked_at: dict[str, float] = {}
        self.on_block: Callable[[], None] | None = None  # called when a principal gets blocked

    def failures(self, principal: str) -> int:
        return self._failures.get(principal, 0)

    def blocked(self, principal: str) -> bool:
        if self.limit <= 0 or principal not in self._blocked_at:
            return False
        age = time.monotonic() - self._blocked_at[principal]
        if self.cooldown is not None and age > self.cooldown:
            del self._blocked_at[principal]
            self._failures[principal] = 0
            return False
        return True

    def rejected(self, principal: str) -> int:
        count = self._failures.get(principal, 0) + 1
        self._failures[principal] = count
        if self.limit > 0 and count >= self.limit and principal not in self._blocked_at:
            self._blocked_at[principal] = time.monotonic()
            if self.on_block is not None:
                self.on_block()
        return count

    def accepted(self, principal: str) -> None:
        self._failures.pop(principal, None)
        self._blocked_at.pop(principal, None)

    def any_blocked(self) -> bool:
        return bool(self._blocked_at)

    def reset(self) -> None:
        self._failures.clear()
        self._blocked_at.clear()


class AuthUnavailable(Exception):
    """Credentials must not (or cannot) be sent; the message is shown to the client."""


@dataclass
class UpstreamPolicy:
    """Configuration and shared state for authenticating to parent proxies.

    Single-user: `creds` are offered for every client. Multi-user: each client connection
    has its own identity (from its Basic credentials, see `multiuser.py`), and the lockout
    guard counts per user.
    """

    creds: Credentials | None
    dialect: Dialect = Dialect.NTLMV2
    guard: LockoutGuard = field(default_factory=lambda: LockoutGuard(3))
    replay_limit: int = 16 * 1024 * 1024
    handshake_timeout: float = 30.0
    multiuser: bool = False
    realm: str = "mitmproxy-ntlm"
    traces: OrderedDict[str, HandshakeTrace] = field(default_factory=OrderedDict)
    max_traces: int = 10_000
    # Multi-user: the identity each client connection authenticated with.
    identities: dict[str, Credentials] = field(default_factory=dict)
    # Rejections already paid for: mitmproxy may open a second parent connection for the same
    # client request (eager TLS), and clients retry; neither may log on again with the same
    # secret. Keyed by client connection (single user) or by (user, NT hash) (multi-user).
    rejected: OrderedDict[Any, tuple[float, str]] = field(default_factory=OrderedDict)
    rejected_ttl: float = 300.0
    # Called once per finished handshake with (trace, client connection, parent connection).
    on_finished: Callable[[HandshakeTrace, Any, Any], None] | None = None
    # Kerberos or NTLM per peer; the default speaks NTLM only (no ticket source).
    chooser: SchemeChooser | None = None

    def __post_init__(self) -> None:
        if self.chooser is None:
            self.chooser = SchemeChooser(SchemeMode.NTLM, self.dialect, None)

    @property
    def enabled(self) -> bool:
        return self.creds is not None or self.multiuser

    def _rejection_key(self, creds: Credentials, client_id: str | None) -> Any:
        return (creds.principal.lower(), creds.nt_hash) if self.multiuser else client_id

    def known_rejection(self, creds: Credentials, client_id: str | None) -> str | None:
        """The explanation of an earlier rejection of these credentials, if still current."""
        key = self._rejection_key(creds, client_id)
        entry = self.rejected.get(key)
        if entry is None:
            return None
        if self.multiuser and time.monotonic() - entry[0] > self.rejected_ttl:
            del self.rejected[key]
            return None
        return entry[1]

    def may_refuse(self) -> bool:
        """False when `credentials()` cannot refuse any client now: one identity, no rejection
        remembered, nobody blocked. Lets the per-request check stop at one call."""
        return self.multiuser or bool(self.rejected) or self.guard.any_blocked()

    def credentials(self, client_id: str | None = None) -> Credentials:
        """The credentials to offer now for this client, or AuthUnavailable saying why not."""
        if self.multiuser:
            creds = self.identities.get(client_id or "")
            if creds is None:
                raise AuthUnavailable("Proxy authentication required: send your user name "
                                      "(DOMAIN\\user) and password with Basic authentication.")
        elif self.creds is None:  # pragma: no cover - layers only run when enabled
            raise AuthUnavailable("mitmproxy-ntlm has no credentials configured (ntlm_username)")
        else:
            creds = self.creds
        earlier = self.known_rejection(creds, client_id)
        if earlier:
            raise AuthUnavailable(earlier)
        principal = creds.principal
        if self.guard.blocked(principal):
            if self.multiuser:
                raise AuthUnavailable(
                    f"Too many rejected logons for {principal} in a row: mitmproxy-ntlm sends no "
                    f"credentials for this user for {self.guard.cooldown or 0:.0f} s, so the "
                    f"account does not get locked. Check the password and try again later."
                )
            raise AuthUnavailable(
                f"mitmproxy-ntlm stopped sending the credentials for {principal} after "
                f"{self.guard.failures(principal)} consecutive rejections by the parent proxy, "
                f"so the account does not get locked. Fix the credentials: any change to an "
                f"ntlm_* option (or the command ntlm.reset) enables them again."
            )
        return creds

    def failure_response(self) -> tuple[int, dict[str, str]]:
        """Status and headers for credentials that must not or did not work.

        Multi-user clients get a 407 Basic challenge, so they can prompt and retry; a single-user
        client has nothing to change, so it gets a 502 that explains.
        """
        if self.multiuser:
            return 407, {"Proxy-Authenticate": f'Basic realm="{self.realm}"'}
        return 502, {}

    def choose(self, creds: Credentials, peer: str, peer_host: str, what: str) -> Choice:
        """The scheme and handshake for the next exchange with `peer` (see schemes.py)."""
        assert self.chooser is not None
        return self.chooser.choose(creds, peer, peer_host, what, self.multiuser)

    def record(self, conn_id: str, trace: HandshakeTrace) -> None:
        """Remember the trace of the connection for the flows that use it."""
        bounded_set(self.traces, conn_id, trace, self.max_traces)

    def accepted(self, creds: Credentials) -> None:
        self.guard.accepted(creds.principal)

    def rejected_by_parent(self, creds: Credentials, parent: str,
                           client_id: str | None = None, what: str = "") -> str:
        """Count a rejection; return the explanation for the client.

        `what` replaces the first sentence (the KDC, not the parent, refused a Kerberos logon).
        """
        count = self.guard.rejected(creds.principal)
        limit = self.guard.limit
        which = ("the user name and password" if self.multiuser
                 else "ntlm_username, ntlm_domain and the password or hash")
        text = what or (
            f"The parent proxy {parent} rejected the NTLM credentials for {creds.principal} "
            f"({self.dialect.label})."
        )
        text += f" Check {which}."
        if limit > 0:
            text += f" Consecutive rejections: {count} of {limit}."
            if count >= limit and not self.multiuser:
                text += (
                    " mitmproxy-ntlm now stops sending these credentials so the account does not"
                    " get locked; change an ntlm_* option (or run ntlm.reset) to try again."
                )
            if count >= limit:
                log.error("[ntlm] credentials for %s disabled after %d consecutive rejections",
                          creds.principal, count)
        key = self._rejection_key(creds, client_id)
        if key is not None:
            bounded_set(self.rejected, key, (time.monotonic(), text), self.max_traces)
        return text
