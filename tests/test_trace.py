"""The handshake trace: log stages, flow metadata/comments and leg flows, read from mitmweb."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from mitmproxy.io import FlowReader

from mitmproxy_ntlm.credentials import hashes_from_password, invert
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump, curl
from tests.servers import free_port
from tests.web import MitmwebApi as Web

PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"




def _wait(predicate, timeout: float = 10):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def secrets_in(text: str, tokens: list[str]) -> list[str]:
    lm, nt = hashes_from_password(TEST_PASSWORD)
    found = [s for s in (TEST_PASSWORD, nt.hex(), lm.hex(), invert(nt).hex())
             if s.lower() in text.lower()]
    return found + [t[:16] for t in tokens if t in text or t[:40] in text]


def test_trace_in_log_flows_and_mitmweb(tmp_path: Path, parent, origin) -> None:
    web_port = free_port()
    m = Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                              "ntlm_password_env": "PW", "web_port": web_port,
                              "ntlm_show_legs": True},
                 confdir=tmp_path, tool="mitmweb", env={"PW": TEST_PASSWORD})
    with m:
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        web = Web(m, web_port)
        flows = _wait(lambda: [f for f in web.flows() if f.get("comment")])
        real = [f for f in flows if not f["comment"].startswith("NTLM leg")]
        legs = [f for f in flows if f["comment"].startswith("NTLM leg")]
        assert len(real) == 1
        main = real[0]
        assert re.fullmatch(rf"NTLMv2 as {re.escape(PRINCIPAL)} via 127\.0\.0\.1:\d+, 3 legs, "
                            rf"\d+ ms; handshake requests listed above it: "
                            rf"{legs[0]['id'][:8]}, {legs[1]['id'][:8]}", main["comment"])
        # The hidden legs as flows: GET+Type 1 -> 407+Type 2, GET+Type 3 -> 200, listed
        # before the flow they belong to (as Fiddler does), each naming it.
        assert [f["response"]["status_code"] for f in legs] == [407, 200]
        assert [f["id"] for f in flows] == [legs[0]["id"], legs[1]["id"], main["id"]]
        assert legs[0]["comment"].startswith(
            f"NTLM leg 1 of 2 for GET {origin.url}/hello (flow {main['id'][:8]}): Type 1 -> "
            f"407 Type 2 challenge from 127.0.0.1:")
        assert legs[1]["comment"].startswith(
            f"NTLM leg 2 of 2 for GET {origin.url}/hello (flow {main['id'][:8]}): Type 3 as "
            f"{PRINCIPAL} (NTLMv2, responses not shown) -> 200")
        # Each leg has its own real times, not a shared timestamp and 0 ms.
        first, second = (f["request"]["timestamp_start"] for f in legs)
        assert main["request"]["timestamp_start"] <= first < second
        for leg in legs:
            assert leg["request"]["timestamp_start"] <= leg["response"]["timestamp_start"] \
                <= leg["response"]["timestamp_end"]
        assert legs[0]["response"]["timestamp_end"] <= second
        dumped = list(FlowReader(io.BytesIO(web.dump())).stream())
        story = next(f for f in dumped if "ntlm" in f.metadata)
        meta = story.metadata["ntlm"]
        assert meta["result"] == "authenticated" and meta["dialect"] == "NTLMv2"
        assert [s["stage"] for s in meta["stages"]] == [
            "scheme chosen", "Type 1 sent", "407 received", "Type 2 received", "Type 3 sent",
            "result"]
        assert meta["scheme"] == "NTLM" and meta["why"].startswith("NTLM: ")
        leg1 = next(f for f in dumped if f.metadata.get("ntlm_leg", {}).get("leg") == 1)
        assert leg1.metadata["ntlm_leg"]["sent"]["type"] == 1
        assert "netbios_computer" in leg1.metadata["ntlm_leg"]["received"]
        assert leg1.response.text == "Proxy authentication required.\n"  # the parent's 407 page
        assert leg1.request.headers["Proxy-Authorization"].startswith("NTLM TlRMTVNT")
        assert leg1.response.headers["Proxy-Authenticate"].startswith("NTLM TlRMTVNT")
        leg2 = next(f for f in dumped if f.metadata.get("ntlm_leg", {}).get("leg") == 2)
        assert "[Type 3 redacted" in leg2.request.headers["Proxy-Authorization"]
        assert leg2.metadata["ntlm_leg"]["sent"]["user"] == TEST_USER
        assert {leg1.metadata["ntlm_leg"]["flow"], leg2.metadata["ntlm_leg"]["flow"]} == \
            {story.id}
        assert story.metadata["ntlm_legs"] == [leg1.id, leg2.id]
        status = web.command("ntlm.status")
        assert PRINCIPAL in status and "1 authenticated" in status
        type1 = "TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw=="
        decoded = web.command("ntlm.decode", type1)
        assert "NTLM Type 1 (Negotiate)" in decoded  # lines, as the console shows them
        # Log lines for every stage, with parent and client.
        for stage in ("Type 1 sent", "407 received", "Type 2 received", "Type 3 sent",
                      "result=authenticated"):
            assert stage in m.output
        everything = m.output + str(web.flows()) + web.dump().decode("latin-1")
    assert parent.type3_tokens
    assert secrets_in(everything, parent.type3_tokens) == []


def test_failures_are_marked_and_passthrough_connect_is_annotated(tmp_path: Path, parent, origin,
                                                                   tls_origin) -> None:
    web_port = free_port()
    m = Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                              "ntlm_password_env": "PW", "web_port": web_port,
                              "ntlm_show_legs": True},
                 "--ignore-hosts", ".*", confdir=tmp_path, tool="mitmweb",
                 env={"PW": "not-the-password"})
    with m:
        r = curl("-x", m.url, f"{origin.url}/hello")
        assert "rejected the NTLM credentials" in r.stdout
        curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
        web = Web(m, web_port)
        flows = _wait(lambda: [f for f in web.flows()
                               if "rejected" in f.get("comment", "") and f["marked"]
                               and not f["comment"].startswith("NTLM leg")], timeout=10)
        methods = sorted(f["request"]["method"] for f in flows)
        assert methods == ["CONNECT", "GET"], [(f["request"]["method"], f["comment"])
                                               for f in web.flows()]
        for f in flows:
            assert f["comment"].startswith("parent 127.0.0.1:") and PRINCIPAL in f["comment"]
        # The passed-through CONNECT shows the parent's 407 and its page, not the 200
        # mitmproxy had answered before the handshake; the comment says what the client got.
        connect = next(f for f in flows if f["request"]["method"] == "CONNECT")
        assert connect["response"]["status_code"] == 407, connect["response"]
        assert "the client had been told 200 Connection established before the handshake" \
            in connect["comment"]
        # (Its page is kept as far as it had arrived with the head: the rejection ends the
        # connection at once, so it is not asserted here; the Type 2 leg's page always is.)
        everything = m.output + str(web.flows()) + web.dump().decode("latin-1")
    assert len(parent.type3_tokens) == 2
    assert secrets_in(everything, parent.type3_tokens) == []


def test_leg_flows_keep_a_bounded_dechunked_407_page_and_their_own_times() -> None:
    """Sans-I/O: a leg flow shows the parent's chunked 407 page as text, at most BODY_LIMIT
    bytes of it are kept, and each leg has the times its exchange had."""
    from mitmproxy.test import tflow

    from mitmproxy_ntlm.legflows import leg_flows, parent_answer
    from mitmproxy_ntlm.trace import BODY_LIMIT, HandshakeTrace

    trace = HandshakeTrace("parent:3128", "client", "GET http://example/")
    trace.sent(b"GET http://example/ HTTP/1.1\r\nHost: example\r\n\r\n")
    trace.received(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
    trace.received_body(b"6\r\nDenied\r\n", done=False)
    trace.received_body(b"1;ext=1\r\n.\r\n0\r\n\r\n")
    trace.sent(b"GET http://example/ HTTP/1.1\r\nHost: example\r\n\r\n")
    trace.received(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 9000\r\n\r\n")
    trace.received_body(b"x" * 9000)
    main = tflow.tflow()
    first, second = leg_flows(trace, main.client_conn, main.server_conn, belongs_to=main)
    assert first.response.text == "Denied."
    assert len(second.response.raw_content) == BODY_LIMIT
    assert first.request.timestamp_start < second.request.timestamp_start
    assert first.timestamp_created < second.timestamp_created < main.timestamp_created
    assert first.comment.startswith(f"NTLM leg 1 of 2 for GET {main.request.pretty_url} "
                                    f"(flow {main.id[:8]}): no token -> 407")
    assert parent_answer(trace).status_code == 407


def test_traces_live_with_their_connections_and_a_short_history() -> None:
    """A flow finds its connection's trace while the connection's layer holds it; once the
    layer is gone only the latest RECENT_TRACES stay (ntlm.status, ntlm.report), so a busy
    day's traces do not pile up in the heap the collector walks."""
    import gc

    from mitmproxy_ntlm.policy import RECENT_TRACES, UpstreamPolicy
    from mitmproxy_ntlm.trace import HandshakeTrace

    policy = UpstreamPolicy(creds=None)
    open_layers = []  # what the layers of still-open connections hold: their engines' traces
    for n in range(RECENT_TRACES + 100):
        trace = HandshakeTrace("parent:3128", f"client:{n}", "CONNECT example:443")
        trace.finish("authenticated")
        policy.record(f"conn-{n}", trace)
        if n < 10:
            open_layers.append(trace)
    gc.collect()
    assert policy.trace("conn-0") is open_layers[0]  # open, though past the history's bound
    assert policy.trace("conn-50") is None  # closed and older than the history
    assert policy.trace(f"conn-{RECENT_TRACES + 99}") is not None  # closed, in the history
    kept = policy.kept_traces()
    assert len(kept) == RECENT_TRACES + 10 and len({id(t) for t in kept}) == len(kept)
    assert kept[:10] == open_layers  # open ones older than the history come first
    del open_layers, trace, kept
    gc.collect()
    assert policy.trace("conn-0") is None and len(policy.kept_traces()) == RECENT_TRACES
