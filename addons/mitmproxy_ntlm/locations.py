"""Where the files a user needs are, in a checkout and in an installed package alike."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

ADDON_SCRIPT = PACKAGE / "scripts" / "ntlm.py"
"""The script for `mitmdump/mitmweb/mitmproxy -s` (shipped inside the package)."""

CONFIGS = PACKAGE / "configs"
"""Example config.yaml files (package data)."""

DEFAULT_CONFDIR = "~/.mitmproxy"
"""mitmproxy's own default `confdir`: its CA and config.yaml live there."""


def example_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


def mitmproxy_ca(confdir: str = DEFAULT_CONFDIR) -> Path:
    """The CA certificate (PEM) mitmproxy creates in its confdir on first start."""
    return Path(confdir).expanduser() / "mitmproxy-ca-cert.pem"
