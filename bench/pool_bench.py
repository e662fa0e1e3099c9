"""Before/after numbers for the parent connection pool (ntlm_pool), all on 127.0.0.1::

    python bench/pool_bench.py [--curls 100] [--seconds 8] [--concurrency 4] [--rounds 2]

1. Handshakes at a password-checking parent for N separate curl processes (one client
   connection each), pool on and off, and how long the N curls took.
2. Throughput with `hey` (Debian package) through mitmdump: new connection per request
   (`-disable-keepalive`) and keep-alive, for stock mitmdump (no addon) to a parent without
   auth, and the addon with the pool off and on to the NTLM parent. Rounds alternate the
   variants so a noisy machine hurts them alike; the best round is reported.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/pool_bench.py` puts bench/, not the checkout, there
    sys.path.insert(0, str(ROOT))

from bench.soak import QuietMitmdump  # noqa: E402
from mitmproxy_ntlm.testing.parent import ParentProxy  # noqa: E402
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER  # noqa: E402
from tests.mitm import Mitmdump, curl  # noqa: E402
from tests.servers import Origin  # noqa: E402

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_password_env": "PW"}
QUIET = {"flow_detail": 0}  # and termlog_verbosity=warn (QuietMitmdump)


class StockMitmdump(QuietMitmdump):
    """mitmdump without the addon."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("-s")
        return cmd[:i] + cmd[i + 2:]


def start(parent: ParentProxy, confdir: Path, pool: bool | None) -> Mitmdump:
    if pool is None:
        return StockMitmdump(parent.url, dict(QUIET), confdir=confdir).start()
    opts = {**CREDS, **QUIET, "ntlm_pool": pool}
    return QuietMitmdump(parent.url, opts, confdir=confdir, env={"PW": TEST_PASSWORD}).start()


def handshakes(origin: Origin, parent: ParentProxy, confdir: Path, n: int, pool: bool) -> str:
    parent.reset_stats()
    m = start(parent, confdir, pool)
    try:
        t0 = time.monotonic()
        for _ in range(n):
            r = curl("-x", m.url, f"{origin.url}/hello")
            assert r.stdout == "hello", r
        took = time.monotonic() - t0
    finally:
        m.stop()
    s = parent.snapshot()
    return (f"pool {'on ' if pool else 'off'}: {n} curl processes -> {s.connections} parent "
            f"connections, {s.type1_count} handshakes ({s.type3_count} Type 3), "
            f"{len(s.requests)} requests, {took:.2f} s")


def cpu_seconds(pid: int) -> float:
    """user+system CPU time of a process: steadier than req/s on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hey(m: Mitmdump, url: str, seconds: int, concurrency: int, keepalive: bool) -> tuple[float,
                                                                                        str]:
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-x", m.url, url]
    if not keepalive:
        cmd.insert(1, "-disable-keepalive")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    codes = " ".join(f"{n}x{c}" for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return rps, codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curls", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["handshakes", "new", "keepalive"], action="append",
                    help="run only these parts (repeatable); default: all")
    args = ap.parse_args()
    confdir = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    users = {f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD}
    with Origin() as origin, ParentProxy(users) as ntlm, ParentProxy(require_auth=False) as open_:
        parts = set(args.only or ["handshakes", "new", "keepalive"])
        if "handshakes" in parts:
            print("== handshakes at the parent")
            for pool in (False, True):
                print(handshakes(origin, ntlm, confdir, args.curls, pool), flush=True)
        variants = {"stock mitmdump, no-auth parent": (open_, None),
                    "addon, pool off, NTLM parent": (ntlm, False),
                    "addon, pool on,  NTLM parent": (ntlm, True)}
        for keepalive in [k for k in (False, True) if ("keepalive" if k else "new") in parts]:
            title = "keep-alive" if keepalive else "new connection per request"
            print(f"== hey -c {args.concurrency} -z {args.seconds}s, {title} (req/s, best of "
                  f"{args.rounds})", flush=True)
            best: dict[str, tuple[float, str]] = {}
            cpu: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, (parent, pool) in variants.items():
                    parent.reset_stats()
                    m = start(parent, confdir, pool)
                    assert m.proc is not None
                    try:
                        cpu0 = cpu_seconds(m.proc.pid)
                        rps, codes = hey(m, f"{origin.url}/hello", args.seconds,
                                         args.concurrency, keepalive)
                        per_request = (cpu_seconds(m.proc.pid) - cpu0) / (rps * args.seconds)
                    finally:
                        m.stop()
                    cpu[name] = min(cpu.get(name, 1e9), per_request * 1e6)
                    hs = parent.snapshot().type1_count
                    if name not in best or rps > best[name][0]:
                        best[name] = (rps, f"{codes}, {hs} handshakes")
            base = best["stock mitmdump, no-auth parent"][0]
            base_cpu = cpu["stock mitmdump, no-auth parent"]
            for name, (rps, info) in best.items():
                print(f"  {name}: {rps:8.1f} req/s ({rps / base * 100:5.1f}% of stock; {info}); "
                      f"mitmdump CPU {cpu[name]:6.0f} us/request ({cpu[name] / base_cpu * 100:5.1f}"
                      f"% of stock, best round)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
