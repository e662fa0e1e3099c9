"""Side-by-side benchmark (issue 7): this addon against stock mitmdump, cntlm, Px and the parent.

One command sets up the same loopback stack for every contender and measures them in one run::

    python bench/compare.py --runs 3 --out bench/results/        # full (10 s cells, 1 GiB)
    python bench/compare.py --quick --out /tmp/bench              # ~2 s cells, 32 MiB files

Stack (all on 127.0.0.1, started here and stopped at the end): nginx as the origin (plain http
and TLS with a self-signed certificate; a small file, a sparse large file, and ``/upload`` that
reads and discards a PUT body), Squid demanding NTLM (``ntlm_fake_auth``, many helper children,
``keep_alive on``) and a second Squid without authentication.

Contenders: ``addon`` (mitmdump + addons/ntlm.py, upstream mode, intercepting), ``addon-pass``
(the same with ``--ignore-hosts``), ``addon-w2`` (``mitm-ntlm start --workers 2
--intercept all``: two mitmdumps on one port), ``mitmdump`` (stock, no addon, parent = the
no-auth Squid: the ceiling for any mitmproxy addon), ``cntlm`` (Debian), ``px`` (px-proxy
from PyPI in its own venv, non-Windows mode), ``curl-ntlm`` (curl speaking NTLM to the NTLM
Squid itself) and ``squid-direct`` (load generators straight at the no-auth Squid: the
physical limit).

Workloads: ``light`` / ``light-connect`` (one client, one request at a time: kept-alive http,
and a new https tunnel per request: the latency a person feels), ``keepalive`` (wrk,
absolute-form small GETs on kept-alive connections),
``newconn-http`` / ``newconn-connect`` (Python workers, one new client connection per request,
plain and https via CONNECT), ``c200`` (hey, 200 concurrent keep-alive clients), ``download`` /
``download-connect`` / ``upload`` / ``upload-connect`` (curl, one ``--size`` transfer), and only
on request ``close-http`` (hey ``-disable-keepalive``: every request says ``Connection: close``).

Numbers are machine-relative: read the ratios to the same run's cntlm and stock-mitmdump rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/compare.py` puts bench/, not the checkout, there
    sys.path.insert(0, str(ROOT))

from bench.soak import raise_fd_limit  # noqa: E402  (the soak test's own helper)
from mitmproxy_ntlm.testing import http1  # noqa: E402
from tests.servers import Squid, client_env, free_port  # noqa: E402

ADDON = ROOT / "addons" / "ntlm.py"
PX_VENV = ROOT / "bench" / ".venv-px"
LUA = ROOT / "bench" / "absolute.lua"
USER, DOMAIN, PASSWORD = "alice", "CORP", "Bench-Pass-1"  # ntlm_fake_auth accepts any password
SMALL_BODY = b"x" * 100
CONTENDERS = ("addon", "addon-pass", "addon-w2", "mitmdump", "cntlm", "px", "curl-ntlm",
              "squid-direct")
WORKLOADS = (
    "light",
    "light-connect",
    "keepalive",
    "newconn-http",
    "newconn-connect",
    "c200",
    "download",
    "download-connect",
    "upload",
    "upload-connect",
)
EXTRA_WORKLOADS = ("close-http",)  # only with --only: new connection + Connection: close (hey)
TRANSFERS = ("download", "download-connect", "upload", "upload-connect")
BASELINES = ("cntlm", "mitmdump")  # every figure is also shown as a ratio to these rows
CNTLM_DIALECTS = ("NTLM", "NT", "NTLM2SR")  # NTLMv2 refuses ntlm_fake_auth's Type 2 (no TargetInfo)
METRICS: tuple[tuple[str, str, str], ...] = (  # key, column title, format
    ("rps", "req/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("mbps", "MB/s", "{:.1f}"),
    ("rss_mb", "peak RSS MB", "{:.0f}"),
    ("cpu_s", "CPU s", "{:.2f}"),
    ("cpu_ms_req", "CPU ms/req", "{:.2f}"),
    ("hs_per_100", "handshakes/100 conn", "{:.1f}"),
    ("errors", "errors", "{:.0f}"),
)


@dataclasses.dataclass
class Config:
    """What to run: cell length, transfer size, repetitions, selection, extra addon options."""

    runs: int = 1
    duration: float = 10.0
    size: int = 1 << 30
    out: Path = ROOT / "bench" / "results"
    contenders: tuple[str, ...] = CONTENDERS
    workloads: tuple[str, ...] = WORKLOADS
    addon_sets: tuple[str, ...] = ()
    connections: int = 10  # keep-alive and new-connection workloads
    children: int = 32  # Squid NTLM helpers
    profile: bool = False
    profile_workloads: tuple[str, ...] = ("keepalive", "download")
    install_px: bool = True
    report: Path | None = None  # re-render an earlier compare.json instead of measuring
    transfer_limit: float = 180.0  # seconds a single transfer may take


@dataclasses.dataclass
class Cell:
    """One contender x workload x run measurement (None: not measured / not applicable)."""

    contender: str
    workload: str
    run: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    mbps: float | None = None
    rss_mb: float | None = None
    cpu_s: float | None = None
    cpu_ms_req: float | None = None  # the contender's CPU per request: its cost, load aside
    hs_per_100: float | None = None
    errors: float | None = None
    requests: int = 0
    client_conns: int = 0
    handshakes: int = 0
    skipped: str = ""  # why this cell has no numbers

    def get(self, key: str) -> float | None:
        """A figure by its METRICS key."""
        value = getattr(self, key)
        return None if value is None else float(value)


@dataclasses.dataclass
class Load:
    """What a load generator reported for one cell."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    mbps: float | None = None
    client_conns: int = 0


# --------------------------------------------------------------------------- processes


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until 127.0.0.1:port accepts; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def spawn(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C stays with us), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_usage(pid: int) -> tuple[int, float]:
    """(RSS kB, CPU seconds incl. reaped children) summed over the process tree of ``pid``."""
    rss, cpu = 0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(x) for x in stat[11:15]) / tick
    return rss, cpu


def stop_proc(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Stop a server we started (and its session), politely first."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class Sampler:
    """Polls a process tree's RSS every 0.1 s; reports peak RSS and CPU seconds of a window."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_kb = 0
        self.cpu0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._poll()

    def _poll(self) -> float:
        assert self.pid is not None
        rss, cpu = tree_usage(self.pid)
        self.peak_kb = max(self.peak_kb, rss)
        return cpu

    def __enter__(self) -> Sampler:
        if self.pid is not None:
            self.cpu0 = self._poll()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            self._stop.set()
            self._thread.join(5)

    def result(self) -> tuple[float | None, float | None]:
        """(peak RSS MB, CPU seconds since start), or Nones when nothing is sampled."""
        if self.pid is None:
            return None, None
        cpu = self._poll()
        return self.peak_kb / 1024, cpu - self.cpu0


# --------------------------------------------------------------------------- the stack


class Nginx:
    """nginx in one process as the origin: /small, /big (sparse, --size bytes), PUT /upload."""

    def __init__(self, workdir: Path, size: int) -> None:
        self.dir = workdir / "nginx"
        self.size = size
        self.port = 0
        self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._spill: Path | None = None

    def start(self) -> Nginx:
        """Write certificate, content and config; start nginx and wait for both ports."""
        d = self.dir
        (d / "www").mkdir(parents=True)
        (d / "www" / "small").write_bytes(SMALL_BODY)
        with open(d / "www" / "big", "wb") as f:
            f.truncate(self.size)  # sparse: reads as zeros, costs no disk
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for _attempt in range(3):
            self.port, self.tls_port = free_port(), free_port()
            (d / "nginx.conf").write_text(self._config())
            self.proc = spawn(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], d / "out.log")
            try:
                wait_port(self.port, 10, self.proc)
                wait_port(self.tls_port, 10, self.proc)
                return self
            except (RuntimeError, TimeoutError):
                stop_proc(self.proc)
        raise RuntimeError(f"nginx did not start: {tail(d / 'error.log')} {tail(d / 'out.log')}")

    def _config(self) -> str:
        """One process, no access log, big keep-alive limits; /upload reads and drops bodies.

        ``return 200`` alone answers before the body is read: Squid then resets the client's
        upload. ``proxy_pass`` with request buffering (to a local ``return``, without the body)
        makes nginx read the whole body first; the spill file lives in /dev/shm when possible.
        """
        d = self.dir
        return f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    keepalive_requests 10000000;
    keepalive_timeout 120;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        listen 127.0.0.1:{self.tls_port} ssl backlog=4096;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        root {d}/www;
        client_max_body_size 0;
        location = /upload {{
            client_body_temp_path {self.body_dir()};
            client_body_buffer_size 1m;
            proxy_pass http://127.0.0.1:{self.port}/uploaded;
            proxy_set_body "";
        }}
        location = /uploaded {{ return 200 "ok\\n"; }}
    }}
}}
"""

    def body_dir(self) -> Path:
        """Where nginx spills upload bodies: memory (/dev/shm) if there is one, else the dir."""
        if self._spill is None:
            shm = Path("/dev/shm")
            self._spill = (
                Path(tempfile.mkdtemp(prefix="bench-body-", dir=shm)) if shm.is_dir() else self.dir
            )
        return self._spill / "body"

    def stop(self) -> None:
        """Stop nginx."""
        stop_proc(self.proc, signal.SIGQUIT)
        self.proc = None
        if self._spill is not None and self._spill != self.dir:
            shutil.rmtree(self._spill, ignore_errors=True)
        self._spill = None

    def url(self, path: str, tls: bool = False) -> str:
        """Origin URL of ``path``, plain or https."""
        return f"https://127.0.0.1:{self.tls_port}{path}" if tls else (
            f"http://127.0.0.1:{self.port}{path}"
        )


@dataclasses.dataclass
class Stack:
    """The shared servers of one benchmark: origin and both parents."""

    workdir: Path
    nginx: Nginx
    squid_ntlm: Squid
    squid_open: Squid

    def handshakes(self) -> int:
        """NTLM handshakes the NTLM parent answered so far (its TCP_DENIED/407 lines)."""
        return sum("TCP_DENIED/407" in line for line in self.squid_ntlm.access_log())

    def heal(self, log: Callable[[str], None]) -> None:
        """Restart a server that died (on a shared machine someone may kill every squid)."""
        for squid in (self.squid_ntlm, self.squid_open):
            proc = squid._proc  # servers.Squid keeps its process private; only liveness is read
            if proc is None or proc.poll() is not None:
                log(f"squid {squid.url} ({squid.mode}) is gone: starting a new one")
                squid.stop()
                squid.start()
        if self.nginx.proc is None or self.nginx.proc.poll() is not None:
            log("nginx is gone: starting a new one")
            self.nginx.stop()
            shutil.rmtree(self.nginx.dir, ignore_errors=True)
            self.nginx.start()


@contextlib.contextmanager
def stack(cfg: Config) -> Iterator[Stack]:
    """Start origin and parents in a temp dir; stop everything and remove it at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    with contextlib.ExitStack() as es:
        es.callback(shutil.rmtree, workdir, ignore_errors=True)
        nginx = Nginx(workdir, cfg.size).start()
        es.callback(nginx.stop)
        extra = "read_ahead_gap 1 MB\nclient_request_buffer_max_size 1 MB"
        squid_ntlm = es.enter_context(Squid("ntlm_fake", children=cfg.children, extra_config=extra))
        squid_open = es.enter_context(Squid("none", extra_config=extra))
        yield Stack(workdir, nginx, squid_ntlm, squid_open)


# --------------------------------------------------------------------------- contenders


@dataclasses.dataclass
class Running:
    """A started contender: where clients point, which process to sample, how to stop it."""

    proxy: str  # http://127.0.0.1:PORT the load goes to
    pid: int | None  # process tree sampled for RSS/CPU (None: no process of its own)
    stop: Callable[[], None]
    curl_auth: tuple[str, ...] = ()  # extra curl args (curl-ntlm speaks NTLM itself)
    ntlm_client: bool = False  # the load generator must speak NTLM (only curl can)
    log: Path | None = None  # the contender's output, sampled to explain errors


def mitmdump_bin() -> str:
    """mitmdump next to this Python (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / "mitmdump"
    return str(candidate) if candidate.exists() else (shutil.which("mitmdump") or "mitmdump")


def start_mitmdump(
    st: Stack, cfg: Config, name: str, addon: bool, passthrough: bool, profile: Path | None,
    wrap: Sequence[str] = (), start_timeout: float = 60,
) -> Running:
    """mitmdump in upstream mode; with the addon against NTLM Squid, stock against open Squid.

    ``wrap`` runs its Python under another program (bench/instructions.py: valgrind)."""
    confdir = st.workdir / f"mitm-{name}"
    confdir.mkdir(exist_ok=True)
    parent = st.squid_ntlm.url if addon else st.squid_open.url
    port = free_port()
    cmd = [mitmdump_bin()]
    if profile is not None:
        cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), *cmd]
    elif wrap:
        cmd = [*wrap, sys.executable, *cmd]
    if addon:
        cmd += ["-s", str(ADDON)]
    cmd += ["--listen-host", "127.0.0.1", "-p", str(port), "--mode", f"upstream:{parent}"]
    sets = [
        f"confdir={confdir}",
        "termlog_verbosity=warn",
        "flow_detail=0",
        "ssl_insecure=true",  # the origin's certificate is self-signed
        "stream_large_bodies=1m",  # 1 GiB transfers must stream, as with any real use
    ]
    if addon:
        sets += [f"ntlm_username={USER}", f"ntlm_domain={DOMAIN}", "ntlm_password_env=BENCH_PW"]
        sets += list(cfg.addon_sets)
    for s in sets:
        cmd += ["--set", s]
    if passthrough:
        cmd += ["--ignore-hosts", ".*"]
    env = client_env()
    env["BENCH_PW"] = PASSWORD
    proc = spawn(cmd, st.workdir / f"{name}.log", env=env, cwd=st.workdir)
    try:
        wait_port(port, start_timeout, proc)
    except (RuntimeError, TimeoutError) as e:
        stop_proc(proc)
        raise RuntimeError(f"{name}: {e}: {tail(st.workdir / f'{name}.log')}") from e
    # SIGINT: mitmdump shuts down cleanly, so cProfile writes its file.
    stop = lambda: stop_proc(proc, signal.SIGINT)  # noqa: E731
    return Running(f"http://127.0.0.1:{port}", proc.pid, stop, log=st.workdir / f"{name}.log")


def start_workers(st: Stack, cfg: Config, name: str, workers: int) -> Running:
    """``mitm-ntlm start --workers N`` as a user runs it, intercepting like ``addon``: the
    supervisor's process tree (it and its mitmdumps) is sampled."""
    home = st.workdir / f"{name}-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mitm-ntlm"), "start", "--workers", str(workers),
           "--parent", st.squid_ntlm.url, "--user", USER, "--domain", DOMAIN,
           "--listen-host", "127.0.0.1", "--port", str(port), "--intercept", "all"]
    for s in (f"confdir={home / 'mitm'}", "termlog_verbosity=warn", "flow_detail=0",
              "ssl_insecure=true", "stream_large_bodies=1m", *cfg.addon_sets):
        cmd += ["--set", s]
    env = client_env(home=home)
    env["MITM_NTLM_PASSWORD"] = PASSWORD
    proc = spawn(cmd, st.workdir / f"{name}.log", env=env, cwd=home)
    try:
        wait_port(port, 60, proc)
    except (RuntimeError, TimeoutError) as e:
        stop_proc(proc)
        raise RuntimeError(f"{name}: {e}: {tail(st.workdir / f'{name}.log')}") from e
    time.sleep(2)  # every worker listening, not only the first
    return Running(f"http://127.0.0.1:{port}", proc.pid, lambda: stop_proc(proc),
                   log=st.workdir / f"{name}.log")


def start_cntlm(st: Stack, cfg: Config) -> Running:
    """Debian cntlm in the foreground; the first dialect that gets a 200 through Squid wins."""
    binary = shutil.which("cntlm") or "/usr/sbin/cntlm"
    if not Path(binary).exists():
        raise FileNotFoundError("cntlm not installed (apt-get install cntlm)")
    tried = []
    for dialect in CNTLM_DIALECTS:
        port = free_port()
        conf = st.workdir / "cntlm.conf"
        conf.write_text(
            f"Username {USER}\nDomain {DOMAIN}\nPassword {PASSWORD}\nAuth {dialect}\n"
            f"Proxy {st.squid_ntlm.url.removeprefix('http://')}\nListen 127.0.0.1:{port}\n"
        )
        conf.chmod(0o600)
        proc = spawn([binary, "-f", "-c", str(conf)], st.workdir / "cntlm.log")
        stop = lambda p=proc: stop_proc(p)  # noqa: E731
        running = Running(f"http://127.0.0.1:{port}", proc.pid, stop, log=st.workdir / "cntlm.log")
        try:
            wait_port(port, 10, proc)
            if probe(running, st.nginx.url("/small")):
                return running
        except (RuntimeError, TimeoutError) as e:
            tried.append(f"{dialect}: {e}")
        running.stop()
        tried.append(f"{dialect}: no 200")
    raise RuntimeError(f"cntlm got no 200 through Squid ({'; '.join(tried)})")


def ensure_px(install: bool) -> Path:
    """px-proxy in its own venv (bench/.venv-px), installed on first use: never a project dep."""
    px = PX_VENV / "bin" / "px"
    if px.exists():
        return px
    if not install:
        raise FileNotFoundError(f"{px} missing (run without --no-install-px to install it)")
    subprocess.run([sys.executable, "-m", "venv", str(PX_VENV)], check=True, timeout=120)
    r = subprocess.run(
        [str(PX_VENV / "bin" / "pip"), "install", "-q", "--retries", "1", "--timeout", "20",
         "px-proxy"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if r.returncode != 0 or not px.exists():
        shutil.rmtree(PX_VENV, ignore_errors=True)
        raise RuntimeError(f"pip install px-proxy failed: {r.stderr.strip()[-300:]}")
    return px


def start_px(st: Stack, cfg: Config) -> Running:
    """px-proxy without SSPI: user name on the command line, password in PX_PASSWORD."""
    px = ensure_px(cfg.install_px)
    home = st.workdir / "px-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    env = client_env(home=home)
    env["PX_PASSWORD"] = PASSWORD
    cmd = [
        str(px),
        f"--server={st.squid_ntlm.url.removeprefix('http://')}",
        "--listen=127.0.0.1",
        f"--port={port}",
        f"--username={DOMAIN}\\{USER}",
        "--auth=NTLM",
    ]
    proc = spawn(cmd, st.workdir / "px.log", env=env, cwd=home)
    running = Running(
        f"http://127.0.0.1:{port}", proc.pid, lambda: stop_proc(proc), log=st.workdir / "px.log"
    )
    try:
        wait_port(port, 60, proc)
        if not probe(running, st.nginx.url("/small")):
            raise RuntimeError("no 200 through px")
    except (RuntimeError, TimeoutError) as e:
        running.stop()
        raise RuntimeError(f"px: {e}: {tail(st.workdir / 'px.log')}") from e
    return running


def start_contender(st: Stack, cfg: Config, name: str, profile: Path | None) -> Running:
    """Start one contender; raises with the reason when it cannot run."""
    if name in ("addon", "addon-pass"):
        return start_mitmdump(st, cfg, name, True, name == "addon-pass", profile)
    if name == "addon-w2":
        return start_workers(st, cfg, name, 2)
    if name == "mitmdump":
        return start_mitmdump(st, cfg, name, False, False, None)
    if name == "cntlm":
        return start_cntlm(st, cfg)
    if name == "px":
        return start_px(st, cfg)
    if name == "curl-ntlm":
        auth = ("--proxy-ntlm", "--proxy-user", f"{DOMAIN}\\{USER}:{PASSWORD}")
        return Running(st.squid_ntlm.url, None, lambda: None, auth, ntlm_client=True)
    if name == "squid-direct":
        return Running(st.squid_open.url, None, lambda: None)
    raise ValueError(f"unknown contender {name}")


def probe(running: Running, url: str) -> bool:
    """One curl GET through the proxy: did it answer 200?"""
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10", "-x",
         running.proxy, *running.curl_auth, url],
        capture_output=True, text=True, env=client_env(),
    )  # fmt: skip
    return r.stdout.strip() == "200"


def tail(path: Path, n: int = 600, drop: re.Pattern[str] | None = None) -> str:
    """The end of a log file, for error messages; without the lines ``drop`` matches (e.g.
    PYTHONVERBOSE's, which would bury the error)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    if drop is not None:
        text = "\n".join(line for line in text.splitlines() if not drop.match(line))
    return text[-n:].strip()


# --------------------------------------------------------------------------- load generators


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    """'1.23ms' / '850.00us' / '1.02s' (wrk) -> milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(proxy: str, url: str, seconds: float, conns: int) -> Load:
    """wrk with a Lua script that writes absolute-form request lines (wrk has no proxy option)."""
    env = client_env()
    env["WRK_TARGET"] = url
    port = proxy.rsplit(":", 1)[1]
    r = subprocess.run(
        ["wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "--latency",
         "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, env=env, timeout=seconds + 60,
    )  # fmt: skip
    out = r.stdout
    load = Load(client_conns=conns)
    if m := re.search(r"(\d+) requests in ([\d.]+\w+)", out):
        load.requests, load.seconds = int(m.group(1)), _ms(m.group(2)) / 1000
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        load.rps = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        load.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        load.p99_ms = _ms(m.group(1))
    non2xx = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        non2xx = int(m.group(1))
        load.errors += non2xx
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        load.errors += sum(int(x) for x in m.groups())
        load.client_conns += int(m.group(2))  # wrk reconnects after each read error (close)
    if load.rps is None:
        raise RuntimeError(f"wrk failed: {(r.stderr or out).strip()[-300:]}")
    if load.requests:  # non-2xx are not successful requests (socket errors are not counted)
        load.rps *= max(0, load.requests - non2xx) / load.requests
    return load


def run_hey(proxy: str, url: str, seconds: float, conns: int, keepalive: bool) -> Load:
    """hey through the proxy (https URLs go through CONNECT; hey skips certificate checks)."""
    cmd = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(conns), "-cpus", "1", "-t", "20",
           "-x", proxy]  # fmt: skip
    if not keepalive:
        cmd.append("-disable-keepalive")
    r = subprocess.run(
        [*cmd, url], capture_output=True, text=True, env=client_env(), timeout=seconds + 90
    )
    out = r.stdout
    load = Load()
    if m := re.search(r"Total:\s+([\d.]+) secs", out):
        load.seconds = float(m.group(1))
    ok = sum(int(n) for n in re.findall(r"\[200\]\s+(\d+) responses", out))
    codes = re.findall(r"\[(\d+)\]\s+(\d+) responses", out)
    bad = sum(int(n) for code, n in codes if code != "200")
    errs = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", out)
    if errs:
        bad += sum(int(n) for n in re.findall(r"\[(\d+)\]", errs.group(1)))
    load.requests, load.errors = ok, bad
    if load.seconds:
        load.rps = ok / load.seconds
    if m := re.search(r"50%+ in ([\d.]+) secs", out):
        load.p50_ms = float(m.group(1)) * 1000
    if (m := re.search(r"99%+ in ([\d.]+) secs", out)) and float(m.group(1)) > 0:
        load.p99_ms = float(m.group(1)) * 1000
    elif m := re.search(r"Slowest:\s+([\d.]+) secs", out):  # hey skips p99 under 100 samples
        load.p99_ms = float(m.group(1)) * 1000
    load.client_conns = conns if keepalive else ok + bad
    if not load.seconds:
        raise RuntimeError(f"hey failed: {(r.stderr or out).strip()[-300:]}")
    return load


async def _one_request(proxy: tuple[str, int], url: str, ctx: ssl.SSLContext) -> int:
    """One new connection to the proxy, one GET (through CONNECT for https), then close.

    No ``Connection: close`` is sent: with it Squid drops NTLM from its 407 (the connection
    cannot carry a handshake), which tests something else (the ``close-http`` workload).
    """
    parts = urlsplit(url)
    authority = parts.netloc
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        if parts.scheme == "https":
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            status, _ = await _read_head(reader)
            if status != 200:
                return status
            await writer.start_tls(ctx, server_hostname=parts.hostname)
            target = parts.path
        else:
            target = url
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, length = await _read_head(reader)
        await reader.readexactly(length)
        return status
    finally:
        writer.transport.abort()  # a TLS close_notify exchange would add hundreds of ms


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Status code and Content-Length (else 0) of the response head on ``reader``."""
    response = await http1.read_response(reader)
    if response is None:
        raise ConnectionResetError("the proxy closed the connection")
    size = http1.body_size(response)
    return response.status_code, size if size and size > 0 else 0


def run_newconn(proxy: str, url: str, seconds: float, conns: int) -> Load:
    """``conns`` workers, each opening one new connection per request until time is up.

    A Python client because hey's ``-disable-keepalive`` sends ``Connection: close``.
    """
    host, port = urlsplit(proxy).hostname or "127.0.0.1", urlsplit(proxy).port or 80
    lat: list[float] = []
    load = Load()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # once: loading CAs per request costs 50 ms
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def worker(deadline: float) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                status = await asyncio.wait_for(_one_request((host, port), url, ctx), 20)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ssl.SSLError, ValueError, IndexError):  # fmt: skip
                status = 0
            load.client_conns += 1
            if status == 200:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                load.errors += 1
                await asyncio.sleep(0.01)

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(conns)))

    t0 = time.monotonic()
    asyncio.run(main())
    load.seconds = time.monotonic() - t0
    load.requests = len(lat)
    load.rps = len(lat) / load.seconds
    load.p50_ms, load.p99_ms = percentiles(lat)
    return load


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    """Nearest-rank p50 and p99 (None without values)."""
    if not values:
        return None, None
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def run_curl_loop(
    running: Running, url: str, seconds: float, conns: int, keepalive: bool
) -> Load:
    """``conns`` curl processes each fetching ``url`` again and again until time is up.

    curl speaks NTLM itself, so this is how the NTLM parent is loaded without a middleman.
    Each process keeps its connection (one handshake) unless ``keepalive`` is off, then it
    asks for ``Connection: close`` and every request is a new connection and handshake.
    """
    cfgfile = Path(tempfile.mkstemp(prefix="curl-urls-", suffix=".cfg")[1])
    per = max(50, int(seconds * 4000))
    cfgfile.write_text(f'url = "{url}"\noutput = "/dev/null"\n' * per)
    cmd = ["curl", "-s", "-k", "-x", running.proxy, *running.curl_auth, "-K", str(cfgfile),
           "-w", "%{stderr}%{http_code} %{time_total} %{num_connects}\n"]  # fmt: skip
    if not keepalive:
        cmd += ["-H", "Connection: close"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=client_env(), start_new_session=True)
        for _ in range(conns)
    ]  # fmt: skip
    outputs: list[str] = [""] * conns

    def reader(i: int, p: subprocess.Popen[str]) -> None:
        assert p.stderr is not None
        outputs[i] = p.stderr.read()

    threads = [threading.Thread(target=reader, args=(i, p)) for i, p in enumerate(procs)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(10)
    for p in procs:
        p.wait(5)
    cfgfile.unlink()
    lat, load = [], Load(seconds=elapsed)
    for text in outputs:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            if parts[0] == "200":
                lat.append(float(parts[1]) * 1000)
            else:
                load.errors += 1
            load.client_conns += int(parts[2])
    load.client_conns = max(load.client_conns, conns)
    load.requests = len(lat)
    load.rps = len(lat) / elapsed
    load.p50_ms, load.p99_ms = percentiles(lat)
    return load


def run_transfer(running: Running, st: Stack, workload: str, size: int, limit: float) -> Load:
    """One curl download of /big or PUT upload to /upload of ``size`` bytes, at most ``limit`` s.

    MB/s is bytes moved / curl's total time, also for a transfer that failed or hit the limit
    (then it is counted as an error too): a proxy that needs ten minutes still gets a number.
    """
    tls = workload.endswith("connect")
    cmd = ["curl", "-sS", "-k", "-x", running.proxy, *running.curl_auth, "-o", "/dev/null",
           "--max-time", f"{limit:g}"]  # fmt: skip
    if tls:
        cmd.append("--proxytunnel")  # plain http through CONNECT too, as a passthrough would see
    if workload.startswith("upload"):
        # No "Expect: 100-continue": curl would wait up to 1 s for a 100 (a constant, not
        # throughput), and cntlm relays the 100 late and then drops the connection.
        cmd += ["-H", "Expect:", "-T", str(st.nginx.dir / "www" / "big"),
                "-w", "%{http_code} %{time_total} %{size_upload}", st.nginx.url("/upload", tls=tls)]
    else:
        cmd += ["-w", "%{http_code} %{time_total} %{size_download}", st.nginx.url("/big", tls=tls)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=client_env(), timeout=limit + 60)
    elapsed = time.monotonic() - t0
    parts = r.stdout.split()
    load = Load(seconds=elapsed, client_conns=1)
    # curl's own speed_upload is unreliable (early 100/200 answers); bytes / total time is not.
    # The upload's size counts every 407 leg's resend too, so it must be at least ``size``.
    if len(parts) != 3:
        raise RuntimeError(f"curl: {r.stderr.strip()[-200:]}")
    seconds, moved = float(parts[1]), min(int(parts[2]), size)
    load.mbps = moved / max(seconds, 1e-9) / 1e6
    load.p50_ms = load.p99_ms = seconds * 1000
    if parts[0] == "200" and int(parts[2]) >= size:
        load.requests = 1
    else:
        load.errors = 1
    return load


class NotApplicable(Exception):
    """This workload cannot run against this contender (the reason is the message)."""


def run_workload(running: Running, st: Stack, cfg: Config, workload: str) -> Load:
    """Dispatch one workload to the right load generator for this contender."""
    small, small_tls = st.nginx.url("/small"), st.nginx.url("/small", tls=True)
    d, c = cfg.duration, cfg.connections
    if workload in TRANSFERS:
        return run_transfer(running, st, workload, cfg.size, cfg.transfer_limit)
    if running.ntlm_client:  # only curl speaks NTLM to the parent itself
        if workload in ("newconn-http", "close-http"):
            raise NotApplicable(
                "curl opens a new connection per request only with Connection: close, "
                "and then Squid leaves NTLM out of its 407"
            )
        url = small_tls if workload in ("newconn-connect", "light-connect") else small
        conns = {"c200": 200, "light": 1, "light-connect": 1}.get(workload, c)
        return run_curl_loop(running, url, d, conns,
                             keepalive=not workload.startswith(("newconn", "light-connect")))
    if workload == "light":  # one client, one request at a time: the latency a person feels
        return run_wrk(running.proxy, small, d, 1)
    if workload == "light-connect":  # one client, a new https tunnel per request
        return run_newconn(running.proxy, small_tls, d, 1)
    if workload == "keepalive":
        return run_wrk(running.proxy, small, d, c)
    if workload == "newconn-http":
        return run_newconn(running.proxy, small, d, c)
    if workload == "newconn-connect":
        return run_newconn(running.proxy, small_tls, d, c)
    if workload == "close-http":
        return run_hey(running.proxy, small, d, c, keepalive=False)
    if workload == "c200":
        return run_hey(running.proxy, small, d, 200, keepalive=True)
    raise ValueError(f"unknown workload {workload}")


# --------------------------------------------------------------------------- the run


def measure(running: Running, st: Stack, cfg: Config, name: str, workload: str, run: int) -> Cell:
    """One cell: load, sampled contender, handshakes counted at the parent."""
    hs0 = st.handshakes()
    with Sampler(running.pid) as sampler:
        try:
            load = run_workload(running, st, cfg, workload)
        except NotApplicable as e:
            return Cell(name, workload, run, skipped=str(e))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # one cell, not the run
            return Cell(name, workload, run, skipped=f"failed: {e}"[:300])
        rss_mb, cpu_s = sampler.result()
    time.sleep(0.3)  # squid writes a log line when a transaction ends
    hs = st.handshakes() - hs0
    cell = Cell(name, workload, run, rps=load.rps, p50_ms=load.p50_ms, p99_ms=load.p99_ms,
                rss_mb=rss_mb, cpu_s=cpu_s, errors=load.errors, requests=load.requests,
                client_conns=load.client_conns, handshakes=hs)  # fmt: skip
    if workload in TRANSFERS:  # MB/s for transfers, req/s for the rest (100-byte bodies)
        cell.rps = None
        cell.mbps = load.mbps
    if load.client_conns:
        cell.hs_per_100 = 100 * hs / load.client_conns
    if cpu_s is not None and load.requests and workload not in TRANSFERS:
        cell.cpu_ms_req = 1000 * cpu_s / load.requests
    return cell


def run_all(
    cfg: Config, log: Callable[[str], None]
) -> tuple[list[Cell], dict[str, str], dict[str, str]]:
    """Every run x contender x workload; contenders restart each run.

    Returns the cells, the contenders that could not start (with the reason), and for those
    with failed requests the last line of their log.
    """
    cells: list[Cell] = []
    skipped: dict[str, str] = {}
    samples: dict[str, str] = {}
    with stack(cfg) as st:
        log(f"stack: nginx :{st.nginx.port}/:{st.nginx.tls_port}, squid ntlm "
            f"{st.squid_ntlm.url} ({cfg.children} helpers), squid open {st.squid_open.url}")
        for run in range(cfg.runs):
            for name in cfg.contenders:
                if name in skipped:
                    continue
                st.heal(log)
                try:
                    running = start_contender(st, cfg, name, None)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    skipped[name] = str(e).replace("\n", " ")[:300]
                    log(f"{name}: SKIPPED: {skipped[name]}")
                    continue
                errors = 0.0
                try:
                    for workload in cfg.workloads:
                        cell = measure(running, st, cfg, name, workload, run)
                        cells.append(cell)
                        errors += cell.errors or 0
                        log(f"run {run + 1} {name:<13} {workload:<17} " + brief(cell))
                finally:
                    running.stop()
                if errors and running.log is not None and name not in samples:
                    lines = tail(running.log, 20000).splitlines()
                    hits = [x for x in lines if re.search(r"error|fail|refus|denied", x, re.I)]
                    samples[name] = hits[-1][-240:] if hits else ""
        if cfg.profile and "addon" not in skipped:
            profile_addon(st, cfg, log)
    return cells, skipped, samples


def profile_addon(st: Stack, cfg: Config, log: Callable[[str], None]) -> None:
    """An extra, uncounted addon pass under cProfile (keep-alive GETs and a download)."""
    running = start_contender(st, cfg, "addon", cfg.out / "addon.prof")
    try:
        for workload in cfg.profile_workloads:
            cell = measure(running, st, cfg, "addon", workload, -1)
            log(f"profile addon {workload:<17} " + brief(cell))
    finally:
        running.stop()
    write_profile(cfg.out / "addon.prof", cfg.out / "addon-profile.txt")
    log(f"profile: {cfg.out / 'addon-profile.txt'}")


def brief(cell: Cell) -> str:
    """One log line per cell while the benchmark runs."""
    if cell.skipped:
        return f"n/a: {cell.skipped}"
    parts = []
    for key, title, fmt in METRICS:
        value = cell.get(key)
        if value is not None:
            parts.append(f"{title} " + fmt.format(value))
    return ", ".join(parts)


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Summary:
    """Median, min and max over runs, plus median ratios to each baseline of the same run."""

    median: float | None
    low: float | None
    high: float | None
    ratios: dict[str, float | None]


def summarize(cells: list[Cell]) -> dict[tuple[str, str], dict[str, Summary]]:
    """(contender, workload) -> metric -> Summary; ratios are per run, then the median."""
    by: dict[tuple[str, str, int], Cell] = {(c.contender, c.workload, c.run): c for c in cells}
    out: dict[tuple[str, str], dict[str, Summary]] = {}
    keys = sorted({(c.contender, c.workload) for c in cells}, key=_order)
    for name, workload in keys:
        mine = [c for c in cells if (c.contender, c.workload) == (name, workload)]
        figures: dict[str, Summary] = {}
        for key, _title, _fmt in METRICS:
            values = [v for c in mine if (v := c.get(key)) is not None]
            ratios: dict[str, float | None] = {}
            for base in BASELINES:
                rs = []
                for c in mine:
                    b = by.get((base, workload, c.run))
                    v, bv = c.get(key), (b.get(key) if b else None)
                    if v is not None and bv:
                        rs.append(v / bv)
                ratios[base] = statistics.median(rs) if rs else None
            figures[key] = Summary(
                statistics.median(values) if values else None,
                min(values, default=None),
                max(values, default=None),
                ratios,
            )
        out[(name, workload)] = figures
    return out


def _order(key: tuple[str, str]) -> tuple[int, int]:
    name, workload = key
    return (WORKLOADS + EXTRA_WORKLOADS).index(workload), CONTENDERS.index(name)


def fmt_figure(s: Summary, fmt: str, runs: int) -> str:
    """``median (min-max) xcntlm/xstock`` with dashes where there is nothing to show."""
    if s.median is None:
        return "-"
    text = fmt.format(s.median)
    if runs > 1 and s.low is not None and s.high is not None:
        text += f" ({fmt.format(s.low)}-{fmt.format(s.high)})"
    r = [f"{x:.2f}" if x is not None else "-" for x in (s.ratios.get(b) for b in BASELINES)]
    return f"{text} x{r[0]}/{r[1]}"


def markdown(cells: list[Cell], skipped: dict[str, str], cfg: Config, meta: dict[str, Any]) -> str:
    """The one table, with a legend, skip reasons and automatic notes."""
    summ = summarize(cells)
    runs = len({c.run for c in cells}) or 1
    head = ["workload", "contender", *(title for _k, title, _f in METRICS)]
    lines = [
        f"Benchmark: {meta['date']}, {meta['host']}, {runs} run(s), {cfg.duration:g} s per "
        f"cell, transfers {cfg.size / 2**20:g} MiB, mitmproxy {meta['mitmproxy']}, "
        f"addon sets: {' '.join(cfg.addon_sets) or '(none)'}",
        "",
        "Each figure: median over runs (min-max) xa/xb = median ratio to the same run's "
        "**cntlm** / **stock mitmdump** row of that workload (for latency, RSS, CPU, "
        "handshakes and errors lower is better).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    na = {(c.contender, c.workload): c.skipped for c in cells if c.skipped}
    for (name, workload), figures in summ.items():
        if (name, workload) in na and all(v.median is None for v in figures.values()):
            row = [workload, name, f"n/a: {na[name, workload]}"] + [""] * (len(METRICS) - 1)
        else:
            row = [workload, name] + [fmt_figure(figures[k], f, runs) for k, _t, f in METRICS]
        lines.append("| " + " | ".join(row) + " |")
    for name, reason in skipped.items():
        lines.append(f"| (all) | {name} | skipped: {reason} |" + " |" * (len(METRICS) - 1))
    lines += ["", *notes(summ, skipped), *error_notes(cells, meta.get("errors", {}))]
    return "\n".join(lines) + "\n"


def notes(summ: dict[tuple[str, str], dict[str, Summary]], skipped: dict[str, str]) -> list[str]:
    """Where stock mitmproxy (the ceiling of any addon) is already below Px/CNTLM, and more."""
    out = ["Notes:"]
    for workload in WORKLOADS + EXTRA_WORKLOADS:
        stock = summ.get(("mitmdump", workload))
        key = "mbps" if workload in TRANSFERS else "rps"
        if stock is None or stock[key].median is None:
            continue
        unit = "MB/s" if key == "mbps" else "req/s"
        above = [
            f"{rival} {other[key].median:.0f}"
            for rival in ("px", "cntlm")
            if (other := summ.get((rival, workload)))
            and other[key].median
            and stock[key].median < other[key].median
        ]
        if above:
            out.append(
                f"- {workload}: stock mitmdump ({stock[key].median:.0f} {unit}) is below "
                f"{' and '.join(above)} {unit}: no mitmproxy addon can reach them there, the gap "
                "is mitmproxy's own cost."
            )
    out += [
        "- squid-direct: load generators straight at the no-auth Squid (the physical limit); "
        "curl-ntlm: curl speaks NTLM to the NTLM Squid itself (one curl process per connection). "
        "Their RSS/CPU columns are empty: there is no contender process.",
        "- handshakes/100 conn: TCP_DENIED/407 answers of the NTLM Squid per 100 client "
        "connections opened (keep-alive workloads: the connections the load generator keeps; "
        "new-connection workloads: one per request).",
    ]
    out += [f"- {name} skipped: {reason}" for name, reason in skipped.items()]
    return out


def error_notes(cells: list[Cell], samples: dict[str, str]) -> list[str]:
    """Cells with failed requests, with a sample of the contender's log, so a 0 is explained."""
    out = []
    failed = [c for c in cells if c.errors]
    for c in failed:
        sample = samples.get(c.contender, "")
        out.append(
            f"- errors: {c.contender} / {c.workload} (run {c.run + 1}): {c.errors:.0f} errors "
            f"(failed requests, or wrk socket errors such as closed connections), "
            f"{c.requests} answered" + (f"; its log: {sample}" if sample else "")
        )
    return out


def plot(cells: list[Cell], path: Path) -> None:
    """Bars per workload (req/s or MB/s), median with min-max whiskers; PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(cells)
    workloads = [w for w in WORKLOADS + EXTRA_WORKLOADS if any(k[1] == w for k in summ)]
    if not workloads:
        return
    cols = min(4, len(workloads))
    rows = (len(workloads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, workload in zip(axes.flat, workloads, strict=False):
        key = "mbps" if workload in TRANSFERS else "rps"
        names = [n for n in CONTENDERS if (n, workload) in summ]
        med = [summ[(n, workload)][key].median or 0 for n in names]
        lo = [m - (summ[(n, workload)][key].low or 0) for n, m in zip(names, med, strict=True)]
        hi = [(summ[(n, workload)][key].high or 0) - m for n, m in zip(names, med, strict=True)]
        colors = ["C0" if n.startswith("addon") else "C7" for n in names]
        ax.bar(names, med, yerr=[lo, hi], color=colors, capsize=3)
        ax.set_title(workload)
        ax.set_ylabel("MB/s" if key == "mbps" else "requests/s")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(prof: Path, out: Path, top: int = 30) -> None:
    """Top functions of the profiled addon run, by own time and by cumulative time."""
    import io
    import pstats

    if not prof.exists():
        out.write_text("no profile written (mitmdump did not exit cleanly)\n")
        return
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    groups: dict[str, float] = {}
    for (filename, _line, func), row in stats.stats.items():  # type: ignore[attr-defined]
        if "mitmproxy_ntlm" in filename or filename.endswith("ntlm.py"):
            group = "this addon (mitmproxy_ntlm)"
        elif "spnego" in filename:
            group = "pyspnego"
        elif f"{os.sep}mitmproxy{os.sep}" in filename:
            group = "mitmproxy"
        elif "epoll" in func or "select" in func:
            group = "waiting in epoll"
        elif "socket" in func:
            group = "socket send/recv"
        else:
            group = "stdlib, imports, other"
        groups[group] = groups.get(group, 0.0) + row[2]
    total = sum(groups.values()) or 1.0
    buf.write("Own time by component (main thread, startup included):\n")
    for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        buf.write(f"  {group:<30}{t:8.2f} s {100 * t / total:5.1f}%\n")
    buf.write("\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    out.write_text(buf.getvalue())


def meta_info() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    try:
        from mitmproxy.version import VERSION as mitm_version
    except ImportError:
        mitm_version = "?"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        "mitmproxy": mitm_version,
    }


def parse_size(text: str) -> int:
    """'1G', '64M', '512k' or plain bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)i?[bB]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def parse_args(argv: list[str] | None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="repetitions (median and min-max)")
    p.add_argument("--duration", type=float, help="seconds per cell (default 10, quick 2)")
    p.add_argument("--size", type=parse_size, help="transfer size (default 1G, quick 32M)")
    p.add_argument("--quick", action="store_true", help="short cells and small transfers")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="comma list of contenders and/or workloads to run (repeatable), e.g. addon,keepalive",
    )
    p.add_argument(
        "--addon-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra --set for the addon contenders (repeatable), e.g. ntlm_pool=true",
    )
    p.add_argument(
        "--transfer-limit", type=float, help="max seconds per transfer (default 180, quick 30)"
    )
    p.add_argument("--connections", type=int, default=10, help="client connections (default 10)")
    p.add_argument("--squid-children", type=int, default=32, help="NTLM helpers (default 32)")
    p.add_argument("--profile", action="store_true", help="then an extra cProfile'd addon pass")
    default_profiled = ",".join(Config.profile_workloads)
    p.add_argument("--profile-workloads", default=default_profiled,
                   help=f"what the profiled pass runs (default {default_profiled})")
    p.add_argument("--no-install-px", action="store_true", help="skip px unless installed")
    p.add_argument(
        "--report",
        type=Path,
        metavar="COMPARE_JSON",
        help="measure nothing: redo table and plot from an earlier compare.json into --out",
    )
    a = p.parse_args(argv)
    only = [x.strip() for item in a.only for x in item.split(",") if x.strip()]
    all_workloads = WORKLOADS + EXTRA_WORKLOADS
    unknown = [x for x in only if x not in CONTENDERS and x not in all_workloads]
    if unknown:
        p.error(f"--only: unknown {unknown}; contenders {CONTENDERS}, workloads {all_workloads}")
    if a.runs < 1:
        p.error("--runs must be positive")
    for s in a.addon_set:
        if "=" not in s:
            p.error(f"--addon-set {s!r}: expected OPTION=VALUE")
    return Config(
        runs=a.runs,
        duration=a.duration if a.duration is not None else (2.0 if a.quick else 10.0),
        size=a.size if a.size is not None else (32 << 20 if a.quick else 1 << 30),
        out=a.out,
        contenders=tuple(n for n in CONTENDERS if n in only) or CONTENDERS,
        workloads=tuple(w for w in all_workloads if w in only) or WORKLOADS,
        addon_sets=tuple(a.addon_set),
        connections=a.connections,
        children=a.squid_children,
        profile=a.profile,
        profile_workloads=tuple(w for w in a.profile_workloads.split(",") if w),
        install_px=not a.no_install_px,
        report=a.report,
        transfer_limit=a.transfer_limit or (30.0 if a.quick else 180.0),
    )


def report_again(cfg: Config) -> int:
    """Table and plot from an earlier run's raw numbers (e.g. after changing the report)."""
    raw = json.loads(cfg.report.read_text()) if cfg.report else {}
    names = {f.name for f in dataclasses.fields(Cell)}
    cells = [Cell(**{k: v for k, v in c.items() if k in names}) for c in raw["cells"]]
    for c in cells:  # older files gave small-GET workloads a (meaningless) MB/s
        if c.workload not in TRANSFERS:
            c.mbps = None
    old = raw.get("config", {})
    cfg.duration, cfg.size = old.get("duration", cfg.duration), old.get("size", cfg.size)
    cfg.addon_sets = tuple(old.get("addon_sets", ()))
    cfg.out.mkdir(parents=True, exist_ok=True)
    table = markdown(cells, raw.get("skipped", {}), cfg, raw["meta"])
    (cfg.out / "compare.md").write_text(table)
    plot(cells, cfg.out / "compare.png")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write compare.md / compare.json / compare.png into --out."""
    cfg = parse_args(argv)
    if cfg.report is not None:
        return report_again(cfg)
    tools = ("nginx", "squid", "curl", "wrk", "hey", "openssl")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    cfg.out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    meta = meta_info()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        cells, skipped, samples = run_all(cfg, log)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    meta["errors"] = samples
    table = markdown(cells, skipped, cfg, meta)
    (cfg.out / "compare.md").write_text(table)
    raw = {
        "meta": meta,
        "config": {k: (str(v) if isinstance(v, Path) else v)
                   for k, v in dataclasses.asdict(cfg).items()},
        "skipped": skipped,
        "cells": [dataclasses.asdict(c) for c in cells],
    }  # fmt: skip
    (cfg.out / "compare.json").write_text(json.dumps(raw, indent=1))
    plot(cells, cfg.out / "compare.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
