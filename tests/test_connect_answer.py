"""Multi-user https: the parent's verdict on a client's credentials is the answer to its CONNECT.

Browsers ask for proxy credentials only when the CONNECT itself is answered with 407; a 407
inside the tunnel (intercepted TLS) or a dropped tunnel (passthrough) is never shown to the user.
"""

from __future__ import annotations

import base64
import socket

import pytest

from tests.constants import TEST_DOMAIN
from tests.mitm import curl

USERS = {"CORP\\alice": "Alice-Pass-1"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ConnectClient:
    """A client that sends CONNECTs on one kept-alive connection, as browsers do."""

    def __init__(self, proxy_url: str) -> None:
        host, port = proxy_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.buf = b""

    def connect(self, target: str, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of the answer to one CONNECT."""
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if authorization:
            head += f"Proxy-Authorization: {authorization}\r\n"
        self.sock.sendall((head + "\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, f"connection closed before an answer: {self.buf!r}"
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            data = self.sock.recv(65536)
            assert data, "connection closed inside the body"
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status_line.split()[1]), headers, body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def alice_parent(make_parent):  # type: ignore[no-untyped-def]
    return make_parent(users=USERS)


def _start(mitm, parent, tls_origin, mode: str, passthrough: bool):  # type: ignore[no-untyped-def]
    options: dict = {**MULTI, "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)}
    args = ["--ignore-hosts", ".*"] if passthrough else []
    if mode == "upstream":
        return mitm(parent.url, options, *args)
    return mitm(None, {**options, "ntlm_parent": parent.url, "connection_strategy": "lazy"},
                *args)


MODES = [pytest.param(mode, passthrough, id=f"{mode}-{'passthrough' if passthrough else 'tls'}")
         for mode in ("upstream", "regular") for passthrough in (False, True)]


@pytest.mark.parametrize(("mode", "passthrough"), MODES)
def test_rejected_credentials_get_407_on_the_connect(mitm, alice_parent, tls_origin,
                                                     mode, passthrough):
    m = _start(mitm, alice_parent, tls_origin, mode, passthrough)
    cacert = tls_origin.cert_path if passthrough else m.ca_cert
    r = curl("--proxy-user", "CORP\\alice:wrong", "--cacert", str(cacert), "-x", m.url,
             "-w", "%{http_connect}", f"{tls_origin.url}/hello")
    assert r.returncode != 0 and r.stdout == "407", (r.stdout, r.stderr)
    # what a browser sees: the Basic challenge and the reason, on the CONNECT itself
    client = ConnectClient(m.url)
    target = f"127.0.0.1:{tls_origin.port}"
    status, headers, body = client.connect(target, basic("CORP\\alice", "wrong"))
    assert status == 407
    assert headers["proxy-authenticate"] == 'Basic realm="mitmproxy-ntlm"'
    assert b"rejected the NTLM credentials for CORP\\alice" in body
    # the browser asks the user and sends the CONNECT again on the same connection
    status, _, _ = client.connect(target, basic("CORP\\alice", "Alice-Pass-1"))
    assert status == 200
    client.close()
    # the same wrong password twice cost one failed logon only
    assert alice_parent.snapshot().rejected_count == 1
    r = curl("--proxy-user", "CORP\\alice:Alice-Pass-1", "--cacert", str(cacert), "-x", m.url,
             "-w", "%{http_connect}", f"{tls_origin.url}/hello")
    assert r.stdout == "hello200", r.stderr
    assert [rec.path for rec in tls_origin.requests] == ["/hello"]
    # one parent tunnel per client tunnel: the one opened before the answer is the one used
    assert [(rec.method, rec.user) for rec in alice_parent.requests] == [
        ("CONNECT", "CORP\\alice")] * 2


@pytest.mark.parametrize(("down", "status", "text"), [
    ("stopped", 502, b"Cannot reach the parent proxy"),
    ("never_answer", 504, b"did not answer the NTLM handshake within 1 s"),
])
def test_parent_failures_are_the_answer_to_the_connect(mitm, make_parent, tls_origin,
                                                       down, status, text):
    parent = make_parent(users=USERS, fault=None if down == "stopped" else down)
    m = mitm(parent.url, {**MULTI, "ntlm_handshake_timeout": 1})
    if down == "stopped":
        parent.stop()
    client = ConnectClient(m.url)
    answer, _, body = client.connect(f"127.0.0.1:{tls_origin.port}",
                                     basic("CORP\\alice", "Alice-Pass-1"))
    client.close()
    assert answer == status and text in body


def test_bytes_sent_before_the_answer_are_bounded(mitm, make_parent, tls_origin) -> None:
    """A client streaming after its CONNECT while the parent is silent is cut off, not
    buffered until the handshake times out."""
    parent = make_parent(users=USERS, fault="never_answer")
    m = mitm(parent.url, {**MULTI, "ntlm_handshake_timeout": 60})
    client = ConnectClient(m.url)
    target = f"127.0.0.1:{tls_origin.port}"
    credentials = basic("CORP\\alice", "bogus")
    client.sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                        f"Proxy-Authorization: {credentials}\r\n\r\n".encode())
    chunk = b"x" * 16384
    try:
        for _ in range(64):  # 1 MiB
            client.sock.sendall(chunk)
        answer = client.sock.recv(65536)  # closed long before the 60 s handshake timeout
    except ConnectionError:
        answer = b""
    client.close()
    assert answer == b"", answer
    assert m.wait_for("before its CONNECT was answered: connection closed"), m.output[-2000:]
