"""winbind single sign-on pieces that need no domain: the real ntlm_auth helper run per
handshake (its Type 1 needs no winbindd; a Type 3 without cached credentials is refused), its
processes ended by PID, and the options refused at start-up. The logons themselves are checked
by a real DC in test_domain.py (marker dc)."""

from __future__ import annotations

import gc
import os
import shutil

import pytest

from mitmproxy_ntlm.handshake import ChallengeError, NtlmClientError
from mitmproxy_ntlm.winbind import WinbindHandshake, WinbindHelpers, winbind_identity

needs_ntlm_auth = pytest.mark.skipif(shutil.which("ntlm_auth") is None,
                                     reason="Samba's ntlm_auth is not installed")

# A Type 2 as a parent sends it (flags unicode|ntlm|extended session security, no target info).
TYPE2 = (b"NTLMSSP\x00\x02\x00\x00\x00\x00\x00\x00\x00\x28\x00\x00\x00"
         b"\x01\x82\x08\x00SrvNonce" + b"\x00" * 8)


def identity(user: str = "CORP\\nobody-cached") -> object:
    return winbind_identity(user, "", "WS1")


def exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_identity_defaults_to_the_logged_on_user(monkeypatch):
    monkeypatch.setenv("LOGNAME", "CORP\\erin")
    creds = winbind_identity("", "", "ws1")
    assert (creds.user, creds.domain, creds.workstation) == ("erin", "CORP", "WS1")
    assert creds.winbind and creds.can_ntlm and not creds.has_ntlm_secret
    assert winbind_identity("OTHER\\frank", "CORP", "ws").principal == "CORP\\frank"


@needs_ntlm_auth
def test_type1_from_the_helper_and_the_process_ends_with_the_handshake():
    helpers = WinbindHelpers()
    handshake = WinbindHandshake(identity(), helpers, "proxy.test")
    token = handshake.negotiate()
    assert token.startswith(b"NTLMSSP\x00\x01\x00\x00\x00")
    assert handshake.negotiate() == token  # asked once per handshake
    started = set(helpers.running)
    assert len(started) == 2 and helpers.spares == 1  # its own and a spare for the next one
    with pytest.raises(ChallengeError, match="not an NTLMSSP Type 2"):
        handshake.authenticate(b"HTTP/1.1 garbage")
    del handshake  # the engine drops a failed or abandoned handshake
    gc.collect()
    [ended] = started - set(helpers.running)
    assert exited(ended)
    again = WinbindHandshake(identity(), helpers, "proxy.test")  # takes the spare
    assert again.negotiate() == token
    assert len(helpers.running) == 2 and helpers.spares == 1
    helpers.stop_all()


@needs_ntlm_auth
def test_no_cached_credentials_is_a_clear_error_and_ends_the_helper():
    helpers = WinbindHelpers()
    handshake = WinbindHandshake(identity(), helpers, "proxy.test")
    handshake.negotiate()
    started = set(helpers.running)
    with pytest.raises(NtlmClientError, match=r"no cached credentials for CORP\\nobody-cached"
                                              r".*wbinfo --ccache-save"):
        handshake.authenticate(TYPE2)
    [ended] = started - set(helpers.running)
    assert exited(ended) and helpers.spares == 1
    helpers.stop_all()


@needs_ntlm_auth
def test_stop_all_kills_the_helpers_of_unfinished_handshakes_and_the_spares():
    helpers = WinbindHelpers()
    handshakes = [WinbindHandshake(identity(), helpers, "proxy.test") for _ in range(2)]
    for h in handshakes:
        h.negotiate()
    pids = helpers.running
    assert len(pids) == 3
    helpers.stop_all()
    assert helpers.running == [] and helpers.spares == 0 and all(exited(pid) for pid in pids)


def test_missing_ntlm_auth_names_the_package():
    with pytest.raises(NtlmClientError, match="apt-get install winbind"):
        WinbindHandshake(identity(), WinbindHelpers("/nonexistent/ntlm_auth"), "proxy.test")


def test_winbind_refuses_a_password_option_and_a_missing_ntlm_auth(mitm, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    secret.chmod(0o600)
    m = mitm("http://127.0.0.1:9", {"ntlm_winbind": True, "ntlm_username": "CORP\\alice",
                                     "ntlm_password_file": str(secret)}, expect_failure=True)
    assert m.wait_for("ntlm_winbind takes the password from winbind's cache; remove "
                      "ntlm_password_file")
    bin_dir = tmp_path / "bin"  # a PATH without ntlm_auth
    bin_dir.mkdir()
    m = mitm("http://127.0.0.1:9", {"ntlm_winbind": True}, expect_failure=True,
             env={"PATH": str(bin_dir)})
    assert m.wait_for("ntlm_winbind needs Samba's ntlm_auth: install Samba's winbind package")
    assert m.proc is not None and m.proc.wait(10) != 0

