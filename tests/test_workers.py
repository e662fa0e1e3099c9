"""`mitm-ntlm start --workers N`: N mitmdumps on one port (SO_REUSEPORT), one supervisor.

Run as a user would: the demo (its checking parent counts logons), curl clients, signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mitm import curl
from tests.processes import Service, alive
from tests.servers import client_env, free_port

CLI = str(Path(sys.executable).parent / "mitm-ntlm")


def start(home: Path, *args: str) -> tuple[Service, int]:
    """`mitm-ntlm start` in demo mode on a free port, its output collected."""
    port = free_port()
    return Service([CLI, "start", "--port", str(port), *args], client_env(home=home)), port


def worker_pids(started: Service) -> list[int]:
    found = re.findall(r"workers share the port \(pids ([\d, ]+)\)", started.output)
    return [int(p) for p in found[-1].split(", ")] if found else []


def stop(started: Service) -> None:
    """SIGTERM to the supervisor, as a service manager stops it (it stops its workers)."""
    proc = started.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:  # only what this test started, by its group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    started, port = start(tmp_path, "--workers", "2")
    try:
        started.wait_for("listening at", count=2)
        pids = worker_pids(started)
        assert len(pids) == 2, started.output
        for _ in range(30):  # a new connection each: the kernel spreads them over both
            r = curl("-x", f"http://127.0.0.1:{port}", "http://ntlm-demo.invalid/")
            assert "DEMO\\demo" in r.stdout, r.stdout + r.stderr + started.output[-2000:]
        # Each worker keeps its own pool: one logon per worker that served, so two logons
        # prove both served (one worker alone would have logged on once and pooled).
        started.wait_for("result=authenticated", count=2, timeout=5)
        assert len(re.findall(r"result=authenticated", started.output)) == 2, started.output
        lockout = tmp_path / ".mitmproxy" / "mitm-ntlm-lockout.sqlite"
        assert lockout.is_file()  # the workers count failed logons in one place
        assert lockout.stat().st_mode & 0o077 == 0  # account names: for this user only
    finally:
        stop(started)
    assert started.proc.returncode is not None
    assert not [pid for pid in pids if alive(pid)]


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    started, port = start(tmp_path, "--workers", "2")
    try:
        started.wait_for("listening at", count=2)
        first, second = worker_pids(started)
        time.sleep(5.5)  # past the start-up window: a death now is a crash, not a bad option
        os.kill(first, signal.SIGKILL)
        started.wait_for(f"worker {first} ended (exit -9): starting another", timeout=10)
        started.wait_for("listening at", count=3)
        for _ in range(6):
            r = curl("-x", f"http://127.0.0.1:{port}", "http://ntlm-demo.invalid/")
            assert "DEMO\\demo" in r.stdout, r.stdout + r.stderr
        assert alive(second)
    finally:
        stop(started)


def test_a_bad_option_stops_every_worker_with_the_reason(tmp_path: Path) -> None:
    started, _ = start(tmp_path, "--workers", "3", "--set", "ntlm_max_failures=-1")
    try:
        code = started.proc.wait(30)
    finally:
        stop(started)
    assert code != 0
    assert "ended at start-up" in started.output, started.output
    assert "ntlm_max_failures" in started.output, started.output
    assert not [pid for pid in worker_pids(started) if alive(pid)]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers 0: give 1 or more"),
    (["--workers", "2", "--tool", "mitmweb"], "--workers runs mitmdump processes"),
])
def test_workers_refused_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run([CLI, "start", "--port", str(free_port()), *args], capture_output=True,
                       text=True, env=client_env(home=tmp_path), timeout=30)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_with_a_parent_the_supervisor_is_a_small_process(tmp_path: Path) -> None:
    """With a real parent (no demo in the process) `start` execs into the stdlib-only
    supervisor: it does not keep mitmproxy and the addon loaded beside its workers."""
    from mitmproxy_ntlm.testing.parent import ParentProxy

    parent = ParentProxy({"DEMO\\demo": "Worker-Pass-1"}).start()
    env = client_env(home=tmp_path)
    env["MITM_NTLM_PASSWORD"] = "Worker-Pass-1"
    port = free_port()
    proc = subprocess.Popen(
        [CLI, "start", "--workers", "2", "--parent", parent.url, "--user", "DEMO\\demo",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        r = None
        while time.monotonic() < deadline:
            r = curl("-x", f"http://127.0.0.1:{port}", "http://ntlm-demo.invalid/")
            if "DEMO\\demo" in r.stdout:
                break
            time.sleep(0.5)
        assert r is not None and "DEMO\\demo" in r.stdout, r and (r.stdout + r.stderr)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        assert b"mitmproxy_ntlm.workers" in cmdline, cmdline
        with open(f"/proc/{proc.pid}/maps") as f:  # no mitmproxy module loaded (its .so)
            assert "mitmproxy_rs" not in f.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        parent.stop()
    assert proc.returncode is not None
