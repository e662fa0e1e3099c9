"""The addon's own HTTP/1 reading: heads, body framing, challenges, token summaries."""

from __future__ import annotations

import base64

import pytest
import spnego

from mitmproxy_ntlm import messages, wire


def test_chunked_framer_finds_the_end_across_splits() -> None:
    body = b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
    for split in range(1, len(body)):
        framer = wire.BodyFramer(None, chunked=True)
        used = framer.feed(body[:split])
        used += framer.feed(body[split:] + b"NEXT")
        assert framer.done and used == len(body)


def test_framer_rejects_garbage_chunk_size() -> None:
    framer = wire.BodyFramer(None, chunked=True)
    with pytest.raises(wire.WireError):
        framer.feed(b"zz\r\n")


def test_response_framing_rules() -> None:
    head = wire.parse_response_head(b"HTTP/1.1 407 Auth\r\nContent-Length: 10\r\n\r\n")
    assert wire.response_framer(head, "HEAD").done
    assert wire.response_framer(head, "GET").remaining == 10
    closing = wire.parse_response_head(b"HTTP/1.0 407 Auth\r\n\r\n")
    assert wire.response_framer(closing, "GET").until_close
    assert not closing.keeps_alive()
    with pytest.raises(wire.WireError):
        wire.parse_response_head(b"HTTP/1.1 2x0 Hm\r\n\r\n")


def test_header_lookups_read_the_raw_head() -> None:
    head = wire.parse_response_head(
        b"HTTP/1.1 200 OK\r\nX-Note: Connection: close\r\nset-cookie: a=1 \r\n"
        b"Content-Length:7\r\nSET-COOKIE:\tb=2\r\nX-Content-Length: 99\r\n\r\n")
    assert head.get_all("Set-Cookie") == ["a=1", "b=2"]  # any case, in order, trimmed
    assert head.get("content-length") == "7"  # not X-Content-Length, no space needed
    assert head.get("connection") is None  # a value that looks like a header is no header
    assert head.keeps_alive()  # "close" in a value alone does not close
    assert wire.response_framer(head, "GET").remaining == 7
    assert head.headers[0] == ("X-Note", "Connection: close")
    assert not wire.parse_response_head(
        b"HTTP/1.1 200 OK\r\nCONNECTION: Close\r\n\r\n").keeps_alive()
    assert wire.parse_response_head(
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").keeps_alive()
    chunked = wire.parse_request_head(
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n")
    assert wire.request_framer(chunked).chunked


def test_head_size_is_bounded() -> None:
    buf = bytearray(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    with pytest.raises(wire.WireError, match="larger"):
        wire.split_head(buf)


def test_challenge_parsing() -> None:
    t2 = base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00rest").decode()
    head = wire.parse_response_head(
        b"HTTP/1.1 407 x\r\nProxy-Authenticate: Negotiate\r\n"
        b"Proxy-Authenticate: NTLM " + t2.encode() + b"\r\n"
        b"Proxy-Authenticate: Basic realm=\"a, b\"\r\n\r\n"
    )
    assert wire.ntlm_challenge(head) == base64.b64decode(t2)
    assert wire.offered_schemes(head) == ["Negotiate", "NTLM", "Basic"]
    basic_only = wire.parse_response_head(
        b"HTTP/1.1 407 x\r\nProxy-Authenticate: Basic realm=x\r\n\r\n")
    with pytest.raises(wire.NotOffered, match="not offered"):
        wire.ntlm_challenge(basic_only)
    bad_token = wire.parse_response_head(b"HTTP/1.1 407 x\r\nProxy-Authenticate: NTLM #\r\n\r\n")
    with pytest.raises(wire.WireError, match="base64") as raised:  # malformed, but offered
        wire.ntlm_challenge(bad_token)
    assert not isinstance(raised.value, wire.NotOffered)


def test_set_header_replaces_existing() -> None:
    head = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nproxy-authorization: Basic x\r\n\r\n"
    out = wire.set_header(head, "Proxy-Authorization", "NTLM abc")
    assert out == b"GET http://a/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: NTLM abc\r\n\r\n"


def test_message_summaries_name_fields_but_never_responses() -> None:
    client = spnego.client("CORP\\alice", "pw", hostname="p", protocol="ntlm")
    t1 = client.step()
    summary = messages.describe(t1)
    assert summary["type"] == 1 and "ntlm" in summary["flags"]
    assert messages.describe(b"garbage") == {"error": "not an NTLMSSP message"}
    assert messages.describe_b64("NTLM !!!") == {"error": "not valid base64"}


def test_persistent_keeps_the_parent_connection_for_ntlm() -> None:
    def persistent(raw: bytes) -> bytes:
        return wire.persistent(wire.parse_request_head(raw)).raw

    plain = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    assert persistent(plain) == plain  # nothing to change: same bytes
    assert persistent(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close, TE\r\n"
                      b"TE: trailers\r\nProxy-Connection: close\r\n\r\n") == (
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: keep-alive, te\r\n\r\n")
    assert persistent(b"GET http://a/ HTTP/1.0\r\nHost: a\r\n\r\n").endswith(
        b"\r\nConnection: keep-alive\r\n\r\n")


def test_the_rest_of_an_abandoned_response_is_framed_exactly() -> None:
    get = wire.parse_request_head(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    rest = wire.ResponseRest(get, 407, head_bytes=head[:10])
    assert not rest.feed(head[10:])
    assert not rest.feed(b"hel")
    assert rest.feed(b"lo")
    chunked = wire.ResponseRest(get, 407, framer=wire.BodyFramer(None, chunked=True))
    assert not chunked.feed(b"5\r\nhello\r\n")
    assert chunked.feed(b"0\r\n\r\n")
    # a HEAD's response has no body, whatever its Content-Length says
    head_req = wire.parse_request_head(b"HEAD http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    assert wire.ResponseRest(head_req, 407).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n",  # the parent wants a new handshake
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nbody until the close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",  # bytes beyond the end
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"SSH-2.0-not http\r\n\r\n",
])
def test_an_abandoned_response_that_cannot_end_cleanly_is_refused(response: bytes) -> None:
    get = wire.parse_request_head(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    with pytest.raises(wire.WireError):
        wire.ResponseRest(get, 407).feed(response)


def test_target_host_is_what_a_parents_domain_rules_match() -> None:
    def host(first_line: bytes) -> str:
        return wire.target_host(wire.parse_request_head(first_line + b"\r\nHost: x\r\n\r\n"))

    assert host(b"GET http://User@Intranet.Example:8080/a?b HTTP/1.1") == "intranet.example"
    assert host(b"CONNECT WWW.example.com:443 HTTP/1.1") == "www.example.com"
    assert host(b"CONNECT [::1]:443 HTTP/1.1") == "::1"
    assert host(b"GET http://[::1/ HTTP/1.1") == ""  # unclosed bracket: names no host
