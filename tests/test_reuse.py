"""The pool's bookkeeping of one parent connection (`pool.reuse`), sans I/O: heads in, verdicts
out. The engine passes on what it gets from these; the layer lends or closes by them."""

from __future__ import annotations

from mitmproxy_ntlm import wire
from mitmproxy_ntlm.pool.reuse import ConnectionReuse
from mitmproxy_ntlm.trace import HandshakeTrace

GET = wire.parse_request_head(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
CLOSING_GET = wire.parse_request_head(
    b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")


def response(extra: bytes = b"Content-Length: 5\r\n") -> wire.Head:
    return wire.parse_response_head(b"HTTP/1.1 200 OK\r\n" + extra + b"\r\n")


def tracking() -> ConnectionReuse:
    reuse = ConnectionReuse()
    reuse.track = True
    return reuse


def test_a_kept_alive_response_ends_where_its_framing_says() -> None:
    reuse = tracking()
    assert reuse.track_response(response(), GET, b"he") == 0
    assert reuse.framer is not None and not reuse.framer.done  # 3 body bytes still to come
    assert reuse.frame(b"llo") == 0
    assert reuse.framer.done and reuse.possible


def test_bytes_after_the_end_of_a_response_are_counted_out() -> None:
    reuse = tracking()
    assert reuse.track_response(response(), GET, b"helloHTTP/1.1 200") == 12
    reuse = tracking()
    reuse.track_response(response(), GET, b"hel")
    assert reuse.frame(b"loX") == 1  # the caller drops "X" and closes the connection
    reuse.saw_stray("1 bytes after a complete response")
    assert reuse.stray == "1 bytes after a complete response" and not reuse.possible


def test_a_response_that_ends_the_connection_rules_out_reuse() -> None:
    for head, request in ((response(), CLOSING_GET), (response(b""), GET),
                          (response(b"Content-Length: 5\r\nConnection: close\r\n"), GET)):
        reuse = tracking()
        assert reuse.track_response(head, request, b"hello") == 0  # all of it is passed on
        assert not reuse.possible and reuse.framer is None
        assert reuse.unfinished(request, 407, passing=True, head_bytes=b"") is None


def test_a_malformed_body_goes_to_its_own_client_and_rules_out_reuse() -> None:
    reuse = tracking()
    reuse.track_response(response(b"Transfer-Encoding: chunked\r\n"), GET, b"")
    assert reuse.frame(b"zz\r\n") == 0  # mitmproxy judges it; nothing is held back
    assert reuse.framer is None and not reuse.possible


def test_a_response_left_by_its_client_can_be_read_to_its_end() -> None:
    reuse = tracking()
    reuse.track_response(response(), GET, b"he")
    rest = reuse.unfinished(GET, 407, passing=True, head_bytes=b"")
    assert rest is not None and rest.feed(b"llo")
    before_head = reuse.unfinished(GET, 407, passing=False, head_bytes=b"HTTP/1.1 200 OK\r\n")
    assert before_head is not None and not before_head.feed(b"Content-Length: 0\r\n")
    assert before_head.feed(b"\r\n")
    reuse.track = False  # the layer will not pool this connection
    assert reuse.unfinished(GET, 407, passing=False, head_bytes=b"") is None


def test_an_adopted_connection_marks_its_trace_once() -> None:
    reuse = ConnectionReuse()
    reuse.answered = True
    reuse.adopted(1000.0, 3)
    assert reuse.reused and not reuse.answered  # a close now: the parent dropped it idle
    trace = HandshakeTrace("parent:3128", "client:1", "pooled connection")
    assert reuse.mark(trace)
    assert trace.result == "reused" and trace.authenticated_at == 1000.0
    assert not reuse.mark(trace)  # no longer pending
    reuse.adopted(None, 9)  # lent one still to come free: the earlier logon stays
    assert reuse.authenticated_at == 1000.0 and reuse.uses == 3
