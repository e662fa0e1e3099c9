"""Options as users meet them: typos, bad values (at start-up and at runtime), YAML lists,
lockout recovery in every tool, clean start-up errors, and `mitm-ntlm start`/`detect` messages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from mitmproxy_ntlm import options
from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER, WRONG_PASSWORD
from tests.mitm import BIN, Mitmdump, curl
from tests.servers import free_port
from tests.web import MitmwebApi

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN}
CLI = str(BIN / "mitm-ntlm")




def assert_clean_refusal(m: Mitmdump, *messages: str) -> None:
    """Start-up failed: non-zero exit, the messages, no traceback, nothing claims to listen."""
    assert m.proc is not None and m.proc.wait(10) != 0
    for message in messages:
        assert message in m.output, m.output
    assert "Traceback" not in m.output and "error in script" not in m.output, m.output
    assert "listening at" not in m.output, m.output
    assert "mitmproxy-ntlm: not started" in m.output


# --------------------------------------------------------------------------- sans-I/O


def test_list_values_split_on_commas_and_keep_yaml_lists() -> None:
    assert options.items(["a:1, b:2", " c:3 ", ""]) == ["a:1", "b:2", "c:3"]
    # config.yaml's old string form and a YAML list both become lists before mitmproxy sees them
    assert options.convert("ntlm_parent", "a:1, b:2") == ["a:1, b:2"]
    assert options.convert("ntlm_parent", ["a:1", "b:2"]) == ["a:1", "b:2"]
    with pytest.raises(Exception, match="expected a list of strings"):
        options.convert("ntlm_noproxy", {"a": 1})


def test_secret_values_are_never_repeated_in_messages() -> None:
    with pytest.raises(Exception) as e:
        options.convert("ntlm_password", 12345)
    assert "12345" not in str(e.value) and "value not shown" in str(e.value)


def test_each_addon_configures_again_on_the_options_it_reads() -> None:
    """The option names each addon's `configure` watches come from the option table: each
    watches its own section, and names only options that exist."""
    from mitmproxy.addons.proxyauth import ProxyAuth
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from mitmproxy_ntlm.script import new_group

    watched = {
        options.READ_BY_POLICY: options.CREDENTIALS,
        options.READ_BY_POOL: options.POOL,
        options.READ_BY_ROUTER: options.ROUTING,
        options.READ_BY_ACCESS: options.ACCESS,
        options.READ_BY_ORIGIN: options.ORIGIN,
        options.READ_BY_LISTEN: options.LISTEN,
    }
    with taddons.context(ProxyAuth(), Proxyserver(), new_group()) as tctx:
        for names, section in watched.items():
            assert options.names(section) <= names
            assert names <= set(tctx.options.keys()), names - set(tctx.options.keys())
    assert options.UPSTREAM[:len(options.CREDENTIALS + options.POOL)] == \
        options.CREDENTIALS + options.POOL
    assert options.names(options.POOL) == {o.name for o in options.OPTIONS
                                           if o.name.startswith("ntlm_pool")}


def test_classes_taking_option_values_default_to_the_options_defaults() -> None:
    from mitmproxy_ntlm.parents import ParentList
    from mitmproxy_ntlm.policy import UpstreamPolicy

    policy = UpstreamPolicy(creds=None)
    assert (policy.dialect.value, policy.guard.limit, policy.replay_limit,
            policy.handshake_timeout, policy.multiuser, policy.realm, policy.rejected_ttl) == (
        options.default("ntlm_dialect"), options.default("ntlm_max_failures"),
        options.default("ntlm_replay_limit"), options.default("ntlm_handshake_timeout"),
        options.default("ntlm_multiuser"), options.default("ntlm_realm"),
        options.default("ntlm_lockout_cooldown"))
    assert ParentList([]).retry_after == options.default("ntlm_parent_retry")


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("ntlm_usernme", "alice"), "unknown option ntlm_usernme: did you mean ntlm_username?"),
        (("ntlm_max_failures", "abc"),
         "ntlm_max_failures='abc' is not accepted: it must be a whole number, 0 or more"),
        (("ntlm_dialect", "ntlmv3"),
         "ntlm_dialect='ntlmv3' is not accepted: use one of ntlmv2, ntlm2sr, ntlmv1"),
        (("ntlm_scheme", "bogus"),
         "ntlm_scheme='bogus' is not accepted: use one of auto, kerberos, ntlm"),
        (("ntlm_pool_max", "-1"), "ntlm_pool_max=-1 is not accepted: it must be 0 or more"),
        (("ntlm_password_file", "/nonexistent/pw"), "/nonexistent/pw"),
    ],
)
def test_bad_option_on_the_command_line_stops_start_up(mitm, parent, password_file,
                                                        option, message):
    name, value = option
    opts = {**CREDS, "ntlm_password_file": str(password_file), name: value}
    m = mitm(parent.url, opts, expect_failure=True)
    assert_clean_refusal(m, message)


def test_bad_options_in_config_yaml_are_all_reported(tmp_path: Path, parent, password_file):
    (tmp_path / "config.yaml").write_text(
        f"ntlm_username: {TEST_USER}\nntlm_password_file: {password_file}\n"
        "ntlm_max_failure: 3\nntlm_handshake_timeout: 0\nntlm_dialect: ntlmv3\n")
    m = Mitmdump(parent.url, {}, confdir=tmp_path).start(expect_failure=True)
    try:
        assert_clean_refusal(
            m, "unknown option ntlm_max_failure: did you mean ntlm_max_failures?",
            "ntlm_handshake_timeout=0 is not accepted: it must be at least 1",
            "ntlm_dialect='ntlmv3' is not accepted")
    finally:
        m.stop()


def test_yaml_lists_and_comma_lists_route_alike(tmp_path: Path, parent, origin, password_file):
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "config.yaml").write_text(
        f"mode: [regular]\nconnection_strategy: lazy\nntlm_username: {TEST_USER}\n"
        f"ntlm_domain: {TEST_DOMAIN}\nntlm_password_file: {password_file}\n"
        f"ntlm_parent:\n  - {dead}\n  - \"{dead}, {parent.url}\"\n"
        "ntlm_noproxy: [example.invalid]\nntlm_allow_clients: [127.0.0.1/32]\n")
    with Mitmdump(None, {}, confdir=tmp_path) as m:
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]
        assert f"127.0.0.1:{parent.port}" in m.output  # the third parent, from the comma form
    # The same from the command line: repeated --set appends, commas split.
    with Mitmdump(None, {**CREDS, "ntlm_password_file": password_file,
                         "connection_strategy": "lazy"},
                  "--mode", "regular", "--set", f"ntlm_parent={dead},{parent.url}",
                  "--set", f"ntlm_parent={dead}", confdir=tmp_path / "cli") as m:
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-2000:]


def test_start_lines_say_nothing_false(mitm, parent, origin, password_file, tmp_path):
    pac = tmp_path / "proxy.pac"
    pac.write_text("function FindProxyForURL(url, host) "
                   f"{{ return 'PROXY 127.0.0.1:{parent.port}'; }}\n")
    m = mitm(None, {**CREDS, "ntlm_password_file": password_file, "ntlm_pac": str(pac),
                    "connection_strategy": "lazy"}, "--mode", "regular")
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert "PAC file" in m.output
    assert "add_log" not in m.output and "deprecated" not in m.output
    assert "NTLM is used only towards a parent proxy" not in m.output


# --------------------------------------------------------------------------- runtime


def test_mitmweb_refuses_bad_values_and_keeps_the_old_ones(tmp_path: Path, parent, origin,
                                                           password_file):
    web_port = free_port()
    m = Mitmdump(parent.url, {**CREDS, "ntlm_password_file": password_file,
                              "web_port": web_port}, confdir=tmp_path, tool="mitmweb")
    with m:
        web = MitmwebApi(m, web_port)
        for change, message in (({"ntlm_dialect": "ntlmv3"}, "use one of ntlmv2"),
                                ({"ntlm_max_failures": -1}, "it must be 0 or more"),
                                ({"ntlm_scheme": "bogus"}, "use one of auto")):
            r = web.set(**change)
            assert r.status_code == 400 and message in r.text, (change, r.text)
        shown = web.options()
        assert shown["ntlm_dialect"]["value"] == "ntlmv2"
        assert shown["ntlm_max_failures"]["value"] == 3
        assert shown["ntlm_scheme"]["value"] == "auto"
        # The `set` command (mitmweb's command bar) is refused the same way.
        assert "use one of ntlmv2" in web.run("set", "ntlm_dialect", "ntlmv3").text
        assert web.options()["ntlm_dialect"]["value"] == "ntlmv2"
        # A list option takes a list, each entry comma-separated or not.
        r = web.set(ntlm_noproxy=["a.invalid, b.invalid"])
        assert r.status_code == 200, r.text
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"


# --------------------------------------------------------------------------- lockout recovery


def test_lockout_ends_when_the_password_file_is_fixed_or_on_sighup(mitm, parent, origin,
                                                                   tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(WRONG_PASSWORD + "\n")
    pw.chmod(0o600)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": str(pw), "ntlm_max_failures": 1})
    curl("-x", m.url, f"{origin.url}/hello")  # rejected: the guard stops
    blocked = curl("-x", m.url, f"{origin.url}/hello").stdout
    assert "stopped sending the credentials" in blocked
    # The message says what works in mitmdump (no command line there).
    assert f"correct {pw}" in blocked and f"kill -HUP {m.proc.pid}" in blocked, blocked
    assert "ntlm.reset" not in blocked and "ntlm_* option" not in blocked
    rejected = parent.snapshot().rejected_count

    pw.write_text(TEST_PASSWORD + "\n")  # noticed by the addon, without a restart
    assert m.wait_for("new credentials read; the lockout guard is reset")
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert parent.snapshot().rejected_count == rejected

    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGHUP)  # re-reads and clears the guard; does not terminate
    assert m.wait_for("SIGHUP: credentials read again")
    assert m.proc.poll() is None
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"


# --------------------------------------------------------------------------- mitm-ntlm


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)


def test_start_explains_a_bad_password_file_or_a_taken_port(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    loose = tmp_path / "loose"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    for path, message in ((tmp_path / "missing", "No such file"), (empty, "is empty"),
                          (loose, "chmod 600")):
        r = run_cli("start", "--parent", "http://127.0.0.1:9", "--user", "a",
                    "--password-file", str(path), "--port", "0")
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("start", "--port", str(port))
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "--mode" not in r.stdout + r.stderr and "Demo:" not in r.stdout


def test_detect_and_the_addon_use_ntlm_inside_negotiate(mitm, origin, password_file) -> None:
    with ParentProxy({f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD},
                     scheme="Negotiate") as parent:
        r = subprocess.run(
            [CLI, "detect", "--parent", parent.url, "--user", TEST_USER, "--domain",
             TEST_DOMAIN, "--url", f"{origin.url}/hello", "--password-file", str(password_file)],
            capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        assert "accepted NTLMv2 inside Negotiate" in r.stdout
        m = mitm(parent.url, {**CREDS, "ntlm_password_file": str(password_file)})
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
        assert parent.snapshot().rejected_count == 0
