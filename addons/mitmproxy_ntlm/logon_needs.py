"""Which new parent connections may go without credentials, learnt from the parent's answers.

A parent that lets a client through without a logon (by address, or for some domains: Squid's
`http_access allow` before the rule that asks for one) is asked the way a browser asks it: the
request first, without credentials, so no NTLM context is made and no lockout-guard slot is
held (`AuthEngine._leg_without_logon`). Each time that guess is wrong, its 407 costs one more
round trip before the Type 1. So the guess is made only:
- for a parent that let a new connection through without a logon;
- for a host it has not asked a logon for since (its access rules go by domain);
- until it has asked for `MISSES_TO_STOP` hosts in a row without letting one through in
  between. It then seems to ask everyone, as when a laptop leaves the network the parent lets
  through; the next connection it lets through starts the guessing again.
A Type 1 that a parent did not need costs no round trip: it simply serves the request.
"""

from __future__ import annotations

from . import wire
from .bounded import BoundedMap
from .untrusted import PAGE_LIMIT, shown

MISSES_TO_STOP = 3
"""Guesses in a row that drew a 407 before new connections carry their Type 1 again."""


class LogonNeeds:
    """What each parent showed about asking for a logon (one per `UpstreamPolicy`)."""

    def __init__(self) -> None:
        # Parents that let a new connection through without a logon, with the guesses that
        # drew a 407 since. Parents come from the configuration, PAC files and failover lists,
        # so the map stays small; bounded anyway.
        self.lets_through: BoundedMap[str, int] = BoundedMap(1_000, 1 << 20)
        # (parent, host) pairs such a parent asked a logon for. Bounded: clients name any
        # hosts they like.
        self.asks_for: BoundedMap[tuple[str, str], bool] = BoundedMap(10_000, 2 << 20)

    # The methods take the request and read its host only when a map needs it: most parents
    # never let anyone through, and most that do ask for no host.

    def may_skip_logon(self, parent: str, request: wire.Head) -> bool:
        """Whether a new connection to `parent` for `request` goes without credentials first."""
        return parent in self.lets_through and not (
            self.asks_for and (parent, wire.target_host(request)) in self.asks_for)

    def let_through(self, parent: str, request: wire.Head) -> None:
        """`parent` answered `request` on a new connection without asking a logon."""
        self.lets_through[parent] = 0
        if self.asks_for:
            self.asks_for.pop((parent, wire.target_host(request)))

    def asked(self, parent: str, request: wire.Head, guessed: bool) -> None:
        """`parent` asked a logon for `request`'s host; `guessed`: the request had gone
        without credentials because of `may_skip_logon`."""
        misses = self.lets_through.get(parent)
        if misses is None:
            return  # it never let anyone through: every new connection carries its Type 1
        self.asks_for[(parent, wire.target_host(request))] = True
        if not guessed:
            return
        if misses + 1 >= MISSES_TO_STOP:
            self.lets_through.pop(parent)
        else:
            self.lets_through[parent] = misses + 1

    def status(self, named: int = 5) -> list[str]:
        """For `ntlm.status`: why requests to a parent go with or without credentials."""
        asked: dict[str, list[str]] = {}
        for parent, host in self.asks_for.keys():
            asked.setdefault(parent, []).append(host)
        lines = []
        for parent in self.lets_through.keys():
            hosts = sorted(asked.get(parent, []))
            text = f"parent {parent}: lets new connections through without a logon"
            if hosts:
                more = f" and {len(hosts) - named} more" if len(hosts) > named else ""
                text += (f"; asks one for {len(hosts)} host{'s' * (len(hosts) > 1)} (their "
                         f"new connections carry it at once): {', '.join(hosts[:named])}{more}")
            lines.append(shown(text, PAGE_LIMIT))
        return lines
