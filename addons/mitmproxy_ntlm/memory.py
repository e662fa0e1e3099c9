"""Memory given back to the system when the proxy goes quiet after a busy period (issue 24).

After a burst of clients, CPython keeps the arenas of freed objects and glibc keeps freed heap
pages, so the process stays at its peak size for good (stock mitmdump too). Once no client
connection has been open for `QUIET_SECONDS` after some were (or after start-up), one
`gc.collect()` and glibc's `malloc_trim(0)` return what they can; then nothing more until the
next busy period. Most of a burst's memory goes back only with Python's objects outside
CPython's arenas: `mitm-ntlm start` runs mitmproxy on jemalloc where it can (allocator.py),
and then the quiet period flushes jemalloc's cache and purges its free pages instead.

The open connections are counted by mitmproxy itself (`Proxyserver.connections`, a public
attribute), read once a second: no hook, so nothing is added to a connection's cost.

Once mitmproxy runs, the objects start-up made (modules, classes, options, the addons) are
moved out of the cycle collector's way (`gc.freeze()`): they live as long as the process, yet
each full collection walked them all, 55-80 ms every few hundred tunnels, and the addon's
imports and the handshake traces it then kept made that walk 45% longer than stock's. A frozen
object is still freed when its last reference goes; only a reference cycle among frozen
objects would stay. So an option changed at runtime, after which replaced objects may be such
cycles, and unloading the script give them back to the collector (`gc.unfreeze()`), and
nothing is frozen again until the next start. See docs/benchmarks.md ("Full collections").
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx

log = logging.getLogger(__name__)

QUIET_SECONDS = 5.0
"""How long no client connection may be open before the memory is trimmed."""
POLL_SECONDS = 1.0


class QuietPeriods:
    """Says when to trim (sans-I/O): once per quiet period that follows a busy one.

    Fed the number of open client connections at some moments; a quiet period starts when
    that number is first seen at 0 after being above it. Start-up counts as a busy period:
    imports and the first `configure` leave freed memory behind too."""

    def __init__(self, quiet_seconds: float = QUIET_SECONDS) -> None:
        self.quiet_seconds = quiet_seconds
        self._busy = True  # connections seen (or start-up) since the last trim
        self._quiet_since: float | None = None

    def observe(self, now: float, open_connections: int) -> bool:
        """Whether to trim now."""
        if open_connections > 0:
            self._busy, self._quiet_since = True, None
            return False
        if not self._busy:
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since < self.quiet_seconds:
            return False
        self._busy = False
        return True


def give_back_memory() -> None:
    """Collect cycles, then ask the C allocator to return its free pages to the system. Under
    jemalloc (`mitm-ntlm start`, allocator.py) that is its own: the objects this thread's cache
    holds go back to their pages, and every page unused now is returned at once, not after
    its decay time (`mallctl`)."""
    collected = gc.collect()
    mallctl = _jemalloc_mallctl()
    if mallctl is not None:
        flushed = mallctl(b"thread.tcache.flush", None, None, None, 0) == 0
        purged = mallctl(b"arena.%d.purge" % ALL_ARENAS, None, None, None, 0) == 0
        log.debug("[ntlm] proxy quiet: %d objects collected, jemalloc: cache %s, pages %s",
                  collected, "flushed" if flushed else "not flushed",
                  "purged" if purged else "not purged")
        return
    trim = _malloc_trim()
    released = None if trim is None else bool(trim(0))
    log.debug("[ntlm] proxy quiet: %d objects collected, malloc_trim: %s", collected,
              {None: "not in this C library", True: "memory released",
               False: "nothing to release"}[released])


ALL_ARENAS = 4096
"""jemalloc's MALLCTL_ARENAS_ALL: `arena.4096.purge` purges every arena."""


@functools.cache
def _jemalloc_mallctl() -> Callable[..., int] | None:
    """jemalloc's `mallctl` when jemalloc is this process's allocator, else None."""
    import ctypes

    mallctl = _c_function("mallctl")
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
    return mallctl


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    return _c_function("malloc_trim")


def _c_function(name: str) -> Any:
    """A C function this process has loaded (its C library, a preloaded allocator), or None."""
    import ctypes  # only here: loading ctypes costs memory that a quiet proxy never needs

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


class MemoryTrim:
    """The addon: freezes the start-up heap, and watches mitmproxy's open client connections
    while it runs."""

    def __init__(self) -> None:
        self.periods = QuietPeriods()
        self._task: asyncio.Task[None] | None = None
        self._frozen = False  # this addon froze the start-up heap, and has not thawed it

    def running(self) -> None:
        if not self._frozen:
            gc.collect()  # start-up's garbage (and a reloaded script's old one) goes first
            gc.freeze()
            self._frozen = True
            log.debug("[ntlm] %d start-up objects frozen (out of the cycle collector's way)",
                      gc.get_freeze_count())
        server = ctx.master.addons.get("proxyserver")
        if server is None or self._task is not None:  # no proxy server (tests), or a reload
            return
        # asyncio's own: mitmproxy's create_task differs between 11 and 12 (keep_ref)
        self._task = asyncio.get_running_loop().create_task(
            self._watch(server), name="mitmproxy-ntlm memory trim")

    def configure(self, updated: set[str]) -> None:
        if updated:  # before `running` nothing is frozen: start-up's configures change nothing
            self._thaw("an option changed at runtime")

    def done(self) -> None:
        self._thaw("the script is unloaded")
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _thaw(self, why: str) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
            log.debug("[ntlm] start-up objects back in the cycle collector: %s", why)

    async def _watch(self, server: Any) -> None:
        connections = getattr(server, "connections", None)  # mitmproxy 10.4 to 12.3: a dict
        if not isinstance(connections, dict):
            return  # a mitmproxy without it: no trimming rather than an error every second
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.periods.observe(time.monotonic(), len(connections)):
                give_back_memory()
