"""POSIX-only checks stay out of the way where the OS has no such thing."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from mitmproxy_ntlm import credentials


def test_secret_file_mode_is_checked_on_posix(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("pw\n")
    f.chmod(0o644)
    with pytest.raises(credentials.CredentialError, match="chmod 600"):
        credentials.read_secret_file(str(f))


def test_secret_file_without_mode_bits_is_read_on_windows(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows reports every file as 0666 (or 0444) and has no getuid: the mode and owner
    checks would refuse every password file there."""
    f = tmp_path / "pw"
    f.write_text("pw\n")
    f.chmod(0o666)
    monkeypatch.setattr(credentials, "os", types.SimpleNamespace(name="nt"))
    assert credentials.read_secret_file(str(f)) == "pw"
