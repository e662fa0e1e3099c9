"""Load/soak test: many concurrent httpx clients through mitmdump + the addon into an NTLM parent.

Everything runs on 127.0.0.1 and is stopped at the end (also on Ctrl-C or errors)::

    python bench/soak.py [--clients 200] [--seconds 60] [--parent squid|pyspnego] [--users 1|2]

Starts a plain and a TLS origin (tests/servers.py), a parent (Squid with ``ntlm_fake_auth`` or
the password-checking ``ParentProxy``) and mitmdump with the addon in upstream mode. Each client
is its own ``httpx.AsyncClient`` that mixes plain GETs, HTTPS GETs through CONNECT and POSTs
checked by sha256, and reconnects now and then. mitmdump's RSS and open fds are sampled every
second. With two users, every request the parent saw must have arrived as the user tagged in
its URL (``?who=``; CONNECTs are tagged by host name). Exit code 1 when a request failed,
isolation was violated, RSS grew more than 20% in the second half, or fds did not come back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/soak.py` puts bench/, not the checkout, there
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from mitmproxy_ntlm.testing.parent import ParentProxy  # noqa: E402
from tests.mitm import Mitmdump  # noqa: E402
from tests.servers import Origin, Squid, free_port, pattern_bytes, wait_port  # noqa: E402

DOMAIN = "CORP"
USERS: dict[str, str] = {"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"}
# CONNECT targets carry no query, so each user reaches the TLS origin under its own host name
# (the origin's certificate covers both): the parent's CONNECT record then names the user.
TLS_HOST: dict[str, str] = {"CORP\\alice": "localhost", "CORP\\bob": "127.0.0.1"}
KINDS = ("http", "https", "post", "post-tls")
KIND_WEIGHTS = (45, 45, 5, 5)
RSS_GROWTH_LIMIT = 0.20
FD_SLACK = 20


@dataclasses.dataclass
class SoakConfig:
    """What to run: load shape, parent and users."""

    clients: int = 200
    seconds: float = 60.0
    parent: str = "squid"  # "squid" | "pyspnego"
    users: int = 1
    squid_children: int = 20
    timeout: float = 30.0
    reconnect_after: tuple[int, int] = (10, 40)  # requests on one AsyncClient before a new one
    max_requests_per_client: int = 100_000
    ramp_up: float = 1.0  # clients start spread over this many seconds
    seed: int = 1


class Sample(NamedTuple):
    """One reading of mitmdump's /proc entries."""

    t: float
    rss_kb: int
    fds: int
    cpu_s: float


class Record(NamedTuple):
    """One request the parent saw: which user it arrived as, method and target."""

    conn: int | None
    user: str | None
    method: str
    target: str


@dataclasses.dataclass
class ClientStats:
    """Counters filled by the clients."""

    ok: Counter[str] = dataclasses.field(default_factory=Counter)
    failed: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    clients_made: int = 0
    aborted: str = ""  # why the run stopped early (mitmdump died)


@dataclasses.dataclass
class SoakResult:
    """Everything the summary table shows, and the verdict."""

    config: SoakConfig
    stats: ClientStats
    duration: float
    samples: list[Sample]
    rss_start_kb: int
    rss_mid_kb: int
    rss_end_kb: int
    rss_peak_kb: int
    fds_start: int
    fds_peak: int
    fds_end: int
    cpu_percent: float
    handshakes: int
    records_checked: int
    users_at_parent: Counter[str | None]
    violations: list[str]
    mitm_warnings: list[str]
    listen_overflows: int
    mitm_tail: list[str]

    @property
    def total_ok(self) -> int:
        return sum(self.stats.ok.values())

    @property
    def total_failed(self) -> int:
        return sum(self.stats.failed.values())

    @property
    def rss_growth(self) -> float:
        """Relative RSS growth from the middle of the run to its end."""
        return (self.rss_end_kb - self.rss_mid_kb) / max(self.rss_mid_kb, 1)

    def problems(self) -> list[str]:
        """Why the run failed; empty when it passed."""
        out = [self.stats.aborted] if self.stats.aborted else []
        if self.total_failed:
            out.append(f"{self.total_failed} requests failed")
        if self.violations:
            out.append(f"{len(self.violations)} isolation violations")
        if self.rss_growth > RSS_GROWTH_LIMIT:
            out.append(f"RSS grew {self.rss_growth:+.1%} in the second half")
        if self.fds_end > self.fds_start + FD_SLACK:
            out.append(f"fds {self.fds_start} -> {self.fds_end} after the clients closed")
        return out


# --------------------------------------------------------------------------- processes


class QuietMitmdump(Mitmdump):
    """Mitmdump at ``termlog_verbosity=warn`` on a port picked beforehand.

    The "listening at" line is INFO, so readiness is detected by connecting to the port.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port = free_port()

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("termlog_verbosity=debug")] = "termlog_verbosity=warn"
        cmd[cmd.index("-p") + 1] = str(self.port)
        return cmd

    def start(self, expect_failure: bool = False) -> QuietMitmdump:
        def probe() -> None:
            alive = lambda: self.proc is None or self.proc.poll() is None  # noqa: E731
            with contextlib.suppress(RuntimeError, TimeoutError):
                wait_port(self.port, 30, alive)
                self._listening.set()

        threading.Thread(target=probe, daemon=True, name="mitmdump-probe").start()
        super().start(expect_failure)
        return self


def listen_overflows() -> int:
    """System-wide count of connections dropped by full accept queues (0 if unreadable)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(names.split(), values.split(), strict=False))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return 0


def read_proc(pid: int) -> tuple[int, int, float]:
    """(VmRSS in kB, open fds, user+system CPU seconds) of a live process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return rss, fds, cpu


class Sampler:
    """Reads a process's RSS, fds and CPU time every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def sample(self) -> Sample:
        """Take one reading now and keep it."""
        rss, fds, cpu = read_proc(self.pid)
        s = Sample(time.monotonic() - self.t0, rss, fds, cpu)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.sample()

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Rig:
    """Origins, parent and mitmdump, started together and stopped together."""

    def __init__(self, config: SoakConfig) -> None:
        if config.parent not in ("squid", "pyspnego"):
            raise ValueError("parent must be squid or pyspnego")
        if config.users not in (1, 2):
            raise ValueError("users must be 1 or 2")
        self.config = config
        self.users = list(USERS)[: config.users]
        self.origin = Origin()  # its listen backlog is large enough for this load
        self.tls_origin = Origin(tls=True)
        self.parent: ParentProxy | None = None
        self.squid: Squid | None = None
        self.mitm: QuietMitmdump | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self._stack = contextlib.ExitStack()
        self._confdir: Path | None = None

    def start(self) -> Rig:
        """Start everything; on any error, stop what already runs."""
        with self._stack as stack:
            stack.enter_context(self.origin)
            stack.enter_context(self.tls_origin)
            if self.config.parent == "squid":
                self.squid = stack.enter_context(
                    Squid(
                        "ntlm_fake",
                        children=self.config.squid_children,
                        extra_config="strip_query_terms off",  # keep ?who= in access.log
                    )
                )
                parent_url = self.squid.url
            else:
                self.parent = stack.enter_context(
                    ParentProxy({u: USERS[u] for u in self.users}, require_auth=True)
                )
                parent_url = self.parent.url
            self._confdir = Path(tempfile.mkdtemp(prefix="soak-mitm-"))
            stack.callback(shutil.rmtree, self._confdir, ignore_errors=True)
            self.mitm = self._start_mitmdump(parent_url, stack)
            self.ssl_context = ssl.create_default_context(cafile=str(self.mitm.ca_cert))
            self._stack = stack.pop_all()
        return self

    def _start_mitmdump(self, parent_url: str, stack: contextlib.ExitStack) -> QuietMitmdump:
        assert self._confdir is not None and self.tls_origin.cert_path is not None
        options: dict[str, str | int | bool] = {
            "ntlm_domain": DOMAIN,
            "ssl_verify_upstream_trusted_ca": str(self.tls_origin.cert_path),
            "flow_detail": 0,  # no line per flow: the output stays small, as with warn
            # Pooled parent connections close after 3 s idle, so the fd check after the
            # clients left also shows that the pool gives its sockets back.
            "ntlm_pool_idle": 3,
        }
        env: dict[str, str] = {}
        if self.config.users == 1:
            user = self.users[0]
            options["ntlm_username"] = user.split("\\")[1]
            options["ntlm_password_env"] = "PW"
            env["PW"] = USERS[user]
        else:
            options["ntlm_multiuser"] = True
        for attempt in range(3):  # the port picked beforehand may be taken meanwhile
            m = QuietMitmdump(parent_url, options, confdir=self._confdir, env=env)
            stack.callback(m.stop)
            try:
                return m.start()
            except RuntimeError:
                if attempt == 2 or "address already in use" not in m.output.lower():
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop mitmdump, the parent and the origins (in reverse start order)."""
        self._stack.close()

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def proxy_url(self, user: str) -> str:
        """mitmdump's URL, with the user's Basic credentials in multi-user mode."""
        assert self.mitm is not None
        if self.config.users == 1:
            return self.mitm.url
        cred = f"{quote(user, safe='')}:{quote(USERS[user], safe='')}"
        return self.mitm.url.replace("http://", f"http://{cred}@")

    def handshakes(self) -> int:
        """Handshakes the parent counted: Type 3 messages, or squid's 407 answers."""
        if self.parent is not None:
            return self.parent.snapshot().type3_count
        assert self.squid is not None
        return sum("TCP_DENIED/407" in line for line in self.squid.access_log())

    def parent_records(self) -> list[Record]:
        """Every request the parent forwarded, with the user it arrived as."""
        if self.parent is not None:
            return [Record(r.conn_id, r.user, r.method, r.target) for r in self.parent.requests]
        assert self.squid is not None
        out = []
        for line in self.squid.access_log():  # time elapsed client code bytes method URL user ..
            f = line.split()
            if len(f) >= 8 and "TCP_DENIED" not in f[3]:
                user = None if f[7] == "-" else unquote(f[7])
                out.append(Record(None, user, f[5], f[6]))
        return out


# --------------------------------------------------------------------------- clients


def expected_user(rec: Record) -> str | None:
    """The user a parent record was tagged with: ``who=`` in the URL, or the CONNECT host."""
    if rec.method == "CONNECT":
        host = rec.target.rsplit(":", 1)[0]
        return next((u for u, h in TLS_HOST.items() if h == host), None)
    who = parse_qs(urlsplit(rec.target).query).get("who")
    return who[0] if who else None


def check_isolation(records: list[Record], exact: bool = True) -> list[str]:
    """Violations: a record arrived as another user than its tag, or one connection had two.

    ``exact=False`` is for squid, whose ``ntlm_fake_auth`` logs mangled names (``C\\a`` for
    ``CORP\\alice``): then each logged name must belong to exactly one tagged user.
    """
    problems: list[str] = []
    per_conn: dict[int, set[str | None]] = {}
    tags_per_name: dict[str, set[str]] = {}
    for rec in records:
        tagged = expected_user(rec)
        if tagged is None:
            problems.append(f"untagged request at the parent: {rec}")
        elif rec.user is None:
            problems.append(f"tagged {tagged} but arrived unauthenticated: {rec}")
        elif exact and rec.user.lower() != tagged.lower():
            problems.append(f"tagged {tagged} but arrived as {rec.user}: {rec}")
        elif not exact:
            tags_per_name.setdefault(rec.user, set()).add(tagged)
        if rec.conn is not None:
            per_conn.setdefault(rec.conn, set()).add(rec.user)
    for name, tags in tags_per_name.items():
        if len(tags) > 1:
            problems.append(f"requests tagged {sorted(tags)} all arrived as {name!r}")
    for conn, users in per_conn.items():
        if len(users) > 1:
            problems.append(f"parent connection {conn} carried users {sorted(map(str, users))}")
    return problems


class Client:
    """One simulated client: its own AsyncClient, reconnecting now and then."""

    def __init__(self, idx: int, rig: Rig, stats: ClientStats, rng: random.Random) -> None:
        self.idx = idx
        self.rig = rig
        self.stats = stats
        self.rng = rng
        self.user = rig.users[idx % len(rig.users)]
        self.http = rig.origin.base_url
        self.https = f"https://{TLS_HOST[self.user]}:{rig.tls_origin.port}"
        self.client: httpx.AsyncClient | None = None
        self.n = 0

    def _new_client(self) -> httpx.AsyncClient:
        self.stats.clients_made += 1
        return httpx.AsyncClient(
            proxy=self.rig.proxy_url(self.user),
            verify=self.rig.ssl_context or True,
            timeout=self.rig.config.timeout,
            trust_env=False,
        )

    def _url(self, base: str, path: str) -> str:
        return f"{base}{path}?who={quote(self.user)}&c={self.idx}&n={self.n}"

    async def request(self, client: httpx.AsyncClient, kind: str) -> None:
        """One request of the given kind; raises AssertionError when the answer is wrong."""
        base = self.http if kind in ("http", "post") else self.https
        if kind.startswith("post"):
            body = os.urandom(self.rng.choice((1, 1000, 64 * 1024, 300 * 1024)))
            r = await client.post(self._url(base, "/echo"), content=body)
            check_status(r)
            info = json.loads(r.content)
            if info["sha256"] != hashlib.sha256(body).hexdigest() or info["length"] != len(body):
                raise AssertionError(f"echo mismatch: sent {len(body)}, got {info}")
        elif self.rng.random() < 0.7:
            r = await client.get(self._url(base, "/hello"))
            check_status(r)
            if r.content != b"hello":
                raise AssertionError(f"/hello body {r.content[:80]!r}")
        else:
            size = self.rng.choice((100, 10_000, 200_000))
            r = await client.get(self._url(base, f"/bytes/{size}"))
            check_status(r)
            if r.content != pattern_bytes(size):
                raise AssertionError(f"/bytes/{size}: {len(r.content)} bytes, wrong content")

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        """Send requests until the deadline, ``stop`` or the per-client cap; close the client."""
        cfg = self.rig.config
        await asyncio.sleep(self.rng.random() * cfg.ramp_up)
        left = self.rng.randint(*cfg.reconnect_after)
        try:
            while (
                time.monotonic() < deadline
                and not stop.is_set()
                and self.n < cfg.max_requests_per_client
            ):
                if self.client is None:
                    self.client = self._new_client()
                kind = self.rng.choices(KINDS, KIND_WEIGHTS)[0]
                self.n += 1
                t0 = time.perf_counter()
                try:
                    await self.request(self.client, kind)
                except Exception as e:  # every failure is counted and shown, never fatal
                    self.stats.failed[kind] += 1
                    self.stats.errors[f"{kind}: {describe(e)}"] += 1
                    left = 0  # start over on a fresh connection, after a short pause
                    await asyncio.sleep(0.1)
                else:
                    self.stats.ok[kind] += 1
                    self.stats.latencies.append(time.perf_counter() - t0)
                left -= 1
                if left <= 0:
                    await self.client.aclose()
                    self.client = None
                    left = self.rng.randint(*cfg.reconnect_after)
        finally:
            if self.client is not None:
                await self.client.aclose()
                self.client = None


def check_status(r: httpx.Response) -> None:
    """Anything but 200 is a failure, with the start of the body for the report."""
    if r.status_code != 200:
        text = r.text[:160].replace("\n", " ")
        raise AssertionError(f"HTTP {r.status_code}: {text}")


def describe(e: BaseException) -> str:
    """Short error text that groups well: exception type and the start of its message."""
    text = str(e) or repr(e)
    return f"{type(e).__name__}: {text[:200]}"


async def run_clients(rig: Rig, stats: ClientStats, seconds: float) -> None:
    """All clients concurrently until ``seconds`` from now; returns when every one closed."""
    cfg = rig.config
    deadline = time.monotonic() + seconds
    clients = [
        Client(i, rig, stats, random.Random(cfg.seed * 100_003 + i)) for i in range(cfg.clients)
    ]
    stop = asyncio.Event()
    watchdog = asyncio.create_task(watch_mitmdump(rig, stats, stop))
    try:
        await asyncio.gather(*(c.run(deadline, stop) for c in clients))
    finally:
        watchdog.cancel()


async def watch_mitmdump(rig: Rig, stats: ClientStats, stop: asyncio.Event) -> None:
    """End the run early when mitmdump exits: its clients would only fail from then on."""
    assert rig.mitm is not None and rig.mitm.proc is not None
    while (code := rig.mitm.proc.poll()) is None:
        await asyncio.sleep(0.5)
    stats.aborted = f"mitmdump exited during the run (exit code {code})"
    stop.set()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def settle_fds(sampler: Sampler, baseline: int, timeout: float = 10.0) -> int:
    """Wait (bounded) for mitmdump's fds to fall back to ``baseline``; the last count."""
    deadline = time.monotonic() + timeout
    fds = sampler.sample().fds
    while fds > baseline and time.monotonic() < deadline:
        time.sleep(0.25)
        fds = sampler.sample().fds
    return fds


def soak(rig: Rig) -> SoakResult:
    """Run the load against a started rig and collect the numbers."""
    cfg = rig.config
    assert rig.mitm is not None and rig.mitm.proc is not None
    stats = ClientStats()
    overflows = listen_overflows()
    with Sampler(rig.mitm.proc.pid) as sampler:
        first = sampler.samples[0]
        t_start = time.monotonic()
        asyncio.run(run_clients(rig, stats, cfg.seconds))
        duration = time.monotonic() - t_start
        alive = rig.mitm.proc.poll() is None
        end = sampler.sample() if alive else sampler.samples[-1]
        fds_end = settle_fds(sampler, first.fds + 2) if alive else end.fds
    during = [s for s in sampler.samples if s.t <= end.t]
    half = first.t + cfg.seconds / 2
    mid = next((s for s in during if s.t >= half), end)
    records = rig.parent_records()
    violations = check_isolation(records, exact=rig.parent is not None) if cfg.users > 1 else []
    warnings = [line for line in rig.mitm.lines if "ntlm" in line.lower()]
    return SoakResult(
        config=cfg,
        stats=stats,
        duration=duration,
        samples=sampler.samples,
        rss_start_kb=first.rss_kb,
        rss_mid_kb=mid.rss_kb,
        rss_end_kb=end.rss_kb,
        rss_peak_kb=max(s.rss_kb for s in during),
        fds_start=first.fds,
        fds_peak=max(s.fds for s in during),
        fds_end=fds_end,
        cpu_percent=100 * (end.cpu_s - first.cpu_s) / max(end.t - first.t, 1e-9),
        handshakes=rig.handshakes(),
        records_checked=len(records) if cfg.users > 1 else 0,
        users_at_parent=Counter(r.user for r in records),
        violations=violations,
        mitm_warnings=warnings,
        listen_overflows=listen_overflows() - overflows,
        mitm_tail=rig.mitm.lines[-10:],
    )


def run(config: SoakConfig) -> SoakResult:
    """Start the rig, soak, stop everything (also on errors and Ctrl-C)."""
    with Rig(config) as rig:
        return soak(rig)


# --------------------------------------------------------------------------- report


def summary(res: SoakResult) -> str:
    """The one table the script prints."""
    cfg, st = res.config, res.stats
    mb = lambda kb: f"{kb / 1024:.1f} MB"  # noqa: E731
    parent = (
        f"squid ntlm_fake ({cfg.squid_children} helpers)"
        if cfg.parent == "squid"
        else "pyspnego ParentProxy"
    )
    try:
        import mitmproxy.version

        mitm_version = mitmproxy.version.VERSION
    except ImportError:
        mitm_version = "?"
    users = ", ".join(f"{u} {n}" for u, n in sorted(res.users_at_parent.items(), key=str))
    lines = [
        f"soak: {cfg.clients} clients, {cfg.seconds:g} s, parent {parent}, {cfg.users} user(s), "
        f"mitmproxy {mitm_version}, Python {platform.python_version()}",
        f"{'kind':<26}{'ok':>10}{'failed':>10}",
    ]
    for kind in KINDS:
        lines.append(f"  {kind:<24}{st.ok[kind]:>10}{st.failed[kind]:>10}")
    lines += [
        f"  {'total':<24}{res.total_ok:>10}{res.total_failed:>10}",
        f"{'requests/s':<26}{res.total_ok / max(res.duration, 1e-9):>10.1f}"
        f"   ({res.duration:.1f} s, {st.clients_made} AsyncClients made)",
        f"{'latency p50 / p99 / max':<26}{percentile(st.latencies, 50) * 1000:>8.0f} ms"
        f"{percentile(st.latencies, 99) * 1000:>8.0f} ms"
        f"{max(st.latencies, default=0) * 1000:>8.0f} ms",
        f"{'mitmdump RSS start/mid/end':<26}{mb(res.rss_start_kb):>10} {mb(res.rss_mid_kb):>10} "
        f"{mb(res.rss_end_kb):>10}   (2nd half {res.rss_growth:+.1%}, peak "
        f"{mb(res.rss_peak_kb)})",
        f"{'mitmdump fds start/end':<26}{res.fds_start:>10}{res.fds_end:>10}"
        f"   (peak {res.fds_peak}, after the clients closed)",
        f"{'mitmdump CPU':<26}{res.cpu_percent:>9.0f}%",
        f"{'handshakes at the parent':<26}{res.handshakes:>10}"
        + ("   (Type 3 messages)" if cfg.parent == "pyspnego" else "   (TCP_DENIED/407)"),
        f"{'isolation violations':<26}{len(res.violations):>10}"
        + (
            f"   ({res.records_checked} parent records checked: {users})"
            if cfg.users > 1
            else "   (single user: not checked)"
        ),
        f"{'TCP listen overflows':<26}{res.listen_overflows:>10}   (system-wide, during the run)",
    ]
    if st.errors:
        lines.append("errors (most common):")
        lines += [f"  {n:>6} x {msg}" for msg, n in st.errors.most_common(8)]
    if res.violations:
        lines.append("isolation violations (first 5):")
        lines += [f"  {v}" for v in res.violations[:5]]
    if res.mitm_warnings:
        lines.append(f"mitmdump [ntlm] log lines at warn level: {len(res.mitm_warnings)}, e.g.")
        lines += [f"  {w[:200]}" for w in res.mitm_warnings[:3]]
    if st.aborted:
        lines.append(f"ABORTED: {st.aborted}; last output:")
        lines += [f"  {line[:200]}" for line in res.mitm_tail]
    problems = res.problems()
    lines.append("verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    return "\n".join(lines)


def raise_fd_limit() -> None:
    """Let this process (and mitmdump, which inherits it) hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the rig's cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 1 when the run failed its checks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--parent", choices=("squid", "pyspnego"), default="squid")
    p.add_argument("--users", type=int, choices=(1, 2), default=1)
    p.add_argument("--squid-children", type=int, default=20, help="NTLM helpers (default 20)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.squid_children < 1:
        p.error("--clients, --seconds and --squid-children must be positive")
    config = SoakConfig(
        clients=args.clients,
        seconds=args.seconds,
        parent=args.parent,
        users=args.users,
        squid_children=args.squid_children,
        seed=args.seed,
    )
    raise_fd_limit()
    try:
        with sigterm_as_interrupt():
            result = run(config)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(summary(result))
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
