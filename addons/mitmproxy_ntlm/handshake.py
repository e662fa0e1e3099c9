"""One client side of an NTLM exchange (Type 1 -> Type 2 -> Type 3), done by pyspnego.

pyspnego picks the dialect from the `LM_COMPAT_LEVEL` environment variable and the workstation
name from `NETBIOS_COMPUTER_NAME`, read while a context is built and stepped. mitmproxy runs
addons and layers on one event loop thread, so setting them around each call is safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from enum import StrEnum

from .credentials import Credentials
from .spnego_internals import spnego


class Dialect(StrEnum):
    """NTLM response dialects, strongest first."""

    NTLMV2 = "ntlmv2"
    NTLM2SR = "ntlm2sr"
    NTLMV1 = "ntlmv1"

    @property
    def lm_compat_level(self) -> int:
        return {"ntlmv2": 3, "ntlm2sr": 1, "ntlmv1": 0}[self.value]

    @property
    def label(self) -> str:
        return {"ntlmv2": "NTLMv2", "ntlm2sr": "NTLM2SR", "ntlmv1": "NTLMv1"}[self.value]


class ChallengeError(ValueError):
    """The parent's Type 2 challenge could not be used; the message says why."""


class NtlmClientError(RuntimeError):
    """The local NTLM client (winbind's ntlm_auth) made no message; the text says why and what
    to do about it. Nothing was sent to the parent, so it is not a failed logon."""


def quiet_spnego_logs() -> None:
    """pyspnego logs every token at DEBUG, Type 3 included: keep that out of any log."""
    logging.getLogger("spnego").setLevel(logging.INFO)


@contextlib.contextmanager
def _spnego_environment(dialect: Dialect, workstation: str) -> Iterator[None]:
    wanted = {"LM_COMPAT_LEVEL": str(dialect.lm_compat_level), "NETBIOS_COMPUTER_NAME": workstation}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class NtlmHandshake:
    """Produces the Type 1 and, given the peer's Type 2, the Type 3 for one connection.

    The messages are raw NTLMSSP under either header scheme: under `Negotiate` that is what
    Windows clients send when Kerberos is not available, and what Squid's negotiate_wrapper and
    IIS accept. pyspnego's own NTLM is always used (never SPNEGO through gssapi, which would
    try Kerberos with the NTLM secret as a password: a failed logon at the domain controller).
    """

    single_leg = False
    mechanism = "NTLM"

    def __init__(self, creds: Credentials, dialect: Dialect, target_host: str,
                 scheme: str = "NTLM") -> None:
        self.creds = creds
        self.dialect = dialect
        self.scheme = scheme
        with _spnego_environment(dialect, creds.workstation):
            self._ctx = spnego.client(
                creds.principal,
                creds.spnego_secret(),
                hostname=target_host,
                service="http",
                protocol="ntlm",
                options=spnego.NegotiateOptions.use_ntlm,
            )

    def negotiate(self) -> bytes:
        with _spnego_environment(self.dialect, self.creds.workstation):
            token = self._ctx.step()
        assert token is not None
        return token

    def authenticate(self, challenge: bytes) -> bytes:
        """The Type 3 answering `challenge`; ChallengeError when the challenge is unusable."""
        if not challenge.startswith(b"NTLMSSP\x00\x02\x00\x00\x00"):
            raise ChallengeError("the NTLM challenge is not an NTLMSSP Type 2 message")
        try:
            with _spnego_environment(self.dialect, self.creds.workstation):
                token = self._ctx.step(challenge)
        except (ValueError, KeyError, IndexError, spnego.exceptions.SpnegoError) as e:
            raise ChallengeError(f"the NTLM challenge is malformed ({e})") from None
        except Exception as e:  # pyspnego's parser raises assorted errors on garbage
            raise ChallengeError(f"the NTLM challenge is malformed ({type(e).__name__})") from None
        if not token:
            raise ChallengeError("pyspnego produced no Type 3 for this challenge")
        return token
