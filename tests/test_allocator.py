"""`mitm-ntlm start` runs mitmproxy on jemalloc where it is installed (allocator.py).

The choice itself is sans-I/O (environment in, environment and one line out); the end-to-end
tests read the running mitmdump's /proc: the library mapped, the variables it started with.
CI installs libjemalloc2; without it the end-to-end tests fail rather than pass unseen.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from mitmproxy_ntlm.allocator import (
    LIBRARY,
    MALLOC_CONF,
    AllocatorError,
    find_jemalloc,
    with_allocator,
)
from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN
from tests.mitm import curl
from tests.processes import Service, children
from tests.servers import client_env, free_port

CLI = Path(sys.executable).parent / "mitm-ntlm"
DEMO_URL = "http://ntlm-demo.invalid/"
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu") / LIBRARY  # any path: with_allocator only names it
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, LD_PRELOAD")


def test_auto_preloads_jemalloc_and_routes_python_objects_to_it() -> None:
    env, line = with_allocator({"HOME": "/h"}, "auto", JEMALLOC)
    assert env == {"HOME": "/h", "PYTHONMALLOC": "malloc", "LD_PRELOAD": str(JEMALLOC),
                   "MALLOC_CONF": MALLOC_CONF}
    assert "background_thread:true" in MALLOC_CONF  # what gives pages back while idle
    assert line.startswith("Memory: jemalloc") and "--allocator python" in line


@pytest.mark.parametrize("name", ["PYTHONMALLOC", "LD_PRELOAD", "MALLOC_CONF"])
def test_the_users_own_allocator_settings_win(name: str) -> None:
    for choice in ("auto", "jemalloc", "python"):
        env, line = with_allocator({name: "theirs"}, choice, JEMALLOC)
        assert env == {name: "theirs"}
        assert name in line


def test_python_choice_and_missing_library() -> None:
    assert with_allocator({}, "python", JEMALLOC)[0] == {}
    env, line = with_allocator({}, "auto", None)
    assert env == {} and "libjemalloc2" in line  # says how to get it
    with pytest.raises(AllocatorError, match="libjemalloc2"):
        with_allocator({}, "jemalloc", None)


def test_find_jemalloc_takes_the_first_directory_that_has_it(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert find_jemalloc([first, second]) is None
    (second / LIBRARY).write_bytes(b"")
    assert find_jemalloc([first, second]) == second / LIBRARY
    (first / LIBRARY).mkdir()  # not a file
    assert find_jemalloc([first, second]) == second / LIBRARY


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


@linux_only
def test_start_runs_mitmdump_on_jemalloc(tmp_path: Path) -> None:
    """With a parent, `start` execs mitmdump: its process has jemalloc mapped and Python's
    objects routed to it; the logon works as before, and once the proxy is quiet the memory
    trim (memory.py) flushes jemalloc's cache and purges its free pages."""
    library = find_jemalloc()
    assert library is not None, f"{LIBRARY} not installed (Debian: apt install libjemalloc2)"
    secret = tmp_path / "password"
    secret.write_text("alice-Pass-1\n")
    secret.chmod(0o600)
    parent = ParentProxy({f"{TEST_DOMAIN}\\alice": "alice-Pass-1"}).start()
    port = free_port()
    service = Service([str(CLI), "start", "--parent", parent.url, "--user",
                       f"{TEST_DOMAIN}\\alice", "--password-file", str(secret), "--port",
                       str(port), "--set", "termlog_verbosity=debug"],
                      client_env(home=tmp_path))
    try:
        service.wait_for("listening at")
        assert f"Memory: jemalloc ({library})" in service.output
        pid = service.proc.pid  # exec: the wrapper became mitmdump
        assert str(library) in mapped_libraries(pid)
        env = environment(pid)
        assert env["PYTHONMALLOC"] == "malloc" and env["MALLOC_CONF"] == MALLOC_CONF
        r = curl("-x", f"http://127.0.0.1:{port}", DEMO_URL)
        assert f"Authenticated as: {TEST_DOMAIN}\\alice" in r.stdout, r.stdout + r.stderr
        mark = len(service.output)
        service.wait_for("jemalloc: cache flushed, pages purged", after=mark, timeout=20)
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(15) == 0, service.output
    finally:
        service.stop()
        parent.stop()


@linux_only
def test_allocator_python_leaves_mitmdump_on_pymalloc(tmp_path: Path) -> None:
    """The demo runs mitmdump as a child: `--allocator python` keeps jemalloc out of it."""
    port = free_port()
    service = Service([str(CLI), "start", "--port", str(port), "--allocator", "python"],
                      client_env(home=tmp_path))
    try:
        service.wait_for("listening at")
        assert "Memory: Python's own allocator (--allocator python)." in service.output
        kids = children(service.proc.pid)
        assert len(kids) == 1
        assert LIBRARY not in mapped_libraries(kids[0])
        assert "PYTHONMALLOC" not in environment(kids[0])
        r = curl("-x", f"http://127.0.0.1:{port}", DEMO_URL)
        assert "Authenticated as: DEMO\\demo" in r.stdout, r.stdout + r.stderr
    finally:
        service.proc.send_signal(signal.SIGTERM)
        service.proc.wait(15)
        service.stop()
