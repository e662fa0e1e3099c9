"""No secret anywhere: every scenario at the most verbose log level, plus mitmweb's flow dump.

Searched for: the passwords, their NT and LM hashes and NTOWFv2 (PassNTLMv2) in standard and
cntlm (inverted) form, the Basic credentials clients sent, and every Type 3 token the parents
received.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from mitmproxy_ntlm.credentials import hashes_from_password, invert
from mitmproxy_ntlm.spnego_internals import ntowfv2
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump, curl
from tests.servers import free_port
from tests.web import MitmwebApi


def secret_forms(user: str, domain: str, password: str) -> list[str]:
    lm, nt = hashes_from_password(password)
    v2 = ntowfv2(user, nt, domain)
    forms = [password, base64.b64encode(f"{user}:{password}".encode()).decode(),
             base64.b64encode(f"{domain}\\{user}:{password}".encode()).decode()]
    for value in (lm, nt, v2):
        forms += [value.hex(), invert(value).hex()]
    return forms


def dump(m: Mitmdump, web_port: int) -> str:
    web = MitmwebApi(m, web_port)
    return web.get("/flows").text + web.dump().decode("latin-1")


def test_no_secret_in_any_log_line_or_flow(tmp_path: Path, make_parent, origin, tls_origin):
    users = {f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD, "CORP\\bob": "Bob-Pass-2"}
    parent = make_parent(users=users, rechallenge_after=2)
    pw = tmp_path / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    pw.chmod(0o600)
    captured: list[str] = []
    common = {"ntlm_show_legs": True,  # the runner already sets termlog_verbosity=debug
              "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)}

    def run(options: dict, scenario, env: dict | None = None) -> None:  # type: ignore[no-untyped-def]
        web_port = free_port()
        m = Mitmdump(parent.url, {**common, **options, "web_port": web_port},
                     confdir=tmp_path, tool="mitmweb", env=env)
        with m:
            scenario(m)
            time.sleep(0.3)
            captured.append(dump(m, web_port))
        captured.append(m.output)

    def single_user(m: Mitmdump) -> None:
        curl("-x", m.url, *[f"{origin.url}/hello"] * 5)  # with re-challenges
        curl("-x", m.url, "--data-binary", "x" * 5000, f"{origin.url}/echo")
        curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")

    def wrong_password(m: Mitmdump) -> None:
        for _ in range(4):
            curl("-x", m.url, f"{origin.url}/hello")
        curl("--cacert", str(m.ca_cert), "-x", m.url, f"{tls_origin.url}/hello")

    def multi_user(m: Mitmdump) -> None:
        curl("--proxy-user", f"{TEST_USER}:{TEST_PASSWORD}", "-x", m.url, f"{origin.url}/hello")
        curl("--proxy-user", "bob:Bob-Pass-2", "--cacert", str(m.ca_cert), "-x", m.url,
             f"{tls_origin.url}/hello")
        curl("--proxy-user", "bob:Not-Bobs-Pass", "-x", m.url, f"{origin.url}/hello")

    single = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN}
    run({**single, "ntlm_password_file": str(pw)}, single_user)
    # (mitmweb refuses the plaintext ntlm_password option: test_secret_inputs.py)
    run({**single, "ntlm_password_env": "WRONG_PW"}, wrong_password,
        env={"WRONG_PW": "Wrong-Pass-9"})
    run({"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}, multi_user)

    everything = "\n".join(captured)
    assert "Type 3 sent" in everything and "result=rejected" in everything  # really verbose
    assert len(parent.type3_tokens) >= 6
    searched = (secret_forms(TEST_USER, TEST_DOMAIN, TEST_PASSWORD)
                + secret_forms("bob", "CORP", "Bob-Pass-2")
                + secret_forms("bob", "CORP", "Not-Bobs-Pass")
                + secret_forms(TEST_USER, TEST_DOMAIN, "Wrong-Pass-9"))
    found = [s for s in searched if s.lower() in everything.lower()]
    found += [t[:24] for t in parent.type3_tokens if t[:40] in everything]
    assert found == []
