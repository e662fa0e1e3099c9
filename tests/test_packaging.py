"""What pip resolves is what the addon runs on, and an installed package names its own files."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from mitmproxy_ntlm import mitmproxy_internals
from mitmproxy_ntlm.versions import mitmproxy_tested
from tests.mitm import ROOT

RELEASES = ["10.3.1", "10.4.2", "11.0.2", "11.1.3", "12.0.1", "12.1.2", "12.2.3", "12.3.0",
            "12.3.1", "12.4.0", "13.0.0"]


def dependency(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [r for r in map(Requirement, project["dependencies"]) if r.name == name]
    return req


@pytest.mark.parametrize("version", RELEASES)
def test_pip_range_admits_exactly_the_versions_the_addon_runs_on(version: str) -> None:
    admitted = dependency("mitmproxy").specifier.contains(version)
    assert admitted == mitmproxy_tested(version)
    if admitted:
        mitmproxy_internals.check_version(version)
    else:
        with pytest.raises(mitmproxy_internals.UnsupportedMitmproxy, match=r"12\.3\.1"):
            mitmproxy_internals.check_version(version)


def test_newest_mitmproxy_for_python_312_and_313_is_accepted() -> None:
    mitmproxy_internals.check_version("12.3.1")


def test_pyspnego_private_modules_are_bounded() -> None:
    spec = dependency("pyspnego").specifier
    assert spec.contains("0.12.4")
    assert not spec.contains("0.13.0")  # spnego._ntlm_raw is private: untested releases are out


@pytest.mark.parametrize("version", ["0.11.2", "0.12.0", "0.12.4", "0.13.0", "1.0.0"])
def test_pyspnego_check_admits_what_pip_admits(version: str) -> None:
    """spnego_internals refuses, naming the tested line, what pyproject's range keeps out."""
    from mitmproxy_ntlm import spnego_internals

    if dependency("pyspnego").specifier.contains(version):
        spnego_internals.check_version(version)
    else:
        with pytest.raises(spnego_internals.UnsupportedPyspnego, match=r"0\.12\.x"):
            spnego_internals.check_version(version)


def mitm_ntlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mitmproxy_ntlm", *args], capture_output=True,
                          text=True, timeout=60, cwd="/")


def test_version_names_the_addon_mitmproxy_and_pyspnego() -> None:
    from importlib import metadata

    r = mitm_ntlm("--version")
    assert r.returncode == 0, r.stderr
    assert f"mitmproxy {metadata.version('mitmproxy')}" in r.stdout
    assert f"pyspnego {metadata.version('pyspnego')}" in r.stdout
    assert r.stdout.startswith("mitmproxy-ntlm ")


def test_script_and_configs_are_files_of_the_package() -> None:
    from pathlib import Path

    import mitmproxy_ntlm

    package = Path(mitmproxy_ntlm.__file__).parent
    script = Path(mitm_ntlm("script").stdout.strip())
    assert script.is_file() and package in script.parents
    assert "addons = [new_group()]" in script.read_text()
    configs = [Path(p) for p in mitm_ntlm("configs").stdout.split()]
    assert {p.name for p in configs} == {"upstream.yaml", "multiuser.yaml", "regular-mode.yaml",
                                         "failover.yaml", "pac.yaml"}
    assert all(p.is_file() and package in p.parents for p in configs)


def test_every_shipped_config_is_package_data() -> None:
    """A file in configs/ that no package-data pattern names would be missing from the wheel
    (the balancer configs, the service units), though the checkout's tests find it."""
    from fnmatch import fnmatch

    from mitmproxy_ntlm.locations import CONFIGS

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["mitmproxy_ntlm"]
    names = {p.name for p in CONFIGS.iterdir()}
    assert {"haproxy.cfg", "nginx-stream.conf", "mitm-ntlm.service"} <= names
    assert [n for n in sorted(names) if not any(fnmatch(f"configs/{n}", p) for p in patterns)] == []
