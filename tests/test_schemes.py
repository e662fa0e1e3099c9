"""The scheme decision on its own: what is offered, what is at hand, and the reason given."""

from __future__ import annotations

import pytest

from mitmproxy_ntlm.credentials import SecretSources, build_credentials, kerberos_only
from mitmproxy_ntlm.handshake import Dialect
from mitmproxy_ntlm.kerberos import KerberosSettings, KerberosTickets
from mitmproxy_ntlm.schemes import NoScheme, SchemeChooser, SchemeMode
from tests.constants import TEST_PASSWORD

CREDS = build_credentials("CORP\\alice", "", "WS", SecretSources(password=TEST_PASSWORD))
NO_CACHE = "FILE:/nonexistent/krb5cc"


def chooser(mode: SchemeMode = SchemeMode.AUTO) -> SchemeChooser:
    return SchemeChooser(mode, Dialect.NTLMV2, KerberosTickets(KerberosSettings(ccache=NO_CACHE)))


def test_without_a_ticket_auto_uses_ntlm_and_says_why() -> None:
    choice = chooser().choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    assert (choice.handshake.mechanism, choice.header) == ("NTLM", "NTLM")
    assert f"Kerberos not used (no ticket in {NO_CACHE}" in choice.why
    assert "run kinit" in choice.why and "set ntlm_kerberos_realm" in choice.why


def test_a_peer_offering_only_negotiate_gets_ntlm_inside_it() -> None:
    c = chooser()
    c.learn("proxy:8080", ["Negotiate"])
    choice = c.choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    assert (choice.handshake.mechanism, choice.header) == ("NTLM", "Negotiate")
    assert choice.why.startswith("NTLM inside Negotiate") and "offers Negotiate" in choice.why
    assert choice.handshake.negotiate().startswith(b"NTLMSSP\x00\x01")  # raw, not SPNEGO


def test_a_peer_offering_only_ntlm_is_not_asked_for_a_ticket() -> None:
    c = chooser()
    c.learn("proxy:8080", ["NTLM", "Basic"])
    choice = c.choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    assert "the parent proxy does not offer Negotiate" in choice.why
    other = c.choose(CREDS, "other:3128", "other", "parent proxy")  # learned per peer
    assert "no ticket in" in other.why


def test_pinned_schemes() -> None:
    with pytest.raises(NoScheme, match="ntlm_scheme is kerberos, but Kerberos cannot be used"):
        chooser(SchemeMode.KERBEROS).choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    ntlm = chooser(SchemeMode.NTLM).choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    assert ntlm.why.startswith("NTLM: ntlm_scheme is ntlm")


def test_kerberos_only_identity_without_a_ticket_fails_with_the_reason() -> None:
    with pytest.raises(NoScheme, match="no NTLM password or hash to fall back on") as e:
        chooser().choose(kerberos_only("alice@CORP.TEST", "ws"), "p:1", "p", "parent proxy")
    assert "set ntlm_kerberos_realm" not in str(e.value)  # no password to use anyway


def test_refused_kerberos_is_not_retried_with_that_peer() -> None:
    c = chooser()
    c.kerberos_refused("proxy:8080", "the parent proxy did not accept the Kerberos ticket")
    choice = c.choose(CREDS, "proxy:8080", "proxy", "parent proxy")
    assert "did not accept the Kerberos ticket" in choice.why
