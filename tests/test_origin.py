"""Automatic logon to intranet servers that answer 401 NTLM/Negotiate (Fiddler-style)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER
from tests.mitm import curl
from tests.servers import NtlmOrigin

USERS = {TEST_PRINCIPAL: TEST_PASSWORD}
CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
ENV = {"PW": TEST_PASSWORD}


@pytest.fixture
def intranet():  # type: ignore[no-untyped-def]
    with NtlmOrigin(USERS) as server:
        yield server


@pytest.fixture
def tls_intranet():  # type: ignore[no-untyped-def]
    with NtlmOrigin(USERS, tls=True, offers=("Negotiate", "NTLM")) as server:
        yield server


def test_plain_http_origin_direct(mitm, intranet):
    m = mitm(None, {**CREDS, "ntlm_origin_hosts": "127.0.0.1"}, env=ENV)
    r = curl("-x", m.url, *[f"{intranet.url}/hello"] * 3)
    assert r.stdout == "hello" * 3, r.stderr
    assert intranet.counts["accepted"] == 1  # one logon, the connection is reused
    assert [u for u, _, _ in intranet.logons] == [TEST_PRINCIPAL] * 3
    body = b"b" * 200_000
    with httpx.Client(proxy=m.url) as client:
        echo = client.post(f"{intranet.url}/echo", content=body).json()
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    assert [r.method for r in intranet.requests].count("POST") == 1


def test_https_origin_through_an_ntlm_parent_on_http11(mitm, parent, tls_intranet):
    m = mitm(parent.url, {**CREDS, "ntlm_origin_hosts": "127.0.0.1",
                          "ssl_verify_upstream_trusted_ca": str(tls_intranet.cert_path)}, env=ENV)
    r = curl("--http2", "--cacert", str(m.ca_cert), "-x", m.url, "-w", " %{http_version}",
             f"{tls_intranet.url}/hello", f"{tls_intranet.url}/hello")
    assert r.stdout == "hello 1.1hello 1.1", r.stderr
    assert [(x.method, x.user) for x in parent.requests] == [("CONNECT", TEST_PRINCIPAL)]
    assert [u for u, _, _ in tls_intranet.logons] == [TEST_PRINCIPAL] * 2
    assert tls_intranet.counts["accepted"] == 1


def test_negotiate_only_server(mitm):
    with NtlmOrigin(USERS, offers=("Negotiate",)) as server:
        m = mitm(None, {**CREDS, "ntlm_origin_hosts": "127.0.0.1"}, env=ENV)
        assert curl("-x", m.url, f"{server.url}/hello").stdout == "hello"
        assert [u for u, _, _ in server.logons] == [TEST_PRINCIPAL]


def test_rejected_logon_passes_the_servers_401_once(mitm, intranet, tmp_path):
    creds = tmp_path / "intranet-creds"
    creds.write_text(f"{TEST_PRINCIPAL}\nnot-the-password\n")
    creds.chmod(0o600)
    m = mitm(None, {**CREDS, "ntlm_origin_hosts": "127.0.0.1",
                    "ntlm_origin_credentials": f"127.0.0.*={creds}"}, env=ENV)
    r = curl("-x", m.url, "-w", " %{http_code}", f"{intranet.url}/hello", f"{intranet.url}/hello")
    assert r.stdout == "logon required\n 401logon required\n 401", r.stdout
    assert (intranet.counts["accepted"], intranet.counts["rejected"]) == (0, 1)  # no retry loop
    assert m.wait_for("the server rejected the credentials for CORP\\alice")
    assert "not-the-password" not in m.output


def test_parallel_connections_with_a_wrong_password_cost_at_most_the_limit(mitm, intranet,
                                                                           tmp_path):
    """A browser opens several connections to the site at once: the logons beyond
    ntlm_max_failures wait for the first verdicts, then pass the server's 401 on."""
    creds = tmp_path / "intranet-creds"
    creds.write_text(f"{TEST_PRINCIPAL}\nnot-the-password\n")
    creds.chmod(0o600)
    m = mitm(None, {**CREDS, "ntlm_origin_hosts": "127.0.0.1", "ntlm_max_failures": 2,
                    "ntlm_origin_credentials": f"127.0.0.*={creds}"}, env=ENV)
    barrier = threading.Barrier(6)

    def fetch(_: int) -> int:
        with httpx.Client(proxy=m.url, timeout=20) as client:
            barrier.wait()
            return client.get(f"{intranet.url}/hello").status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(fetch, range(6)))
    assert statuses == [401] * 6
    assert intranet.counts["accepted"] == 0
    assert intranet.counts["rejected"] <= 2, intranet.counts


def test_unlisted_hosts_get_no_credentials(mitm, intranet):
    m = mitm(None, {**CREDS, "ntlm_origin_hosts": "*.intranet.example"}, env=ENV)
    r = curl("-x", m.url, "-w", " %{http_code}", f"{intranet.url}/hello")
    assert r.stdout.endswith("401")
    assert intranet.counts == {"accepted": 0, "rejected": 0, "authorization_headers": 0}
    assert intranet.logons == []


def test_plain_http_origin_through_an_ntlm_parent(mitm, parent, intranet):
    # The parent pins its origin connection to the client connection once origin NTLM is in
    # use (as Squid does), so both logons hold: the parent's and the server's inside it.
    m = mitm(parent.url, {**CREDS, "ntlm_origin_hosts": "127.0.0.1"}, env=ENV)
    with httpx.Client(proxy=m.url) as client:
        assert [client.get(f"{intranet.url}/hello").text for _ in range(3)] == ["hello"] * 3
    assert intranet.counts["accepted"] == 1
    assert [u for u, _, _ in intranet.logons] == [TEST_PRINCIPAL] * 3
    assert parent.snapshot().accepted_count == 1
