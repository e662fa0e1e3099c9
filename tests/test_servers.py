"""Validate the test servers themselves, with independent clients (curl, git, pip).

The addon's tests trust these parents to behave like real NTLM proxies and to check passwords;
curl's own NTLM implementation is the independent referee here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import spnego

from mitmproxy_ntlm.testing import http1
from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER, WRONG_PASSWORD
from tests.servers import GitServer, Origin, PackageIndex, Squid, client_env, pattern_bytes

CREDS = f"{TEST_DOMAIN}\\{TEST_USER}:{TEST_PASSWORD}"
BAD_CREDS = f"{TEST_DOMAIN}\\{TEST_USER}:{WRONG_PASSWORD}"
MB3 = 3 * 1024 * 1024


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run curl with a clean environment; ``%{http_code}`` is on the last line of stderr."""
    return subprocess.run(
        ["curl", "-sS", "-w", "%{stderr}\n%{http_code}", *args],
        capture_output=True,
        env=client_env(),
        timeout=timeout,
    )


def status_of(proc: subprocess.CompletedProcess[bytes]) -> int:
    """The last HTTP status curl saw."""
    return int(proc.stderr.decode().strip().splitlines()[-1])


def ntlm_curl(proxy: str, *args: str, creds: str = CREDS) -> subprocess.CompletedProcess[bytes]:
    """curl through ``proxy`` with curl's own NTLM implementation."""
    return curl("--proxy-ntlm", "-U", creds, "-x", proxy, *args)


# --------------------------------------------------------------------------- happy paths


def test_curl_ntlm_through_parent(parent: ParentProxy, origin: Origin) -> None:
    r = ntlm_curl(parent.url, f"{origin.url}/hello")
    assert r.stdout == b"hello", r.stderr
    s = parent.snapshot()
    assert (s.type1_count, s.type3_count, s.accepted_count, s.rejected_count) == (1, 1, 1, 0)
    assert [(q.user, q.method) for q in s.requests] == [(TEST_PRINCIPAL, "GET")]
    assert [q.path for q in origin.requests] == ["/hello"]
    assert origin.requests[0].header("Proxy-Authorization") is None  # never leaked upstream


def test_curl_ntlm_through_squid(squid_ntlm: Squid, origin: Origin) -> None:
    before = len(squid_ntlm.access_log())
    r = ntlm_curl(squid_ntlm.url, f"{origin.url}/hello")
    assert r.stdout == b"hello", r.stderr
    assert squid_ntlm.wait_for_log("TCP_MISS/200", since=before), squid_ntlm.access_log()[before:]
    assert any("TCP_DENIED/407" in line for line in squid_ntlm.access_log()[before:])
    assert len(origin.requests) == 1


def test_wrong_password_is_rejected_once(parent: ParentProxy, origin: Origin) -> None:
    r = ntlm_curl(parent.url, f"{origin.url}/hello", creds=BAD_CREDS)
    assert status_of(r) == 407
    s = parent.snapshot()
    assert (s.rejected_count, s.accepted_count, s.requests) == (1, 0, ())
    assert origin.requests == []


@pytest.mark.parametrize("kind", ["parent", "squid"])
def test_no_credentials_get_407(
    kind: str, request: pytest.FixtureRequest, origin: Origin, parent: ParentProxy
) -> None:
    proxy = parent if kind == "parent" else request.getfixturevalue("squid_ntlm")
    r = curl("-i", "-x", proxy.url, f"{origin.url}/hello")
    assert status_of(r) == 407
    challenges = [
        line.split(b":", 1)[1].strip()
        for line in r.stdout.splitlines()
        if line.lower().startswith(b"proxy-authenticate:")
    ]
    assert b"NTLM" in challenges
    if kind == "parent":
        assert b'Basic realm="test"' in challenges
    assert origin.requests == []


@pytest.mark.parametrize("kind", ["parent", "squid"])
def test_connect_tunnel_to_tls_origin(
    kind: str, request: pytest.FixtureRequest, tls_origin: Origin, parent: ParentProxy
) -> None:
    proxy = parent if kind == "parent" else request.getfixturevalue("squid_ntlm")
    assert tls_origin.cert_path is not None
    args = ["--proxytunnel", "--cacert", str(tls_origin.cert_path), f"{tls_origin.url}/hello"]
    r = ntlm_curl(proxy.url, *args)
    assert r.stdout == b"hello", r.stderr
    if kind == "parent":
        [rec] = parent.requests
        assert (rec.method, rec.target, rec.user) == (
            "CONNECT",
            f"127.0.0.1:{tls_origin.port}",
            TEST_PRINCIPAL,
        )
    else:
        assert proxy.wait_for_log("TCP_TUNNEL/200")


def test_one_handshake_for_many_urls(parent: ParentProxy, origin: Origin) -> None:
    r = ntlm_curl(parent.url, *[f"{origin.url}/hello"] * 5)
    assert r.stdout == b"hello" * 5
    s = parent.snapshot()
    assert s.connections == 1
    assert list(s.handshakes_per_connection.values()) == [1]
    assert len(s.requests) == 5 and len({q.conn_id for q in s.requests}) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_post_arrives_once(
    chunked: bool, parent: ParentProxy, origin: Origin, tmp_path: Path
) -> None:
    body = os.urandom(MB3)
    (tmp_path / "body").write_bytes(body)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    r = ntlm_curl(
        parent.url, *extra, "--data-binary", f"@{tmp_path / 'body'}", f"{origin.url}/echo"
    )
    assert status_of(r) == 200, r.stderr
    answer = json.loads(r.stdout)
    digest = hashlib.sha256(body).hexdigest()
    assert answer == {"length": MB3, "sha256": digest, "chunked": chunked, "method": "POST"}
    posts = [q for q in origin.requests if q.method == "POST"]
    assert [(q.body_length, q.sha256) for q in posts] == [(MB3, digest)]


def test_response_framings_relayed_on_one_connection(parent: ParentProxy, origin: Origin) -> None:
    urls = [f"{origin.url}/{kind}/70000" for kind in ("bytes", "chunked", "close")]
    r = ntlm_curl(parent.url, *urls, f"{origin.url}/hello")
    assert r.stdout == pattern_bytes(70000) * 3 + b"hello"
    assert parent.connections == 1  # a close-delimited origin body did not end the client side
    h = ntlm_curl(parent.url, "-I", f"{origin.url}/bytes/5000")
    assert status_of(h) == 200 and b"content-length: 5000" in h.stdout.lower()


def test_noauth_parent_forwards_without_credentials(
    noauth_parent: ParentProxy, origin: Origin
) -> None:
    r = curl(
        "-x", noauth_parent.url, "-H", "Proxy-Authorization: NTLM bogus", f"{origin.url}/hello"
    )
    assert r.stdout == b"hello"
    s = noauth_parent.snapshot()
    assert [(q.user, q.method) for q in s.requests] == [(None, "GET")]
    assert s.type1_count == s.type3_count == 0


def test_squid_without_auth(squid_noauth: Squid, origin: Origin) -> None:
    r = curl("-x", squid_noauth.url, f"{origin.url}/hello")
    assert r.stdout == b"hello"


def test_demo_host_answered_by_parent(parent: ParentProxy) -> None:
    r = ntlm_curl(parent.url, "http://ntlm-demo.invalid/")
    assert status_of(r) == 200
    assert TEST_PRINCIPAL in r.stdout.decode()
    assert parent.requests[0].target == "http://ntlm-demo.invalid/"


def test_basic_is_offered_but_never_accepted(parent: ParentProxy, origin: Origin) -> None:
    r = curl("--proxy-basic", "-U", CREDS, "-x", parent.url, f"{origin.url}/hello")
    assert status_of(r) == 407
    assert parent.basic_count == 1 and origin.requests == []


# --------------------------------------------------------------------------- NTLM rules on the wire


def _ntlm_client() -> spnego.ContextProxy:
    return spnego.client(TEST_USER, TEST_PASSWORD, hostname="127.0.0.1", protocol="ntlm")


def _get(
    conn: http.client.HTTPConnection, url: str, auth: bytes | None
) -> http.client.HTTPResponse:
    headers = {"Proxy-Authorization": "NTLM " + base64.b64encode(auth).decode()} if auth else {}
    conn.request("GET", url, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp


def test_type3_on_another_connection_fails(parent: ParentProxy, origin: Origin) -> None:
    client = _ntlm_client()
    a = http.client.HTTPConnection("127.0.0.1", parent.port, timeout=10)
    b = http.client.HTTPConnection("127.0.0.1", parent.port, timeout=10)
    try:
        r1 = _get(a, f"{origin.url}/hello", client.step())
        assert r1.status == 407
        challenge = r1.getheader("Proxy-Authenticate", "").split(" ", 1)[1]
        type3 = client.step(base64.b64decode(challenge))
        assert _get(b, f"{origin.url}/hello", type3).status == 407
        assert parent.rejected_count == 1 and origin.requests == []
        # The same connection without a header stays unauthenticated and usable.
        assert _get(a, f"{origin.url}/hello", None).status == 407
    finally:
        a.close()
        b.close()


def test_garbage_input_gets_400_and_parent_survives(parent: ParentProxy, origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", parent.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    r = ntlm_curl(parent.url, f"{origin.url}/hello")
    assert r.stdout == b"hello"


# --------------------------------------------------------------------------- fault modes


ParentFactory = Callable[..., ParentProxy]


def test_fault_close_after_type1(make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(fault="close_after_type1")
    r = ntlm_curl(p.url, f"{origin.url}/hello")
    assert r.returncode == 52  # empty reply
    assert (p.type1_count, p.type3_count) == (1, 0)


@pytest.mark.parametrize("fault", ["garbage_challenge", "truncated_challenge"])
def test_fault_bad_challenge(fault: str, make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(fault=fault)
    r = ntlm_curl(p.url, "-v", f"{origin.url}/hello")
    assert status_of(r) == 407
    assert b"bad type-2 message" in r.stderr
    assert (p.type1_count, p.type3_count) == (1, 0)


def test_fault_never_answer(make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(fault="never_answer")
    start = time.monotonic()
    r = ntlm_curl(p.url, "--max-time", "1", f"{origin.url}/hello")
    assert r.returncode == 28  # timeout
    assert time.monotonic() - start >= 0.9
    assert p.connections == 1 and p.type1_count == 0


def test_fault_close_407(make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(fault="close_407")
    r = curl("-i", "--proxy-anyauth", "-U", CREDS, "-x", p.url, f"{origin.url}/hello")
    assert r.stdout.endswith(b"hello")
    first_407 = r.stdout.split(b"\r\n\r\n", 1)[0].lower()
    assert b"407" in first_407 and b"connection: close" in first_407
    assert p.connections == 2 and p.accepted_count == 1


def test_fault_http10_407(make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(fault="http10_407")
    r = ntlm_curl(p.url, "-i", f"{origin.url}/hello")
    assert status_of(r) == 407
    assert r.stdout.startswith(b"HTTP/1.0 407")
    assert p.accepted_count == 0 and origin.requests == []


def test_rechallenge_after_two(make_parent: ParentFactory, origin: Origin) -> None:
    p = make_parent(rechallenge_after=2)
    r = ntlm_curl(p.url, *[f"{origin.url}/hello"] * 5)
    assert r.stdout == b"hello" * 5
    s = p.snapshot()
    assert s.connections == 1
    [handshakes] = s.handshakes_per_connection.values()
    assert handshakes >= 2 and s.accepted_count == handshakes
    assert len(origin.requests) == 5


def test_parents_in_one_process_keep_their_own_users(
    make_parent: ParentFactory, origin: Origin
) -> None:
    """NTLM_USER_FILE is process-global: each parent must still check against its own table."""
    other = make_parent(users={f"{TEST_DOMAIN}\\{TEST_USER}": WRONG_PASSWORD})
    mine = make_parent()
    for p, good, bad in ((mine, CREDS, BAD_CREDS), (other, BAD_CREDS, CREDS)):
        assert ntlm_curl(p.url, f"{origin.url}/hello", creds=good).stdout == b"hello"
        assert status_of(ntlm_curl(p.url, f"{origin.url}/hello", creds=bad)) == 407
        assert (p.accepted_count, p.rejected_count) == (1, 1)


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        ParentProxy(fault="nonsense")


# --------------------------------------------------------------------------- git, pip, CLI


def test_git_clone_direct(git_server: GitServer, tmp_path: Path) -> None:
    env = client_env(home=tmp_path)
    dest = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", git_server.url, str(dest)], env=env, check=True, timeout=60
    )
    head = subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "HEAD"], env=env, capture_output=True, text=True
    ).stdout.strip()
    assert head == git_server.head_commit
    assert (dest / "hello.txt").read_text() == GitServer.files["hello.txt"]
    assert any(
        q.method == "POST" and q.path.endswith("git-upload-pack") for q in git_server.requests
    )


def test_git_push_large_pack_is_chunked(git_server: GitServer, tmp_path: Path) -> None:
    env = client_env(home=tmp_path) | {
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    dest = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", git_server.url, str(dest)], env=env, check=True)
    (dest / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # incompressible: pack > 1 MB
    for cmd in (["add", "big.bin"], ["commit", "-qm", "big"], ["push", "-q", "origin", "main"]):
        subprocess.run(["git", "-C", str(dest), *cmd], env=env, check=True, timeout=60)
    posts = [q for q in git_server.requests if q.path.endswith("/git-receive-pack")]
    # git first sends a 4-byte probe ("0000"), then streams the pack chunked.
    assert [(q.body_length, q.chunked) for q in posts[:-1]] == [(4, False)]
    assert posts[-1].chunked and posts[-1].body_length > 2 * 1024 * 1024
    assert posts[-1].status == 200


def test_pip_download_direct(package_index: PackageIndex, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--index-url", package_index.url]
    subprocess.run(
        [*cmd, "ntlmdemo", "-d", str(tmp_path / "dl")],
        env=client_env(home=tmp_path),
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = (tmp_path / "dl").iterdir()
    assert wheel.name == package_index.wheel_path.name
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == package_index.wheel_sha256


def test_cli_runs_a_parent(origin: Origin) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "mitmproxy_ntlm.testing.parent", "--port", "0", "--user", CREDS],
        stdout=subprocess.PIPE,
        text=True,
        env=client_env(),
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            assert ntlm_curl(url, f"{origin.url}/hello").stdout == b"hello"
            assert status_of(ntlm_curl(url, f"{origin.url}/hello", creds=BAD_CREDS)) == 407
        finally:
            proc.terminate()
            assert proc.wait(10) == 0  # SIGTERM is a clean exit


def test_shared_reader_frames_messages_as_mitmproxy_does() -> None:
    """The one HTTP/1 reader of the test and bench servers: heads parsed by mitmproxy, bodies
    kept as on the wire (for relaying) or decoded, whatever the framing."""
    chunked = b"5;x=1\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n"

    async def read_all() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(
            b"\r\nPOST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
            + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
            + b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        reader.feed_eof()
        request = await http1.read_request(reader)
        assert request is not None and (request.method, request.host) == ("POST", "a")
        assert b"".join([d async for d in http1.iter_body(reader, http1.body_size(request))]) \
            == chunked
        response = await http1.read_response(reader)
        assert response is not None and http1.body_size(response, "HEAD") == 0
        assert await http1.read_body(reader, http1.body_size(response)) == b"hello"
        response = await http1.read_response(reader)
        assert response is not None
        assert await http1.read_body(reader, http1.body_size(response)) == b"abc"
        response = await http1.read_response(reader)
        assert response is not None and http1.body_size(response) == -1
        assert await http1.read_body(reader, -1) == b"until the end"
        assert await http1.read_response(reader) is None  # a clean end between messages

        reader = asyncio.StreamReader()
        reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n")
        response = await http1.read_response(reader)
        assert response is not None
        with pytest.raises(http1.BadMessage):
            http1.body_size(response)
        reader.feed_data(b"GET http://a/ HTTP/9\r\n\r\n")
        with pytest.raises(http1.BadMessage):
            await http1.read_request(reader)

    asyncio.run(read_all())
