"""bench/profile_cpu.py's perfpy phase: who owns a sample of perf's Python-aware stacks.

Sans-I/O: `perf script -F ip,sym` text in (the shape perf 6.1 prints for Python 3.13's JIT
frames, innermost first), owners and functions out. The phase itself, against real mitmdumps
under perf, runs in tests/test_bench.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import profile_cpu  # noqa: E402

SITE = "/venv/lib/python3.13/site-packages"
STDLIB = "/usr/lib/python3.13"


def frame(sym: str, ip: str = "2bc5f0") -> str:
    return f"\t{ip:>16} {sym}"


def py(qualname: str, path: str) -> str:
    return frame(f"py::{qualname}:{path}", "85")


SAMPLES = "\n\n".join([
    # an NTLM message built in pyspnego, called from the addon's engine: pyspnego's
    "\n".join([frame("_PyObject_Malloc"), frame("_PyEval_EvalFrameDefault"),
               py("Negotiate.__init__", f"{SITE}/spnego/_ntlm_raw/messages.py"),
               frame("py_trampoline_evaluator"),
               py("AuthEngine.start_connect", "/src/addons/mitmproxy_ntlm/engine.py"),
               py("Layer.handle_event", f"{SITE}/mitmproxy/proxy/layer.py")]),
    # the addon's own code, under mitmproxy's layers
    "\n".join([frame("_PyDict_GetItem"),
               py("HandshakeTrace._stage", "/src/addons/mitmproxy_ntlm/trace.py"),
               py("Layer.handle_event", f"{SITE}/mitmproxy/proxy/layer.py")]),
    # a full collection triggered while mitmproxy allocated: the collector's
    "\n".join([frame("gc_collect_main"), frame("_Py_RunGC"),
               frame("_PyEval_EvalFrameDefault"),
               py("Layer.handle_event", f"{SITE}/mitmproxy/proxy/layer.py")]),
    # a send in the kernel, below asyncio's transport
    "\n".join([frame("__x64_sys_sendto", "ffffffff81000000"), frame("sock_sendmsg"),
               py("_SelectorSocketTransport.write", f"{STDLIB}/asyncio/selector_events.py"),
               py("ConnectionHandler.server_event", f"{SITE}/mitmproxy/proxy/server.py")]),
    # mitmproxy's own
    "\n".join([frame("_PyEval_EvalFrameDefault"),
               py("AddonManager._iter_hooks", f"{SITE}/mitmproxy/addonmanager.py")]),
    # the standard library's enum, for pyspnego: pyspnego's
    "\n".join([py("Flag.__and__", f"{STDLIB}/enum.py"),
               py("NTLMProxy._step_initiate", f"{SITE}/spnego/_ntlm.py"),
               py("AuthEngine._send_leg3", "/src/addons/mitmproxy_ntlm/engine.py")]),
    # contextlib for mitmproxy: mitmproxy's
    "\n".join([py("_GeneratorContextManager.__exit__", f"{STDLIB}/contextlib.py"),
               py("AddonManager.trigger_event", f"{SITE}/mitmproxy/addonmanager.py")]),
    # another installed package, and the standard library with nothing above it
    "\n".join([py("Tree.add", f"{SITE}/sortedcontainers/sortedlist.py"),
               py("Layer.handle_event", f"{SITE}/mitmproxy/proxy/layer.py")]),
    "\n".join([py("Thread.run", f"{STDLIB}/threading.py")]),
    # no Python frame at all (a C thread)
    "\n".join([frame("start_thread"), frame("clone3")]),
])


def test_each_sample_goes_to_its_innermost_python_frame() -> None:
    owners, functions, total = profile_cpu.perfpy_count(SAMPLES.splitlines())
    assert total == 10
    assert owners == {
        "pyspnego (NTLM messages and crypto)": 2,
        "this addon": 1,
        profile_cpu.PERFPY_COLLECTOR: 1,
        "asyncio: event loop, sockets": 1,
        "mitmproxy": 2,
        profile_cpu.PERFPY_PACKAGES: 1,
        profile_cpu.PERFPY_STDLIB: 1,
        profile_cpu.PERFPY_NO_FRAME: 1,
    }
    assert functions["HandshakeTrace._stage (ntlm:trace.py)"] == 1
    assert functions["AddonManager._iter_hooks (mitmproxy:addonmanager.py)"] == 1
    assert functions["Negotiate.__init__ (pkg:spnego/_ntlm_raw/messages.py)"] == 1
    assert functions["Flag.__and__ (stdlib:enum.py)"] == 1  # the function is the innermost


def test_a_last_sample_without_a_blank_line_counts_and_blank_runs_do_not() -> None:
    text = "\n\n\n" + SAMPLES + "\n\n\n"
    assert profile_cpu.perfpy_count(text.splitlines())[2] == 10
    assert profile_cpu.perfpy_count(SAMPLES.rstrip("\n").splitlines())[2] == 10
