"""Regular and SOCKS5 modes routed through the NTLM parent (ntlm_parent), single and multi-user."""

from __future__ import annotations

import pytest

from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER
from tests.mitm import curl

ROUTED = {"ntlm_parent": None, "connection_strategy": "lazy"}


def routed(parent, **extra):  # type: ignore[no-untyped-def]
    return {**ROUTED, "ntlm_parent": parent.url, **extra}


def single(parent, **extra):  # type: ignore[no-untyped-def]
    return routed(parent, ntlm_username=TEST_USER, ntlm_domain=TEST_DOMAIN,
                  ntlm_password_env="PW", **extra)


ENV = {"PW": TEST_PASSWORD}


def test_regular_mode_plain_and_https(mitm, parent, origin, tls_origin):
    m = mitm(None, single(parent, ssl_verify_upstream_trusted_ca=str(tls_origin.cert_path)),
             env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello", f"{origin.url}/hello").stdout == "hellohello"
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    records = [(x.method, x.target, x.user) for x in parent.requests]
    assert records == [
        ("GET", f"{origin.url}/hello", TEST_PRINCIPAL),  # absolute-form, not CONNECT to :80
        ("GET", f"{origin.url}/hello", TEST_PRINCIPAL),
        ("CONNECT", f"127.0.0.1:{tls_origin.port}", TEST_PRINCIPAL),
    ]
    # the CONNECT of the second client connection rides the first one's pooled connection
    assert parent.snapshot().type3_count == 1


def test_regular_mode_passthrough(mitm, parent, tls_origin):
    m = mitm(None, single(parent), "--ignore-hosts", ".*", env=ENV)
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert [(x.method, x.user) for x in parent.requests] == [("CONNECT", TEST_PRINCIPAL)]


def test_socks5_plain_intercepted_and_passthrough(mitm, parent, origin, tls_origin):
    m = mitm(None, single(parent, ssl_verify_upstream_trusted_ca=str(tls_origin.cert_path)),
             "--mode", "socks5", env=ENV)
    socks = m.url.removeprefix("http://")
    assert curl("--socks5", socks, f"{origin.url}/hello").stdout == "hello"
    r = curl("--socks5", socks, "--cacert", str(m.ca_cert), f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    p = mitm(None, single(parent), "--mode", "socks5", "--ignore-hosts", ".*", env=ENV)
    r = curl("--socks5", p.url.removeprefix("http://"), "--cacert", str(tls_origin.cert_path),
             f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert [(x.method, x.user) for x in parent.requests] == [
        ("GET", TEST_PRINCIPAL), ("CONNECT", TEST_PRINCIPAL), ("CONNECT", TEST_PRINCIPAL)]


def test_multiuser_regular_mode(mitm, make_parent, origin, tls_origin):
    parent = make_parent(users={"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"})
    m = mitm(None, routed(parent, ntlm_multiuser=True, ntlm_domain=TEST_DOMAIN,
                          ssl_verify_upstream_trusted_ca=str(tls_origin.cert_path)))
    r = curl("-x", m.url, "-i", f"{origin.url}/hello")
    assert "407" in r.stdout.splitlines()[0] and "Proxy-Authenticate: Basic" in r.stdout
    r = curl("--proxy-user", "alice:Alice-Pass-1", "-x", m.url, f"{origin.url}/hello")
    assert r.stdout == "hello"
    r = curl("--proxy-user", "bob:Bob-Pass-2", "--cacert", str(m.ca_cert), "-x", m.url,
             f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert [(x.method, x.user) for x in parent.requests] == [
        ("GET", "CORP\\alice"), ("CONNECT", "CORP\\bob")]


def test_multiuser_socks5(mitm, make_parent, origin):
    parent = make_parent(users={"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"})
    m = mitm(None, routed(parent, ntlm_multiuser=True, ntlm_domain=TEST_DOMAIN,
                          proxyauth="any"), "--mode", "socks5")
    socks = m.url.removeprefix("http://")
    for user, password in (("alice", "Alice-Pass-1"), ("bob", "Bob-Pass-2")):
        r = curl("--socks5", socks, "--proxy-user", f"{user}:{password}", f"{origin.url}/hello")
        assert r.stdout == "hello", r.stderr
    r = curl("--socks5", socks, "--proxy-user", "bob:wrong", "-w", "%{http_code}",
             f"{origin.url}/hello")
    assert r.stdout.endswith("407") and "rejected the NTLM credentials for CORP\\bob" in r.stdout
    assert [(x.method, x.user) for x in parent.requests] == [
        ("GET", "CORP\\alice"), ("GET", "CORP\\bob")]
    assert "Alice-Pass-1" not in m.output and "Bob-Pass-2" not in m.output


@pytest.mark.parametrize(
    ("options", "args", "message"),
    [
        ({"connection_strategy": "eager"}, (), "need --set connection_strategy=lazy"),
        ({"ntlm_multiuser": True, "proxyauth": "any"}, (), "cannot be combined with proxyauth"),
    ],
)
def test_routing_refuses_unsafe_or_broken_setups(mitm, parent, options, args, message):
    m = mitm(None, {**routed(parent), **options}, *args, expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0
    assert message in m.output
