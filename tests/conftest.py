"""Fixtures that start real loopback servers: NTLM parents, origins, git, a package index, Squid.

Every fixture starts its server itself and stops it at teardown (no server outlives its scope).
Cheap Python servers are function-scoped so counters and request logs start empty; Squid takes
about 2 s to shut down cleanly, so the Squid fixtures are module-scoped.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import Mitmdump
from tests.servers import GitServer, Origin, PackageIndex, Squid

TEST_USERS: dict[str, str] = {f"{TEST_DOMAIN}\\{TEST_USER}": TEST_PASSWORD}


@pytest.fixture
def parent() -> Iterator[ParentProxy]:
    """Password-checking NTLM parent that knows CORP\\alice / Secret-Pass-1."""
    with ParentProxy(TEST_USERS, require_auth=True) as p:
        yield p


@pytest.fixture
def make_parent() -> Iterator[Callable[..., ParentProxy]]:
    """Factory for started parents with other options (fault=..., rechallenge_after=...).

    Defaults to the test user table; every parent made is stopped at teardown.
    """
    made: list[ParentProxy] = []

    def factory(**kwargs: Any) -> ParentProxy:
        kwargs.setdefault("users", TEST_USERS)
        p = ParentProxy(**kwargs)
        made.append(p)
        return p.start()

    yield factory
    for p in made:
        p.stop()


@pytest.fixture
def noauth_parent() -> Iterator[ParentProxy]:
    """Parent that forwards everything without authentication."""
    with ParentProxy(require_auth=False) as p:
        yield p


@pytest.fixture
def origin() -> Iterator[Origin]:
    """Plain-http keep-alive origin recording every request."""
    with Origin() as o:
        yield o


@pytest.fixture
def tls_origin() -> Iterator[Origin]:
    """HTTPS origin with a self-signed cert for localhost/127.0.0.1 (``.cert_path``)."""
    with Origin(tls=True) as o:
        yield o


@pytest.fixture
def git_server() -> Iterator[GitServer]:
    """Smart-HTTP git server; ``.url`` is the clone URL, ``.head_commit`` the expected HEAD."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    with GitServer() as g:
        yield g


@pytest.fixture
def package_index() -> Iterator[PackageIndex]:
    """PEP 503 index serving ntlmdemo 1.0; ``.url`` is the --index-url."""
    with PackageIndex() as pi:
        yield pi


def _squid(mode: str) -> Iterator[Squid]:
    if shutil.which("squid") is None:
        pytest.skip("squid not installed")
    with Squid(mode) as s:
        yield s


@pytest.fixture(scope="module")
def squid_ntlm() -> Iterator[Squid]:
    """Squid demanding NTLM via ntlm_fake_auth (real handshakes, any password accepted)."""
    yield from _squid("ntlm_fake")


@pytest.fixture(scope="module")
def squid_noauth() -> Iterator[Squid]:
    """Squid without authentication."""
    yield from _squid("none")


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    """The test password in a 0600 file, the recommended way to give it to the addon."""
    f = tmp_path / "ntlm-password"
    f.write_text(TEST_PASSWORD + "\n")
    f.chmod(0o600)
    return f


@pytest.fixture
def mitm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mitmdump]]:
    """Factory: start mitmdump with the addon; every instance is stopped after the test."""
    confdir = tmp_path_factory.getbasetemp() / "mitm-confdir"
    confdir.mkdir(exist_ok=True)
    started: list[Mitmdump] = []

    def start(parent_url: str | None, options: dict | None = None, *args: str,
              expect_failure: bool = False, env: dict | None = None) -> Mitmdump:
        m = Mitmdump(parent_url, options, *args, confdir=confdir, env=env)
        started.append(m)
        return m.start(expect_failure=expect_failure)

    yield start
    for m in started:
        m.stop()


BOB_PASSWORD = "Bob-Pass-2x"


@pytest.fixture(scope="session")
def domain() -> Iterator[Any]:
    """A Samba AD DC for CORP.TEST on loopback: alice (the test password), bob, carol, dave."""
    from tests.domain import SambaDC

    users = {TEST_USER: TEST_PASSWORD, "bob": BOB_PASSWORD, "carol": "Carol-Pass-3x",
             "dave": "Dave-Pass-4x"}
    with SambaDC(users) as dc:
        yield dc


@pytest.fixture(scope="module")
def domain_squid(domain: Any) -> Iterator[Squid]:
    """Squid offering Negotiate (Kerberos, or NTLM inside) and NTLM, both checked by the DC."""
    from tests.domain import domain_squid as make

    with make(domain) as s:
        yield s
