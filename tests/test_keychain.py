"""The password in the OS keyring: `mitm-ntlm password` and ntlm_password_keyring, against a real
Secret Service (gnome-keyring-daemon on a private D-Bus session bus that the test starts).

The bus has no service directories, so nothing is started behind the test's back (no D-Bus
activation of a second keyring daemon or a prompter); both daemons are stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mitmproxy_ntlm import keychain
from mitmproxy_ntlm.credentials import CredentialError, SecretSources
from tests.constants import TEST_PASSWORD, TEST_PRINCIPAL
from tests.mitm import BIN, curl

CLI = str(BIN / "mitm-ntlm")
ENTRY = TEST_PRINCIPAL  # CORP\alice
UNLOCK_PASSWORD = "keyring-login-pw"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class SecretService:
    """A session bus and gnome-keyring-daemon's secrets component, in a temporary home."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, exist_ok=True)
        for sub in ("run", "data", "config", "cache", "bus"):
            (root / sub).mkdir(mode=0o700)
        (root / "bus.conf").write_text(BUS_CONFIG.format(dir=root / "bus"))
        self.env = {
            "XDG_RUNTIME_DIR": str(root / "run"),  # the daemon's control socket
            "XDG_DATA_HOME": str(root / "data"),  # its keyrings
            "XDG_CONFIG_HOME": str(root / "config"),  # no user keyringrc.cfg is read
            "XDG_CACHE_HOME": str(root / "cache"),
        }
        self.bus_pid = 0
        self.daemon: subprocess.Popen[bytes] | None = None

    def start_bus(self) -> None:
        out = subprocess.run(
            ["dbus-daemon", f"--config-file={self.root / 'bus.conf'}", "--fork", "--nopidfile",
             "--print-address=1", "--print-pid=1"],
            capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
        self.env["DBUS_SESSION_BUS_ADDRESS"], self.bus_pid = out[0], int(out[1])

    def start_keyring(self, unlock: bool = True) -> None:
        """The login keyring unlocked with UNLOCK_PASSWORD (created on first start), or left
        locked (no prompter to unlock it: reads fail as on a locked desktop keyring)."""
        cmd = ["gnome-keyring-daemon", "--foreground", "--components=secrets"]
        self.daemon = subprocess.Popen(
            [*cmd, "--unlock"] if unlock else cmd, env={**os.environ, **self.env},
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert self.daemon.stdin is not None
        self.daemon.stdin.write(UNLOCK_PASSWORD.encode() if unlock else b"")
        self.daemon.stdin.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "boolean true" in self._bus_call("NameHasOwner", "string:org.freedesktop.secrets"):
                return
            time.sleep(0.05)
        raise RuntimeError("gnome-keyring-daemon did not take org.freedesktop.secrets")

    def stop_keyring(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            self.daemon.wait(10)
            self.daemon = None

    def stop(self) -> None:
        self.stop_keyring()
        if self.bus_pid:
            os.kill(self.bus_pid, signal.SIGTERM)
            self.bus_pid = 0

    def _bus_call(self, method: str, *args: str) -> str:
        return subprocess.run(
            ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", f"org.freedesktop.DBus.{method}", *args],
            capture_output=True, text=True, timeout=10, env={**os.environ, **self.env}).stdout


@pytest.fixture
def secret_service() -> Iterator[SecretService]:
    missing = [tool for tool in ("dbus-daemon", "dbus-send", "gnome-keyring-daemon")
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install gnome-keyring dbus-daemon "
                    f"dbus-bin)")
    with tempfile.TemporaryDirectory(prefix="keyring-") as root:  # short: socket paths
        service = SecretService(Path(root))
        try:
            service.start_bus()
            service.start_keyring()
            yield service
        finally:
            service.stop()


def password_cli(action: str, env: dict[str, str], stdin: str = "",
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "password", action, "--user", ENTRY], input=stdin,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_password_from_the_keyring_at_start_and_on_sighup(secret_service, mitm, parent,
                                                          origin) -> None:
    env = secret_service.env
    absent = password_cli("status", env)
    assert absent.returncode == 1
    assert f"no password for {ENTRY} in the keyring (SecretService Keyring)" in absent.stderr

    stored = password_cli("set", env, stdin=TEST_PASSWORD + "\n")
    assert stored.returncode == 0, stored.stderr
    present = password_cli("status", env)
    assert present.returncode == 0, present.stderr
    assert f"A password for {ENTRY} is stored in the keyring (SecretService Keyring)" \
        in present.stdout
    for result in (stored, present):
        assert TEST_PASSWORD not in result.stdout + result.stderr

    creds = {"ntlm_username": ENTRY, "ntlm_password_keyring": True}
    m = mitm(parent.url, creds, env=env)
    assert m.wait_for(f"the password of {ENTRY} was read from the OS keyring")
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert parent.snapshot().rejected_count == 0

    deleted = password_cli("delete", env)
    assert deleted.returncode == 0, deleted.stderr
    assert password_cli("status", env).returncode == 1
    assert password_cli("delete", env).returncode == 1  # nothing left to delete

    # A reload without an entry says how to store one and keeps the credentials it has.
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGHUP)
    assert m.wait_for("SIGHUP: ntlm_password_keyring: no password for")
    assert f"store it with mitm-ntlm password set --user '{ENTRY}'; the previous credentials " \
        f"stay in use" in m.output
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"

    # At start, the same cause stops mitmdump with the same advice.
    refused = mitm(parent.url, creds, expect_failure=True, env=env)
    assert refused.proc is not None and refused.proc.wait(10) != 0
    assert f"store it with mitm-ntlm password set --user '{ENTRY}'" in refused.output
    assert "Traceback" not in refused.output

    # A locked keyring is named as such, with how to unlock it.
    assert password_cli("set", env, stdin=TEST_PASSWORD + "\n").returncode == 0
    secret_service.stop_keyring()
    secret_service.start_keyring(unlock=False)
    os.kill(m.proc.pid, signal.SIGHUP)
    assert m.wait_for(f"the keyring holding {ENTRY} is locked: unlock it")
    assert TEST_PASSWORD not in m.output


def test_no_keyring_backend_is_named_with_the_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    env.update(XDG_CONFIG_HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path),
               DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    result = subprocess.run([CLI, "password", "status", "--user", ENTRY], capture_output=True,
                            text=True, timeout=30, env=env)
    assert result.returncode == 1
    assert "no keyring backend is available" in result.stderr
    assert "pip install keyrings.alt" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- sans-I/O


def test_the_keyring_is_one_of_the_exclusive_secret_sources(password_file: Path) -> None:
    sources = SecretSources(password_file=str(password_file), keyring_entry=ENTRY)
    with pytest.raises(CredentialError,
                       match="set only one NTLM secret option, got: ntlm_password_file, "
                             "ntlm_password_keyring"):
        sources.resolve()


def test_a_missing_keyring_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # `import keyring` fails as uninstalled
    with pytest.raises(CredentialError,
                       match=r"keyring library is not installed: pip install "
                             r"'mitmproxy-ntlm\[keyring\]'"):
        SecretSources(keyring_entry=ENTRY).resolve()


def test_a_keyring_that_does_not_answer_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked desktop keyring waits for its unlock prompt without a limit: the event loop must
    not wait with it."""
    keyring = pytest.importorskip("keyring")
    from keyring.backend import KeyringBackend

    release = threading.Event()

    class WaitingForUnlock(KeyringBackend):
        priority = 1  # type: ignore[assignment]

        def get_password(self, service: str, username: str) -> str | None:
            release.wait(10)
            return None

        def set_password(self, service: str, username: str, password: str) -> None:
            raise NotImplementedError

        def delete_password(self, service: str, username: str) -> None:
            raise NotImplementedError

    previous = keyring.get_keyring()
    keyring.set_keyring(WaitingForUnlock())
    monkeypatch.setattr(keychain, "READ_TIMEOUT", 0.2)
    try:
        with pytest.raises(CredentialError, match=rf"did not answer within 0.2 s .*unlock the "
                                                  rf"keyring holding {re.escape(ENTRY)}"):
            SecretSources(keyring_entry=ENTRY).resolve()
    finally:
        release.set()
        keyring.set_keyring(previous)
