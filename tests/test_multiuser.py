"""Multi-user mode: clients' Basic credentials become their own NTLM logons at the parent."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import random
from urllib.parse import quote

import httpx
import pytest
from mitmproxy.io import FlowReader

from tests.constants import TEST_DOMAIN
from tests.mitm import curl, run_concurrently

USERS = {"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def two_user_parent(make_parent):  # type: ignore[no-untyped-def]
    return make_parent(users=USERS)


def test_curl_proxy_user_and_missing_credentials(mitm, two_user_parent, origin, tmp_path):
    flows_file = tmp_path / "flows"
    m = mitm(two_user_parent.url, {**MULTI, "save_stream_file": str(flows_file)})
    r = curl("-x", m.url, "-i", f"{origin.url}/hello")
    assert "407" in r.stdout.splitlines()[0]
    assert 'Proxy-Authenticate: Basic realm="mitmproxy-ntlm"' in r.stdout
    assert "Proxy authentication required" in r.stdout
    # user without a domain gets ntlm_domain; DOMAIN\\user and user@domain work too
    for user in ("alice", "CORP\\alice", "alice@CORP"):
        r = curl("--proxy-user", f"{user}:Alice-Pass-1", "-x", m.url, f"{origin.url}/hello")
        assert r.stdout == "hello", (user, r.stdout, r.stderr)
    assert {rec.user for rec in two_user_parent.requests} == {"CORP\\alice"}
    assert all(req.header("Proxy-Authorization") is None for req in origin.requests)
    m.stop()
    saved = list(FlowReader(io.BytesIO(flows_file.read_bytes())).stream())
    assert saved and all("Proxy-Authorization" not in f.request.headers for f in saved)
    everything = m.output + flows_file.read_bytes().decode("latin-1")
    for secret in ("Alice-Pass-1", base64.b64encode(b"alice:Alice-Pass-1").decode()):
        assert secret not in everything


def test_rejected_user_gets_407_and_can_retry(mitm, two_user_parent, origin):
    m = mitm(two_user_parent.url, MULTI)
    r = curl("--proxy-user", "bob:typo", "-x", m.url, "-i", f"{origin.url}/hello")
    assert "407" in r.stdout.splitlines()[0] and "Proxy-Authenticate: Basic" in r.stdout
    assert "rejected the NTLM credentials for CORP\\bob" in r.stdout
    # the same wrong password again: answered at once, no second failed logon
    r = curl("--proxy-user", "bob:typo", "-x", m.url, "-i", f"{origin.url}/hello")
    assert "407" in r.stdout.splitlines()[0]
    assert two_user_parent.snapshot().type3_count == 1
    # corrected password, nothing restarted
    r = curl("--proxy-user", "bob:Bob-Pass-2", "-x", m.url, f"{origin.url}/hello")
    assert r.stdout == "hello"
    assert [rec.user for rec in two_user_parent.requests] == ["CORP\\bob"]


def test_per_user_lockout_leaves_other_users_alone(mitm, two_user_parent, origin):
    m = mitm(two_user_parent.url, {**MULTI, "ntlm_max_failures": 3})
    for attempt in range(3):
        r = curl("--proxy-user", f"bob:wrong-{attempt}", "-x", m.url, f"{origin.url}/hello")
        assert "rejected the NTLM credentials" in r.stdout
    r = curl("--proxy-user", "bob:Bob-Pass-2", "-x", m.url, "-i", f"{origin.url}/hello")
    assert "407" in r.stdout.splitlines()[0]
    assert "Too many rejected logons for CORP\\bob" in r.stdout
    assert two_user_parent.snapshot().type3_count == 3
    r = curl("--proxy-user", "alice:Alice-Pass-1", "-x", m.url, f"{origin.url}/hello")
    assert r.stdout == "hello"


def test_https_intercepted_and_passthrough_per_user(mitm, two_user_parent, tls_origin):
    m = mitm(two_user_parent.url, {**MULTI,
                                   "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)})
    r = curl("--proxy-user", "alice:Alice-Pass-1", "--cacert", str(m.ca_cert), "-x", m.url,
             f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    p = mitm(two_user_parent.url, MULTI, "--ignore-hosts", ".*")
    r = curl("--proxy-user", "bob:Bob-Pass-2", "--cacert", str(tls_origin.cert_path), "-x",
             p.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    r = curl("--cacert", str(tls_origin.cert_path), "-x", p.url, f"{tls_origin.url}/hello")
    assert r.returncode != 0 and "407" in r.stderr  # CONNECT without credentials
    assert [(rec.method, rec.user) for rec in two_user_parent.requests] == [
        ("CONNECT", "CORP\\alice"), ("CONNECT", "CORP\\bob")]


def test_httpx_with_proxy_credentials(mitm, two_user_parent, origin):
    m = mitm(two_user_parent.url, MULTI)
    bob = quote("CORP\\bob")
    proxy = m.url.replace("http://", f"http://{bob}:Bob-Pass-2@")
    with httpx.Client(proxy=proxy) as client:
        for _ in range(3):
            assert client.get(f"{origin.url}/hello").text == "hello"
    stats = two_user_parent.snapshot()
    assert stats.type3_count == 1 and {r.user for r in stats.requests} == {"CORP\\bob"}


def test_two_users_never_share_an_upstream_connection(mitm, two_user_parent, origin):
    """Users alternate over many connections and over one keep-alive connection; the
    password-checking parent records which user each request arrived as."""
    m = mitm(two_user_parent.url, MULTI)
    names = list(USERS)
    errors: list[str] = []

    def fresh_connections(worker: int) -> None:
        rng = random.Random(worker)
        for i in range(12):
            user = rng.choice(names)
            proxy = m.url.replace("http://", f"http://{quote(user)}:{quote(USERS[user])}@")
            with httpx.Client(proxy=proxy) as client:
                r = client.get(f"{origin.url}/hello?who={quote(user)}&n={worker}-{i}")
                if r.text != "hello":
                    errors.append(f"{user}: {r.status_code} {r.text[:200]}")

    def one_keepalive_connection() -> None:
        host, port = m.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        for i in range(20):
            user = names[i % 2]
            conn.request("GET", f"{origin.url}/hello?who={quote(user)}&n=ka-{i}",
                         headers={"Proxy-Authorization": basic(user, USERS[user])})
            r = conn.getresponse()
            body = r.read()
            if body != b"hello":
                errors.append(f"keep-alive {user}: {r.status} {body[:200]!r}")
        conn.close()

    run_concurrently([*(functools.partial(fresh_connections, w) for w in range(4)),
                      one_keepalive_connection], timeout=120)
    assert errors == []
    records = two_user_parent.requests
    assert len(records) == 4 * 12 + 20
    users_per_conn: dict[int, set[str]] = {}
    for rec in records:
        sent_as = rec.target.split("who=")[1].split("&")[0].replace("%5C", "\\")
        assert rec.user == sent_as, rec
        users_per_conn.setdefault(rec.conn_id, set()).add(rec.user or "")
    assert all(len(users) == 1 for users in users_per_conn.values())
    assert "new user on this client connection" in m.output  # the keep-alive one switched


def test_multiuser_refuses_a_fixed_identity_or_proxyauth(mitm, parent):
    m = mitm(parent.url, {**MULTI, "ntlm_username": "alice", "ntlm_password": "x"},
             expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0 and "ntlm_multiuser takes each user's" in m.output
    m = mitm(parent.url, {**MULTI, "proxyauth": "any"}, expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0 and "cannot be combined with proxyauth" in m.output
