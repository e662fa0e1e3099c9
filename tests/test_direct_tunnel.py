"""Passed-through tunnels relayed by the addon (direct_tunnel.py): what the client and the
parent see, the failures, and everything that must still go to mitmproxy."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest

from mitmproxy_ntlm import direct_tunnel
from mitmproxy_ntlm.options import BY_NAME
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump, curl, run_concurrently
from tests.servers import free_port
from tests.web import MitmwebApi

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
ENV = {"PW": TEST_PASSWORD}
PASS = ("--ignore-hosts", ".*")
RELAYED = "relayed directly"


def connect(proxy_url: str, target: str, pieces: int = 1, early: bytes = b""
            ) -> tuple[socket.socket, int, bytes]:
    """A raw CONNECT (its head sent in `pieces` writes, `early` bytes right behind it): the
    socket, the answer's status and the answer with everything read after it so far."""
    host, port = proxy_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    cut = len(head) // pieces
    for n in range(pieces):
        sock.sendall(head[n * cut:] if n == pieces - 1 else head[n * cut:(n + 1) * cut])
        if n < pieces - 1:
            time.sleep(0.2)
    if early:
        sock.sendall(early)
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return sock, status, answer


def read_all(sock: socket.socket, first: bytes = b"") -> bytes:
    data = first
    while chunk := sock.recv(65536):
        data += chunk
    return data


def authority(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


# --------------------------------------------------------------------------- without a network


def test_only_a_complete_connect_head_is_taken() -> None:
    found = direct_tunnel.connect_target(b"CONNECT example.com:443 HTTP/1.1\r\n"
                                         b"Host: example.com:443\r\n\r\n\x16\x03\x01")
    assert found is not None
    request, early = found
    assert (request.host, request.port, early) == ("example.com", 443, b"\x16\x03\x01")
    for data in (b"GET http://example.com/ HTTP/1.1\r\n\r\n",
                 b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com",  # not complete
                 b"CONNECT example.com HTTP/1.1\r\n\r\n",  # no port
                 b"CONNECT /path HTTP/1.1\r\n\r\n",
                 b"CONNECT a b c d\r\n\r\n",
                 b"CONNECT example.com:443 HTTP/1.1\r\n\x00bad\r\n\r\n"):
        assert direct_tunnel.connect_target(data) is None, data


def options(**changes: object) -> SimpleNamespace:
    values = {"ntlm_direct_tunnels": True, "ignore_hosts": [r"\.example\.com:443$"],
              "allow_hosts": [], "proxyauth": "", "upstream_auth": "", "ntlm_multiuser": False,
              "ntlm_roaming": False, "mode": ["upstream:http://parent:3128"],
              "http_connect_send_host_header": True}
    values.update(changes)
    return SimpleNamespace(**values)


def test_the_addon_relays_only_what_nobody_would_miss_in_mitmproxy() -> None:
    tunnels = direct_tunnel.direct_tunnels(options(), lists_flows=False)
    assert tunnels is not None
    assert tunnels.wanted("git.EXAMPLE.com", 443) and not tunnels.wanted("git.example.com", 22)
    assert BY_NAME["ntlm_direct_tunnels"].default is True
    for change in ({"ntlm_direct_tunnels": False}, {"ignore_hosts": []},
                   {"allow_hosts": ["x"]}, {"proxyauth": "any"}, {"upstream_auth": "u:p"},
                   {"ntlm_multiuser": True}, {"ntlm_roaming": True}, {"mode": ["regular"]}):
        assert direct_tunnel.direct_tunnels(options(**change), lists_flows=False) is None, change
    assert direct_tunnel.direct_tunnels(options(), lists_flows=True) is None  # mitmweb, console


# --------------------------------------------------------------------------- real tunnels


def test_a_passed_through_tunnel_is_relayed_by_the_addon(mitm, parent, tls_origin, tmp_path):
    report = tmp_path / "report.txt"
    m = mitm(parent.url, {**CREDS, "ntlm_report_file": str(report)}, *PASS, env=ENV)
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, "-o", "/dev/null",
             "-w", "%{http_code} %{size_download}", f"{tls_origin.url}/bytes/3000000")
    assert r.stdout == "200 3000000", r.stderr
    assert m.wait_for(f"tunnel to {authority(tls_origin.url)} {RELAYED}")
    stats = parent.snapshot()
    assert (stats.type1_count, stats.type3_count, stats.accepted_count) == (1, 1, 1)
    target = authority(tls_origin.url)
    assert [(q.method, q.target) for q in stats.requests] == [("CONNECT", target)]
    assert m.wait_for("client disconnect")  # the tunnel has ended (both ways closed)
    m.stop()
    counted = [line for line in report.read_text().splitlines() if "direct tunnels" in line]
    assert counted == ["direct tunnels (ignore_hosts, outside mitmproxy's layers): 1 opened, "
                       "0 open now, 0 failed"], counted
    assert TEST_PASSWORD not in m.output
    assert "Traceback" not in m.output and "ERROR" not in m.output


def test_switched_off_mitmproxy_carries_the_tunnel(mitm, parent, tls_origin):
    m = mitm(parent.url, {**CREDS, "ntlm_direct_tunnels": False}, *PASS, env=ENV)
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert parent.snapshot().accepted_count == 1
    assert RELAYED not in m.output


def test_a_half_close_is_passed_on_and_early_bytes_arrive(mitm, parent, origin):
    """Plain http inside the tunnel: the client's request sent right behind its CONNECT, then
    its write side shut; the whole answer comes back, then the close."""
    m = mitm(parent.url, CREDS, *PASS, env=ENV)
    request = b"GET /hello HTTP/1.0\r\n\r\n"
    sock, status, answer = connect(m.url, authority(origin.url), early=request)
    with sock:
        assert status == 200 and answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        response = read_all(sock, answer.split(b"\r\n\r\n", 1)[1])
    assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b"hello"), response
    assert m.wait_for(RELAYED)


def test_a_connect_head_in_pieces_goes_to_mitmproxy(mitm, parent, tls_origin):
    m = mitm(parent.url, CREDS, *PASS, env=ENV)
    sock, status, _ = connect(m.url, authority(tls_origin.url), pieces=2)
    context = ssl.create_default_context(cafile=str(tls_origin.cert_path))
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        assert status == 200
        tls.sendall(b"GET /hello HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert read_all(tls).endswith(b"hello")
    assert RELAYED not in m.output  # mitmproxy read the head, and passed the tunnel through
    assert parent.snapshot().accepted_count == 1


def test_what_is_not_passed_through_goes_to_mitmproxy(mitm, parent, origin, tls_origin):
    m = mitm(parent.url, {**CREDS, "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)},
             "--ignore-hosts", "^nothing-matches$", env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr  # intercepted: mitmproxy's certificate
    sock, status, answer = connect(m.url, "bad target")
    sock.close()
    assert status == 400, answer
    assert RELAYED not in m.output


FAULTS = [("close_after_type2", 502, "closed the connection during the NTLM handshake"),
          ("bogus_type2", 502, "NTLM"),
          ("never_answer", 504, "did not answer the NTLM handshake within 2 s"),
          ("switch_to_basic", 502, "does not offer NTLM (it offers: Basic)")]


@pytest.mark.parametrize(("fault", "status", "text"), FAULTS)
def test_a_failed_logon_is_the_answer_to_the_connect(mitm, make_parent, tls_origin, fault,
                                                     status, text):
    bad = make_parent(fault=fault)
    m = mitm(bad.url, {**CREDS, "ntlm_handshake_timeout": 2}, *PASS, env=ENV)
    start = time.monotonic()
    sock, got, answer = connect(m.url, authority(tls_origin.url))
    with sock:
        answer = read_all(sock, answer)
    assert got == status and text in answer.decode(), answer
    assert time.monotonic() - start < 10
    assert TEST_PASSWORD not in m.output


def test_a_parent_that_is_gone_fails_over_or_is_named(mitm, parent, tls_origin):
    dead = f"http://127.0.0.1:{free_port()}"
    m = mitm(dead, {**CREDS, "ntlm_parent": parent.url}, *PASS, env=ENV)
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert m.wait_for("trying the next parent") and m.wait_for(RELAYED)
    alone = mitm(dead, CREDS, *PASS, env=ENV)
    sock, status, answer = connect(alone.url, authority(tls_origin.url))
    with sock:
        answer = read_all(sock, answer)
    assert status == 502 and b"Cannot reach the parent proxy (127.0.0.1:" in answer, answer


def test_the_lockout_guard_holds_for_concurrent_tunnels(mitm, parent, tls_origin):
    m = mitm(parent.url, {**CREDS, "ntlm_max_failures": 3}, *PASS,
             env={"PW": "Wrong-Pass-9"})
    answers: list[bytes] = []
    lock = threading.Lock()

    def client() -> None:
        sock, _, answer = connect(m.url, authority(tls_origin.url))
        with sock:
            answer = read_all(sock, answer)
        with lock:
            answers.append(answer)

    run_concurrently([client] * 12)
    assert len(answers) == 12
    assert all(a.startswith(b"HTTP/1.1 502") for a in answers), answers
    assert 1 <= parent.snapshot().rejected_count <= 3
    assert parent.snapshot().accepted_count == 0
    assert "Wrong-Pass-9" not in m.output


def test_mitmweb_shows_the_tunnels_as_mitmproxy_does(tmp_path, parent, tls_origin):
    web_port = free_port()
    m = Mitmdump(parent.url, {**CREDS, "web_port": web_port}, *PASS, confdir=tmp_path,
                 tool="mitmweb", env=ENV)
    with m:
        r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
        assert r.stdout == "hello", r.stderr
        status = MitmwebApi(m, web_port).command("ntlm.status")
        assert "direct tunnels: off" in status, status


def test_a_tunnel_rides_an_idle_authenticated_connection(mitm, parent, origin, tls_origin):
    m = mitm(parent.url, CREDS, *PASS, env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"  # pooled afterwards
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert m.wait_for(RELAYED)
    stats = parent.snapshot()
    assert (stats.type3_count, stats.connections) == (1, 1)  # one logon for both
    assert [q.method for q in stats.requests] == ["GET", "CONNECT"]


def test_a_pooled_connection_the_parent_dropped_is_replaced(mitm, make_parent, origin,
                                                           tls_origin):
    racy = make_parent(fault="drop_reused")
    m = mitm(racy.url, CREDS, *PASS, env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert m.wait_for(RELAYED)
    stats = racy.snapshot()
    assert stats.type1_count == 2 and [q.method for q in stats.requests] == ["GET", "CONNECT"]
