"""CPU per message head: `mitmproxy_ntlm.wire` against mitmproxy's own `http1` functions.

Every request and response the addon forwards passes `wire.split_head` and `parse_*_head`, and
most a framer; `wire.py` keeps its own code where mitmproxy's costs more. This measures the
claims in its comments (thread CPU time, best of several rounds, typical heads)::

    .venv/bin/python bench/wire_vs_mitmproxy.py
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

from h11._receivebuffer import ReceiveBuffer
from mitmproxy.net.http import http1

from mitmproxy_ntlm import wire

REQUEST = (b"GET http://127.0.0.1:8080/bytes/1024 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"User-Agent: hey/0.0.1\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\n"
            b"Date: Sun, 06 Dec 2026 18:40:19 GMT\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1024\r\nVia: 1.1 parent\r\nConnection: keep-alive\r\n\r\n")
CHUNKED = RESPONSE.replace(b"Content-Length: 1024", b"Transfer-Encoding: chunked")


class _Message:
    """A `wire.Head` dressed as the request and response `expected_http_body_size` reads."""

    __slots__ = ("_head", "method", "status_code")

    def __init__(self, method: str, head: wire.Head) -> None:
        self._head, self.method, self.status_code = head, method, head.status

    @property
    def headers(self) -> _Message:
        return self

    def get(self, name: str) -> str | None:
        return self._head.get(name)

    def __contains__(self, name: str) -> bool:
        return bool(self._head.get_all(name))


def mitmproxy_framer(head: wire.Head, request_method: str) -> wire.BodyFramer:
    """What `wire.response_framer` would be on mitmproxy's `expected_http_body_size`."""
    message = _Message(request_method, head)
    size = http1.expected_http_body_size(message, message)  # type: ignore[arg-type]
    if size is None:
        return wire.BodyFramer(None, chunked=True)
    return wire.BodyFramer(None if size == -1 else size)


def _extract_lines(raw: bytes) -> object:
    buf = ReceiveBuffer()
    buf += raw
    return buf.maybe_extract_lines()


def _lines(raw: bytes) -> list[bytes]:
    return raw[:-4].split(b"\r\n")


def cpu_us(*fns: Callable[[], object], number: int = 20000, rounds: int = 15) -> list[float]:
    """Best thread CPU time per call of each of `fns`, in alternating rounds."""
    timers = [timeit.Timer(fn, timer=time.thread_time) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number) / number * 1e6)
    return best


def main() -> None:
    response, chunked = wire.parse_response_head(RESPONSE), wire.parse_response_head(CHUNKED)
    pairs = [
        ("split a head", lambda: wire.split_head(bytearray(RESPONSE)),
         lambda: _extract_lines(RESPONSE)),
        ("parse a request head", lambda: wire.parse_request_head(REQUEST),
         lambda: http1.read_request_head(_lines(REQUEST))),
        ("parse a response head", lambda: wire.parse_response_head(RESPONSE),
         lambda: http1.read_response_head(_lines(RESPONSE))),
        ("frame a Content-Length response", lambda: wire.response_framer(response, "GET"),
         lambda: mitmproxy_framer(response, "GET")),
        ("frame a chunked response", lambda: wire.response_framer(chunked, "GET"),
         lambda: mitmproxy_framer(chunked, "GET")),
    ]
    print(f"{'':34s} {'wire':>8s} {'mitmproxy':>10s}")
    for name, ours, theirs in pairs:
        a, b = cpu_us(ours, theirs)
        print(f"{name:34s} {a:6.2f} us {b:8.2f} us  ({(b / a - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
