"""Every authentication path against a real domain: a Samba AD DC on loopback, and Squid that
checks NTLM logons with Samba's ntlm_auth and Kerberos tickets with the proxy's keytab.

Wrong passwords are rejected by the DC itself, whose own audit log and `badPwdCount` show
each attempt. The parent is addressed as `localhost`, the host of its principal HTTP/localhost.
"""

from __future__ import annotations

import io
import re
import subprocess
import time
from pathlib import Path

import pytest
from mitmproxy.io import FlowReader

from tests.constants import TEST_PASSWORD, TEST_USER, WRONG_PASSWORD
from tests.domain import REALM, SambaDC, domain_squid, programs_below
from tests.mitm import Mitmdump, curl
from tests.servers import free_port

pytestmark = pytest.mark.dc

KERBEROS_PRINCIPAL = f"{TEST_USER}@{REALM}"


def secret_file(tmp_path: Path, name: str, secret: str) -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def env_for(dc: SambaDC, ccache: str = "FILE:/nonexistent/krb5cc") -> dict[str, str]:
    """The realm's krb5.conf; a ticket cache only where a test fills one."""
    return {**dc.env(), "KRB5CCNAME": ccache}


def parent_url(squid) -> str:
    return f"http://localhost:{squid.port}"


def squid_users(squid, url: str) -> list[str]:
    """The user names Squid logged for successful requests to `url` (as the DC vouched)."""
    return [line.split()[7] for line in squid.access_log()
            if url in line and ("/200 " in line or "TCP_TUNNEL" in line)]


def eventually(predicate, timeout: float = 5) -> bool:
    """Squid writes a log line when a transaction ends, a moment after the client is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return bool(predicate())


def wait_users(squid, url: str, count: int) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(squid_users(squid, url)) < count:
        time.sleep(0.05)
    return squid_users(squid, url)


def test_ntlm_logon_is_checked_by_the_domain_controller(mitm, domain, domain_squid, origin,
                                                        tmp_path):
    m = mitm(parent_url(domain_squid), {
        "ntlm_username": f"CORP\\{TEST_USER}",
        "ntlm_password_file": secret_file(tmp_path, "pw", TEST_PASSWORD)},
        env=env_for(domain))
    url = f"{origin.url}/hello?ntlm-dc"
    assert curl("-x", m.url, url, url).stdout == "hellohello"
    assert wait_users(domain_squid, url, 2) == ["CORP\\\\alice", "CORP\\\\alice"]
    # No ticket: auto falls back to NTLM and says why; the DC logged the NTLM logon.
    assert m.wait_for("NTLM: Kerberos not used (no ticket in FILE:/nonexistent/krb5cc")
    assert any("NT_STATUS_OK" in line and "NTLMv2" in line for line in domain.auth_log("alice"))


def test_wrong_password_rejected_by_the_dc_and_the_guard_stops_before_lockout(
        mitm, domain, domain_squid, origin, tmp_path):
    user = "carol"
    before = domain.bad_password_count(user)
    m = mitm(parent_url(domain_squid), {
        "ntlm_username": f"CORP\\{user}", "ntlm_max_failures": 3,
        "ntlm_password_file": secret_file(tmp_path, "pw", WRONG_PASSWORD)},
        env=env_for(domain))
    for _ in range(5):  # five separate clients; each would be a failed logon without the guard
        r = curl("-x", m.url, "-w", "%{http_code}", "-o", "/dev/null", f"{origin.url}/x")
        assert r.stdout == "502"
    assert domain.bad_password_count(user) == before + 3
    # The DC's log shows the attempts (winbind logs each check more than once).
    assert any("NT_STATUS_WRONG_PASSWORD" in line for line in domain.auth_log(user))
    assert m.wait_for("stops sending these credentials")


def test_multiuser_each_client_logs_on_as_itself_at_the_dc(mitm, domain, domain_squid, origin):
    from tests.conftest import BOB_PASSWORD

    m = mitm(parent_url(domain_squid), {"ntlm_multiuser": True, "ntlm_domain": "CORP"},
             env=env_for(domain))
    for user, password in ((TEST_USER, TEST_PASSWORD), ("bob", BOB_PASSWORD)):
        url = f"{origin.url}/hello?multi-{user}"
        assert curl("-x", m.url, "-U", f"{user}:{password}", url).stdout == "hello"
        assert wait_users(domain_squid, url, 1) == [f"CORP\\\\{user}"]
    before = domain.bad_password_count("bob")
    r = curl("-x", m.url, "-U", f"bob:{WRONG_PASSWORD}", "-w", "%{http_code}", "-o", "/dev/null",
             "-D", "-", f"{origin.url}/multi-wrong")
    assert r.stdout.endswith("407") and 'Proxy-Authenticate: Basic' in r.stdout
    assert domain.bad_password_count("bob") == before + 1


def test_kerberos_from_a_ticket_cache(mitm, domain, domain_squid, origin, tls_origin, tmp_path):
    ccache = tmp_path / "krb5cc"
    domain.kinit(TEST_USER, TEST_PASSWORD, ccache)
    m = mitm(parent_url(domain_squid), {"ntlm_kerberos_ccache": f"FILE:{ccache}",
                                        "ignore_hosts": "127.0.0.1:" + str(tls_origin.port)},
             env=env_for(domain, f"FILE:{ccache}"))
    url = f"{origin.url}/hello?kerberos-cache"
    assert curl("-x", m.url, url).stdout == "hello"
    assert wait_users(domain_squid, url, 1) == [KERBEROS_PRINCIPAL]
    # CONNECT (passthrough https) with Kerberos too.
    r = curl("--cacert", str(tls_origin.cert_path), "-x", m.url, f"{tls_origin.url}/hello")
    assert r.stdout == "hello"
    assert eventually(lambda: any("CONNECT" in line and KERBEROS_PRINCIPAL in line
                                  for line in domain_squid.access_log()))
    assert m.wait_for(f"Kerberos for HTTP/localhost: ticket for {KERBEROS_PRINCIPAL} from "
                      f"ticket cache FILE:{ccache}")


def test_kerberos_in_mitmweb_flows_and_legs_with_the_token_redacted(domain, domain_squid,
                                                                     origin, tmp_path):
    from tests.test_trace import _wait
    from tests.web import MitmwebApi as Web

    ccache = tmp_path / "krb5cc"
    domain.kinit(TEST_USER, TEST_PASSWORD, ccache)
    web_port = free_port()
    m = Mitmdump(parent_url(domain_squid), {
        "ntlm_kerberos_ccache": f"FILE:{ccache}", "web_port": web_port, "ntlm_show_legs": True},
        confdir=tmp_path, tool="mitmweb", env=env_for(domain, f"FILE:{ccache}"))
    with m:
        assert curl("-x", m.url, f"{origin.url}/hello?web").stdout == "hello"
        web = Web(m, web_port)
        flows = _wait(lambda: [f for f in web.flows() if f.get("comment")])
        [real] = [f for f in flows if not f["comment"].startswith("Kerberos leg")]
        [leg] = [f for f in flows if f["comment"].startswith("Kerberos leg")]
        assert re.fullmatch(rf"Kerberos as {KERBEROS_PRINCIPAL} via localhost:\d+, 1 leg, \d+ ms"
                            rf"; handshake requests listed above it: {leg['id'][:8]}",
                            real["comment"])
        dumped = web.dump()
        story = next(f for f in FlowReader(io.BytesIO(dumped)).stream() if "ntlm" in f.metadata)
        meta = story.metadata["ntlm"]
        assert (meta["dialect"], meta["scheme"], meta["result"]) == \
            ("Kerberos", "Negotiate", "authenticated")
        assert meta["why"].startswith("Kerberos for HTTP/localhost: ticket for")
        legs = [f for f in FlowReader(io.BytesIO(dumped)).stream() if "ntlm_leg" in f.metadata]
        assert legs[0].request.headers["Proxy-Authorization"] == \
            "Negotiate [Kerberos token redacted]"
        assert leg["response"]["status_code"] == 200
        # The AP-REQ is a credential: neither the log nor mitmweb shows it.
        everything = m.output + str(web.flows()) + dumped.decode("latin-1")
        assert not re.search(r"YII[A-Za-z0-9+/=]{40}", everything)


def test_kerberos_from_a_keytab_renews_its_ticket(mitm, domain, domain_squid, origin, tmp_path):
    keytab = tmp_path / "alice.keytab"
    domain.export_keytab(TEST_USER, keytab)
    m = mitm(parent_url(domain_squid), {
        "ntlm_kerberos_keytab": str(keytab), "ntlm_kerberos_principal": KERBEROS_PRINCIPAL,
        "ntlm_kerberos_lifetime": 306,
        "ntlm_pool": False},  # each client connection logs on, so each needs the ticket
        env=env_for(domain))
    url = f"{origin.url}/hello?keytab"
    assert curl("-x", m.url, url).stdout == "hello"
    assert m.wait_for(f"obtained a ticket for {KERBEROS_PRINCIPAL} from keytab")
    time.sleep(7)  # renewal starts 300 s before expiry: the 306 s ticket is now due
    assert curl("-x", m.url, url).stdout == "hello"
    assert m.wait_for(f"renewed the ticket for {KERBEROS_PRINCIPAL} from keytab")
    assert wait_users(domain_squid, url, 2) == [KERBEROS_PRINCIPAL] * 2


def test_kerberos_with_the_password_and_a_kdc_rejection_is_one_failed_logon(
        mitm, domain, domain_squid, origin, tmp_path):
    m = mitm(parent_url(domain_squid), {
        "ntlm_username": f"CORP\\{TEST_USER}", "ntlm_kerberos_realm": REALM,
        "ntlm_password_file": secret_file(tmp_path, "pw", TEST_PASSWORD)}, env=env_for(domain))
    url = f"{origin.url}/hello?kerberos-password"
    assert curl("-x", m.url, url).stdout == "hello"
    assert wait_users(domain_squid, url, 1) == [KERBEROS_PRINCIPAL]
    assert m.wait_for(f"obtained a ticket for {KERBEROS_PRINCIPAL} from password")

    user = "dave"
    before = domain.bad_password_count(user)
    bad = mitm(parent_url(domain_squid), {
        "ntlm_username": f"CORP\\{user}", "ntlm_kerberos_realm": REALM,
        "ntlm_password_file": secret_file(tmp_path, "bad", WRONG_PASSWORD)},
        env=env_for(domain))
    r = curl("-x", bad.url, "-w", "%{http_code}", f"{origin.url}/x")
    assert r.stdout.endswith("502") and "the KDC rejected the password" in r.stdout
    # The KDC's refusal is not followed by an NTLM attempt with the same wrong password.
    assert domain.bad_password_count(user) == before + 1


def test_missing_ticket_falls_back_to_ntlm_or_fails_clearly_when_kerberos_is_pinned(
        mitm, domain, domain_squid, origin, tmp_path):
    missing = tmp_path / "no-such-cache"
    pinned = mitm(parent_url(domain_squid), {
        "ntlm_scheme": "kerberos", "ntlm_kerberos_ccache": f"FILE:{missing}"},
        env=env_for(domain))
    r = curl("-x", pinned.url, "-w", "%{http_code}", f"{origin.url}/pinned")
    assert r.stdout.endswith("502")
    assert "ntlm_scheme is kerberos, but Kerberos cannot be used" in r.stdout
    assert f"no ticket in FILE:{missing}" in r.stdout and "run kinit" in r.stdout

    expired = tmp_path / "short-cache"
    domain.kinit(TEST_USER, TEST_PASSWORD, expired, lifetime="3s")
    time.sleep(4)
    m = mitm(parent_url(domain_squid), {
        "ntlm_username": f"CORP\\{TEST_USER}", "ntlm_kerberos_ccache": f"FILE:{expired}",
        "ntlm_password_file": secret_file(tmp_path, "pw", TEST_PASSWORD)}, env=env_for(domain))
    url = f"{origin.url}/hello?expired"
    assert curl("-x", m.url, url).stdout == "hello"
    assert wait_users(domain_squid, url, 1) == ["CORP\\\\alice"]
    assert m.wait_for("expired; run kinit")


def test_parent_offering_only_negotiate_gets_ntlm_inside_it(mitm, domain, origin, tmp_path):
    with domain_squid(domain, schemes=("negotiate",)) as squid:
        m = mitm(parent_url(squid), {
            "ntlm_username": f"CORP\\{TEST_USER}",
            "ntlm_password_file": secret_file(tmp_path, "pw", TEST_PASSWORD)},
            env=env_for(domain))
        url = f"{origin.url}/hello?negotiate-only"
        assert curl("-x", m.url, url).stdout == "hello"
        assert wait_users(squid, url, 1) == ["CORP\\\\alice"]
        assert m.wait_for("NTLM inside Negotiate")


def test_parent_offering_only_ntlm_is_not_sent_kerberos_again(mitm, domain, origin, tmp_path):
    ccache = tmp_path / "krb5cc"
    domain.kinit(TEST_USER, TEST_PASSWORD, ccache)
    with domain_squid(domain, schemes=("ntlm",)) as squid:
        m = mitm(parent_url(squid), {
            "ntlm_username": f"CORP\\{TEST_USER}", "ntlm_kerberos_ccache": f"FILE:{ccache}",
            "ntlm_password_file": secret_file(tmp_path, "pw", TEST_PASSWORD),
            "ntlm_pool": False},  # the second client connection must choose again
            env=env_for(domain, f"FILE:{ccache}"))
        url = f"{origin.url}/hello?ntlm-only"
        assert curl("-x", m.url, url).stdout == "hello"  # Kerberos first, then NTLM
        assert curl("-x", m.url, url).stdout == "hello"  # NTLM straight away
        assert wait_users(squid, url, 2) == ["CORP\\\\alice"] * 2
        assert m.wait_for("did not accept the Kerberos ticket")
        assert m.wait_for("does not offer Negotiate")
        # Kerberos refused; then one Type 2 per connection.
        assert eventually(lambda: len([line for line in squid.access_log()
                                       if "TCP_DENIED/407" in line and url in line]) == 3)


def test_kinit_and_klist_work_against_the_test_realm(domain, tmp_path):
    """The set-up itself: the DC's KDC issues tickets a stock client can list."""
    ccache = tmp_path / "cc"
    domain.kinit(TEST_USER, TEST_PASSWORD, ccache)
    out = subprocess.run(["klist", "-c", f"FILE:{ccache}"], capture_output=True, text=True,
                         env={**domain.env()}).stdout
    assert KERBEROS_PRINCIPAL in out


def test_service_principal_can_be_named_when_the_parent_is_reached_by_another_name(
        mitm, domain, domain_squid, origin, tmp_path):
    """Addressed as 127.0.0.1 there is no HTTP/127.0.0.1 principal; ntlm_kerberos_spn names
    the real one, as for a proxy reached through an alias."""
    ccache = tmp_path / "krb5cc"
    domain.kinit(TEST_USER, TEST_PASSWORD, ccache)
    m = mitm(domain_squid.url, {"ntlm_kerberos_ccache": f"FILE:{ccache}",
                                "ntlm_kerberos_spn": "HTTP/localhost"},
             env=env_for(domain, f"FILE:{ccache}"))
    url = f"{origin.url}/hello?spn"
    assert curl("-x", m.url, url).stdout == "hello"
    assert wait_users(domain_squid, url, 1) == [KERBEROS_PRINCIPAL]
    assert m.wait_for("Kerberos for HTTP/localhost: ticket for")


def winbind_options(**more: object) -> dict[str, object]:
    return {"ntlm_winbind": True, **more}


def as_logged_on(dc: SambaDC, user: str) -> dict[str, str]:
    """The environment of a session of `user` (getpass.getuser() reads LOGNAME/USER)."""
    return {**env_for(dc), "LOGNAME": user, "USER": user}


def test_winbind_single_sign_on_with_the_logged_on_users_cached_credentials(
        mitm, domain, domain_squid, origin):
    """No password and no user name in mitmproxy: winbind's cached logon of the session's user
    answers the DC-checked NTLM challenge, and the handshake's ntlm_auth is ended."""
    domain.cache_logon(TEST_USER, TEST_PASSWORD)
    m = mitm(parent_url(domain_squid), winbind_options(ntlm_domain="CORP"),
             env=as_logged_on(domain, TEST_USER))
    url = f"{origin.url}/hello?winbind-sso"
    assert curl("-x", m.url, url, url).stdout == "hellohello"
    assert wait_users(domain_squid, url, 2) == ["CORP\\\\alice", "CORP\\\\alice"]
    assert m.wait_for("NTLM by winbind (cached credentials) as CORP\\alice")
    assert m.wait_for("NTLM by winbind: Kerberos not used")
    assert m.proc is not None  # the handshake's helper has ended; the spare started ahead waits
    assert programs_below(m.proc.pid).count("ntlm_auth") == 1


def test_winbind_without_cached_credentials_is_a_clear_error(mitm, domain, domain_squid,
                                                              origin):
    """bob has no cached logon: a 502 naming the fix, and no logon attempt at the DC."""
    before = domain.bad_password_count("bob")
    m = mitm(parent_url(domain_squid), winbind_options(ntlm_username="CORP\\bob"),
             env=env_for(domain))
    r = curl("-x", m.url, "-w", "\n%{http_code}", f"{origin.url}/winbind-no-cache")
    assert r.stdout.endswith("\n502")
    assert "winbind has no cached credentials for CORP\\bob" in r.stdout
    assert "wbinfo --ccache-save" in r.stdout
    assert m.wait_for("no cached credentials for CORP\\bob")
    assert domain.bad_password_count("bob") == before
    assert m.proc is not None  # the handshake's helper has ended; the spare started ahead waits
    assert programs_below(m.proc.pid).count("ntlm_auth") == 1


def test_winbind_with_a_stale_cached_password_is_stopped_by_the_lockout_guard(
        mitm, domain, domain_squid, origin):
    """The DC rejects the cached (old) password: each rejection counts, and the guard stops
    before the account would lock."""
    user = "dave"
    domain.cache_logon(user, WRONG_PASSWORD)
    before = domain.bad_password_count(user)
    m = mitm(parent_url(domain_squid), winbind_options(ntlm_username=f"CORP\\{user}",
                                                       ntlm_max_failures=3),
             env=env_for(domain))
    for _ in range(5):
        r = curl("-x", m.url, "-w", "%{http_code}", "-o", "/dev/null", f"{origin.url}/x")
        assert r.stdout == "502"
    assert domain.bad_password_count(user) == before + 3
    assert m.wait_for("stops sending these credentials")
