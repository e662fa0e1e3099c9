"""HTTPS as CNTLM users expect: passthrough unless asked, and upstream certificates checked
against the operating system's CA store (where a company's TLS inspection CA lives)."""

from __future__ import annotations

import re

import pytest

from mitmproxy_ntlm.interception import InterceptError, tls_options
from mitmproxy_ntlm.os_trust import os_trust_store
from tests.constants import TEST_DOMAIN, TEST_USER
from tests.mitm import curl

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN}


def test_start_passes_https_through_unless_asked() -> None:
    assert tls_options(None) == ["--set", "ignore_hosts=.*"]
    assert tls_options("all") == []


def test_intercept_hosts_become_allow_hosts_patterns() -> None:
    options = tls_options("api.example.com, *.corp.example")
    patterns = [o.split("=", 1)[1] for o in options if o.startswith("allow_hosts=")]
    assert len(patterns) == 2

    def intercepted(hostport: str) -> bool:
        return any(re.search(p, hostport) for p in patterns)

    assert intercepted("api.example.com:443")
    assert intercepted("git.corp.example:8443")
    assert not intercepted("xapi.example.com:443")
    assert not intercepted("api.example.com.evil:443")
    assert not intercepted("corp.example:443")
    with pytest.raises(InterceptError):
        tls_options("not a host")


def test_os_store_is_found_here() -> None:
    store = os_trust_store()
    assert store is not None
    assert store[0] in ("file", "dir")


def test_upstream_checks_trust_the_os_store(mitm, parent, tls_origin, password_file,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The origin's CA is in the "OS store" (SSL_CERT_FILE, which OpenSSL's default paths
    honour) and nowhere else: an intercepted request succeeds only if mitmproxy checks against
    the OS store instead of certifi, and the start log says so."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_origin.cert_path))
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file},
             env={"SSL_CERT_FILE": str(tls_origin.cert_path)})
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.returncode == 0, r.stderr + m.output[-2000:]
    assert r.stdout == "hello"
    assert f"the OS CA store {tls_origin.cert_path}" in m.output


def test_users_own_trust_store_wins(mitm, parent, tls_origin, password_file) -> None:
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file,
                          "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)})
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert "OS CA store" not in m.output
