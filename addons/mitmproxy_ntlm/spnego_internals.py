"""Every private pyspnego name the addon uses, behind a check of pyspnego's version.

pyspnego's public API runs handshakes (`spnego.client`); decoding tokens for logs and views and
computing the NTLM one-way functions need its private modules (`spnego._ntlm_raw`,
`spnego._spnego`, `spnego._kerberos`, `spnego._context`), which may change in any release. So
the rest of the package imports those names from here only, and this module refuses a pyspnego
release line that was not tested (pyproject.toml pins the same: `pyspnego>=0.12,<0.13`).

pyspnego itself is imported here too (the package uses `spnego` from this module): without its
Kerberos packages, which `load_kerberos` adds to `spnego._gss` when Kerberos is first used.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from importlib.abc import MetaPathFinder
from typing import Any

from .versions import TESTED_PYSPNEGO, distribution_version, pyspnego_tested


class UnsupportedPyspnego(ImportError):
    pass


def check_version(version: str | None = None) -> None:
    """Refuse a pyspnego whose private modules we have not tested."""
    version = version or distribution_version("pyspnego")
    if not pyspnego_tested(version):
        tested = ", ".join(v + "x" for v in TESTED_PYSPNEGO)
        raise UnsupportedPyspnego(
            f"mitmproxy-ntlm uses private modules of pyspnego and is tested with pyspnego "
            f"{tested}; this is pyspnego {version}. Install a tested version: "
            f"pip install 'pyspnego>=0.12,<0.13'")


KERBEROS_PACKAGES = ("gssapi", "krb5")
"""The `kerberos` extra: pyspnego imports both whenever they are installed."""


class _KerberosLater(MetaPathFinder):
    """Refuses the Kerberos packages while pyspnego is first imported, as if not installed:
    they cost 6-7 MB of memory and NTLM never needs them. `load_kerberos` brings them in.
    (pyspnego's `gss` module, which re-exports `_gss`, is not imported by pyspnego.)"""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in KERBEROS_PACKAGES:
            raise ModuleNotFoundError(f"{fullname} is loaded when Kerberos is first used",
                                      name=fullname)
        return None


def _import_spnego_without_kerberos() -> None:
    if "spnego" in sys.modules:
        return  # imported before us (another addon): with whatever it found
    finder = _KerberosLater()
    sys.meta_path.insert(0, finder)
    try:
        import spnego  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


@functools.cache
def kerberos_installed() -> bool:
    """Whether the `kerberos` extra is installed, without loading it. Asked once per process
    (the search of sys.path takes about 85 us, and `ntlm_scheme` auto asks at every logon
    with a parent that offers Negotiate), as the import at start-up used to decide it."""
    return all(importlib.util.find_spec(name) is not None for name in KERBEROS_PACKAGES)


def load_kerberos() -> bool:
    """Loads gssapi and krb5 and runs pyspnego's GSSAPI module again, as its first import
    would have run with them: `spnego.exceptions.GSSError` (its methods' error wrapper) is
    gssapi's, and the modules that imported `GSSAPIProxy` get the new class. False when the
    extra is not installed."""
    import spnego._gss
    import spnego._negotiate
    import spnego.auth

    if spnego._gss.HAS_GSSAPI:
        return True
    try:
        import gssapi.raw
        import krb5  # noqa: F401
    except ImportError:
        return False
    spnego.exceptions.GSSError = gssapi.raw.GSSError
    importlib.reload(spnego._gss)
    for module in (spnego.auth, spnego._negotiate):
        module.GSSAPIProxy = spnego._gss.GSSAPIProxy  # type: ignore[attr-defined]
    return spnego._gss.HAS_GSSAPI


check_version()  # before the imports below: an untested release may lack them
_import_spnego_without_kerberos()

# ruff: noqa: E402
import spnego
import spnego.exceptions
from spnego._context import GSSMech
from spnego._kerberos import (
    KerberosV5Msg,
    KrbApRep,
    KrbApReq,
    KrbError,
    PrincipalName,
    parse_enum,
    parse_flags,
)
from spnego._ntlm_raw.crypto import lmowfv1, ntowfv1, ntowfv2
from spnego._ntlm_raw.messages import (
    Authenticate,
    AvFlags,
    AvId,
    Challenge,
    Negotiate,
    NegotiateFlags,
    Version,
)
from spnego._spnego import InitialContextToken, NegTokenInit, NegTokenResp, unpack_token

__all__ = [
    "Authenticate", "AvFlags", "AvId", "Challenge", "GSSMech", "InitialContextToken",
    "KerberosV5Msg", "KrbApRep", "KrbApReq", "KrbError", "NegTokenInit", "NegTokenResp",
    "Negotiate", "NegotiateFlags", "PrincipalName", "UnsupportedPyspnego", "Version",
    "check_version", "kerberos_installed", "lmowfv1", "load_kerberos", "ntowfv1", "ntowfv2",
    "parse_enum", "parse_flags", "spnego", "unpack_token",
]
