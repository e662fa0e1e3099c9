"""Which versions this is and which it was tested with (`mitm-ntlm --version`, check_version).

The addon replaces a private mitmproxy layer and imports pyspnego's private modules
(`spnego_internals`), so it runs only on the release lines CI tests; pyproject.toml's ranges
say the same, so that a fresh install never gets a version the addon refuses.
"""

from __future__ import annotations

import sys
from importlib import metadata

from . import __version__

TESTED_MITMPROXY = ("11.0.", "12.2.", "12.3.")
"""mitmproxy release lines CI runs the suite on (.ci/run)."""

NEWEST_MITMPROXY = {"3.11": "11.0.2", "3.12+": "12.3.1"}
"""The newest tested release per Python, for the hint in a refusal."""

TESTED_PYSPNEGO = ("0.12.",)
"""pyspnego release lines whose private modules `spnego_internals` is tested with."""


def mitmproxy_tested(version: str) -> bool:
    return version.startswith(TESTED_MITMPROXY)


def pyspnego_tested(version: str) -> bool:
    return version.startswith(TESTED_PYSPNEGO)


def distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    mitm = distribution_version("mitmproxy")
    tested = "" if mitm == "not installed" or mitmproxy_tested(mitm) else (
        f" (untested: the addon refuses it; tested lines: "
        f"{', '.join(v + 'x' for v in TESTED_MITMPROXY)})")
    return (f"mitmproxy-ntlm {__version__}\n"
            f"mitmproxy {mitm}{tested}\n"
            f"pyspnego {distribution_version('pyspnego')}\n"
            f"Python {sys.version.split()[0]}")
