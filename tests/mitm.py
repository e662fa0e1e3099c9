"""Run the real mitmdump (or mitmweb) with the addon, on a free loopback port, for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.processes import terminate

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addons" / "ntlm.py"
BIN = Path(sys.executable).parent

_LISTENING = re.compile(r"listening at \*?\[?([0-9a-f.:]*?)\]?:(\d+)")


class Mitmdump:
    """mitmdump -s addons/ntlm.py in upstream mode, output captured for assertions."""

    def __init__(
        self,
        parent_url: str | None,
        options: dict[str, str | int | bool] | None = None,
        *args: str,
        confdir: Path,
        tool: str = "mitmdump",
        env: dict[str, str] | None = None,
    ) -> None:
        self.parent_url = parent_url
        self.options = options or {}
        self.args = list(args)
        self.confdir = confdir
        self.tool = tool
        self.env = env
        self.port = 0
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        cmd = [str(BIN / self.tool), "-s", str(ADDON), "--listen-host", "127.0.0.1", "-p", "0",
               "--set", f"confdir={self.confdir}", "--set", "termlog_verbosity=debug"]
        if self.tool == "mitmweb":
            cmd += ["--set", "web_open_browser=false", "--set", "web_host=127.0.0.1"]
        if self.parent_url:
            cmd += ["--mode", f"upstream:{self.parent_url}"]
        for key, value in self.options.items():
            if isinstance(value, bool):
                value = str(value).lower()
            cmd += ["--set", f"{key}={value}"]
        return cmd + self.args

    def start(self, expect_failure: bool = False) -> Mitmdump:
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._listening.wait(0.05):
                return self
            if self.proc.poll() is not None:
                self._reader.join(5)
                if expect_failure:
                    return self
                raise RuntimeError(f"{self.tool} exited early:\n{self.output}")
        self.stop()
        raise RuntimeError(f"{self.tool} did not start listening:\n{self.output}")

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and not self._listening.is_set() and "proxy" in line:
                self.port = int(m.group(2))
                self._listening.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)
        if self._reader:
            self._reader.join(5)

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real curl; output is text, stderr kept for diagnostics."""
    from tests.servers import client_env

    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True,
                          timeout=timeout, env=client_env())


def run_concurrently(clients: list[Callable[[], None]], timeout: float = 60) -> None:
    """Start every client in a thread of its own at once, and wait for them all."""
    threads = [threading.Thread(target=client) for client in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
