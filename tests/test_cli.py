"""`mitm-ntlm hash`, `detect`, `import-cntlm` against Debian's cntlm, real parents, mitmdump."""

from __future__ import annotations

import http.server
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ruamel.yaml
from mitmproxy.addons.modifyheaders import ModifyHeaders, parse_modify_spec
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons
from mitmproxy.utils import typecheck

from mitmproxy_ntlm import script
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_PRINCIPAL, TEST_USER, WRONG_PASSWORD
from tests.mitm import ADDON, BIN, Mitmdump, curl
from tests.servers import free_port

CLI = str(BIN / "mitm-ntlm")
NON_ASCII = "Pässwörd1"


def run_cli(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The installed `mitm-ntlm` entry point, password (if any) piped on stdin as UTF-8."""
    p = subprocess.run([CLI, *args], input=stdin.encode(), capture_output=True,
                       timeout=timeout, check=False)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(),
                                       p.stderr.decode())


def on_pty(argv: list[str], typed: bytes, timeout: float = 10) -> str:
    """Run `argv` with a pseudo-terminal as its controlling tty; type `typed` at the prompt.

    cntlm -H and getpass read the password from the terminal with echo off, like for a person.
    """
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if not sent and b"Password" in out:
                os.write(fd, typed + b"\n")
                sent = True
    finally:
        os.close(fd)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return out.decode("latin-1").replace("\r\n", "\n")


def cntlm_h(user: str, domain: str, typed: bytes) -> list[str]:
    """The PassLM/PassNT/PassNTLMv2 lines of Debian's `cntlm -H`, password typed on a tty."""
    cntlm = shutil.which("cntlm")
    if cntlm is None:
        pytest.skip("cntlm not installed (apt-get install cntlm)")
    # -c /dev/null: no /etc/cntlm.conf; -H only prints hashes and exits (no daemon).
    out = on_pty([cntlm, "-c", "/dev/null", "-H", "-u", user, "-d", domain], typed)
    return [line for line in out.splitlines() if re.match(r"Pass(LM|NT|NTLMv2) ", line)]


def hash_lines(user: str, domain: str, password: str) -> list[str]:
    r = run_cli("hash", "--user", user, "--domain", domain, stdin=password + "\n")
    assert r.returncode == 0, r.stderr
    assert password not in r.stdout + r.stderr
    return r.stdout.splitlines()


def pass_nt(lines: list[str]) -> str:
    return next(line.split()[1] for line in lines if line.startswith("PassNT "))


# --------------------------------------------------------------------------- hash


@pytest.mark.parametrize(
    ("user", "domain", "password"),
    [(TEST_USER, TEST_DOMAIN, TEST_PASSWORD), ("bob", "corp.example", "password")],
)
def test_hash_prints_what_cntlm_prints(user: str, domain: str, password: str) -> None:
    ours = hash_lines(user, domain, password)
    theirs = cntlm_h(user, domain, password.encode())
    assert len(theirs) == 3
    assert ours[:3] == theirs
    assert "cntlm's form" in "\n".join(ours[3:]) and "--standard" in "\n".join(ours[3:])


def test_hash_non_ascii_password_matches_cntlm_on_a_latin1_terminal() -> None:
    # cntlm widens each input byte to UTF-16, so its NT hash is the Windows one only when the
    # terminal sends Latin-1. PassLM is left out: LM of non-ASCII passwords depends on code
    # pages (cntlm upper-cases ASCII only); ours is pyspnego's, the same the addon computes.
    ours = hash_lines("carol", "corp", NON_ASCII)
    theirs = cntlm_h("carol", "corp", NON_ASCII.encode("latin-1"))
    assert ours[1:3] == theirs[1:3]
    assert "not ASCII" in ours[3 + 3]
    utf8_terminal = cntlm_h("carol", "corp", NON_ASCII.encode("utf-8"))
    assert utf8_terminal[1] != ours[1]  # what cntlm gets wrong on a UTF-8 terminal


def test_hash_standard_form_and_no_echo_on_a_terminal() -> None:
    out = on_pty([CLI, "hash", "-u", TEST_USER, "-d", TEST_DOMAIN], TEST_PASSWORD.encode())
    assert TEST_PASSWORD not in out  # getpass: no echo
    nt = pass_nt(out.splitlines())
    r = run_cli("hash", "--standard", stdin=TEST_PASSWORD + "\n")
    m = re.search(r"^ntlm_hashes: ([0-9a-f]{32}):([0-9a-f]{32})$", r.stdout, re.M)
    assert m, r.stdout
    assert bytes(b ^ 0xFF for b in bytes.fromhex(m.group(2))).hex().upper() == nt


def test_hash_pass_nt_works_with_the_addon(parent, origin, mitm) -> None:
    nt = pass_nt(hash_lines(TEST_USER, TEST_DOMAIN, TEST_PASSWORD))
    opts = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN, "ntlm_pass_nt": nt}
    m = mitm(parent.url, opts)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]
    assert [r.user for r in parent.snapshot().requests] == [TEST_PRINCIPAL]


def test_hash_of_a_non_ascii_password_works_with_the_addon(make_parent, origin, mitm) -> None:
    parent = make_parent(users={"CORP\\carol": NON_ASCII})
    nt = pass_nt(hash_lines("carol", "CORP", NON_ASCII))
    m = mitm(parent.url, {"ntlm_username": "carol", "ntlm_domain": "CORP", "ntlm_pass_nt": nt})
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]
    assert parent.snapshot().accepted_count == 1


# --------------------------------------------------------------------------- detect


def detect(parent_url: str, url: str, *extra: str, password: str = "",
           ) -> subprocess.CompletedProcess[str]:
    return run_cli("detect", "--parent", parent_url, "--user", TEST_USER, "--domain",
                   TEST_DOMAIN, "--url", url, *extra, stdin=password + "\n")


def test_detect_finds_ntlmv2(parent, origin, password_file: Path) -> None:
    r = detect(parent.url, f"{origin.url}/hello", "--password-file", str(password_file))
    assert r.returncode == 0, r.stderr
    assert "accepted NTLMv2" in r.stdout
    nt = pass_nt(hash_lines(TEST_USER, TEST_DOMAIN, TEST_PASSWORD))
    for line in ("ntlm_dialect: ntlmv2", f"ntlm_username: {TEST_USER}",
                 f"ntlm_domain: {TEST_DOMAIN}", f"ntlm_pass_nt: {nt}"):
        assert line in r.stdout.splitlines()
    assert "failed logon" in r.stderr  # the warning comes before the try
    assert TEST_PASSWORD not in r.stdout + r.stderr
    snap = parent.snapshot()
    assert (snap.type3_count, snap.accepted_count) == (1, 1)
    assert [q.user for q in snap.requests] == [TEST_PRINCIPAL]
    assert origin.requests[-1].path == "/hello"


def test_detect_against_squid(squid_ntlm, origin) -> None:
    r = detect(squid_ntlm.url, f"{origin.url}/hello", password=TEST_PASSWORD)
    assert r.returncode == 0, r.stderr
    assert "ntlm_dialect: ntlmv2" in r.stdout.splitlines()
    assert squid_ntlm.wait_for_log("TCP_MISS/200")


def test_detect_wrong_password_costs_one_logon(parent, origin) -> None:
    r = detect(parent.url, f"{origin.url}/hello", password=WRONG_PASSWORD)
    assert r.returncode == 1
    assert "rejected the credentials" in r.stderr and "1 failed logon" in r.stderr
    snap = parent.snapshot()
    assert (snap.type1_count, snap.type3_count, snap.accepted_count) == (1, 1, 0)
    assert origin.requests == []


def test_detect_dead_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        start = time.monotonic()
        r = detect(f"http://127.0.0.1:{port}", "http://example.com/", password=TEST_PASSWORD)
    assert time.monotonic() - start < 5
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"mitm-ntlm detect: parent 127.0.0.1:{port} unreachable: Connection refused"


def test_detect_parent_without_auth_and_with_bad_challenge(noauth_parent, make_parent,
                                                           origin) -> None:
    r = detect(noauth_parent.url, f"{origin.url}/hello", password=TEST_PASSWORD)
    assert r.returncode == 1 and "needs no authentication" in r.stderr
    for fault in ("garbage_challenge", "truncated_challenge"):
        bad = make_parent(fault=fault)
        r = detect(bad.url, f"{origin.url}/hello", password=TEST_PASSWORD)
        assert r.returncode == 1, fault
        assert "challenge" in r.stderr.splitlines()[-1], r.stderr
        assert bad.snapshot().type3_count == 0  # no credentials went out


class _BasicOnly(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="corp"')
        self.send_header("Proxy-Authenticate", "Negotiate")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def basic_only_parent() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicOnly)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_detect_parent_without_ntlm(basic_only_parent: str) -> None:
    r = detect(basic_only_parent, "http://example.com/", password=TEST_PASSWORD)
    assert r.returncode == 1
    # NTLM inside Negotiate was tried too (as the addon would), and got no challenge either.
    assert "offers only Negotiate and does not take NTLM inside it: it wants Kerberos" in r.stderr


# --------------------------------------------------------------------------- import-cntlm




class ConfigOnlyMitmdump(Mitmdump):
    """mitmdump with nothing but the addon and a confdir: everything else from config.yaml."""

    def command(self) -> list[str]:
        return [str(BIN / "mitmdump"), "-s", str(ADDON), "--set", f"confdir={self.confdir}"]


def test_imported_cntlm_conf_runs_in_mitmdump(tmp_path: Path, parent, origin) -> None:
    port = free_port()
    conf = tmp_path / "cntlm.conf"
    conf.write_text(
        "# a CNTLM config as people have them\n"
        f"username\t{TEST_USER}\n"
        f"Domain\t\t{TEST_DOMAIN}\n"
        f"Password   {TEST_PASSWORD}\n"
        f"Proxy\t\t127.0.0.1:{parent.port}\n"
        f"Listen\t\t127.0.0.1:{port}\n"
        "Header\t\tX-Test: yes\n"
    )
    confdir = tmp_path / "conf"
    confdir.mkdir()
    out = confdir / "config.yaml"
    r = run_cli("import-cntlm", str(conf), "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert TEST_PASSWORD not in text + r.stdout + r.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert "Password was not copied" in r.stderr and "Everything was carried over" in r.stderr
    config = ruamel.yaml.YAML(typ="safe", pure=True).load(text)
    assert config["mode"] == [f"upstream:http://127.0.0.1:{parent.port}"]
    assert config["listen_host"] == "127.0.0.1" and config["listen_port"] == port
    with ConfigOnlyMitmdump(None, confdir=confdir) as m:
        assert m.port == port
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]
    assert [q.user for q in parent.snapshot().requests] == [TEST_PRINCIPAL]
    assert origin.requests[-1].header("X-Test") == "yes"


def test_import_multi_proxy_conf_and_report(tmp_path: Path) -> None:
    conf = tmp_path / "cntlm.conf"
    conf.write_text(
        "Username\tbob\n"
        "DOMAIN corp-uk\n"
        "PassNTLMv2      D5826E9C665C37C80B53397D5C07BBCB\n"
        "Proxy\t\t10.0.0.41:8080\n"
        "PROXY\t\tproxy2.corp.example:3128\n"
        "NoProxy\t\tlocalhost, 127.0.0.*, 10.*\n"
        "Listen\t\t3128\n"
        "Listen\t\t127.0.0.1:3129\n"
        "Auth\t\tNTLM\n"
        "Gateway\t\tyes\n"
        "Allow\t\t127.0.0.1\n"
        "Allow\t\t10.0.0.0/8\n"
        "Deny\t\t0/0\n"
        "Header\t\tUser-Agent: Mozilla/4.0 (compatible; MSIE 5.5; Windows 98)\n"
        "Tunnel\t\t11443:remote.com:443\n"
        "Frobnicate\tyes\n"
    )
    r = run_cli("import-cntlm", str(conf))
    assert r.returncode == 0, r.stderr
    config = ruamel.yaml.YAML(typ="safe", pure=True).load(r.stdout)
    header = "|~q|User-Agent|Mozilla/4.0 (compatible; MSIE 5.5; Windows 98)"
    assert config == {
        "mode": ["regular"],
        "connection_strategy": "lazy",
        "ntlm_parent": ["http://10.0.0.41:8080", "http://proxy2.corp.example:3128"],
        "ntlm_noproxy": ["localhost", "127.0.0.*", "10.*"],
        "listen_host": "0.0.0.0",
        "listen_port": 3128,
        "ntlm_allow_remote": True,
        "ntlm_allow_clients": ["10.0.0.0/8", "127.0.0.1"],  # first match wins, then Deny 0/0
        "ntlm_username": "bob",
        "ntlm_domain": "corp-uk",
        "ntlm_dialect": "ntlmv1",
        "modify_headers": [header],
    }
    with taddons.context(ModifyHeaders(), Proxyserver(), script.new_group()) as tctx:
        for key, value in config.items():  # every option exists and has the right type
            typecheck.check_option_type(key, value, tctx.options._options[key].typespec)
    spec = parse_modify_spec(header, False)
    assert (spec.subject, spec.replacement_str) == (
        b"User-Agent", "Mozilla/4.0 (compatible; MSIE 5.5; Windows 98)")
    report = r.stderr
    assert "WARNING: Auth NTLM became ntlm_dialect ntlmv1" in report
    not_carried = report.split("Not carried over:\n", 1)[1]
    assert "line 3: PassNTLMv2: cannot be used" in not_carried
    assert "mitm-ntlm hash" in not_carried
    assert "line 8: Listen: " in not_carried
    assert "line 15: Tunnel: " in not_carried
    assert "line 16: Frobnicate: unknown keyword" in not_carried
    assert "no usable secret" in not_carried


def test_imported_allow_deny_rules_admit_the_same_clients(tmp_path: Path, parent,
                                                          origin) -> None:
    # cntlm: first matching rule wins. The addon: deny wins over allow. Copied verbatim, these
    # rules would refuse everyone; translated, 127.0.0.2 alone is refused.
    port = free_port()
    conf = tmp_path / "cntlm.conf"
    conf.write_text(
        f"Username {TEST_USER}\nDomain {TEST_DOMAIN}\nPassword {TEST_PASSWORD}\n"
        f"Proxy 127.0.0.1:{parent.port}\nListen 127.0.0.1:{port}\nGateway yes\n"
        "Deny 127.0.0.2\nAllow 127.0.0.0/8\nDeny 0/0\n"
    )
    confdir = tmp_path / "conf"
    confdir.mkdir()
    r = run_cli("import-cntlm", str(conf), "-o", str(confdir / "config.yaml"))
    assert r.returncode == 0, r.stderr
    config = ruamel.yaml.YAML(typ="safe", pure=True).load((confdir / "config.yaml").read_text())
    assert (config["ntlm_allow_clients"], config["ntlm_deny_clients"]) == (
        ["127.0.0.0/8"], ["127.0.0.2"])
    assert config["ntlm_allow_remote"] is True and config["listen_host"] == "127.0.0.1"
    with ConfigOnlyMitmdump(None, confdir=confdir) as m:
        for source, ok in (("127.0.0.1", True), ("127.0.0.2", False), ("127.0.0.3", True)):
            c = curl("--interface", source, "-x", m.url, f"{origin.url}/hello")
            assert (c.stdout == "hello") is ok, (source, c.stderr, m.output[-2000:])


@pytest.mark.parametrize("identity", [
    ["--set", "ntlm_multiuser=true"],  # each client's own credentials
    ["--user", f"{TEST_DOMAIN}\\{TEST_USER}", "--set", "ntlm_winbind=true"],  # winbind's logon
    ["--user", f"{TEST_DOMAIN}\\{TEST_USER}", "--set", "ntlm_password_keyring=true"],
], ids=["multiuser", "winbind", "keyring"])
def test_start_asks_no_password_where_the_identity_needs_none(tmp_path: Path,
                                                              identity: list[str]) -> None:
    """`start --parent` needs no --user in multi-user mode, and asks for no password (nor
    passes one) when another source gives the identity: the addon would refuse two."""
    port = free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("MITM_NTLM_PASSWORD", None)
    proc = subprocess.Popen([CLI, "start", "--parent", "http://127.0.0.1:9", "--port", str(port),
                             "--set", f"confdir={tmp_path}", *identity],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    try:
        out, _ = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "Password for" not in out and "--user is required" not in out, out
    assert "ntlm_password_env" not in out and "only one" not in out, out
    if identity[-1] != "ntlm_password_keyring=true":  # no keyring runs here: refused, clearly
        assert "listening at" in out, out
