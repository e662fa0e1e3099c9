"""The peers of the sans-I/O tests (test_engine, test_layers): what a client sends, and a
parent's (or an origin's) NTLM side without a socket.

The tests hand `NtlmAcceptor` the bytes the addon would send and feed its answers back:
pyspnego's acceptor checks the Type 3 against the users of `NTLM_USER_FILE`, as the checking
parent of `mitmproxy_ntlm.testing.parent` does on a real socket (`use_user_file` points the
variable at a file of the test users).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import spnego
import spnego.exceptions
from mitmproxy import http
from mitmproxy.net.http import http1

from mitmproxy_ntlm.credentials import SecretSources, build_credentials
from mitmproxy_ntlm.policy import UpstreamPolicy
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER

WRONG_SECRET = "Not-The-Pass-42"
GET = b"GET http://origin.test/page HTTP/1.1\r\nHost: origin.test\r\nAccept: */*\r\n\r\n"
POST = b"POST http://origin.test/form HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 11\r\n\r\n"
BODY = b"hello=world"
OK = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
      b"X-Origin: yes\r\n\r\nfrom origin\r\n")
CONNECT = b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n"

TYPE1 = b"NTLMSSP\x00\x01\x00\x00\x00"
TYPE2 = b"NTLMSSP\x00\x02\x00\x00\x00"
TYPE3 = b"NTLMSSP\x00\x03\x00\x00\x00"


def use_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspnego's acceptor reads its users from the file `NTLM_USER_FILE` names."""
    path = tmp_path / "ntlm-users.txt"
    path.write_text(f"{TEST_DOMAIN}:{TEST_USER}:{TEST_PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(path))


def policy_for(password: str = TEST_PASSWORD) -> UpstreamPolicy:
    """The addon's policy for the test user, with `password` (the parent knows TEST_PASSWORD)."""
    creds = build_credentials(TEST_USER, TEST_DOMAIN, "WS", SecretSources(password=password))
    return UpstreamPolicy(creds=creds)


def head_of(data: bytes) -> bytes:
    """The first message head in `data`, with its blank line."""
    end = data.find(b"\r\n\r\n")
    assert end != -1, "no complete message head"
    return data[:end + 4]


def request_head(data: bytes) -> http.Request:
    """The first request head in `data`, read by mitmproxy's own HTTP/1 reader."""
    return http1.read_request_head(head_of(data)[:-4].split(b"\r\n"))


def response_head(data: bytes) -> http.Response:
    return http1.read_response_head(head_of(data)[:-4].split(b"\r\n"))


def auth_token(request: bytes, header: str = "Proxy-Authorization") -> bytes:
    """The decoded NTLM token of the first request in `request`."""
    scheme, _, token = request_head(request).headers[header].partition(" ")
    assert scheme == "NTLM"
    return base64.b64decode(token, validate=True)


def auth_required(challenge: str, *, status: int = 407, close: bool = False,
                  body: bytes = b"authenticate, please\n", head_only: bool = False) -> bytes:
    """A 407 (or 401) offering `challenge`; `head_only` for the answer to a HEAD."""
    header = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    reason = "Proxy Authentication Required" if status == 407 else "Unauthorized"
    lines = [f"HTTP/1.1 {status} {reason}", f"{header}: {challenge}",
             f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class NtlmAcceptor:
    """One connection's handshake as the parent (or origin) runs it."""

    def __init__(self, status: int = 407) -> None:
        self.status = status
        self.header = "Proxy-Authorization" if status == 407 else "Authorization"
        self.principal: str | None = None
        self._ctx = spnego.server(hostname="parent", service="http", protocol="ntlm")

    def challenge(self, request: bytes, **kwargs: object) -> bytes:
        """The 407 (401) with a Type 2 answering a request that carries a Type 1."""
        type1 = auth_token(request, self.header)
        assert type1.startswith(TYPE1)
        type2 = self._ctx.step(type1)
        assert type2 is not None and type2.startswith(TYPE2)
        return auth_required(f"NTLM {base64.b64encode(type2).decode()}", status=self.status,
                             **kwargs)  # type: ignore[arg-type]

    def accepts(self, request: bytes) -> bool:
        """Whether the Type 3 of `request` proves a password of the user file."""
        type3 = auth_token(request, self.header)
        assert type3.startswith(TYPE3)
        try:
            self._ctx.step(type3)
        except spnego.exceptions.SpnegoError:
            return False
        self.principal = self._ctx.client_principal
        return self._ctx.complete
