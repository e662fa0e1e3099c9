"""What the connection layers ask the addon: whose credentials, may they be sent, what happened.

The layers are created by mitmproxy per connection; this object is the single place that
holds configuration and cross-connection state (the lockout guard, recent handshake traces).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import options
from .bounded import BoundedMap, approx_size
from .credentials import Credentials, account_of
from .handshake import Dialect
from .logon_needs import LogonNeeds
from .schemes import Choice, SchemeChooser, SchemeMode
from .trace import HandshakeTrace
from .untrusted import shown

log = logging.getLogger("mitmproxy_ntlm")


@dataclass(eq=False)
class Attempt:
    """A logon with credentials the parent has not accepted yet, reserved before its handshake
    starts; released when it ends, or on its own at `expires` should its connection vanish
    without an outcome."""

    account: str
    expires: float


class AttemptsBusy(Exception):
    """Failures plus logons in flight reach the limit for this account: wait, or refuse."""


class Guard(Protocol):
    """What the policy asks of a lockout guard: `LockoutGuard` (counts in this process) or
    `shared_guard.SharedLockoutGuard` (counts in a file shared by several processes)."""

    limit: int
    cooldown: float | None
    attempt_timeout: float
    on_block: Callable[[], None] | None

    def failures(self, principal: str) -> int: ...
    def blocked(self, principal: str) -> bool: ...
    def rejected(self, principal: str) -> int: ...
    def accepted(self, principal: str) -> None: ...
    def any_blocked(self) -> bool: ...
    def in_flight(self, principal: str) -> int: ...
    def has_room(self, principal: str) -> bool: ...
    def try_reserve(self, principal: str) -> Attempt | None: ...
    def release(self, attempt: Attempt) -> None: ...
    def reset(self) -> None: ...


class LockoutGuard:
    """Stops offering an account's credentials after `limit` consecutive rejections, and lets
    at most `limit` minus the failures so far go to the parent at a time.

    Every rejected Type 3 is a failed logon at the domain controller; a few in a row lock the
    account, however many clients send them at once. Counts are per account
    (`credentials.account_of`: user name, any domain or case). With `cooldown` None the block
    lasts until `reset()` (an options change); with a cooldown, blocks and failure counts
    expire that long after the last failure. Accounts are kept in bounded maps, so clients
    sending endless bogus names cannot grow memory; a count is never dropped to make room
    (that would hand out fresh guesses): once the maps are full, accounts not counted yet get
    no logon until counts expire (`has_room`).
    """

    def __init__(self, limit: int, cooldown: float | None = None, max_accounts: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.cooldown = cooldown
        self.attempt_timeout = 120.0  # the policy sets it from the handshake timeout
        self._clock = clock
        ttl = cooldown
        self._failures: BoundedMap[str, int] = BoundedMap(max_accounts, 4 << 20, ttl, clock)
        self._blocked_at: BoundedMap[str, float] = BoundedMap(max_accounts, 4 << 20, ttl, clock)
        # Attempts in flight: bounded by the connections open at a time (one per connection).
        self._attempts: dict[str, list[Attempt]] = {}
        self.on_block: Callable[[], None] | None = None  # called when an account gets blocked

    def failures(self, principal: str) -> int:
        return self._failures.get(account_of(principal), 0)  # type: ignore[no-any-return]

    def blocked(self, principal: str) -> bool:
        if self.limit <= 0:
            return False
        account = account_of(principal)
        blocked_at = self._blocked_at.get(account)
        if blocked_at is None:
            return False
        if self.cooldown is not None and self._clock() - blocked_at > self.cooldown:
            self._blocked_at.pop(account)
            self._failures.pop(account)
            return False
        return True

    def rejected(self, principal: str) -> int:
        account = account_of(principal)
        count = self._failures.get(account, 0) + 1
        if account not in self._failures and not self._failures.has_room(1, _entry_size(account)):
            # Only a logon that held no slot gets here; storing would drop another's count.
            log.warning("[ntlm] lockout guard full: the rejection for %s is not counted",
                        shown(account))
            return count
        self._failures[account] = count
        if self.limit > 0 and count >= self.limit and account not in self._blocked_at:
            self._blocked_at[account] = self._clock()
            if self.on_block is not None:
                self.on_block()
        return count  # type: ignore[no-any-return]

    def accepted(self, principal: str) -> None:
        account = account_of(principal)
        self._failures.pop(account)
        self._blocked_at.pop(account)

    def any_blocked(self) -> bool:
        return bool(self._blocked_at)

    def in_flight(self, principal: str) -> int:
        """Attempts reserved for this account and not ended (nor expired)."""
        return len(self._live_attempts(account_of(principal)))

    def _live_attempts(self, account: str) -> list[Attempt]:
        attempts = self._attempts.get(account)
        if not attempts:
            return []
        now = self._clock()
        live = [a for a in attempts if a.expires > now]
        if len(live) != len(attempts):
            if live:
                self._attempts[account] = live
            else:
                del self._attempts[account]
        return live

    def has_room(self, principal: str) -> bool:
        """Whether a failure of this account can be counted without forgetting another's: it
        is counted already, or the maps hold it and every uncounted account in flight."""
        account = account_of(principal)
        if account in self._failures:
            return True
        pending = {name for name in self._attempts if name not in self._failures} | {account}
        return self._failures.has_room(len(pending), sum(map(_entry_size, pending)))

    def try_reserve(self, principal: str) -> Attempt | None:
        """A slot for one logon with untried credentials; None when the failures so far plus
        the attempts in flight reach the limit, or the account could not be counted
        (`has_room`). Without a limit: always a slot."""
        account = account_of(principal)
        attempt = Attempt(account, self._clock() + self.attempt_timeout)
        if self.limit <= 0:
            return attempt
        if not self.has_room(account):
            return None
        live = self._live_attempts(account)
        if self._failures.get(account, 0) + len(live) >= self.limit:
            return None
        if len(self._attempts) > 10_000:  # attempts whose connection vanished: drop them
            for name in list(self._attempts):
                self._live_attempts(name)
        self._attempts.setdefault(account, []).append(attempt)
        return attempt

    def release(self, attempt: Attempt) -> None:
        attempts = self._attempts.get(attempt.account)
        if attempts and attempt in attempts:
            attempts.remove(attempt)
            if not attempts:
                del self._attempts[attempt.account]

    def reset(self) -> None:
        self._failures.clear()
        self._blocked_at.clear()


def _entry_size(account: str) -> int:
    """What an account's entry in the guard's maps takes (see `BoundedMap`)."""
    return approx_size(account) + approx_size(1)  # a count; a block's time is smaller


RECENT_TRACES = 256
"""Latest handshake traces kept for ntlm.status and ntlm.report beyond the open connections'."""


def _trace_size(key: str, trace: HandshakeTrace) -> int:
    """A cheap estimate of a trace's memory (a failed NTLM logon's is about 11 KB): its heads
    and names, and the decoded messages of its stages."""
    heads = sum(len(exchange) for exchange in trace.exchanges)  # heads and kept 407 bodies
    return 1000 + len(key) + len(trace.kind) + len(trace.principal) + heads + \
        1500 * len(trace.stages)


class AuthUnavailable(Exception):
    """Credentials must not (or cannot) be sent; the message is shown to the client."""


@dataclass
class UpstreamPolicy:
    """Configuration and shared state for authenticating to parent proxies.

    Single-user: `creds` are offered for every client. Multi-user: each client connection
    has its own identity (from its Basic credentials, see `multiuser.py`), and the lockout
    guard counts per account. Every map here is bounded in entries and bytes (`BoundedMap`):
    clients choose the user names and connections they are keyed by.
    """

    # Defaults are the options' (options.py); the addon passes the options' values.
    creds: Credentials | None
    dialect: Dialect = field(default_factory=lambda: Dialect(options.default("ntlm_dialect")))
    guard: Guard = field(
        default_factory=lambda: LockoutGuard(options.default("ntlm_max_failures")))
    replay_limit: int = options.default("ntlm_replay_limit")
    handshake_timeout: float = float(options.default("ntlm_handshake_timeout"))
    multiuser: bool = options.default("ntlm_multiuser")
    realm: str = options.default("ntlm_realm")
    # Handshakes by mitmproxy connection id, for the flows that use the connection: held by
    # their layers' engines while the connection is open, not here ...
    traces: weakref.WeakValueDictionary[str, HandshakeTrace] = field(
        default_factory=weakref.WeakValueDictionary)
    # ... and the latest ones, open or closed, for ntlm.status and ntlm.report. Keeping every
    # closed connection's trace (up to 10,000) made mitmdump 4-6 MB larger after 3,000
    # intercepted tunnels, and in an experiment cost 6% more CPU per tunnel (benchmarks.md).
    recent_traces: BoundedMap[str, HandshakeTrace] = field(
        default_factory=lambda: BoundedMap(RECENT_TRACES, 2 << 20, size=_trace_size))
    # Multi-user: the identity each client connection authenticated with (dropped when the
    # client disconnects, so no idle expiry: a quiet CONNECT tunnel keeps its user).
    identities: BoundedMap[str, Credentials] = field(
        default_factory=lambda: BoundedMap(20_000, 8 << 20))
    # Rejections already paid for: mitmproxy may open a second parent connection for the same
    # client request (eager TLS), and clients retry; neither may log on again with the same
    # secret. Keyed by client connection (single user) or by (account, NT hash) (multi-user,
    # forgotten after rejected_ttl).
    rejected: BoundedMap[Any, str] = field(init=False)
    rejected_ttl: float = float(options.default("ntlm_lockout_cooldown"))
    # (account, NT hash) pairs the parent accepted: they need no attempt slot (see attempt()).
    verified: BoundedMap[tuple[str, bytes], bool] = field(
        default_factory=lambda: BoundedMap(10_000, 2 << 20, ttl=3600.0))
    # Which new parent connections go without credentials first (parents that let clients
    # through without a logon).
    logon_needs: LogonNeeds = field(default_factory=LogonNeeds)
    # Called once per finished handshake with (trace, client connection, parent connection).
    on_finished: Callable[[HandshakeTrace, Any, Any], None] | None = None
    # Kerberos or NTLM per peer; the default speaks NTLM only (no ticket source).
    chooser: SchemeChooser | None = None
    # What ends a lockout-guard stop in the running tool (the addon knows which one it is).
    recovery: str = "change an ntlm_* option, run ntlm.reset or restart mitmproxy"

    def __post_init__(self) -> None:
        if self.chooser is None:
            self.chooser = SchemeChooser(SchemeMode.NTLM, self.dialect, None)
        self.rejected = BoundedMap(10_000, 4 << 20,
                                   ttl=self.rejected_ttl if self.multiuser else None)
        # A handshake is two legs, each within the timeout, and may reconnect once.
        self.guard.attempt_timeout = 4 * self.handshake_timeout

    @property
    def enabled(self) -> bool:
        return self.creds is not None or self.multiuser

    def _rejection_key(self, creds: Credentials, client_id: str | None) -> Any:
        return self._secret_key(creds) if self.multiuser else client_id

    @staticmethod
    def _secret_key(creds: Credentials) -> tuple[str, bytes]:
        return account_of(creds.principal), creds.nt_hash

    def known_rejection(self, creds: Credentials, client_id: str | None) -> str | None:
        """The explanation of an earlier rejection of these credentials, if still current."""
        return self.rejected.get(self._rejection_key(creds, client_id))  # type: ignore[no-any-return]

    def attempt(self, creds: Credentials) -> Attempt | None:
        """Reserve a logon before a handshake with `creds` starts; end it with attempt_ended.

        None: no reservation needed, the parent accepted these very credentials before and
        no rejection of the account was counted since (by any process sharing the guard).
        AttemptsBusy: the failures so far plus the logons in flight for the account reach
        ntlm_max_failures, so racing clients cannot send more wrong passwords than that.
        """
        if self._secret_key(creds) in self.verified and not self.guard.failures(creds.principal):
            return None
        attempt = self.guard.try_reserve(creds.principal)
        if attempt is None and not self.guard.has_room(creds.principal):
            raise AttemptsBusy(
                f"mitmproxy-ntlm counts failed logons for as many accounts as it can keep, and "
                f"starts none for another account such as {creds.principal} until some of "
                f"those counts expire (ntlm_lockout_cooldown), so none is forgotten."
            )
        if attempt is None:
            raise AttemptsBusy(
                f"mitmproxy-ntlm sends at most {_count(self.guard.limit, 'logon')} at a time "
                f"for {creds.principal} (ntlm_max_failures) until the parent accepts one, and "
                f"{_count(self.guard.failures(creds.principal), 'rejection')} plus "
                f"{_count(self.guard.in_flight(creds.principal), 'logon')} in progress for this "
                f"account use them all."
            )
        return attempt

    def attempt_ended(self, attempt: Attempt | None) -> None:
        if attempt is not None:
            self.guard.release(attempt)

    def forget_rejections(self) -> None:
        """New secrets or a reset: rejections paid for so far no longer refuse anyone."""
        self.rejected.clear()

    def may_refuse(self) -> bool:
        """False when `credentials()` cannot refuse any client now: one identity, no rejection
        remembered, nobody blocked. Lets the per-request check stop at one call."""
        return self.multiuser or bool(self.rejected) or self.guard.any_blocked()

    def credentials(self, client_id: str | None = None) -> Credentials:
        """The credentials to offer now for this client, or AuthUnavailable saying why not."""
        if self.creds is not None and not self.may_refuse():  # every request: the short way
            return self.creds
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
                f"so the account does not get locked. Fix the credentials, then "
                f"{self.recovery}."
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
        self.traces[conn_id] = trace
        self.recent_traces[conn_id] = trace

    def trace(self, key: str) -> HandshakeTrace | None:
        """The trace of a connection (or of its origin's logon: `<id>/origin`)."""
        trace = self.traces.get(key)
        return trace if trace is not None else self.recent_traces.get(key)

    def kept_traces(self) -> list[HandshakeTrace]:
        """Open connections' traces and the latest ones, each once, oldest first (an open
        connection's trace not among the latest is older than all of them)."""
        recent = self.recent_traces.values()
        seen = {id(t) for t in recent}
        return [t for t in self.traces.values() if id(t) not in seen] + recent

    def accepted(self, creds: Credentials) -> None:
        self.guard.accepted(creds.principal)
        self.verified[self._secret_key(creds)] = True

    def rejected_by_parent(self, creds: Credentials, parent: str,
                           client_id: str | None = None, what: str = "") -> str:
        """Count a rejection; return the explanation for the client.

        `what` replaces the first sentence (the KDC, not the parent, refused a Kerberos logon).
        """
        count = self.guard.rejected(creds.principal)
        self.verified.pop(self._secret_key(creds))
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
                    f" get locked; to try again: {self.recovery}."
                )
            if count >= limit:
                log.error("[ntlm] credentials for %s disabled after %d consecutive rejections",
                          creds.principal, count)
        key = self._rejection_key(creds, client_id)
        if key is not None:
            self.rejected[key] = text
        return text


def _count(n: int, noun: str) -> str:
    """`1 logon`, `3 logons`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def new_guard(opts: Any, cooldown: float | None = None) -> Guard:
    """The lockout guard the options ask for: in this process, or in ntlm_lockout_file
    (shared by processes; SQLite is loaded only then)."""
    if opts.ntlm_lockout_file:
        from .shared_guard import SharedLockoutGuard

        return SharedLockoutGuard(opts.ntlm_lockout_file, opts.ntlm_max_failures, cooldown)
    return LockoutGuard(opts.ntlm_max_failures, cooldown)
