"""`mitm-ntlm start --workers N`: N mitmdump processes on one port, watched by this one.

mitmdump proxies on one thread. The workers all listen on the port with SO_REUSEPORT
(`ntlm_shared_port`) and the kernel gives each new client connection to one of them; they
share the lockout guard's counts through one file (`ntlm_lockout_file`), so N workers send no
more failed logons per account than one. Each keeps its own pool of authenticated parent
connections (a user gets a logon per worker that serves them).

The supervisor (`python -m mitmproxy_ntlm.workers N -- COMMAND...`, which `start` execs into:
only the standard library, so it stays a few MB) passes SIGTERM, SIGINT and SIGHUP on to
every worker, starts a worker again
when it dies (at most once per `RESTART_SECONDS`, so a worker that cannot start does not
spin), and ends when the workers end: with the first failure's exit code when a worker
fails right at start-up (a bad option fails them all alike), after stopping the others.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCKOUT_FILE = "mitm-ntlm-lockout.sqlite"
"""The workers' shared lockout counts, in mitmproxy's confdir (unless the user names one)."""
SQLITE_SIDE = ("-wal", "-shm")
RESTART_SECONDS = 5.0
"""A worker that ended sooner than this after its start is not started again."""
POLL_SECONDS = 0.5


def worker_settings(args: argparse.Namespace, file_options: dict[str, Any],
                    confdir: str, user_sets: Callable[..., bool]) -> list[str]:
    """The `--set` values that make mitmdumps workers of one port. The lockout file, unless
    the user names one (a --set or the config file), goes next to mitmproxy's CA and starts
    empty: restarting lifts a block, as for a single mitmdump. (Workers that start again
    after a crash keep it: the others' counts stay.)"""
    settings = ["ntlm_shared_port=true"]
    if not user_sets(args, "ntlm_lockout_file") and not file_options.get("ntlm_lockout_file"):
        folder = Path(confdir).expanduser()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # mitmproxy makes it later
        lockout = folder / LOCKOUT_FILE
        for leftover in (lockout, *(lockout.with_name(lockout.name + s) for s in SQLITE_SIDE)):
            leftover.unlink(missing_ok=True)  # a restart lifts blocks, as with one process
        settings.append(f"ntlm_lockout_file={lockout}")
    return settings


def create_ca(confdir: str) -> None:
    """mitmproxy's CA, made once before the workers start: each worker would otherwise make
    it at the same moment and one would read the other's half-written file."""
    from mitmproxy import certs

    folder = Path(confdir).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (folder / "mitmproxy-ca.pem").exists():
        certs.CertStore.create_store(folder, "mitmproxy", 2048)  # mitmproxy's key_size default


class Workers:
    """The running workers: started, signalled, restarted and waited for together."""

    def __init__(self, cmd: list[str], env: dict[str, str], count: int,
                 out: Any = sys.stderr) -> None:
        self.cmd, self.env, self.count, self.out = cmd, env, count, out
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started: list[float] = []
        self.stopping = False

    def start(self) -> None:
        for _ in range(self.count):
            self.procs.append(subprocess.Popen(self.cmd, env=self.env))
            self.started.append(time.monotonic())
        pids = ", ".join(str(p.pid) for p in self.procs)
        print(f"mitm-ntlm: {self.count} workers share the port (pids {pids})", file=self.out,
              flush=True)

    def signal_all(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> int:
        """Until every worker has ended; their first non-zero exit code, else 0."""
        failure = 0
        while True:
            running = 0
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None:
                    running += 1
                    continue
                if self.stopping:
                    failure = failure or code
                    continue
                if time.monotonic() - self.started[i] < RESTART_SECONDS:
                    print(f"mitm-ntlm: worker {proc.pid} ended at start-up (exit {code}): "
                          f"stopping the others", file=self.out, flush=True)
                    self.signal_all(signal.SIGTERM)
                    failure = code or 1
                    continue
                print(f"mitm-ntlm: worker {proc.pid} ended (exit {code}): starting another",
                      file=self.out, flush=True)
                self.procs[i] = subprocess.Popen(self.cmd, env=self.env)
                self.started[i] = time.monotonic()
                running += 1
            if running == 0:
                return failure
            time.sleep(POLL_SECONDS)


def run_workers(cmd: list[str], env: dict[str, str], count: int, demo: Any) -> int:
    workers = Workers(cmd, env, count)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, _frame: workers.signal_all(s))
    workers.start()
    try:
        while True:
            try:
                return workers.wait()
            except KeyboardInterrupt:
                workers.signal_all(signal.SIGTERM)
    finally:
        if demo is not None:
            demo.stop()


def worker_command(mitmdump_cmd: list[str]) -> list[str]:
    """A worker's command line: mitmdump's arguments, run by `run_worker`."""
    return [sys.executable, "-m", "mitmproxy_ntlm.workers", "worker", *mitmdump_cmd[1:]]


def run_worker(args: list[str]) -> int:
    """mitmdump whose listeners have SO_REUSEPORT before it binds them (the addon's
    `ntlm_shared_port` keeps them so once its script is loaded)."""
    from mitmproxy.tools.main import mitmdump

    from . import mitmproxy_internals

    try:
        mitmproxy_internals.share_listeners()
    except mitmproxy_internals.UnsupportedMitmproxy as e:
        print(f"mitm-ntlm: {e}", file=sys.stderr)
        return 1
    return mitmdump(args) or 0


def main(argv: list[str]) -> int:
    """`python -m mitmproxy_ntlm.workers N -- COMMAND...` (the supervisor; the environment is
    passed on) or `... workers worker MITMDUMP-ARGS...` (one worker)."""
    if argv[:1] == ["worker"]:
        return run_worker(argv[1:])
    count, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: python -m mitmproxy_ntlm.workers N -- COMMAND...", file=sys.stderr)
        return 2
    return run_workers(cmd, dict(os.environ), int(count), None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
