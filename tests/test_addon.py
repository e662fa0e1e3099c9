"""The addon as a user meets it: example config, demo mode, options, version check, reload."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mitmproxy.proxy.layers.http import _upstream_proxy
from mitmproxy.test import taddons

from constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from mitm import ROOT, Mitmdump, curl
from mitmproxy_ntlm import mitmproxy_internals
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from servers import client_env


def test_example_config_yaml_works(tmp_path: Path, parent, origin) -> None:
    pw = tmp_path / "password"
    pw.write_text(TEST_PASSWORD + "\n")
    pw.chmod(0o600)
    text = (ROOT / "configs" / "upstream.yaml").read_text()
    text = text.replace("upstream:http://proxy.corp.example:8080", f"upstream:{parent.url}")
    text = text.replace("~/.mitm-ntlm/password", str(pw))
    text = text.replace("ntlm_username: alice", f"ntlm_username: {TEST_USER}")
    text = text.replace("ntlm_domain: CORP", f"ntlm_domain: {TEST_DOMAIN}")
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "config.yaml").write_text(text)
    with Mitmdump(None, confdir=confdir) as m:  # everything else comes from config.yaml
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert parent.snapshot().accepted_count == 1


def test_demo_mode_from_the_readme(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).parent / "mitm-ntlm"
    env = client_env(home=tmp_path)
    proc = subprocess.Popen([str(cli), "start", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = ""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while "listening at" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        assert "listening at" in out, out
        r = curl("-x", f"http://127.0.0.1:{port}", "http://ntlm-demo.invalid/")
        assert "DEMO\\demo" in r.stdout, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode is not None


def test_untested_mitmproxy_is_refused_clearly() -> None:
    with pytest.raises(mitmproxy_internals.UnsupportedMitmproxy, match=r"tested with mitmproxy"):
        mitmproxy_internals.check_version("9.0.1")
    mitmproxy_internals.check_version()  # the installed one is supported


def test_options_change_reenables_credentials_and_done_restores_mitmproxy() -> None:
    original = _upstream_proxy.HttpUpstreamProxy
    addon = NtlmUpstreamAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ntlm_username="alice", ntlm_domain="CORP", ntlm_password="x",
                       ntlm_max_failures=2)
        assert mitmproxy_internals.installed()
        policy = addon.policy
        assert policy is not None and policy.creds is not None
        for _ in range(2):
            policy.rejected(policy.creds, "parent:8080")
        assert "stopped sending the credentials" in (addon._blocked_reason() or "")
        tctx.configure(addon, ntlm_password="y")
        assert addon._blocked_reason() is None
        addon.done()
    assert _upstream_proxy.HttpUpstreamProxy is original


def test_decode_command_describes_without_secrets() -> None:
    import spnego

    addon = NtlmUpstreamAuth()
    client = spnego.client("CORP\\alice", "pw", hostname="p", protocol="ntlm")
    import base64

    text = addon.decode("NTLM " + base64.b64encode(client.step()).decode())
    assert text.startswith("type=1") and "ntlm" in text
    assert re.search(r"error=not valid base64", addon.decode("%%%"))
    assert os.environ.get("LM_COMPAT_LEVEL") is None  # handshakes restore the environment
