"""Which scheme to answer a peer with: Kerberos (in Negotiate), NTLM, or NTLM inside Negotiate.

`auto` prefers Kerberos when a ticket is at hand and the peer may take it, as Windows and Px
do, and falls back to NTLM with the reason on record; `kerberos` and `ntlm` pin one. What each
peer offers is learned from its bare 407/401 challenges, so a parent that offers only NTLM is
not sent Kerberos again, and one that offers only Negotiate gets NTLM inside it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from .bounded import bounded_set
from .credentials import Credentials
from .handshake import Dialect, NtlmClientError, NtlmHandshake
from .kerberos import KerberosHandshake, KerberosRejected, KerberosTickets, KerberosUnavailable
from .winbind import WinbindHandshake, WinbindHelpers

log = logging.getLogger("mitmproxy_ntlm")

REFUSAL_TTL = 300.0
"""Seconds a peer that refused our Kerberos ticket is sent NTLM without trying Kerberos."""


class SchemeMode(StrEnum):
    AUTO = "auto"
    KERBEROS = "kerberos"
    NTLM = "ntlm"


class NoScheme(Exception):
    """Neither Kerberos nor NTLM can be offered to this peer; the message says why."""


@dataclass
class Choice:
    handshake: NtlmHandshake | WinbindHandshake | KerberosHandshake
    header: str  # the scheme word in the Authorization header: "NTLM" or "Negotiate"
    why: str


def _has(offers: list[str], scheme: str) -> bool:
    return any(s.lower() == scheme.lower() for s in offers)


class SchemeChooser:
    """Chooses per exchange, and remembers what each peer offered and refused."""

    def __init__(self, mode: SchemeMode, dialect: Dialect,
                 tickets: KerberosTickets | None, max_peers: int = 1000) -> None:
        self.mode = mode
        self.dialect = dialect
        self.tickets = tickets
        self.max_peers = max_peers
        self.offers: OrderedDict[str, list[str]] = OrderedDict()
        self._refused: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._last: OrderedDict[str, str] = OrderedDict()
        self.winbind_helpers = WinbindHelpers()  # ntlm_auth processes of winbind identities

    def learn(self, peer: str, offered: list[str]) -> None:
        """Record the schemes of a bare challenge (one that carries no token)."""
        if offered:
            bounded_set(self.offers, peer, offered, self.max_peers)

    def kerberos_refused(self, peer: str, reason: str) -> None:
        bounded_set(self._refused, peer, (time.monotonic(), reason), self.max_peers)

    def _refusal(self, peer: str) -> str | None:
        entry = self._refused.get(peer)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > REFUSAL_TTL:
            del self._refused[peer]
            return None
        return entry[1]

    def choose(self, creds: Credentials, peer: str, peer_host: str, what: str,
               multiuser: bool = False) -> Choice:
        """The handshake to start with `peer`; NoScheme or KerberosRejected when none can."""
        offered = self.offers.get(peer)
        offers_text = f"{what} offers {', '.join(offered)}" if offered else \
            f"{what} not yet seen challenging"
        kerberos_why = ""
        if self.mode is not SchemeMode.NTLM:
            if offered is not None and not _has(offered, "Negotiate"):
                kerberos_why = f"the {what} does not offer Negotiate"
            elif (refusal := self._refusal(peer)) is not None:
                kerberos_why = refusal
            elif self.tickets is None:  # pragma: no cover - configure always builds it
                kerberos_why = "Kerberos is not configured"
            else:
                try:
                    choice = self._kerberos(creds, peer_host, multiuser, offers_text)
                    self._log(peer, choice)
                    return choice
                except KerberosRejected:
                    raise
                except KerberosUnavailable as e:
                    kerberos_why = str(e)
            if self.mode is SchemeMode.KERBEROS:
                raise NoScheme(f"ntlm_scheme is kerberos, but Kerberos cannot be used with the "
                               f"{what} {peer}: {kerberos_why}.")
        if not creds.can_ntlm:
            raise NoScheme(f"Kerberos cannot be used with the {what} {peer} ({kerberos_why}) and "
                           f"there is no NTLM password or hash to fall back on.")
        header = "NTLM"
        if offered is not None and not _has(offered, "NTLM") and _has(offered, "Negotiate"):
            header = "Negotiate"
        inside = " inside Negotiate" if header == "Negotiate" else ""
        inside += " by winbind" if creds.winbind else ""
        if self.mode is SchemeMode.NTLM:
            why = f"NTLM{inside}: ntlm_scheme is ntlm; {offers_text}"
        else:
            why = f"NTLM{inside}: Kerberos not used ({kerberos_why}); {offers_text}"
        choice = Choice(self._ntlm(creds, peer_host, header), header, why)
        self._log(peer, choice)
        return choice

    def _ntlm(self, creds: Credentials, peer_host: str,
              header: str) -> NtlmHandshake | WinbindHandshake:
        if not creds.winbind:
            return NtlmHandshake(creds, self.dialect, peer_host, header)
        try:
            handshake = WinbindHandshake(creds, self.winbind_helpers, peer_host, header)
            handshake.negotiate()  # the Type 1 now, so a missing helper is a clear NoScheme
        except NtlmClientError as e:
            raise NoScheme(str(e)) from None
        return handshake

    def _kerberos(self, creds: Credentials, peer_host: str, multiuser: bool,
                  offers_text: str) -> Choice:
        assert self.tickets is not None
        ticket = self.tickets.ticket(creds, multiuser)
        service, host = self.tickets.service_for(peer_host)
        handshake = KerberosHandshake(ticket, service, host)
        handshake.negotiate()  # gets the service ticket now, so a failure falls back to NTLM
        return Choice(handshake, "Negotiate",
                      f"Kerberos for {handshake.spn}: {ticket.describe()}; {offers_text}")

    def _log(self, peer: str, choice: Choice) -> None:
        """Say at INFO level when the scheme used with a peer changes, not on every exchange."""
        label = f"{choice.handshake.mechanism}/{choice.header}"
        if self._last.get(peer) != label:
            bounded_set(self._last, peer, label, self.max_peers)
            log.info("[ntlm] %s: %s", peer, choice.why)
