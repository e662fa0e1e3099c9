"""bench/compare.py runs end to end in its quickest mode and reports every installed contender;
bench/instructions.py counts instructions per request; bench/profile_cpu.py and bench/ab_cpu.py
run their shortest forms with the contenders they are asked for.

No timing assertions: the numbers are machine-relative. What is checked could fail: the stack
starts, each contender either has measured rows or a stated reason for being skipped, the
addon row counted NTLM handshakes at the parent and got answers, and the three outputs exist.
"""

from __future__ import annotations

import json
import pstats
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # left out of CI's reduced runs on the older mitmproxy lines

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "bench" / "compare.py"
TOOLS = ("nginx", "squid", "wrk", "hey", "curl", "openssl")
WORKLOADS = ("keepalive", "download")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One quick run of every contender on two workloads (about 30 s, px install aside)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(COMPARE), "--quick", "--duration", "1", "--size", "1M",
         "--connections", "4", "--only", ",".join(WORKLOADS), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "compare.json").read_text())


def test_outputs_exist(bench_run: tuple[Path, dict]) -> None:
    out, _raw = bench_run
    assert (out / "compare.md").read_text().startswith("Benchmark:")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_contender_measured_or_skipped_with_reason(bench_run: tuple[Path, dict]) -> None:
    from bench.compare import CONTENDERS

    out, raw = bench_run
    table = (out / "compare.md").read_text()
    measured = {(c["contender"], c["workload"]) for c in raw["cells"]}
    for name in CONTENDERS:
        if name in raw["skipped"]:
            assert raw["skipped"][name], f"{name} skipped without a reason"
            assert f"| {name} | skipped: " in table
            continue
        for workload in WORKLOADS:
            assert (name, workload) in measured, f"no {workload} row for {name}"
            assert f"| {workload} | {name} |" in table
    # These need only what the benchmark itself requires (and cntlm when it is installed).
    always = {"addon", "addon-pass", "mitmdump", "curl-ntlm", "squid-direct"}
    if shutil.which("cntlm") or Path("/usr/sbin/cntlm").exists():
        always.add("cntlm")
    assert not always & set(raw["skipped"]), raw["skipped"]


def test_addon_row_counts_handshakes_and_answers(bench_run: tuple[Path, dict]) -> None:
    _out, raw = bench_run
    cells = {(c["contender"], c["workload"]): c for c in raw["cells"]}
    keepalive = cells["addon", "keepalive"]
    assert keepalive["requests"] > 0 and keepalive["rps"] > 0
    assert keepalive["handshakes"] > 0 and keepalive["hs_per_100"] > 0
    assert keepalive["rss_mb"] > 0 and keepalive["cpu_s"] > 0
    download = cells["addon", "download"]
    assert download["requests"] == 1 and download["mbps"] > 0
    # The stock mitmdump goes to the parent without auth: no handshakes counted for it.
    assert cells["mitmdump", "keepalive"]["handshakes"] == 0


def test_instruction_counts(tmp_path: Path) -> None:
    """bench/instructions.py counts instructions per request under valgrind for both rows,
    kept-alive requests and intercepted tunnels, and with --cache-sim the simulated misses."""
    missing = [t for t in (*TOOLS, "valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    out = tmp_path / "instructions.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "instructions.py"), "--requests", "20",
         "--only", "keepalive,connect", "--cache-sim", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    # No request passes through mitmproxy in fewer than a million instructions: a smaller
    # figure means the counting window missed the requests.
    for name in ("mitmdump", "addon"):
        assert results[name]["keepalive"][0] > 1e6, results
        assert results[name]["connect"][0] > results[name]["keepalive"][0], results  # + TLS
    assert "| keepalive |" in proc.stdout and "| connect |" in proc.stdout
    assert re.search(r"^\| keepalive D1mr \| [\d,]+ \| [\d,]+ \| [\d.]+ \|$", proc.stdout, re.M), \
        proc.stdout
    # Every tunnel of the addon was a logon at the parent; stock's parent asks for none.
    assert re.search(r"addon +connect +20 requests, .* 20 NTLM logons", proc.stderr), proc.stderr


def test_perf_with_python_frames(tmp_path: Path) -> None:
    """bench/profile_cpu.py's perfpy phase: perf samples of real mitmdumps carry their
    Python frames, so an intercepted tunnel's CPU splits by package. Only the addon runs
    pyspnego (its logons); both run mitmproxy. perf's bulky files are gone afterwards."""
    if sys.version_info < (3, 13):
        pytest.skip("perf's JIT records for Python frames need Python 3.13")
    missing = [t for t in (*TOOLS, "perf") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    out = tmp_path / "profile"
    jitted_before = set(Path("/tmp").glob("jitted-*.so"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_cpu.py"), "--modes", "connect",
         "--phases", "perfpy", "--duration", "3", "--warmup", "1", "--no-script",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \| [+-][\d.]+ \|$", proc.stdout, re.M)}
    stock_ms, addon_ms = rows["pyspnego (NTLM messages and crypto)"]
    assert stock_ms == 0 and addon_ms > 0, proc.stdout
    assert rows["this addon"][0] == 0 and rows["this addon"][1] > 0, proc.stdout
    assert min(rows["mitmproxy"]) > 0, proc.stdout
    assert not list(out.glob("*.data")) and not (out / "perf-buildids").exists()
    assert set(Path("/tmp").glob("jitted-*.so")) <= jitted_before


def test_ab_cpu_runs_each_tree_against_its_parent(tmp_path: Path) -> None:
    """bench/ab_cpu.py, one short round: with --open-parent-a, A goes to the parent that asks
    for no logon and B to the NTLM Squid, each with its own --set (the pool off: every client
    connection of B logs on in the round, so the Squid's 407s are B's alone)."""
    missing = [t for t in ("nginx", "squid", "wrk", "hey") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab_cpu.py"), "--a", ".", "--b", ".",
         "--no-stock", "--modes", "keepalive", "--rounds", "1", "--duration", "1",
         "--warmup", "0.5", "--open-parent-a", "--a-set", "ntlm_pool=false",
         "--b-set", "ntlm_pool=false", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parents: A against the open Squid, B the NTLM Squid" in proc.stdout
    assert "A only: --set ntlm_pool=false" in proc.stdout
    rounds = {r["contender"]: r for r in json.loads(out.read_text())["rounds"]}
    assert set(rounds) == {"A", "B"}
    assert rounds["A"]["requests"] > 0 and rounds["B"]["requests"] > 0
    assert rounds["A"]["handshakes"] == 0, rounds["A"]
    assert rounds["B"]["handshakes"] > 0, rounds["B"]


def test_profile_cpu_can_put_the_addon_in_stocks_place(tmp_path: Path) -> None:
    """bench/profile_cpu.py --stock-is-addon-with: the 'stock' column is the addon with that
    option, so one option's cost goes through every phase. Under cProfile the 'stock' run
    carried requests through the addon's engine without lending (ntlm_pool=false), the
    'addon' run lent its parent connection after each response."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    out = tmp_path / "profile"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_cpu.py"), "--modes", "keepalive",
         "--phases", "cprofile", "--duration", "1", "--warmup", "0.5", "--no-script",
         "--stock-is-addon-with", "ntlm_pool=false", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the 'stock' column is the addon with --set ntlm_pool=false" in proc.stdout

    def calls(prof: str, module: str, function: str) -> int:
        stats = pstats.Stats(str(out / prof)).stats  # type: ignore[attr-defined]
        return sum(row[1] for (file, _, func), row in stats.items()
                   if file.endswith(module) and func == function)

    assert calls("keepalive-stock.prof", "mitmproxy_ntlm/engine.py", "from_child") > 0
    assert calls("keepalive-stock.prof", "mitmproxy_ntlm/pool/lending.py", "lend") == 0
    assert calls("keepalive-addon.prof", "mitmproxy_ntlm/pool/lending.py", "lend") > 0


def test_ab_cpu_names_why_a_contender_did_not_start(tmp_path: Path) -> None:
    """A contender that stops at start-up (here A's bogus --set) ends ab_cpu with mitmdump's
    own error, not with the import log PYTHONVERBOSE writes around it."""
    missing = [t for t in ("nginx", "squid") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools not installed: {', '.join(missing)}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab_cpu.py"), "--a", ".", "--b", ".",
         "--no-stock", "--modes", "keepalive", "--rounds", "1", "--duration", "1",
         "--a-set", "ntlm_pool=maybe"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:]
    error = proc.stderr.strip().splitlines()[-3:]
    assert any("ntlm_pool='maybe' is not accepted" in line for line in error), error
    assert not any(line.startswith(("#", "import ")) for line in error), error
