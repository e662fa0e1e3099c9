"""Which parent proxy to use: an ordered list with failover, and the hosts that go direct.

CNTLM users list several `Proxy` lines (tried in order until one answers) and a `NoProxy`
list (wildcards; here also CIDR ranges). A parent that cannot be reached is skipped for
`retry_after` seconds, then tried again; both transitions are logged.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import time
from dataclasses import dataclass, field

from mitmproxy.net import server_spec

from . import options

log = logging.getLogger("mitmproxy_ntlm")

ServerSpec = tuple[str, tuple[str, int]]
LEARNED_MAX = 16  # parents a PAC may add to the failover list


def parse_parents(value: str) -> list[ServerSpec]:
    """`http://a:8080, b:3128` -> [("http", ("a", 8080)), ("http", ("b", 3128))]."""
    specs = []
    for item in value.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        spec = server_spec.parse(item, default_scheme="http")
        if spec[0] not in ("http", "https"):
            raise ValueError(f"{item}: a parent proxy must be http:// or https://")
        specs.append((spec[0], (spec[1][0], spec[1][1])))
    return specs


def spec_text(spec: ServerSpec) -> str:
    return f"{spec[1][0]}:{spec[1][1]}"


@dataclass
class ParentList:
    """Parents in failover order, with the ones that recently failed moved to the back."""

    specs: list[ServerSpec]
    retry_after: float = float(options.default("ntlm_parent_retry"))
    _dead_until: dict[ServerSpec, float] = field(default_factory=dict)
    _learned: list[ServerSpec] = field(default_factory=list)

    def alive(self, spec: ServerSpec) -> bool:
        until = self._dead_until.get(spec)
        return until is None or time.monotonic() >= until

    def ordered(self, first: ServerSpec | None = None) -> list[ServerSpec]:
        """`first` (if given) and the list, reachable ones before recently failed ones."""
        specs = ([first] if first else []) + [s for s in self.specs if s != first]
        return [s for s in specs if self.alive(s)] + [s for s in specs if not self.alive(s)]

    def failover(self, first: ServerSpec) -> list[ServerSpec]:
        """The parents a connection tries: `first`, then, for an http one, the other http
        parents in failover order (a TLS layer above an https parent is bound to it)."""
        if first[0] != "http":
            return [first]
        return [first] + [s for s in self.ordered() if s != first and s[0] == "http"]

    def all_dead(self) -> bool:
        return bool(self.specs) and not any(self.alive(s) for s in self.specs)

    def failed(self, spec: ServerSpec, err: str) -> None:
        if self.alive(spec):
            log.warning("[ntlm] parent %s unreachable (%s); skipping it for %g s",
                        spec_text(spec), err, self.retry_after)
        self._dead_until[spec] = time.monotonic() + self.retry_after

    def succeeded(self, spec: ServerSpec) -> None:
        if self._dead_until.pop(spec, None) is not None:
            log.info("[ntlm] parent %s reachable again", spec_text(spec))

    def remember(self, spec: ServerSpec) -> None:
        """Add a parent learned at run time (from a PAC file) as a failover candidate; at most
        LEARNED_MAX of them, the oldest learned one leaving first."""
        if spec in self.specs:
            return
        self.specs.append(spec)
        self._learned.append(spec)
        if len(self._learned) > LEARNED_MAX:
            oldest = self._learned.pop(0)
            self.specs.remove(oldest)
            self._dead_until.pop(oldest, None)

    def forget_learned(self) -> None:
        """Drop the parents a PAC named (the PAC changed: they may no longer be wanted)."""
        for spec in self._learned:
            self.specs.remove(spec)
            self._dead_until.pop(spec, None)
        self._learned.clear()


def unreachable(candidates: int, tried: list[str]) -> str:
    """The error when none of `candidates` parents answered; `tried` says what each did."""
    which = "the parent proxy" if candidates == 1 else "any parent proxy"
    return f"Cannot reach {which} ({'; '.join(tried)})"


class NoProxy:
    """Hosts that bypass the parent: `localhost, 127.0.0.*, 10.*, *.corp.example, 10.0.0.0/8`."""

    def __init__(self, value: str) -> None:
        self.patterns: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in value.replace(";", ",").split(","):
            item = item.strip().lower()
            if not item:
                continue
            if "/" in item:
                try:
                    self.networks.append(ipaddress.ip_network(item, strict=False))
                    continue
                except ValueError:
                    raise ValueError(f"ntlm_noproxy: {item} is not a CIDR range") from None
            self.patterns.append(item)

    def __bool__(self) -> bool:
        return bool(self.patterns or self.networks)

    def matches(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if any(fnmatch.fnmatchcase(host, p) for p in self.patterns):
            return True
        if self.networks:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(ip in net for net in self.networks)
        return False
