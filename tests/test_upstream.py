"""The core: real clients -> mitmdump with the addon -> a real NTLM parent -> a real origin."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time

import httpx
import pytest

from mitmproxy_ntlm.credentials import hashes_from_password, invert
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import curl
from tests.servers import client_env, free_port

CREDS = {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN}
PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"


def secrets_absent(text: str) -> None:
    """No password, hash (either form) or Type 3 token in `text`."""
    lm, nt = hashes_from_password(TEST_PASSWORD)
    for secret in (TEST_PASSWORD, nt.hex(), lm.hex(), invert(nt).hex()):
        assert secret.lower() not in text.lower()
    type3_prefix = base64.b64encode(b"NTLMSSP\x00\x03\x00\x00\x00").decode()[:14]
    assert type3_prefix not in text


def test_plain_http_get_authenticates_once_per_connection(mitm, parent, origin, password_file):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    urls = [f"{origin.url}/hello"] * 100
    r = curl("-x", m.url, *urls)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello" * 100
    stats = parent.snapshot()
    assert stats.type1_count == 1 and stats.type3_count == 1 and stats.rejected_count == 0
    assert len(stats.requests) == 100
    assert {rec.user for rec in stats.requests} == {PRINCIPAL}
    assert m.wait_for("result=authenticated")
    secrets_absent(m.output)


def test_plain_http_through_squid(mitm, squid_ntlm, origin, password_file):
    m = mitm(squid_ntlm.url, {**CREDS, "ntlm_password_file": password_file})
    r = curl("-x", m.url, f"{origin.url}/hello", f"{origin.url}/hello")
    assert r.stdout == "hellohello", r.stderr
    assert squid_ntlm.wait_for_log("TCP_MISS/200") and squid_ntlm.wait_for_log("TCP_DENIED/407")
    # Squid's fake helper sends a Type 2 without TargetInfo; NTLMv2 must still work.
    assert m.wait_for("target_info=none") and "dialect=NTLMv2" in m.output


@pytest.mark.parametrize("chunked", [False, True])
def test_post_body_reaches_origin_once(mitm, parent, origin, password_file, tmp_path, chunked):
    body = os.urandom(3 * 1024 * 1024 + 17)
    f = tmp_path / "body"
    f.write_bytes(body)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    args = ["-x", m.url, "--data-binary", f"@{f}", f"{origin.url}/echo"]
    if chunked:
        args[0:0] = ["-H", "Transfer-Encoding: chunked"]
    r = curl(*args)
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["length"] == len(body)
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    posts = [rec for rec in origin.requests if rec.method == "POST"]
    assert len(posts) == 1
    stats = parent.snapshot()
    assert stats.type3_count == 1
    assert [rec.method for rec in stats.requests] == ["POST"]  # the HEAD probe got the 407


def test_https_intercepted(mitm, parent, tls_origin, password_file):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file,
                          "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)})
    r = curl("--cacert", str(m.ca_cert), "-x", m.url,
             f"{tls_origin.url}/hello", f"{tls_origin.url}/hello")
    assert r.returncode == 0, r.stderr + m.output[-2000:]
    assert r.stdout == "hellohello"
    stats = parent.snapshot()
    assert stats.type3_count == 1
    assert [rec.method for rec in stats.requests] == ["CONNECT"]


def test_https_passthrough(mitm, parent, tls_origin, password_file):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file}, "--ignore-hosts", ".*")
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/bytes/1000000",
             "-o", "/dev/null", "-w", "%{http_code} %{size_download}")
    assert r.stdout == "200 1000000", r.stderr
    assert parent.snapshot().accepted_count == 1


def test_httpx_client(mitm, parent, origin, password_file):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    with httpx.Client(proxy=m.url) as client:
        for _ in range(5):
            assert client.get(f"{origin.url}/hello").text == "hello"
        r = client.post(f"{origin.url}/echo", content=b"x" * 5000)
        assert r.json()["length"] == 5000
    assert parent.snapshot().type3_count == 1


def test_parent_without_auth_serves_each_request_once(mitm, noauth_parent, origin, password_file,
                                                       tmp_path):
    m = mitm(noauth_parent.url, {**CREDS, "ntlm_password_file": password_file})
    f = tmp_path / "b"
    f.write_bytes(b"y" * 1000)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    r = curl("-x", m.url, "--data-binary", f"@{f}", f"{origin.url}/echo")
    assert json.loads(r.stdout)["length"] == 1000
    methods = [rec.method for rec in origin.requests]
    assert methods.count("GET") == 1 and methods.count("POST") == 1
    assert m.wait_for("result=no auth needed")


def test_credentials_as_hashes_and_env(mitm, parent, origin, monkeypatch):
    lm, nt = hashes_from_password(TEST_PASSWORD)
    for opts, env in [
        ({"ntlm_pass_nt": invert(nt).hex().upper()}, None),
        ({"ntlm_hashes": f"{lm.hex()}:{nt.hex()}"}, None),
        ({"ntlm_password_env": "NTLM_TEST_PW"}, {"NTLM_TEST_PW": TEST_PASSWORD}),
    ]:
        m = mitm(parent.url, {**CREDS, **opts}, env=env)
        assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello", m.output[-1500:]
        m.stop()
        secrets_absent(m.output)
    assert parent.snapshot().accepted_count == 3


def test_wrong_password_one_type3_and_clear_error(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "ntlm_password": "wrong"})
    r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "502"
    assert f"rejected the NTLM credentials for {PRINCIPAL}" in body
    stats = parent.snapshot()
    assert stats.type3_count == 1 and stats.rejected_count == 1
    assert origin.requests == []
    assert m.wait_for("result=rejected")


def test_lockout_guard_stops_after_three_rejections(mitm, parent, origin):
    m = mitm(parent.url, {**CREDS, "ntlm_password": "wrong", "ntlm_max_failures": 3})
    codes = []
    for _ in range(5):
        r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello")
        codes.append(r.stdout.rpartition("\n")[2])
    assert codes == ["502"] * 5
    assert parent.snapshot().type3_count == 3
    r = curl("-x", m.url, f"{origin.url}/hello")
    assert "stopped sending the credentials" in r.stdout
    r = curl("-p", "-x", m.url, f"{origin.url}/hello")  # CONNECT is refused before the parent
    assert parent.snapshot().type3_count == 3
    assert "disabled after 3 consecutive rejections" in m.output


def test_parent_down(mitm, origin, password_file):
    dead = f"http://127.0.0.1:{free_port()}"
    m = mitm(dead, {**CREDS, "ntlm_password_file": password_file})
    start = time.monotonic()
    r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello")
    assert r.stdout.endswith("502")
    assert f"Cannot reach the parent proxy ({dead.removeprefix('http://')}: " in r.stdout
    r = curl("-p", "-x", m.url, f"{origin.url}/hello")  # CONNECT, tunnel intercepted
    assert "Cannot reach the parent proxy" in r.stdout
    assert time.monotonic() - start < 10
    assert m.wait_for("[ntlm] Cannot reach the parent proxy")
    assert m.proc and m.proc.poll() is None


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("close_after_type1", "closed the connection during the NTLM handshake"),
        ("garbage_challenge", "unusable NTLM challenge"),
        ("truncated_challenge", "unusable NTLM challenge"),
        ("http10_407", "NTLM cannot complete"),
    ],
)
def test_misbehaving_parent_gives_clear_error_and_proxy_keeps_serving(
    mitm, make_parent, origin, password_file, fault, message
):
    parent = make_parent(fault=fault)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    for scheme_args in ([], ["-p"]):
        r = curl(*scheme_args, "-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello",
                 timeout=20)
        if scheme_args:  # CONNECT: mitmproxy answered 200 already; the tunnel then fails
            assert r.returncode != 0 or "502" in r.stdout
        else:
            assert r.stdout.endswith("502"), r.stdout
            assert message in r.stdout
    assert m.wait_for(message)
    parent.fault = None
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert m.proc and m.proc.poll() is None


def test_parent_that_never_answers_times_out(mitm, make_parent, origin, password_file):
    parent = make_parent(fault="never_answer")
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file,
                          "ntlm_handshake_timeout": 2})
    start = time.monotonic()
    r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/hello", timeout=20)
    assert r.stdout.endswith("504")
    assert "did not answer the NTLM handshake within 2 s" in r.stdout
    assert time.monotonic() - start < 8


def test_rechallenge_is_answered(mitm, make_parent, origin, password_file, tmp_path):
    parent = make_parent(rechallenge_after=2)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    f = tmp_path / "b"
    f.write_bytes(b"z" * 100_000)
    urls = [f"{origin.url}/hello"] * 5
    r = curl("-x", m.url, *urls)
    assert r.stdout == "hello" * 5, r.stderr
    r = curl("-x", m.url, "--data-binary", f"@{f}", f"{origin.url}/echo", f"{origin.url}/echo",
             f"{origin.url}/echo")
    assert r.stdout.count('"length": 100000') == 3, r.stdout
    assert len([x for x in origin.requests if x.method == "POST"]) == 3
    per_conn = parent.snapshot().handshakes_per_connection
    assert max(per_conn.values()) >= 2


def test_closing_407_is_handled(mitm, make_parent, origin, password_file):
    # The parent closes the connection with a bare 407; the preemptive Type 1 never gets one.
    parent = make_parent(fault="close_407")
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    assert curl("-x", m.url, f"{origin.url}/hello", f"{origin.url}/hello").stdout == "hellohello"
    assert parent.snapshot().connections == 1


def test_closing_rechallenge_reconnects(mitm, make_parent, origin, password_file):
    # A re-challenge whose 407 closes the connection: reconnect, authenticate, resend.
    parent = make_parent(fault="close_rechallenge", rechallenge_after=1)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    with httpx.Client(proxy=m.url) as client:
        assert client.get(f"{origin.url}/hello").text == "hello"
        assert client.post(f"{origin.url}/echo", content=b"q" * 50_000).json()["length"] == 50_000
    assert [x.method for x in origin.requests] == ["GET", "POST"]
    stats = parent.snapshot()
    assert stats.connections == 2 and stats.accepted_count == 2
    assert "reconnecting" in m.output


def test_weak_dialect_only_on_request(mitm, parent, origin, password_file):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file, "ntlm_dialect": "ntlmv1"})
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    assert "ntlm_dialect=ntlmv1 is weak" in m.output
    assert m.wait_for("dialect=NTLMv1")


def test_bad_options_refuse_to_start(mitm, parent, tmp_path):
    f = tmp_path / "pw"
    f.write_text("x\n")
    f.chmod(0o644)
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": f}, expect_failure=True)
    assert m.proc and m.proc.wait(10) != 0
    assert "chmod 600" in m.output


@pytest.mark.slow
def test_git_clone_through_addon(mitm, parent, git_server, password_file, tmp_path):
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    r = subprocess.run(["git", "clone", "-q", git_server.url, str(tmp_path / "clone")],
                       capture_output=True, text=True, timeout=60,
                       env=client_env(proxy=m.url, home=tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "clone" / ".git").is_dir()
    assert parent.snapshot().accepted_count >= 1


@pytest.mark.slow
def test_pip_download_through_addon(mitm, parent, package_index, password_file, tmp_path):
    import sys

    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file})
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--proxy", m.url,
         "--index-url", package_index.url, "-d", str(tmp_path), "ntlmdemo"],
        capture_output=True, text=True, timeout=120, env=client_env(home=tmp_path),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(p.name.startswith("ntlmdemo") for p in tmp_path.iterdir())
    assert parent.snapshot().accepted_count >= 1


def test_https_wrong_password_one_type3_and_readable_error(mitm, parent, tls_origin):
    # mitmproxy connects to the server twice for one intercepted request (eager TLS); the
    # credentials must still be offered once.
    m = mitm(parent.url, {**CREDS, "ntlm_password": "wrong",
                          "ssl_verify_upstream_trusted_ca": str(tls_origin.cert_path)})
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, "-w", "\n%{http_code}",
             f"{tls_origin.url}/hello")
    assert r.stdout.endswith("502")
    assert f"rejected the NTLM credentials for {PRINCIPAL}" in r.stdout
    assert parent.snapshot().type3_count == 1
    passthrough = mitm(parent.url, {**CREDS, "ntlm_password": "wrong"}, "--ignore-hosts", ".*")
    r = curl("--cacert", str(tls_origin.cert_path), "-x", passthrough.url,
             f"{tls_origin.url}/hello")
    assert r.returncode != 0 and "502" in r.stderr, r.stderr  # the answer waits for the logon
    assert parent.snapshot().type3_count == 2
    assert passthrough.wait_for("rejected the NTLM credentials")


def test_silent_parent_on_intercepted_https_costs_one_connect(mitm, make_parent, tls_origin,
                                                               password_file):
    # mitmproxy's TLS layer connects early (eager) and its HTTP layer connected again for the
    # request: two CONNECTs, two handshake timeouts, then mitmproxy's 502. Now the failed
    # tunnel is not opened again and the request inside it gets the documented 504.
    parent = make_parent(fault="never_answer")
    m = mitm(parent.url, {**CREDS, "ntlm_password_file": password_file,
                          "ntlm_handshake_timeout": 1})
    r = curl("--cacert", str(m.ca_cert), "-x", m.url, "-w", "\n%{http_connect} %{http_code}",
             f"{tls_origin.url}/hello", timeout=20)
    assert r.stdout.endswith("200 504"), r.stdout  # mitmproxy answered the CONNECT itself
    assert "did not answer the NTLM handshake within 1 s" in r.stdout
    assert parent.connections == 1
