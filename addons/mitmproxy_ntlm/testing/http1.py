"""The HTTP/1 reader the test and benchmark servers share, on mitmproxy's own `http1` functions.

Heads are parsed by mitmproxy's `read_request_head` / `read_response_head` and body sizes come
from its `expected_http_body_size`, so the loopback servers read messages as mitmproxy does.
Bodies are read as they are on the wire (`iter_body` keeps the chunked framing, so a parent can
relay them) or decoded (`read_body`, and `read_chunked` for the threaded `http.server` origins).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, BinaryIO

from mitmproxy.http import Request, Response
from mitmproxy.net.http import http1

MAX_HEAD = 256 * 1024
MAX_HEADERS = 200
IO_CHUNK = 64 * 1024


class BadMessage(ValueError):
    """Not HTTP/1 that can be framed: a server answers 400 (or 502) and closes."""


async def read_head_lines(reader: asyncio.StreamReader, *, request: bool,
                          max_head: int = MAX_HEAD) -> list[bytes] | None:
    """The lines of one head, without line ends; None on a clean EOF before any byte of it.

    Empty lines before a request line are skipped (RFC 9112 2.2). Lines are bounded by the
    reader's limit, the head by `max_head` bytes and `MAX_HEADERS` lines.
    """
    lines: list[bytes] = []
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if not lines and not e.partial.strip():
                return None
            raise BadMessage("EOF inside message head") from None
        except asyncio.LimitOverrunError:
            raise BadMessage("head line too long") from None
        total += len(line)
        if total > max_head or len(lines) > MAX_HEADERS:
            raise BadMessage("message head too large")
        line = line.rstrip(b"\r\n")
        if line:
            lines.append(line)
        elif lines:
            return lines
        elif not request:
            raise BadMessage("empty status line")


def parse_request(lines: list[bytes]) -> Request:
    try:
        return http1.read_request_head(lines)
    except ValueError as e:
        raise BadMessage(str(e)) from None


def parse_response(lines: list[bytes]) -> Response:
    try:
        return http1.read_response_head(lines)
    except ValueError as e:
        raise BadMessage(str(e)) from None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    lines = await read_head_lines(reader, request=True)
    return None if lines is None else parse_request(lines)


async def read_response(reader: asyncio.StreamReader) -> Response | None:
    lines = await read_head_lines(reader, request=False)
    return None if lines is None else parse_response(lines)


def body_size(message: Request | Response | Any, request_method: str = "GET") -> int | None:
    """mitmproxy's `expected_http_body_size`: a byte count, None for chunked, -1 for "until
    the connection closes". A response is taken as the answer to `request_method`. Any object
    with `headers.get` and `in` (an `http.server` request's headers too) can stand for a
    request."""
    try:
        if isinstance(message, Response):
            return http1.expected_http_body_size(
                SimpleNamespace(method=request_method), message)  # type: ignore[arg-type]
        return http1.expected_http_body_size(message)
    except ValueError as e:
        raise BadMessage(str(e)) from None


def chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (extensions ignored)."""
    text = line.split(b";", 1)[0].strip()
    try:
        size = int(text, 16)
    except ValueError:
        raise BadMessage(f"bad chunk size {text[:20]!r}") from None
    if size < 0:
        raise BadMessage("negative chunk size")
    return size


async def iter_body(reader: asyncio.StreamReader, size: int | None) -> AsyncIterator[bytes]:
    """A body's bytes as on the wire (chunked framing kept intact), for `body_size`'s `size`."""
    if size is None:
        while True:
            line = await reader.readuntil(b"\n")
            n = chunk_size(line)
            yield line
            if n == 0:
                while True:  # trailer section up to the empty line
                    trailer = await reader.readuntil(b"\n")
                    yield trailer
                    if not trailer.strip():
                        return
            async for data in _exactly(reader, n):
                yield data
            crlf = await reader.readuntil(b"\n")
            if crlf.strip():
                raise BadMessage("chunk data longer than its size")
            yield crlf
    elif size == -1:
        while data := await reader.read(IO_CHUNK):
            yield data
    else:
        async for data in _exactly(reader, size):
            yield data


async def _exactly(reader: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    while n:
        data = await reader.read(min(n, IO_CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)
        yield data


async def read_body(reader: asyncio.StreamReader, size: int | None) -> bytes:
    """A whole body, chunked coding decoded."""
    if size is not None:
        return b"".join([data async for data in iter_body(reader, size)])
    out = bytearray()
    while n := chunk_size(await reader.readuntil(b"\n")):
        out += await reader.readexactly(n)
        await reader.readuntil(b"\n")
    while (await reader.readuntil(b"\n")).strip():  # trailers
        pass
    return bytes(out)


def read_chunked(rfile: BinaryIO) -> bytes:
    """Decode a chunked body from a blocking file (`http.server`'s `rfile`), dropping
    extensions and trailers."""
    out = bytearray()
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ConnectionError("EOF in chunked body")
        n = chunk_size(line)
        if n == 0:
            while rfile.readline(65537).strip():
                pass
            return bytes(out)
        data = rfile.read(n)
        if len(data) != n:
            raise ConnectionError("EOF in chunk")
        out += data
        rfile.readline(3)
