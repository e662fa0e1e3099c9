"""The shared pool of authenticated parent connections (ntlm_pool): separate client
processes reuse one NTLM logon, per user, with liveness checks and an idle timeout."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import subprocess
import threading
import time

import pytest
from mitmproxy.io import FlowReader

from constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from mitm import Mitmdump, curl
from test_trace import Web, _free_port

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
ENV = {"PW": TEST_PASSWORD}
PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"
USERS = {"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}


def get(m, url: str, *args: str) -> str:  # type: ignore[no-untyped-def]
    """One curl process (one client connection): the body, or the status on an error."""
    r = curl("-x", m.url, *args, url, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_separate_clients_share_one_handshake(mitm, parent, origin, tmp_path):
    flows = tmp_path / "flows"
    m = mitm(parent.url, {**CREDS, "save_stream_file": str(flows)}, env=ENV)
    for _ in range(20):
        assert get(m, f"{origin.url}/hello") == "hello"
    stats = parent.snapshot()
    assert stats.type1_count == 1 and stats.type3_count == 1  # without the pool: 20
    assert stats.connections == 1
    assert len(stats.requests) == 20 and {r.user for r in stats.requests} == {PRINCIPAL}
    assert m.wait_for("reused pooled connection")
    m.stop()
    saved = list(FlowReader(io.BytesIO(flows.read_bytes())).stream())
    assert len(saved) == 20
    first, later = saved[0].metadata["ntlm"], [f.metadata["ntlm"] for f in saved[1:]]
    assert first["result"] == "authenticated" and "pooled" not in first
    assert all(meta["result"] == "reused" and meta["pooled"] for meta in later)
    assert all(meta["principal"] == PRINCIPAL for meta in later)
    assert "reused pooled connection" in saved[-1].comment
    assert f"authenticated as {PRINCIPAL} at" in saved[-1].comment
    assert TEST_PASSWORD not in m.output


def keepalive_client(m):  # type: ignore[no-untyped-def]
    host, port = m.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def fetch(conn: http.client.HTTPConnection, url: str, headers: dict[str, str] | None = None
          ) -> bytes:
    conn.request("GET", url, headers=headers or {})
    return conn.getresponse().read()


def test_keepalive_clients_take_turns_on_one_parent_connection(mitm, parent, origin):
    # Two kept-alive client connections asking in turn borrow the parent connection per
    # request, as CNTLM and Px lend theirs: one parent connection, one logon (it was two).
    m = mitm(parent.url, CREDS, env=ENV)
    a, b = keepalive_client(m), keepalive_client(m)
    for i in range(5):
        for name, conn in (("a", a), ("b", b)):
            assert fetch(conn, f"{origin.url}/hello?{name}{i}") == b"hello"
    stats = parent.snapshot()
    assert len(stats.requests) == 10
    assert stats.type1_count == 1 and stats.connections == 1
    a.close()
    b.close()


def test_busy_users_wait_for_their_connections_instead_of_logging_on(mitm, make_parent,
                                                                      origin):
    # 8 concurrent kept-alive clients of two users, at most 2 parent connections per user
    # (ntlm_pool_connections): every request still reaches the parent as its own user.
    two = make_parent(users=USERS)
    m = mitm(two.url, {**MULTI, "ntlm_pool_connections": 2})
    errors: list[str] = []

    def client(n: int) -> None:
        user, password = list(USERS.items())[n % 2]
        name = user.split("\\")[1]
        auth = "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()
        conn = keepalive_client(m)
        for i in range(6):
            body = fetch(conn, f"{origin.url}/hello?as={name}&n={n}-{i}",
                         {"Proxy-Authorization": auth})
            if body != b"hello":
                errors.append(f"{user}: {body[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stats = two.snapshot()
    assert len(stats.requests) == 48
    for rec in stats.requests:
        assert rec.user == "CORP\\" + rec.target.split("as=")[1].split("&")[0], rec
    assert stats.type3_count <= 4 and stats.connections <= 4  # 2 per user, however busy
    users_per_conn: dict[int, set[str | None]] = {}
    for rec in stats.requests:
        users_per_conn.setdefault(rec.conn_id, set()).add(rec.user)
    assert all(len(u) == 1 for u in users_per_conn.values())


def test_requests_with_bodies_wait_their_turn_intact(mitm, parent, origin):
    # One connection for 4 busy clients sending bodies: a request that waits for the
    # connection gets its head and body written ahead, in order, and takes its turn (the
    # body arriving while it waits must not queue a second wait).
    m = mitm(parent.url, {**CREDS, "ntlm_pool_connections": 1}, env=ENV)
    errors: list[str] = []

    def client(n: int) -> None:
        conn = keepalive_client(m)
        for i in range(5):
            body = bytes([65 + n]) * (20_000 + i)
            conn.request("POST", f"{origin.url}/echo?n={n}-{i}", body=body)
            info = json.loads(conn.getresponse().read())
            if info["sha256"] != hashlib.sha256(body).hexdigest():
                errors.append(f"{n}-{i}: {info}")
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert time.monotonic() - started < 5  # nobody waited out ntlm_pool_wait
    stats = parent.snapshot()
    assert len(stats.requests) == 20
    assert stats.type1_count == 1 and stats.connections == 1


def test_a_request_that_waits_in_vain_opens_another_connection(mitm, parent, origin, tmp_path):
    # One connection allowed, and a slow upload holds it (the request is not complete until
    # the client has sent its body): the kept-alive client's next request waits
    # ntlm_pool_wait (1 s), then logs on again on a new connection.
    m = mitm(parent.url, {**CREDS, "ntlm_pool_connections": 1, "ntlm_pool_wait": 1,
                          "stream_large_bodies": "1k"}, env=ENV)
    conn = keepalive_client(m)
    assert fetch(conn, f"{origin.url}/hello") == b"hello"  # its connection is lent again
    body = tmp_path / "body"
    body.write_bytes(b"x" * 4_000_000)
    slow = subprocess.Popen(["curl", "-s", "-x", m.url, "--limit-rate", "100k", "--max-time",
                             "5", "-o", "/dev/null", "--data-binary", f"@{body}",
                             f"{origin.url}/echo"])
    try:
        assert m.wait_for("reused pooled connection")  # the upload borrowed it
        time.sleep(0.3)
        started = time.monotonic()
        assert fetch(conn, f"{origin.url}/hello?again") == b"hello"
        assert time.monotonic() - started >= 0.9  # it did wait for the busy connection
        assert m.wait_for("no connection came free within 1 s; opening a new one")
    finally:
        slow.wait(15)
    stats = parent.snapshot()
    assert stats.type1_count == 2 and stats.connections == 2
    assert len([r for r in stats.requests if "hello" in r.target]) == 2


def test_pool_off_is_the_old_behaviour(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "ntlm_pool": False}, env=ENV)
    for _ in range(5):
        assert get(m, f"{origin.url}/hello") == "hello"
    stats = parent.snapshot()
    assert stats.type1_count == 5 and stats.connections == 5
    assert "pooled" not in m.output


@pytest.mark.parametrize("pool", [True, False])
def test_clients_that_ask_to_close(mitm, parent, origin, pool):
    # Connection: close and HTTP/1.0 are meant for mitmproxy; the parent must keep the
    # connection for the NTLM legs (it used to close after its 407), and then it can be pooled.
    m = mitm(parent.url, {**CREDS, "ntlm_pool": pool}, env=ENV)
    for args in (["-H", "Connection: close"], ["-0"], ["-H", "Proxy-Connection: close"]):
        assert get(m, f"{origin.url}/hello", *args) == "hello"
    stats = parent.snapshot()
    assert stats.type1_count == (1 if pool else 3) and len(stats.requests) == 3


def test_users_never_share_a_pooled_connection(mitm, make_parent, origin):
    two = make_parent(users=USERS)
    m = mitm(two.url, MULTI)
    for _ in range(6):
        for user, password in USERS.items():
            name = user.split("\\")[1]
            out = get(m, f"{origin.url}/hello?as={name}", "--proxy-user", f"{name}:{password}")
            assert out == "hello"
    stats = two.snapshot()
    assert len(stats.requests) == 12
    for rec in stats.requests:  # every request reached the parent as the user who sent it
        assert rec.user == "CORP\\" + rec.target.rsplit("=", 1)[1], rec
    assert stats.type3_count == 2  # one logon per user
    users_per_conn: dict[int, set[str | None]] = {}
    for rec in stats.requests:
        users_per_conn.setdefault(rec.conn_id, set()).add(rec.user)
    assert all(len(u) == 1 for u in users_per_conn.values())
    # alice's name with another password does not ride alice's pooled connection
    r = curl("-x", m.url, "--proxy-user", "alice:not-her-password", "-i",
             f"{origin.url}/hello?as=mallory")
    assert "407" in r.stdout.splitlines()[0], r.stdout
    assert two.snapshot().type3_count == 3 and two.snapshot().rejected_count == 1
    assert not any(rec.target.endswith("mallory") for rec in two.requests)


def test_pool_max_closes_the_oldest(mitm, make_parent, origin):
    two = make_parent(users=USERS)
    m = mitm(two.url, {**MULTI, "ntlm_pool_max": 1})
    alice, bob = ("alice:Alice-Pass-1",), ("bob:Bob-Pass-2",)
    for who in (alice, bob, bob, alice):
        assert get(m, f"{origin.url}/hello", "--proxy-user", *who) == "hello"
    # bob's connection pushed alice's out; bob reused his; alice needed a new logon
    assert two.snapshot().type3_count == 3
    assert m.wait_for("pool full")


def test_connection_closed_by_the_parent_while_pooled(mitm, parent, origin):
    m = mitm(parent.url, CREDS, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    time.sleep(0.2)
    assert parent.close_idle() == 1  # the parent drops the pooled connection
    assert m.wait_for("closed by the parent")
    assert get(m, f"{origin.url}/hello") == "hello"  # no client-visible error
    assert parent.snapshot().type1_count == 2


def test_parent_idle_timeout_shorter_than_the_pool(mitm, make_parent, origin):
    short = make_parent(idle_timeout=0.5)
    m = mitm(short.url, CREDS, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    time.sleep(1.0)
    assert short.idle_closed == 1
    assert get(m, f"{origin.url}/hello") == "hello"
    assert short.snapshot().type1_count == 2


def test_pooled_connection_dropped_as_it_is_reused(mitm, make_parent, origin):
    # The parent closes the connection when the reused request arrives (the idle-close race):
    # the request is replayed on a new connection instead of failing the client.
    racy = make_parent(fault="drop_reused")
    m = mitm(racy.url, CREDS, env=ENV)
    for _ in range(3):
        assert get(m, f"{origin.url}/hello") == "hello"
    stats = racy.snapshot()
    assert stats.type1_count == 3 and len(stats.requests) == 3
    assert m.wait_for("the pooled connection was closed by the parent")


def test_idle_timeout_closes_pooled_connections(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "ntlm_pool_idle": 1}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    assert get(m, f"{origin.url}/hello") == "hello"
    assert parent.snapshot().type1_count == 1
    assert m.wait_for("idle for 1 s", timeout=5)
    assert get(m, f"{origin.url}/hello") == "hello"
    assert parent.snapshot().type1_count == 2


def test_only_idle_complete_connections_return(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "stream_large_bodies": "1k"}, env=ENV)
    # a chunked response is framed to its end: the connection returns
    out = get(m, f"{origin.url}/chunked/100000", "-o", "/dev/null", "-w", "%{size_download}")
    assert out == "100000"
    assert get(m, f"{origin.url}/hello") == "hello"
    assert parent.snapshot().type1_count == 1
    # a streamed download the client abandons: the connection is mid-response, never pooled
    r = curl("-x", m.url, "--limit-rate", "100k", "--max-time", "1", "-o", "/dev/null",
             f"{origin.url}/bytes/20000000", timeout=30)
    assert r.returncode == 28, r.stderr  # curl's timeout
    assert get(m, f"{origin.url}/hello") == "hello"
    assert parent.snapshot().type1_count == 2


def test_connect_rides_a_pooled_connection(mitm, parent, origin, tls_origin):
    m = mitm(parent.url, {**CREDS, "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)},
             env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"  # leaves an authenticated connection
    out = get(m, f"{tls_origin.url}/hello", "--cacert", str(m.ca_cert))
    assert out == "hello"
    stats = parent.snapshot()
    assert stats.type1_count == 1 and stats.connections == 1
    assert [r.method for r in stats.requests] == ["GET", "CONNECT"]
    # once a tunnel, never back in the pool
    assert get(m, f"{origin.url}/hello") == "hello"
    assert parent.snapshot().type1_count == 2


def test_connect_on_a_pooled_connection_the_parent_dropped(mitm, make_parent, origin,
                                                           tls_origin):
    racy = make_parent(fault="drop_reused")
    m = mitm(racy.url, {**CREDS, "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)},
             env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    assert get(m, f"{tls_origin.url}/hello", "--cacert", str(m.ca_cert)) == "hello"
    stats = racy.snapshot()
    assert stats.type1_count == 2 and [r.method for r in stats.requests] == ["GET", "CONNECT"]


def test_squid_accepts_reused_connections(mitm, squid_ntlm, origin):
    before = sum("TCP_DENIED/407" in line for line in squid_ntlm.access_log())
    m = mitm(squid_ntlm.url, CREDS, env=ENV)
    for _ in range(5):
        assert get(m, f"{origin.url}/hello") == "hello"
    assert squid_ntlm.wait_for_log("TCP_MISS/200")
    time.sleep(0.5)
    denied = sum("TCP_DENIED/407" in line for line in squid_ntlm.access_log()) - before
    assert denied == 1, squid_ntlm.access_log()[-8:]


def test_status_and_mitmweb_show_the_pool(tmp_path, parent, origin):
    web_port = _free_port()
    m = Mitmdump(parent.url, {**CREDS, "web_port": web_port}, confdir=tmp_path, tool="mitmweb",
                 env=ENV)
    with m:
        for _ in range(3):
            assert get(m, f"{origin.url}/hello") == "hello"
        web = Web(m, web_port)
        status = web.command("ntlm.status")
        assert "pool: 1 idle" in status and "2 reused" in status, status
        assert "1 authenticated, 2 reused" in status, status
        comments = [f.get("comment", "") for f in web.flows()]
        assert sum("reused pooled connection" in c for c in comments) == 2, comments
