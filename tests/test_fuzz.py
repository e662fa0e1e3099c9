"""Fuzzing the parsing the addon does itself: HTTP/1 heads, body framing, challenges, the engine.

Property: whatever a parent sends, the code returns actions or raises the documented WireError;
no other exception escapes, and it terminates. (A longer atheris run: fuzz/fuzz_engine.py.)
"""

from __future__ import annotations

import base64
import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mitmproxy_ntlm import engine as eng
from mitmproxy_ntlm import messages, wire
from mitmproxy_ntlm.credentials import (
    CredentialError,
    Credentials,
    SecretSources,
    build_credentials,
    read_secret_text,
)
from mitmproxy_ntlm.multiuser import client_credentials, decode_basic
from mitmproxy_ntlm.policy import UpstreamPolicy
from mitmproxy_ntlm.userfile import FileRefused, decode_text

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
CREDS = build_credentials("alice", "CORP", "WS", SecretSources(password="pw"))
GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"
POST = (b"POST http://origin.test/echo HTTP/1.1\r\nHost: origin.test\r\n"
        b"Content-Length: 5\r\n\r\nhello")


def new_engine(request: bytes = GET) -> tuple[eng.AuthEngine, list[eng.Action]]:
    engine = eng.AuthEngine(UpstreamPolicy(creds=CREDS), "parent:8080", "client:1",
                                  target_host="parent", client_id="c1")
    return engine, engine.from_child(request)


def feed(engine: eng.AuthEngine, data: bytes, cuts: list[int]) -> list[eng.Action]:
    out: list[eng.Action] = []
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        out += engine.from_parent(data[last:cut])
        last = cut
    return out


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8))
def test_wire_parsers_raise_only_wire_errors(data: bytes, cuts: list[int]) -> None:
    buf = bytearray(data)
    try:
        head = wire.split_head(buf)
        if head is not None:
            parsed = wire.parse_response_head(head)
            wire.response_framer(parsed, "GET")
            wire.offered_schemes(parsed)
            wire.ntlm_challenge(parsed)
    except wire.WireError:
        pass
    framer = wire.BodyFramer(None, chunked=True)
    try:
        last = 0
        for cut in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
            used = framer.feed(data[last:cut])
            assert 0 <= used <= cut - last
            last = cut
    except wire.WireError:
        pass


@FUZZ
@given(st.binary(max_size=4000), st.lists(st.integers(0, 4000), max_size=6),
       st.sampled_from([GET, POST]))
def test_engine_survives_any_parent_bytes(data: bytes, cuts: list[int], request: bytes) -> None:
    engine, first = new_engine(request)
    assert any(isinstance(a, eng.ToParent) for a in first)
    actions = feed(engine, data, cuts)
    actions += engine.parent_closed()
    actions += engine.timed_out(engine.generation)
    assert all(isinstance(a, eng.Action.__args__) for a in actions)  # type: ignore[attr-defined]


def challenge_response(token: bytes, status: bytes = b"407", extra: bytes = b"") -> bytes:
    value = b"NTLM " + base64.b64encode(token)
    return (b"HTTP/1.1 " + status + b" Proxy Authentication Required\r\n"
            b"Proxy-Authenticate: " + value + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n")


def type2(flags: int, target_name: bytes, info: bytes, name_offset: int, info_offset: int) -> bytes:
    head = (b"NTLMSSP\x00" + struct.pack("<I", 2)
            + struct.pack("<HHI", len(target_name), len(target_name), name_offset)
            + struct.pack("<I", flags) + b"\x01\x23\x45\x67\x89\xab\xcd\xef" + b"\x00" * 8
            + struct.pack("<HHI", len(info), len(info), info_offset)
            + b"\x06\x01\xb1\x1d\x00\x00\x00\x0f")
    return head + target_name + info


@FUZZ
@given(st.integers(0, 2**32 - 1), st.binary(max_size=40), st.binary(max_size=200),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans())
def test_engine_with_bogus_type2_fails_cleanly_or_answers(
    flags: int, name: bytes, info: bytes, name_offset: int, info_offset: int, sane: bool
) -> None:
    if sane:
        name_offset, info_offset = 56, 56 + len(name)
    token = type2(flags, name, info, name_offset, info_offset)
    messages.describe(token)  # logging must cope as well
    engine, _ = new_engine()
    actions = engine.from_parent(challenge_response(token))
    sent_type3 = [a for a in actions if isinstance(a, eng.ToParent)]
    failed = [a for a in actions if isinstance(a, eng.ToChild)]
    assert sent_type3 or failed
    if failed:
        assert b"502 Bad Gateway" in failed[0].data and b"challenge" in failed[0].data


@FUZZ
@given(st.sampled_from([b"Basic realm=\"x\"", b"Negotiate", b"NTLM", b"Negotiate abc=",
                        b"NTLM !!notbase64"]))
def test_scheme_changes_mid_stream_switch_once_then_fail_clearly(value: bytes) -> None:
    """A parent offering only Negotiate gets NTLM inside Negotiate once; nothing loops."""
    engine, _ = new_engine()
    answer = (b"HTTP/1.1 407 x\r\nProxy-Authenticate: " + value
              + b"\r\nContent-Length: 0\r\n\r\n")
    actions = engine.from_parent(answer)
    if value.startswith(b"Negotiate"):
        [retry] = [a for a in actions if isinstance(a, eng.ToParent)]
        assert b"Proxy-Authorization: Negotiate TlRMTVNTUAAB" in retry.data  # raw NTLM Type 1
        actions = engine.from_parent(answer)
    [error] = [a for a in actions if isinstance(a, eng.ToChild)]
    assert error.data.startswith(b"HTTP/1.1 502")
    assert any(s in error.data for s in (b"does not offer NTLM", b"without a challenge",
                                         b"malformed NTLM challenge", b"unusable NTLM"))


@pytest.mark.parametrize("authenticated", [False, True])
def test_garbage_framing_of_a_hidden_407_fails_cleanly(authenticated: bool) -> None:
    engine, _ = new_engine()
    if authenticated:  # a re-challenge on a connection that needed no auth so far
        engine.from_parent(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        engine.from_child(GET)
    challenge = base64.b64encode(type2(0, b"", b"", 56, 56)).decode()
    actions = engine.from_parent(b"HTTP/1.1 407 x\r\nProxy-Authenticate: NTLM " + challenge.encode()
                                 + b"\r\nContent-Length: abc\r\n\r\n")
    [error] = [a for a in actions if isinstance(a, eng.ToChild)]
    assert error.data.startswith(b"HTTP/1.1 502") and b"bad Content-Length" in error.data


ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())
HUGE = st.builds(lambda piece, times: piece * times, st.binary(min_size=1, max_size=40),
                 st.integers(1, 5000))  # up to 200 KB


def basic(raw: bytes, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(raw).decode()}"


@FUZZ
@given(st.one_of(
    st.text(ANY_CHARACTER, max_size=300),  # surrogates and control characters included
    st.builds(basic, st.one_of(st.binary(max_size=300), HUGE)),
    st.builds(basic, st.text(ANY_CHARACTER.filter(lambda c: not "\ud800" <= c <= "\udfff"),
                             max_size=100).map(str.encode)),
    st.builds(basic, st.binary(max_size=50), st.sampled_from(["basic", "BASIC", "Basic\t",
                                                              "Bearer", "NTLM", ""])),
))
@example(basic(b"DOM\\:pw"))  # no user name
@example(basic(b"alice\r\nforged log line:pw"))
@example(basic(b"a" * 100_000 + b":pw"))
@example("Basic " + "QUFB" * 50_000)
def test_basic_credentials_decode_or_fail_clearly(value: str) -> None:
    """Whatever a client puts in Proxy-Authorization: a CredentialError, or a user and password
    that are exactly what the client encoded, usable for a logon."""
    try:
        user, password = decode_basic(value)
        creds = client_credentials(user, password, "CORP", "WS")
    except CredentialError:
        return
    assert ":" not in user and password
    assert isinstance(creds, Credentials) and creds.user and len(creds.nt_hash) == 16
    raw = base64.b64decode(value.split(None, 1)[1])
    try:
        assert raw.decode("utf-8") == f"{user}:{password}"
    except UnicodeDecodeError:
        assert raw.decode("latin-1") == f"{user}:{password}"


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.builds(bytes.__add__, st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe",
                                                           b"\xfe\xff"]),
                           st.binary(max_size=100))))
def test_secret_file_bytes_decode_or_fail_clearly(data: bytes) -> None:
    """Any file content: text without a byte order mark or NUL, or a clear refusal."""
    try:
        text = decode_text(data, "file")
    except FileRefused as e:
        assert str(e).startswith("file ")
        return
    assert not text.startswith("\ufeff") and "\x00" not in text


@FUZZ
@given(st.binary(max_size=200))
def test_secret_file_reading_gives_a_password_or_a_credential_error(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pw")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, data)
        os.close(fd)
        try:
            creds = build_credentials("alice", "CORP", "WS", SecretSources(password_file=path))
        except CredentialError:
            return
        assert read_secret_text(path).splitlines()[0]
        assert len(creds.nt_hash) == 16
