"""A password-checking NTLM parent proxy on loopback, for tests and the demo mode.

Real corporate parents (IIS/ISA/TMG, Squid with winbind) demand NTLM per TCP connection and check
the password at a domain controller. Squid's ``ntlm_fake_auth`` accepts any password, so it cannot
show that the right credentials were used. This parent verifies the NTLM response with pyspnego's
acceptor against a small user table, behaves like IIS/Squid on the wire (407 legs, keep-alive,
connection-bound handshakes) and can inject faults that a real parent might show.

pyspnego's acceptor finds its user table only through the process-global environment variable
``NTLM_USER_FILE`` (read when a context is created and again when the Type 3 is checked). Each
``ParentProxy`` writes its own temporary user file; under a module lock it points
``NTLM_USER_FILE`` at that file right before every acceptor step, so several parents with
different users can run in one process. The variable therefore changes while parents run; the
value found at import time is restored when the last parent using it stops.

Run standalone::

    python -m mitmproxy_ntlm.testing.parent --port 3128 --user 'CORP\\alice:password'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from mitmproxy.http import Request, Response

from ..spnego_internals import spnego
from . import http1

logger = logging.getLogger(__name__)

FAULTS: frozenset[str] = frozenset(
    {
        "close_after_type1",
        "garbage_challenge",
        "truncated_challenge",
        "never_answer",
        "close_407",
        "close_rechallenge",
        "http10_407",
        # a connection that already served a request is closed when the next one arrives,
        # unanswered: the race of a parent dropping an idle connection just as it is reused
        "drop_reused",
        # faults in the answer to a Type 1 (see _send_faulty_challenge)
        "close_mid_body",
        "close_after_type2",
        "truncated_header",
        "oversized_header",
        "slowloris",
        "bogus_type2",
        "switch_to_basic",
        "switch_to_negotiate",
        # bytes outside a framed response, `stray_delay` after each forwarded response (the
        # next request may be on its way by then): a second, unsolicited response naming the
        # request it followed, or the tail of a body longer than its Content-Length
        "stray_response",
        "overlong_body",
    }
)
_STRAY_FAULTS = frozenset({"stray_response", "overlong_body"})

_NTLM_SIGNATURE = b"NTLMSSP\x00"
_CHALLENGE_FAULTS = frozenset({"close_mid_body", "close_after_type2", "truncated_header",
                               "oversized_header", "slowloris", "bogus_type2",
                               "switch_to_basic", "switch_to_negotiate"})
_MAX_LINE = 64 * 1024
_MAX_HEAD = 256 * 1024
_IO_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 10.0
_HALF_CLOSED_TIMEOUT = 30.0  # a tunnel closed one way waits this long for the other
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)

_ENV_LOCK = threading.Lock()
_ORIGINAL_USER_FILE = os.environ.get("NTLM_USER_FILE")


class RequestRecord(NamedTuple):
    """One request the parent forwarded (or answered as demo), for test assertions."""

    conn_id: int
    user: str | None
    method: str
    target: str


@dataclass(frozen=True)
class ParentStats:
    """A consistent copy of the counters, taken under the stats lock."""

    connections: int
    type1_count: int
    type3_count: int
    accepted_count: int
    rejected_count: int
    basic_count: int
    requests: tuple[RequestRecord, ...]
    handshakes_per_connection: dict[int, int]


_BadRequest = http1.BadMessage
"""The client sent something that is not HTTP/1.x we can frame: answer 400 and close."""


@dataclass
class _Head:
    """A parsed request or response head; header order and case are kept for forwarding."""

    first_line: str
    parts: list[str]
    headers: list[tuple[str, str]]
    message: Request | Response  # as mitmproxy parsed it, for `http1.body_size`

    def get(self, name: str) -> str | None:
        """Return the first value of a header, so callers do not care about repeats."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Return every value of a header (e.g. several Transfer-Encoding lines)."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of a list header, lower-cased, for Connection-like headers."""
        out: set[str] = set()
        for v in self.get_all(name):
            out.update(t.strip().lower() for t in v.split(",") if t.strip())
        return out


@dataclass
class _Framing:
    """How a message body is delimited on the wire."""

    kind: str  # "none" | "length" | "chunked" | "eof"
    length: int = 0


@dataclass
class _ConnState:
    """Per-connection NTLM state: NTLM authenticates the TCP connection, not the request."""

    conn_id: int
    user: str | None = None
    ctx: Any = None
    forwarded_since_auth: int = 0
    forwarded_total: int = 0
    sent_first_407: bool = False
    # Origin connections pinned to this client connection once NTLM/Negotiate was sent to the
    # origin (Squid's connection-auth): the origin's logon is bound to its connection too.
    pinned: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        field(default_factory=dict))


async def _read_head(reader: asyncio.StreamReader, *, request: bool) -> _Head | None:
    """Read one message head; None on a clean EOF before any byte of it."""
    lines = await http1.read_head_lines(reader, request=request, max_head=_MAX_HEAD)
    if lines is None:
        return None
    first = lines[0].decode("latin-1")
    parts = first.split(" ", 2)
    if request:
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
            raise _BadRequest(f"bad request line {first[:80]!r}")
    elif len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _BadRequest(f"bad status line {first[:80]!r}")
    for line in lines[1:]:  # stricter than mitmproxy: no folded lines, no blanks in names
        name = line.partition(b":")[0]
        if not name or name != name.strip() or b" " in name:
            raise _BadRequest(f"bad header line {line[:80]!r}")
    message = http1.parse_request(lines) if request else http1.parse_response(lines)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.headers.fields]
    return _Head(first, parts, headers, message)


def _framing(size: int | None) -> _Framing:
    if size is None:
        return _Framing("chunked")
    if size == -1:
        return _Framing("eof")
    return _Framing("length", size) if size else _Framing("none")


def _request_framing(head: _Head) -> _Framing:
    """Body framing of a request (RFC 9112 6.3): chunked wins, else Content-Length, else none."""
    size = http1.body_size(head.message)
    if size == -1:  # mitmproxy reads such a request to the end of the connection
        raise _BadRequest("request Transfer-Encoding without final chunked")
    return _framing(size)


def _response_framing(head: _Head, request_method: str) -> _Framing:
    """Body framing of a response, which also depends on the request method and status."""
    return _framing(http1.body_size(head.message, request_method))


async def _iter_body(reader: asyncio.StreamReader, framing: _Framing) -> AsyncIterator[bytes]:
    """Yield a body's raw wire bytes (chunked framing kept intact) so it can be relayed as is."""
    size = {"none": 0, "length": framing.length, "chunked": None, "eof": -1}[framing.kind]
    async for data in http1.iter_body(reader, size):
        yield data


async def _discard_body(reader: asyncio.StreamReader, framing: _Framing) -> None:
    """Read and drop a body so the next request on a kept-alive connection starts cleanly."""
    async for _ in _iter_body(reader, framing):
        pass


def _parse_authority(authority: str, default_port: int) -> tuple[str, int]:
    """Split "host:port" (IPv6 in brackets) for CONNECT targets and absolute URLs."""
    parsed = urlsplit("//" + authority)
    if not parsed.hostname:
        raise _BadRequest(f"bad authority {authority[:80]!r}")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise _BadRequest(f"bad port in {authority[:80]!r}") from None
    return parsed.hostname, port


class ParentProxy:
    """An HTTP/1.1 forward proxy that demands NTLM per connection and checks passwords."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        require_auth: bool = True,
        fault: str | None = None,
        rechallenge_after: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        demo_host: str | None = "ntlm-demo.invalid",
        idle_timeout: float | None = None,
        scheme: str = "NTLM",
        open_hosts: tuple[str, ...] = (),
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(FAULTS)}")
        if rechallenge_after is not None and rechallenge_after < 1:
            raise ValueError("rechallenge_after must be >= 1")
        for name, password in (users or {}).items():
            if ":" in name or ":" in password or "\n" in name + password:
                raise ValueError("user names and passwords must not contain ':' or newlines")
        self.users: dict[str, str] = dict(users or {})
        self.require_auth = require_auth
        # Hosts served without a logon even when require_auth is on (Squid's
        # `http_access allow` by dstdomain before the rule that asks for one).
        self.open_hosts = frozenset(h.lower() for h in open_hosts)
        self.fault = fault
        self.rechallenge_after = rechallenge_after
        self.host = host
        self.port = port
        self.demo_host = demo_host.lower() if demo_host else None
        # Close a keep-alive connection that waits longer than this for its next request
        # (Squid's client_idle_pconn_timeout), as real parents do with idle pooled connections.
        self.idle_timeout = idle_timeout
        # The one scheme word offered and accepted: "Negotiate" is a Negotiate-only parent
        # that takes raw NTLMSSP in it (Squid's negotiate_wrapper, IIS).
        self.scheme = scheme
        self._waiting: set[asyncio.StreamWriter] = set()  # connections between requests
        self.idle_closed = 0
        self.stray_delay = 0.1  # faults stray_response / overlong_body: seconds after a response

        self._lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._connections = 0
        self._type1_count = 0
        self._type3_count = 0
        # Every Type 3 received, base64 as on the wire: tests search logs and flows for them.
        self.type3_tokens: list[str] = []
        # Every Proxy-Authorization that is not an NTLM/Negotiate token (e.g. a client's Basic
        # header that mitmproxy should have dropped), authenticated connection or not.
        self.other_proxy_credentials: list[str] = []
        self._accepted_count = 0
        self._rejected_count = 0
        self._basic_count = 0
        self._requests: list[RequestRecord] = []
        self._handshakes: dict[int, int] = {}

        self._user_file: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._start_error: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Proxy URL to hand to clients (``-x`` for curl, ``upstream:`` for mitmproxy)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ParentProxy:
        """Listen in a daemon thread with its own event loop; return once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("ParentProxy already started")
        if self.require_auth:
            self._write_user_file()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="ParentProxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._start_error is not None:
            err = self._start_error
            self.stop()
            raise RuntimeError(f"ParentProxy failed to start: {err!r}") from err
        logger.debug("parent listening on %s (auth=%s)", self.url, self.require_auth)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, join the thread, remove the user file."""
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(15)
        self._thread = None
        self._loop = None
        if self._user_file is not None:
            with _ENV_LOCK:
                if os.environ.get("NTLM_USER_FILE") == self._user_file:
                    if _ORIGINAL_USER_FILE is None:
                        os.environ.pop("NTLM_USER_FILE", None)
                    else:
                        os.environ["NTLM_USER_FILE"] = _ORIGINAL_USER_FILE
            with contextlib.suppress(OSError):
                os.unlink(self._user_file)
            self._user_file = None

    def __enter__(self) -> ParentProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        """Thread body: bind, signal readiness, serve until stop(), then tear everything down."""
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_client, self.host, self.port, limit=_MAX_LINE)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:
            self._start_error = e
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        """Cancel all connection handlers (which close their sockets) and the listener."""
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def _write_user_file(self) -> None:
        """Write pyspnego's Heimdal-format user table ("DOMAIN:USER:PASSWORD"), mode 0600."""
        fd, path = tempfile.mkstemp(prefix="ntlm-users-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name, password in self.users.items():
                domain, sep, user = name.rpartition("\\")
                f.write(f"{domain if sep else ''}:{user}:{password}\n")
        self._user_file = path

    def close_idle(self) -> int:
        """Close every connection that waits for its next request (a parent dropping idle
        keep-alive connections); returns how many were closed."""
        assert self._loop is not None

        async def close() -> int:
            writers = list(self._waiting)
            for w in writers:
                w.close()
            with self._lock:
                self.idle_closed += len(writers)
            return len(writers)

        return asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)

    # ----------------------------------------------------------------- stats

    def snapshot(self) -> ParentStats:
        """Copy all counters at once, so a test compares values from the same moment."""
        with self._lock:
            return ParentStats(
                connections=self._connections,
                type1_count=self._type1_count,
                type3_count=self._type3_count,
                accepted_count=self._accepted_count,
                rejected_count=self._rejected_count,
                basic_count=self._basic_count,
                requests=tuple(self._requests),
                handshakes_per_connection=dict(self._handshakes),
            )

    def reset_stats(self) -> None:
        """Zero all counters (connection ids keep counting, so records stay unambiguous)."""
        with self._lock:
            self._connections = 0
            self._type1_count = 0
            self._type3_count = 0
            self._accepted_count = 0
            self._rejected_count = 0
            self._basic_count = 0
            self._requests.clear()
            self._handshakes.clear()

    @property
    def connections(self) -> int:
        """TCP connections accepted."""
        with self._lock:
            return self._connections

    @property
    def type1_count(self) -> int:
        """NTLM Type 1 (negotiate) messages received."""
        with self._lock:
            return self._type1_count

    @property
    def type3_count(self) -> int:
        """NTLM Type 3 (authenticate) messages received."""
        with self._lock:
            return self._type3_count

    @property
    def accepted_count(self) -> int:
        """Type 3 messages that verified: successful logons."""
        with self._lock:
            return self._accepted_count

    @property
    def rejected_count(self) -> int:
        """Type 3 messages that failed: each would be a failed logon at a real DC."""
        with self._lock:
            return self._rejected_count

    @property
    def basic_count(self) -> int:
        """Requests that offered Basic credentials (never accepted): a client must not do this."""
        with self._lock:
            return self._basic_count

    @property
    def requests(self) -> list[RequestRecord]:
        """Copy of the forwarded/demo request records."""
        with self._lock:
            return list(self._requests)

    @property
    def handshakes_per_connection(self) -> dict[int, int]:
        """Copy of Type 1 counts keyed by connection id."""
        with self._lock:
            return dict(self._handshakes)

    # ----------------------------------------------------------------- NTLM

    def _acceptor_step(self, ctx: Any, token: bytes) -> tuple[Any, bytes | None]:
        """Run one acceptor step with NTLM_USER_FILE pointing at this parent's users."""
        assert self._user_file is not None
        with _ENV_LOCK:
            if os.environ.get("NTLM_USER_FILE") != self._user_file:
                os.environ["NTLM_USER_FILE"] = self._user_file
            if ctx is None:
                ctx = spnego.server(hostname="testparent", service="http", protocol="ntlm")
            return ctx, ctx.step(token)

    # ----------------------------------------------------------------- connection

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection: a loop of requests until close, error or stop()."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            conn_id = next(self._conn_ids)
        st = _ConnState(conn_id)
        logger.debug("conn %d: accepted from %s", conn_id, writer.get_extra_info("peername"))
        try:
            if self.fault == "never_answer":
                while await reader.read(_IO_CHUNK):
                    pass
                await asyncio.Event().wait()  # never close either; stop() cancels us
            while True:
                self._waiting.add(writer)
                try:
                    if self.idle_timeout is not None and st.forwarded_total:
                        async with asyncio.timeout(self.idle_timeout):
                            head = await _read_head(reader, request=True)
                    else:
                        head = await _read_head(reader, request=True)
                except TimeoutError:
                    logger.debug("conn %d: idle for %g s: closing", conn_id, self.idle_timeout)
                    with self._lock:
                        self.idle_closed += 1
                    break
                except _BadRequest as e:
                    logger.debug("conn %d: bad request: %s", conn_id, e)
                    await self._send_simple(writer, 400, "Bad Request", str(e), keep=False)
                    break
                finally:
                    self._waiting.discard(writer)
                if head is None:
                    break
                if self.fault == "drop_reused" and st.forwarded_total:
                    logger.debug("conn %d: fault drop_reused: closing unanswered", conn_id)
                    break
                forwarded = st.forwarded_total
                try:
                    keep = await self._handle_request(st, head, reader, writer)
                except _BadRequest as e:
                    logger.debug("conn %d: bad request: %s", conn_id, e)
                    with contextlib.suppress(Exception):
                        await self._send_simple(writer, 400, "Bad Request", str(e), keep=False)
                    break
                if not keep:
                    break
                if self.fault in _STRAY_FAULTS and st.forwarded_total > forwarded:
                    await self._send_stray(writer, head)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            logger.debug("conn %d: connection ended: %r", conn_id, e)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.debug("conn %d: unexpected error", conn_id, exc_info=True)
        finally:
            for _, pinned_writer in st.pinned.values():
                await _close_writer(pinned_writer)
            await _close_writer(writer)
            self._tasks.discard(task)
            logger.debug("conn %d: closed", conn_id)

    async def _handle_request(
        self,
        st: _ConnState,
        head: _Head,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Handle one request; return whether the client connection stays open."""
        method, target, version = head.parts
        framing = _request_framing(head)
        conn_tokens = head.tokens("Connection") | head.tokens("Proxy-Connection")
        if version == "HTTP/1.0":
            keep = "keep-alive" in conn_tokens
        else:
            keep = "close" not in conn_tokens
        logger.debug("conn %d: %s %s %s", st.conn_id, method, target, version)
        for value in head.get_all("Proxy-Authorization"):
            if value.split(" ")[0].lower() not in ("ntlm", "negotiate"):
                with self._lock:
                    self.other_proxy_credentials.append(value)

        if method != "CONNECT" and not target.lower().startswith("http://"):
            await self._expect_continue(head, framing, writer)
            await _discard_body(reader, framing)
            msg = "This is a proxy: send absolute-form http:// requests or CONNECT.\n"
            await self._send_simple(writer, 400, "Bad Request", msg, keep=keep)
            return keep

        if self.require_auth and not self._open_for(method, target):
            verdict = await self._authenticate(st, head, framing, reader, writer, keep)
            if verdict is not None:
                return verdict

        if method == "CONNECT":
            return await self._connect(st, head, framing, reader, writer, keep)
        url = urlsplit(target)
        if self.demo_host and (url.hostname or "").lower() == self.demo_host:
            return await self._demo(st, head, framing, reader, writer, keep)
        return await self._forward(st, head, framing, reader, writer, keep)

    def _open_for(self, method: str, target: str) -> bool:
        if not self.open_hosts:
            return False
        try:
            host = urlsplit(f"//{target}" if method == "CONNECT" else target).hostname
        except ValueError:
            return False
        return (host or "") in self.open_hosts

    async def _authenticate(
        self,
        st: _ConnState,
        head: _Head,
        framing: _Framing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool | None:
        """Run the NTLM legs; None lets the request through, a bool means a 407 went out."""
        cid = st.conn_id
        rechallenged = False
        if (
            st.user is not None
            and self.rechallenge_after is not None
            and st.forwarded_since_auth >= self.rechallenge_after
        ):
            logger.debug("conn %d: re-challenging after %d requests", cid, st.forwarded_since_auth)
            st.user, st.ctx, st.forwarded_since_auth = None, None, 0
            rechallenged = True

        auth = head.get("Proxy-Authorization") or ""
        scheme, _, token = auth.strip().partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if self.scheme != "NTLM" and scheme in ("ntlm", self.scheme.lower()):
            scheme = "ntlm" if scheme == self.scheme.lower() else "not offered"
        raw = b""
        if scheme == "ntlm" and token:
            try:
                raw = base64.b64decode(token, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
        msg_type = int.from_bytes(raw[8:12], "little") if raw[:8] == _NTLM_SIGNATURE else 0

        if st.user is not None:
            if msg_type != 1:
                return None  # authenticated connection: stray headers are ignored
            logger.debug("conn %d: new Type 1 on an authenticated connection: restart", cid)
            st.user = None

        if scheme != "ntlm":
            if scheme == "basic":
                with self._lock:
                    self._basic_count += 1
                logger.debug("conn %d: Basic credentials offered: refused", cid)
            close = (self.fault == "close_407" and not st.sent_first_407) or (
                self.fault == "close_rechallenge" and rechallenged
            )
            return await self._send_407(
                st, writer, head, framing, reader, keep, ["NTLM", 'Basic realm="test"'], close=close
            )

        if msg_type == 1:
            with self._lock:
                self._type1_count += 1
                self._handshakes[cid] = self._handshakes.get(cid, 0) + 1
            logger.debug("conn %d: Type 1 received", cid)
            if self.fault == "close_after_type1":
                logger.debug("conn %d: fault close_after_type1: closing", cid)
                return False
            st.ctx = None
            if self.fault == "garbage_challenge":
                challenge = b"\x00GARBAGE" + secrets.token_bytes(40)
            else:
                try:
                    st.ctx, challenge_or_none = self._acceptor_step(None, raw)
                except Exception as e:
                    logger.debug("conn %d: bad Type 1: %r", cid, e)
                    return await self._send_407(st, writer, head, framing, reader, keep, ["NTLM"])
                challenge = challenge_or_none or b""
                if self.fault == "truncated_challenge":
                    challenge = challenge[:20]
            value = "NTLM " + base64.b64encode(challenge).decode()
            if self.fault in _CHALLENGE_FAULTS:
                await _discard_body(reader, framing)
                return await self._send_faulty_challenge(writer, value)
            return await self._send_407(st, writer, head, framing, reader, keep, [value])

        if msg_type == 3:
            with self._lock:
                self._type3_count += 1
                self.type3_tokens.append(token)
            ctx, st.ctx = st.ctx, None
            user: str | None = None
            if ctx is None:
                logger.debug("conn %d: Type 3 without a Type 1 on this connection", cid)
            else:
                try:
                    ctx, _ = self._acceptor_step(ctx, raw)
                    user = ctx.client_principal if ctx.complete else None
                except Exception as e:
                    logger.debug("conn %d: Type 3 rejected: %s", cid, type(e).__name__)
            if user is None:
                with self._lock:
                    self._rejected_count += 1
                return await self._send_407(st, writer, head, framing, reader, keep, ["NTLM"])
            with self._lock:
                self._accepted_count += 1
            st.user, st.forwarded_since_auth = user, 0
            logger.debug("conn %d: authenticated as %s", cid, user)
            return None

        logger.debug("conn %d: unusable NTLM token (type %d)", cid, msg_type)
        return await self._send_407(st, writer, head, framing, reader, keep, ["NTLM"])

    async def _send_407(
        self,
        st: _ConnState,
        writer: asyncio.StreamWriter,
        head: _Head,
        framing: _Framing,
        reader: asyncio.StreamReader,
        keep: bool,
        challenges: list[str],
        *,
        close: bool = False,
    ) -> bool:
        """Drain the request body, then answer 407 with one Proxy-Authenticate line each."""
        st.sent_first_407 = True
        await self._expect_continue(head, framing, writer)
        await _discard_body(reader, framing)
        version = "HTTP/1.1"
        if self.fault == "http10_407":
            version, close = "HTTP/1.0", True
        keep = keep and not close
        headers = [("Proxy-Authenticate", self.scheme + c[4:] if c.startswith("NTLM") else c)
                   for c in challenges]
        body = "Proxy authentication required.\n"
        await self._send_simple(
            writer,
            407,
            "Proxy Authentication Required",
            body,
            keep=keep,
            extra=headers,
            version=version,
            head_only=head.parts[0] == "HEAD",
        )
        return keep

    async def _send_faulty_challenge(self, writer: asyncio.StreamWriter, value: str) -> bool:
        """Answer a Type 1 the way a broken parent would; returns whether to keep the connection."""
        fault = self.fault
        status = b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        if fault == "switch_to_basic":
            value = 'Basic realm="corp"'
        elif fault == "switch_to_negotiate":
            value = "Negotiate " + base64.b64encode(secrets.token_bytes(40)).decode()
        elif fault == "bogus_type2":
            bogus = (_NTLM_SIGNATURE + (2).to_bytes(4, "little") + (8).to_bytes(2, "little") * 2
                     + (0xFFFFFF00).to_bytes(4, "little") + secrets.token_bytes(4)
                     + secrets.token_bytes(8) + b"\x00" * 8 + (500).to_bytes(2, "little") * 2
                     + (0xFFFF0000).to_bytes(4, "little"))
            value = "NTLM " + base64.b64encode(bogus).decode()
        head = status + b"Proxy-Authenticate: " + value.encode() + b"\r\n"
        if fault == "oversized_header":
            head += b"X-Padding: " + b"a" * 100_000 + b"\r\n"
        if fault == "close_mid_body":
            writer.write(head + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
            await writer.drain()
            return False
        response = head + b"Content-Length: 0\r\n\r\n"
        if fault in ("close_after_type2", "truncated_header"):
            # a complete keep-alive 407 with the challenge, then gone; or half a head, then gone
            writer.write(response if fault == "close_after_type2" else head[: len(head) // 2])
            await writer.drain()
            return False
        if fault == "slowloris":
            for i in range(len(response)):
                writer.write(response[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.3)
            return True
        writer.write(response)
        await writer.drain()
        return True

    async def _send_stray(self, writer: asyncio.StreamWriter, head: _Head) -> None:
        """Faults stray_response / overlong_body: bytes that belong to no request, quoting the
        request they followed (a test looks for them at the next client)."""
        await asyncio.sleep(self.stray_delay)
        what = f"{head.parts[0]} {head.parts[1]}".encode("latin-1")
        if self.fault == "stray_response":
            body = b"stray response after " + what + b"\n"
            stray = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"Connection: keep-alive\r\n\r\n%b" % (len(body), body))
        else:
            stray = b"tail of the body of " + what + b"\r\n"
        writer.write(stray)
        await writer.drain()

    async def _expect_continue(
        self, head: _Head, framing: _Framing, writer: asyncio.StreamWriter
    ) -> None:
        """Send 100 Continue when the client waits for it, so its body can be read or drained."""
        has_body = framing.kind == "chunked" or framing.length > 0
        if has_body and "100-continue" in head.tokens("Expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

    async def _send_simple(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        reason: str,
        body: str,
        *,
        keep: bool,
        extra: list[tuple[str, str]] | None = None,
        version: str = "HTTP/1.1",
        head_only: bool = False,
    ) -> None:
        """Write a small complete response with Content-Length framing."""
        data = body.encode()
        lines = [f"{version} {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in extra or []]
        lines += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(data)}",
            "Connection: keep-alive" if keep else "Connection: close",
            "Proxy-Connection: keep-alive" if keep else "Proxy-Connection: close",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(data)
        await writer.drain()

    def _record(self, st: _ConnState, method: str, target: str) -> None:
        """Count a forwarded request for the stats and for the re-challenge counter."""
        st.forwarded_since_auth += 1
        st.forwarded_total += 1
        with self._lock:
            self._requests.append(RequestRecord(st.conn_id, st.user, method, target))

    # ----------------------------------------------------------------- forwarding

    async def _demo(
        self,
        st: _ConnState,
        head: _Head,
        framing: _Framing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        """Answer requests for the demo host locally, so a demo needs no internet."""
        await self._expect_continue(head, framing, writer)
        await _discard_body(reader, framing)
        self._record(st, head.parts[0], head.parts[1])
        if st.user:
            who = f"NTLM authentication to the parent proxy worked.\nAuthenticated as: {st.user}\n"
        else:
            who = "This parent proxy does not require authentication (require_auth=False).\n"
        body = (
            "mitmproxy-ntlm demo page, served by the test parent proxy.\n"
            f"{who}Parent connection {st.conn_id}, request {st.forwarded_total} on it.\n"
        )
        await self._send_simple(
            writer, 200, "OK", body, keep=keep, head_only=head.parts[0] == "HEAD"
        )
        return keep

    async def _connect(
        self,
        st: _ConnState,
        head: _Head,
        framing: _Framing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        """Open the tunnel, answer 200 and relay bytes both ways until one side closes."""
        await _discard_body(reader, framing)
        host, port = _parse_authority(head.parts[1], 443)
        self._record(st, "CONNECT", head.parts[1])
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), _CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError) as e:
            logger.debug("conn %d: CONNECT %s failed: %r", st.conn_id, head.parts[1], e)
            await self._send_simple(writer, 502, "Bad Gateway", f"connect failed: {e}\n", keep=keep)
            return keep
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            pumps = [
                asyncio.ensure_future(_pump(reader, up_writer)),
                asyncio.ensure_future(_pump(up_reader, writer)),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                if all(p.result() for p in done):  # a half close: the other way may go on
                    await asyncio.wait(pumps, timeout=_HALF_CLOSED_TIMEOUT)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            await _close_writer(up_writer)
        return False

    async def _forward(
        self,
        st: _ConnState,
        head: _Head,
        framing: _Framing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        """Send the request origin-form and relay the response: on a fresh origin connection,
        or on the one pinned to this client connection once origin NTLM/Negotiate is in use."""
        method, target, _ = head.parts
        url = urlsplit(target)
        host, port = _parse_authority(url.netloc.rpartition("@")[2], 80)
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        self._record(st, method, target)

        drop = _HOP_BY_HOP | head.tokens("Connection") | head.tokens("Proxy-Connection")
        drop |= {"host"}  # RFC 9112 3.2.2: the absolute URL's authority wins over Host
        out_headers = [(k, v) for k, v in head.headers if k.lower() not in drop]
        out_headers.insert(0, ("Host", url.netloc.rpartition("@")[2]))
        scheme = (head.get("Authorization") or "").split(" ")[0].lower()
        pin = (host, port) in st.pinned or scheme in ("ntlm", "negotiate")
        out_headers.append(("Connection", "keep-alive" if pin else "close"))
        out_head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in out_headers
        )

        await self._expect_continue(head, framing, writer)
        try:
            if (host, port) in st.pinned:
                up_reader, up_writer = st.pinned.pop((host, port))
            else:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=_MAX_LINE), _CONNECT_TIMEOUT
                )
        except (TimeoutError, OSError) as e:
            logger.debug("conn %d: origin %s:%d unreachable: %r", st.conn_id, host, port, e)
            await _discard_body(reader, framing)
            await self._send_simple(writer, 502, "Bad Gateway", f"connect failed: {e}\n", keep=keep)
            return keep
        try:
            body_done = False
            try:
                up_writer.write(out_head.encode("latin-1") + b"\r\n")
                async for piece in _iter_body(reader, framing):
                    up_writer.write(piece)
                    await up_writer.drain()
                body_done = True
                await up_writer.drain()
                while True:
                    resp = await _read_head(up_reader, request=False)
                    if resp is None:
                        raise ConnectionError("origin closed without a response")
                    status = int(resp.parts[1])
                    if not (100 <= status < 200) or status == 101:
                        break  # informational responses are not relayed
            except (OSError, _BadRequest, asyncio.IncompleteReadError) as e:
                if not body_done:
                    raise  # client stream position unknown: the connection ends
                logger.debug("conn %d: origin failed: %r", st.conn_id, e)
                await self._send_simple(writer, 502, "Bad Gateway", f"origin: {e}\n", keep=keep)
                return keep
            keep = await self._relay_response(head, resp, up_reader, writer, keep)
            reusable = (pin and _response_framing(resp, method).kind != "eof"
                        and "close" not in resp.tokens("Connection"))
            if reusable:
                st.pinned[(host, port)] = (up_reader, up_writer)
            return keep
        finally:
            if st.pinned.get((host, port), (None, None))[1] is not up_writer:
                await _close_writer(up_writer)

    async def _relay_response(
        self,
        req: _Head,
        resp: _Head,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        """Stream the origin's response to the client with correct framing for keep-alive."""
        framing = _response_framing(resp, req.parts[0])
        drop = _HOP_BY_HOP | resp.tokens("Connection")
        headers = [(k, v) for k, v in resp.headers if k.lower() not in drop]
        rechunk = framing.kind == "eof" and req.parts[2] != "HTTP/1.0"
        if framing.kind == "eof" and not rechunk:
            keep = False  # an HTTP/1.0 client knows no chunked: the body ends with the connection
        if rechunk:  # close-delimited origin body: re-frame as chunked to keep the client alive
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
            headers.append(("Transfer-Encoding", "chunked"))
        headers.append(("Connection", "keep-alive" if keep else "close"))
        reason = resp.parts[2] if len(resp.parts) > 2 else ""
        out = f"HTTP/1.1 {resp.parts[1]} {reason}\r\n"
        out += "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(out.encode("latin-1") + b"\r\n")
        try:
            async for piece in _iter_body(up_reader, framing):
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if rechunk else piece)
                await writer.drain()
        except (asyncio.IncompleteReadError, _BadRequest, OSError) as e:
            logger.debug("origin response broken: %r", e)
            return False  # the client sees a truncated body; the connection must end
        if rechunk:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> bool:
    """Copy bytes one way (one half of a CONNECT tunnel); True when it ended with an EOF,
    which is passed on as a half close."""
    try:
        while data := await src.read(_IO_CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
        return True
    except (OSError, asyncio.IncompleteReadError):
        return False


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream without letting an already-broken socket raise."""
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)


def _parse_user(spec: str) -> tuple[str, str]:
    """Split a CLI ``DOMAIN\\user:password`` spec at the first colon."""
    name, sep, password = spec.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected DOMAIN\\user:password")
    return name, password


def main(argv: list[str] | None = None) -> int:
    """CLI: run a parent until Ctrl-C, for manual tries with curl or mitmproxy."""
    parser = argparse.ArgumentParser(
        prog="python -m mitmproxy_ntlm.testing.parent",
        description="Loopback HTTP proxy that demands NTLM and checks passwords (for testing).",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one)")
    parser.add_argument(
        "--user",
        action="append",
        type=_parse_user,
        default=[],
        metavar="'DOMAIN\\user:password'",
        help="accepted account (repeatable)",
    )
    parser.add_argument("--no-auth", action="store_true", help="forward without authentication")
    parser.add_argument("--open-host", action="append", default=[], metavar="HOST",
                        help="serve this host without authentication (repeatable)")
    parser.add_argument("--fault", choices=sorted(FAULTS), help="misbehave on purpose")
    parser.add_argument("--rechallenge-after", type=int, metavar="N")
    parser.add_argument("--demo-host", default="ntlm-demo.invalid")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        help="close keep-alive connections idle this long")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not args.user and not args.no_auth:
        parser.error("give at least one --user, or --no-auth")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    proxy = ParentProxy(
        dict(args.user),
        require_auth=not args.no_auth,
        fault=args.fault,
        rechallenge_after=args.rechallenge_after,
        port=args.port,
        demo_host=args.demo_host or None,
        idle_timeout=args.idle_timeout,
        open_hosts=tuple(args.open_host),
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with proxy:
        print(proxy.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
