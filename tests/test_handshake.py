"""The client side of one NTLM exchange, against pyspnego's acceptor (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mitmproxy_ntlm import messages
from mitmproxy_ntlm.credentials import Credentials, hashes_from_password
from mitmproxy_ntlm.handshake import Dialect, NtlmHandshake
from mitmproxy_ntlm.spnego_internals import AvFlags, NegotiateFlags, spnego

from .constants import TEST_PASSWORD

WORKSTATION = "BUILD-07"


def _creds() -> Credentials:
    lm_hash, nt_hash = hashes_from_password(TEST_PASSWORD)
    return Credentials("alice", "CORP", WORKSTATION, nt_hash=nt_hash, lm_hash=lm_hash)


def _type3(dialect: Dialect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    users = tmp_path / "users"
    users.write_text(f"CORP:alice:{TEST_PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    acceptor = spnego.server(hostname="parent", service="http", protocol="ntlm")
    handshake = NtlmHandshake(_creds(), dialect, "parent")
    challenge = acceptor.step(handshake.negotiate())
    assert challenge is not None
    return handshake.authenticate(challenge)


@pytest.mark.parametrize("dialect", list(Dialect))
def test_the_type3_has_the_dialect_and_workstation_asked_for(
        dialect: Dialect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyspnego reads both from the environment, each at one call; the handshake sets them
    there and leaves the environment as it found it."""
    monkeypatch.delenv("LM_COMPAT_LEVEL", raising=False)
    monkeypatch.setenv("NETBIOS_COMPUTER_NAME", "SOMEONE-ELSE")
    summary = messages.describe(_type3(dialect, tmp_path, monkeypatch))
    assert summary["type"] == 3
    assert summary["dialect"] == dialect.label
    assert summary["workstation"] == WORKSTATION
    assert summary["user"] == "alice" and summary["domain"] == "CORP"
    assert "LM_COMPAT_LEVEL" not in os.environ
    assert os.environ["NETBIOS_COMPUTER_NAME"] == "SOMEONE-ELSE"


def test_flag_names_are_the_enums_members_that_are_set() -> None:
    """The names come from a table read once; the enum itself is the reference."""
    for flags in (0, 0xFFFFFFFF, 0xE2888235, 0x00000001, 0x80000000, 0x60088215):
        expected = [f.name for f in NegotiateFlags
                    if f.value and flags & f.value == f.value and f.name]
        assert messages.flag_names(flags) == expected
        assert messages.flag_names(NegotiateFlags(flags)) == expected
    assert "ntlm" in messages.flag_names(NegotiateFlags.ntlm)
    assert [name for value, name in messages._AV_FLAGS if 0x2 & value] == [
        f.name for f in AvFlags if f.name and 0x2 & f]
