"""The shared pool of authenticated parent connections (ntlm_pool): separate client
processes reuse one NTLM logon, per user, with liveness checks and an idle timeout."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest
from mitmproxy.io import FlowReader

from mitmproxy_ntlm import wire
from mitmproxy_ntlm.credentials import Credentials
from mitmproxy_ntlm.pool import ParentPool, PooledConnection, PoolKey
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump, curl, run_concurrently
from tests.servers import Squid, free_port
from tests.web import MitmwebApi as Web

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

    run_concurrently([functools.partial(client, n) for n in range(8)])
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

    started = time.monotonic()
    run_concurrently([functools.partial(client, n) for n in range(4)])
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
    assert m.wait_for("whose client went away mid-response: more than 1048576 bytes left")


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
    before = len(squid_ntlm.access_log())
    m = mitm(squid_ntlm.url, CREDS, env=ENV)
    for _ in range(5):
        assert get(m, f"{origin.url}/hello") == "hello"
    squid_ntlm.wait_for_log("TCP_MISS/200", since=before, count=5)
    new = squid_ntlm.access_log()[before:]
    assert sum("TCP_MISS/200" in line for line in new) == 5, new
    assert sum("TCP_DENIED/407" in line for line in new) == 1, new


def test_status_and_mitmweb_show_the_pool(tmp_path, parent, origin):
    web_port = free_port()
    m = Mitmdump(parent.url, {**CREDS, "web_port": web_port}, confdir=tmp_path, tool="mitmweb",
                 env=ENV)
    with m:
        for _ in range(3):
            assert get(m, f"{origin.url}/hello") == "hello"
        web = Web(m, web_port)
        status = web.command("ntlm.status")
        assert "pool: 1 idle" in status and "2 reused" in status, status
        assert "0 waited up to 50 ms (0 in vain), 0 read to the end" in status, status
        assert "1 authenticated, 2 reused" in status, status
        comments = [f.get("comment", "") for f in web.flows()]
        assert sum("reused pooled connection" in c for c in comments) == 2, comments


def abandon(m, url: str, after: float) -> None:  # type: ignore[no-untyped-def]
    """A client that sends a request and goes away `after` seconds later, unanswered."""
    host, port = m.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: origin\r\n\r\n".encode())
        time.sleep(after)


def test_a_client_that_gives_up_leaves_the_logon_behind(mitm, parent, origin):
    # The client goes away while the parent works on its request: the connection is read to
    # the end of that response and pooled (as Px keeps its connections), and the request is
    # not sent again (it was: "closed by the parent", a replay for nobody).
    m = mitm(parent.url, CREDS, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    abandon(m, f"{origin.url}/slow/600", after=0.2)
    assert m.wait_for("read the last", timeout=5)
    assert get(m, f"{origin.url}/hello?after") == "hello"  # not the abandoned "slow"
    stats = parent.snapshot()
    assert stats.type3_count == 1 and stats.connections == 1
    assert [r.path for r in origin.requests] == ["/hello", "/slow/600", "/hello?after"]
    assert "closed by the parent" not in m.output


def test_busy_connections_are_waited_for_briefly_before_logging_on(mitm, parent, origin):
    # A new client connection that finds its user's only connection busy waits for it
    # (ntlm_pool_grace) instead of logging on again.
    m = mitm(parent.url, {**CREDS, "ntlm_pool_grace": 2000}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    slow = threading.Thread(target=get, args=(m, f"{origin.url}/slow/600"))
    slow.start()
    try:
        assert origin.wait_for_request("/slow/600")
        assert get(m, f"{origin.url}/hello?next") == "hello"
    finally:
        slow.join(10)
    stats = parent.snapshot()
    assert stats.type3_count == 1 and stats.connections == 1


def test_the_pool_grows_when_requests_queue_up(mitm, parent, origin):
    # A request waits briefly only when no other request of the user waits already: with one
    # waiting, the next logs on, so the pool grows with the demand instead of making every
    # request take its turn (each wait costs CPU and latency).
    m = mitm(parent.url, {**CREDS, "ntlm_pool_grace": 3000}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    slow = threading.Thread(target=get, args=(m, f"{origin.url}/slow/2000"))
    waiting = threading.Thread(target=get, args=(m, f"{origin.url}/hello?waits"))
    slow.start()
    try:
        assert origin.wait_for_request("/slow/2000")
        waiting.start()
        time.sleep(0.3)  # it waits for the busy connection
        assert get(m, f"{origin.url}/hello?grows") == "hello"
        assert slow.is_alive()  # served on a new connection, not after the slow one
    finally:
        slow.join(10)
        waiting.join(10)
    assert parent.snapshot().type3_count == 2


def test_connections_the_parent_lets_through_do_not_count_against_the_limit(
        mitm, make_parent, origin):
    # A parent that asks no logon (of this client, or at all): its connections save no
    # logon, so they must not hold other requests back under ntlm_pool_connections. With the
    # limit at 1 and a kept-alive client holding its connection, another client's request
    # used to wait ntlm_pool_wait (60 s) for a connection that never came free.
    import httpx

    open_parent = make_parent(require_auth=False)
    m = mitm(open_parent.url, {**CREDS, "ntlm_pool_connections": 1, "ntlm_pool_wait": 60,
                               "ntlm_pool_grace": 0}, env=ENV)
    with httpx.Client(proxy=m.url, timeout=30) as kept:
        assert kept.get(f"{origin.url}/hello").text == "hello"
        assert get(m, f"{origin.url}/hello?second", "-m", "10") == "hello"
        assert kept.get(f"{origin.url}/hello?again").text == "hello"
    assert open_parent.snapshot().connections == 2
    assert "no connection came free" not in m.output


def test_a_parent_that_asks_no_logon_gets_new_connections_at_once(mitm, noauth_parent, origin):
    # Until the parent accepts the credentials, at most ntlm_max_failures logons run at a
    # time (the lockout guard). This parent never asks for one: once it let a connection
    # through, new connections go without credentials instead of queueing for those slots.
    m = mitm(noauth_parent.url, {**CREDS, "ntlm_max_failures": 1}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    paths = [f"/slow/{ms}" for ms in (3000, 3001, 3002)]
    slow = [threading.Thread(target=get, args=(m, f"{origin.url}{p}")) for p in paths]
    for t in slow:
        t.start()
    try:
        assert all(origin.wait_for_request(p) for p in paths)
        assert all(t.is_alive() for t in slow)  # all three at the origin at once
    finally:
        for t in slow:
            t.join(15)
    assert "waiting for the logons in progress" not in m.output


def test_a_parent_that_starts_asking_gets_the_legs_after_its_407(mitm, make_parent, origin):
    # The parent let the first connection through, then starts asking (its ACLs changed, or
    # this host needs a logon): the request that went without credentials gets the legs on
    # its connection after the 407, and the next new connection carries its Type 1 again.
    p = make_parent()  # its acceptor set up for the user, then told to let everyone through
    p.require_auth = False
    m = mitm(p.url, {**CREDS, "ntlm_pool": False}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    p.require_auth = True
    assert get(m, f"{origin.url}/hello?asked") == "hello"
    assert (p.snapshot().type1_count, p.snapshot().type3_count) == (1, 1)
    assert m.wait_for("sent without credentials")
    assert get(m, f"{origin.url}/hello?again") == "hello"
    assert (p.snapshot().type1_count, p.snapshot().type3_count) == (2, 2)
    assert m.output.count("sent without credentials") == 1  # the Type 1 went with it again
    assert p.snapshot().connections == 3


def test_a_parent_that_asks_for_some_hosts_only_gets_credentials_for_those(
        mitm, make_parent, origin):
    # Squid's access rules by domain: 127.0.0.1 is served without a logon, "localhost" (the
    # same origin) needs one. Once the parent asked for localhost, its new connections carry
    # their Type 1 at once; those for 127.0.0.1 still go without credentials.
    p = make_parent(open_hosts=("127.0.0.1",))
    m = mitm(p.url, {**CREDS, "ntlm_pool": False}, env=ENV)
    asked = origin.url.replace("127.0.0.1", "localhost")
    for n in range(3):
        assert get(m, f"{origin.url}/hello?{n}") == "hello"
        assert get(m, f"{asked}/hello?{n}") == "hello"
    assert m.wait_for("sent without credentials")
    without = [line for line in m.output.splitlines() if "sent without credentials" in line]
    assert sum("localhost" in line for line in without) == 1  # only before its first 407
    assert sum(origin.url in line for line in without) == 2  # after the first let-through
    assert (p.snapshot().type1_count, p.snapshot().type3_count) == (3, 3)


def test_squid_that_asks_for_some_domains_gets_credentials_for_those(mitm, origin):
    # Squid lets localhost through without a logon and asks for 127.0.0.1 (the same origin).
    # After its first 407 for 127.0.0.1, new connections for it carry their Type 1 at once
    # (two 407s per logon); those for localhost still go without credentials and are served.
    if shutil.which("squid") is None:
        pytest.skip("squid not installed")
    with Squid("ntlm_fake", open_domains=("localhost",)) as squid:
        m = mitm(squid.url, {**CREDS, "ntlm_pool": False}, env=ENV)
        free = origin.url.replace("127.0.0.1", "localhost")
        for n in range(3):
            assert get(m, f"{free}/hello?{n}") == "hello"
            assert get(m, f"{origin.url}/hello?{n}") == "hello"
        assert squid.wait_for_log("TCP_MISS/200", count=6)
        denied = [line for line in squid.access_log() if "TCP_DENIED/407" in line]
        assert not any("localhost" in line for line in denied)
        # The first logon: a 407 to the request without credentials, then the Type 2's.
        assert len(denied) == 2 + 1 + 1


def test_a_kept_alive_client_waits_for_a_busy_connection_on_its_own(mitm, parent, origin):
    # A kept-alive client whose next request finds the user's only connection busy (lent to
    # another client) waits for it behind the server connection it has: mitmproxy's server
    # connection is not closed and opened again (hooks, log lines) for every such request.
    import httpx

    m = mitm(parent.url, {**CREDS, "ntlm_pool_grace": 2000}, env=ENV)
    with httpx.Client(proxy=m.url, timeout=30) as kept:
        assert kept.get(f"{origin.url}/hello").text == "hello"
        slow = threading.Thread(target=get, args=(m, f"{origin.url}/slow/800"))
        slow.start()
        try:
            assert m.wait_for("reused pooled connection")
            time.sleep(0.2)  # the slow request holds the only connection
            assert kept.get(f"{origin.url}/hello?next").text == "hello"
        finally:
            slow.join(15)
    assert parent.snapshot().type3_count == 1
    assert parent.snapshot().connections == 1
    # One mitmproxy server connection per client connection, none opened again.
    assert m.output.count("server connect") == 2, m.output[-3000:]


def test_a_grace_wait_that_ends_opens_another_connection(mitm, parent, origin):
    # The only connection is busy for longer than ntlm_pool_grace (300 ms): the next client
    # waits that long, then logs on again rather than waiting for the slow response.
    m = mitm(parent.url, {**CREDS, "ntlm_pool_grace": 300}, env=ENV)
    assert get(m, f"{origin.url}/hello") == "hello"
    slow = threading.Thread(target=get, args=(m, f"{origin.url}/slow/3000"))
    slow.start()
    try:
        assert m.wait_for("reused pooled connection")
        time.sleep(0.2)
        started = time.monotonic()
        assert get(m, f"{origin.url}/hello?meanwhile") == "hello"
        assert time.monotonic() - started >= 0.29
        assert slow.is_alive()  # answered before the slow response: it did not wait for it
    finally:
        slow.join(15)
    assert parent.snapshot().type3_count == 2
    assert m.wait_for("came free within 300 ms; opening another")


class _Scripted:
    """A loopback server that sends `parts` (bytes, or a float: a pause) to each client."""

    def __init__(self, parts: list[bytes | float]) -> None:
        self.parts = parts

    async def __aenter__(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for part in self.parts:
                if isinstance(part, float):
                    await asyncio.sleep(part)
                else:
                    writer.write(part)
                    await writer.drain()
            await reader.read()  # until the pool closes its end
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return await asyncio.open_connection("127.0.0.1", port)

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def _salvage(parts: list[bytes | float], chunked_seen: bytes | None = None, **limits: float
             ) -> tuple[bool, ParentPool]:
    """Salvage a connection whose server sends `parts` (after the head and `chunked_seen`
    of a chunked body, if given): was it pooled?"""
    request = wire.parse_request_head(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    key = PoolKey("http", ("127.0.0.1", 1), Credentials("alice", "CORP", "WS", b"\1" * 16))

    async def run() -> tuple[bool, ParentPool]:
        pool = ParentPool(30, 4, per_key=16, wait_timeout=5.0, grace=0.0,
                          **limits)  # type: ignore[arg-type]
        async with _Scripted(parts) as (reader, writer):
            pool.track(key, writer)
            entry = PooledConnection(key, reader, writer, authenticated_at=time.time())
            framer = None
            if chunked_seen is not None:
                framer = wire.BodyFramer(None, chunked=True)
                framer.feed(chunked_seen)
            pool.salvage(entry, wire.ResponseRest(request, 407, framer=framer))
            while pool._salvaging:  # the pool's own task set: nothing to poll for otherwise
                await asyncio.sleep(0.01)
            kept = pool.take(key) is entry
            assert kept != writer.is_closing()
            pool.close_all()
            await asyncio.sleep(0.05)  # the server sees the close
            return kept, pool
    return asyncio.run(run())


def test_salvage_keeps_only_connections_whose_response_ends_cleanly():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"
    kept, pool = _salvage([0.05, ok[:20], 0.05, ok[20:]])
    assert kept and pool.stats.salvaged == 1
    kept, _ = _salvage([b"lo\r\n", 0.05, b"0\r\n\r\n"], chunked_seen=b"5\r\nhel")
    assert kept  # the rest of a chunk, then the last chunk
    for parts in ([ok + b"X"],  # a byte beyond the response
                  [b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n"],
                  [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]):  # then nothing
        kept, pool = _salvage(parts, salvage_seconds=0.3)
        assert not kept and pool.stats.salvage_failed == 1
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    kept, _ = _salvage([big], salvage_bytes=1000)
    assert not kept


def test_a_connection_handed_over_as_the_wait_times_out_is_not_lost():
    # The timeout's cancel and the hand-over land in the same loop turn: the waiter must
    # still get the connection. (It was dropped, yet counted as busy for ever: after 16 such
    # turns every request of the user waited ntlm_pool_wait and logged on again.)
    key = PoolKey("http", ("127.0.0.1", 1), Credentials("alice", "CORP", "WS", b"\1" * 16))

    async def run() -> None:
        pool = ParentPool(30, 4, per_key=16, wait_timeout=5.0, grace=0.05)
        async with _Scripted([]) as (reader, writer):
            pool.track(key, writer)
            entry = PooledConnection(key, reader, writer, authenticated_at=time.time())
            waiter = pool.wait(key, grace=True)
            task = asyncio.get_running_loop().create_task(pool.next_free(waiter, grace=True))
            await asyncio.sleep(0)  # waiting, with its 50 ms timeout running
            asyncio.get_running_loop().call_later(0.01, pool.put, entry)
            time.sleep(0.1)  # both due in the same turn: the hand-over runs first
            assert await task is entry
            assert pool.stats.grace_timeouts == 0 and pool.live(key) == 1
            pool.close_all()
            writer.close()
            await asyncio.sleep(0.05)

    asyncio.run(run())


def test_a_connection_handed_to_a_request_that_is_cancelled_passes_on():
    # put() hands the connection over, and in the same turn the waiting request is cancelled
    # (its client closed): the connection goes to the next waiter instead of being lost.
    key = PoolKey("http", ("127.0.0.1", 1), Credentials("alice", "CORP", "WS", b"\1" * 16))

    async def run() -> None:
        pool = ParentPool(30, 4, per_key=16, wait_timeout=5.0, grace=0.0)
        async with _Scripted([]) as (reader, writer):
            pool.track(key, writer)
            entry = PooledConnection(key, reader, writer, authenticated_at=time.time())
            loop = asyncio.get_running_loop()
            first = loop.create_task(pool.next_free(pool.wait(key)))
            second = loop.create_task(pool.next_free(pool.wait(key)))
            await asyncio.sleep(0)
            pool.put(entry)  # to the first waiter ...
            first.cancel()  # ... which is cancelled before it runs again
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await second is entry
            pool.close_all()
            writer.close()
            await asyncio.sleep(0.05)

    asyncio.run(run())


# ------------------------------------------------------------ bytes outside a response

STRAY_GET = b"GET http://origin.test/mine HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def _pooled_engine(request: bytes = STRAY_GET):  # type: ignore[no-untyped-def]
    """An engine on a connection lent by the pool, its request sent."""
    from mitmproxy_ntlm import engine as eng
    from mitmproxy_ntlm.policy import UpstreamPolicy

    creds = Credentials("alice", "CORP", "WS", b"\1" * 16)
    engine = eng.AuthEngine(UpstreamPolicy(creds=creds), "parent:8080", "client:1",
                            target_host="parent", client_id="c1")
    engine.reuse.track = True
    engine.adopt(creds, time.time(), 2)
    assert {type(a) for a in engine.from_child(request)} == {eng.ToParent}
    return eng, engine


def test_bytes_after_a_complete_response_are_dropped_and_close_the_connection():
    eng, engine = _pooled_engine()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    actions = engine.from_parent(response + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother")
    assert b"".join(a.data for a in actions if isinstance(a, eng.ToChild)) == response
    assert any(isinstance(a, eng.CloseParent) for a in actions)
    assert not engine.reusable() and engine.reuse.stray
    assert engine.from_parent(b"more") == []  # nothing else from it reaches anyone


@pytest.mark.parametrize(("request_", "retried"), [(STRAY_GET, True), (
    b"POST http://origin.test/mine HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 1\r\n\r\nx",
    False)])
def test_a_response_that_does_not_start_cleanly_is_retried_or_failed_unquoted(request_, retried):
    eng, engine = _pooled_engine(request_)
    left_over = b"tail of GET http://origin.test/someone-elses-secret\r\n"
    actions = engine.from_parent(left_over + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    if retried:  # safe to send again: on another connection, nothing shown meanwhile
        assert [type(a) for a in actions] == [eng.Reconnect]
    else:
        [page] = [a.data for a in actions if isinstance(a, eng.ToChild)]
        assert page.startswith(b"HTTP/1.1 502") and b"not an HTTP response" in page
        assert b"tail" not in page and b"secret" not in page
    assert engine.reuse.stray


def _sequential_clients(m, origin, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """`n` curl processes one after the other, each its own client connection."""
    out = []
    for i in range(n):
        r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello?client={i}",
                 timeout=30)
        out.append(r.stdout)
    return out


def test_the_tail_of_an_overlong_body_never_reaches_the_next_client(mitm, make_parent, origin):
    # The parent sends the tail of each body (naming its request) 100 ms after the response:
    # the next client's request is on the pooled connection by then. It was answered with a
    # 502 quoting those bytes; now it is sent again on another connection.
    bad = make_parent(fault="overlong_body")
    m = mitm(bad.url, CREDS, env=ENV)
    outputs = _sequential_clients(m, origin, 5)
    assert outputs == ["hello\n200"] * 5, outputs
    assert m.wait_for("no longer shared between client connections")


def test_a_stray_response_reaches_no_client_once_seen(mitm, make_parent, origin):
    # An unsolicited second response 100 ms after each response: it went to every other
    # client. HTTP/1.1 cannot tell it from the answer to a request already sent on the
    # connection, so the first one may still land there; once seen, the parent's
    # connections are no longer shared between clients and no client gets another's bytes.
    bad = make_parent(fault="stray_response")
    m = mitm(bad.url, CREDS, env=ENV)
    outputs = _sequential_clients(m, origin, 6)
    strays = [i for i, out in enumerate(outputs) if "stray response" in out]
    assert strays in ([], [1]), outputs
    assert outputs[2:] == ["hello\n200"] * 4, outputs
    assert m.wait_for("no longer shared between client connections")
