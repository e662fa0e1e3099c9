"""A/B CPU per request of two checkouts of the addon, in alternating rounds (issues 22 and 24).

    python bench/ab_cpu.py --a /work/baseline --b . --rounds 5 --duration 7 | tee ab_cpu.txt

Why: a refactor must show "CPU per request no worse" against today's code, and instruction
counts under valgrind hide per-turn and kernel costs. So each tree's ``addons/ntlm.py`` runs in
its own mitmdump (stock mitmdump, no addon, open parent, as a third column) and all stay up
while rounds of the same load alternate between them (A, B, stock, then the reverse order), so
drift on a shared machine hits every column alike. A round's cost is user + system CPU of the
mitmdump process tree (/proc, read after the load and a short settle) per answered request.

Each mitmdump imports its own tree's ``mitmproxy_ntlm`` (``PYTHONPATH=<tree>/addons`` ahead of
the venv's editable install); ``PYTHONVERBOSE`` logs every module's file at start-up and the
run stops if any ``mitmproxy_ntlm`` module came from elsewhere.

The stack (nginx origin, Squid with ``ntlm_fake_auth``, open Squid) and the load generators
are bench/compare.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import compare
from compare import (
    Load,
    Stack,
    free_port,
    mitmdump_bin,
    raise_fd_limit,
    run_hey,
    run_newconn,
    run_wrk,
    spawn,
    stop_proc,
    tail,
    tree_usage,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
PIN: int | None = None  # --pin: the core every mitmdump runs on
OPEN_PARENT = False  # --open-parent: the addon against the parent that asks for no logon
OPEN_PARENT_A = False  # --open-parent-a: only A against it (B against the NTLM Squid)
MODES = ("keepalive", "newconn", "close", "c200", "connect", "connect-ka", "passthrough")
DEFAULT_MODES = ("keepalive", "newconn", "c200", "connect", "passthrough")
MODE_HELP = {
    "keepalive": "wrk, absolute-form small GETs on kept-alive connections",
    "newconn": "one new client connection per plain GET (Python client, no Connection: close)",
    "close": "hey -disable-keepalive (every request says Connection: close)",
    "c200": "hey, 200 concurrent kept-alive clients",
    "connect": "one new connection per request: CONNECT, TLS with mitmproxy's cert, GET",
    "connect-ka": "hey through CONNECT, intercepted, requests kept alive inside the tunnel",
    "passthrough": "as connect, but --ignore-hosts: the TLS goes through untouched",
}
SETTLE = 0.5  # seconds after the load before CPU is read: closes and tails belong to the round
PACKAGE_FILE = re.compile(r"^# code object from '?(\S*?/mitmproxy_ntlm/\S*?)'?$", re.M)
VERBOSE_LINE = re.compile(r"^(#|import )")  # PYTHONVERBOSE's imports and clean-up


@dataclasses.dataclass
class Config:
    """Which trees, modes, how many rounds of how long, how many clients."""

    a: Path
    b: Path
    stock: bool = True
    modes: tuple[str, ...] = DEFAULT_MODES
    rounds: int = 5
    duration: float = 7.0
    warmup: float = 2.0
    connections: int = 8
    json_out: Path | None = None
    b_env: tuple[str, ...] = ()  # NAME=VALUE for B's mitmdump only (e.g. PYTHONMALLOC=malloc)
    b_set: tuple[str, ...] = ()  # --set OPTION=VALUE for B's mitmdump only
    a_set: tuple[str, ...] = ()  # --set OPTION=VALUE for A's mitmdump only


@dataclasses.dataclass
class Round:
    """One contender's share of one round of one mode."""

    mode: str
    contender: str
    round: int
    requests: int
    errors: int
    seconds: float
    cpu_s: float
    rps: float
    rss_mb: float
    handshakes: int

    @property
    def cpu_ms_req(self) -> float | None:
        """CPU milliseconds per answered request (None when nothing was answered)."""
        return 1000 * self.cpu_s / self.requests if self.requests else None


@dataclasses.dataclass
class Contender:
    """A running mitmdump: which tree (None: stock), where clients point, its process."""

    name: str
    tree: Path | None
    proxy: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        """The end of its log, for an error message (PYTHONVERBOSE's lines left out)."""
        return tail(self.log, drop=VERBOSE_LINE)

    def stop(self) -> None:
        """SIGINT: mitmdump shuts down cleanly."""
        stop_proc(self.proc, signal.SIGINT)


def start(st: Stack, name: str, tree: Path | None, passthrough: bool,
          extra_env: tuple[str, ...] = (), extra_sets: tuple[str, ...] = ()) -> Contender:
    """mitmdump in upstream mode: ``tree``'s addon against the NTLM Squid, or stock, open Squid."""
    confdir = st.workdir / f"mitm-{name}"
    confdir.mkdir(exist_ok=True)
    port = free_port()
    env = compare.client_env()
    env["PYTHONVERBOSE"] = "1"  # the imported files, for check_imports (start-up only)
    env.pop("PYTHONPATH", None)  # only the tree's own package, whatever the harness runs with
    env.update(item.split("=", 1) for item in extra_env)  # type: ignore[arg-type]
    cmd = [mitmdump_bin()]
    if tree is not None:
        env["PYTHONPATH"] = str(tree / "addons")
        env["BENCH_PW"] = compare.PASSWORD
        cmd += ["-s", str(tree / "addons" / "ntlm.py")]
    open_parent = OPEN_PARENT or (OPEN_PARENT_A and name == "A")
    parent = st.squid_ntlm.url if tree is not None and not open_parent else st.squid_open.url
    cmd += ["--listen-host", "127.0.0.1", "-p", str(port), "--mode", f"upstream:{parent}"]
    sets = [f"confdir={confdir}", "termlog_verbosity=warn", "flow_detail=0", "ssl_insecure=true"]
    if tree is not None:
        sets += [
            f"ntlm_username={compare.USER}",
            f"ntlm_domain={compare.DOMAIN}",
            "ntlm_password_env=BENCH_PW",
        ]
    for s in (*sets, *extra_sets):
        cmd += ["--set", s]
    if passthrough:
        cmd += ["--ignore-hosts", ".*"]
    log = st.workdir / f"{name}{'-pass' if passthrough else ''}.log"
    proc = spawn(cmd, log, env=env, cwd=st.workdir)
    if PIN is not None:  # every mitmdump on one core, the load and the servers on the others
        os.sched_setaffinity(proc.pid, {PIN})
    try:
        wait_port(port, 60, proc)
    except (RuntimeError, TimeoutError) as e:
        stop_proc(proc)
        raise RuntimeError(f"{name}: {e}: {tail(log, drop=VERBOSE_LINE)}") from e
    return Contender(name, tree, f"http://127.0.0.1:{port}", proc, log)


def check_imports(c: Contender) -> str:
    """The file of every mitmproxy_ntlm module the process loaded must lie in its own tree.
    mitmproxy may listen before it has loaded the script: wait for the first module."""
    assert c.tree is not None
    deadline = time.monotonic() + 30
    while not (files := PACKAGE_FILE.findall(c.log.read_text(errors="replace"))):
        if time.monotonic() > deadline or c.proc.poll() is not None:
            break
        time.sleep(0.1)
    own = str(c.tree.resolve() / "addons" / "mitmproxy_ntlm") + "/"
    foreign = [f for f in files if not f.startswith(own)]
    if not files or foreign:
        raise RuntimeError(f"{c.name}: mitmproxy_ntlm not loaded from {own}: {foreign or files}")
    init = next((f for f in files if "__init__" in f), files[0])
    return f"{c.name}: {len(files)} mitmproxy_ntlm modules loaded, all from {own} ({init})"


def probe(c: Contender, url: str) -> str:
    """One curl GET through the contender (-k: mitmproxy's or nginx's cert): the status."""
    r = subprocess.run(
        ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "15", "-x", c.proxy, url],
        capture_output=True, text=True, env=compare.client_env(),
    )  # fmt: skip
    return r.stdout.strip() or "000"


def run_load(mode: str, proxy: str, st: Stack, seconds: float, conns: int) -> Load:
    """One mode's load for ``seconds`` against ``proxy``."""
    small, small_tls = st.nginx.url("/small"), st.nginx.url("/small", tls=True)
    if mode == "keepalive":
        return run_wrk(proxy, small, seconds, conns)
    if mode == "newconn":
        return run_newconn(proxy, small, seconds, conns)
    if mode == "close":
        return run_hey(proxy, small, seconds, conns, keepalive=False)
    if mode == "c200":
        return run_hey(proxy, small, seconds, 200, keepalive=True)
    if mode in ("connect", "passthrough"):
        return run_newconn(proxy, small_tls, seconds, conns)
    if mode == "connect-ka":
        return run_hey(proxy, small_tls, seconds, conns, keepalive=True)
    raise ValueError(f"unknown mode {mode}")


def rss_mb(pid: int) -> float:
    """Resident memory of the process tree now, MB."""
    return tree_usage(pid)[0] / 1024


def one_round(mode: str, c: Contender, st: Stack, cfg: Config, rnd: int, seconds: float) -> Round:
    """Load one contender; its CPU over the load plus SETTLE, per answered request."""
    if c.proc.poll() is not None:
        raise RuntimeError(f"{c.name} exited ({c.proc.returncode}): {c.log_tail()}")
    hs0 = st.handshakes()
    cpu0 = tree_usage(c.proc.pid)[1]
    try:
        load = run_load(mode, c.proxy, st, seconds, cfg.connections)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        load = Load(errors=1, seconds=seconds)
        print(f"  {c.name} {mode} round {rnd}: load failed: {e}"[:300], flush=True)
    time.sleep(SETTLE)
    cpu = tree_usage(c.proc.pid)[1] - cpu0
    hs = st.handshakes() - hs0
    return Round(mode, c.name, rnd, load.requests, load.errors, load.seconds, cpu,
                 load.rps or 0.0, rss_mb(c.proc.pid), hs)  # fmt: skip


def fmt_round(r: Round) -> str:
    """One raw line per contender and round."""
    ms = f"{r.cpu_ms_req:.3f}" if r.cpu_ms_req is not None else "-"
    return (
        f"{r.mode:<12} round {r.round} {r.contender:<6} req {r.requests:>6} err {r.errors:>4} "
        f"req/s {r.rps:8.0f} cpu {r.cpu_s:6.2f} s  cpu/req {ms:>7} ms  rss {r.rss_mb:4.0f} MB  "
        f"cores {r.cpu_s / max(r.seconds, 1e-9):.2f}  parent 407s {r.handshakes}"
    )


@contextlib.contextmanager
def contenders(st: Stack, cfg: Config, passthrough: bool) -> Iterator[list[Contender]]:
    """A, B (and stock) running side by side; each answers one probe before any load."""
    wanted: list[tuple[str, Path | None]] = [("A", cfg.a), ("B", cfg.b)]
    if cfg.stock:
        wanted.append(("stock", None))
    started: list[Contender] = []
    try:
        for name, tree in wanted:
            c = start(st, name, tree, passthrough, *((cfg.b_env, cfg.b_set) if name == "B"
                                                     else ((), cfg.a_set)))
            started.append(c)
            if tree is not None:
                print(check_imports(c), flush=True)
            for url in (st.nginx.url("/small"), st.nginx.url("/small", tls=True)):
                if (status := probe(c, url)) != "200":
                    raise RuntimeError(f"{c.name}: {url} answered {status}: {c.log_tail()}")
        yield started
    finally:
        for c in started:
            c.stop()


def run_mode(mode: str, cs: list[Contender], st: Stack, cfg: Config) -> list[Round]:
    """Warm-up (uncounted), then rounds in alternating order: A B stock, stock B A, ..."""
    for c in cs:
        one_round(mode, c, st, cfg, -1, cfg.warmup)
    rounds = []
    for rnd in range(cfg.rounds):
        for c in cs if rnd % 2 == 0 else cs[::-1]:
            r = one_round(mode, c, st, cfg, rnd + 1, cfg.duration)
            print(fmt_round(r), flush=True)
            rounds.append(r)
    return rounds


def run_all(cfg: Config) -> list[Round]:
    """Stack up, intercepting contenders for the plain/CONNECT modes, then passthrough ones."""
    rounds: list[Round] = []
    stack_cfg = compare.Config(size=1 << 20, children=32)
    with compare.stack(stack_cfg) as st:
        for passthrough in (False, True):
            modes = [m for m in cfg.modes if (m == "passthrough") == passthrough]
            if not modes:
                continue
            st.heal(lambda msg: print(msg, flush=True))
            with contenders(st, cfg, passthrough) as cs:
                for mode in modes:
                    rounds += run_mode(mode, cs, st, cfg)
    return rounds


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``median (min-max)``, or a dash."""
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def paired(rounds: list[Round], mode: str, top: str, bottom: str) -> list[float]:
    """Per-round ratios of CPU per request, ``top`` over ``bottom`` in the same round."""
    by = {(r.contender, r.round): r.cpu_ms_req for r in rounds if r.mode == mode}
    out = []
    for (name, rnd), value in by.items():
        other = by.get((bottom, rnd))
        if name == top and value is not None and other:
            out.append(value / other)
    return out


def values(rounds: list[Round], name: str, key: Callable[[Round], float | None]) -> list[float]:
    """One figure of one contender's rounds, where it exists."""
    return [v for r in rounds if r.contender == name and (v := key(r)) is not None]


def table(rounds: list[Round], cfg: Config) -> str:
    """Per mode: CPU ms/request of A, B (stock), the paired ratios, req/s, errors."""
    names = ["A", "B", *(["stock"] if cfg.stock else [])]
    head = ["mode", *(f"{n} CPU ms/req" for n in names), "B/A"]
    if cfg.stock:
        head += ["A/stock", "B/stock"]
    head += [*(f"{n} req/s" for n in names), "errors A/B" + ("/stock" if cfg.stock else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode in cfg.modes:
        mine = [r for r in rounds if r.mode == mode]
        if not mine:
            continue
        row = [mode, *(spread(values(mine, n, lambda r: r.cpu_ms_req)) for n in names)]
        row.append(spread(paired(rounds, mode, "B", "A")))
        if cfg.stock:
            row += [spread(paired(rounds, mode, n, "stock")) for n in ("A", "B")]
        row += [spread(values(mine, n, lambda r: r.rps), "{:.0f}") for n in names]
        row.append("/".join(f"{sum(values(mine, n, lambda r: r.errors)):.0f}" for n in names))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(tree: Path) -> str:
    """What was measured: the tree's HEAD and a hash of its uncommitted diff (read-only git)."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{tree} (no git: an exported tree)"
    diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True).stdout
    status = subprocess.run([*git, "status", "--short"], capture_output=True, text=True).stdout
    return (
        f"{tree} HEAD {head.stdout.strip()}, {len(status.splitlines())} changed/untracked paths, "
        f"diff sha1 {hashlib.sha1(diff).hexdigest()[:12]}"
    )


def parse_args(argv: list[str] | None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="tree A (e.g. a git archive of HEAD)")
    p.add_argument("--b", type=Path, default=ROOT, help="tree B (default: this checkout)")
    p.add_argument("--no-stock", action="store_true", help="leave out stock mitmdump")
    modes_help = "; ".join(f"{k}: {v}" for k, v in MODE_HELP.items())
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list. {modes_help}")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per contender and mode")
    p.add_argument("--duration", type=float, default=7.0, help="seconds per round")
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds first, per mode")
    p.add_argument("--connections", type=int, default=8, help="clients (c200: always 200)")
    p.add_argument("--json", type=Path, help="also write every round's numbers here")
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for B's mitmdump only (repeatable): A/B of a setting")
    p.add_argument("--b-set", action="append", default=[], metavar="OPTION=VALUE",
                   help="--set for B's mitmdump only (repeatable): A/B of an option")
    p.add_argument("--a-set", action="append", default=[], metavar="OPTION=VALUE",
                   help="--set for A's mitmdump only (repeatable), e.g. the same as --b-set "
                        "when the trees differ")
    p.add_argument("--pin", action="store_true",
                   help="mitmdumps on CPU 0, the load generators and servers on the rest")
    p.add_argument("--open-parent", action="store_true",
                   help="A and B use stock's parent, which asks for no logon: the same work "
                        "at the parent for all three, only the addon's own cost differs")
    p.add_argument("--open-parent-a", action="store_true",
                   help="A alone uses stock's parent (B the NTLM Squid): with --a . --b ., "
                        "what the logon and the pool cost the same code per request")
    a = p.parse_args(argv)
    if a.open_parent_a:
        global OPEN_PARENT_A
        OPEN_PARENT_A = True
    if a.open_parent:
        global OPEN_PARENT
        OPEN_PARENT = True
    if a.pin:
        global PIN
        PIN = 0
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))  # inherited by the load
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown {unknown}; known {MODES}")
    for tree in (a.a, a.b):
        if not (tree / "addons" / "ntlm.py").is_file():
            p.error(f"{tree}: no addons/ntlm.py")
    if a.rounds < 1 or a.duration <= 0:
        p.error("--rounds and --duration must be positive")
    return Config(a.a.resolve(), a.b.resolve(), not a.no_stock, modes, a.rounds, a.duration,
                  a.warmup, a.connections, a.json, tuple(a.b_env), tuple(a.b_set),
                  tuple(a.a_set))  # fmt: skip


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every server started is stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run every mode, print the raw rounds and then the table."""
    cfg = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, interrupt)
    meta = compare.meta_info()
    print(f"ab_cpu {meta['date']}, {meta['host']}, mitmproxy {meta['mitmproxy']}")
    print(f"A = {describe(cfg.a)}\nB = {describe(cfg.b)}")
    print("parents: " + ("all against the open Squid" if OPEN_PARENT else
                         "A against the open Squid, B the NTLM Squid" if OPEN_PARENT_A else
                         "A and B against the NTLM Squid") + ", stock against the open Squid")
    for name, sets in (("A", cfg.a_set), ("B", cfg.b_set)):
        if sets:
            print(f"{name} only: --set {' --set '.join(sets)}")
    print(f"{cfg.rounds} rounds x {cfg.duration:g} s (+{cfg.warmup:g} s warm-up), "
          f"{cfg.connections} clients, modes {','.join(cfg.modes)}", flush=True)  # fmt: skip
    try:
        rounds = run_all(cfg)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"ab_cpu: {e}", file=sys.stderr)
        return 1
    print(f"\nfinished {datetime.datetime.now().isoformat(timespec='seconds')}")
    print("CPU ms/req and req/s: median (min-max) over rounds; ratios: median (min-max) of the "
          "per-round ratios (same round, alternating order). Lower CPU is better.\n")  # fmt: skip
    print(table(rounds, cfg))
    if cfg.json_out is not None:
        raw = {"meta": meta, "a": str(cfg.a), "b": str(cfg.b),
               "rounds": [dataclasses.asdict(r) for r in rounds]}  # fmt: skip
        cfg.json_out.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
