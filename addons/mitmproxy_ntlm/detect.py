"""Find the strongest NTLM dialect a parent proxy accepts (like `cntlm -M`).

Each try is a real logon: Type 1 in a GET for a test URL, the parent's 407 with the Type 2,
then the Type 3 on the same connection. A rejected Type 3 is a failed logon at the domain
controller, so by default the search stops at the first rejection.
Plain blocking sockets: this runs once, from the command line, outside mitmproxy.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .credentials import Credentials
from .handshake import ChallengeError, Dialect, NtlmHandshake, quiet_spnego_logs
from .wire import (
    Head,
    NotOffered,
    WireError,
    b64,
    ntlm_challenge,
    offered_schemes,
    parse_response_head,
    response_framer,
    split_head,
)

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds for connecting and for each read: a parent that hangs must not hang the command."""


class DetectError(Exception):
    """Detection cannot go on; the message is one line meant for the user."""


class SchemeNotOffered(DetectError):
    """The parent's 407 does not offer the scheme tried; `offered` lists what it offers."""

    def __init__(self, message: str, offered: list[str]) -> None:
        super().__init__(message)
        self.offered = offered


@dataclass(frozen=True)
class Attempt:
    """The outcome of one dialect: accepted (status is the parent's answer) or rejected."""

    dialect: Dialect
    accepted: bool
    status: int
    scheme: str = "NTLM"  # "Negotiate": NTLM inside Negotiate, for a Negotiate-only parent


def parse_parent(parent: str) -> tuple[str, int]:
    """`http://host:port` or cntlm's `host:port` -> (host, port)."""
    url = urlsplit(parent if "://" in parent else f"http://{parent}")
    if url.scheme != "http":
        raise DetectError(f"parent {parent!r}: only http:// parent proxies are supported")
    try:
        port = url.port or 8080
    except ValueError:
        raise DetectError(f"parent {parent!r}: bad port") from None
    if not url.hostname:
        raise DetectError(f"parent {parent!r}: no host name")
    return url.hostname, port


class _Connection:
    """One TCP connection to the parent with just enough HTTP/1 to read whole responses."""

    def __init__(self, host: str, port: int) -> None:
        self.where = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        except TimeoutError:
            raise DetectError(f"parent {self.where} unreachable: no answer within "
                              f"{TIMEOUT:.0f} s") from None
        except OSError as e:
            raise DetectError(f"parent {self.where} unreachable: {e.strerror or e}") from None
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise DetectError(f"parent {self.where} did not answer within "
                              f"{TIMEOUT:.0f} s") from None
        except OSError as e:
            raise DetectError(f"parent {self.where}: connection failed ({e.strerror or e})") \
                from None

    def exchange(self, request: bytes) -> tuple[Head, bool]:
        """Send a request; return the response head (body consumed) and whether it stays open."""
        try:
            self.sock.sendall(request)
        except OSError as e:
            raise DetectError(f"parent {self.where}: sending failed ({e.strerror or e})") \
                from None
        while (raw := split_head(self.buf)) is None:
            data = self._recv()
            if not data:
                raise DetectError(f"parent {self.where} closed the connection without an answer")
            self.buf += data
        head = parse_response_head(raw)
        framer = response_framer(head, "GET")
        while True:
            used = framer.feed(self.buf)
            del self.buf[:used]
            if framer.done:
                return head, head.keeps_alive()
            data = self._recv()
            if not data:
                if framer.until_close:
                    return head, False
                raise DetectError(f"parent {self.where} closed the connection mid-response")
            self.buf += data


def _request(url: str, token: bytes, scheme: str) -> bytes:
    host = urlsplit(url).netloc
    lines = [
        f"GET {url} HTTP/1.1",
        f"Host: {host}",
        "User-Agent: mitm-ntlm-detect",
        "Proxy-Connection: keep-alive",
        f"Proxy-Authorization: {scheme} {b64(token)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def try_dialect(host: str, port: int, creds: Credentials, dialect: Dialect, url: str,
                before_type3: Callable[[Dialect], None], scheme: str = "NTLM") -> Attempt:
    """One full handshake with `dialect` on a new connection, under the `scheme` header."""
    conn = _Connection(host, port)
    try:
        hs = NtlmHandshake(creds, dialect, host, scheme)
        head, open_ = conn.exchange(_request(url, hs.negotiate(), scheme))
        if head.status != 407:
            raise DetectError(f"parent {conn.where} answered {head.status} to a request "
                              "without credentials: it needs no authentication")
        try:
            challenge = ntlm_challenge(head, scheme=scheme)
        except NotOffered:
            offered = offered_schemes(head)
            raise SchemeNotOffered(f"parent {conn.where} offers neither NTLM nor Negotiate "
                                   f"(it offers: {', '.join(offered) or 'nothing'})",
                                   offered) from None
        except WireError as e:
            raise DetectError(f"parent {conn.where} sent a malformed NTLM challenge: {e}") \
                from None
        if challenge is None:
            if scheme == "Negotiate":
                raise DetectError(f"parent {conn.where} offers only Negotiate and does not take "
                                  f"NTLM inside it: it wants Kerberos (see the ntlm_kerberos_* "
                                  f"options), which detect does not try")
            raise DetectError(f"parent {conn.where} answered the Type 1 without a challenge")
        if not open_:
            raise DetectError(f"parent {conn.where} closed the connection after its challenge; "
                              "NTLM needs the Type 3 on the same connection")
        try:
            type3 = hs.authenticate(challenge)
        except ChallengeError as e:
            raise DetectError(f"parent {conn.where}: {e}") from None
        before_type3(dialect)
        head, _ = conn.exchange(_request(url, type3, scheme))
        return Attempt(dialect, head.status != 407, head.status, scheme)
    except WireError as e:
        raise DetectError(f"parent {conn.where} sent something that is not HTTP: {e}") from None
    finally:
        conn.close()


def detect(parent: str, creds: Credentials, url: str, try_all: bool,
           before_type3: Callable[[Dialect], None]) -> list[Attempt]:
    """Try the dialects strongest first; stop at the first accepted one.

    Without `try_all` it also stops at the first rejection, since every rejection costs a
    failed logon (a few of them lock the account). A parent that offers only Negotiate gets
    NTLM inside Negotiate, as the addon sends it (finding that out costs no logon: only a
    Type 1 was sent).
    """
    quiet_spnego_logs()
    host, port = parse_parent(parent)
    attempts: list[Attempt] = []
    scheme = "NTLM"
    for dialect in Dialect:
        try:
            attempt = try_dialect(host, port, creds, dialect, url, before_type3, scheme)
        except SchemeNotOffered as e:
            if scheme != "NTLM" or not any(s.lower() == "negotiate" for s in e.offered):
                raise
            scheme = "Negotiate"
            attempt = try_dialect(host, port, creds, dialect, url, before_type3, scheme)
        attempts.append(attempt)
        if attempt.accepted or not try_all:
            break
    return attempts
