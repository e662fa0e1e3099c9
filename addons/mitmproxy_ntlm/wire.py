"""The little HTTP/1 the addon has to read itself: message heads, body framing, challenges.

mitmproxy parses the messages clients see; these helpers only cover the hidden 407 legs and
the request framing needed to replay a request after a challenge. Heads stay raw bytes (they
are forwarded as received) and bodies are counted, not decoded, on the hot path of every
request: mitmproxy's `http1` readers build whole messages and cost more (see `Head`). Every
parser here raises `WireError` (a ValueError) on bad input and never anything else.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
"""Largest message head accepted from a parent; more is treated as an attack or a bug."""


class WireError(ValueError):
    """Input that is not the HTTP/1 we expected; the message is safe to show to a user: it
    names the problem, never quotes the bytes (they may belong to another request)."""


class Head:
    """A parsed message head: the first line split in three, and the raw bytes.

    Header values are looked up in the raw bytes when asked for: the engine needs four of
    them per message on its hot path (framing, keep-alive), and splitting and checking every
    header line cost more than all its other work per request. The messages a client sees
    are parsed and checked by mitmproxy itself; `headers` gives the full list when needed.
    mitmproxy's `http1.read_response_head` builds a whole `Response` per head: 29 us against
    this 0.9 us (50 against 0.85 for `read_request_head`; bench/wire_vs_mitmproxy.py).
    """

    __slots__ = ("_keeps_alive", "_status", "first", "lower", "raw")

    def __init__(self, first: tuple[str, str, str], raw: bytes) -> None:
        self.first = first
        self.raw = raw
        self.lower = raw.lower()  # header names are case-insensitive
        self._keeps_alive: bool | None = None
        self._status: int | None = None

    def __repr__(self) -> str:
        return f"Head({self.first!r})"

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Every header line with a name, in order."""
        lines = self.raw.decode("iso-8859-1").split("\r\n")[1:]
        pairs = (line.partition(":") for line in lines)
        return [(name, value.strip(" \t")) for name, sep, value in pairs if sep and name]

    def get_all(self, name: str) -> list[str]:
        """Values of a header, in order."""
        raw, lower = self.raw, self.lower
        key = _header_key(name)
        pos = lower.find(key)
        if pos == -1:
            return []
        values = []
        while pos != -1:
            start = pos + len(key)
            end = lower.find(b"\r\n", start)
            if end == -1:
                end = len(raw)
            values.append(raw[start:end].decode("iso-8859-1").strip(" \t"))
            pos = lower.find(key, end)
        return values

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of a header, lower-cased (Connection, Transfer-Encoding)."""
        values = self.get_all(name)
        if not values:
            return set()
        return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}

    @property
    def status(self) -> int:
        if self._status is None:
            try:
                self._status = int(self.first[1])
            except ValueError:
                raise WireError("bad status code") from None
        return self._status

    @property
    def version(self) -> str:
        return self.first[0] if self.first[0].startswith("HTTP/") else self.first[2]

    def keeps_alive(self) -> bool:
        """HTTP/1.1 persists unless `Connection: close`; HTTP/1.0 only with keep-alive.

        Not mitmproxy's `http1.connection_close`: it matches tokens case-sensitively (a
        `Connection: Close` would persist) and ignores `Proxy-Connection`.
        """
        if self._keeps_alive is None:
            http10 = self.version == "HTTP/1.0"
            if not http10 and b"close" not in self.lower:  # no header can say close
                self._keeps_alive = True
                return True
            conn = self.tokens("connection") | self.tokens("proxy-connection")
            if "close" in conn:
                self._keeps_alive = False
            elif http10:
                self._keeps_alive = "keep-alive" in conn
            else:
                self._keeps_alive = True
        return self._keeps_alive


def split_head(buf: bytearray) -> bytes | None:
    """Remove and return one complete head (through the blank line) from `buf`, if present.

    Not mitmproxy's `ReceiveBuffer.maybe_extract_lines` (h11's): it returns the head split in
    lines at 4 times the cost (bench/wire_vs_mitmproxy.py), and heads are forwarded as read.
    """
    # Tolerate stray CRLFs before a message (RFC 9112 2.2).
    while buf[:2] == b"\r\n":
        del buf[:2]
    end = buf.find(b"\r\n\r\n")
    if end == -1:
        if len(buf) > MAX_HEAD:
            raise WireError(f"message head larger than {MAX_HEAD} bytes")
        return None
    if end + 4 > MAX_HEAD:
        raise WireError(f"message head larger than {MAX_HEAD} bytes")
    raw = bytes(buf[: end + 4])
    del buf[: end + 4]
    return raw


@lru_cache(maxsize=64)
def _header_key(name: str) -> bytes:
    """What starts a header line named `name` in a lower-cased head."""
    return b"\r\n" + name.lower().encode("iso-8859-1") + b":"


def parse_head(raw: bytes) -> Head:
    """Split the first line; header lines are read when looked up (see `Head`)."""
    end = raw.find(b"\r\n")
    line = (raw if end == -1 else raw[:end]).decode("iso-8859-1")  # decodes every byte
    first = line.split(" ", 2)
    if len(first) == 2:
        first.append("")
    if len(first) != 3 or not first[0]:
        raise WireError("bad first line")
    return Head((first[0], first[1], first[2]), raw)


def parse_response_head(raw: bytes) -> Head:
    head = parse_head(raw)
    if not head.first[0].startswith("HTTP/1."):
        raise WireError("not an HTTP/1 response")
    if not (len(head.first[1]) == 3 and head.first[1].isdigit()):
        raise WireError("bad status code")
    return head


def parse_request_head(raw: bytes) -> Head:
    head = parse_head(raw)
    if not head.first[2].startswith("HTTP/1."):
        raise WireError("not an HTTP/1 request")
    return head


class BodyFramer:
    """Counts a message body as it streams by, to know where the next message starts.

    `feed` returns how many bytes of `data` belong to this body; `done` turns True at its end.
    Chunk extensions and trailers are accepted and skipped.
    """

    MAX_LINE = 4096

    def __init__(self, length: int | None, chunked: bool = False) -> None:
        # length None and not chunked: the body runs until the connection closes.
        self.remaining = length
        self.chunked = chunked
        self.until_close = length is None and not chunked
        self.done = length == 0 and not chunked
        self._state = "size"  # size | data | data_crlf | trailer
        self._line = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        if self.done:
            return 0
        if self.until_close:
            return len(data)
        if not self.chunked:
            assert self.remaining is not None
            n = min(self.remaining, len(data))
            self.remaining -= n
            self.done = self.remaining == 0
            return n
        return self._feed_chunked(memoryview(data))

    def _feed_chunked(self, data: memoryview) -> int:
        pos = 0
        while pos < len(data) and not self.done:
            if self._state == "data":
                assert self.remaining is not None
                n = min(self.remaining, len(data) - pos)
                pos += n
                self.remaining -= n
                if self.remaining == 0:
                    self._state = "data_crlf"
                continue
            nl = bytes(data[pos:]).find(b"\n")
            if nl == -1:
                self._line += data[pos:]
                pos = len(data)
                if len(self._line) > self.MAX_LINE:
                    raise WireError("chunk line too long")
                break
            self._line += data[pos : pos + nl + 1]
            pos += nl + 1
            line = bytes(self._line).rstrip(b"\r\n")
            self._line.clear()
            if self._state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise WireError("bad chunk size") from None
                if size < 0 or len(size_text) > 16:
                    raise WireError("bad chunk size")
                if size == 0:
                    self._state = "trailer"
                else:
                    self.remaining = size
                    self._state = "data"
            elif self._state == "data_crlf":
                if line:
                    raise WireError("chunk not followed by CRLF")
                self._state = "size"
            elif self._state == "trailer" and not line:
                self.done = True
        return pos


class ResponseRest:
    """The rest of a response nobody will read (its client went away), fed as the connection
    delivers it: `feed` returns True once the response ended exactly there, so the
    connection can carry another request. It raises `WireError` as soon as that cannot be
    known: an interim, upgrade or `challenge` response, no framing but the close, or bytes
    beyond the end."""

    def __init__(self, request: Head, challenge: int, head_bytes: bytes = b"",
                 framer: BodyFramer | None = None) -> None:
        self._request = request
        self._challenge = challenge
        self._in = bytearray(head_bytes)
        self._framer = framer

    def feed(self, data: bytes) -> bool:
        framer = self._framer
        if framer is None:
            self._in += data
            raw = split_head(self._in)
            if raw is None:
                return False
            head = parse_response_head(raw)
            if head.status == self._challenge:
                raise WireError(f"a {head.status} response: the connection needs a new logon")
            framer = self._framer = keepalive_framer(head, self._request)
            if framer is None:
                raise WireError(f"the connection ends with this {head.status} response")
            data, self._in = bytes(self._in), bytearray()
        if framer.feed(data) != len(data):
            raise WireError("bytes beyond the end of the response")
        return framer.done


def keepalive_framer(response: Head, request: Head) -> BodyFramer | None:
    """The framing of a response after which the connection can carry another request; None
    when it cannot (an interim or upgrade response, `close` on either side, a body that ends
    with the connection). A malformed framing header raises `WireError`."""
    status = response.status
    if status < 200 or status == 101 or not response.keeps_alive() or not request.keeps_alive():
        return None
    framer = response_framer(response, request.first[0])
    return None if framer.until_close else framer


def response_framer(head: Head, request_method: str) -> BodyFramer:
    """Body framing of a response (RFC 9112 6.3) to a request with `request_method`."""
    status = head.status
    if request_method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return BodyFramer(0)
    if request_method.upper() == "CONNECT" and 200 <= status < 300:
        return BodyFramer(0)
    return _framer_from_headers(head, default_until_close=True)


def request_framer(head: Head) -> BodyFramer:
    return _framer_from_headers(head, default_until_close=False)


def _framer_from_headers(head: Head, default_until_close: bool) -> BodyFramer:
    # Not mitmproxy's `http1.expected_http_body_size` fed a `Head`: 11% more CPU per Content-Length
    # response, 38% (0.8 us) per chunked one (bench/wire_vs_mitmproxy.py).
    if "chunked" in head.tokens("transfer-encoding"):
        return BodyFramer(None, chunked=True)
    lengths = {v.strip() for v in head.get_all("content-length")}
    if len(lengths) > 1:
        raise WireError("conflicting Content-Length headers")
    if lengths:
        value = lengths.pop()
        if not value.isdigit() or len(value) > 18:
            raise WireError("bad Content-Length")
        return BodyFramer(int(value))
    return BodyFramer(None) if default_until_close else BodyFramer(0)


def offered_schemes(head: Head, header: str = "proxy-authenticate") -> list[str]:
    """Auth schemes a 407/401 offers, e.g. ['NTLM', 'Negotiate', 'Basic']."""
    schemes: list[str] = []
    for value in head.get_all(header):
        # Each challenge starts with a scheme token; params (realm="a, b") follow it.
        for part in re.split(r",(?=\s*[A-Za-z][\w-]*(?:\s|$))", value):
            word = part.strip().split(" ", 1)[0]
            if word and "=" not in word and word not in schemes:
                schemes.append(word)
    return schemes


class NotOffered(WireError):
    """The challenge header does not offer the scheme at all (another one may be)."""


def ntlm_challenge(head: Head, header: str = "proxy-authenticate",
                   scheme: str = "NTLM") -> bytes | None:
    """The decoded token from `<scheme> <base64>`, or None when the scheme is offered bare.

    Raises `NotOffered` when the scheme is not offered at all, WireError when the token is
    not base64.
    """
    offered = False
    for value in head.get_all(header):
        for part in value.split(","):
            words = part.strip().split()
            if not words or words[0].lower() != scheme.lower():
                continue
            offered = True
            if len(words) >= 2:
                try:
                    return base64.b64decode(words[1], validate=True)
                except (binascii.Error, ValueError):
                    raise WireError(f"the {scheme} challenge is not valid base64") from None
    if not offered:
        raise NotOffered(f"{scheme} is not offered")
    return None


def set_header(head: bytes, name: str, value: str, also_remove: tuple[str, ...] = ()) -> bytes:
    """`head` with every `name` header (and every `also_remove` one) removed and `name: value`
    added before the blank line."""
    drop = {n.lower().encode() for n in (name, *also_remove)}
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in drop
    ]
    kept.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(kept) + b"\r\n\r\n"


def absolute_form(request: Head) -> Head:
    """The request with an absolute-form target, as a parent proxy needs it (RFC 9112 3.2.2).

    mitmproxy's regular and SOCKS modes send origin-form (`GET /path`) to the server; the
    authority comes from the Host header.
    """
    method, target, version = request.first
    if not target.startswith("/"):
        return request
    host = request.get("host")
    if not host:
        raise WireError("origin-form request without a Host header")
    first = f"{method} http://{host}{target} {version}"
    lines = request.raw.split(b"\r\n", 1)
    raw = first.encode("latin-1") + b"\r\n" + lines[1]
    return Head((method, f"http://{host}{target}", version), raw)


def persistent(request: Head) -> Head:
    """The request asking the parent to keep the connection open.

    NTLM authenticates the connection: a client's `Connection: close` (hop-by-hop, meant for
    mitmproxy) or an HTTP/1.0 request without keep-alive makes the parent close after its 407,
    and the handshake cannot complete. mitmproxy still closes (or the pool keeps) the
    connection itself after the response, as the client asked. Other Connection tokens stay.
    """
    if request.keeps_alive():
        return request
    tokens = request.tokens("connection") | request.tokens("proxy-connection")
    keep = sorted((tokens - {"close", "keep-alive"}) | {"keep-alive"})
    return parse_request_head(set_header(request.raw, "Connection", ", ".join(keep),
                                         also_remove=("Proxy-Connection",)))


def target_host(request: Head) -> str:
    """The host a request to a proxy is for, lower case and without the port (what a
    parent's access rules match, e.g. Squid's `dstdomain`); "" when it names none."""
    method, target, _ = request.first
    try:
        host = urlsplit(f"//{target}" if method == "CONNECT" else target).hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return ""
    return host or ""


def probe_head(request: Head) -> bytes:
    """A HEAD request for the same target: the safe first leg for a request with a body."""
    keep = ("host", "user-agent")
    lines = [f"HEAD {request.first[1]} {request.first[2]}"]
    lines += [f"{k}: {v}" for k, v in request.headers if k.lower() in keep]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_ERROR_REASONS = {502: "Bad Gateway", 504: "Gateway Timeout", 413: "Content Too Large"}


def error_response(status: int, text: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete, closing HTTP/1.1 response with a plain-text body a person can read: the
    addon's own error page (a 502, 504 or 413, else a 407 asking for credentials)."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {_ERROR_REASONS.get(status, 'Proxy Authentication Required')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "X-Mitmproxy-Ntlm: error",
    ]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def b64(token: bytes) -> str:
    return base64.b64encode(token).decode("ascii")
