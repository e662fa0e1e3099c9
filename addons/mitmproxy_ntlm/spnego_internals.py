"""Every private pyspnego name the addon uses, behind a check of pyspnego's version.

pyspnego's public API runs handshakes (`spnego.client`); decoding tokens for logs and views and
computing the NTLM one-way functions need its private modules (`spnego._ntlm_raw`,
`spnego._spnego`, `spnego._kerberos`, `spnego._context`), which may change in any release. So
the rest of the package imports those names from here only, and this module refuses a pyspnego
release line that was not tested (pyproject.toml pins the same: `pyspnego>=0.12,<0.13`).
"""

from __future__ import annotations

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


check_version()  # before the imports below: an untested release may lack them

# ruff: noqa: E402
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
    "check_version", "lmowfv1", "ntowfv1", "ntowfv2", "parse_enum", "parse_flags",
    "unpack_token",
]
