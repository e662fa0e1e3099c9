"""Memory benchmark (issue 24): RSS of stock mitmdump and of mitmdump with the addon.

    python bench/memory.py                      # stock, addon; burst hey -c 1000 -n 5000
    python bench/memory.py --without-kerberos --script before=/tmp/old/addons/ntlm.py

For each contender, in turn, on the stack of bench/compare.py (nginx origin; the addon against
Squid with ``ntlm_fake_auth``, single user; stock mitmdump against the no-auth Squid): RSS
(VmRSS) once it settles after start, after one request, its peak during a burst of keep-alive
clients (hey), and again ``--quiet`` seconds after the burst. Where jemalloc is installed, the
addon also runs on it, as ``mitm-ntlm start`` runs it (allocator.py). Numbers are
machine-relative: read the ratios between rows of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/memory.py` puts bench/, not the checkout, there
    sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
from bench.soak import raise_fd_limit  # noqa: E402
from mitmproxy_ntlm.allocator import find_jemalloc, with_allocator  # noqa: E402
from tests.servers import client_env  # noqa: E402


@dataclasses.dataclass
class Row:
    """One contender's RSS in MB at each moment."""

    name: str
    idle: float = 0.0
    warm: float = 0.0
    peak: float = 0.0
    after: float = 0.0
    errors: int = 0


def rss_mb(pid: int) -> float:
    """VmRSS of the process tree of ``pid``, in MB."""
    return compare.tree_usage(pid)[0] / 1024


def settled_rss(pid: int, settle: float, limit: float = 30.0, still: float = 3.0) -> float:
    """RSS after ``settle`` seconds, once it has moved less than 0.2 MB for ``still`` seconds
    (or after ``limit``). The addon trims its memory 5 s after start-up and after a burst."""
    time.sleep(settle)
    deadline = time.monotonic() + limit
    last, since = rss_mb(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) >= 0.2:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            break
    return rss_mb(pid)


def burst(proxy: str, url: str, clients: int, requests: int) -> int:
    """hey through the proxy: ``requests`` GETs over ``clients`` keep-alive connections;
    returns the requests that did not get a 200."""
    r = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(clients), "-cpus", "1", "-t", "30", "-x", proxy,
         url], capture_output=True, text=True, env=client_env(), timeout=300,
    )  # fmt: skip
    ok = sum(int(n) for n in re.findall(r"\[200\]\s+(\d+) responses", r.stdout))
    return requests - ok


def measure(st: compare.Stack, cfg: compare.Config, name: str, script: Path | None,
            args: argparse.Namespace, wrap: list[str]) -> Row:
    """Start one contender, take its four readings, stop it."""
    saved = compare.ADDON
    if script is not None:
        compare.ADDON = script  # start_mitmdump reads the module's script path
    try:
        running = compare.start_mitmdump(st, cfg, name, script is not None, False, None,
                                         wrap=wrap)
    finally:
        compare.ADDON = saved
    assert running.pid is not None
    row = Row(name)
    url = st.nginx.url("/small")
    try:
        row.idle = settled_rss(running.pid, args.settle)
        if not compare.probe(running, url):
            raise RuntimeError(f"{name}: no 200 through the proxy: {compare.tail(running.log)}"
                               if running.log else f"{name}: no 200")
        row.warm = settled_rss(running.pid, args.settle)
        with compare.Sampler(running.pid) as sampler:
            row.errors = burst(running.proxy, url, args.clients, args.requests)
        row.peak = max(sampler.result()[0] or 0.0, rss_mb(running.pid))
        row.after = settled_rss(running.pid, args.quiet)
    finally:
        running.stop()
    return row


def without_kerberos(st: compare.Stack) -> list[str]:
    """A command prefix that runs Python as if gssapi and krb5 were not installed (what
    `pip install mitmproxy-ntlm` without `[kerberos]` gets): pyspnego then skips them."""
    site = st.workdir / "no-kerberos"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['gssapi'] = sys.modules['krb5'] = None  # ImportError\n")
    return ["env", f"PYTHONPATH={site}"]


def table(rows: list[Row], args: argparse.Namespace) -> str:
    """Markdown table: RSS in MB per moment, and after-burst over idle."""
    lines = [
        f"| contender | idle MB | after 1 request | peak in burst (c{args.clients}, "
        f"n{args.requests}) | {args.quiet:.0f} s after | after / idle | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.idle:.1f} | {r.warm:.1f} | {r.peak:.1f} | {r.after:.1f} "
                     f"| {r.after / r.idle:.2f} | {r.errors} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000, help="concurrent clients in the burst")
    p.add_argument("--requests", type=int, default=5000, help="requests in the burst")
    p.add_argument("--quiet", type=float, default=30.0, help="seconds to wait after the burst")
    p.add_argument("--script", action="append", default=[], metavar="NAME=PATH",
                   help="an extra addon contender (e.g. an older checkout's addons/ntlm.py)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds to wait after start and after the first request")
    p.add_argument("--without-kerberos", action="store_true",
                   help="also the addon as installed without the kerberos extra (no gssapi/krb5)")
    p.add_argument("--no-stock", action="store_true", help="leave stock mitmdump out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    plain: list[str] = []
    contenders: list[tuple[str, Path | None, list[str]]] = (
        [] if args.no_stock else [("mitmdump", None, plain)])
    contenders.append(("addon", compare.ADDON, plain))
    if (library := find_jemalloc()) is not None:  # what `mitm-ntlm start` runs it with
        env, _ = with_allocator({}, "jemalloc", library)
        contenders.append(("addon, jemalloc (mitm-ntlm start)", compare.ADDON,
                           ["env", *(f"{k}={v}" for k, v in env.items())]))
    for spec in args.script:
        name, _, path = spec.partition("=")
        contenders.append((name, Path(path).resolve(), plain))
    cfg = compare.Config(size=1 << 20)
    rows = []
    with compare.stack(cfg) as st:
        if args.without_kerberos:
            contenders.append(("addon, no kerberos extra", compare.ADDON, without_kerberos(st)))
        for name, script, wrap in contenders:
            rows.append(measure(st, cfg, name, script, args, wrap))
            print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
