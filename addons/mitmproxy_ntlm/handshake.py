"""One client side of an NTLM exchange (Type 1 -> Type 2 -> Type 3), done by pyspnego.

pyspnego picks the dialect from the `LM_COMPAT_LEVEL` environment variable, read when a context
is built, and the workstation name from `NETBIOS_COMPUTER_NAME`, read when the Type 3 is made.
mitmproxy runs addons and layers on one event loop thread, so setting each around the call that
reads it is safe (tests/test_handshake.py checks both land in the Type 3).
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
def _environment(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` for one pyspnego call, then as it was."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


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
        with _environment("LM_COMPAT_LEVEL", str(dialect.lm_compat_level)):
            self._ctx = spnego.client(
                creds.principal,
                creds.spnego_secret(),
                hostname=target_host,
                service="http",
                protocol="ntlm",
                options=spnego.NegotiateOptions.use_ntlm,
            )

    def negotiate(self) -> bytes:
        token = self._ctx.step()
        assert token is not None
        return token

    def authenticate(self, challenge: bytes) -> bytes:
        """The Type 3 answering `challenge`; ChallengeError when the challenge is unusable."""
        if not challenge.startswith(b"NTLMSSP\x00\x02\x00\x00\x00"):
            raise ChallengeError("the NTLM challenge is not an NTLMSSP Type 2 message")
        try:
            with _environment("NETBIOS_COMPUTER_NAME", self.creds.workstation):
                token = self._ctx.step(challenge)
        except (ValueError, KeyError, IndexError, spnego.exceptions.SpnegoError) as e:
            raise ChallengeError(f"the NTLM challenge is malformed ({e})") from None
        except Exception as e:  # pyspnego's parser raises assorted errors on garbage
            raise ChallengeError(f"the NTLM challenge is malformed ({type(e).__name__})") from None
        if not token:
            raise ChallengeError("pyspnego produced no Type 3 for this challenge")
        return token
