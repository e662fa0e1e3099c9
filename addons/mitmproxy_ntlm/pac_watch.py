"""Keeping the PAC current while the proxy runs, as Px does with its reload interval.

The PAC is fetched again every `ntlm_pac_refresh` seconds (0: no schedule), when the network
changes (a new address, default route or resolv.conf, polled cheaply every few seconds) and
when asked (`reload_now`, e.g. on SIGHUP). The fetch (HTTP, DNS, discovery) runs in a daemon
thread, never on the event loop, and is bounded in time and size by the loader. A failed fetch
keeps the last good PAC and is logged once until a fetch succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .pac import Found, PacError
from .secret_reload import file_signature

log = logging.getLogger("mitmproxy_ntlm")

NETWORK_POLL_SECONDS = 5.0
_NETWORK_FILES = ("/proc/net/route", "/proc/net/if_inet6")
T = TypeVar("T")


def network_fingerprint(resolv_conf: str = "/etc/resolv.conf") -> str:
    """What changes when the host joins another network: interfaces, addresses, routes, DNS.
    Cheap enough for the event loop (a stat and reads of /proc, which never block); on systems
    without /proc, interfaces and resolv.conf only."""
    digest = hashlib.sha256(repr(file_signature(resolv_conf)).encode())
    with contextlib.suppress(OSError):
        digest.update(repr(socket.if_nameindex()).encode())
    for name in _NETWORK_FILES:
        with contextlib.suppress(OSError):
            digest.update(Path(name).read_bytes()[:1024 * 1024])
    return digest.hexdigest()


class PacWatcher:
    """Runs `load` (blocking, in a thread) and hands each new PAC to `apply` on the loop."""

    def __init__(self, what: str, load: Callable[[], Found], apply: Callable[[Found], None],
                 refresh: float, fetch_at_start: bool,
                 network: Callable[[], str] = network_fingerprint,
                 poll: float = NETWORK_POLL_SECONDS) -> None:
        self.what = what
        self._network = network
        self._poll = poll
        self._load = load
        self._apply = apply
        self._refresh = refresh
        self._fetch_at_start = fetch_at_start
        self._last: str | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def known(self, script: str) -> None:
        """The PAC in use now (loaded at configuration): a fetch that gives it again is quiet."""
        self._last = script

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"mitmproxy-ntlm PAC {self.what}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def reload_now(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        network = self._network()
        due = time.monotonic() + self._refresh if self._refresh else float("inf")
        if self._fetch_at_start:
            await self.fetch()
        while True:
            wait = min(self._poll, max(0.0, due - time.monotonic()))
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            asked = self._wake.is_set()
            self._wake.clear()
            now = self._network()
            changed, network = now != network, now
            if changed:
                log.info("[ntlm] the network changed: fetching the PAC again")
            if asked or changed or time.monotonic() >= due:
                await self.fetch()
                due = time.monotonic() + self._refresh if self._refresh else float("inf")

    async def fetch(self) -> None:
        try:
            found = await _in_thread(self._load)
        except PacError as e:
            if not self._failing:
                kept = "keeping the last good PAC" if self._last else "no PAC in use"
                log.warning("[ntlm] %s: %s", e, kept)
            self._failing = True
            return
        if self._failing:
            log.info("[ntlm] PAC fetched again from %s", found.source)
        self._failing = False
        if found.script == self._last:
            return
        try:
            self._apply(found)
        except PacError as e:
            log.warning("[ntlm] %s (from %s): keeping the last good PAC", e, found.source)
            return
        self._last = found.script


async def _in_thread(work: Callable[[], T]) -> T:
    """`work()` in a daemon thread: a slow fetch neither blocks the loop nor delays exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = work()
        except BaseException as e:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(deliver, None, e)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=target, daemon=True, name="mitmproxy-ntlm PAC fetch").start()
    return await future
