"""Credentials: hashes from MS-NLMP's test vectors, cntlm's inverted form, safe files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mitmproxy_ntlm.credentials import (
    CredentialError,
    SecretSources,
    build_credentials,
    hashes_from_password,
    invert,
)

# MS-NLMP 4.2: password "Password"
LM_PASSWORD = "e52cac67419a9a224a3b108f3fa6cb6d"
NT_PASSWORD = "a4f49c406510bdcab6824ee7c30fd852"
# NT("password") and cntlm's printed PassNT for it (every byte inverted)
NT_LOWER = "8846f7eaee8fb117ad06bdd830b7586c"
CNTLM_PASSNT_LOWER = "77B9081511704EE852F94227CF48A793"


def test_password_hashes_match_ms_nlmp_vectors() -> None:
    lm, nt = hashes_from_password("Password")
    assert lm.hex() == LM_PASSWORD
    assert nt.hex() == NT_PASSWORD


def test_cntlm_passnt_is_the_inverted_nt_hash() -> None:
    assert invert(bytes.fromhex(NT_LOWER)).hex().upper() == CNTLM_PASSNT_LOWER
    creds = build_credentials("alice", "CORP", "ws", SecretSources(pass_nt=CNTLM_PASSNT_LOWER))
    assert creds.nt_hash.hex() == NT_LOWER


def test_standard_hashes_and_principal_forms() -> None:
    creds = build_credentials("CORP\\alice", "", "ws",
                              SecretSources(hashes=f"{LM_PASSWORD}:{NT_PASSWORD}"))
    assert (creds.user, creds.domain, creds.workstation) == ("alice", "CORP", "WS")
    assert creds.lm_hash.hex() == LM_PASSWORD
    upn = build_credentials("bob@corp.example", "", "ws", SecretSources(hashes=NT_PASSWORD))
    assert (upn.user, upn.domain, upn.principal) == ("bob", "corp.example", "corp.example\\bob")


def test_secrets_never_show_in_repr_or_str() -> None:
    creds = build_credentials("alice", "CORP", "ws", SecretSources(password="Password"))
    for text in (repr(creds), str(creds)):
        assert NT_PASSWORD not in text and LM_PASSWORD not in text
        assert "Password" not in text


def test_exactly_one_secret_source() -> None:
    with pytest.raises(CredentialError, match="no NTLM secret"):
        build_credentials("alice", "CORP", "ws", SecretSources())
    with pytest.raises(CredentialError, match="only one"):
        build_credentials("alice", "CORP", "ws", SecretSources(password="x", hashes=NT_PASSWORD))
    with pytest.raises(CredentialError, match="32 hex"):
        build_credentials("alice", "CORP", "ws", SecretSources(pass_nt="abcd"))


def test_password_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("Password\n")
    f.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        build_credentials("alice", "CORP", "ws", SecretSources(password_file=str(f)))
    f.chmod(0o600)
    creds = build_credentials("alice", "CORP", "ws", SecretSources(password_file=str(f)))
    assert creds.nt_hash.hex() == NT_PASSWORD


def test_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_NTLM_PW", "Password")
    creds = build_credentials("alice", "CORP", "ws", SecretSources(password_env="TEST_NTLM_PW"))
    assert creds.nt_hash.hex() == NT_PASSWORD
    monkeypatch.delenv("TEST_NTLM_PW")
    with pytest.raises(CredentialError, match="TEST_NTLM_PW is not set"):
        build_credentials("alice", "CORP", "ws", SecretSources(password_env="TEST_NTLM_PW"))
    assert "TEST_NTLM_PW" not in os.environ
