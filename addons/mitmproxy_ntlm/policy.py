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

from .credentials import Credentials
from .handshake import Dialect, NtlmHandshake
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
        if self.limit > 0 and count >= self.limit:
            self._blocked_at.setdefault(principal, time.monotonic())
        return count

    def accepted(self, principal: str) -> None:
        self._failures.pop(principal, None)
        self._blocked_at.pop(principal, None)

    def reset(self) -> None:
        self._failures.clear()
        self._blocked_at.clear()


class AuthUnavailable(Exception):
    """Credentials must not (or cannot) be sent; the message is shown to the client."""


@dataclass
class UpstreamPolicy:
    """Configuration and shared state for authenticating to parent proxies."""

    creds: Credentials | None
    dialect: Dialect = Dialect.NTLMV2
    guard: LockoutGuard = field(default_factory=lambda: LockoutGuard(3))
    replay_limit: int = 16 * 1024 * 1024
    handshake_timeout: float = 30.0
    traces: OrderedDict[str, HandshakeTrace] = field(default_factory=OrderedDict)
    max_traces: int = 10_000
    # Client connections whose credentials the parent rejected: mitmproxy may open a second
    # parent connection for the same client request (eager TLS), which must not log on again.
    rejected_clients: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # Called once per finished handshake with (trace, client connection, parent connection).
    on_finished: Callable[[HandshakeTrace, Any, Any], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.creds is not None

    def credentials(self, client_id: str | None = None) -> Credentials:
        """The credentials to offer now, or AuthUnavailable saying why not."""
        if self.creds is None:  # pragma: no cover - layers only run when enabled
            raise AuthUnavailable("mitmproxy-ntlm has no credentials configured (ntlm_username)")
        if client_id is not None and client_id in self.rejected_clients:
            raise AuthUnavailable(self.rejected_clients[client_id])
        principal = self.creds.principal
        if self.guard.blocked(principal):
            raise AuthUnavailable(
                f"mitmproxy-ntlm stopped sending the credentials for {principal} after "
                f"{self.guard.failures(principal)} consecutive rejections by the parent proxy, "
                f"so the account does not get locked. Fix the credentials: any change to an "
                f"ntlm_* option (or the command ntlm.reset) enables them again."
            )
        return self.creds

    def handshake(self, creds: Credentials, target_host: str) -> NtlmHandshake:
        return NtlmHandshake(creds, self.dialect, target_host)

    def record(self, conn_id: str, trace: HandshakeTrace) -> None:
        """Remember the trace of the connection for the flows that use it."""
        self.traces[conn_id] = trace
        self.traces.move_to_end(conn_id)
        while len(self.traces) > self.max_traces:
            self.traces.popitem(last=False)

    def accepted(self, creds: Credentials) -> None:
        self.guard.accepted(creds.principal)

    def rejected(self, creds: Credentials, parent: str, client_id: str | None = None) -> str:
        """Count a rejection; return the explanation for the client."""
        count = self.guard.rejected(creds.principal)
        limit = self.guard.limit
        text = (
            f"The parent proxy {parent} rejected the NTLM credentials for {creds.principal} "
            f"({self.dialect.label}). Check ntlm_username, ntlm_domain and the password or hash."
        )
        if limit > 0:
            text += f" Consecutive rejections: {count} of {limit}."
            if count >= limit:
                text += (
                    " mitmproxy-ntlm now stops sending these credentials so the account does not"
                    " get locked; change an ntlm_* option (or run ntlm.reset) to try again."
                )
                log.error("[ntlm] credentials for %s disabled after %d consecutive rejections",
                          creds.principal, count)
        if client_id is not None:
            self.rejected_clients[client_id] = text
            while len(self.rejected_clients) > self.max_traces:
                self.rejected_clients.popitem(last=False)
        return text
