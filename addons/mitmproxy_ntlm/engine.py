"""NTLM to a parent proxy on one connection, as a state machine over bytes (no I/O).

The mitmproxy layer feeds it what the child layer sends (`from_child`), what the parent sends
(`from_parent`), closes and timeouts, and carries out the returned actions. Keeping it free of
mitmproxy makes it testable and fuzzable on its own.

Legs, for plain http (absolute-form requests):
- new connection, request without body: the request itself carries Type 1 (saves a round trip;
  a parent that needs no auth just serves it, once).
- new connection, request with body: a `HEAD` probe carries Type 1, so nothing with side
  effects is sent before the parent has shown it wants NTLM.
- then the request with Type 3 and its body; later requests go as they are.
- a 407 on an authenticated connection (re-challenge) restarts the legs with a replay of the
  request, on a new connection when the 407 closes the old one.
For CONNECT the same legs run as the tunnel handshake; afterwards bytes bypass the engine.

Kerberos (chosen per exchange by `schemes.SchemeChooser`) has a single leg: the request (or the
HEAD probe) carries `Negotiate <AP-REQ>` and any answer but a 407 means authenticated. A 407
to it falls back to NTLM on the same connection when the chooser allows.

Connection pool: a connection taken from the pool starts AUTHENTICATED (`adopt`), so its
requests (or its CONNECT) go without legs; a 407 there restarts the legs as a re-challenge does.
Between requests the layer may lend the socket to the pool and borrow another of the same
user (`resume_pooled`), or find none (`needs_new_connection`: the next request reconnects).
The pool's bookkeeping lives in `pool.reuse.ConnectionReuse` (`self.reuse`): with `track` set
it frames the responses the engine passes on, so `reusable()` can tell when the connection is
idle (request sent in full, response received in full, keep-alive) and may go back to the
pool; it also notes bytes outside any response (`stray`), which close the connection. A pooled
connection that closes before answering its first request was dropped by the parent while
idle: it is replaced and the request replayed (`pooled_connection_lost`) instead of failing
the client.

The same legs answer an intranet server's 401 (`Target` ORIGIN: Authorization and
WWW-Authenticate headers, NTLM or Negotiate); there a rejection passes the server's own 401 on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from . import wire
from .credentials import Credentials
from .handshake import ChallengeError, NtlmClientError, NtlmHandshake
from .kerberos import KerberosHandshake, KerberosRejected
from .policy import Attempt, AttemptsBusy, AuthUnavailable, UpstreamPolicy
from .pool.reuse import ConnectionReuse
from .schemes import NoScheme, SchemeMode
from .trace import HandshakeTrace
from .untrusted import PAGE_LIMIT, shown
from .winbind import WinbindHandshake

log = logging.getLogger("mitmproxy_ntlm")

@dataclass(frozen=True)
class Target:
    """What the engine authenticates to: the parent proxy (407) or an origin server (401)."""

    auth_header: str
    challenge_header: str
    status: int
    name: str


PARENT = Target("Proxy-Authorization", "proxy-authenticate", 407, "parent proxy")
ORIGIN = Target("Authorization", "www-authenticate", 401, "server")


@dataclass
class ToParent:
    data: bytes


@dataclass
class ToChild:
    data: bytes


@dataclass
class CloseParent:
    pass


@dataclass
class Reconnect:
    """Open a fresh connection to the same parent, then call `reconnected()`."""


@dataclass
class Established:
    """CONNECT only: the tunnel is open; `leftover` is the first tunnel data."""

    leftover: bytes = b""


@dataclass
class Failed:
    """CONNECT only: the tunnel cannot be opened; `reason` is shown to the client, with
    `status`, or the policy's answer to credentials that did not work (`auth_failure`)."""

    reason: str
    status: int = 502
    auth_failure: bool = False


@dataclass
class StartTimer:
    """Ask for `timed_out(generation)` after the handshake timeout (or `delay` seconds)."""

    generation: int
    delay: float | None = None


Action = ToParent | ToChild | CloseParent | Reconnect | Established | Failed | StartTimer


class ConnState(Enum):
    UNAUTHENTICATED = "unauthenticated"
    AUTHENTICATED = "authenticated"
    NO_AUTH_NEEDED = "no auth needed"
    REJECTED = "rejected"  # origin: credentials refused, requests pass without auth
    FAILED = "failed"


class Phase(Enum):
    IDLE = "idle"  # no request outstanding
    PLAIN = "plain"  # request sent without auth header
    LEG1 = "leg1"  # Type 1 sent
    LEG3 = "leg3"  # Type 3 sent
    KERBEROS = "kerberos"  # the single Kerberos token sent
    WAITING = "waiting"  # for an attempt slot of the account (lockout guard), nothing sent


# A hidden handshake response is outstanding (its body, e.g. a 407 page, goes to the trace).
_LEG_PHASES = (Phase.LEG1, Phase.LEG3, Phase.KERBEROS)

class AuthEngine:
    """Authenticates one connection to a parent or a server; the module docstring has the legs.

    `trace_key` names the mitmproxy connection the flows use, so traces reach their flows.
    """

    def __init__(
        self,
        policy: UpstreamPolicy,
        parent: str,
        client: str,
        target_host: str,
        can_reconnect: bool = True,
        client_id: str | None = None,
        target: Target = PARENT,
        scheme: str = "NTLM",
        creds: Credentials | None = None,
        trace_key: str = "",
    ) -> None:
        self.policy = policy
        self.trace_key = trace_key
        self.client_id = client_id
        self.target = target
        self.scheme = scheme
        self.fixed_creds = creds  # origin credentials; else the policy's for this client
        self.parent = parent
        self.client = client
        self.target_host = target_host
        self.can_reconnect = can_reconnect
        self.state = ConnState.UNAUTHENTICATED
        self.trace: HandshakeTrace | None = None
        self.creds: Credentials | None = None
        self.phase = Phase.IDLE
        self.connect_mode = False
        self.failure: Failed | None = None  # why the CONNECT failed, for its answer
        self.generation = 0

        self._req_in = bytearray()
        self._req: wire.Head | None = None  # current request head (without auth header)
        self._req_framer: wire.BodyFramer | None = None
        self._req_complete = False
        self._replay: bytearray | None = None  # current request's body, for replay
        self._probe = False  # leg 1 is a HEAD probe, the request waits for leg 3
        self._without_logon = False  # leg 1 went without credentials (`_leg_without_logon`)
        self._challenged = False  # this request got a 407: it goes through the legs

        self._resp_in = bytearray()
        self._passing = False  # response bytes go straight to the child
        self._skip: wire.BodyFramer | None = None  # a hidden response body being consumed
        self._after_skip: Callable[[], list[Action]] | None = None
        self._waiting_for_request_end: Callable[[], list[Action]] | None = None
        self._challenge: bytes | None = None
        self._handshake: NtlmHandshake | WinbindHandshake | KerberosHandshake | None = None
        self._reconnects = 0
        self._scheme_switches = 0  # per request: Kerberos -> NTLM, NTLM -> Negotiate
        # The lockout guard's slot for this logon (untried credentials), held until it ends.
        self._attempt: Attempt | None = None
        self._attempt_for: Credentials | None = None
        self._wait_until: float | None = None  # waiting for a slot until then (monotonic)
        self._wait_delay = 0.0

        self.reuse = ConnectionReuse()  # the pool's bookkeeping (see the module docstring)

    # ---------------------------------------------------------------- pool

    def adopt(self, creds: Credentials, authenticated_at: float, uses: int,
              connect: bool = False) -> None:
        """Start on a pooled connection already authenticated as `creds`: no legs.

        For a CONNECT the trace says "reused" only once the parent accepted the CONNECT.
        """
        self.state = ConnState.AUTHENTICATED
        self.creds = creds
        self.reuse.adopted(authenticated_at, uses)
        kind = "CONNECT on a pooled connection" if connect else "pooled connection"
        self.trace = HandshakeTrace(self.parent, self.client, kind,
                                    principal=creds.principal, key=self.trace_key)
        if not connect:
            self._mark_reused()

    def _mark_reused(self) -> None:
        if self.reuse.mark(self.trace):
            assert self.trace is not None
            self.policy.record(self.trace_key, self.trace)

    def reusable(self) -> bool:
        """Idle, authenticated, keep-alive, nothing half-sent or half-received: may be pooled."""
        if self.state is not ConnState.AUTHENTICATED or self.connect_mode:
            return False
        if self.phase is not Phase.IDLE or self._skip is not None or self._req_in or self._resp_in:
            return False
        # Read inline, not a call into `reuse`: the layer asks after every response chunk
        # (a call costs ~550 instructions, callgrind).
        reuse = self.reuse
        if not reuse.possible:
            return False
        if self._req is None:
            return reuse.reused  # adopted and never used
        framer = reuse.framer
        return self._req_complete and framer is not None and framer.done

    def unfinished_response(self) -> wire.ResponseRest | None:
        """The request went out whole on this authenticated connection and its response has
        not ended (the client went away meanwhile): what is left of it, so the connection can
        be read to the end and pooled instead of closed (None: it cannot be)."""
        if (self.state is not ConnState.AUTHENTICATED or self.connect_mode or self._req is None
                or not self._req_complete or self._req_in or self._skip is not None
                or not (self._passing or self.phase is Phase.PLAIN)):
            return None
        return self.reuse.unfinished(self._req, self.target.status, self._passing,
                                     bytes(self._resp_in))

    def _stray(self, count: int, where: str, framed: bytes = b"") -> list[Action]:
        """Bytes outside any framed response: they belong to no request, so they are dropped
        (they could reach another client). Pass `framed` (the end of this client's
        response), close the connection, and say so (`reuse.stray`) so the pool stops
        sharing this parent's connections between clients."""
        what = f"{count} bytes {where}"
        self.reuse.saw_stray(what)
        log.warning("[ntlm] %s -> %s: the %s sent %s; closing the connection", self.client,
                    self.parent, self.target.name, what)
        self._passing = False
        self.state = ConnState.FAILED  # nothing more from this connection reaches anyone
        self.phase = Phase.IDLE
        out: list[Action] = [ToChild(framed)] if framed else []
        return [*out, CloseParent()]

    def resume_pooled(self, creds: Credentials, authenticated_at: float | None,
                      uses: int) -> None:
        """The next request goes on a connection lent by the pool, authenticated as `creds`
        (`authenticated_at` None: one still to come free)."""
        self.state = ConnState.AUTHENTICATED
        self.creds = creds
        self.reuse.adopted(authenticated_at, uses)

    def needs_new_connection(self) -> None:
        """The connection was lent and none is free: the next request opens a new one."""
        self.reuse.new_connection = True

    def pooled_connection_lost(self, why: str | None = None) -> list[Action]:
        """The pooled connection closed before answering its first request (the parent dropped
        it while idle), or none came free (`why`): open a fresh one and replay, instead of
        failing the client."""
        log.info("[ntlm] %s -> %s: %s; opening a new one", self.client, self.parent,
                 why or "the pooled connection was closed by the parent")
        self.reuse.reused = False
        self.state = ConnState.UNAUTHENTICATED
        self.phase = Phase.IDLE
        return [Reconnect()]

    def lost_before_answer(self) -> bool:
        """A close now means the parent dropped the pooled connection: `pooled_connection_lost`
        can replay the request on a fresh one."""
        return (self.reuse.reused and not self.reuse.answered and self.phase is Phase.PLAIN
                and self.state is ConnState.AUTHENTICATED and self._replay is not None)

    # ---------------------------------------------------------------- helpers

    def _auth_head(self, raw: bytes, token: bytes) -> bytes:
        return wire.set_header(raw, self.target.auth_header, f"{self.scheme} {wire.b64(token)}")

    def _fail(self, reason: str, status: int = 502, result: str | None = None,
              auth_failure: bool = False) -> list[Action]:
        """Give up on this connection with a readable error for the client.

        `auth_failure`: the credentials were rejected or withheld; the policy decides how the
        client is told (a 407 challenge in multi-user mode, so it can retry).
        """
        reason = shown(reason, PAGE_LIMIT)  # goes to a page, a log, a comment; quotes clients
        if self.trace is not None and self.phase in _LEG_PHASES and self._resp_in:
            self.trace.received_body(self._resp_in)  # the refusal's page, as far as it came
        self._end_attempt()
        self._wait_until = None
        self.state = ConnState.FAILED
        self._passing = False
        if self.trace and self.trace.result in ("pending", "reused"):
            self.trace.finish(result or f"failed: {reason}", logging.WARNING)
        if self.trace:
            self.trace.error_status = status
            self.policy.record(self.trace_key, self.trace)
        log.warning("[ntlm] %s -> %s: %s", self.client, self.parent, reason)
        self.phase = Phase.IDLE
        if self.connect_mode:
            self.failure = Failed(reason, status, auth_failure)
            return [self.failure, CloseParent()]
        headers: dict[str, str] = {}
        if auth_failure:
            status, headers = self.policy.failure_response()
        return [ToChild(wire.error_response(status, reason, headers)), CloseParent()]

    def _with_body(self, head: bytes) -> list[Action]:
        """`head` followed by the request body received so far."""
        out: list[Action] = [ToParent(head)]
        if self._replay:
            out.append(ToParent(bytes(self._replay)))
        return out

    def _start_legs(self) -> list[Action]:
        """Send Type 1: with the request itself, or with a HEAD probe when it has a body."""
        assert self._req is not None
        try:
            self.creds = self._credentials()
            if self.target is PARENT and not self._challenged and self._may_go_without_logon():
                return self._leg_without_logon()
            self._reserve_attempt()
        except AttemptsBusy as e:
            return self._wait_for_attempt(str(e))
        except AuthUnavailable as e:
            if self.target is ORIGIN:  # the server's own 401 reaches the client
                log.warning("[ntlm] %s", e)
                self.state = ConnState.REJECTED
                return self._send_plain()
            return self._fail(str(e), auth_failure=True)
        self.generation += 1
        self._without_logon = False
        if not (self._challenged and self.trace is not None and self.trace.result == "pending"):
            self.trace = self._new_trace()
        try:
            choice = self.policy.choose(self.creds, self.parent, self.target_host,
                                        self.target.name)
        except KerberosRejected as e:
            return self._kerberos_logon_rejected(str(e))
        except NoScheme as e:
            if self.target is ORIGIN:
                log.warning("[ntlm] %s", e)
                self._end_attempt()
                self.state = ConnState.REJECTED
                return self._send_plain()
            return self._fail(str(e))
        self.scheme = choice.header
        self._handshake = choice.handshake
        self.trace.chose(choice.handshake.mechanism, choice.header, choice.why)
        token = self._handshake.negotiate()
        if self._handshake.single_leg:
            self.trace.sent_kerberos(token, self._handshake.ticket.principal)
            self.phase = Phase.KERBEROS
        else:
            self.trace.sent_type1(token)
            self.phase = Phase.LEG1
        self._challenge = None
        head = self._first_leg_head()
        leg = self._auth_head(head, token)
        if self._handshake.single_leg:  # a Kerberos AP-REQ is a credential: never shown
            self.trace.sent(wire.set_header(head, self.target.auth_header,
                                            f"{self.scheme} [Kerberos token redacted]"))
        else:
            self.trace.sent(leg)
        return [ToParent(leg), StartTimer(self.generation)]

    def _may_go_without_logon(self) -> bool:
        """See `logon_needs`: the parent may let this request through without a logon."""
        assert self._req is not None
        return self.policy.logon_needs.may_skip_logon(self.parent, self._req)

    def _leg_without_logon(self) -> list[Action]:
        """Ask without credentials, as a browser does: this parent let a new connection
        through without a logon and has not asked one for this host since, so it may let this
        one through too. No pyspnego context and no lockout-guard slot (nothing sent here can
        fail a logon), so a parent that asks nobody to log on is not held to ntlm_max_failures
        connections at a time while the credentials are untried. A 407 starts the legs
        (`_challenged_without_logon`). The handshake timer runs as for a Type 1, so a parent
        gone silent still ends in a 504."""
        self.generation += 1
        self.trace = self._new_trace()
        self.trace.sent_without_logon()
        self._handshake = None
        self._without_logon = True
        self.phase = Phase.LEG1
        head = self._first_leg_head()
        self.trace.sent(head)
        return [ToParent(head), StartTimer(self.generation)]

    def _new_trace(self) -> HandshakeTrace:
        assert self._req is not None and self.creds is not None
        kind = f"{self._req.first[0]} {self._req.first[1]}"
        return HandshakeTrace(self.parent, self.client, kind, principal=self.creds.principal,
                              key=self.trace_key)

    def _first_leg_head(self) -> bytes:
        """The request's head, or a HEAD probe (`_probe`) when the request has a body: nothing
        with side effects goes before the parent has said whether it wants a logon."""
        assert self._req is not None
        has_body = self._req_framer is not None and (
            not self._req_framer.done or bool(self._replay)
        )
        self._probe = has_body and not self.connect_mode
        return wire.probe_head(self._req) if self._probe else self._req.raw

    def _challenged_without_logon(self, head: wire.Head) -> list[Action]:
        """The parent asked for a logon after all: the legs start on this connection once the
        407's body is read (or on a new one if the parent closes it), from the slot on."""
        self._without_logon = False
        self._challenged = True
        return self._skip_body(head, lambda: self._legs_after_407(head))

    def _legs_after_407(self, head: wire.Head) -> list[Action]:
        """The legs after a 407 whose body has been read: on this connection, or on a new one
        when the parent closes it with the 407."""
        if not head.keeps_alive():
            return self._reconnect_or_fail("closed the connection with its 407")
        return self._start_legs()

    def _reserve_attempt(self) -> None:
        """Hold a lockout-guard slot for a logon (to the parent, or to an origin server: a
        browser opens several connections to an intranet site at once) with these credentials,
        from before the first leg until the logon ends (`_end_attempt`)."""
        assert self.creds is not None
        if self._attempt_for == self.creds:
            return
        self._end_attempt()
        self._attempt = self.policy.attempt(self.creds)
        self._attempt_for = self.creds
        self._wait_until = None

    def _end_attempt(self) -> None:
        self.policy.attempt_ended(self._attempt)
        self._attempt = self._attempt_for = None

    def _wait_for_attempt(self, why: str) -> list[Action]:
        """All of the account's slots are taken: look again shortly (the logons in flight end
        within the handshake timeout), and refuse once that has passed."""
        now = time.monotonic()
        if self._wait_until is None:
            self._wait_until = now + self.policy.handshake_timeout
            self._wait_delay = 0.02
            assert self.creds is not None
            log.info("[ntlm] %s -> %s: waiting for the logons in progress for %s",
                     self.client, self.parent, self.creds.principal)
        elif now >= self._wait_until:
            if self.target is ORIGIN:  # the server's own 401 reaches the client
                log.warning("[ntlm] %s -> %s: %s", self.client, self.parent, why)
                self._wait_until = None
                self.state = ConnState.REJECTED
                return self._send_plain()
            return self._fail(f"{why} Try again in a moment.", auth_failure=True)
        else:
            self._wait_delay = min(self._wait_delay * 2, 0.5)
        self.phase = Phase.WAITING
        self.generation += 1
        return [StartTimer(self.generation, delay=self._wait_delay)]

    def _kerberos_logon_rejected(self, reason: str) -> list[Action]:
        """The KDC refused the password: a failed logon, counted like a rejected Type 3."""
        assert self.creds is not None
        text = self.policy.rejected_by_parent(self.creds, self.parent, self.client_id,
                                              what=f"Kerberos: {reason}.")
        if self.trace:
            self.trace.finish("rejected", logging.WARNING)
        if self.target is ORIGIN:
            log.warning("[ntlm] %s", text)
            self._end_attempt()
            self.state = ConnState.REJECTED
            return self._send_plain()
        return self._fail(text, result="rejected", auth_failure=True)

    def _send_leg3(self) -> list[Action]:
        assert self._req is not None and self._handshake is not None and self.trace
        assert isinstance(self._handshake, NtlmHandshake | WinbindHandshake)
        assert self._challenge is not None
        try:
            token = self._handshake.authenticate(self._challenge)
        except ChallengeError as e:
            return self._fail(f"The {self.target.name} {self.parent} sent an unusable NTLM "
                              f"challenge: {e}.")
        except NtlmClientError as e:  # nothing was sent: not a failed logon
            return self._fail(f"{e}.")
        self.trace.sent_type3(token)
        self.trace.sent(wire.set_header(self._req.raw, self.target.auth_header,
                                        f"{self.scheme} [Type 3 redacted: {self.trace.dialect}]"))
        self.phase = Phase.LEG3
        return self._with_body(self._auth_head(self._req.raw, token))

    def _send_plain(self) -> list[Action]:
        """The buffered request without auth (after a probe showed no auth is needed)."""
        assert self._req is not None
        self.phase = Phase.PLAIN
        return self._with_body(self._req.raw)

    # ---------------------------------------------------------------- CONNECT

    def start_connect(self, connect_head: bytes) -> list[Action]:
        """Begin the tunnel handshake for an assembled CONNECT request head."""
        self.connect_mode = True
        try:
            self._req = wire.parse_request_head(connect_head)
        except wire.WireError as e:  # pragma: no cover - mitmproxy assembled it
            return self._fail(f"mitmproxy-ntlm could not read the CONNECT request: {e}")
        self._req_framer = wire.BodyFramer(0)
        self._req_complete = True
        self._replay = bytearray()
        if self.state is ConnState.AUTHENTICATED:  # a pooled connection: no legs unless asked
            self.phase = Phase.PLAIN
            return [ToParent(connect_head)]
        return self._start_legs()

    # ---------------------------------------------------------------- plain http

    def from_child(self, data: bytes) -> list[Action]:
        """Request bytes from mitmproxy's HTTP client layer."""
        if self.state is ConnState.FAILED:
            return []
        self._req_in += data
        out: list[Action] = []
        while self._req_in and self.state is not ConnState.FAILED:
            if self._req is None or self._req_complete:
                try:
                    raw = wire.split_head(self._req_in)
                    if raw is None:
                        break
                    head = wire.parse_request_head(raw)
                    if self.target is PARENT:
                        head = wire.persistent(wire.absolute_form(head))
                    framer = wire.request_framer(head)
                except wire.WireError as e:
                    out += self._fail(f"mitmproxy-ntlm could not read the request: {e}")
                    break
                out += self._begin_request(head, framer)
            else:
                assert self._req_framer is not None
                try:
                    n = self._req_framer.feed(self._req_in)
                except wire.WireError as e:
                    out += self._fail(f"mitmproxy-ntlm could not frame the request body: {e}")
                    break
                chunk = bytes(self._req_in[:n])
                del self._req_in[:n]
                out += self._body(chunk)
                if self._req_framer.done:
                    self._req_complete = True
                    if self._waiting_for_request_end:
                        cont, self._waiting_for_request_end = self._waiting_for_request_end, None
                        out += cont()
        return out

    def _begin_request(self, head: wire.Head, framer: wire.BodyFramer) -> list[Action]:
        self._req = head
        self._req_framer = framer
        self._req_complete = framer.done
        self._replay = bytearray()
        self._resp_in.clear()
        self._passing = False
        self._skip = None
        reuse = self.reuse
        reuse.framer = None
        self._reconnects = 0
        self._scheme_switches = 0
        self._challenged = False
        if reuse.new_connection:
            reuse.new_connection = False
            reuse.reused = False
            self.state = ConnState.UNAUTHENTICATED
            self.phase = Phase.IDLE
            return [Reconnect()]
        if self.state is ConnState.UNAUTHENTICATED:
            return self._start_legs()
        if self.state is ConnState.REJECTED:
            self.phase = Phase.IDLE
            self._passing = True
            return [ToParent(head.raw)]
        if self.state is ConnState.AUTHENTICATED and self._user_changed():
            # This connection is authenticated as someone else: it must not carry the request.
            if not self.can_reconnect:
                return self._fail("This client connection changed users; open a new "
                                  "connection (an https parent cannot be re-authenticated).")
            log.info("[ntlm] %s -> %s: new user on this client connection; new parent "
                     "connection", self.client, self.parent)
            self.state = ConnState.UNAUTHENTICATED
            self.phase = Phase.IDLE
            return [Reconnect()]
        self.phase = Phase.PLAIN
        return [ToParent(head.raw)]

    def _credentials(self) -> Credentials:
        if self.fixed_creds is None:
            return self.policy.credentials(self.client_id)
        principal = self.fixed_creds.principal
        if self.policy.guard.blocked(principal):
            raise AuthUnavailable(f"not logging on to {self.parent} as {principal}: too many "
                                  f"rejections in a row (lockout guard)")
        return self.fixed_creds

    def _user_changed(self) -> bool:
        if not self.policy.multiuser or self.creds is None:
            return False
        current = self.policy.identities.get(self.client_id or "")
        return current is None or current != self.creds

    def _body(self, chunk: bytes) -> list[Action]:
        if not chunk:
            return []
        if self.phase is Phase.WAITING and (self._replay is None or len(self._replay) + len(
                chunk) > self.policy.replay_limit):
            return self._fail(
                f"The request body is larger than ntlm_replay_limit "
                f"({self.policy.replay_limit} bytes), and its logon to {self.parent} waits for "
                f"other logons of the same account to end: mitmproxy-ntlm holds no more of it. "
                f"Try again in a moment.", status=413)
        holding = self.phase is Phase.WAITING or \
            (self.phase in (Phase.LEG1, Phase.KERBEROS) and self._probe)
        if self._replay is not None:
            if holding or len(self._replay) + len(chunk) <= self.policy.replay_limit:
                self._replay += chunk
            else:
                self._replay = None  # too large to replay after a re-challenge
        if holding:
            return []
        return [ToParent(chunk)]

    # ---------------------------------------------------------------- responses

    def from_parent(self, data: bytes) -> list[Action]:
        """Bytes from the parent connection."""
        reuse = self.reuse
        reuse.answered = True
        if self._passing:  # the response body, most bytes: one call per chunk, no helper
            after = reuse.frame(data)
            if not after:
                return [ToChild(data)] if data else []
            return self._stray(after, "after a complete response", data[:-after])
        if self.state is ConnState.FAILED:
            return []
        if self.phase in (Phase.IDLE, Phase.WAITING) and self._skip is None:
            return self._stray(len(data), "with no request outstanding")
        self._resp_in += data
        out: list[Action] = []
        while self._resp_in and not self._passing and self.state is not ConnState.FAILED:
            if self._skip is not None:
                try:
                    n = self._skip.feed(self._resp_in)
                except wire.WireError as e:
                    out += self._fail(f"The {self.target.name} {self.parent} sent a malformed "
                                      f"response body: {e}.")
                    break
                if self.trace is not None and self.phase in _LEG_PHASES:  # e.g. the 407 page
                    self.trace.received_body(self._resp_in[:n], self._skip.done)
                del self._resp_in[:n]
                if not self._skip.done:
                    break
                self._skip = None
                if self._after_skip:
                    cont, self._after_skip = self._after_skip, None
                    out += cont()
                continue
            try:
                raw = wire.split_head(self._resp_in)
            except wire.WireError as e:  # too large: says nothing of the bytes themselves
                out += self._fail(f"The {self.target.name} {self.parent} sent a malformed "
                                  f"response: {e}.")
                break
            if raw is None:
                break
            try:
                head = wire.parse_response_head(raw)
            except wire.WireError as e:
                out += self._unclean_response(e)
                break
            try:
                # Handling includes framing a hidden response's body (e.g. its Content-Length).
                out += self._on_response(head)
            except wire.WireError as e:
                out += self._fail(f"The {self.target.name} {self.parent} sent a malformed "
                                  f"response: {e}.")
                break
            if self.connect_mode and self.state is not ConnState.UNAUTHENTICATED:
                break
        return out

    def _unclean_response(self, error: wire.WireError) -> list[Action]:
        """A response that does not start with a status line, e.g. bytes left over from an
        earlier exchange. They may belong to another request: nobody is shown them
        (`WireError` never quotes bytes). On a connection lent by the pool, a request that is
        safe to repeat (GET, HEAD, OPTIONS: nothing changes if the parent acted on it) is
        sent again on another connection; anything else fails for this client only."""
        self._resp_in.clear()
        reuse = self.reuse
        reuse.saw_stray("bytes where a response should start")
        retry = (reuse.reused and self.phase is Phase.PLAIN and not self.connect_mode
                 and self._req_method().upper() in ("GET", "HEAD", "OPTIONS")
                 and self._req_complete and self._replay is not None
                 and self.can_reconnect and self._reconnects < 1)
        if retry:
            self._reconnects += 1
            log.warning("[ntlm] %s -> %s: the pooled connection answered with bytes that are "
                        "not a response; closed, the %s goes again on another connection",
                        self.client, self.parent, self._req_method())
            reuse.reused = False
            self.state = ConnState.UNAUTHENTICATED
            self.phase = Phase.IDLE
            return [Reconnect()]
        return self._fail(f"The {self.target.name} {self.parent} answered with bytes that are "
                          f"not an HTTP response ({error}); the connection was closed.")

    def _skip_body(self, head: wire.Head, then: Callable[[], list[Action]]) -> list[Action]:
        """Consume the body of a hidden response, then continue with `then`."""
        probing = self._probe and self.phase in (Phase.LEG1, Phase.KERBEROS)
        method = "HEAD" if probing else self._req_method()
        framer = wire.response_framer(head, method)
        if framer.until_close:
            # No framing: the body ends when the parent closes; nothing can follow on it.
            framer = wire.BodyFramer(0)
            then = self._reconnect_instead
        if framer.done:
            return then()
        self._skip, self._after_skip = framer, then
        return []

    def _reconnect_instead(self) -> list[Action]:
        return self._reconnect_or_fail("closes the connection after its 407")

    def _req_method(self) -> str:
        return self._req.first[0] if self._req else "GET"

    def _pass_response(self, head: wire.Head) -> list[Action]:
        self.phase = Phase.IDLE
        if self.connect_mode:
            leftover = bytes(self._resp_in)
            self._resp_in.clear()
            if self.reuse.reused:
                self._mark_reused()
            return [Established(leftover)]
        self._passing = True
        rest = bytes(self._resp_in)
        self._resp_in.clear()
        self.phase = Phase.IDLE
        reuse = self.reuse
        if reuse.track:
            after = reuse.track_response(head, self._req, rest)
            if not after:
                return [ToChild(head.raw), ToChild(rest)] if rest else [ToChild(head.raw)]
            return [ToChild(head.raw),
                    *self._stray(after, "after a complete response", rest[:-after])]
        return [ToChild(head.raw + rest)]

    def _on_response(self, head: wire.Head) -> list[Action]:
        status = head.status
        if self.trace is not None and self.phase in (Phase.LEG1, Phase.LEG3, Phase.KERBEROS):
            self.trace.received(head.raw)
        if self.phase is Phase.LEG1:
            return self._on_leg1_response(head)
        if self.phase is Phase.KERBEROS:
            return self._on_kerberos_response(head)
        if self.phase is Phase.LEG3:
            return self._on_leg3_response(head)
        if self.phase is Phase.PLAIN and status == self.target.status and \
                self.state is not ConnState.REJECTED:  # origin: its 401 is the answer
            return self._on_rechallenge(head)
        if self.connect_mode and not 200 <= status < 300:  # CONNECT on a pooled connection
            return self._fail(f"The {self.target.name} {self.parent} refused the CONNECT: "
                              f"{status} {head.first[2]}".rstrip())
        return self._pass_response(head)

    def _on_leg1_response(self, head: wire.Head) -> list[Action]:
        assert self.trace is not None and self._req is not None
        status = head.status
        if status != self.target.status:
            if self.connect_mode and not 200 <= status < 300:
                return self._fail(f"The {self.target.name} {self.parent} refused the CONNECT: "
                                  f"{status} {head.first[2]}".rstrip())
            self.trace.finish("no auth needed")
            self.policy.record(self.trace_key, self.trace)
            if self.target is PARENT:
                self.policy.logon_needs.let_through(self.parent, self._req)
            self._without_logon = False
            self.state = ConnState.NO_AUTH_NEEDED
            self._end_attempt()
            if self._probe:
                return self._skip_body(head, self._send_plain)
            return self._pass_response(head)
        schemes = wire.offered_schemes(head, self.target.challenge_header)
        self.trace.got_challenge(f"{status} {head.first[2]}".strip(), schemes)
        if self.target is PARENT:
            self.policy.logon_needs.asked(self.parent, self._req, guessed=self._without_logon)
        if self._without_logon:
            assert self.policy.chooser is not None
            self.policy.chooser.learn(self.parent, schemes)  # what the legs may use
            return self._challenged_without_logon(head)
        try:
            challenge = wire.ntlm_challenge(head, self.target.challenge_header, self.scheme)
        except wire.NotOffered:
            assert self.policy.chooser is not None
            self.policy.chooser.learn(self.parent, schemes)  # a bare challenge
            if self._can_switch(schemes):
                return self._switch_scheme(head, f"{self.scheme} is not offered")
            if self.target is ORIGIN:
                log.warning("[ntlm] %s -> %s: the server offers %s, not NTLM/Negotiate; "
                            "passing its %d on", self.client, self.parent,
                            ", ".join(schemes) or "nothing", status)
                self._end_attempt()
                self.state = ConnState.REJECTED
                if self._probe:  # the HEAD probe's answer is not the client's
                    return self._skip_body(head, self._send_plain)
                return self._pass_response(head)
            return self._fail(f"The {self.target.name} {self.parent} does not offer "
                              f"{self.scheme} (it offers: {', '.join(schemes) or 'nothing'}).")
        except wire.WireError as e:
            return self._fail(f"The {self.target.name} {self.parent} sent a malformed "
                              f"{self.scheme} challenge: {e}.")
        if not head.keeps_alive():
            return self._skip_body(head, self._reconnect_instead)
        if challenge is None:
            return self._fail(f"The {self.target.name} {self.parent} answered the NTLM Type 1 "
                              f"without a challenge.")
        try:
            self.trace.got_type2(challenge)
        except Exception:  # pragma: no cover - describe() never raises
            pass
        self._challenge = challenge
        return self._skip_body(head, self._send_leg3)

    def _can_switch(self, schemes: list[str]) -> bool:
        """Another scheme the peer offers may work: one switch per request, never a loop."""
        lowered = {s.lower() for s in schemes}
        return self._scheme_switches < 2 and bool(lowered & {"ntlm", "negotiate"})

    def _switch_scheme(self, head: wire.Head, why: str) -> list[Action]:
        """Start over with the scheme the chooser now picks, on this connection if it stays."""
        self._scheme_switches += 1
        assert self.trace is not None
        self.trace.note("scheme change", why)
        if self._replay is None:
            return self._fail(f"The {self.target.name} {self.parent} refused {why} and the "
                              f"request body was too large to send again (ntlm_replay_limit).")
        if not head.keeps_alive():
            return self._skip_body(head, self._reconnect_instead)
        return self._skip_body(head, self._start_legs)

    def _on_kerberos_response(self, head: wire.Head) -> list[Action]:
        assert self.trace is not None and self.creds is not None
        assert isinstance(self._handshake, KerberosHandshake)
        status = head.status
        if status == self.target.status:
            schemes = wire.offered_schemes(head, self.target.challenge_header)
            self.trace.got_challenge(f"{status} {head.first[2]}".strip(), schemes)
            assert self.policy.chooser is not None
            self.policy.chooser.learn(self.parent, schemes)
            reason = (f"the {self.target.name} did not accept the Kerberos ticket for "
                      f"{self._handshake.spn} (it offers {', '.join(schemes) or 'nothing'})")
            self.policy.chooser.kerberos_refused(self.parent, reason)
            log.warning("[ntlm] %s -> %s: %s", self.client, self.parent, reason)
            if self.creds.can_ntlm and self._can_switch(schemes) and \
                    self.policy.chooser.mode is SchemeMode.AUTO:
                return self._switch_scheme(head, "Kerberos")
            self.trace.finish("rejected", logging.WARNING)
            if self.target is ORIGIN:
                self._end_attempt()
                self.state = ConnState.REJECTED
                if self._probe:
                    return self._skip_body(head, self._send_plain)
                return self._pass_response(head)
            return self._fail(f"The {reason}. Check the ticket (klist) and the service "
                              f"principal (ntlm_kerberos_spn).", result="rejected")
        refused = self._refused_connect(head)
        if refused is not None:
            return refused
        try:
            answer = wire.ntlm_challenge(head, self.target.challenge_header, "Negotiate")
        except wire.WireError:
            answer = None
        if answer is not None and not self._handshake.mutual(answer):
            return self._fail(f"The {self.target.name} {self.parent} answered with a Kerberos "
                              f"token that does not verify (mutual authentication failed).")
        self._mark_authenticated()
        if self._probe:
            return self._skip_body(head, self._send_plain)
        return self._pass_response(head)

    def _on_leg3_response(self, head: wire.Head) -> list[Action]:
        assert self.trace is not None and self.creds is not None
        status = head.status
        if status == self.target.status and self.target is ORIGIN:
            count = self.policy.guard.rejected(self.creds.principal)
            self.trace.finish("rejected", logging.WARNING)
            self.policy.record(self.trace_key, self.trace)
            log.warning("[ntlm] %s -> %s: the server rejected the credentials for %s "
                        "(%s; %d in a row); passing its %d on", self.client, self.parent,
                        self.creds.principal, self.trace.dialect, count, status)
            self._end_attempt()
            self.state = ConnState.REJECTED
            return self._pass_response(head)
        if status == self.target.status:
            text = self.policy.rejected_by_parent(self.creds, self.parent, self.client_id)
            self.trace.finish("rejected", logging.WARNING)
            return self._fail(text, result="rejected", auth_failure=True)
        refused = self._refused_connect(head)
        if refused is not None:
            return refused
        self._mark_authenticated()
        return self._pass_response(head)

    def _refused_connect(self, head: wire.Head) -> list[Action] | None:
        """The parent took the credentials but not the CONNECT: fail with its status."""
        if self.connect_mode and not 200 <= head.status < 300:
            return self._fail(f"The {self.target.name} {self.parent} refused the CONNECT after "
                              f"authentication: {head.status} {head.first[2]}".rstrip())
        return None

    def _mark_authenticated(self) -> None:
        """The last leg (Type 3 or the Kerberos token) was accepted; the time is what flows
        that later reuse this connection from the pool show."""
        assert self.trace is not None and self.creds is not None
        self.state = ConnState.AUTHENTICATED
        self.reuse.authenticated_at = time.time()
        self.policy.accepted(self.creds)
        self._end_attempt()
        self.trace.finish("authenticated")
        self.policy.record(self.trace_key, self.trace)

    def _on_rechallenge(self, head: wire.Head) -> list[Action]:
        if self.state is ConnState.NO_AUTH_NEEDED:
            log.info("[ntlm] %s -> %s: %d on a connection that needed no logon so far",
                     self.client, self.parent, head.status)
            if self.target is PARENT and self._req is not None:
                self.policy.logon_needs.asked(self.parent, self._req, guessed=False)
        else:
            log.info("[ntlm] %s -> %s: re-challenged (%d) on an authenticated connection",
                     self.client, self.parent, head.status)
        if self._replay is None:
            return self._fail(f"The {self.target.name} {self.parent} asked to authenticate again "
                              f"and the request body was too large to send twice "
                              f"(ntlm_replay_limit).")
        self.state = ConnState.UNAUTHENTICATED

        def after_body() -> list[Action]:
            if not self._req_complete:  # the legs replay the body: wait for all of it
                self._waiting_for_request_end = lambda: self._legs_after_407(head)
                return []
            return self._legs_after_407(head)

        return self._skip_body(head, after_body)

    # ---------------------------------------------------------------- connection events

    def _reconnect_or_fail(self, what: str) -> list[Action]:
        if self.can_reconnect and self._reconnects < 1:
            self._reconnects += 1
            log.info("[ntlm] %s -> %s: parent %s; reconnecting", self.client, self.parent, what)
            self.state = ConnState.UNAUTHENTICATED
            self.phase = Phase.IDLE
            return [Reconnect()]
        return self._fail(f"The {self.target.name} {self.parent} {what} (HTTP/1.0 or Connection: "
                          f"close), so NTLM cannot complete: it needs one persistent connection.")

    def reconnected(self, err: str | None) -> list[Action]:
        """The fresh connection asked for by Reconnect is open (or failed with `err`)."""
        self._resp_in.clear()
        self._skip = None
        if err:
            return self._fail(f"Cannot reconnect to the {self.target.name} {self.parent}: {err}")
        return self._start_legs()

    def reconnected_pooled(self, creds: Credentials, authenticated_at: float,
                           uses: int) -> list[Action]:
        """The connection asked for by Reconnect came from the pool: the request goes as it
        is, without legs."""
        assert self._req is not None
        self._resp_in.clear()
        self._skip = None
        self.resume_pooled(creds, authenticated_at, uses)
        self.phase = Phase.PLAIN
        return self._with_body(self._req.raw)

    def parent_closed(self) -> list[Action]:
        """The parent closed the connection; the child sees the close after these actions."""
        if self.state is ConnState.FAILED:
            return []
        handshaking = self.phase in (Phase.LEG1, Phase.LEG3, Phase.KERBEROS) or \
            self._skip is not None
        if handshaking and not self._passing:
            if self._without_logon:  # no handshake has started
                return self._fail(f"The {self.target.name} {self.parent} closed the connection "
                                  f"before answering {self._unanswered()} (sent without "
                                  f"credentials).")
            stage = {Phase.LEG1: "after the Type 1", Phase.KERBEROS: "after the Kerberos token"}\
                .get(self.phase, "after the Type 3")
            return self._fail(f"The {self.target.name} {self.parent} closed the connection during "
                              f"the NTLM handshake ({stage}).")
        return []

    def _unanswered(self) -> str:
        """What a request sent without credentials was, for an error that it got no answer."""
        return "the CONNECT" if self.connect_mode else "the request"

    def internal_error(self) -> list[Action]:
        """A bug in this addon must end in a clear error, not a stuck client."""
        return self._fail("mitmproxy-ntlm hit an internal error; the log has the details.")

    def timed_out(self, generation: int) -> list[Action]:
        if generation == self.generation and self.phase is Phase.WAITING and \
                self.state is not ConnState.FAILED:
            return self._start_legs()  # see _wait_for_attempt
        if generation != self.generation or \
                self.phase not in (Phase.LEG1, Phase.LEG3, Phase.KERBEROS):
            return []
        if self._passing or self.state is ConnState.FAILED:
            return []
        what = self._unanswered() if self._without_logon else "the NTLM handshake"
        return self._fail(f"The {self.target.name} {self.parent} did not answer {what} "
                          f"within {self.policy.handshake_timeout:g} s.", status=504)
