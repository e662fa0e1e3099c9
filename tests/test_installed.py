"""The package as a user gets it: a wheel built from the repo, installed into a fresh venv of
Python 3.11, 3.12 and 3.13 (pip picks the newest mitmproxy each may have), run from a folder
outside the checkout: `mitm-ntlm start` (demo parent and a real NTLM Squid) and
`mitmdump -s "$(mitm-ntlm script)"`, with plain http, https passed through (curl trusts only
the origin's own certificate) and https intercepted (curl trusts only mitmproxy's CA).

pip downloads mitmproxy once per Python (its cache makes later runs quicker); marker
`installed`, so `-m 'not installed'` leaves it out. A Python that is not found is skipped,
unless MITM_NTLM_NEED_ALL_PYTHONS is set (CI sets it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mitmproxy_ntlm.versions import mitmproxy_tested
from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import ROOT
from tests.servers import free_port, wait_port

pytestmark = pytest.mark.installed

PYTHONS = ("3.11", "3.12", "3.13")
NEWEST_FOR = {"3.11": "11.0.", "3.12": "12.3.", "3.13": "12.3."}
"""The release line pip must pick on each Python (the newest the registry serves and we test)."""


def find_python(minor: str) -> str | None:
    """python3.X from PATH, else from pyenv."""
    found = shutil.which(f"python{minor}")
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [found] if found else []
    candidates += sorted(glob.glob(f"{pyenv}/versions/{minor}.*/bin/python{minor}"), reverse=True)
    for candidate in candidates:
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


def user_env() -> dict[str, str]:
    """A user's environment: no proxy variables, nothing pointing into the checkout."""
    return {k: v for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
            and k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (setuptools would otherwise reuse build/)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "addons", src / "addons",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300, env=user_env())
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = out.glob("mitmproxy_ntlm-*.whl")
    return built


@dataclass
class Venv:
    minor: str
    path: Path
    home: Path  # cwd and HOME of the user: outside the checkout

    def bin(self, tool: str) -> str:
        return str(self.path / "bin" / tool)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.home, env=self.env())

    def env(self) -> dict[str, str]:
        return {**user_env(), "HOME": str(self.home), "PATH": f"{self.path / 'bin'}:"
                f"{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module", params=PYTHONS)
def venv(request: pytest.FixtureRequest, wheel: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Venv:
    minor = request.param
    python = find_python(minor)
    if python is None:
        if os.environ.get("MITM_NTLM_NEED_ALL_PYTHONS"):
            pytest.fail(f"Python {minor} not found (PATH, pyenv)")
        pytest.skip(f"Python {minor} not found (PATH, pyenv)")
    base = tmp_path_factory.mktemp(f"py{minor}")
    home = base / "home"
    home.mkdir()
    v = Venv(minor, base / "venv", home)
    r = v.run(python, "-m", "venv", str(v.path))
    assert r.returncode == 0, r.stderr
    r = v.run(v.bin("pip"), "install", "-q", str(wheel), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return v


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def run_proxy(venv: Venv) -> Iterator:
    """Start a proxy command of the venv; every one is stopped after the test."""
    started: list[Proxy] = []

    def start(*args: str) -> Proxy:
        port = free_port()
        log = venv.home / f"proxy-{len(started)}.log"
        cmd = [a.replace("{port}", str(port)) for a in args]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    cwd=venv.home, env=venv.env())
        proxy = Proxy(proc, port, log)
        started.append(proxy)
        try:
            wait_port(port, 60, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}: {proxy.output()[-3000:]}") from None
        return proxy

    yield start
    for proxy in started:
        proxy.proc.terminate()
        try:
            proxy.proc.wait(15)
        except subprocess.TimeoutExpired:
            proxy.proc.kill()
            proxy.proc.wait()


def fetch(proxy: Proxy, url: str, *curl_args: str) -> str:
    """GET through the proxy with curl; returns the body (asserts success)."""
    r = subprocess.run(["curl", "-sS", "--max-time", "30", "-x", proxy.url, *curl_args, url],
                       capture_output=True, text=True, timeout=60, env=user_env())
    assert r.returncode == 0, f"{url}: {r.stderr}\n{proxy.output()[-3000:]}"
    return r.stdout


def new_log_line(squid, seen: int, *parts: str, timeout: float = 10) -> bool:
    """Whether an access log line after the first `seen` has all the parts (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(all(p in line for p in parts) for line in squid.access_log()[seen:]):
            return True
        time.sleep(0.1)
    return False


def https_host(tls_origin, host: str) -> str:
    return f"https://{host}:{tls_origin.port}/hello"


@pytest.fixture
def secret(venv: Venv) -> Path:
    f = venv.home / "ntlm-password"
    f.write_text(TEST_PASSWORD + "\n")
    f.chmod(0o600)
    return f


def test_cli_names_versions_and_installed_paths(venv: Venv) -> None:
    r = venv.run(venv.bin("mitm-ntlm"), "--version")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["mitmproxy-ntlm"]
    assert lines["mitmproxy"].startswith(NEWEST_FOR[venv.minor]), r.stdout
    assert mitmproxy_tested(lines["mitmproxy"]), r.stdout
    assert lines["pyspnego"].startswith("0.12."), r.stdout
    site = venv.path / "lib"
    script = Path(venv.run(venv.bin("mitm-ntlm"), "script").stdout.strip())
    assert script.is_file() and site in script.parents
    configs = venv.run(venv.bin("mitm-ntlm"), "configs").stdout.split()
    assert {Path(c).name for c in configs} >= {"upstream.yaml", "multiuser.yaml"}
    assert all(Path(c).is_file() and site in Path(c).parents for c in configs)
    copied = venv.run(venv.bin("mitm-ntlm"), "configs", "--copy", "mine").stdout.split()
    assert (venv.home / "mine" / "upstream.yaml").read_text() == Path(configs[-1]).read_text()
    assert len(copied) == len(configs)
    # What import-cntlm writes tells the user a command that works in this install.
    conf = venv.home / "cntlm.conf"
    conf.write_text("Username alice\nDomain CORP\nProxy proxy.corp.example:8080\n"
                    "PassNT 77B9081511704EE852F94227CF48A793\nListen 3128\n")
    r = venv.run(venv.bin("mitm-ntlm"), "import-cntlm", str(conf))
    assert r.returncode == 0, r.stderr
    assert "addons/" not in r.stdout + r.stderr
    assert '-s "$(mitm-ntlm script)"' in r.stdout


def test_start_demo_passes_https_through(venv: Venv, run_proxy, origin, tls_origin) -> None:
    """`mitm-ntlm start` alone: the demo parent demands NTLM; https is not intercepted, so curl
    trusting only the origin's certificate succeeds."""
    proxy = run_proxy(venv.bin("mitm-ntlm"), "start", "--port", "{port}")
    assert fetch(proxy, f"{origin.url}/hello") == "hello"
    assert fetch(proxy, https_host(tls_origin, "127.0.0.1"),
                 "--cacert", str(tls_origin.cert_path)) == "hello"
    out = proxy.output()
    assert "HTTPS passes through untouched" in out
    assert "the OS CA store" in out  # upstream checks trust the OS store, and it says so


def test_start_with_squid_intercepts_only_the_hosts_asked_for(
        venv: Venv, run_proxy, squid_ntlm, origin, tls_origin, secret: Path) -> None:
    confdir = venv.home / "mitm-conf"
    seen = len(squid_ntlm.access_log())  # the Squid serves every Python's tests
    proxy = run_proxy(venv.bin("mitm-ntlm"), "start", "--parent", squid_ntlm.url,
                      "--user", f"{TEST_DOMAIN}\\{TEST_USER}", "--password-file", str(secret),
                      "--port", "{port}", "--intercept", "localhost",
                      "--set", f"confdir={confdir}",
                      "--set", f"ssl_verify_upstream_trusted_ca={tls_origin.cert_path}")
    assert fetch(proxy, f"{origin.url}/hello") == "hello"
    mitm_ca = confdir / "mitmproxy-ca-cert.pem"
    assert fetch(proxy, https_host(tls_origin, "localhost"), "--cacert", str(mitm_ca)) == "hello"
    assert fetch(proxy, https_host(tls_origin, "127.0.0.1"),
                 "--cacert", str(tls_origin.cert_path)) == "hello"  # not asked for: passed through
    assert str(mitm_ca) in proxy.output()  # where the CA is, for the trust commands
    # Squid demands NTLM, so a tunnel it let through was authenticated (a tunnel's line lands
    # when it closes: the passed-through one closes with curl).
    assert new_log_line(squid_ntlm, seen, "TCP_TUNNEL/200", f"CONNECT 127.0.0.1:{tls_origin.port}")
    assert new_log_line(squid_ntlm, seen, "TCP_MISS/200", f"{origin.url}/hello")


def test_mitmdump_with_the_installed_script(venv: Venv, run_proxy, squid_ntlm, origin,
                                            tls_origin, secret: Path) -> None:
    """The documented command for mitmdump (mitmweb takes the same): passthrough, then all
    HTTPS intercepted."""
    script = venv.run(venv.bin("mitm-ntlm"), "script").stdout.strip()
    common = ["--mode", f"upstream:{squid_ntlm.url}", "--listen-host", "127.0.0.1",
              "-p", "{port}", "--set", f"ntlm_username={TEST_DOMAIN}\\{TEST_USER}",
              "--set", f"ntlm_password_file={secret}"]
    passing = run_proxy(venv.bin("mitmdump"), "-s", script, *common, "--ignore-hosts", ".*")
    assert fetch(passing, f"{origin.url}/hello") == "hello"
    assert fetch(passing, https_host(tls_origin, "127.0.0.1"),
                 "--cacert", str(tls_origin.cert_path)) == "hello"
    confdir = venv.home / "web-conf"
    tool = "mitmweb" if venv.minor == PYTHONS[-1] else "mitmdump"
    web = ["--set", "web_open_browser=false", "--set", f"web_port={free_port()}"] \
        if tool == "mitmweb" else []
    intercepting = run_proxy(venv.bin(tool), "-s", script, *common, *web,
                             "--set", f"confdir={confdir}",
                             "--set", f"ssl_verify_upstream_trusted_ca={tls_origin.cert_path}")
    deadline = time.monotonic() + 10
    while not (confdir / "mitmproxy-ca-cert.pem").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fetch(intercepting, https_host(tls_origin, "127.0.0.1"),
                 "--cacert", str(confdir / "mitmproxy-ca-cert.pem")) == "hello"
    assert "the OS CA store" not in intercepting.output()  # the user's own setting wins
