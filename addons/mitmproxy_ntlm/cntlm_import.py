"""cntlm's formats: its hash lines (`cntlm -H`) and its config file, turned into config.yaml.

People moving from CNTLM have a working cntlm.conf and hashes printed by `cntlm -H`. This
module reproduces those hash lines (so values can be compared with cntlm's) and translates a
cntlm.conf into a mitmproxy config.yaml for this addon, listing whatever it cannot carry over.
A plaintext `Password` is never copied: it becomes the NT hash in cntlm's form.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

from .credentials import hashes_from_password, invert, parse_hex_hash, split_principal
from .spnego_internals import ntowfv2

# --------------------------------------------------------------------------- cntlm -H


@dataclass(frozen=True)
class CntlmHashes:
    """The three values `cntlm -H` prints, as standard (not inverted) 16-byte hashes."""

    lm: bytes = field(repr=False)
    nt: bytes = field(repr=False)
    ntlmv2: bytes = field(repr=False)
    user: str
    domain: str


def cntlm_hashes(user: str, domain: str, password: str) -> CntlmHashes:
    """LMOWFv1, NTOWFv1 and cntlm's NTOWFv2, all from pyspnego's crypto.

    cntlm upper-cases the user *and* the domain for PassNTLMv2 (verified against Debian's
    cntlm 0.92.3); MS-NLMP upper-cases only the user. `alice@corp` is split like cntlm does.
    """
    name, dom = split_principal(user, domain)
    lm, nt = hashes_from_password(password)
    return CntlmHashes(lm=lm, nt=nt, ntlmv2=ntowfv2(name, nt, dom.upper()), user=name, domain=dom)


def cntlm_hex(hash_bytes: bytes) -> str:
    """A hash as cntlm prints and reads it: every byte inverted, upper-case hex."""
    return invert(hash_bytes).hex().upper()


def hash_lines(h: CntlmHashes) -> list[str]:
    """Exactly the three lines `cntlm -H -u USER -d DOMAIN` prints."""
    return [
        f"PassLM          {cntlm_hex(h.lm)}",
        f"PassNT          {cntlm_hex(h.nt)}",
        f"PassNTLMv2      {cntlm_hex(h.ntlmv2)}    "
        f"# Only for user '{h.user}', domain '{h.domain}'",
    ]


# --------------------------------------------------------------------------- YAML output

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def yaml_scalar(value: str | int | bool) -> str:
    """A YAML scalar that loads back as exactly `value` (strings quoted unless trivially safe).

    JSON strings are valid YAML double-quoted scalars; hex hashes and `1.2`-like values are
    quoted so YAML never reads them as numbers.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=True)


# --------------------------------------------------------------------------- Allow/Deny

IPv4Network = ipaddress.IPv4Network
_EVERYTHING = ipaddress.IPv4Network("0.0.0.0/0")


def _collapse(nets: list[IPv4Network]) -> list[IPv4Network]:
    return list(ipaddress.collapse_addresses(nets))


def _subtract(nets: list[IPv4Network], minus: list[IPv4Network]) -> list[IPv4Network]:
    """The addresses of `nets` that are in none of `minus` (CIDRs either nest or are apart)."""
    result = _collapse(nets)
    for m in _collapse(minus):
        pieces: list[IPv4Network] = []
        for n in result:
            if n.subnet_of(m):
                continue
            if m.subnet_of(n):
                pieces += n.address_exclude(m)
            else:
                pieces.append(n)
        result = _collapse(pieces)
    return result


def translate_acl(rules: list[tuple[bool, IPv4Network]]) -> tuple[list[IPv4Network],
                                                                   list[IPv4Network]]:
    """cntlm's ordered Allow/Deny rules (first match wins, no match: allowed) as the addon's
    (allow, deny) lists, where deny always wins and a non-empty allow list admits only its
    members. Picks the shortest of three exact forms: deny only, allow only, or the Allow
    networks minus the exceptions.
    """
    denied: list[IPv4Network] = []
    earlier_allows: list[IPv4Network] = []
    for is_allow, net in rules:
        if is_allow:
            earlier_allows.append(net)
        else:
            denied += _subtract([net], earlier_allows)
    denied = _collapse(denied)
    allowed = _subtract([_EVERYTHING], denied)
    allow_nets = _collapse([n for a, n in rules if a])
    candidates: list[tuple[list[IPv4Network], list[IPv4Network]]] = [([], denied)]
    if allowed:
        candidates.append((allowed, []))
        if not _subtract(allowed, allow_nets):  # nothing is let in by "no rule matched"
            candidates.append((allow_nets, _subtract(allow_nets, allowed)))
    return min(candidates, key=lambda c: len(c[0]) + len(c[1]))


def _net_text(net: IPv4Network) -> str:
    return str(net.network_address) if net.prefixlen == 32 else str(net)


# --------------------------------------------------------------------------- cntlm.conf


@dataclass(frozen=True)
class Entry:
    """One `Keyword value` line of a cntlm.conf."""

    line: int
    key: str  # lower-cased keyword
    name: str  # keyword as written
    value: str


def parse_cntlm_config(text: str) -> tuple[list[Entry], list[str]]:
    """Keyword/value lines read the way cntlm 0.92.3 reads them, plus notes on odd lines.

    Keywords are letters and digits, case-insensitive; lines starting with `#` or `;` are
    comments. A value is either `"quoted"` (taken verbatim) or runs to the first `#` (a
    trailing comment) with trailing blanks removed. Checked against Debian's cntlm: `Password
    pass#word` means `pass`, `Password "pass#word"` means `pass#word`.
    """
    entries: list[Entry] = []
    notes: list[str] = []
    lines = text.split("\n")
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r").lstrip()
        if not line or line[0] in "#;":
            continue
        m = re.match(r"([A-Za-z0-9]+)[ \t]*(.*)", line)
        if m is None or not m.group(1):
            notes.append(f"line {number}: not `Keyword value`, ignored")
            continue
        name, rest = m.group(1), m.group(2)
        if rest.startswith('"'):
            end = rest.find('"', 1)
            if end == -1:
                notes.append(f"line {number}: {name}: unterminated quote, ignored (as cntlm)")
                continue
            value = rest[1:end]
        else:
            value = rest.split("#", 1)[0].rstrip()
        if not value:
            continue  # cntlm skips keywords without a value
        if number == len(lines) and raw:
            notes.append(f"line {number}: {name}: the file does not end with a newline; cntlm "
                         "0.92.3 ignores such a last line, it was imported here")
        entries.append(Entry(number, name.lower(), name, value))
    return entries, notes


@dataclass
class ImportResult:
    """The generated config.yaml text and what could not be carried over (one line each)."""

    yaml_text: str
    not_carried: list[str]
    notes: list[str]


_AUTH = {"ntlmv2": "ntlmv2", "ntlm2sr": "ntlm2sr"}
_AUTH_V1 = {"ntlm", "nt", "lm", "ntlm2"}

_HINTS = {
    "flags": "pyspnego chooses the NTLM flags; there is no option for them",
    "tunnel": "no local port forwarding; mitmproxy's `mode: reverse:...` can serve a similar need",
    "socks5proxy": "use mitmproxy's `mode: socks5@PORT` with `ntlm_parent` "
                   "(see regular-mode.yaml in `mitm-ntlm configs`)",
    "socks5user": "SOCKS5 users: mitmproxy's `proxyauth` option",
    "ntlmtobasic": "see `ntlm_multiuser` (every client must then send Basic credentials)",
    "pac": "set `ntlm_pac` with `mode: [regular]` and `connection_strategy: lazy` by hand",
    "isascannersize": "the GFI WebMonitor plugin has no equivalent",
    "isascanneragent": "the GFI WebMonitor plugin has no equivalent",
    "keepalive": "mitmproxy keeps connections alive by itself",
}


class _Converter:
    """Walks the entries once and collects options, reports and notes."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.options: dict[str, str | int | bool | list[str]] = {}
        self.not_carried: list[str] = []
        self.notes: list[str] = []

    def skip(self, e: Entry, why: str) -> None:
        self.not_carried.append(f"line {e.line}: {e.name}: {why}")

    def values(self, key: str) -> list[Entry]:
        return [e for e in self.entries if e.key == key]

    def single(self, key: str) -> Entry | None:
        """A keyword that takes one value: like cntlm, the first occurrence counts."""
        found = self.values(key)
        for dup in found[1:]:
            self.skip(dup, f"repeats line {found[0].line}; cntlm uses the first one, so is this")
        return found[0] if found else None

    def run(self) -> None:
        known = {"username", "domain", "workstation", "password", "passlm", "passnt",
                 "passntlmv2", "proxy", "noproxy", "listen", "auth", "header", "gateway",
                 "allow", "deny"}
        self.parents()
        self.identity()
        self.dialect()
        self.secret()
        self.listen()
        self.acl()
        self.headers()
        for e in self.entries:
            if e.key not in known:
                self.skip(e, _HINTS.get(e.key, "unknown keyword, ignored"))

    def parents(self) -> None:
        parents: list[str] = []
        for e in self.values("proxy"):
            for spec in self._proxy_specs(e):
                parents.append(spec)
        noproxy = [p.strip() for e in self.values("noproxy") for p in e.value.split(",")
                   if p.strip()]
        if not parents:
            self.not_carried.append("Proxy: none given; set `mode: upstream:http://HOST:PORT`")
            return
        if len(parents) == 1 and not noproxy:
            self.options["mode"] = [f"upstream:{parents[0]}"]
            return
        self.options["mode"] = ["regular"]
        self.options["connection_strategy"] = "lazy"
        self.options["ntlm_parent"] = parents
        if noproxy:
            self.options["ntlm_noproxy"] = noproxy
        if len(parents) > 1:
            self.notes.append(f"{len(parents)} parents in cntlm's order (failover order)")

    def _proxy_specs(self, e: Entry) -> list[str]:
        words = e.value.split()
        if len(words) == 2 and words[1].isdigit() and ":" not in words[0]:
            words = [f"{words[0]}:{words[1]}"]
        specs = []
        for word in words:
            host, sep, port = word.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                self.skip(e, f"{word!r} is not HOST:PORT")
                continue
            specs.append(f"http://{host}:{port}")
        return specs

    def identity(self) -> None:
        for key, option in (("username", "ntlm_username"), ("domain", "ntlm_domain"),
                            ("workstation", "ntlm_workstation")):
            e = self.single(key)
            if e is not None and e.value:
                self.options[option] = e.value

    def secret(self) -> None:
        password, nt, lm, v2 = (self.single(k) for k in ("password", "passnt", "passlm",
                                                       "passntlmv2"))
        for e in (nt, lm):
            if e is not None:
                try:
                    parse_hex_hash(e.value, e.name)
                except ValueError as err:
                    self.skip(e, str(err))
                    if e is nt:
                        nt = None
                    else:
                        lm = None
        if nt is not None:
            self.options["ntlm_pass_nt"] = nt.value.replace(" ", "").upper()
            if lm is not None:
                self.options["ntlm_pass_lm"] = lm.value.replace(" ", "").upper()
            if password is not None:
                same = cntlm_hex(hashes_from_password(password.value)[1]) == \
                    self.options["ntlm_pass_nt"]
                self.skip(password, "not copied: PassNT is given" + (
                    "" if same else " and does not match this password: check which is right"))
        elif password is not None and password.value:
            lm_hash, nt_hash = hashes_from_password(password.value)
            self.options["ntlm_pass_nt"] = cntlm_hex(nt_hash)
            self.notes.append(
                f"line {password.line}: Password was not copied; ntlm_pass_nt is its NT hash in "
                "cntlm's form (remove the plaintext password from cntlm.conf)"
            )
            if lm is not None:
                self.skip(lm, "not used: the LM hash was computed from Password")
            if self.options.get("ntlm_dialect") == "ntlmv1":  # only NTLMv1 sends an LM response
                self.options["ntlm_pass_lm"] = cntlm_hex(lm_hash)
            if not password.value.isascii():
                self.notes.append(
                    f"line {password.line}: the password has non-ASCII characters: hashed as "
                    "UTF-16 like Windows does; cntlm hashed the file's bytes, which only agrees "
                    "for Latin-1 files"
                )
        else:
            if lm is not None:
                self.skip(lm, "PassLM alone is not enough: the addon needs the NT hash")
            self.not_carried.append(
                "no usable secret: the addon needs the NT hash; run `mitm-ntlm hash --user U "
                "--domain D` and set ntlm_pass_nt (or ntlm_password_file)"
            )
        if v2 is not None:
            why = ("not needed: the addon derives NTLMv2 from the NT hash" if "ntlm_pass_nt"
                   in self.options else "cannot be used: the addon needs the NT hash (PassNT); "
                   "run `mitm-ntlm hash --user U --domain D`")
            self.skip(v2, why)

    def dialect(self) -> None:
        e = self.single("auth")
        if e is None:
            self.options["ntlm_dialect"] = "ntlmv2"
            return
        auth = e.value.lower()
        if auth in _AUTH:
            self.options["ntlm_dialect"] = _AUTH[auth]
            if auth == "ntlm2sr":
                self.notes.append(f"line {e.line}: Auth NTLM2SR is weak; try `mitm-ntlm detect`")
        elif auth in _AUTH_V1:
            self.options["ntlm_dialect"] = "ntlmv1"
            self.notes.append(
                f"line {e.line}: WARNING: Auth {e.value} became ntlm_dialect ntlmv1 (LM and NT "
                "responses), the weakest dialect; check with `mitm-ntlm detect` whether the "
                "parent takes ntlmv2"
            )
        else:
            self.options["ntlm_dialect"] = "ntlmv2"
            self.skip(e, f"unknown Auth {e.value!r}; ntlmv2 is used")

    def listen(self) -> None:
        gateway_entry = self.single("gateway")
        gateway = gateway_entry is not None and gateway_entry.value.lower() in ("yes", "1", "true")
        if gateway_entry is not None and gateway_entry.value.lower() not in (
            "yes", "no", "1", "0", "true", "false"
        ):
            self.skip(gateway_entry, f"{gateway_entry.value!r} is not yes/no; treated as no")
        listens = self.values("listen")
        host, port = ("0.0.0.0" if gateway else "127.0.0.1"), 3128
        for i, e in enumerate(listens):
            if i > 0:
                self.skip(e, "mitmproxy listens on one address per mode; only the first "
                          "Listen is used (add more with mitmproxy's `mode: regular@PORT`)")
                continue
            addr, sep, p = e.value.rpartition(":")
            if not p.isdigit() or not 0 <= int(p) < 65536:
                self.skip(e, f"{e.value!r} is not PORT or HOST:PORT; 3128 is used")
                continue
            port = int(p)
            if sep:
                host = addr.strip("[]")
        self.options["listen_host"] = host
        self.options["listen_port"] = port
        if gateway:
            self.options["ntlm_allow_remote"] = True
            self.notes.append("Gateway yes: listening beyond loopback; other machines use your "
                              "identity unless ntlm_allow_clients/ntlm_deny_clients limit them")
        elif host not in ("127.0.0.1", "::1", "localhost"):
            self.notes.append(f"listen_host {host} is not loopback: the addon may refuse it "
                              "without `ntlm_allow_remote: true`")

    def acl(self) -> None:
        rules: list[tuple[bool, IPv4Network]] = []
        for e in self.entries:
            if e.key not in ("allow", "deny"):
                continue
            addr, sep, bits = e.value.partition("/")
            addr = {"*": "0.0.0.0", "0": "0.0.0.0"}.get(addr.strip(), addr.strip())
            if addr == "0.0.0.0" and e.value.strip() == "*":
                bits, sep = "0", "/"
            try:
                net = ipaddress.IPv4Network(addr + sep + bits, strict=False)
            except ValueError:
                self.skip(e, f"{e.value!r}: only IPv4 addresses and networks are carried "
                          "(cntlm supports only IPv4 too; host names are not resolved here)")
                continue
            rules.append((e.key == "allow", net))
        if not rules:
            return
        allow, deny = translate_acl(rules)
        if allow:
            self.options["ntlm_allow_clients"] = [_net_text(n) for n in allow]
        if deny:
            self.options["ntlm_deny_clients"] = [_net_text(n) for n in deny]
        verbatim = ([n for a, n in rules if a], [n for a, n in rules if not a])
        if (sorted(allow), sorted(deny)) != tuple(sorted(_collapse(v)) for v in verbatim):
            self.notes.append(
                "Allow/Deny: cntlm takes the first matching rule; the addon refuses a client "
                "listed in ntlm_deny_clients or missing from a non-empty ntlm_allow_clients. "
                "The lists were computed so the same addresses are let in"
            )

    def headers(self) -> None:
        specs = []
        for e in self.values("header"):
            name, sep, value = e.value.partition(":")
            name, value = name.strip(), value.strip()
            if not sep or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
                self.skip(e, "not `Name: value`")
                continue
            if not value or value.startswith("@"):
                why = "empty value" if not value else "a value starting with @ is a file name"
                self.skip(e, f"{why} in mitmproxy's modify_headers; set it by hand")
                continue
            separator = next((c for c in "/|!#%,;=" if c not in name + value), None)
            if separator is None:
                self.skip(e, "no separator character is free for modify_headers")
                continue
            specs.append(f"{separator}~q{separator}{name}{separator}{value}")
        if specs:
            self.options["modify_headers"] = specs
            self.notes.append("Header lines became modify_headers: mitmproxy also sets them on "
                              "intercepted https requests (cntlm only on plain http)")


_ORDER = ["mode", "connection_strategy", "ntlm_parent", "ntlm_noproxy", "listen_host",
          "listen_port", "ntlm_allow_remote", "ntlm_allow_clients", "ntlm_deny_clients",
          "ntlm_username", "ntlm_domain", "ntlm_workstation", "ntlm_pass_nt", "ntlm_pass_lm",
          "ntlm_dialect", "modify_headers"]


def render_yaml(options: dict[str, str | int | bool | list[str]], source: str) -> str:
    lines = [
        "# mitmproxy config.yaml for mitmproxy-ntlm, made by `mitm-ntlm import-cntlm` from",
        f"# {source}",
        '# Run: mitmdump -s "$(mitm-ntlm script)" --set confdir=DIR  (this file: DIR/config.yaml)',
        "# The hashes below are password equivalents: keep this file private (chmod 600).",
        "",
    ]
    for key in sorted(options, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER)):
        value = options[key]
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {yaml_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def convert(text: str, source: str) -> ImportResult:
    """Translate a cntlm.conf into config.yaml text plus the list of what was not carried."""
    entries, notes = parse_cntlm_config(text)
    conv = _Converter(entries)
    conv.notes += notes
    conv.run()
    return ImportResult(render_yaml(conv.options, source), conv.not_carried, conv.notes)
