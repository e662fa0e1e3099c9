"""Where the addon's CPU per request goes, next to stock mitmdump (issue 24).

    python bench/profile_cpu.py --modes keepalive,c200,connect-ka --duration 8 --out /tmp/prof

Why: instruction counts under valgrind (bench/instructions.py) hide the kernel and the event
loop's per-turn costs, and those are where a proxy's time goes on small requests. So both
mitmdumps (stock against the open Squid, the addon against the NTLM Squid: bench/compare.py's
stack and contenders, bench/ab_cpu.py's load modes) run side by side and each gets the same
load several times, under one observer at a time:

- ``plain`` rounds (alternating order): user and system CPU from /proc, and ``perf stat`` of
  software counters and syscall tracepoints (counted in the kernel: no slow-down), per request.
  ``epoll_wait`` calls are the event loop's turns (asyncio's ``_run_once`` selects once).
- ``perf``: ``perf record -g`` (cpu-clock, kernel stacks): kernel against user time, the
  shared objects, the kernel's syscall entry points (inclusive).
- ``pyspy``: ``py-spy record --nonblocking`` (raw stacks): own time by source file, and the
  inclusive time of this package's functions, as milliseconds per request (the share of
  samples times the plain rounds' CPU per request).
- ``strace``: ``strace -c -f`` for every syscall's count per request (ptrace slows the process
  several times, so the loop batches more per turn: read epoll_wait from ``plain``).
- ``cprofile``: a second pair of mitmdumps under cProfile (times inflated, call counts exact):
  Python calls per request, and the functions the addon calls more often than stock.
- ``perfpy`` (Python 3.13): ``perf record --call-graph dwarf`` of mitmdumps started with
  ``PYTHON_PERF_JIT_SUPPORT=1``, so every sample of CPU time, in the kernel or in C, carries
  the Python frames above it: each sample goes to the package of its innermost Python frame
  outside the standard library (this addon, pyspnego, cryptography, mitmproxy, asyncio...) or
  to the cycle collector, as milliseconds per request (share of samples x the window's own
  CPU per request). Unlike py-spy, perf samples CPU time only, so nothing is over-sampled
  while a thread waits. With perfpy among the phases, the mitmdumps run with perf's JIT
  support in every phase (about 1.15x the CPU per kept-alive request, for both).

Needs perf, strace and py-spy (``pip install py-spy``); a missing tool's section says so.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import compare
from ab_cpu import MODES, probe, run_load
from compare import Load, Running, raise_fd_limit, start_mitmdump, tree_pids

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("stock", "addon")
EMPTY_SCRIPT = "class NoHooks:\n    pass\n\n\naddons = [NoHooks()]\n"
"""The ``script`` contender: stock mitmdump with a script whose addon has no hooks, which is
what mitmproxy's walk of the addon chain costs for one script, per event."""
PHASES = ("plain", "perf", "pyspy", "strace", "cprofile", "perfpy")
DEFAULT_PHASES = PHASES[:5]  # perfpy needs Python 3.13 and starts the mitmdumps differently
SYSCALLS = ("sendto", "recvfrom", "epoll_wait", "epoll_ctl", "read", "write", "writev",
            "sendmsg", "recvmsg", "getsockopt", "setsockopt", "getpeername", "getsockname",
            "accept4", "connect", "close", "socket", "shutdown", "futex", "ioctl", "fcntl",
            "getpid", "getrandom", "mmap", "munmap", "brk", "madvise", "sched_yield")
KERNEL_ENTRIES = ("__x64_sys_sendto", "__x64_sys_recvfrom", "__x64_sys_epoll_wait",
                  "__x64_sys_epoll_ctl", "__x64_sys_close", "__x64_sys_accept4",
                  "__x64_sys_connect", "asm_sysvec_apic_timer_interrupt", "schedule")
SETTLE = 0.5  # seconds of counting after the load: closes and tails belong to the window
PYSPY_RATE = 400
PERFPY_RATE = 499  # dwarf stacks copy PERFPY_STACK bytes per sample
PERFPY_STACK = 32768  # mitmproxy's layers nest deep: less cuts off the outer Python frames


@dataclasses.dataclass
class Window:
    """One contender's load window under one observer."""

    mode: str
    contender: str
    phase: str
    round: int
    requests: int
    errors: int
    rps: float
    user_s: float
    sys_s: float
    counters: dict[str, float] = dataclasses.field(default_factory=dict)

    def per_req(self, value: float) -> float:
        return value / self.requests if self.requests else float("nan")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process tree of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += (int(stat[11]) + int(stat[13])) / tick
            system += (int(stat[12]) + int(stat[14])) / tick
    return user, system


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid``'s tree."""
    vol = invol = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("voluntary_ctxt_switches:"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            invol += int(line.split()[1])
    return vol, invol


def observer(phase: str, pid: int, seconds: float, out: Path) -> list[str] | None:
    """The command that watches ``pid`` for ``seconds`` (None: the plain rounds' perf stat)."""
    span = f"{seconds + SETTLE:.1f}"
    if phase == "plain":
        events = ["task-clock", "context-switches", "cpu-migrations", "page-faults",
                  "raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS)]
        return ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events),
                "-p", str(pid), "--", "sleep", span]  # fmt: skip
    if phase == "perf":
        return ["perf", "record", "-q", "-F", "999", "-g", "-o", str(out), "-p", str(pid),
                "--", "sleep", span]  # fmt: skip
    if phase == "perfpy":
        return ["perf", "record", "-q", "-N", "-F", str(PERFPY_RATE), "--call-graph",
                f"dwarf,{PERFPY_STACK}", "-k", "1", "-o", str(out), "-p", str(pid),
                "--", "sleep", span]  # fmt: skip
    if phase == "pyspy":
        spy = Path(sys.executable).parent / "py-spy"
        return [str(spy if spy.exists() else "py-spy"), "record", "--nonblocking", "-r",
                str(PYSPY_RATE), "-f", "raw", "-o", str(out), "-p", str(pid), "-d",
                str(max(1, round(seconds + SETTLE)))]  # fmt: skip
    if phase == "strace":
        return ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
    raise ValueError(phase)


def window(mode: str, c: Running, name: str, phase: str, rnd: int, st: compare.Stack,
           seconds: float, conns: int, out: Path) -> Window:
    """One load window on ``c`` with the phase's observer attached; its raw output in ``out``."""
    assert c.pid is not None
    cmd = observer(phase, c.pid, seconds, out)
    watcher = None
    if cmd is not None:
        watcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.4)  # attached before the first request
    u0, s0 = cpu_split(c.pid)
    v0, i0 = switches(c.pid)
    try:
        load = run_load(mode, c.proxy, st, seconds, conns)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"  {name} {mode} {phase}: load failed: {e}"[:300], flush=True)
        load = Load(errors=1, seconds=seconds)
    time.sleep(SETTLE)
    u1, s1 = cpu_split(c.pid)
    v1, i1 = switches(c.pid)
    if watcher is not None:
        if phase == "strace":
            watcher.send_signal(signal.SIGINT)
        try:
            _, err = watcher.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            watcher.kill()
            _, err = watcher.communicate()
        if watcher.returncode not in (0, -signal.SIGINT) and not out.exists():
            print(f"  {phase}: {err.decode(errors='replace').strip()[-300:]}", flush=True)
    w = Window(mode, name, phase, rnd, load.requests, load.errors, load.rps or 0.0,
               u1 - u0, s1 - s0)  # fmt: skip
    if phase == "plain" and out.exists():
        w.counters = parse_perf_stat(out.read_text())
    w.counters["voluntary"], w.counters["involuntary"] = v1 - v0, i1 - i0
    return w


def parse_perf_stat(text: str) -> dict[str, float]:
    """perf stat -x, lines: value,unit,event,... (task-clock in ms)."""
    counters = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            name = parts[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:", "")
            counters[name] = float(parts[0])
    return counters


# ----------------------------------------------------------------------------- reading profiles


def perf_report(data: Path) -> dict[str, object]:
    """Kernel share, top shared objects and symbols, syscall entries (inclusive)."""
    if not data.exists():
        return {"missing": True}

    def report(*args: str) -> list[tuple[float, str]]:
        r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-q", *args],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        rows = []
        for line in r.stdout.splitlines():
            if m := re.match(r"\s*([\d.]+)%\s+(?:[\d.]+%\s+)?(.+?)\s*$", line):
                rows.append((float(m.group(1)), m.group(2)))
        return rows

    dsos = report("--no-children", "--sort", "dso", "-g", "none")
    syms = report("--no-children", "--sort", "dso,sym", "-g", "none")
    children = report("--children", "--sort", "sym", "-g", "none")
    kernel = sum(p for p, d in dsos if "kernel" in d)
    entries = {}
    for pct, sym in children:
        name = sym.split()[-1]
        if name in KERNEL_ENTRIES and name not in entries:
            entries[name] = pct
    return {"kernel_pct": kernel, "dsos": dsos[:8], "symbols": syms[:20], "entries": entries}


PERFPY_OWNERS = (  # (owner, what a Python frame's file path contains)
    ("this addon", ("/mitmproxy_ntlm/",)),
    ("pyspnego (NTLM messages and crypto)", ("/spnego/",)),
    ("cryptography, pyOpenSSL (TLS, NTLM's hashes)", ("/cryptography/", "/OpenSSL/")),
    ("mitmproxy", ("/mitmproxy/", "/mitmproxy_rs/")),
    ("asyncio: event loop, sockets", ("/asyncio/", "/selectors.py", "/socket.py", "/ssl.py")),
)
PERFPY_COLLECTOR = "the cycle collector (gc)"
PERFPY_NO_FRAME = "no Python frame (start-up, other threads)"
PERFPY_PACKAGES = "other installed packages"
PERFPY_STDLIB = "the standard library alone"
GC_SYMBOLS = ("gc_collect", "_PyGC_Collect", "_Py_RunGC", "deduce_unreachable")


def perfpy_owner(frames: list[str]) -> tuple[str, str]:
    """A sample's owner and its innermost Python function (perf script's symbols, innermost
    first; jitted Python frames are ``py::qualname:path``). The owner is the package of the
    innermost Python frame that is not the standard library's (enum, contextlib, logging:
    their work belongs to whoever called them), asyncio counted as a package. A collection
    that runs inside some Python frame belongs to the collector, not to that frame."""
    python = [(i, sym[4:]) for i, sym in enumerate(frames) if sym.startswith("py::")]
    below_python = frames[:python[0][0]] if python else frames
    if any(f.startswith(GC_SYMBOLS) for f in below_python):
        return PERFPY_COLLECTOR, PERFPY_COLLECTOR
    if not python:
        return PERFPY_NO_FRAME, PERFPY_NO_FRAME
    func, _, path = python[0][1].partition(":")
    function = f"{func} ({short_file(path)})"
    for _, sym in python:
        path = sym.partition(":")[2]
        for owner, parts in PERFPY_OWNERS:
            if any(part in path for part in parts):
                return owner, function
        if "-packages/" in path:
            return PERFPY_PACKAGES, function
    return PERFPY_STDLIB, function


def perfpy_count(lines: Iterable[str]) -> tuple[collections.Counter[str],
                                                   collections.Counter[str], int]:
    """Samples by owner and by innermost Python function, and all samples, from
    ``perf script -F ip,sym`` (one frame per line, a blank line after each sample)."""
    owners: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    frames: list[str] = []
    for line in (*lines, ""):
        parts = line.split(None, 1)
        if parts:
            frames.append(parts[1].strip() if len(parts) > 1 else "?")
            continue
        if frames:
            owner, function = perfpy_owner(frames)
            owners[owner] += 1
            functions[function] += 1
            total += 1
            frames = []
    return owners, functions, total


def perfpy_report(data: Path, pid: int) -> dict[str, object]:
    """perf's samples of one window, its JIT records (the Python frames) injected first."""
    if not data.exists():
        return {"missing": True}
    # perf keeps a copy of every jitted function it writes out (thousands) in its build-id
    # cache, ~/.debug unless told otherwise: a directory of our own, removed below
    perf = ["perf", "--buildid-dir", str(data.parent / "perf-buildids")]
    injected = data.with_suffix(".jit.data")
    try:
        subprocess.run([*perf, "inject", "--jit", "-i", str(data), "-o", str(injected)],
                       capture_output=True, timeout=600, check=True)  # fmt: skip
        with subprocess.Popen([*perf, "script", "-F", "ip,sym", "-i", str(injected)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              errors="replace") as script:  # fmt: skip
            assert script.stdout is not None
            owners, functions, total = perfpy_count(script.stdout)
    except (OSError, subprocess.SubprocessError) as e:
        return {"missing": True, "error": str(e)[-300:]}
    finally:  # hundreds of MB: the raw samples, the jitted code perf inject wrote out
        for path in (data, injected, *Path("/tmp").glob(f"jitted-{pid}-*.so")):
            path.unlink(missing_ok=True)
        shutil.rmtree(data.parent / "perf-buildids", ignore_errors=True)
    return {"total": total, "owners": owners.most_common(),
            "functions": functions.most_common(300)}


TASK_BASES = frozenset({"ntlm:pool/lending.py:open_connection",
                        "ntlm:pool/lending.py:_open_pooled"})
"""Frames under which a pooled parent connection's whole reading task runs (mitmproxy's)."""
PASS_THROUGH = TASK_BASES | {f"ntlm:pool/lending.py:ParentStreams.{m}"
                             for m in ("read", "write", "drain", "is_closing", "get_extra_info")}
"""Our streams' methods that hand mitmproxy's read or write to asyncio's streams: what runs
below them is the work stock mitmdump does too; their own time is the pool's."""
BUCKETS = (  # (bucket, modules of this package that enter it), first match of the entry frame
    ("our hooks and policy", ("addon.py", "routing.py", "access.py", "origin.py",
                              "proxy_credentials.py", "script.py", "multiuser.py", "memory.py")),
    ("engine and wire framing", ("engine.py", "wire.py", "pool/reuse.py")),
    ("pool lending", ("pool/",)),
)


def bucket(frames: list[tuple[str, str]]) -> str:
    """Who a sample's own work belongs to. The code below the last mitmproxy frame is the
    sample's owner: mitmproxy's if none of ours runs there (also when our layer merely passes
    an event on to mitmproxy's layers), else ours, named by what our code there does."""
    last = max((i for i, (func, f) in enumerate(frames) if f.startswith("mitmproxy:")
                or (f"{f}:{func}" in PASS_THROUGH and i < len(frames) - 1)), default=-1)
    tail = [f for _, f in frames[last + 1:]]
    ours = [f[5:] for f in tail if f.startswith("ntlm:")]
    if frames[-1][0] in IN_SYSCALL:
        return IN_KERNEL
    if not ours:
        leaf = frames[-1][1]
        if leaf.startswith("asyncio/") or leaf in ("stdlib:selectors.py", "stdlib:socket.py"):
            return "asyncio: event loop, streams, sockets"
        if any(f == "mitmproxy:addonmanager.py" for _, f in frames):
            return "mitmproxy: hook dispatch (addonmanager, all addons' hooks)"
        if any(f.startswith("ntlm:") for _, f in frames[:last + 1]):
            return "mitmproxy: layers under our layer"
        return "mitmproxy: everything else"
    for name, modules in BUCKETS:
        if ours[0].startswith(modules):
            return name
    for name, modules in BUCKETS[1:]:
        if any(o.startswith(modules) for o in ours):
            return name
    return "our layer glue (layers/, policy lookups)"


IN_KERNEL = "in a socket or epoll syscall (time: see perf and sys ms/req)"
IN_SYSCALL = frozenset({"_SelectorSocketTransport.write", "_SelectorSocketTransport._read_ready",
                        "_SelectorSocketTransport._read_ready__data_received",
                        "_SelectorSocketTransport._read_ready__get_buffer",
                        "EpollSelector.select", "BaseSelectorEventLoop._sock_recv"})
"""Python functions whose own samples are their send/recv/epoll call. py-spy --nonblocking
over-samples them (a stack read while the thread sits in the kernel is never torn), so the
owners' milliseconds are their share of the other samples times the user CPU per request."""
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def short_file(path: str) -> str:
    """A source file as a readable group: this package's module, mitmproxy's, stdlib's."""
    if "mitmproxy_ntlm/" in path:
        return "ntlm:" + path.split("mitmproxy_ntlm/", 1)[1]
    if path.startswith("mitmproxy/") or "/mitmproxy/" in path:
        return "mitmproxy:" + path.split("mitmproxy/", 1)[1]
    if "asyncio/" in path:
        return "asyncio/" + path.split("asyncio/", 1)[1]
    if "site-packages/" in path:
        return "pkg:" + path.split("site-packages/", 1)[1]
    return "stdlib:" + path.rsplit("/", 1)[-1] if path else "?"


def pyspy_report(raw: Path) -> dict[str, object]:
    """Own samples by file and by function, inclusive samples of this package's functions."""
    if not raw.exists():
        return {"missing": True}
    own_file: collections.Counter[str] = collections.Counter()
    own_func: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    ours_any = total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for text in stack.split(";"):
            m = FRAME.match(text.strip())
            if m:
                frames.append((m.group("func"), short_file(m.group("file"))))
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        own_file[file] += count
        own_func[f"{file}:{func}"] += count
        buckets[bucket(frames)] += count
        names = {f"{fl}:{fn}" for fn, fl in frames}
        for name in names:
            inclusive[name] += count
        seen = {n for n in names if n.startswith("ntlm:") and n not in TASK_BASES}
        for name in seen:
            ours[name] += count
        ours_any += count if seen else 0
    return {"total": total, "ours_any": ours_any, "files": own_file.most_common(40),
            "funcs": own_func.most_common(40), "ours": ours.most_common(25),
            "inclusive": inclusive.most_common(400), "buckets": buckets.most_common()}


Counts = dict[str, tuple[int, float]]


def cprofile_counts(prof: Path) -> Counts:
    """Calls and own seconds of every function in a cProfile dump."""
    import pstats

    if not prof.exists():
        return {}
    out = {}
    for (filename, line, func), row in pstats.Stats(str(prof)).stats.items():  # type: ignore
        name = f"{short_file(filename)}:{line}:{func}" if filename != "~" else func
        calls, own = out.get(name, (0, 0.0))
        out[name] = (calls + row[1], own + row[2])
    return out


def start_contender(st: compare.Stack, stack_cfg: compare.Config, name: str, label: str,
                    profile: Path | None, stock_sets: tuple[str, ...]) -> Running:
    """``name``'s mitmdump: the addon, or stock (the addon with ``stock_sets`` when given)."""
    if name == "stock" and stock_sets:
        stack_cfg = dataclasses.replace(stack_cfg, addon_sets=stock_sets)
    return start_mitmdump(st, stack_cfg, label, name == "addon" or bool(stock_sets), False,
                          profile)


def cprofile_run(st: compare.Stack, stack_cfg: compare.Config, name: str, prof: Path,
                 load_it: Callable[[str], Load] | None, pinned: bool,
                 stock_sets: tuple[str, ...] = ()) -> tuple[Counts, Load]:
    """One mitmdump under cProfile: start-up, ``load_it(proxy)`` if given, shut-down."""
    prof.unlink(missing_ok=True)
    r = start_contender(st, stack_cfg, name, f"cprof-{name}", prof, stock_sets)
    pin(r.pid, pinned)
    try:
        load = load_it(r.proxy) if load_it is not None else Load()
    finally:
        r.stop()
    return cprofile_counts(prof), load


def cprofile_phase(mode: str, st: compare.Stack, cfg: Config, stack_cfg: compare.Config
                   ) -> dict[str, dict[str, list[float]]]:
    """Each contender twice more under cProfile, idle and loaded: the difference, per request,
    of every function called about once a request or more."""
    result = {}
    for name in ("stock", "addon"):
        idle, _ = cprofile_run(st, stack_cfg, name, cfg.out / f"{mode}-{name}-idle.prof", None,
                               cfg.pin, cfg.stock_sets)
        loaded, load = cprofile_run(
            st, stack_cfg, name, cfg.out / f"{mode}-{name}.prof",
            lambda proxy: run_load(mode, proxy, st, cfg.duration, cfg.connections), cfg.pin,
            cfg.stock_sets)
        print(f"{mode:<10} cprof  {name:<5} req {load.requests:>6} err {load.errors:>3} "
              f"req/s {load.rps or 0:7.0f} (under cProfile)", flush=True)
        per: dict[str, list[float]] = {}
        for func, (calls, own) in loaded.items():
            calls0, own0 = idle.get(func, (0, 0.0))
            if load.requests and calls - calls0 >= load.requests / 2:
                per[func] = [(calls - calls0) / load.requests,
                             1000 * (own - own0) / load.requests]
        result[name] = per
    return result


def strace_report(text_file: Path) -> dict[str, int]:
    """calls per syscall from strace -c's table."""
    calls: dict[str, int] = {}
    if not text_file.exists():
        return calls
    for line in text_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                calls[parts[-1]] = int(parts[3])
    return calls


# ----------------------------------------------------------------------------- summary


def median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    return values[len(values) // 2] if values else float("nan")


def plain_figures(ws: list[Window]) -> dict[str, float]:
    """Per-request figures of a contender's plain rounds (medians over rounds)."""
    fig: dict[str, list[float]] = collections.defaultdict(list)
    for w in ws:
        fig["req/s"].append(w.rps)
        fig["user ms/req"].append(1000 * w.per_req(w.user_s))
        fig["sys ms/req"].append(1000 * w.per_req(w.sys_s))
        fig["CPU ms/req"].append(1000 * w.per_req(w.user_s + w.sys_s))
        for key, label in (("task-clock", "task-clock ms/req"), ("sys_enter", "syscalls/req"),
                           ("context-switches", "context switches/req"),
                           ("voluntary", "voluntary switches/req"),
                           ("involuntary", "involuntary switches/req"),
                           ("page-faults", "page faults/req")):  # fmt: skip
            if key in w.counters:
                fig[label].append(w.per_req(w.counters[key]))
        for s in SYSCALLS:
            if s in w.counters:
                fig[f"{s}/req"].append(w.per_req(w.counters[s]))
    return {k: median(v) for k, v in fig.items()}


def fmt(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def perfpy_summary(prof: dict[str, dict[str, object]], cpu: dict[str, float],
                   ws: list[Window]) -> list[str]:
    """The perfpy phase's owners and functions as ms/request: each one's share of the
    window's samples times that window's CPU per request (perf's JIT support and its copying
    of stacks included: both contenders pay them), so the rows add up to the window's gap;
    the plain rounds' CPU per request when the window has none."""
    runs = {n: prof.get(f"{n}/perfpy", {}) for n in CONTENDERS}
    if not all(r.get("total") for r in runs.values()):
        return []
    scale, window_cpu = {}, {}
    for n in CONTENDERS:
        own = [w for w in ws if w.contender == n and w.phase == "perfpy" and w.requests]
        window_cpu[n] = 1000 * own[0].per_req(own[0].user_s + own[0].sys_s) if own else cpu[n]
        scale[n] = window_cpu[n] / runs[n]["total"]  # type: ignore[operator]
    lines = ["", "perf with Python frames (perfpy): CPU by the package of the innermost Python "
             f"frame outside the standard library, ms/request ({runs['stock']['total']} and "
             f"{runs['addon']['total']} samples; the window's CPU per request: stock "
             f"{window_cpu['stock']:.3f}, addon {window_cpu['addon']:.3f}):", "",
             "| owner | stock | addon | addon - stock |", "|---|---|---|---|"]
    for table, top in (("owners", 12), ("functions", 25)):
        per = {n: {k: c * scale[n] for k, c in runs[n][table]}  # type: ignore[attr-defined]
               for n in CONTENDERS}
        keys = sorted(set(per["stock"]) | set(per["addon"]),
                      key=lambda k: -abs(per["addon"].get(k, 0) - per["stock"].get(k, 0)))
        if table == "functions":
            lines += ["", "perfpy: own CPU of the innermost Python function, largest "
                      "differences (ms/request):", "",
                      "| function | stock | addon | addon - stock |", "|---|---|---|---|"]
        for k in keys[:top]:
            a, s = per["addon"].get(k, 0.0), per["stock"].get(k, 0.0)
            lines.append(f"| {k} | {s:.3f} | {a:.3f} | {a - s:+.3f} |")
    return lines


def mode_summary(mode: str, ws: list[Window], prof: dict[str, dict[str, object]],
                 stracecalls: dict[str, tuple[dict[str, int], int]],
                 calls: dict[str, dict[str, list[float]]]) -> str:
    """Markdown for one mode: the plain table, then perf, py-spy and strace differences."""
    figs = {n: plain_figures([w for w in ws if w.contender == n and w.phase == "plain"])
            for n in (*CONTENDERS, "script")}
    script = figs["script"]
    head = "| per request | stock | addon | addon - stock | addon / stock |"
    lines = [f"### {mode}", "", head + (" stock+script - stock |" if script else ""),
             "|---|---|---|---|---|" + ("---|" if script else "")]
    keys = [k for k in figs["stock"] if k in figs["addon"]]
    for k in keys:
        a, s = figs["addon"][k], figs["stock"][k]
        if k.endswith("/req") and max(abs(a), abs(s)) < 0.005:
            continue
        ratio = a / s if s else float("nan")
        row = f"| {k} | {fmt(s)} | {fmt(a)} | {fmt(a - s)} | {ratio:.2f} |"
        if script:
            row += f" {fmt(script.get(k, float('nan')) - s)} |"
        lines.append(row)
    cpu = {n: figs[n].get("CPU ms/req", float("nan")) for n in CONTENDERS}
    for n in CONTENDERS:
        p = prof.get(f"{n}/perf", {})
        if p and not p.get("missing"):
            ent = ", ".join(f"{k.replace('__x64_sys_', '')} {v:.1f}%"
                            for k, v in p["entries"].items())  # type: ignore[union-attr]
            top = ", ".join(f"{sym.split()[-1]} {pct:.1f}%"
                            for pct, sym in p["symbols"][:8])  # type: ignore[union-attr]
            lines.append(f"\nperf {n}: kernel {p['kernel_pct']:.1f}% of samples; inclusive: "
                         f"{ent}; top symbols: {top}")
    spy = {n: prof.get(f"{n}/pyspy", {}) for n in CONTENDERS}
    if all(s and not s.get("missing") and s.get("total") for s in spy.values()):
        lines += ["", "py-spy, own time by file, ms/request (share of samples x CPU ms/req):",
                  "", "| file | stock | addon | addon - stock |", "|---|---|---|---|"]
        per = {n: {f: c / spy[n]["total"] * cpu[n] for f, c in spy[n]["files"]}  # type: ignore
               for n in CONTENDERS}
        files = sorted(set(per["stock"]) | set(per["addon"]),
                       key=lambda f: -(per["addon"].get(f, 0) - per["stock"].get(f, 0)))
        for f in files[:14]:
            a, s = per["addon"].get(f, 0.0), per["stock"].get(f, 0.0)
            lines.append(f"| {f} | {s:.3f} | {a:.3f} | {a - s:+.3f} |")
        inc = {n: {f: c / spy[n]["total"] * cpu[n] for f, c in spy[n]["inclusive"]}  # type: ignore
               for n in CONTENDERS}
        diff = sorted(set(inc["stock"]) | set(inc["addon"]),
                      key=lambda f: -(inc["addon"].get(f, 0) - inc["stock"].get(f, 0)))
        lines += ["", "py-spy, inclusive time by function, largest addon - stock (ms/request):",
                  "", "| function | stock | addon | addon - stock |", "|---|---|---|---|"]
        for f in diff[:20]:
            a, s = inc["addon"].get(f, 0.0), inc["stock"].get(f, 0.0)
            lines.append(f"| {f} | {s:.3f} | {a:.3f} | {a - s:+.3f} |")
        lines += ["", "py-spy, samples by owner: ms/request of user CPU (share of the samples "
                  "outside syscalls x user ms/req); the syscall row is % of all samples:", "",
                  "| owner | stock | addon | addon - stock |", "|---|---|---|---|"]
        user = {n: figs[n].get("user ms/req", float("nan")) for n in CONTENDERS}
        own = {}
        for n in CONTENDERS:
            counts = dict(spy[n]["buckets"])  # type: ignore[call-overload]
            rest = sum(c for b, c in counts.items() if b != IN_KERNEL) or 1
            own[n] = {b: (c / rest * user[n] if b != IN_KERNEL else c / spy[n]["total"] * 100)
                      for b, c in counts.items()}  # type: ignore[operator]
        for b in sorted(set(own["stock"]) | set(own["addon"]),
                        key=lambda b: -own["addon"].get(b, 0)):
            a, s = own["addon"].get(b, 0.0), own["stock"].get(b, 0.0)
            lines.append(f"| {b} | {s:.3f} | {a:.3f} | {a - s:+.3f} |")
        total_a = spy["addon"]["total"]
        ours_ms = spy["addon"]["ours_any"] / total_a * cpu["addon"]  # type: ignore[operator]
        lines += ["", f"addon: stacks with a frame of this package (not counting "
                  f"the pooled connection's task base): {ours_ms:.3f} ms/req; inclusive per "
                  "function (ms/req):", ""]
        for name, count in spy["addon"]["ours"][:12]:  # type: ignore[index]
            lines.append(f"- {name}: {count / total_a * cpu['addon']:.3f}")
    lines += perfpy_summary(prof, cpu, ws)
    if all(n in stracecalls for n in CONTENDERS):
        lines += ["", "strace -c, calls per request (ptrace-slowed: batching differs):", "",
                  "| syscall | stock | addon |", "|---|---|---|"]
        per_s = {n: {k: v / max(1, stracecalls[n][1]) for k, v in stracecalls[n][0].items()}
                 for n in CONTENDERS}
        names = sorted(set(per_s["stock"]) | set(per_s["addon"]),
                       key=lambda k: -max(per_s["stock"].get(k, 0), per_s["addon"].get(k, 0)))
        for k in names[:10]:
            lines.append(f"| {k} | {per_s['stock'].get(k, 0):.2f} | "
                         f"{per_s['addon'].get(k, 0):.2f} |")
    if all(calls.get(n) for n in CONTENDERS):
        total = {n: sum(v[0] for v in calls[n].values()) for n in CONTENDERS}
        lines += ["", f"cProfile: Python calls per request (functions called at least every "
                  f"other request): stock {total['stock']:.0f}, addon {total['addon']:.0f}. "
                  "Most added calls (own ms/req under cProfile, inflated):", "",
                  "| function | stock calls/req | addon calls/req | addon own ms/req |",
                  "|---|---|---|---|"]
        names = sorted(set(calls["stock"]) | set(calls["addon"]),
                       key=lambda f: -(calls["addon"].get(f, [0, 0])[0]
                                       - calls["stock"].get(f, [0, 0])[0]))
        for f in names[:25]:
            a, s = calls["addon"].get(f, [0.0, 0.0]), calls["stock"].get(f, [0.0, 0.0])
            lines.append(f"| {f} | {s[0]:.2f} | {a[0]:.2f} | {a[1]:.3f} |")
        ours = sorted(((f, v) for f, v in calls["addon"].items() if f.startswith("ntlm:")),
                      key=lambda fv: -fv[1][1])
        lines += ["", "cProfile: this package's functions, calls and own ms per request "
                  "(inflated): " + ", ".join(f"{f[5:]} {v[0]:.1f}x {v[1]:.3f}"
                                             for f, v in ours[:20])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def start_script_contender(st: compare.Stack, out: Path) -> Running:
    """Stock mitmdump (open parent) with the hook-less script: the cost of one script."""
    script = out / "no_hooks.py"
    script.write_text(EMPTY_SCRIPT)
    confdir = st.workdir / "mitm-prof-script"
    confdir.mkdir(exist_ok=True)
    port = compare.free_port()
    cmd = [compare.mitmdump_bin(), "-s", str(script), "--listen-host", "127.0.0.1", "-p",
           str(port), "--mode", f"upstream:{st.squid_open.url}"]  # fmt: skip
    for opt in (f"confdir={confdir}", "termlog_verbosity=warn", "flow_detail=0",
                "ssl_insecure=true", "stream_large_bodies=1m"):  # as compare's mitmdumps
        cmd += ["--set", opt]
    log = st.workdir / "prof-script.log"
    proc = compare.spawn(cmd, log, env=compare.client_env(), cwd=st.workdir)
    try:
        compare.wait_port(port, 60, proc)
    except (RuntimeError, TimeoutError) as e:
        compare.stop_proc(proc)
        raise RuntimeError(f"script: {e}: {compare.tail(log)}") from e
    return Running(f"http://127.0.0.1:{port}", proc.pid,
                   lambda: compare.stop_proc(proc, signal.SIGINT), log=log)


PINNED_CORE = 0


def pin(pid: int | None, enabled: bool) -> None:
    """``--pin``: a mitmdump on core 0 (its threads too), while this process, the load
    generators and the servers it starts keep to the other cores."""
    if enabled and pid is not None:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), {PINNED_CORE})


@contextlib.contextmanager
def perf_jit_support(enabled: bool) -> Iterator[None]:
    """Python 3.13 writes perf's JIT records (/tmp/jit-PID.dump) for the processes started
    here: only the mitmdumps, not the load generators."""
    if not enabled:
        yield
        return
    os.environ["PYTHON_PERF_JIT_SUPPORT"] = "1"
    try:
        yield
    finally:
        del os.environ["PYTHON_PERF_JIT_SUPPORT"]


@dataclasses.dataclass
class Config:
    modes: tuple[str, ...] = ("keepalive",)
    phases: tuple[str, ...] = DEFAULT_PHASES
    rounds: int = 3
    duration: float = 8.0
    warmup: float = 2.0
    connections: int = 8
    out: Path = Path("/tmp/profile_cpu")
    script: bool = True  # also stock + a hook-less script in the plain rounds
    pin: bool = False  # mitmdumps on core 0, everything else on the others
    stock_sets: tuple[str, ...] = ()  # --stock-is-addon-with: "stock" is the addon, so set


def run(cfg: Config) -> str:
    """Stack up, both mitmdumps up, every mode under every phase; the markdown summary."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    stack_cfg = compare.Config(size=1 << 20, children=32)
    windows: list[Window] = []
    sections = []
    with compare.stack(stack_cfg) as st:
        running: dict[str, Running] = {}
        try:
            plain_names = (*CONTENDERS, "script") if cfg.script else CONTENDERS
            for name in plain_names:
                with perf_jit_support("perfpy" in cfg.phases):
                    running[name] = start_script_contender(st, cfg.out) if name == "script" \
                        else start_contender(st, stack_cfg, name, f"prof-{name}", None,
                                             cfg.stock_sets)
                pin(running[name].pid, cfg.pin)
                for url in (st.nginx.url("/small"), st.nginx.url("/small", tls=True)):
                    if (status := probe(running[name], url)) != "200":  # type: ignore[arg-type]
                        raise RuntimeError(f"{name}: {url} answered {status}")
            for mode in cfg.modes:
                prof: dict[str, dict[str, object]] = {}
                straced: dict[str, tuple[dict[str, int], int]] = {}
                for name in plain_names:
                    run_load(mode, running[name].proxy, st, cfg.warmup, cfg.connections)
                outs: list[tuple[str, str, Window, Path]] = []
                calls: dict[str, dict[str, list[float]]] = {}
                for phase in cfg.phases:
                    if phase == "cprofile":
                        calls = cprofile_phase(mode, st, cfg, stack_cfg)
                        (cfg.out / f"{mode}-calls.json").write_text(json.dumps(calls))
                        continue
                    rounds = cfg.rounds if phase == "plain" else 1
                    names = plain_names if phase == "plain" else CONTENDERS
                    for rnd in range(rounds):
                        order = names if rnd % 2 == 0 else names[::-1]
                        for name in order:
                            out = cfg.out / f"{mode}-{name}-{phase}-{rnd}.txt"
                            w = window(mode, running[name], name, phase, rnd, st,
                                       cfg.duration, cfg.connections, out)  # fmt: skip
                            windows.append(w)
                            cpu = 1000 * w.per_req(w.user_s + w.sys_s)
                            print(f"{mode:<10} {phase:<6} {name:<5} round {rnd} req {w.requests:>6}"
                                  f" err {w.errors:>3} req/s {w.rps:7.0f} cpu/req {cpu:.3f} ms"
                                  f" (sys {1000 * w.per_req(w.sys_s):.3f})", flush=True)
                            outs.append((phase, name, w, out))
                for phase, name, w, out in outs:  # read after the load: no idle gaps between
                    if phase == "perf":
                        prof[f"{name}/perf"] = perf_report(out)
                    elif phase == "pyspy":
                        prof[f"{name}/pyspy"] = pyspy_report(out)
                    elif phase == "strace":
                        straced[name] = (strace_report(out), w.requests)
                    elif phase == "perfpy":
                        prof[f"{name}/perfpy"] = perfpy_report(out, running[name].pid)
                mine = [w for w in windows if w.mode == mode]
                sections.append(mode_summary(mode, mine, prof, straced, calls))
                (cfg.out / f"{mode}-summary.md").write_text(sections[-1] + "\n")
                (cfg.out / f"{mode}-profiles.json").write_text(json.dumps(prof, indent=1))
        finally:
            for r in running.values():
                r.stop()
                Path(f"/tmp/jit-{r.pid}.dump").unlink(missing_ok=True)  # perfpy's JIT records
    (cfg.out / "windows.json").write_text(
        json.dumps([dataclasses.asdict(w) for w in windows], indent=1))
    return "\n\n".join(sections)


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="keepalive", help=f"comma list of {','.join(MODES)}")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                   help=f"comma list of {PHASES} (perfpy: Python 3.13)")
    p.add_argument("--rounds", type=int, default=3, help="plain rounds per contender")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per window")
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds per mode")
    p.add_argument("--connections", type=int, default=8, help="clients (c200: always 200)")
    p.add_argument("--out", type=Path, default=Path("/tmp/profile_cpu"), help="raw outputs")
    p.add_argument("--no-script", action="store_true",
                   help="leave out stock mitmdump + a hook-less script (the plain rounds' third)")
    p.add_argument("--pin", action="store_true",
                   help="mitmdumps on CPU 0, the load generators and servers on the rest")
    p.add_argument("--stock-is-addon-with", action="append", default=[],
                   metavar="OPTION=VALUE",
                   help="the 'stock' column is the addon with this --set (repeatable), e.g. "
                        "ntlm_pool=false: what one option costs, under every phase")
    a = p.parse_args(argv)
    if a.pin:
        if (os.cpu_count() or 1) < 2:
            p.error("--pin needs two cores or more")
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))  # inherited by the load
    modes = tuple(m for m in a.modes.split(",") if m)
    phases = tuple(x for x in a.phases.split(",") if x)
    if bad := [m for m in modes if m not in MODES] + [x for x in phases if x not in PHASES]:
        p.error(f"unknown mode or phase: {bad}")
    for tool, phase in (("perf", "perf"), ("perf", "perfpy"), ("strace", "strace")):
        if phase in phases and shutil.which(tool) is None:
            p.error(f"{tool} is not installed (leave out the {phase} phase)")
    if "perfpy" in phases and sys.version_info < (3, 13):
        p.error("the perfpy phase needs Python 3.13 (perf's JIT records, PYTHON_PERF_JIT_"
                f"SUPPORT); this is {sys.version.split()[0]}")
    return Config(modes, phases, a.rounds, a.duration, a.warmup, a.connections, a.out,
                  not a.no_script, a.pin, tuple(a.stock_is_addon_with))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    meta = compare.meta_info()
    print(f"profile_cpu {meta['date']}, {meta['host']}, mitmproxy {meta['mitmproxy']}; "
          f"{cfg.rounds} plain rounds x {cfg.duration:g} s, {cfg.connections} clients",
          flush=True)  # fmt: skip
    if cfg.stock_sets:
        print(f"the 'stock' column is the addon with --set {' --set '.join(cfg.stock_sets)}",
              flush=True)
    try:
        summary = run(cfg)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"profile_cpu: {e}", file=sys.stderr)
        return 1
    print("\n" + summary)
    (cfg.out / "summary.md").write_text(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
