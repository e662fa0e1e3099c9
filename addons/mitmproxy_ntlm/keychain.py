"""The password in the operating system's keychain, through the `keyring` library.

Secret Service (GNOME Keyring, KWallet) on Linux, Keychain on macOS, Credential Manager on
Windows: the password is stored once with `mitm-ntlm password set` and read by the addon at
start and on every reload, so it is in no file, option or environment. One service name,
SERVICE, is shared by the command and the addon; the entry's user name is `DOMAIN\\user` as
the addon logs it. `keyring` is an optional extra: everything here imports it on first use.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

SERVICE = "mitmproxy-ntlm"
READ_TIMEOUT = 20.0
INSTALL_HINT = "pip install 'mitmproxy-ntlm[keyring]'"


class KeychainError(Exception):
    """The keyring cannot give or take the password; the message names the fix."""


class NoEntry(KeychainError):
    """The keyring works but holds no password for that user."""


def _keyring() -> ModuleType:
    try:
        import keyring
    except ImportError:
        raise KeychainError(f"the keyring library is not installed: {INSTALL_HINT}") from None
    return keyring


def _backend() -> Any:
    """The keyring backend in use; KeychainError when the system offers none."""
    keyring = _keyring()
    from keyring.backends import fail

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring):
        raise KeychainError(
            "no keyring backend is available: on Linux a Secret Service must run in this "
            "session (GNOME Keyring or KWallet, with DBUS_SESSION_BUS_ADDRESS set); without a "
            "desktop, pip install keyrings.alt for a file-based keyring, or use "
            "ntlm_password_file instead")
    return backend


def backend_name() -> str:
    """The backend's name for messages, e.g. `SecretService Keyring` (no secret)."""
    backend = _backend()
    inner = getattr(backend, "backends", None)  # keyring's chainer: several backends
    return ", ".join(b.name for b in inner) if inner else str(backend.name)


def _locked_hint(entry: str) -> str:
    return (f"the keyring holding {entry} is locked: unlock it (log in to the desktop, or "
            f"unlock the login keyring in your keyring manager; headless GNOME Keyring: "
            f"gnome-keyring-daemon --unlock; macOS: security unlock-keychain) and try again")


def read_password(entry: str) -> str:
    """The password stored for `entry` (DOMAIN\\user) under SERVICE, within READ_TIMEOUT.

    The addon reads on mitmproxy's event loop (start, SIGHUP). A locked keyring on a desktop
    shows an unlock prompt and the backend waits for it without a limit, so the read runs in a
    daemon thread that is given up on (left to finish alone) after READ_TIMEOUT seconds."""
    answer: list[tuple[str | None, BaseException | None]] = []

    def read() -> None:
        try:
            answer.append((_read_now(entry), None))
        except BaseException as e:  # handed to the waiting caller
            answer.append((None, e))

    thread = threading.Thread(target=read, name="mitmproxy-ntlm keyring", daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT)
    if not answer:
        raise KeychainError(
            f"the keyring did not answer within {READ_TIMEOUT:g} s (waiting for an unlock "
            f"prompt?): unlock the keyring holding {entry} and try again")
    password, error = answer[0]
    if error is not None:
        raise error
    assert password is not None
    return password


def _read_now(entry: str) -> str:
    backend = _backend()
    from keyring import errors

    try:
        password = backend.get_password(SERVICE, entry)
    except errors.KeyringLocked:
        raise KeychainError(_locked_hint(entry)) from None
    except Exception as e:  # KeyringError, or a backend's own (D-Bus) error: it holds no secret
        raise KeychainError(f"the keyring ({backend_name()}) could not be read: "
                            f"{type(e).__name__}: {e}") from None
    if password is None:
        raise NoEntry(
            f"no password for {entry} in the keyring ({backend_name()}): store it with "
            f"mitm-ntlm password set --user '{entry}'")
    if not password:
        raise KeychainError(f"the password stored for {entry} in the keyring is empty: store "
                            f"it again with mitm-ntlm password set --user '{entry}'")
    return password


def has_password(entry: str) -> bool:
    """Whether an entry exists (its value is read by the backend but never returned)."""
    try:
        read_password(entry)
    except NoEntry:
        return False
    return True


def store_password(entry: str, password: str) -> None:
    backend = _backend()
    from keyring import errors

    try:
        backend.set_password(SERVICE, entry, password)
    except errors.KeyringLocked:
        raise KeychainError(_locked_hint(entry)) from None
    except errors.KeyringError as e:
        raise KeychainError(f"the keyring ({backend_name()}) did not store it: {e}") from None


def delete_password(entry: str) -> None:
    """Remove the entry; KeychainError when there is none."""
    if not has_password(entry):  # backends differ in how they report a missing entry
        raise NoEntry(f"no password for {entry} in the keyring ({backend_name()})")
    backend = _backend()
    from keyring import errors

    try:
        backend.delete_password(SERVICE, entry)
    except errors.KeyringLocked:
        raise KeychainError(_locked_hint(entry)) from None
    except errors.KeyringError as e:
        raise KeychainError(f"the keyring ({backend_name()}) did not delete it: {e}") from None
