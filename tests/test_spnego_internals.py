"""pyspnego without its Kerberos packages until Kerberos is used (issue 24: idle memory).

Each check runs in a fresh interpreter: whether gssapi is loaded depends on what the process
imported before, and the test process imports pyspnego directly elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mitmproxy_ntlm.spnego_internals import kerberos_installed

ADDONS = Path(__file__).resolve().parent.parent / "addons"

pytestmark = pytest.mark.skipif(not kerberos_installed(),
                                reason="the Kerberos extra is not installed")

GLOBALS = """
import json, sys
import spnego._gss, spnego._negotiate, spnego.auth, spnego.exceptions
def describe(v):
    return f"{type(v).__name__} {getattr(v, '__module__', '')}.{getattr(v, '__qualname__', '')}"
found = {name: {k: describe(v) for k, v in vars(m).items() if not k.startswith("__")}
         for name, m in list(sys.modules.items()) if name.partition(".")[0] == "spnego"}
found["same class everywhere"] = [spnego.auth.GSSAPIProxy is spnego._gss.GSSAPIProxy,
                                  spnego._negotiate.GSSAPIProxy is spnego._gss.GSSAPIProxy,
                                  spnego._gss.NativeError is spnego.exceptions.GSSError]
print(json.dumps(found))
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ADDONS), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_an_ntlm_logon_leaves_the_kerberos_packages_unloaded() -> None:
    out = run("""
import sys
from mitmproxy_ntlm.script import new_group
from mitmproxy_ntlm.credentials import Credentials, hashes_from_password
from mitmproxy_ntlm.handshake import Dialect, NtlmHandshake
new_group()
lm, nt = hashes_from_password("Secret-Pass-1")
creds = Credentials("alice", "CORP", "WS", nt_hash=nt, lm_hash=lm)
assert NtlmHandshake(creds, Dialect.NTLMV2, "proxy").negotiate().startswith(b"NTLMSSP")
print([name for name in ("gssapi", "krb5") if name in sys.modules])
""")
    assert out == "[]"


def test_loading_kerberos_binds_what_pyspnegos_own_import_binds() -> None:
    """Every global of every pyspnego module, as a plain import with gssapi installed has it."""
    plain = json.loads(run(GLOBALS))
    before = json.loads(run("import mitmproxy_ntlm.spnego_internals\n" + GLOBALS))
    after = json.loads(run("from mitmproxy_ntlm.spnego_internals import load_kerberos\n"
                           "assert load_kerberos()\n" + GLOBALS))
    assert plain["spnego._gss"]["HAS_GSSAPI"].startswith("bool")
    assert "gssapi" in plain["spnego._gss"] and "gssapi" not in before["spnego._gss"]
    assert before["spnego.exceptions"]["GSSError"] != plain["spnego.exceptions"]["GSSError"]
    shared = plain.keys() & after.keys()
    assert {"spnego", "spnego._gss", "spnego.auth", "spnego._negotiate"} <= shared
    assert {name: after[name] for name in shared} == {name: plain[name] for name in shared}
    assert after["same class everywhere"] == [True, True, True]


def test_a_kerberos_logon_after_the_late_load_fails_for_its_real_reason() -> None:
    """No ticket cache here: the reason comes from GSSAPI (not a NameError in pyspnego)."""
    out = run("""
import os, sys
os.environ["KRB5CCNAME"] = "FILE:/nonexistent/mitmproxy-ntlm-test"
from mitmproxy_ntlm.kerberos import KerberosHandshake, KerberosUnavailable, Ticket
assert "gssapi" not in sys.modules
ticket = Ticket(ccache="FILE:/nonexistent/mitmproxy-ntlm-test", principal="alice@CORP.TEST",
                expires=0.0, source="test")
try:
    KerberosHandshake(ticket, "HTTP", "proxy.corp.test").negotiate()
except KerberosUnavailable as e:
    print(type(e).__name__, "gssapi" in sys.modules, e)
""")
    assert out.startswith("KerberosUnavailable True no service ticket for HTTP/proxy.corp.test")
    assert "NameError" not in out and "not defined" not in out


def test_looking_for_a_ticket_in_a_missing_cache_file_loads_nothing() -> None:
    """`ntlm_scheme` auto asks for a ticket before it has seen the parent's schemes."""
    out = run("""
import sys
from mitmproxy_ntlm.kerberos import KerberosSettings, KerberosTickets, KerberosUnavailable
tickets = KerberosTickets(KerberosSettings(ccache="FILE:/nonexistent/mitmproxy-ntlm-test"))
try:
    tickets.ticket(None, multiuser=False)
except KerberosUnavailable as e:
    print([name for name in ("gssapi", "krb5") if name in sys.modules], e)
""")
    assert out == ("[] no ticket in FILE:/nonexistent/mitmproxy-ntlm-test "
                   "(/nonexistent/mitmproxy-ntlm-test does not exist); run kinit or set "
                   "ntlm_kerberos_keytab")
