"""Reading the secret again without a restart: when the password file changes, and on SIGHUP.

After the lockout guard stops sending a wrong password, mitmdump has no command line for
`ntlm.reset` and no options editor: fixing the password file (polled with a cheap `stat`
every few seconds) or `kill -HUP` is what a user of any tool can do. SIGHUP would otherwise
terminate mitmproxy, so the handler lives only between `running` and `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mitmproxy_ntlm")

POLL_SECONDS = 2.0
SIGHUP: signal.Signals | None = getattr(signal, "SIGHUP", None)  # not on Windows


def file_signature(path: str) -> tuple[int, ...] | None:
    """What changes when the file is written or replaced; None when it cannot be read."""
    try:
        st = os.stat(os.path.expanduser(path))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SecretReloader:
    """Calls `reload(reason, by_user)` when the watched file changes (by_user False) or on
    SIGHUP (by_user True: the user asks for a fresh start, as with ntlm.reset); `on_hangup`,
    when given, is called on SIGHUP instead (it reloads more than the secret)."""

    def __init__(self, reload: Callable[[str, bool], None],
                 on_hangup: Callable[[], None] | None = None) -> None:
        self._reload = reload
        self._on_hangup = on_hangup or (lambda: self._reload("SIGHUP", True))
        self._path = ""
        self._seen: tuple[int, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._previous_handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, path: str) -> None:
        """Watch this file from now on ("" for none); its current state is the known one."""
        self._path = path
        self._seen = file_signature(path) if path else None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._poll(), name="mitmproxy-ntlm password file")
        if SIGHUP is not None:
            self._previous_handler = signal.getsignal(SIGHUP)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(SIGHUP, self._hangup)

    def _hangup(self) -> None:
        try:
            self._on_hangup()
        except Exception:  # a failed reload must not end the proxy (the next SIGHUP retries)
            log.exception("[ntlm] reloading on SIGHUP failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if SIGHUP is not None and self._loop is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(SIGHUP)
                if self._previous_handler is not None:
                    signal.signal(SIGHUP, self._previous_handler)
            self._loop = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if not self._path:
                continue
            now = file_signature(self._path)
            if now != self._seen:
                self._seen = now
                try:
                    self._reload(f"{self._path} changed", False)
                except Exception:  # never end the watch: the next change must be seen too
                    log.exception("[ntlm] reading %s again failed", self._path)
