"""The layers in mitmproxy's own HTTP layer, sans I/O: client and parent bytes in, commands out.

mitmproxy's `HttpLayer` runs as in a proxy in upstream (or regular) mode, with our layers in
the places `mitmproxy_internals.sync` puts them (`NtlmUpstreamProxy` for the tunnel to the
parent, `OriginAuthLayer` before the HTTP client of a listed server), bound to a `Runtime`.
`tests.playbook.LayerDriver` answers for the proxy server; the tests play client and parent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, context, layer
from mitmproxy.proxy.layers import TCPLayer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _upstream_proxy
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from mitmproxy.utils import human

from mitmproxy_ntlm import engine as eng
from mitmproxy_ntlm.layers import origin_auth
from mitmproxy_ntlm.layers.upstream import NtlmUpstreamProxy
from mitmproxy_ntlm.policy import UpstreamPolicy
from mitmproxy_ntlm.runtime import Runtime
from tests.constants import TEST_PASSWORD, TEST_PRINCIPAL
from tests.peers import (
    BODY,
    CONNECT,
    GET,
    OK,
    POST,
    TYPE1,
    TYPE3,
    WRONG_SECRET,
    NtlmAcceptor,
    auth_required,
    auth_token,
    policy_for,
    use_user_file,
)
from tests.playbook import LayerDriver, closed, sent_to


@pytest.fixture(autouse=True)
def _parent_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_user_file(tmp_path, monkeypatch)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """A runtime with a policy, bound to the parent layer installed as `sync` installs it."""
    rt = Runtime(policy=policy_for())
    monkeypatch.setattr(NtlmUpstreamProxy, "runtime", rt)
    monkeypatch.setattr(_upstream_proxy, "HttpUpstreamProxy", NtlmUpstreamProxy)
    return rt


def proxy(mode: str = "upstream:http://parent:3128") -> tuple[LayerDriver, connection.Client]:
    """mitmproxy's HTTP layer for a new client connection in `mode`; the driver and client."""
    opts = options.Options()
    Proxyserver().load(opts)  # the options mitmproxy's proxy layers read
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse(mode)
    ctx = context.Context(client, opts)
    http_mode = http_layers.HTTPMode.upstream if mode.startswith("upstream") else \
        http_layers.HTTPMode.regular

    def on_hook(hook: commands.StartHook) -> None:
        if isinstance(hook, layer.NextLayerHook):  # inside a CONNECT: raw TCP
            hook.data.layer = TCPLayer(hook.data.context, ignore=True)

    driver = LayerDriver(http_layers.HttpLayer(ctx, http_mode), on_hook=on_hook)
    driver.start()
    return driver, client


def responses(data: bytes) -> list[int]:
    """Status codes of the responses in `data`, a client's whole stream."""
    return [int(line.split(b" ")[1]) for line in data.split(b"\r\n")
            if line.startswith(b"HTTP/1.1 ")]


def test_plain_http_runs_the_legs_and_the_client_gets_only_the_final_response(
        runtime: Runtime) -> None:
    driver, client = proxy()
    driver.receive(client, GET)
    assert len(driver.opened) == 1
    parent = driver.opened[0]
    assert parent.address == ("parent", 3128)
    acceptor = NtlmAcceptor()

    leg1 = sent_to(parent, driver.commands)
    assert leg1.startswith(b"GET http://origin.test/page HTTP/1.1\r\n")  # absolute-form
    assert auth_token(leg1).startswith(TYPE1)
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(leg1)))
    assert auth_token(leg3).startswith(TYPE3)
    assert acceptor.accepts(leg3) and acceptor.principal == TEST_PRINCIPAL

    driver.receive(parent, OK)
    assert sent_to(client, driver.commands) == OK  # the 407 never reached the client
    assert not closed(client, driver.commands) and not closed(parent, driver.commands)

    driver.receive(client, GET)  # the next request: the connection is authenticated
    assert sent_to(parent, driver.commands).endswith(leg3 + GET)
    assert len(driver.opened) == 1


def test_the_flow_shows_the_final_response(runtime: Runtime) -> None:
    flows: list[http.HTTPFlow] = []

    def on_hook(hook: commands.StartHook) -> None:
        if isinstance(hook, http_layers.HttpResponseHook):
            flows.append(hook.flow)

    driver, client = proxy()
    driver.on_hook = on_hook
    driver.receive(client, GET)
    parent = driver.opened[0]
    acceptor = NtlmAcceptor()
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(
        sent_to(parent, driver.commands))))
    assert acceptor.accepts(leg3)
    driver.receive(parent, OK)
    assert len(flows) == 1 and flows[0].response is not None
    assert flows[0].response.status_code == 200
    assert flows[0].response.content == b"from origin\r\n"


def test_a_post_through_the_layer_probes_with_head_and_sends_its_body_once(
        runtime: Runtime) -> None:
    driver, client = proxy()
    driver.receive(client, POST + BODY)
    parent = driver.opened[0]
    acceptor = NtlmAcceptor()
    probe = sent_to(parent, driver.commands)
    assert probe.startswith(b"HEAD http://origin.test/form HTTP/1.1\r\n") and BODY not in probe
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(probe, head_only=True)))
    assert leg3.startswith(b"POST ") and leg3.endswith(b"\r\n\r\n" + BODY)
    assert acceptor.accepts(leg3)
    driver.receive(parent, OK)
    assert sent_to(parent, driver.commands).count(BODY) == 1
    assert sent_to(client, driver.commands) == OK


def test_a_407_closing_the_connection_continues_on_a_new_one(runtime: Runtime) -> None:
    driver, client = proxy()
    driver.receive(client, GET)
    first = driver.opened[0]
    out = driver.receive(first, NtlmAcceptor().challenge(sent_to(first, driver.commands),
                                                         close=True))
    assert closed(first, out) and len(driver.opened) == 2
    second = driver.opened[1]
    assert second is not first and second.address == first.address
    acceptor = NtlmAcceptor()
    leg1 = sent_to(second, out)
    assert auth_token(leg1).startswith(TYPE1)
    leg3 = sent_to(second, driver.receive(second, acceptor.challenge(leg1)))
    assert acceptor.accepts(leg3)
    driver.receive(second, OK)
    assert sent_to(client, driver.commands) == OK


def test_a_silent_parent_gets_the_client_a_504_when_the_timer_fires(runtime: Runtime) -> None:
    driver, client = proxy()
    driver.receive(client, GET)
    parent = driver.opened[0]
    assert [t.delay for t in driver.timers] == [runtime.policy.handshake_timeout]
    out = driver.wake(driver.timers[0])
    assert responses(sent_to(client, out)) == [504]
    assert b"did not answer the NTLM handshake" in sent_to(client, out)
    assert closed(parent, out)


def test_rejected_credentials_get_the_client_a_502_that_counts_them(
        runtime: Runtime) -> None:
    runtime.policy = policy_for(WRONG_SECRET)
    driver, client = proxy()
    driver.receive(client, GET)
    parent = driver.opened[0]
    acceptor = NtlmAcceptor()
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(
        sent_to(parent, driver.commands))))
    assert not acceptor.accepts(leg3)
    out = driver.receive(parent, auth_required("NTLM"))
    page = sent_to(client, out)
    assert responses(page) == [502] and b"Consecutive rejections: 1 of 3" in page
    assert WRONG_SECRET.encode() not in page
    assert closed(parent, out)
    assert runtime.policy.guard.failures(TEST_PRINCIPAL) == 1


def test_connect_legs_open_the_tunnel_and_its_first_bytes_pass_both_ways(
        runtime: Runtime) -> None:
    driver, client = proxy()
    driver.receive(client, CONNECT)
    assert sent_to(client, driver.commands) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    driver.receive(client, b"client hello")  # mitmproxy opens the tunnel for it
    parent = driver.opened[0]
    acceptor = NtlmAcceptor()
    leg1 = sent_to(parent, driver.commands)
    assert leg1.startswith(b"CONNECT origin.test:443 HTTP/1.1\r\n")
    assert auth_token(leg1).startswith(TYPE1)
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(leg1)))
    assert leg3.startswith(b"CONNECT origin.test:443 ") and acceptor.accepts(leg3)
    assert b"client hello" not in leg1 + leg3  # nothing enters the tunnel before it opens

    out = driver.receive(parent, b"HTTP/1.1 200 Connection established\r\n\r\nserver hello")
    assert sent_to(parent, out) == b"client hello"
    assert sent_to(client, out) == b"server hello"
    hooks = [c for c in driver.commands if isinstance(c, HttpConnectUpstreamHook)]
    assert len(hooks) == 1  # other addons see the CONNECT to the parent once, legs or not


def test_a_connect_with_rejected_credentials_closes_the_tunnel(runtime: Runtime) -> None:
    runtime.policy = policy_for(WRONG_SECRET)
    driver, client = proxy()
    driver.receive(client, CONNECT)
    driver.receive(client, b"client hello")
    parent = driver.opened[0]
    acceptor = NtlmAcceptor()
    leg3 = sent_to(parent, driver.receive(parent, acceptor.challenge(
        sent_to(parent, driver.commands))))
    assert not acceptor.accepts(leg3)
    out = driver.receive(parent, auth_required("NTLM"))
    assert closed(parent, out) and closed(client, out)
    assert b"client hello" not in sent_to(parent, driver.commands)
    assert runtime.policy.guard.failures(TEST_PRINCIPAL) == 1


# ---------------------------------------------------------------- origin servers (401)

def install_origin_logon(monkeypatch: pytest.MonkeyPatch,
                         password: str = TEST_PASSWORD) -> UpstreamPolicy:
    """Automatic logon to intranet.test, installed as `sync` installs it; its policy."""
    policy = policy_for(password)
    creds = policy.creds

    def engines(ctx: context.Context) -> eng.AuthEngine | None:
        server = ctx.server
        if server.address is None or server.address[0] != "intranet.test":
            return None
        return eng.AuthEngine(policy, human.format_address(server.address),
                              human.format_address(ctx.client.peername),
                              target_host="intranet.test", can_reconnect=False,
                              client_id=ctx.client.id, target=eng.ORIGIN, creds=creds)

    monkeypatch.setattr(origin_auth.OriginAuthLayer, "runtime", Runtime(origin_engines=engines))
    monkeypatch.setattr(http_layers, "HttpClient", origin_auth.http_client_with_origin_auth)
    return policy


INTRANET_GET = b"GET http://intranet.test/page HTTP/1.1\r\nHost: intranet.test\r\n\r\n"


def test_an_origin_401_is_answered_on_the_server_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    install_origin_logon(monkeypatch)
    driver, client = proxy("regular")
    driver.receive(client, INTRANET_GET)
    server = driver.opened[0]
    assert server.address == ("intranet.test", 80)
    acceptor = NtlmAcceptor(status=401)
    leg1 = sent_to(server, driver.commands)
    assert leg1.startswith(b"GET /page HTTP/1.1\r\n")  # as mitmproxy sends it to a server
    assert auth_token(leg1, "Authorization").startswith(TYPE1)
    leg3 = sent_to(server, driver.receive(server, acceptor.challenge(leg1)))
    assert auth_token(leg3, "Authorization").startswith(TYPE3)
    assert b"Proxy-Authorization" not in leg1 + leg3
    assert acceptor.accepts(leg3) and acceptor.principal == TEST_PRINCIPAL
    driver.receive(server, OK)
    assert sent_to(client, driver.commands) == OK


def test_a_server_not_listed_gets_no_logon_and_its_401_reaches_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    install_origin_logon(monkeypatch)
    driver, client = proxy("regular")
    driver.receive(client, GET)
    server = driver.opened[0]
    assert server.address == ("origin.test", 80)
    assert b"Authorization" not in sent_to(server, driver.commands)
    unauthorized = auth_required("NTLM", status=401)
    driver.receive(server, unauthorized)
    assert sent_to(client, driver.commands) == unauthorized


def test_an_origin_rejecting_the_logon_passes_its_own_401_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    policy = install_origin_logon(monkeypatch, WRONG_SECRET)
    driver, client = proxy("regular")
    driver.receive(client, INTRANET_GET)
    server = driver.opened[0]
    acceptor = NtlmAcceptor(status=401)
    leg3 = sent_to(server, driver.receive(server, acceptor.challenge(
        sent_to(server, driver.commands))))
    assert not acceptor.accepts(leg3)
    refusal = auth_required("NTLM", status=401, body=b"no entry\n")
    driver.receive(server, refusal)
    assert sent_to(client, driver.commands) == refusal
    assert policy.guard.failures(TEST_PRINCIPAL) == 1


def test_sync_installs_what_the_runtime_needs_and_uninstall_puts_mitmproxy_back() -> None:
    """Every swap is made by `mitmproxy_internals.sync` and undone by `uninstall`."""
    from mitmproxy.proxy import mode_servers, server

    from mitmproxy_ntlm import mitmproxy_internals as internals
    from mitmproxy_ntlm.layers import connect_answer
    from mitmproxy_ntlm.pool import ParentPool

    stream, handler = http_layers.HttpStream, server.ConnectionHandler
    own = (internals.ORIGINAL_UPSTREAM_LAYER, internals.ORIGINAL_HTTP_CLIENT,
           internals.ORIGINAL_OPEN, internals.ORIGINAL_HANDLE, internals.ORIGINAL_CONNECT_REGULAR,
           internals.ORIGINAL_CONNECT_FINISH, internals.ORIGINAL_LISTEN)  # mitmproxy's own
    listener = mode_servers.AsyncioServerInstance
    rt = Runtime(policy=policy_for())
    try:
        internals.sync(rt)  # a policy, no pool, no origin logons
        assert _upstream_proxy.HttpUpstreamProxy is NtlmUpstreamProxy
        assert NtlmUpstreamProxy.runtime is rt
        assert stream.handle_connect_finish is connect_answer.handle_connect_finish
        assert handler.open_connection is own[2] and http_layers.HttpClient is own[1]
        rt.replace_pool(ParentPool(30, 32, per_key=16, wait_timeout=5, grace=0.05))
        rt.origin_engines = lambda context: None
        internals.sync(rt)
        assert handler.open_connection is not own[2] and handler.handle_connection is not own[3]
        assert http_layers.HttpClient is origin_auth.http_client_with_origin_auth
        assert origin_auth.OriginAuthLayer.runtime is rt
        assert listener.listen is own[6]  # a port of its own
        rt.shared_port = True
        internals.sync(rt)
        assert listener.listen is not own[6] and listener.listen._ntlm_original is own[6]
    finally:
        internals.uninstall(rt)
    assert (_upstream_proxy.HttpUpstreamProxy, http_layers.HttpClient, handler.open_connection,
            handler.handle_connection, stream.handle_connect_regular,
            stream.handle_connect_finish, listener.listen) == own
    assert rt.pool is None and rt.policy is None and not rt.shared_port
    assert not internals.installed()
    assert NtlmUpstreamProxy.runtime is None and origin_auth.OriginAuthLayer.runtime is None
