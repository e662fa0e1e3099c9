"""A client's proxy credentials never leave mitmproxy: no route delivers its
`Proxy-Authorization` (a user's domain password, in multi-user mode) to an origin server or to
the parent. The matrix runs every mode and route against a recording origin and parent."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.constants import TEST_DOMAIN
from tests.mitm import curl
from tests.servers import free_port

PASSWORD = "Alice-Pass-1"
CLIENT_BASIC = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
SECRETS = (PASSWORD, CLIENT_BASIC.split()[1])
USERS = {"CORP\\alice": PASSWORD}
SINGLE = {"ntlm_username": "alice", "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}
LAZY = {"connection_strategy": "lazy"}


@dataclass(frozen=True)
class Route:
    """One way a flow leaves mitmproxy. `parent`: how the parent is given ("upstream" in
    --mode, "option" as ntlm_parent, "dead" as an unreachable ntlm_parent, "" none)."""

    parent: str
    options: dict[str, object]
    args: tuple[str, ...] = ()
    via_parent: bool = True  # the requests reach the origin through the parent
    socks: bool = False
    https: str = "intercept"  # or "passthrough"
    extra: dict[str, object] = field(default_factory=dict)


ROUTES = {
    "upstream single-user": Route("upstream", SINGLE),
    "upstream multi-user": Route("upstream", MULTI),
    "upstream passthrough": Route("upstream", SINGLE, ("--ignore-hosts", ".*"),
                                  https="passthrough"),
    "upstream roaming direct": Route("dead upstream", {**SINGLE, "ntlm_roaming": True},
                                     via_parent=False),
    "regular, ntlm_parent, single-user": Route("option", {**SINGLE, **LAZY}),
    "regular, ntlm_parent, multi-user": Route("option", {**MULTI, **LAZY}),
    "regular, ntlm_parent, passthrough": Route("option", {**MULTI, **LAZY},
                                               ("--ignore-hosts", ".*"), https="passthrough"),
    "regular NoProxy, multi-user": Route("option", {**MULTI, **LAZY,
                                                    "ntlm_noproxy": "127.0.0.1"},
                                         via_parent=False),
    "regular NoProxy, single-user": Route("option", {**SINGLE, **LAZY,
                                                     "ntlm_noproxy": "127.0.0.1"},
                                          via_parent=False),
    "regular PAC DIRECT, multi-user": Route("", {**MULTI, **LAZY, "ntlm_pac": "DIRECT"},
                                            via_parent=False),
    "regular roaming direct, multi-user": Route("dead", {**MULTI, **LAZY, "ntlm_roaming": True},
                                                via_parent=False),
    "regular without parent, single-user": Route("", SINGLE, via_parent=False),
    "socks5, ntlm_parent, multi-user": Route("option", {**MULTI, **LAZY, "proxyauth": "any"},
                                             ("--mode", "socks5"), socks=True),
    "socks5 NoProxy, single-user": Route("option", {**SINGLE, **LAZY,
                                                    "ntlm_noproxy": "127.0.0.1"},
                                         ("--mode", "socks5"), via_parent=False, socks=True),
}



def _pac(tmp_path: Path) -> str:
    pac = tmp_path / "direct.pac"
    pac.write_text('function FindProxyForURL(url, host) { return "DIRECT"; }\n')
    return str(pac)


@pytest.mark.parametrize("name", list(ROUTES))
def test_client_proxy_credentials_reach_neither_origin_nor_parent(
        name, mitm, make_parent, origin, tls_origin, tmp_path):  # type: ignore[no-untyped-def]
    route = ROUTES[name]
    parent = make_parent(users=USERS)
    options = dict(route.options)
    if options.get("ntlm_pac") == "DIRECT":
        options["ntlm_pac"] = _pac(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    if route.parent == "option":
        options["ntlm_parent"] = parent.url
    elif route.parent == "dead":
        options["ntlm_parent"] = dead
    upstream = {"upstream": parent.url, "dead upstream": dead}.get(route.parent)
    if route.https == "intercept":
        options["ssl_verify_upstream_trusted_ca"] = str(tls_origin.cert_path)
    m = mitm(upstream, options, *route.args, env={"PW": PASSWORD})

    proxy = ["--socks5", m.url.removeprefix("http://")] if route.socks else ["-x", m.url]
    login = ["--proxy-user", f"alice:{PASSWORD}"]
    # A client that also sends its Basic header to the target: on plain http through a SOCKS5
    # proxy, and inside an intercepted tunnel (curl's -H goes to the origin, not the proxy).
    header = ["-H", f"Proxy-Authorization: {CLIENT_BASIC}"]
    plain = [*proxy, *login, *(header if route.socks else [])]
    r = curl(*plain, f"{origin.url}/hello", f"{origin.url}/hello")
    assert r.stdout == "hellohello", (r.stdout, r.stderr, m.output)
    if route.https == "intercept":
        r = curl(*proxy, *login, *header, "--cacert", str(m.ca_cert), f"{tls_origin.url}/hello")
    else:
        r = curl(*proxy, *login, "--cacert", str(tls_origin.cert_path), f"{tls_origin.url}/hello")
    assert r.stdout == "hello", (r.stderr, m.output)

    arrived = origin.requests + tls_origin.requests
    assert len(arrived) == 3
    for request in arrived:
        assert request.header("Proxy-Authorization") is None, (name, request)
        assert not any(s in v for _, v in request.headers for s in SECRETS), (name, request)
    assert parent.other_proxy_credentials == []
    assert bool(parent.requests) == route.via_parent, parent.requests  # the route was taken
    assert not any(s in m.output for s in SECRETS)


def test_an_idle_addon_leaves_stock_upstream_auth_alone(mitm, noauth_parent, origin):
    """Without credentials of its own the addon authenticates nobody: mitmproxy's upstream_auth
    (Basic to the parent) still works, and the origin still gets no proxy credentials."""
    m = mitm(noauth_parent.url, {"upstream_auth": "bob:Bob-Pass-2"})
    r = curl("-x", m.url, f"{origin.url}/hello")
    assert r.stdout == "hello", r.stderr
    bob = "Basic " + base64.b64encode(b"bob:Bob-Pass-2").decode()
    assert noauth_parent.other_proxy_credentials == [bob]
    assert [req.header("Proxy-Authorization") for req in origin.requests] == [None]
