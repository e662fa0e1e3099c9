"""The addon as a user meets it: example config, demo mode, options, version check, reload."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.proxy.layers.http import _upstream_proxy
from mitmproxy.test import taddons

from mitmproxy_ntlm import mitmproxy_internals
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import ROOT, Mitmdump, curl
from tests.servers import client_env, free_port
from tests.web import MitmwebApi


@pytest.mark.parametrize("name", ["upstream.yaml", "regular-mode.yaml", "failover.yaml",
                                  "pac.yaml"])
def test_example_config_yaml_works(tmp_path: Path, parent, origin, name: str) -> None:
    pw = tmp_path / "password"
    pw.write_text(TEST_PASSWORD + "\n")
    pw.chmod(0o600)
    pac = tmp_path / "proxy.pac"
    parent_hostport = parent.url.removeprefix("http://")
    pac.write_text("function FindProxyForURL(url, host) { return "
                   f'"PROXY {parent_hostport}; DIRECT"; }}')
    text = (ROOT / "configs" / name).read_text()
    text = text.replace("http://proxy.corp.example:8080", parent.url)
    text = text.replace("http://proxy1.corp.example:8080", _dead_parent())
    text = text.replace("http://proxy2.corp.example:8080", parent.url)
    text = text.replace("http://wpad.corp.example/wpad.dat", str(pac))
    text = text.replace("localhost, 127.0.0.*, ", "")  # the test origin is on 127.0.0.1
    text = text.replace("~/.mitm-ntlm/password", str(pw))
    text = text.replace("ntlm_username: alice", f"ntlm_username: {TEST_USER}")
    text = text.replace("ntlm_domain: CORP", f"ntlm_domain: {TEST_DOMAIN}")
    http_port, socks_port = free_port(), free_port()
    text = re.sub(r"regular@\d+", f"regular@{http_port}", text)
    text = re.sub(r"socks5@\d+", f"socks5@{socks_port}", text)
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "config.yaml").write_text(text)
    with Mitmdump(None, confdir=confdir) as m:  # everything else comes from config.yaml
        proxy = m.url if "regular@" not in text else f"http://127.0.0.1:{http_port}"
        assert curl("-x", proxy, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]
        if "socks5@" in text:
            r = curl("--socks5", f"127.0.0.1:{socks_port}", f"{origin.url}/hello")
            assert r.stdout == "hello", m.output[-2000:]
    assert parent.snapshot().accepted_count >= 1


def test_multiuser_config_yaml_works(tmp_path: Path, make_parent, origin) -> None:
    parent = make_parent(users={"CORP\\bob": "Bob-Pass-2"})
    text = (ROOT / "configs" / "multiuser.yaml").read_text()
    text = text.replace("http://proxy.corp.example:8080", parent.url)
    text = text.replace("listen_host: 0.0.0.0", "listen_host: 127.0.0.1")
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "config.yaml").write_text(text)
    with Mitmdump(None, confdir=confdir) as m:
        r = curl("--proxy-user", "bob:Bob-Pass-2", "-x", m.url, f"{origin.url}/hello")
        assert r.stdout == "hello", m.output[-2000:]


def test_demo_mode_from_the_readme(tmp_path: Path) -> None:
    port = free_port()
    cli = Path(sys.executable).parent / "mitm-ntlm"
    env = client_env(home=tmp_path)
    proc = subprocess.Popen([str(cli), "start", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = ""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while "listening at" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        assert "listening at" in out, out
        r = curl("-x", f"http://127.0.0.1:{port}", "http://ntlm-demo.invalid/")
        assert "DEMO\\demo" in r.stdout, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode is not None


def test_untested_mitmproxy_is_refused_clearly() -> None:
    with pytest.raises(mitmproxy_internals.UnsupportedMitmproxy, match=r"tested with mitmproxy"):
        mitmproxy_internals.check_version("9.0.1")
    mitmproxy_internals.check_version()  # the installed one is supported


def test_options_change_reenables_credentials_and_done_restores_mitmproxy() -> None:
    original = _upstream_proxy.HttpUpstreamProxy
    addon = NtlmUpstreamAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ntlm_username="alice", ntlm_domain="CORP", ntlm_password="x",
                       ntlm_max_failures=2)
        assert mitmproxy_internals.installed()
        policy = addon.policy
        assert policy is not None and policy.creds is not None
        for _ in range(2):
            policy.rejected_by_parent(policy.creds, "parent:8080")
        assert "stopped sending the credentials" in (addon._blocked_reason() or "")
        tctx.configure(addon, ntlm_password="y")
        assert addon._blocked_reason() is None
        addon.done()
    assert _upstream_proxy.HttpUpstreamProxy is original


def test_status_names_parents_that_let_connections_through_and_the_hosts_they_ask_for(
        ) -> None:
    # Why did this request go without credentials, and that one with its Type 1 at once?
    addon = NtlmUpstreamAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ntlm_username="alice", ntlm_domain="CORP", ntlm_password="x")
        policy = addon.policy
        assert policy is not None
        assert not any("lets new connections through" in line for line in addon.status())
        policy.logon_needs.lets_through["proxy:8080"] = 0
        named = ("intranet.example", "b.example", "\x1b[2Jevil", *(f"h{i}" for i in range(5)))
        for host in named:
            policy.logon_needs.asks_for[("proxy:8080", host)] = True
        line = next(x for x in addon.status() if "lets new connections through" in x)
        assert line.startswith("parent proxy:8080: lets new connections through without a logon")
        assert "asks one for 8 hosts" in line and "and 3 more" in line
        assert "\x1b" not in line  # a client-named host is escaped
        addon.done()


def test_server_tls_first_joins_mitmproxys_chain_only_under_lazy() -> None:
    """Every addon in mitmproxy's chain costs it on every event: `ServerTlsFirst` is there
    only where TlsConfig leaves server TLS for later (connection_strategy lazy)."""
    from mitmproxy.addons.proxyserver import Proxyserver

    from mitmproxy_ntlm.layers.connect_answer import ServerTlsFirst

    addon = NtlmUpstreamAuth()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, ntlm_username="alice", ntlm_domain="CORP", ntlm_password="x")
        assert tctx.master.options.connection_strategy == "eager"
        assert tctx.master.addons.get(ServerTlsFirst.name) is None
        tctx.configure(addon, connection_strategy="lazy")
        assert isinstance(tctx.master.addons.get(ServerTlsFirst.name), ServerTlsFirst)
        tctx.configure(addon, connection_strategy="eager")
        assert tctx.master.addons.get(ServerTlsFirst.name) is None
        addon.done()


@pytest.mark.parametrize("script", ["addons/ntlm.py", "addons/mitmproxy_ntlm/scripts/ntlm.py"])
def test_the_script_module_names_every_hook(script: str) -> None:
    """mitmproxy asks the module for each event's hook first: a missing name costs an
    AttributeError per event; None makes mitmproxy skip it as cheaply."""
    import runpy

    from mitmproxy import hooks

    namespace = runpy.run_path(str(ROOT / script))
    names = set(hooks.all_hooks) - {"add_log"}  # its mere presence makes mitmproxy warn
    assert {name: namespace.get(name, "missing") for name in names} == dict.fromkeys(names)
    assert "add_log" not in namespace
    assert len(namespace["addons"]) == 1


def test_decode_command_describes_without_secrets() -> None:
    import spnego

    addon = NtlmUpstreamAuth()
    client = spnego.client("CORP\\alice", "pw", hostname="p", protocol="ntlm")
    import base64

    lines = addon.decode("NTLM " + base64.b64encode(client.step()).decode())
    assert lines[0].startswith("NTLM, ") and "NTLM Type 1 (Negotiate)" in lines[1]
    assert any(re.search(r"flags:.*\bntlm\b", line) for line in lines)
    assert addon.decode("%%%") == ["token, not valid base64 (3 characters)"]
    assert os.environ.get("LM_COMPAT_LEVEL") is None  # handshakes restore the environment


def _dead_parent() -> str:
    return f"http://127.0.0.1:{free_port()}"




def test_mitmweb_shows_the_authentication_on_the_flow(tmp_path: Path, parent, origin) -> None:
    web_port = free_port()
    m = Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                              "ntlm_password_env": "PW", "web_port": web_port},
                 confdir=tmp_path, tool="mitmweb", env={"PW": TEST_PASSWORD})
    with m:
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        web = MitmwebApi(m, web_port)
        flows = []
        deadline = time.monotonic() + 10
        while not flows and time.monotonic() < deadline:
            r = web.get("/flows")
            assert r.status_code == 200, r.text
            flows = [f for f in r.json() if f.get("comment")]
            time.sleep(0.1)
        assert flows, m.output[-2000:]
        assert flows[0]["comment"].startswith(f"NTLMv2 as {TEST_DOMAIN}\\{TEST_USER} via ")
        assert TEST_PASSWORD not in r.text


def test_console_proxies_through_the_addon(tmp_path: Path, parent, origin) -> None:
    """The mitmproxy console (a real terminal under tmux) loads the addon and shows the flow."""
    port = free_port()
    session = f"ntlm-console-{port}"
    cmd = (f"PW={TEST_PASSWORD} {Path(sys.executable).parent / 'mitmproxy'} "
           f"-s {ROOT / 'addons' / 'ntlm.py'} --mode upstream:{parent.url} "
           f"--listen-host 127.0.0.1 -p {port} --set confdir={tmp_path} "
           f"--set ntlm_username={TEST_USER} --set ntlm_domain={TEST_DOMAIN} "
           f"--set ntlm_password_env=PW")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd],
                   check=True)
    pane = int(subprocess.run(["tmux", "list-panes", "-t", session, "-F", "#{pane_pid}"],
                              capture_output=True, text=True, check=True).stdout.split()[0])
    try:
        deadline = time.monotonic() + 20
        out = ""
        while time.monotonic() < deadline:
            r = curl("-x", f"http://127.0.0.1:{port}", f"{origin.url}/hello")
            if r.stdout == "hello":
                break
            time.sleep(0.2)
        assert r.stdout == "hello", r.stderr
        while time.monotonic() < deadline and not ("/hello" in out and "200" in out):
            out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                 capture_output=True, text=True).stdout
            time.sleep(0.2)
        assert "/hello" in out and "200" in out
        assert parent.snapshot().accepted_count == 1
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        _stop_process_group(pane)  # the console outlives its killed terminal, busy-looping


def _stop_process_group(leader: int) -> None:
    """Stop the process group `leader` leads (TERM, then KILL after 5 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(leader, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def test_script_group_exposes_every_hook_and_command_of_its_parts() -> None:
    """mitmproxy sees the script's addons as one object, the module's only addon; nothing may
    get lost."""
    import importlib.util

    from mitmproxy import hooks

    from mitmproxy_ntlm.script import AddonGroup

    spec = importlib.util.spec_from_file_location("ntlm_script", ROOT / "addons" / "ntlm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (group,) = module.addons
    assert isinstance(group, AddonGroup)
    for part in group.parts:
        for name in hooks.all_hooks:
            if callable(getattr(part, name, None)):
                assert callable(getattr(group, name, None)), f"{type(part).__name__}.{name}"
    commands = {getattr(group, a).command_name for a in dir(group)
                if hasattr(getattr(group, a), "command_name")}
    assert {"ntlm.status", "ntlm.reset", "ntlm.decode"} <= commands
    # Every hook name answers (None: nobody has it); but not add_log: mitmproxy warns "The
    # add_log event has been deprecated" for the attribute.
    assert all(hasattr(group, name) for name in hooks.all_hooks if name != "add_log")
    assert not hasattr(group, "add_log") and not hasattr(module, "add_log")
    assert not hasattr(group, "addons")  # mitmproxy would walk the parts again


def test_group_offers_only_the_hooks_the_options_need() -> None:
    """Each hook call costs mitmproxy more than most of ours do: hooks with nothing to do under
    the current options are not offered, and come back when an option needs them."""
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyauth import ProxyAuth
    from mitmproxy.addons.proxyserver import Proxyserver

    from mitmproxy_ntlm.access import ClientAccess
    from mitmproxy_ntlm.origin import OriginAuth
    from mitmproxy_ntlm.routing import ParentRouter
    from mitmproxy_ntlm.runtime import Runtime
    from mitmproxy_ntlm.script import AddonGroup

    runtime = Runtime()
    access, router = ClientAccess(), ParentRouter(runtime)
    auth, origin = NtlmUpstreamAuth(runtime), OriginAuth(runtime)
    group = AddonGroup(access, router, auth, origin)
    from mitmproxy.test import tflow

    def with_client_basic() -> Any:
        flow = tflow.tflow()
        flow.request.headers["Proxy-Authorization"] = "Basic YWxpY2U6cHc="
        return flow

    per_request = ("response", "error")
    routing = ("next_layer",)
    with taddons.context(ProxyAuth(), Proxyserver(), group) as tctx:
        tctx.configure(group, mode=["upstream:http://127.0.0.1:3128"], listen_host="127.0.0.1")
        # Loaded without a user: nothing to do for any flow or connection, except dropping the
        # clients' proxy credentials (kept only on a request relayed to the parent, as stock).
        for name in (*per_request, *routing, "client_connected", "client_disconnected",
                     "tls_clienthello"):
            assert getattr(group, name) is None, name
        assert group.requestheaders == auth.requestheaders
        assert group.http_connect == auth.http_connect
        assert callable(group.running) and callable(group.done)
        flow = with_client_basic()
        group.requestheaders(flow)
        assert "Proxy-Authorization" in flow.request.headers  # relayed: stock mitmproxy
        flow = with_client_basic()
        flow.request.scheme = "https"  # inside a tunnel: goes to the origin
        group.requestheaders(flow)
        assert "Proxy-Authorization" not in flow.request.headers

        tctx.configure(group, ntlm_username=f"{TEST_DOMAIN}\\{TEST_USER}",
                       ntlm_password=TEST_PASSWORD)
        assert group.response == auth.response and group.error == auth.error
        assert group.next_layer is None and group.client_disconnected is None
        # requestheaders is always offered: it drops the clients' proxy credentials.
        assert group.requestheaders == auth.requestheaders  # not the router's
        flow = with_client_basic()
        group.requestheaders(flow)
        assert "Proxy-Authorization" not in flow.request.headers and flow.response is None
        assert auth.policy is not None
        for _ in range(3):
            auth.policy.guard.rejected(f"{TEST_DOMAIN}\\{TEST_USER}")
        flow = tflow.tflow()
        flow.server_conn.via = ("http", ("127.0.0.1", 3128))
        group.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 502
        assert b"stopped sending the credentials" in flow.response.content
        auth.reset()  # ntlm.reset: nothing to refuse any more
        flow = tflow.tflow()
        group.requestheaders(flow)
        assert flow.response is None

        tctx.configure(group, ntlm_allow_clients=["127.0.0.1"], ntlm_origin_hosts=["intranet.test"])
        assert group.client_connected == access.client_connected
        assert group.tls_clienthello == origin.tls_clienthello

        tctx.configure(group, mode=["regular@0"], ntlm_parent=["http://127.0.0.1:3128"],
                       connection_strategy="lazy")
        assert group.next_layer == router.next_layer
        assert callable(group.requestheaders) and group.requestheaders != auth.requestheaders

        # A refused option: mitmproxy configures the old values again, the hooks follow.
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(group, ntlm_parent=["not a url"])
        assert group.next_layer == router.next_layer

        tctx.configure(group, ntlm_multiuser=True, ntlm_username="", ntlm_password="")
        assert group.client_disconnected == auth.client_disconnected


def test_may_refuse_whenever_credentials_would_be_refused() -> None:
    """The per-request check is skipped only when `credentials()` cannot refuse anyone."""
    from mitmproxy_ntlm.credentials import SecretSources, build_credentials
    from mitmproxy_ntlm.policy import AuthUnavailable, LockoutGuard, UpstreamPolicy

    creds = build_credentials(TEST_USER, TEST_DOMAIN, "WS", SecretSources(password="x"))
    policy = UpstreamPolicy(creds=creds, guard=LockoutGuard(2))
    assert not policy.may_refuse()
    policy.credentials("client-1")
    policy.rejected_by_parent(creds, "parent:8080", "client-1")  # remembered for this client
    assert policy.may_refuse()
    with pytest.raises(AuthUnavailable):
        policy.credentials("client-1")
    policy.rejected.clear()
    policy.rejected_by_parent(creds, "parent:8080", "client-2")
    policy.rejected.clear()  # the guard alone blocks now: 2 of 2
    assert policy.may_refuse()
    with pytest.raises(AuthUnavailable):
        policy.credentials("client-3")
    policy.guard.reset()
    assert not policy.may_refuse()
    assert UpstreamPolicy(creds=None, multiuser=True).may_refuse()  # identities come per client
