"""Coverage-guided fuzzing of the engine and the HTTP/1 framing with atheris (outside the suite).

    pip install atheris
    python fuzz/fuzz_engine.py -max_total_time=300        # libFuzzer options

The input is split into the parent's byte stream and chunk sizes; the engine must only return
actions, whatever arrives (WireError is the one documented exception of the parsers). The same
bytes, as a client's Basic credentials or a secret file, may only raise CredentialError or
FileRefused.
"""

from __future__ import annotations

import base64
import sys

import atheris

with atheris.instrument_imports():
    from mitmproxy_ntlm import engine as eng
    from mitmproxy_ntlm import messages, wire
    from mitmproxy_ntlm.credentials import CredentialError, SecretSources, build_credentials
    from mitmproxy_ntlm.multiuser import client_credentials, decode_basic
    from mitmproxy_ntlm.policy import UpstreamPolicy
    from mitmproxy_ntlm.userfile import FileRefused, decode_text

CREDS = build_credentials("alice", "CORP", "WS", SecretSources(password="pw"))
REQUESTS = [
    b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
    b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n",
]
ACTIONS = (eng.ToParent, eng.ToChild, eng.CloseParent, eng.Reconnect, eng.Established,
           eng.Failed, eng.StartTimer)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)
    engine = eng.AuthEngine(UpstreamPolicy(creds=CREDS), "parent:1", "client:2", "parent")
    if which == 2:
        actions = engine.start_connect(REQUESTS[2])
    else:
        actions = engine.from_child(REQUESTS[which])
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 512))
        actions += engine.from_parent(chunk)
    actions += engine.parent_closed()
    assert all(isinstance(a, ACTIONS) for a in actions)
    buf = bytearray(data)
    try:
        head = wire.split_head(buf)
        if head:
            wire.ntlm_challenge(wire.parse_response_head(head))
    except wire.WireError:
        pass
    messages.describe(data)
    client_input(data)


def client_input(data: bytes) -> None:
    """A client's Basic credentials and a secret file's bytes: a clear refusal or a result."""
    try:
        decode_text(data, "file")
    except FileRefused:
        pass
    for value in (data.decode("latin-1"), "Basic " + base64.b64encode(data).decode()):
        try:
            client_credentials(*decode_basic(value), "CORP", "WS")
        except CredentialError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
