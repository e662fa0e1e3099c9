"""The NTLM/Negotiate content view and the commands' output, on recorded tokens.

Tokens come from pyspnego's own client and acceptor with a known password; Kerberos messages
(no KDC here) are built field by field with pyspnego's ASN.1 helpers. Each test renders through
mitmproxy's own content-view entry point, as mitmweb and the console do, and checks both what is
shown and that no response, key, MIC or ticket bytes are.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import spnego
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow
from spnego._asn1 import (
    TagClass,
    TypeTagNumber,
    pack_asn1,
    pack_asn1_bit_string,
    pack_asn1_general_string,
    pack_asn1_integer,
    pack_asn1_octet_string,
    pack_asn1_sequence,
)

from mitmproxy_ntlm import contentview
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.spnego_internals import Authenticate, GSSMech, InitialContextToken, NegTokenInit
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER

NAME = contentview.NAME
TICKET_CIPHER = bytes(range(7, 7 + 64))  # stands for the ticket's encrypted part
AUTHENTICATOR_CIPHER = bytes(range(100, 100 + 48))


@pytest.fixture
def view() -> Iterator[None]:
    """The view registered as the script does it; mitmproxy 12 needs options to render."""
    addon = contentview.TokenViewAddon()
    with taddons.context():
        addon.load(None)
        yield
        addon.done()


def rendered(message: http.Message, flow: Any, view_name: str = "auto") -> tuple[str, str]:
    """(name of the view used, its text), through mitmproxy's own entry point."""
    if hasattr(contentviews, "prettify_message"):  # mitmproxy 12
        result = contentviews.prettify_message(message, flow, view_name=view_name)
        return str(result.view_name), result.text
    description, lines, error = contentviews.get_message_content_view(view_name, message, flow)
    assert error is None, error
    return description, "\n".join("".join(text for _, text in line) for line in lines)


def handshake(protocol: str, tmp_path: Any) -> tuple[bytes, bytes, bytes]:
    """Type 1, 2, 3 (or their SPNEGO wrappings) of a real exchange with a known password."""
    users = tmp_path / "users"
    users.write_text(f"{TEST_DOMAIN}:{TEST_USER}:{TEST_PASSWORD}\n")
    old = os.environ.get("NTLM_USER_FILE")
    os.environ["NTLM_USER_FILE"] = str(users)
    try:
        client = spnego.client(f"{TEST_DOMAIN}\\{TEST_USER}", TEST_PASSWORD, hostname="proxy",
                               service="http", protocol=protocol)
        server = spnego.server(protocol=protocol)
        t1 = client.step()
        t2 = server.step(t1)
        t3 = client.step(t2)
        server.step(t3)
        assert server.complete
    finally:
        if old is None:
            os.environ.pop("NTLM_USER_FILE")
        else:
            os.environ["NTLM_USER_FILE"] = old
    assert t1 and t2 and t3
    return t1, t2, t3


def leg(scheme: str, sent: bytes | str, received: bytes | None) -> http.HTTPFlow:
    """A 407 leg as a parent answers it: the token sent, the challenge, an HTML page."""
    flow = tflow.tflow(resp=True)
    value = sent if isinstance(sent, str) else base64.b64encode(sent).decode()
    flow.request.headers["Proxy-Authorization"] = f"{scheme} {value}"
    flow.request.content = b""
    flow.response.status_code = 407
    flow.response.headers["Content-Type"] = "text/html"
    flow.response.content = b"<html><body>Proxy authentication required</body></html>"
    flow.response.timestamp_start = time.time()
    if received is not None:
        flow.response.headers["Proxy-Authenticate"] = \
            f"{scheme} {base64.b64encode(received).decode()}"
    return flow


def secret_parts(type3: bytes) -> list[bytes]:
    """What a Type 3 carries that proves the password: never to be shown in any form."""
    msg = Authenticate.unpack(type3)
    return [p for p in (msg.nt_challenge_response, msg.lm_challenge_response,
                        msg.encrypted_random_session_key, msg.mic, type3) if p]


def assert_not_shown(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode()):
            assert form[:24].lower() not in text.lower(), form[:24]
    assert TEST_PASSWORD not in text


def test_ntlm_type1_2_3_decoded_in_words_and_chosen_automatically(view, tmp_path) -> None:
    t1, t2, t3 = handshake("ntlm", tmp_path)
    flow = leg("NTLM", t1, t2)
    name, request = rendered(flow.request, flow)
    assert name == NAME  # no body: the decode is what a person clicking the leg sees
    assert "Proxy-Authorization: NTLM, " in request and "NTLM Type 1 (Negotiate)" in request
    assert re.search(r"flags: +.*\bunicode\b.*", request)
    name, response = rendered(flow.response, flow)
    assert name == NAME  # chosen over the HTML view of the 407 page
    assert "NTLM Type 2 (Challenge)" in response and "target info:" in response
    assert re.search(r"timestamp: +20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(peer clock", response)
    assert "Body: 55 bytes (choose another view to see it)." in response

    flow = leg("NTLM", t3, None)
    _, type3 = rendered(flow.request, flow)
    assert "NTLM Type 3 (Authenticate)" in type3
    assert re.search(rf"user: +{TEST_USER}\n", type3)
    assert re.search(rf"domain: +{TEST_DOMAIN}\n", type3)
    assert re.search(r"dialect: +NTLMv2\n", type3)
    nt = len(Authenticate.unpack(t3).nt_challenge_response)
    assert re.search(rf"NT response: +{nt} bytes \(not shown\)", type3)
    assert re.search(r"session key: +present \(not shown\)", type3)
    assert_not_shown(type3, secret_parts(t3))


def test_spnego_wrapped_ntlm(view, tmp_path) -> None:
    t1, t2, t3 = handshake("negotiate", tmp_path)
    flow = leg("Negotiate", t1, t2)
    _, request = rendered(flow.request, flow)
    assert "SPNEGO NegTokenInit" in request and re.search(r"mechanisms: +NTLM", request)
    assert "NTLM Type 1 (Negotiate)" in request
    _, response = rendered(flow.response, flow)
    assert "SPNEGO NegTokenResp" in response and "NTLM Type 2 (Challenge)" in response
    flow = leg("Negotiate", t3, None)
    _, type3 = rendered(flow.request, flow)
    assert "NTLM Type 3 (Authenticate)" in type3 and re.search(r"MIC: +present", type3)
    ntlm_type3 = t3[t3.index(b"NTLMSSP\x00"):]
    assert_not_shown(type3, [*secret_parts(ntlm_type3), t3])


def _explicit(tag: int, value: bytes) -> bytes:
    return pack_asn1(TagClass.context_specific, True, tag, value)


def _principal(*names: str) -> bytes:
    return pack_asn1_sequence([
        _explicit(0, pack_asn1_integer(2)),  # NT-SRV-INST
        _explicit(1, pack_asn1_sequence([pack_asn1_general_string(n) for n in names])),
    ])


def _encrypted(etype: int, cipher: bytes, kvno: int | None = None) -> bytes:
    fields = [_explicit(0, pack_asn1_integer(etype))]
    if kvno is not None:
        fields.append(_explicit(1, pack_asn1_integer(kvno)))
    return pack_asn1_sequence([*fields, _explicit(2, pack_asn1_octet_string(cipher))])


def kerberos_ap_req() -> bytes:
    """An AP-REQ (RFC 4120 5.5.1) for HTTP/proxy.corp.test@CORP.TEST, in SPNEGO as browsers
    send it: the fields a KDC-issued one has, with stand-in ciphertext."""
    ticket = pack_asn1(TagClass.application, True, 1, pack_asn1_sequence([
        _explicit(0, pack_asn1_integer(5)),
        _explicit(1, pack_asn1_general_string("CORP.TEST")),
        _explicit(2, _principal("HTTP", "proxy.corp.test")),
        _explicit(3, _encrypted(18, TICKET_CIPHER, kvno=2)),
    ]))
    ap_req = pack_asn1(TagClass.application, True, 14, pack_asn1_sequence([
        _explicit(0, pack_asn1_integer(5)),
        _explicit(1, pack_asn1_integer(14)),
        _explicit(2, pack_asn1_bit_string(b"\x20\x00\x00\x00")),  # mutual-required
        _explicit(3, ticket),
        _explicit(4, _encrypted(18, AUTHENTICATOR_CIPHER)),
    ]))
    krb5 = InitialContextToken(GSSMech.kerberos, b"\x01\x00" + ap_req).pack()
    return NegTokenInit([GSSMech.kerberos.value, GSSMech.ntlm.value], mech_token=krb5).pack()


def kerberos_skew_error() -> bytes:
    """A KRB-ERROR KRB_AP_ERR_SKEW (RFC 4120 5.9.1), as a parent answers a clock too far off."""
    when = pack_asn1(TagClass.universal, False, TypeTagNumber.generalized_time,
                     b"20261206161500Z")
    error = pack_asn1(TagClass.application, True, 30, pack_asn1_sequence([
        _explicit(0, pack_asn1_integer(5)),
        _explicit(1, pack_asn1_integer(30)),
        _explicit(4, when),
        _explicit(5, pack_asn1_integer(0)),
        _explicit(6, pack_asn1_integer(37)),
        _explicit(9, pack_asn1_general_string("CORP.TEST")),
        _explicit(10, _principal("HTTP", "proxy.corp.test")),
    ]))
    return InitialContextToken(GSSMech.kerberos, b"\x03\x00" + error).pack()


def test_kerberos_shows_realm_service_and_enctypes_never_the_ticket(view) -> None:
    token = kerberos_ap_req()
    flow = leg("Negotiate", token, None)
    flow.response.headers["Proxy-Authenticate"] = \
        "Negotiate " + base64.b64encode(kerberos_skew_error()).decode()
    name, request = rendered(flow.request, flow)
    assert name == NAME
    assert "SPNEGO NegTokenInit" in request and re.search(r"mechanisms: +Kerberos, NTLM", request)
    assert "Kerberos AP-REQ" in request
    assert re.search(r"realm: +CORP\.TEST", request)
    assert re.search(r"service: +HTTP/proxy\.corp\.test", request)
    assert re.search(r"ticket enctype: +AES256_CTS_HMAC_SHA1_96 \(18\)", request)
    assert re.search(r"options: +mutual-required", request)
    assert_not_shown(request, [TICKET_CIPHER, AUTHENTICATOR_CIPHER, token])
    _, response = rendered(flow.response, flow)
    assert "Kerberos KRB-ERROR" in response and "KRB_AP_ERR_SKEW (37)" in response
    assert "server time:" in response and "2026-12-06 16:15:00 UTC" in response


def test_stand_in_for_a_token_not_kept_and_other_schemes_never_decoded(view) -> None:
    flow = leg("NTLM", "[Type 3 redacted: NTLMv2]", None)
    flow.metadata["ntlm_leg"] = {"leg": 2, "sent": {"type": 3, "user": TEST_USER,
                                                    "dialect": "NTLMv2"}}
    flow.request.headers.add("Authorization", "Basic " + base64.b64encode(
        f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode())
    flow.response.headers["Proxy-Authenticate"] = 'NTLM, Basic realm="a, b", charset="UTF-8"'
    _, request = rendered(flow.request, flow, NAME)
    assert "the token was not kept" in request and re.search(rf"user: +{TEST_USER}", request)
    assert "Authorization: Basic credentials (not shown)" in request
    assert base64.b64encode(f"{TEST_USER}:".encode()).decode()[:8] not in request
    _, response = rendered(flow.response, flow, NAME)
    assert "Proxy-Authenticate: offers NTLM (no token yet)" in response
    assert 'Proxy-Authenticate: offers Basic realm="a, b", charset="UTF-8"' in response


def test_a_page_with_a_token_keeps_its_own_view_and_offers_this_one(view, tmp_path) -> None:
    _, t2, _ = handshake("ntlm", tmp_path)
    flow = tflow.tflow(resp=True)
    flow.response.headers["Content-Type"] = "application/json"
    flow.response.content = b'{"hello": 1}'
    flow.response.headers["WWW-Authenticate"] = "NTLM " + base64.b64encode(t2).decode()
    name, _ = rendered(flow.response, flow)
    assert name != NAME  # the JSON body stays what a person sees first
    name, text = rendered(flow.response, flow, NAME)
    assert name == NAME and "NTLM Type 2 (Challenge)" in text
    plain = tflow.tflow(resp=True)
    assert rendered(plain.response, plain)[0] != NAME


def test_view_is_added_once_and_removed_when_the_script_unloads() -> None:
    with taddons.context():
        names = lambda: [n for n in _view_names() if n.lower() == NAME.lower()]  # noqa: E731
        assert names() == []
        first, second = contentview.TokenViewAddon(), contentview.TokenViewAddon()
        first.load(None)
        second.load(None)  # a reload that ran before the old instance's done()
        assert len(names()) == 1
        first.done()
        second.done()
        assert names() == []


def _view_names() -> list[str]:
    if hasattr(contentviews, "registry"):  # mitmproxy 12
        return list(contentviews.registry)
    return [v.name for v in contentviews.views]


def test_commands_return_lines_for_mitmweb_and_the_console(tmp_path) -> None:
    """Sequence[str]: the console shows one row per line, mitmweb a list of strings; a
    single str with newlines showed as escaped \\n in mitmweb's command bar."""
    from collections.abc import Sequence

    from mitmproxy import command

    t1, _, _ = handshake("ntlm", tmp_path)
    addon = NtlmUpstreamAuth()
    with taddons.context(addon) as tctx:
        for name in ("ntlm.status", "ntlm.decode", "ntlm.report"):
            assert tctx.master.commands.commands[name].return_type == Sequence[str], name
            assert command.typename(Sequence[str]) == "str[]"
        status = tctx.master.commands.call("ntlm.status")
        decoded = tctx.master.commands.call("ntlm.decode", "NTLM " + base64.b64encode(t1).decode())
        report = tctx.master.commands.call("ntlm.report")
        for lines in (status, decoded, report):
            assert isinstance(lines, list) and lines and all(
                isinstance(line, str) and "\n" not in line for line in lines)
        assert "NTLM Type 1 (Negotiate)" in decoded[1]
        assert report[0].startswith("mitmproxy-ntlm diagnostic report")
        saved = tmp_path / "report.txt"
        assert tctx.master.commands.call("ntlm.report.save", str(saved)) == \
            f"report written to {saved}"
        assert saved.read_text().startswith("mitmproxy-ntlm diagnostic report")
        assert saved.stat().st_mode & 0o077 == 0
        assert "report not written" in tctx.master.commands.call(
            "ntlm.report.save", str(tmp_path / "missing-dir" / "r.txt"))


def _view_text(answer: dict) -> str:
    """mitmweb 11 sends lines of (style, text); 12 sends one text."""
    if "text" in answer:
        return str(answer["text"])
    return "\n".join("".join(text for _, text in line) for line in answer["lines"])


def test_mitmweb_serves_the_decoded_handshake_of_a_flow(tmp_path) -> None:
    """A client that does NTLM itself with an intranet server, through mitmweb: its flows'
    auth headers decode through mitmweb's content-view API, and no response bytes appear."""

    from tests.mitm import Mitmdump, curl
    from tests.servers import NtlmOrigin, free_port
    from tests.web import MitmwebApi as Web

    web_port = free_port()
    with NtlmOrigin({f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD}) as intranet, \
            Mitmdump(None, {"web_port": web_port}, confdir=tmp_path, tool="mitmweb") as m:
        r = curl("--ntlm", "-u", f"{TEST_DOMAIN}\\{TEST_USER}:{TEST_PASSWORD}", "-x", m.url,
                 f"{intranet.url}/hello")
        assert r.stdout == "hello", r.stderr
        web = Web(m, web_port)
        views = web.get("/state").json()["contentViews"]
        assert NAME in views or NAME.lower() in views
        flows = web.flows()
        challenged = next(f for f in flows if f["response"]["status_code"] == 401 and any(
            k.lower() == "www-authenticate" and v.startswith("NTLM T")
            for k, v in f["response"]["headers"]))
        authenticated = next(f for f in flows if f["response"]["status_code"] == 200)

        def view(flow: dict, message: str, name: str = NAME) -> dict:
            answer = web.get(f"/flows/{flow['id']}/{message}/content/"
                             f"{name.replace('/', '%2F')}.json")
            assert answer.status_code == 200, answer.text
            return answer.json()

        challenge = _view_text(view(challenged, "response", "Auto"))  # chosen by itself
        assert "NTLM Type 2 (Challenge)" in challenge and "target info:" in challenge
        assert re.search(r"timestamp: +20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC", challenge)
        type1 = _view_text(view(challenged, "request"))
        assert "Authorization: NTLM, " in type1 and "NTLM Type 1 (Negotiate)" in type1
        type3 = _view_text(view(authenticated, "request"))
        assert "NTLM Type 3 (Authenticate)" in type3 and re.search(rf"user: +{TEST_USER}", type3)
        assert re.search(r"NT response: +\d+ bytes \(not shown\)", type3)
        sent = next(v for k, v in authenticated["request"]["headers"]
                    if k.lower() == "authorization")
        assert_not_shown(type3, secret_parts(base64.b64decode(sent.split()[1])))
        assert _view_text(view(authenticated, "response", "Auto")) == "hello"


def test_mitmweb_decodes_the_hidden_legs_without_their_secrets(tmp_path, parent, origin) -> None:
    """With ntlm_show_legs, the 407 legs mitmproxy-ntlm did itself are flows whose tokens
    this view decodes (chosen by itself); the Type 3 was never kept, its summary is shown."""
    from tests.mitm import Mitmdump, curl
    from tests.servers import free_port
    from tests.test_report import forbidden
    from tests.web import MitmwebApi as Web

    web_port = free_port()
    with Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                               "ntlm_password_env": "PW", "ntlm_show_legs": True,
                               "web_port": web_port},
                  confdir=tmp_path, tool="mitmweb", env={"PW": TEST_PASSWORD}) as m:
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        web = Web(m, web_port)
        shown_views = []
        for flow in web.flows():
            for message in ("request", "response"):
                answer = web.get(f"/flows/{flow['id']}/{message}/content/Auto.json").json()
                shown_views.append(_view_text(answer))
    everything = "\n".join(shown_views)
    assert "NTLM Type 2 (Challenge)" in everything and "target info:" in everything
    type3 = next(v for v in shown_views if "NTLM Type 3 (Authenticate)" in v)
    assert "the token was not kept" in type3 and re.search(rf"user: +{TEST_USER}\n", type3)
    assert re.search(r"NT response: +\d+ bytes \(not shown\)", type3)
    assert parent.type3_tokens
    assert [s for s in forbidden(parent.type3_tokens, TEST_PASSWORD)
            if s.lower() in everything.lower()] == []
