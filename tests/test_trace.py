"""The handshake trace: log stages, flow metadata/comments and leg flows, read from mitmweb."""

from __future__ import annotations

import io
import re
import secrets
import socket
import time
from pathlib import Path

import httpx
from mitmproxy.io import FlowReader

from constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from mitm import Mitmdump, curl
from mitmproxy_ntlm.credentials import hashes_from_password, invert

PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Web:
    """mitmweb's own HTTP API: flows as JSON, the flow dump, commands."""

    def __init__(self, m: Mitmdump, port: int) -> None:
        assert m.wait_for("Web server listening")
        token = re.search(r"token=([\w-]+)", m.output)
        self.params = {"token": token.group(1)} if token else {}
        self.base = f"http://127.0.0.1:{port}"
        # Tornado checks POSTs by double submit: the same value as cookie and header.
        self.xsrf = secrets.token_hex(16)
        self.client = httpx.Client(params=self.params, cookies={
            "_xsrf": self.xsrf, "_mitmproxy_xsrf": self.xsrf})  # the name changed in 12

    def flows(self) -> list[dict]:
        return self.client.get(self.base + "/flows").json()

    def dump(self) -> bytes:
        return self.client.get(self.base + "/flows/dump").content

    def command(self, name: str, *args: str) -> str:
        r = self.client.post(f"{self.base}/commands/{name}", json={"arguments": list(args)},
                             headers={"X-XSRFToken": self.xsrf})
        assert r.status_code == 200, r.text
        return str(r.json().get("value", r.json()))


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
    web_port = _free_port()
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
        assert re.fullmatch(rf"NTLMv2 as {re.escape(PRINCIPAL)} via 127\.0\.0\.1:\d+, 3 legs, "
                            r"\d+ ms", real[0]["comment"])
        # The hidden legs as flows: GET+Type 1 -> 407+Type 2, GET+Type 3 -> 200.
        assert [f["response"]["status_code"] for f in legs] == [407, 200]
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
        leg2 = next(f for f in dumped if f.metadata.get("ntlm_leg", {}).get("leg") == 2)
        assert "[Type 3 redacted" in leg2.request.headers["Proxy-Authorization"]
        status = web.command("ntlm.status")
        assert PRINCIPAL in status and "1 authenticated" in status
        type1 = "TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw=="
        decoded = web.command("ntlm.decode", type1)
        assert decoded.startswith("type=1")
        # Log lines for every stage, with parent and client.
        for stage in ("Type 1 sent", "407 received", "Type 2 received", "Type 3 sent",
                      "result=authenticated"):
            assert stage in m.output
        everything = m.output + str(web.flows()) + web.dump().decode("latin-1")
    assert parent.type3_tokens
    assert secrets_in(everything, parent.type3_tokens) == []


def test_failures_are_marked_and_passthrough_connect_is_annotated(tmp_path: Path, parent, origin,
                                                                   tls_origin) -> None:
    web_port = _free_port()
    m = Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                              "ntlm_password": "not-the-password", "web_port": web_port,
                              "ntlm_show_legs": True},
                 "--ignore-hosts", ".*", confdir=tmp_path, tool="mitmweb")
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
        everything = m.output + str(web.flows()) + web.dump().decode("latin-1")
    assert len(parent.type3_tokens) == 2
    assert secrets_in(everything, parent.type3_tokens) == []
