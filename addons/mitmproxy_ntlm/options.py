"""Every `ntlm_*` option in one table: name, type, default, help and what values it accepts.

mitmproxy parses `--set` and config.yaml values only by type, keeps an unknown name silently
(a later script might declare it) and does not enforce `choices` on `--set`. So the checks a
user needs happen here: a misspelt name gets the closest known one, a bad value gets a message
naming the option, the value and what is accepted, at start-up and when changed at runtime.
List options are mitmproxy lists (`Sequence[str]`, YAML lists, repeated `--set`), and each
element may itself be comma-separated (`--set ntlm_parent=a,b`, CNTLM's style).
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions
from mitmproxy.addonmanager import Loader

from . import mitmproxy_internals
from .handshake import Dialect
from .schemes import SchemeMode

PREFIX = "ntlm_"
SECRET = ("ntlm_password", "ntlm_pass_nt", "ntlm_pass_lm", "ntlm_hashes")
"""Values never repeated in a message (a password, or a hash that is as good as one)."""
SECRET_SOURCES = ("ntlm_password", "ntlm_password_env", "ntlm_password_file",
                  "ntlm_password_keyring", "ntlm_pass_nt", "ntlm_pass_lm", "ntlm_hashes")
"""Options that give the NTLM secret; exactly one is used."""


@dataclass(frozen=True)
class Option:
    name: str
    typespec: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: int | None = None  # ints only


def _workstation() -> str:
    return socket.gethostname().split(".")[0].upper()


CREDENTIALS: tuple[Option, ...] = (  # NtlmUpstreamAuth: identity, secrets, handshakes
    Option("ntlm_username", str, "",
           "User name for the parent proxy: user, DOMAIN\\user or user@domain."),
    Option("ntlm_domain", str, "", "NTLM domain (overrides a domain in the name)."),
    Option("ntlm_workstation", str, _workstation(),
           "Workstation name sent in the NTLM Type 3 message."),
    Option("ntlm_password_file", str, "",
           "File holding the password on its first line; must be mode 0600. A change of the "
           "file is noticed within seconds (also after a lockout-guard stop)."),
    Option("ntlm_password_env", str, "",
           "Name of an environment variable holding the password."),
    Option("ntlm_password_keyring", bool, False,
           "Read the password for ntlm_username from the OS keychain (Secret Service, macOS "
           "Keychain, Windows Credential Manager), stored there with `mitm-ntlm password set`; "
           "read again on SIGHUP. Needs pip install 'mitmproxy-ntlm[keyring]'."),
    Option("ntlm_pass_nt", str, "",
           "PassNT hash exactly as printed by `cntlm -H` / `mitm-ntlm hash`."),
    Option("ntlm_pass_lm", str, "",
           "PassLM hash as printed by `cntlm -H` (only used by ntlmv1)."),
    Option("ntlm_hashes", str, "",
           "Standard NT hash, or LM:NT, in hex (impacket/pyspnego form)."),
    Option("ntlm_password", str, "",
           "The password itself. Visible in the process list when given with --set: prefer "
           "ntlm_password_file or ntlm_password_env."),
    Option("ntlm_dialect", str, Dialect.NTLMV2.value,
           "NTLM response dialect. ntlmv2 is the default; ntlm2sr and ntlmv1 are weak and only "
           "for parents that refuse NTLMv2.",
           choices=tuple(d.value for d in Dialect)),
    Option("ntlm_max_failures", int, 3,
           "Stop sending the credentials after this many consecutive rejections by the parent "
           "(protects the account from lockout); 0 disables.", minimum=0),
    Option("ntlm_handshake_timeout", int, 30,
           "Seconds to wait for the parent during an NTLM handshake.", minimum=1),
    Option("ntlm_replay_limit", int, 16 * 1024 * 1024,
           "Largest request body kept to resend after a re-challenge (bytes).", minimum=0),
    Option("ntlm_multiuser", bool, False,
           "Multi-user mode: clients send Proxy-Authorization: Basic with their own "
           "DOMAIN\\user and password, used for NTLM towards the parent. ntlm_domain is the "
           "default domain."),
    Option("ntlm_realm", str, "mitmproxy-ntlm",
           "Realm of the Basic challenge sent to clients in multi-user mode."),
    Option("ntlm_lockout_cooldown", int, 300,
           "Multi-user mode: seconds a user's credentials stay blocked after ntlm_max_failures "
           "consecutive rejections.", minimum=0),
    Option("ntlm_lockout_file", str, "",
           "A file (SQLite) where the lockout guard keeps its counts, shared by every mitmproxy "
           "process that names it (workers of `mitm-ntlm start --workers`, instances behind a "
           "load balancer on one machine), so ntlm_max_failures bounds failed logons per "
           "account across them all. Empty: counts in this process."),
    Option("ntlm_scheme", str, SchemeMode.AUTO.value,
           "auto: Kerberos (Negotiate) when a ticket is available and the peer offers "
           "Negotiate, else NTLM; kerberos or ntlm pin one scheme.",
           choices=tuple(m.value for m in SchemeMode)),
    Option("ntlm_kerberos_ccache", str, "",
           "Kerberos ticket cache filled by kinit, e.g. FILE:/tmp/krb5cc_1000 (default: "
           "KRB5CCNAME or the system default). Without ntlm_username the cache's principal is "
           "the identity."),
    Option("ntlm_kerberos_keytab", str, "",
           "Client keytab to get (and renew) Kerberos tickets from, instead of a ticket cache."),
    Option("ntlm_kerberos_principal", str, "",
           "Principal in ntlm_kerberos_keytab (default: ntlm_username at the realm, else the "
           "keytab's first entry)."),
    Option("ntlm_kerberos_realm", str, "",
           "Kerberos realm (e.g. CORP.EXAMPLE.COM). When set, tickets are obtained and renewed "
           "with the NTLM password (kept in memory for that), also for each user in multi-user "
           "mode."),
    Option("ntlm_kerberos_spn", str, "",
           "Service principal of the parent, e.g. HTTP/proxy.corp.example (default: HTTP/ and "
           "the parent's host name as given in --mode)."),
    Option("ntlm_kerberos_lifetime", int, 0,
           "Lifetime in seconds to ask for tickets obtained with a keytab or password (0: the "
           "KDC's default); they are renewed 5 minutes before they expire.", minimum=0),
    Option("ntlm_winbind", bool, False,
           "NTLM single sign-on on a domain-joined Linux machine: winbind's ntlm_auth answers "
           "with the cached credentials of ntlm_username (default: the logged-on user); no "
           "password in mitmproxy. Needs winbind with cached logons (pam_winbind cached_login, "
           "or wbinfo --ccache-save)."),
)
POOL: tuple[Option, ...] = (  # NtlmUpstreamAuth: the pool of authenticated parent connections
    Option("ntlm_pool", bool, True,
           "Keep idle authenticated plain-http parent connections in a pool shared by all "
           "client connections, per parent and per user (never across users), so a new client "
           "connection needs no new NTLM handshake (no new logon at the domain controller). "
           "Also carries CONNECTs where the parent allows it. https:// parents are not pooled."),
    Option("ntlm_pool_idle", int, 30,
           "Seconds an idle pooled parent connection is kept; keep it below the parent's own "
           "idle timeout (Squid: 120 s).", minimum=0),
    Option("ntlm_pool_max", int, 32,
           "Most idle pooled parent connections kept in all (oldest closed first).", minimum=0),
    Option("ntlm_pool_connections", int, 16,
           "Most plain-http parent connections per parent and user (0: no limit). Requests "
           "borrow them one at a time, as with CNTLM and Px; a request that finds them all busy "
           "waits for one (ntlm_pool_wait) instead of logging on again.", minimum=0),
    Option("ntlm_pool_wait", int, 5,
           "Seconds a request waits for a busy parent connection of its user "
           "(ntlm_pool_connections) before it opens another one.", minimum=0),
    Option("ntlm_pool_grace", int, 50,
           "Milliseconds a request waits for a busy parent connection of its user when it "
           "finds none idle (and fewer than ntlm_pool_connections open) before it opens another "
           "one, i.e. logs on again. Busy connections usually come free within milliseconds; "
           "0: never wait.", minimum=0),
)
UPSTREAM: tuple[Option, ...] = CREDENTIALS + POOL + (  # NtlmUpstreamAuth: and what it shows
    Option("ntlm_show_legs", bool, False,
           "Show the hidden handshake legs (407s, Type 1/2/3) as flows of their own in mitmweb "
           "and the console; Type 3 responses are redacted."),
    Option("ntlm_report_file", str, "",
           "Write the diagnostic report (command ntlm.report: versions, options without "
           "secrets, the last handshakes) to this file when mitmproxy stops, e.g. for mitmdump, "
           "which has no command line."),
    Option("ntlm_config", str, "",
           "A config.yaml (mitmproxy and ntlm_* options) applied at start and again on SIGHUP; "
           "`mitm-ntlm start` sets it to the config file it found."),
    Option("ntlm_config_keep", Sequence[str], [],
           "Options ntlm_config does not change (`mitm-ntlm start` names its command-line "
           "flags here: they win over the file)."),
)
ROUTING: tuple[Option, ...] = (  # ParentRouter
    Option("ntlm_parent", Sequence[str], [],
           "Parent proxies, tried in order until one answers (CNTLM's Proxy lines): they route "
           "regular and socks5 mode, and are the failover parents behind --mode upstream:URL. "
           "A list; each entry may be comma-separated."),
    Option("ntlm_noproxy", Sequence[str], [],
           "Hosts that go direct in regular/socks5 mode: wildcards and CIDR ranges, e.g. "
           "'localhost, 127.0.0.*, 10.0.0.0/8, *.corp.example'. A list; each entry may be "
           "comma-separated."),
    Option("ntlm_pac", str, "",
           "PAC file (path or URL) whose FindProxyForURL picks the parent per request in "
           "regular/socks5 mode (PROXY a; PROXY b; DIRECT). 'auto': WPAD by DNS "
           "(http://wpad.<domain>/wpad.dat), then the system's proxy settings (environment, "
           "GNOME, KDE, macOS)."),
    Option("ntlm_pac_refresh", int, 600,
           "Seconds between fetches of the PAC file; it is also fetched when the network "
           "changes and on SIGHUP. A failed fetch keeps the last good PAC. 0: no schedule.",
           minimum=0),
    Option("ntlm_pac_parents", Sequence[str], [],
           "Parent proxies a PAC may send traffic (and the logon) to: host wildcards, e.g. "
           "'proxy*.corp.example'; a PAC answer naming another proxy is skipped. Unset: with "
           "ntlm_pac auto (WPAD can be spoofed on the LAN) only the ntlm_parent and --mode "
           "upstream hosts; with a PAC file or URL you named, any. A list; each entry may be "
           "comma-separated."),
    Option("ntlm_roaming", bool, False,
           "When no parent answers (laptop at home, VPN off), go direct; go through the parents "
           "again as soon as one answers."),
    Option("ntlm_parent_retry", int, 30,
           "Seconds an unreachable parent is skipped before it is tried again.", minimum=0),
)
ACCESS: tuple[Option, ...] = (  # ClientAccess: who may connect
    Option("ntlm_allow_remote", bool, False,
           "Let a single-user proxy listen beyond loopback (CNTLM's Gateway): every client that "
           "can reach it is logged on as you (ntlm_username, winbind or Kerberos). Combine with "
           "ntlm_allow_clients."),
    Option("ntlm_allow_clients", Sequence[str], [],
           "Client addresses allowed to connect, IPs/CIDRs (CNTLM's Allow); empty: all that can "
           "reach the listen address. A list; each entry may be comma-separated."),
    Option("ntlm_deny_clients", Sequence[str], [],
           "Client addresses refused, IPs/CIDRs (CNTLM's Deny). A list; each entry may be "
           "comma-separated."),
)
ORIGIN: tuple[Option, ...] = (  # OriginAuth: logons to servers
    Option("ntlm_origin_hosts", Sequence[str], [],
           "Servers to log on to automatically when they answer 401 NTLM or Negotiate, host "
           "patterns (e.g. 'sharepoint.corp.example, *.intranet.corp.example'). Never offered "
           "to other hosts. A list; each entry may be comma-separated."),
    Option("ntlm_origin_credentials", Sequence[str], [],
           "Own credentials per host pattern: 'pattern=FILE', each FILE (mode 0600) holding "
           "DOMAIN\\\\user and the password on two lines. Default: the upstream credentials. A "
           "list; each entry may be comma-separated."),
)
LISTEN: tuple[Option, ...] = (  # SharedPort: more than one process on the port
    Option("ntlm_shared_port", bool, False,
           "Listen with SO_REUSEPORT, so several mitmproxy processes started with this option "
           "on the same port share it, the kernel spreading new client connections over them "
           "(`mitm-ntlm start --workers N` sets it). Read at start. Linux spreads the "
           "connections; other systems only share the port."),
)
TUNNELS: tuple[Option, ...] = (  # DirectTunnelSwitch: passthrough tunnels without the layers
    Option("ntlm_direct_tunnels", bool, True,
           "Relay CONNECT tunnels to ignore_hosts hosts (passthrough, what `mitm-ntlm start` "
           "does by default) outside mitmproxy's layers: about half the CPU per tunnel. Only "
           "in mitmdump, with one identity for all clients and an http parent in upstream "
           "mode; such tunnels skip mitmproxy's http_connect, next_layer and server hooks. "
           "false: mitmproxy handles them like any other connection."),
)
OPTIONS = UPSTREAM + ROUTING + ACCESS + ORIGIN + LISTEN + TUNNELS
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def names(section: Iterable[Option]) -> frozenset[str]:
    return frozenset(o.name for o in section)


def default(name: str) -> Any:
    """An option's default, for the classes that take the option's value as an argument."""
    return BY_NAME[name].default


# What each addon's `configure` reads: a change to any of these names makes it configure again.
# Its own options, plus those of others (mitmproxy's, and ntlm_* declared by another addon).
READ_BY_POLICY = names(CREDENTIALS) | {"proxyauth"}
READ_BY_POOL = names(POOL)
READ_BY_ROUTER = names(ROUTING) | {"connection_strategy", "mode"}
READ_BY_ACCESS = names(ACCESS) | {
    "mode", "listen_host", "proxyauth", "ntlm_multiuser", "ntlm_username", "ntlm_winbind",
    "ntlm_scheme", "ntlm_kerberos_ccache", "ntlm_kerberos_keytab"}
READ_BY_ORIGIN = names(ORIGIN) | {"ntlm_dialect", "ntlm_max_failures", "ntlm_workstation",
                                   "ntlm_lockout_file"}
READ_BY_LISTEN = names(LISTEN)
READ_BY_TUNNELS = names(TUNNELS) | {
    "ignore_hosts", "allow_hosts", "proxyauth", "upstream_auth", "ntlm_multiuser",
    "ntlm_roaming", "mode", "http_connect_send_host_header"}


def declare(loader: Loader, section: Iterable[Option]) -> None:
    """Add an addon's own options to mitmproxy."""
    for o in section:
        loader.add_option(o.name, o.typespec, o.default, o.help,
                          choices=list(o.choices) if o.choices else None)


def items(value: Sequence[str]) -> list[str]:
    """The entries of a list option: each element split on commas, blanks dropped."""
    return [part.strip() for element in value for part in element.split(",") if part.strip()]


def _at_least(minimum: int) -> str:
    return "0 or more" if minimum == 0 else f"at least {minimum}"


def _shown(name: str, value: Any) -> str:
    return "(value not shown)" if name in SECRET else repr(value)


def problems(opts: Any, names: Iterable[str]) -> list[str]:
    """For each bad value among `names`: the option, the value and what is accepted."""
    found = []
    for name in sorted(names):
        o = BY_NAME.get(name)
        if o is None:
            continue
        value = getattr(opts, name)
        if o.choices and value not in o.choices:
            found.append(f"{name}={value!r} is not accepted: use one of {', '.join(o.choices)}")
        elif o.minimum is not None and value < o.minimum:
            found.append(f"{name}={value} is not accepted: it must be {_at_least(o.minimum)}")
    return found


def convert(name: str, raw: Any) -> Any:
    """A value given for one of our options before mitmproxy knew it (`--set` strings, or a
    config.yaml value), in the option's type; OptionsError saying what is wrong otherwise."""
    o = BY_NAME[name]
    strings = mitmproxy_internals.set_strings(raw)  # the --set values, else config.yaml's
    if o.typespec == Sequence[str]:
        values = strings if strings is not None else raw
        if isinstance(values, str):
            return [values]  # config.yaml `ntlm_parent: "a, b"`, as before lists
        if isinstance(values, list | tuple) and all(isinstance(v, str) for v in values):
            return list(values)
        raise exceptions.OptionsError(
            f"{name}: expected a list of strings (or one comma-separated string), got "
            f"{_shown(name, raw)}")
    if strings is not None:
        if len(strings) != 1:
            raise exceptions.OptionsError(f"{name} is given {len(strings)} times; give it once")
        raw = strings[0]
    if o.typespec is str:
        if isinstance(raw, str):
            return raw
        raise exceptions.OptionsError(
            f"{name}: expected text, got {_shown(name, raw)} ({type(raw).__name__}); quote it "
            f"in config.yaml")
    if o.typespec is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("", "true", "false"):
            return raw.lower() != "false"
        raise exceptions.OptionsError(f"{name}={raw!r} is not accepted: use true or false")
    if o.typespec is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise exceptions.OptionsError(
                f"{name}={raw!r} is not accepted: it must be a whole number"
                + (f", {_at_least(o.minimum)}" if o.minimum is not None else "")) from None
    raise AssertionError(f"unhandled option type for {name}")  # pragma: no cover


def unknown(name: str, known: Iterable[str]) -> str:
    """The message for an `ntlm_*` name nobody declares, with the closest known name."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else \
        "see the options in mitmweb's options editor or the README"
    return f"unknown option {name}: {hint}"


def take_deferred(opts: Any) -> list[str]:
    """Before mitmproxy applies the values it kept for options not yet declared: convert ours
    (mitmproxy's own parsing would fail the whole script load silently), and take out the ones
    that cannot be used. Returns a message for each value taken out and each unknown name."""
    deferred: dict[str, Any] = getattr(opts, "deferred", None) or {}
    problems = []
    known = [k for k in opts.keys() if k.startswith(PREFIX)]
    for name in list(deferred):
        if not name.startswith(PREFIX):
            continue
        if name not in BY_NAME:
            if name not in known:  # also not declared by another part or script
                problems.append(unknown(name, known))
            continue
        try:
            deferred[name] = convert(name, deferred[name])
        except exceptions.OptionsError as e:
            del deferred[name]
            problems.append(str(e))
    return problems
