"""Running it every day: the shipped service units' command line, the config file, SIGHUP, SIGTERM.

The proxy runs as a service manager runs it: the unit's ExecStart, in a session (process group)
of its own, stdout a pipe (the journal). Linux only (signals, /proc).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN
from tests.mitm import ROOT, curl
from tests.processes import Service, alive, children
from tests.servers import client_env, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, /proc")

CLI = Path(sys.executable).parent / "mitm-ntlm"
UNITS = ROOT / "addons" / "mitmproxy_ntlm" / "configs"
USERS = {f"{TEST_DOMAIN}\\alice": "alice-Pass-1", f"{TEST_DOMAIN}\\bob": "bob-Pass-2"}
DEMO_URL = "http://ntlm-demo.invalid/"  # the test parent answers it with the user it saw




def exec_start(unit: str) -> list[str]:
    """The unit's ExecStart as argv (systemd's quoting is shell-like for this line)."""
    text = (UNITS / unit).read_text()
    line = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert line, unit
    return shlex.split(line.group(1))


def password_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for principal, password in USERS.items():
        user = principal.split("\\")[1]
        f = tmp_path / f"{user}.password"
        f.write_text(password + "\n")
        f.chmod(0o600)
        files[user] = f
    return files


def write_config(path: Path, parent: ParentProxy, port: int, user: str, password_file: Path,
                 extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"mode:\n  - upstream:{parent.url}\nlisten_port: {port}\n"
                    f"ntlm_username: {TEST_DOMAIN}\\{user}\n"
                    f"ntlm_password_file: {password_file}\n{extra}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def fetch(port: int) -> str:
    r = curl("-x", f"http://127.0.0.1:{port}", DEMO_URL)
    return r.stdout + r.stderr


def test_system_unit_command_reloads_on_sighup_and_stops_cleanly(tmp_path: Path) -> None:
    argv = exec_start("mitm-ntlm.service")
    assert Path(argv[0]).name == "mitm-ntlm" and "/etc/mitm-ntlm/config.yaml" in argv
    config = tmp_path / "etc" / "config.yaml"
    argv = [str(CLI), *(str(config) if a == "/etc/mitm-ntlm/config.yaml" else a
                        for a in argv[1:])]
    passwords = password_files(tmp_path)
    port = free_port()
    with ParentProxy(USERS) as parent:
        write_config(config, parent, port, "alice", passwords["alice"])
        service = Service(argv, client_env(home=tmp_path))
        try:
            service.wait_for("listening at")
            pid = service.proc.pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert any(arg.endswith(b"mitmdump") for arg in cmdline[:2]), cmdline  # exec'd
            assert not any(b"Pass-" in arg for arg in cmdline)  # no secret in the process list
            assert f"Config file: {config}" in service.output
            assert f"Authenticated as: {TEST_DOMAIN}\\alice" in fetch(port)

            # Another user and password file in the config, then `systemctl reload`.
            write_config(config, parent, port, "bob", passwords["bob"])
            mark = len(service.output)
            os.kill(pid, signal.SIGHUP)
            service.wait_for("read again", after=mark)
            assert f"Authenticated as: {TEST_DOMAIN}\\bob" in fetch(port)

            # A bad value is refused; the running options stay.
            write_config(config, parent, port, "alice", passwords["alice"],
                         "ntlm_max_failures: -1\n")
            mark = len(service.output)
            os.kill(pid, signal.SIGHUP)
            service.wait_for("the running options stay as they were", after=mark)
            assert "ntlm_max_failures=-1" in service.output[mark:]
            assert f"Authenticated as: {TEST_DOMAIN}\\bob" in fetch(port)

            kids = children(pid)
            os.kill(pid, signal.SIGTERM)  # `systemctl stop`
            assert service.proc.wait(15) == 0, service.output
            assert not group_alive(pid), "processes left in the service's process group"
            assert not any(alive(kid) for kid in kids)
            assert "\x1b[" not in service.output  # no colour codes in the journal
            assert "Traceback" not in service.output
        finally:
            service.stop()


def test_default_config_place_and_command_line_flags_win(tmp_path: Path) -> None:
    """Without --config: $XDG_CONFIG_HOME/mitm-ntlm/config.yaml; --user/--password-file given on
    the command line win over the file's, also after a reload. The user unit names that file."""
    argv = exec_start("mitm-ntlm-user.service")
    assert argv[1:] == ["start", "--config", "%E/mitm-ntlm/config.yaml"]  # %E: XDG config home
    passwords = password_files(tmp_path)
    config = tmp_path / "xdg" / "mitm-ntlm" / "config.yaml"
    port = free_port()
    env = client_env(home=tmp_path)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    with ParentProxy(USERS) as parent:
        # Two secrets in the file: the one given on the command line replaces both.
        write_config(config, parent, port, "bob", passwords["bob"], "ntlm_password_env: BOBS\n")
        service = Service([str(CLI), "start", "--user", f"{TEST_DOMAIN}\\alice",
                           "--password-file", str(passwords["alice"])], env)
        try:
            service.wait_for("listening at")
            assert f"Config file: {config}" in service.output
            assert f"Authenticated as: {TEST_DOMAIN}\\alice" in fetch(port)  # the file's port
            write_config(config, parent, port, "bob", passwords["bob"],
                         "ntlm_password_env: BOBS\nntlm_pool: false\n")
            mark = len(service.output)
            os.kill(service.proc.pid, signal.SIGHUP)
            service.wait_for("changed ntlm_pool", after=mark)
            assert "ntlm_username" not in service.output[mark:].split("changed")[1]
            assert f"Authenticated as: {TEST_DOMAIN}\\alice" in fetch(port)
            os.kill(service.proc.pid, signal.SIGTERM)
            assert service.proc.wait(15) == 0, service.output
        finally:
            service.stop()


def test_start_names_a_bad_config_file_clearly(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    for text, message in (("ntlm_usrname: alice\n", "did you mean ntlm_username?"),
                          ("listen_port: [\n", "line"),
                          ("- a list\n", "expected `option: value` lines")):
        config.write_text(text)
        r = subprocess.run([str(CLI), "start", "--config", str(config)], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL,
                           env=client_env(home=tmp_path))
        assert r.returncode != 0 and message in r.stdout + r.stderr, r
        assert "Traceback" not in r.stderr
    r = subprocess.run([str(CLI), "start", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                       env=client_env(home=tmp_path))
    assert r.returncode == 1 and "No such file" in r.stderr and "Traceback" not in r.stderr


def test_demo_parent_process_forwards_sighup_and_stops_with_its_child(tmp_path: Path) -> None:
    """The demo cannot exec (its parent proxy lives in the `mitm-ntlm` process): SIGHUP goes on
    to mitmdump, SIGTERM stops both, exit status 0, nothing left in the process group."""
    port = free_port()
    service = Service([str(CLI), "start", "--port", str(port)], client_env(home=tmp_path))
    try:
        service.wait_for("listening at")
        assert "Authenticated as: DEMO\\demo" in fetch(port)
        pid = service.proc.pid
        kids = children(pid)
        assert kids  # mitmdump runs as a child here
        mark = len(service.output)
        os.kill(pid, signal.SIGHUP)
        service.wait_for("SIGHUP: credentials read again", after=mark)
        os.kill(pid, signal.SIGTERM)
        assert service.proc.wait(15) == 0, service.output
        assert not group_alive(pid) and not any(alive(kid) for kid in kids)
    finally:
        service.stop()


def test_config_changes_are_the_differences_and_removed_options_go_back(tmp_path: Path) -> None:
    from mitmproxy import options as mitmproxy_options

    from mitmproxy_ntlm import options
    from mitmproxy_ntlm.config_file import changes

    opts = mitmproxy_options.Options()
    for o in options.OPTIONS:
        opts.add_option(o.name, o.typespec, o.default, o.help)
    f = tmp_path / "config.yaml"
    f.write_text("ntlm_pool_max: 5\nlisten_port: 3129\nntlm_parent: a:1, b:2\n"
                 "confdir: /elsewhere\nntlm_domain: CORP\n")
    opts.update(ntlm_domain="CORP")
    update, names = changes(opts, f, keep=["listen_port"])
    # listen_port kept (a flag), ntlm_domain unchanged, confdir read at start only:
    assert update == {"ntlm_pool_max": 5, "ntlm_parent": ["a:1, b:2"]}
    opts.update(**update)
    f.write_text("ntlm_parent: a:1, b:2\n")
    update, _ = changes(opts, f, keep=["listen_port"], previous=names)
    assert update == {"ntlm_pool_max": 32, "ntlm_domain": ""}  # removed: back to the defaults


def test_config_file_holding_a_secret_must_be_private(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    from mitmproxy_ntlm.config_file import read_config

    f = tmp_path / "config.yaml"
    f.write_text("ntlm_username: alice\nntlm_pass_nt: 0123456789abcdef0123456789abcdef\n")
    f.chmod(0o644)
    with pytest.raises(exceptions.OptionsError, match=r"readable by others.*chmod 600") as e:
        read_config(f)
    assert "ntlm_pass_nt" in str(e.value) and "0123456789abcdef" not in str(e.value)
    f.chmod(0o600)
    assert read_config(f)["ntlm_username"] == "alice"
    f.write_text("ntlm_username: alice\n")  # no secret: any mode, as before
    f.chmod(0o644)
    assert read_config(f) == {"ntlm_username": "alice"}
