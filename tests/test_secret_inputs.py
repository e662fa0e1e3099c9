"""Hostile or mistaken secret inputs: non-regular files, odd encodings, malformed hashes, and
secret options under mitmweb. Each is refused with a message naming the real cause (no hang,
no traceback, no wrong password sent), and no secret reaches mitmweb's options API."""

from __future__ import annotations

import codecs
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mitmproxy_ntlm.credentials import (
    CredentialError,
    SecretSources,
    build_credentials,
    hashes_from_password,
    invert,
    read_secret_file,
)
from mitmproxy_ntlm.userfile import MAX_BYTES
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import BIN, Mitmdump
from tests.servers import free_port
from tests.web import MitmwebApi

CLI = str(BIN / "mitm-ntlm")
NT_PASSWORD = hashes_from_password("Password")[1]


def private(path: Path) -> Path:
    path.chmod(0o600)
    return path


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    return path


def unix_socket(tmp_path: Path) -> Path:
    path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return private(path)


def directory(tmp_path: Path) -> Path:
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    return path


def read_or_hang(path: Path, seconds: float = 5) -> str | BaseException:
    """read_secret_file in a thread: what it returned or raised, or fail if it blocked."""
    outcome: list[str | BaseException] = []

    def run() -> None:
        try:
            outcome.append(read_secret_file(str(path)))
        except BaseException as e:  # handed to the test as the outcome
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive() and path.is_fifo():
        with open(path, "w"):  # unblock the reader before failing
            pass
    assert outcome, f"reading {path} blocked"
    return outcome[0]


@pytest.mark.parametrize(("make", "kind"), [
    (fifo, "is a named pipe (FIFO), not a file"),
    (directory, "is a directory, not a file"),
    (unix_socket, "is a socket, not a file"),
    (lambda _: Path("/dev/null"), "is a character device, not a file"),
])
def test_only_regular_files_are_read(tmp_path: Path, make: Callable[[Path], Path],
                                     kind: str) -> None:
    outcome = read_or_hang(make(tmp_path))
    assert isinstance(outcome, CredentialError), repr(outcome)
    assert kind in str(outcome)


def test_a_symlink_to_a_private_file_is_fine_one_to_a_fifo_is_not(tmp_path: Path) -> None:
    target = tmp_path / "pw"
    target.write_text("Password\n")
    link = tmp_path / "link"
    link.symlink_to(private(target))
    assert read_or_hang(link) == "Password"
    link.unlink()
    link.symlink_to(fifo(tmp_path))
    outcome = read_or_hang(link)
    assert isinstance(outcome, CredentialError) and "named pipe" in str(outcome)


@pytest.mark.parametrize("encoded", [
    codecs.BOM_UTF8 + b"Password\r\n",  # Notepad's UTF-8
    codecs.BOM_UTF16_LE + "Password\r\n".encode("utf-16-le"),  # PowerShell 5's `>`, Out-File
    codecs.BOM_UTF16_BE + "Password".encode("utf-16-be"),
])
def test_a_byte_order_mark_is_not_part_of_the_password(tmp_path: Path, encoded: bytes) -> None:
    f = tmp_path / "pw"
    f.write_bytes(encoded)
    creds = build_credentials("alice", "CORP", "ws", SecretSources(password_file=str(private(f))))
    assert creds.nt_hash == NT_PASSWORD


def test_a_latin1_file_is_refused_with_the_fix_and_without_the_password(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes("Qüxz\n".encode("latin-1"))
    with pytest.raises(CredentialError) as e:
        read_secret_file(str(private(f)))
    assert "is not UTF-8 text" in str(e.value) and "save it as UTF-8" in str(e.value)
    assert [s for s in ("Q", "ü", "xz", "0xfc") if s in str(e.value)] == []  # no password bit


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"\nPassword\n", "empty first line"),
    (b"P\x00a\x00s\x00s\x00", "NUL characters"),  # UTF-16 without a byte order mark
    (b"x" * (MAX_BYTES + 1), "bytes"),  # a mistaken path to some big file
])
def test_files_that_cannot_hold_a_password_are_refused(tmp_path: Path, content: bytes,
                                                       message: str) -> None:
    f = tmp_path / "pw"
    f.write_bytes(content)
    with pytest.raises(CredentialError, match=message):
        read_secret_file(str(private(f)))


@pytest.mark.parametrize(("sources", "message"), [
    (SecretSources(hashes="é" * 32), "other characters"),
    (SecretSources(hashes="zz" * 16), "other characters"),
    (SecretSources(hashes="abcd"), "got 4 characters"),
    (SecretSources(hashes=f"{'0' * 32}:{NT_PASSWORD.hex()}:::"), "NT or LM:NT"),
    (SecretSources(pass_nt="\uff21\uff22" * 16), "other characters"),  # full-width AB
    (SecretSources(pass_nt="AB" * 15), "got 30 characters"),
])
def test_malformed_hashes_get_a_clear_error(sources: SecretSources, message: str) -> None:
    with pytest.raises(CredentialError, match=message):
        build_credentials("alice", "CORP", "ws", sources)


def test_spaces_and_tabs_in_a_hash_are_ignored() -> None:
    spaced = " ".join(NT_PASSWORD.hex()[i:i + 8] for i in range(0, 32, 8)).replace(" ", "\t", 1)
    assert build_credentials("a", "B", "w", SecretSources(hashes=spaced)).nt_hash == NT_PASSWORD


def test_mitmdump_refuses_a_fifo_password_file_at_once(mitm, parent, tmp_path: Path) -> None:
    m = mitm(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                          "ntlm_password_file": str(fifo(tmp_path))}, expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0
    assert "is a named pipe (FIFO), not a file" in m.output


def test_mitmdump_refuses_a_directory_as_origin_credentials(mitm, tmp_path: Path) -> None:
    m = mitm(None, {"ntlm_origin_hosts": "intranet.test",
                    "ntlm_origin_credentials": f"intranet.test={directory(tmp_path)}"},
             expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0
    assert "is a directory, not a file" in m.output


def test_mitmdump_refuses_a_fifo_keytab_by_name(mitm, parent, tmp_path: Path) -> None:
    """The Kerberos library reads the keytab; a FIFO there was reported as missing."""
    m = mitm(parent.url, {"ntlm_scheme": "kerberos", "ntlm_kerberos_keytab": str(fifo(tmp_path))},
             expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0
    assert "ntlm_kerberos_keytab" in m.output and "is a named pipe (FIFO), not a file" in m.output


@pytest.mark.parametrize("args", [
    ["start", "--parent", "http://127.0.0.1:9", "--user", "alice", "--password-file"],
    ["detect", "--parent", "http://127.0.0.1:9", "--user", "alice", "--password-file"],
    ["import-cntlm"],
])
def test_cli_refuses_a_fifo_at_once(tmp_path: Path, args: list[str]) -> None:
    p = subprocess.run([CLI, *args, str(fifo(tmp_path))], capture_output=True, text=True,
                       timeout=20, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p
    assert "is a named pipe (FIFO), not a file" in p.stderr and "Traceback" not in p.stderr


def test_mitmweb_refuses_a_password_option_at_start(parent, tmp_path: Path) -> None:
    m = Mitmdump(parent.url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                              "ntlm_password": TEST_PASSWORD, "web_port": free_port()},
                 confdir=tmp_path, tool="mitmweb")
    m.start(expect_failure=True)
    try:
        assert m.proc and m.proc.wait(10) != 0
        assert "under mitmweb, ntlm_password would be shown" in m.output
        assert "ntlm_password_file" in m.output and "ntlm_password_env" in m.output
    finally:
        m.stop()


def test_no_secret_option_reaches_mitmweb_at_runtime(parent, tmp_path: Path) -> None:
    """Set in mitmweb's own options editor (its API): refused, and never in GET /options."""
    lm, nt = hashes_from_password(TEST_PASSWORD)
    attempts = {
        "ntlm_password": TEST_PASSWORD,
        "ntlm_hashes": f"{lm.hex()}:{nt.hex()}",
        "ntlm_pass_nt": invert(nt).hex().upper(),
    }
    web_port = free_port()
    m = Mitmdump(parent.url, {"web_port": web_port}, confdir=tmp_path, tool="mitmweb")
    with m:
        web = MitmwebApi(m, web_port)
        for name, secret in attempts.items():
            r = web.set(ntlm_username=f"{TEST_DOMAIN}\\{TEST_USER}", **{name: secret})
            assert r.status_code == 400 and "ntlm_password_file" in r.text, (name, r.text)
            shown = web.get("/options").text
            assert "ntlm_password_file" in shown and secret.lower() not in shown.lower(), name
        events = web.get("/events").text
        assert m.proc and m.proc.poll() is None
    everything = (m.output + events).lower()
    assert [s for s in attempts.values() if s.lower() in everything] == []
