"""The diagnostic report for the IT department (`ntlm.report`, `ntlm_report_file`).

It must say enough to find why authentication fails (versions, options, the parent's schemes,
each stage with the decoded challenge, clock skew) and nothing that helps anyone log on as the
user: searched with the secret scan of test_secrets.py, plus the Type 3 tokens and the NT
responses inside them, in hex and base64.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from mitmproxy_ntlm import __version__
from mitmproxy_ntlm.credentials import hashes_from_password
from mitmproxy_ntlm.report import without_userinfo
from mitmproxy_ntlm.spnego_internals import Authenticate
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER, WRONG_PASSWORD
from tests.mitm import Mitmdump, curl
from tests.servers import free_port
from tests.test_secrets import secret_forms
from tests.web import MitmwebApi as Web


def forbidden(type3_tokens: list[str], *passwords: str) -> list[str]:
    """Every form in which a password, its hashes, a Type 3 or its responses could leak."""
    forms = []
    for password in passwords:
        lm, nt = hashes_from_password(password)
        forms += secret_forms(TEST_USER, TEST_DOMAIN, password)
        forms += [base64.b64encode(password.encode()).decode(),
                  base64.b64encode(nt).decode(), base64.b64encode(lm).decode()]
    for token in type3_tokens:
        forms += [token, token[:40]]
        msg = Authenticate.unpack(base64.b64decode(token))
        for part in (msg.nt_challenge_response, msg.lm_challenge_response,
                     msg.encrypted_random_session_key):
            if part:
                forms += [part.hex()[:32], base64.b64encode(part).decode()[:24]]
    return forms


def test_report_explains_the_handshakes_and_holds_no_secret(tmp_path: Path, parent, origin,
                                                             tls_origin) -> None:
    creds = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_pool": False,
             "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)}
    good_file, bad_file = tmp_path / "good.txt", tmp_path / "bad.txt"

    # A working setup in mitmweb: the command, and the file written at exit.
    web_port = free_port()
    m = Mitmdump(parent.url, {**creds, "ntlm_password_env": "PW", "web_port": web_port,
                              "ntlm_report_file": str(good_file)},
                 confdir=tmp_path / "web", tool="mitmweb", env={"PW": TEST_PASSWORD})
    with m:
        assert curl("-x", m.url, f"{origin.url}/hello", f"{origin.url}/hello").stdout == \
            "hellohello"
        assert curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello"
                    ).stdout == "hello"
        web = Web(m, web_port)
        answer = web.run("ntlm.report").json()
    lines = answer["value"]
    assert isinstance(lines, list) and all("\n" not in line for line in lines)
    from_web = "\n".join(lines)
    good = good_file.read_text()
    for text in (from_web, good):
        assert text.startswith("mitmproxy-ntlm diagnostic report, 20")
        assert f"mitmproxy-ntlm {__version__}" in text and "\npyspnego " in text
        assert re.search(r"\nPython 3\.\d+", text) and "\nOS Linux" in text
        assert f"mode = ['upstream:{parent.url}']" in text
        assert "ntlm_password_env = 'PW'" in text and "ntlm_password = not set" in text
        assert f"ntlm_username = '{TEST_USER}'" in text
        assert re.search(rf"{re.escape(parent.url.removeprefix('http://'))}: 407 .*: NTLM",
                         text)
        handshakes = re.findall(r"-> 127\.0\.0\.1:\d+ (GET http\S+|CONNECT \S+): "
                                r"authenticated \[NTLMv2\] as ([^,\s]+),", text)
        assert {kind.split()[0] for kind, _ in handshakes} == {"GET", "CONNECT"}, text
        assert {who for _, who in handshakes} == {TEST_PRINCIPAL}
        assert re.search(r"Type 2 received: type=2 flags=.*netbios_domain=", text)
        assert re.search(r"clock: peer clock (within 1 s of|\d+ s (ahead of|behind)) this "
                         r"machine's", text)

    # A wrong password in mitmdump, given the way that shows in the process list.
    m = Mitmdump(parent.url, {**creds, "ntlm_password": WRONG_PASSWORD,
                              "ntlm_report_file": str(bad_file)}, confdir=tmp_path / "dump")
    with m:
        for _ in range(4):
            curl("-x", m.url, f"{origin.url}/hello")
    assert m.wait_for("diagnostic report written to")
    bad = bad_file.read_text()
    assert "ntlm_password = set (value not shown)" in bad
    assert re.search(r": rejected \[NTLMv2\] as", bad) and "BLOCKED (lockout guard)" in bad
    assert bad_file.stat().st_mode & 0o077 == 0

    everything = "\n".join([from_web, good, bad, json.dumps(answer)])
    assert len(parent.type3_tokens) >= 5
    leaks = [s for s in forbidden(parent.type3_tokens, TEST_PASSWORD, WRONG_PASSWORD)
             if s.lower() in everything.lower()]
    assert leaks == []


def test_urls_lose_their_user_info() -> None:
    assert without_userinfo("['upstream:http://bob:pw@proxy:8080', 'http://p:3128']") == \
        "['upstream:http://(user info removed)@proxy:8080', 'http://p:3128']"
