"""`ntlm_pac: auto` (WPAD by DNS, then the system's proxy settings) and PAC reloading.

WPAD is served by a real HTTP server on loopback; `wpad.<domain>` reaches it through the
resolver hook discovery takes (`SystemProbe.resolve`), so no hosts file or port 80 is needed.
Routing is observed through the real mitmdump and the test parent.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mitmproxy_ntlm import discovery
from mitmproxy_ntlm.discovery import SystemProbe
from mitmproxy_ntlm.pac import Found, PacError, PacResolver
from mitmproxy_ntlm.pac_watch import PacWatcher, network_fingerprint
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER
from tests.mitm import curl
from tests.servers import free_port

ENV = {"PW": TEST_PASSWORD}
CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW",
         "connection_strategy": "lazy"}


def pac_text(answer: str) -> str:
    return f'function FindProxyForURL(url, host) {{ return "{answer}"; }}\n'


class PacServer:
    """Serves `body` at any path on loopback; `failing` answers 503; records Host headers."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.failing = False
        self.hosts: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hosts.append(self.headers.get("Host", ""))
                data = owner.body.encode()
                self.send_response(503 if owner.failing else 200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/proxy.pac"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pac_server() -> Iterator[PacServer]:
    server = PacServer(pac_text("DIRECT"))
    yield server
    server.close()


def quiet_probe(**kwargs: object) -> SystemProbe:
    """A probe that sees nothing of this machine unless told."""
    base: dict[str, object] = {"fqdn": lambda: "pc", "resolv_conf": lambda: "",
                               "resolve": lambda host: [], "environ": {},
                               "run": lambda args: None, "kde_config": Path("/nonexistent")}
    return SystemProbe(**{**base, **kwargs})  # type: ignore[arg-type]


def evaluate(script: str, url: str, host: str) -> str:
    resolver = PacResolver(script)
    try:
        choices = resolver.choices(url.split(":", 1)[0], host, url)
    finally:
        resolver.close()
    return "; ".join("DIRECT" if c is None else f"{c[0]} {c[1][0]}:{c[1][1]}" for c in choices)


# --- WPAD by DNS -----------------------------------------------------------------------------

def test_wpad_names_stop_before_public_suffixes():
    resolv_conf = "# comment\nsearch lab.corp.test corp.com\ndomain x.appspot.com\n"
    domains = discovery.dns_domains("pc.eu.corp.example.co.uk.", resolv_conf)
    assert domains == ["eu.corp.example.co.uk", "lab.corp.test", "corp.com", "x.appspot.com"]
    assert discovery.wpad_hosts(domains) == [
        "wpad.eu.corp.example.co.uk", "wpad.corp.example.co.uk", "wpad.example.co.uk",
        "wpad.lab.corp.test", "wpad.corp.test", "wpad.corp.com", "wpad.x.appspot.com"]
    assert discovery.wpad_hosts(["com", "co.uk"]) == []


def test_wpad_is_found_first_through_the_resolver(pac_server):
    pac_server.body = pac_text("PROXY parent.corp.test:3128")
    looked_up: list[str] = []

    def resolve(host: str) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"] if host == "wpad.corp.test" else []
    probe = quiet_probe(fqdn=lambda: "pc.eu.corp.test", resolve=resolve,
                        wpad_port=pac_server.port, environ={"http_proxy": "http://env:1"})
    found = discovery.discover(probe)
    assert found.source == "WPAD http://wpad.corp.test/wpad.dat (127.0.0.1)"
    assert found.script == pac_server.body
    assert looked_up == ["wpad.eu.corp.test", "wpad.corp.test"]  # nearest domain first
    assert pac_server.hosts == ["wpad.corp.test"]


def test_a_wpad_answer_that_is_no_pac_script_is_skipped(pac_server):
    pac_server.body = "<html>parked domain</html>"
    probe = quiet_probe(fqdn=lambda: "pc.corp.test", resolve=lambda host: ["127.0.0.1"],
                        wpad_port=pac_server.port, environ={"http_proxy": "http://env:3128"})
    found = discovery.discover(probe)
    assert found.source == "environment (http_proxy/https_proxy)"
    assert pac_server.hosts == ["wpad.corp.test"]


# --- system proxy settings -------------------------------------------------------------------

def test_environment_proxies_no_proxy_and_our_own_address_is_skipped():
    probe = quiet_probe(environ={"HTTP_PROXY": "http://user@proxy.corp:3128/",
                                 "https_proxy": "secure.corp:8443",
                                 "no_proxy": "localhost, .internal.corp, 10.0.0.0/8, *.lan:80"})
    script = discovery.discover(probe).script
    assert evaluate(script, "http://www.example/", "www.example") == "http proxy.corp:3128"
    assert evaluate(script, "https://www.example/", "www.example") == "http secure.corp:8443"
    for host in ("localhost", "internal.corp", "a.internal.corp", "10.1.2.3", "box.lan"):
        assert evaluate(script, f"http://{host}/", host) == "DIRECT", host
    assert evaluate(script, "http://11.1.2.3/", "11.1.2.3") == "http proxy.corp:3128"

    own = quiet_probe(environ={"http_proxy": "http://127.0.0.1:3128"},
                      is_own=lambda host, port: (host, port) == ("127.0.0.1", 3128))
    with pytest.raises(PacError, match="found nothing"):
        discovery.discover(own)


def test_a_hostile_no_proxy_entry_cannot_inject_javascript():
    script = discovery.fixed_proxy_pac(("p", 1), None, ['x"); return "PROXY evil:1'])
    assert "evil" not in script
    assert evaluate(script, "http://x/", "x") == "http p:1"


GNOME: dict[tuple[str, str], str] = {
    ("org.gnome.system.proxy", "mode"): "'manual'\n",
    ("org.gnome.system.proxy.http", "host"): "'gnome-proxy.corp'\n",
    ("org.gnome.system.proxy.http", "port"): "8080\n",
    ("org.gnome.system.proxy.https", "host"): "''\n",
    ("org.gnome.system.proxy.https", "port"): "0\n",
    ("org.gnome.system.proxy", "ignore-hosts"): "['localhost', '127.0.0.0/8']\n",
}
SCUTIL = """<dictionary> {
  ExceptionsList : <array> {
    0 : *.local
  }
  HTTPEnable : 1
  HTTPPort : 3128
  HTTPProxy : mac-proxy.corp
  HTTPSEnable : 0
}
"""


def test_discovery_order_environment_gnome_kde_macos(tmp_path):
    gnome = dict(GNOME)

    def run(args: list[str]) -> str | None:
        if args[0] == "gsettings":
            return gnome.get((args[2], args[3]))
        return SCUTIL if args == ["scutil", "--proxy"] else None
    kde = tmp_path / "kioslaverc"
    kde.write_text("[Proxy Settings]\nProxyType=1\nhttpProxy=http://kde-proxy.corp 3129\n"
                   "NoProxyFor=.corp.example\n")
    probe = quiet_probe(environ={"http_proxy": "http://env-proxy:1"}, run=run, kde_config=kde)
    assert discovery.discover(probe).source.startswith("environment")
    probe.environ = {}
    found = discovery.discover(probe)
    assert found.source == "GNOME proxy settings"
    assert evaluate(found.script, "http://a/", "a") == "http gnome-proxy.corp:8080"
    assert evaluate(found.script, "https://a/", "a") == "DIRECT"
    assert evaluate(found.script, "http://127.0.0.1/", "127.0.0.1") == "DIRECT"
    gnome[("org.gnome.system.proxy", "mode")] = "'none'\n"
    found = discovery.discover(probe)
    assert found.source == "KDE proxy settings"
    assert evaluate(found.script, "http://a/", "a") == "http kde-proxy.corp:3129"
    assert evaluate(found.script, "http://b.corp.example/", "b.corp.example") == "DIRECT"
    kde.unlink()
    found = discovery.discover(probe)
    assert found.source == "macOS network settings"
    assert evaluate(found.script, "http://a/", "a") == "http mac-proxy.corp:3128"
    assert evaluate(found.script, "http://printer.local/", "printer.local") == "DIRECT"


def test_a_pac_url_from_the_system_settings_is_fetched(pac_server, tmp_path):
    pac_server.body = pac_text("PROXY kde-pac.corp:8080")
    kde = tmp_path / "kioslaverc"
    kde.write_text(f"[Proxy Settings]\nProxyType=2\nProxy Config Script={pac_server.url}\n")
    found = discovery.discover(quiet_probe(kde_config=kde))
    assert found == Found(pac_server.body, f"KDE proxy settings: PAC {pac_server.url}")


# --- the running proxy -----------------------------------------------------------------------

def test_auto_routes_through_the_environment_proxy(mitm, parent, origin):
    m = mitm(None, {**CREDS, "ntlm_pac": "auto"},
             env={**ENV, "http_proxy": parent.url, "no_proxy": "localhost"})
    assert m.wait_for("PAC file loaded from environment (http_proxy/https_proxy)")
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    local = origin.url.replace("127.0.0.1", "localhost")
    assert curl("-x", m.url, f"{local}/hello").stdout == "hello"
    assert [(x.target, x.user) for x in parent.requests] == [
        (f"{origin.url}/hello", TEST_PRINCIPAL)]  # localhost went direct


def test_auto_skips_a_proxy_that_is_this_mitmproxy(mitm):
    port = free_port()
    m = mitm(None, {**CREDS, "ntlm_pac": "auto"}, "--mode", f"regular@{port}",
             env={**ENV, "http_proxy": f"http://127.0.0.1:{port}"})
    assert m.wait_for(f"environment (http_proxy/https_proxy) names this mitmproxy "
                      f"(127.0.0.1:{port}): no PAC in use")
    assert "PAC file loaded" not in m.output


def test_the_network_fingerprint_follows_resolv_conf(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search corp.test\n")
    before = network_fingerprint(str(resolv))
    assert network_fingerprint(str(resolv)) == before
    resolv.write_text("search home.test\n")
    os.utime(resolv, ns=(1, 1))
    assert network_fingerprint(str(resolv)) != before


def test_the_watcher_fetches_on_network_change_and_keeps_the_last_good(caplog):
    """A slow or failing loader runs off the loop; a network change triggers a fetch."""
    network = ["office"]
    answers: list[Found | PacError] = [Found("one", "src")]
    applied: list[str] = []

    def load() -> Found:
        answer = answers[0]
        if isinstance(answer, PacError):
            raise answer
        return answer

    async def scenario() -> None:
        watcher = PacWatcher("test", load, lambda found: applied.append(found.script),
                             refresh=0, fetch_at_start=True, network=lambda: network[0],
                             poll=0.02)
        watcher.start()
        try:
            await until(lambda: applied == ["one"])
            answers[0] = Found("two", "src")
            network[0] = "home"
            await until(lambda: applied == ["one", "two"])
            answers[0] = PacError("cannot fetch it")
            for place in ("cafe", "train", "office"):
                network[0] = place
                await asyncio.sleep(0.1)
            answers[0] = Found("two", "src")
            watcher.reload_now()
            await until(lambda: "PAC fetched again" in caplog.text)
        finally:
            watcher.stop()

    with caplog.at_level(logging.INFO, logger="mitmproxy_ntlm"):
        asyncio.run(scenario())
    assert applied == ["one", "two"]  # the failures kept "two"; the same "two" again is quiet
    assert caplog.text.count("cannot fetch it: keeping the last good PAC") == 1


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never became true")


def test_a_changed_pac_file_changes_the_routing_after_a_refresh(mitm, parent, origin, tmp_path):
    pac = tmp_path / "proxy.pac"
    pac.write_text(pac_text("DIRECT"))
    m = mitm(None, {**CREDS, "ntlm_pac": str(pac), "ntlm_pac_refresh": 1}, env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert parent.requests == []
    pac.write_text(pac_text(f"PROXY {parent.url.removeprefix('http://')}"))
    assert _seen_times(m, f"PAC file loaded from {pac}", 2)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL]


def _seen_times(m, text: str, times: int, timeout: float = 10) -> bool:
    """Whether `text` shows `times` times in mitmdump's output within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while m.output.count(text) < times and time.monotonic() < deadline:
        time.sleep(0.1)
    return m.output.count(text) == times


def test_a_failed_pac_fetch_keeps_the_last_good_pac(mitm, parent, origin, pac_server):
    pac_server.body = pac_text(f"PROXY {parent.url.removeprefix('http://')}")
    m = mitm(None, {**CREDS, "ntlm_pac": pac_server.url, "ntlm_pac_refresh": 1}, env=ENV)
    pac_server.failing = True
    assert m.wait_for("keeping the last good PAC", 10)
    fetches = len(pac_server.hosts)
    deadline = time.monotonic() + 10
    while len(pac_server.hosts) < fetches + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL]
    assert m.output.count("keeping the last good PAC") == 1  # one line, not one per attempt
    pac_server.failing = False
    assert m.wait_for("PAC fetched again from", 10)


def test_sighup_fetches_the_pac_again_without_a_schedule(mitm, parent, origin, tmp_path):
    pac = tmp_path / "proxy.pac"
    pac.write_text(pac_text("DIRECT"))
    m = mitm(None, {**CREDS, "ntlm_pac": str(pac), "ntlm_pac_refresh": 0}, env=ENV)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"  # running, direct
    assert parent.requests == []
    pac.write_text(pac_text(f"PROXY {parent.url.removeprefix('http://')}"))
    assert m.proc is not None
    m.proc.send_signal(signal.SIGHUP)
    assert _seen_times(m, f"PAC file loaded from {pac}", 2)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL]


# --- untrusted PAC scripts -------------------------------------------------------------------

LOOPING_PACS = ["for(;;){}\n" + pac_text("DIRECT"),
                'function FindProxyForURL(url, host) { for(;;){} return "DIRECT"; }\n']


@pytest.mark.parametrize("script", LOOPING_PACS)
def test_a_pac_that_never_finishes_is_refused_by_the_test_evaluation(script):
    from mitmproxy_ntlm.pac import check_pac
    check_pac(pac_text("PROXY a:1; DIRECT"))  # a good one passes
    with pytest.raises(PacError, match="did not finish within 1 s"):
        check_pac(script, timeout=1)


def test_a_looping_pac_keeps_the_last_good_one_and_the_proxy_serving(mitm, parent, origin,
                                                                   pac_server):
    pac_server.body = pac_text(f"PROXY {parent.url.removeprefix('http://')}")
    m = mitm(None, {**CREDS, "ntlm_pac": pac_server.url, "ntlm_pac_refresh": 1}, env=ENV)
    pac_server.body = LOOPING_PACS[0]
    assert m.wait_for("did not finish within", 15)
    assert curl("-x", m.url, f"{origin.url}/hello", timeout=20).stdout == "hello"
    assert [x.user for x in parent.requests] == [TEST_PRINCIPAL]  # the last good PAC


class ConnectionRecorder:
    """A loopback listener that counts the connections it gets (and answers none)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_a_pac_naming_a_proxy_not_allowed_gets_it_no_connection(mitm, parent, origin,
                                                                 pac_server):
    recorder = ConnectionRecorder()
    try:
        pac_server.body = pac_text(f"PROXY localhost:{recorder.port}; "
                                   f"PROXY {parent.url.removeprefix('http://')}")
        m = mitm(None, {**CREDS, "ntlm_pac": pac_server.url, "ntlm_pac_parents": "127.0.0.1"},
                 env=ENV)
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        assert recorder.accepted == 0
        assert [x.user for x in parent.requests] == [TEST_PRINCIPAL] * 2  # allowed: used
        assert m.output.count(f"the PAC names the proxy 'localhost:{recorder.port}', which is "
                              f"not an allowed parent (ntlm_pac_parents): skipped") == 1
    finally:
        recorder.sock.close()


def test_a_wpad_pac_may_only_name_the_configured_parents():
    """WPAD can be answered by anyone on the LAN: by default its PAC picks among ntlm_parent
    only, anything else is skipped (and DIRECT if nothing is left); a PAC the user configured
    may name any parent but this mitmproxy."""
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from mitmproxy_ntlm.routing import ParentRouter

    router = ParentRouter()
    with taddons.context(Proxyserver(), router) as tctx:
        tctx.configure(router, ntlm_parent=["proxy.corp.test:8080"], listen_port=8080,
                       connection_strategy="lazy")
        wpad = pac_text("PROXY evil.test:3128; PROXY proxy.corp.test:8080; DIRECT")
        router._use_pac(Found(wpad, "WPAD http://wpad.corp.test/wpad.dat", spoofable=True))
        assert router.choose("http", "example.com", 80) == ("http", ("proxy.corp.test", 8080))
        router._use_pac(Found(pac_text("PROXY evil.test:3128"), "WPAD", spoofable=True))
        assert router.choose("http", "example.org", 80) is None
        assert ("http", ("evil.test", 3128)) not in router.parents.specs
        tctx.configure(router, ntlm_pac_parents=["*.test", "localhost"])
        assert router.choose("http", "example.org", 80) == ("http", ("evil.test", 3128))
        router._use_pac(Found(pac_text("PROXY localhost:8080; PROXY other.test:1"), "file"))
        assert router.choose("http", "example.net", 80) == ("http", ("other.test", 1))
        assert ("http", ("evil.test", 3128)) not in router.parents.specs  # forgotten
        router.done()


def test_parents_a_pac_names_are_capped_and_forgotten():
    from mitmproxy_ntlm.parents import LEARNED_MAX, ParentList

    parents = ParentList([("http", ("static", 1))])
    for port in range(LEARNED_MAX + 5):
        parents.remember(("http", ("learned", port)))
    assert len(parents.specs) == 1 + LEARNED_MAX
    assert ("http", ("learned", 0)) not in parents.specs  # the oldest left first
    parents.forget_learned()
    assert parents.specs == [("http", ("static", 1))]


def test_a_pac_server_that_drips_its_file_is_given_up_at_the_deadline():
    """The socket timeout bounds each read only: a byte every 0.1 s must not keep the fetch
    going past its total time limit."""
    from mitmproxy_ntlm.pac import load_pac

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pac_text("DIRECT").encode()[:40]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PacError, match="took too long"):
            load_pac(f"http://127.0.0.1:{server.server_address[1]}/proxy.pac", timeout=1)
    finally:
        server.shutdown()
        server.server_close()
