"""CNTLM/Px parity: parent failover, NoProxy, PAC, roaming, listen safety, Allow/Deny."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyauth import ProxyAuth
from mitmproxy.test import taddons

from mitmproxy_ntlm.access import ClientAccess
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER
from tests.mitm import curl
from tests.servers import free_port

ENV = {"PW": TEST_PASSWORD}
CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
LAZY = {"connection_strategy": "lazy"}


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_failover_to_the_next_parent_in_regular_mode(mitm, parent, origin):
    dead = dead_url()
    m = mitm(None, {**CREDS, **LAZY, "ntlm_parent": f"{dead}, {parent.url}"}, env=ENV)
    for _ in range(3):
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert m.wait_for("unreachable")
    # the dead parent is skipped afterwards, not retried per connection
    assert m.output.count("trying the next parent") == 1
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL] * 3


def test_failover_behind_the_upstream_parent(mitm, parent, origin, tls_origin):
    m = mitm(dead_url(), {**CREDS, "ntlm_parent": parent.url}, "--ignore-hosts", ".*", env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    assert [x.method for x in parent.requests] == ["GET", "CONNECT"]


def test_noproxy_wildcards_and_cidr_go_direct(mitm, parent, origin, tls_origin):
    local = origin.url.replace("127.0.0.1", "localhost")
    m = mitm(None, {**CREDS, **LAZY, "ntlm_parent": parent.url,
                    "ntlm_noproxy": "localhost, *.corp.example, 10.0.0.0/8"}, "--ignore-hosts",
             ".*", env=ENV)
    assert curl("-x", m.url, f"{local}/hello").stdout == "hello"  # direct
    assert parent.requests == []
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"  # through the parent
    assert len(parent.requests) == 1
    n = mitm(None, {**CREDS, **LAZY, "ntlm_parent": parent.url, "ntlm_noproxy": "127.0.0.*"},
             "--ignore-hosts", ".*", env=ENV)
    assert curl("-x", n.url, f"{origin.url}/hello").stdout == "hello"
    r = curl("--cacert", str(tls_origin.cert_path), "-x", n.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    c = mitm(None, {**CREDS, **LAZY, "ntlm_parent": parent.url, "ntlm_noproxy": "127.0.0.0/8"},
             env=ENV)
    assert curl("-x", c.url, f"{origin.url}/hello").stdout == "hello"
    assert len(parent.requests) == 1  # only the one request that was meant for the parent


def _serve_file(path: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("H", (http.server.SimpleHTTPRequestHandler,), {
        "log_message": lambda *a: None,
        "__init__": lambda self, *a, **k: http.server.SimpleHTTPRequestHandler.__init__(
            self, *a, directory=str(path.parent), **k)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/{path.name}"


def test_pac_file_and_url_pick_the_parent(mitm, parent, origin, tmp_path):
    dead = dead_url().removeprefix("http://")
    pac = tmp_path / "proxy.pac"
    pac.write_text(
        "function FindProxyForURL(url, host) {\n"
        '  if (shExpMatch(host, "localhost")) return "DIRECT";\n'
        f'  return "PROXY {dead}; PROXY {parent.url.removeprefix("http://")}; DIRECT";\n'
        "}\n")
    server, pac_url = _serve_file(pac)
    try:
        for location in (str(pac), pac_url):
            m = mitm(None, {**CREDS, **LAZY, "ntlm_pac": location}, env=ENV)
            local = origin.url.replace("127.0.0.1", "localhost")
            assert curl("-x", m.url, f"{local}/hello").stdout == "hello"  # DIRECT
            assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"  # 2nd PROXY
            assert m.wait_for("PAC file")
            m.stop()
    finally:
        server.shutdown()
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL] * 2


def test_roaming_goes_direct_and_back(mitm, origin):
    dead = dead_url()
    port = int(dead.rsplit(":", 1)[1])
    m = mitm(None, {**CREDS, **LAZY, "ntlm_parent": dead, "ntlm_roaming": True,
                    "ntlm_parent_retry": 1}, env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert m.wait_for("going direct")
    with ParentProxy({f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD}, port=port) as parent:
        time.sleep(1.2)
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        assert [x.user for x in parent.requests] == [TEST_PRINCIPAL]
    assert m.wait_for("reachable again")


@pytest.mark.parametrize("listen_host", ["", "0.0.0.0", "192.0.2.7"])
def test_single_user_refuses_to_listen_beyond_loopback(listen_host):
    # Checked in-process: a refused address is never bound, even for a moment.
    access = ClientAccess()
    with taddons.context(access, NtlmUpstreamAuth(), ProxyAuth()) as tctx:
        single = {"ntlm_username": "alice", "ntlm_password": "x"}
        with pytest.raises(exceptions.OptionsError, match=r"--listen-host 127\.0\.0\.1"):
            tctx.configure(access, **single, listen_host=listen_host)
        # allowed knowingly, when clients authenticate, or on loopback
        tctx.configure(access, **single, listen_host=listen_host, ntlm_allow_remote=True)
        tctx.configure(access, ntlm_username="", ntlm_password="", ntlm_multiuser=True,
                       listen_host=listen_host, ntlm_allow_remote=False)
        tctx.configure(access, **single, ntlm_multiuser=False, listen_host="127.0.0.1")


def test_winbind_without_a_user_name_refuses_to_listen_beyond_loopback(mitm):
    """Winbind lends the logged-on user's identity to every client, like ntlm_username."""
    m = mitm(None, {"ntlm_winbind": True}, "--listen-host", "0.0.0.0", expect_failure=True)
    assert m.proc is not None and m.proc.wait(10) != 0
    assert "refuses to listen on 0.0.0.0" in m.output
    assert "--listen-host 127.0.0.1" in m.output and "ntlm_allow_remote" in m.output


@pytest.mark.parametrize("identity", [
    {"ntlm_winbind": True},
    {"ntlm_kerberos_ccache": "FILE:/nonexistent/krb5cc"},
    {"ntlm_kerberos_keytab": "client.keytab"},
    {"ntlm_scheme": "kerberos"},
])
def test_identity_without_a_user_name_is_single_user(identity, tmp_path):
    """Kerberos and winbind lend an identity without ntlm_username: single-user all the same."""
    if "ntlm_kerberos_keytab" in identity:
        keytab = tmp_path / "client.keytab"
        keytab.write_bytes(b"\x05\x02")  # an empty keytab
        identity = {"ntlm_kerberos_keytab": str(keytab)}
    access = ClientAccess()
    with taddons.context(access, NtlmUpstreamAuth(), ProxyAuth()) as tctx:
        tctx.configure(access, listen_host="0.0.0.0")  # no identity yet
        with pytest.raises(exceptions.OptionsError, match=r"--listen-host 127\.0\.0\.1"):
            tctx.configure(access, **identity)  # only the identity changes
        tctx.configure(access, **identity, listen_host="0.0.0.0", ntlm_allow_remote=True)
        if "ntlm_winbind" not in identity:  # Kerberos off: no identity to lend
            tctx.configure(access, **{**identity, "ntlm_scheme": "ntlm"}, listen_host="0.0.0.0",
                           ntlm_allow_remote=False)


def test_allow_and_deny_clients(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "ntlm_allow_clients": "127.0.0.2/32"}, env=ENV)
    r = curl("-x", m.url, f"{origin.url}/hello")
    assert r.returncode != 0
    assert m.wait_for("client 127.0.0.1 refused")
    r = curl("--interface", "127.0.0.2", "-x", m.url, f"{origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    d = mitm(parent.url, {**CREDS, "ntlm_deny_clients": "127.0.0.0/8"}, env=ENV)
    assert curl("-x", d.url, f"{origin.url}/hello").returncode != 0
