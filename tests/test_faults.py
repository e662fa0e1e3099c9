"""A parent that misbehaves on purpose: the affected client gets a clear error in time, the
other clients of the same proxy keep working, and nothing secret leaks."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump, curl
from tests.servers import free_port
from tests.web import MitmwebApi

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}


@pytest.mark.parametrize(
    ("fault", "status", "messages"),
    [
        ("close_mid_body", "502", ["closed the connection during the NTLM handshake"]),
        ("close_after_type2", "502", ["closed the connection during the NTLM handshake"]),
        ("truncated_header", "502", ["closed the connection during the NTLM handshake"]),
        ("oversized_header", "502", ["larger than 65536 bytes"]),
        ("slowloris", "504", ["did not answer the NTLM handshake within 3 s"]),
        ("bogus_type2", "502", ["unusable NTLM challenge", "rejected the NTLM credentials"]),
        ("switch_to_basic", "502", ["does not offer NTLM (it offers: Basic)"]),
        ("switch_to_negotiate", "502", ["does not offer NTLM (it offers: Negotiate)"]),
        ("never_answer", "504", ["did not answer the NTLM handshake within 3 s"]),
    ],
)
def test_fault_is_contained(mitm, parent, make_parent, origin, tmp_path, fault, status, messages):
    bad = make_parent(fault=fault)
    pac = tmp_path / "route.pac"
    pac.write_text(
        "function FindProxyForURL(url, host) {\n"
        f'  if (host == "localhost") return "PROXY {bad.url.removeprefix("http://")}";\n'
        f'  return "PROXY {parent.url.removeprefix("http://")}";\n'
        "}\n")
    m = mitm(None, {**CREDS, "ntlm_pac": str(pac), "connection_strategy": "lazy",
                    "ntlm_handshake_timeout": 3}, env={"PW": TEST_PASSWORD})
    affected: dict[str, object] = {}

    def bad_client() -> None:
        start = time.monotonic()
        r = curl("-x", m.url, "-w", "\n%{http_code}", origin.url.replace("127.0.0.1", "localhost")
                 + "/hello", timeout=30)
        affected.update(out=r.stdout, seconds=time.monotonic() - start)

    thread = threading.Thread(target=bad_client)
    thread.start()
    time.sleep(0.3)  # the bad handshake is under way
    for _ in range(5):  # meanwhile, others are served
        assert curl("-x", m.url, f"{origin.url}/hello", timeout=10).stdout == "hello"
    thread.join(30)
    out = str(affected["out"])
    assert out.endswith(status), out
    assert any(text in out for text in messages), out
    assert float(affected["seconds"]) < 10  # type: ignore[arg-type]
    assert m.proc and m.proc.poll() is None
    assert TEST_PASSWORD not in m.output


@pytest.mark.parametrize("swap", ["fifo", "directory", "latin1"])
def test_a_bad_password_file_set_at_runtime_is_refused_and_the_proxy_keeps_serving(
        parent, origin, tmp_path, swap):
    """Set in mitmweb's options editor while the proxy runs: configure runs on the event loop,
    so a blocking read of a FIFO would stall every client. Refused at once, old identity kept."""
    bad = tmp_path / "bad"
    if swap == "fifo":
        os.mkfifo(bad, 0o600)
    elif swap == "directory":
        bad.mkdir(mode=0o700)
    else:
        bad.write_bytes("Pässwörd\n".encode("latin-1"))
        bad.chmod(0o600)
    web_port = free_port()
    m = Mitmdump(parent.url, {**CREDS, "web_port": web_port}, confdir=tmp_path, tool="mitmweb",
                 env={"PW": TEST_PASSWORD})
    with m:
        web = MitmwebApi(m, web_port)
        r = web.set(ntlm_password_env="", ntlm_password_file=str(bad))
        assert r.status_code == 400, r.text
        assert {"fifo": "named pipe", "directory": "is a directory",
                "latin1": "is not UTF-8"}[swap] in r.text
        assert curl("-x", m.url, f"{origin.url}/hello", timeout=10).stdout == "hello"
        assert m.proc and m.proc.poll() is None
