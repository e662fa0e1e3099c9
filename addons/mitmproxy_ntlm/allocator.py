"""The C allocator `mitm-ntlm start` runs mitmproxy with: jemalloc, where the system has it.

After a burst of clients, CPython's own allocator keeps every 1 MiB arena that a few surviving
objects still use, so mitmdump stays near its peak size for good (stock mitmdump too: 1.6x
its idle size). With Python's objects allocated by jemalloc instead (`PYTHONMALLOC=malloc`,
jemalloc preloaded), jemalloc's background thread hands pages unused for `DECAY_MS` back to
the system: 1.2x idle 30 s after the same burst, at the same CPU per request; glibc's malloc in
its place gives memory back too, but costs 4-16% more CPU (docs/benchmarks.md, "Memory").

The allocator is chosen before Python starts, so only for the mitmproxy that `start` runs;
only on Linux, where libjemalloc.so.2 is installed (Debian and Ubuntu: `libjemalloc2`); and
never over a user's own PYTHONMALLOC, LD_PRELOAD or MALLOC_CONF.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path

LIBRARY = "libjemalloc.so.2"
DECAY_MS = 2000
MALLOC_CONF = f"background_thread:true,dirty_decay_ms:{DECAY_MS},muzzy_decay_ms:0"
USER_VARIABLES = ("PYTHONMALLOC", "LD_PRELOAD", "MALLOC_CONF")
CHOICES = ("auto", "jemalloc", "python")


class AllocatorError(ValueError):
    """`--allocator jemalloc` where jemalloc cannot be used; the message says why."""


def library_dirs() -> list[Path]:
    """Where Linux distributions put shared libraries (multiarch first, as Debian does)."""
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    return [Path(d) for d in (*dirs, "/usr/lib64", "/usr/lib", "/usr/local/lib")]


def find_jemalloc(dirs: Iterable[Path] | None = None) -> Path | None:
    """The installed libjemalloc.so.2, or None (always None off Linux)."""
    if dirs is None:
        if not sys.platform.startswith("linux"):
            return None
        dirs = library_dirs()
    return next((d / LIBRARY for d in dirs if (d / LIBRARY).is_file()), None)


def with_allocator(env: Mapping[str, str], choice: str,
                   library: Path | None) -> tuple[dict[str, str], str]:
    """The environment for mitmproxy under `--allocator choice`, and one line that says which
    allocator it gets. `library` is `find_jemalloc()`'s answer."""
    env = dict(env)
    own = [name for name in USER_VARIABLES if env.get(name)]
    if own:
        return env, f"Memory: the allocator your {', '.join(own)} chooses."
    if choice == "python":
        return env, "Memory: Python's own allocator (--allocator python)."
    if library is None:
        if choice == "jemalloc":
            raise AllocatorError(f"--allocator jemalloc: no {LIBRARY} found (Debian and "
                                 f"Ubuntu: apt install libjemalloc2; Linux only)")
        return env, ("Memory: Python's own allocator (on Linux with jemalloc installed, "
                     "Debian and Ubuntu: libjemalloc2, a burst's memory would go back to "
                     "the system).")
    env.update(PYTHONMALLOC="malloc", LD_PRELOAD=str(library), MALLOC_CONF=MALLOC_CONF)
    return env, (f"Memory: jemalloc ({library}): a burst's memory goes back to the system "
                 f"(--allocator python to turn it off).")
