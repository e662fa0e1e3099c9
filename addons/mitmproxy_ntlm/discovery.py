"""`ntlm_pac: auto`: find the proxy settings without configuration, in the order browsers use.

1. WPAD by DNS: `http://wpad.<domain>/wpad.dat` for the machine's DNS domain and its parents,
   stopping before a public suffix (a `wpad.com` or `wpad.co.uk` belongs to a stranger: the
   classic WPAD hijack), fetched from the address our own lookup gave, redirects not followed;
   only an answer that defines `FindProxyForURL` counts.
2. The system's proxy settings: environment (`http_proxy`, `https_proxy`, `no_proxy`), GNOME
   (gsettings), KDE (kioslaverc), macOS (`scutil --proxy`), each only where it exists. A fixed
   proxy becomes a small PAC script, so everything downstream deals with PAC only; a proxy that
   is this mitmproxy itself is skipped (a loop otherwise).

Everything here blocks (DNS, HTTP, subprocesses): it runs in a worker thread (`pac_watch`).
The system is reached through `SystemProbe`, which tests fill with their own resolver and files.
"""

from __future__ import annotations

import ast
import configparser
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .pac import PAC_MAX_BYTES, Found, PacError, load_pac, read_within

log = logging.getLogger("mitmproxy_ntlm")

WPAD_TIMEOUT = 5.0
COMMAND_TIMEOUT = 3.0
HostPort = tuple[str, int]


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _run(args: list[str]) -> str | None:
    """A settings tool's output, or None when it is not installed or fails."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1024 * 1024)
    except OSError:
        return ""


@dataclass
class SystemProbe:
    """The pieces of the system discovery looks at; the defaults are the real ones."""
    fqdn: Callable[[], str] = socket.getfqdn
    resolv_conf: Callable[[], str] = lambda: _read_text(Path("/etc/resolv.conf"))
    resolve: Callable[[str], list[str]] = _resolve
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    run: Callable[[list[str]], str | None] = _run
    kde_config: Path = field(default_factory=lambda: Path.home() / ".config" / "kioslaverc")
    is_own: Callable[[str, int], bool] = lambda host, port: False
    wpad_port: int = 80
    fetch_pac: Callable[[str], str] = load_pac
    notes: list[str] = field(default_factory=list)
    """Why a source that has settings was not used, for the "found nothing" message."""


# --- WPAD by DNS -----------------------------------------------------------------------------

def _public_suffix(name: str) -> str:
    import publicsuffix2  # its list loads at first use (~0.05 s): only when WPAD is looked up
    return str(publicsuffix2.get_tld(name, strict=False))


def dns_domains(fqdn: str, resolv_conf: str) -> list[str]:
    """The machine's DNS domains: the fqdn's, then resolv.conf's `domain` and `search`."""
    domains = []
    if "." in fqdn.strip("."):
        domains.append(fqdn.strip(".").split(".", 1)[1])
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0] in ("domain", "search"):
            domains += words[1:]
    names = (d.strip(".").lower() for d in domains)
    return list(dict.fromkeys(d for d in names if d and not d.endswith(".arpa")))


def wpad_hosts(domains: Iterable[str]) -> list[str]:
    """`wpad.<d>` for each domain and its parents, never for a public suffix or a TLD."""
    hosts: list[str] = []
    for domain in domains:
        labels = domain.split(".")
        for i in range(len(labels) - 1):  # at least two labels
            candidate = ".".join(labels[i:])
            if _public_suffix(candidate) == candidate:
                break
            hosts.append(f"wpad.{candidate}")
    return list(dict.fromkeys(hosts))


def fetch_wpad(host: str, address: str, port: int, timeout: float = WPAD_TIMEOUT) -> str | None:
    """GET /wpad.dat from this address (the one our lookup gave: no second lookup, no
    redirects, no proxy), bounded in size; None unless it is a PAC script."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", "/wpad.dat", headers={"Host": host, "Connection": "close"})
        response = conn.getresponse()
        if response.status != 200:
            return None
        body = read_within(response, PAC_MAX_BYTES + 1, deadline)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if len(body) > PAC_MAX_BYTES:
        return None
    script = body.decode("utf-8", "replace")
    return script if "FindProxyForURL" in script else None


def from_wpad(probe: SystemProbe) -> Found | None:
    for host in wpad_hosts(dns_domains(probe.fqdn(), probe.resolv_conf())):
        for address in probe.resolve(host):
            script = fetch_wpad(host, address, probe.wpad_port)
            if script is not None:
                return Found(script, f"WPAD http://{host}/wpad.dat ({address})", spoofable=True)
    return None


# --- fixed proxies as a PAC script -----------------------------------------------------------

_BYPASS_NAME = re.compile(r"^[A-Za-z0-9*._-]+$")


def _bypass_condition(entry: str) -> str | None:
    """One no_proxy / ignore-hosts entry as a JavaScript condition on `host`."""
    entry = entry.strip().lower()
    if entry.startswith("[") or entry.count(":") > 1:
        return None  # IPv6: not routed by PAC here
    entry = entry.split(":", 1)[0]
    if entry == "*":
        return "true"
    if "/" in entry:
        try:
            net = ipaddress.IPv4Network(entry, strict=False)
        except ValueError:
            return None
        return (f"(/^[0-9.]+$/.test(host) && isInNet(host, {json.dumps(str(net.network_address))}, "
                f"{json.dumps(str(net.netmask))}))")
    if not entry or not _BYPASS_NAME.match(entry):
        return None
    if "*" in entry:
        return f"shExpMatch(host, {json.dumps(entry)})"
    bare = entry.lstrip(".")
    return f"(host == {json.dumps(bare)} || dnsDomainIs(host, {json.dumps('.' + bare)}))"


def fixed_proxy_pac(http: HostPort | None, https: HostPort | None,
                    bypass: Iterable[str] = ()) -> str:
    """PAC for "these proxies, except for these hosts"; a missing proxy means direct."""
    conditions = [c for c in map(_bypass_condition, bypass) if c]
    lines = ["function FindProxyForURL(url, host) {"]
    if conditions:
        lines.append(f"  if ({' || '.join(conditions)}) return \"DIRECT\";")

    def answer(proxy: HostPort | None) -> str:
        return json.dumps(f"PROXY {proxy[0]}:{proxy[1]}" if proxy else "DIRECT")
    lines.append(f"  if (url.substring(0, 6) == \"https:\") return {answer(https)};")
    lines.append(f"  return {answer(http)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_proxy(value: str, default_port: int = 8080) -> HostPort | None:
    """`http://user@proxy:3128/`, `proxy:3128`, KDE's `http://proxy 3128` -> (host, port)."""
    value = value.strip()
    if not value:
        return None
    if " " in value:  # KDE: URL, space, port
        value, _, port_text = value.rpartition(" ")
        value = f"{value.rstrip('/')}:{port_text}" if port_text.isdigit() else value
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port or default_port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None  # socks: cannot carry NTLM
    return (parts.hostname, port)


def _fixed(probe: SystemProbe, source: str, http: HostPort | None, https: HostPort | None,
           bypass: Iterable[str]) -> Found | None:
    kept = []
    for proxy in (http, https):
        if proxy is not None and probe.is_own(*proxy):
            probe.notes.append(f"{source} names this mitmproxy ({proxy[0]}:{proxy[1]})")
            proxy = None
        kept.append(proxy)
    if kept == [None, None]:
        return None
    return Found(fixed_proxy_pac(kept[0], kept[1], bypass), source)


# --- system settings -------------------------------------------------------------------------

def from_environment(probe: SystemProbe) -> Found | None:
    env = probe.environ

    def get(name: str) -> str:
        return env.get(name) or env.get(name.upper()) or ""
    bypass = get("no_proxy").split(",")
    return _fixed(probe, "environment (http_proxy/https_proxy)", parse_proxy(get("http_proxy")),
                  parse_proxy(get("https_proxy")), bypass)


def _gsetting(probe: SystemProbe, schema: str, key: str) -> object:
    out = probe.run(["gsettings", "get", schema, key])
    if out is None:
        return None
    text = re.sub(r"^@\w+ ", "", out.strip())  # '@as []' -> '[]'
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def from_gnome(probe: SystemProbe) -> Found | None:
    base = "org.gnome.system.proxy"
    mode = _gsetting(probe, base, "mode")
    if mode == "auto":
        url = _gsetting(probe, base, "autoconfig-url")
        return _pac_url(probe, "GNOME proxy settings", url) if isinstance(url, str) else None
    if mode != "manual":
        return None

    def proxy(kind: str) -> HostPort | None:
        host, port = _gsetting(probe, f"{base}.{kind}", "host"), _gsetting(probe, f"{base}.{kind}",
                                                                           "port")
        if isinstance(host, str) and host and isinstance(port, int) and port > 0:
            return (host, port)
        return None
    ignore = _gsetting(probe, base, "ignore-hosts")
    return _fixed(probe, "GNOME proxy settings", proxy("http"), proxy("https"),
                  ignore if isinstance(ignore, list) else [])


def from_kde(probe: SystemProbe) -> Found | None:
    if not probe.kde_config.is_file():
        return None
    config = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        config.read_string(_read_text(probe.kde_config))
    except configparser.Error:
        return None
    if not config.has_section("Proxy Settings"):
        return None
    section = config["Proxy Settings"]
    kind = section.get("ProxyType", "0")
    if kind == "2":
        return _pac_url(probe, "KDE proxy settings", section.get("Proxy Config Script", ""))
    if kind != "1":
        return None
    return _fixed(probe, "KDE proxy settings", parse_proxy(section.get("httpProxy", "")),
                  parse_proxy(section.get("httpsProxy", "")),
                  section.get("NoProxyFor", "").split(","))


def from_macos(probe: SystemProbe) -> Found | None:
    out = probe.run(["scutil", "--proxy"])
    if out is None:
        return None
    values = dict(re.findall(r"^\s*(\w+) : (.*?)\s*$", out, re.M))
    exceptions = re.findall(r"^\s*\d+ : (.*?)\s*$", out, re.M)
    if values.get("ProxyAutoConfigEnable") == "1":
        return _pac_url(probe, "macOS network settings",
                        values.get("ProxyAutoConfigURLString", ""))

    def proxy(kind: str) -> HostPort | None:
        port = values.get(f"{kind}Port", "")
        if values.get(f"{kind}Enable") == "1" and values.get(f"{kind}Proxy") and port.isdigit():
            return (values[f"{kind}Proxy"], int(port))
        return None
    return _fixed(probe, "macOS network settings", proxy("HTTP"), proxy("HTTPS"), exceptions)


def _pac_url(probe: SystemProbe, source: str, url: str) -> Found | None:
    if not url:
        return None
    try:
        return Found(probe.fetch_pac(url), f"{source}: PAC {url}")
    except PacError as e:
        probe.notes.append(f"{source}: {e}")
        return None


SOURCES: tuple[tuple[str, Callable[[SystemProbe], Found | None]], ...] = (
    ("WPAD", from_wpad),
    ("environment", from_environment),
    ("GNOME", from_gnome),
    ("KDE", from_kde),
    ("macOS", from_macos),
)


def discover(probe: SystemProbe | None = None) -> Found:
    """The first source that gives proxy settings; PacError naming what was tried otherwise."""
    probe = probe or SystemProbe()
    probe.notes.clear()
    for _name, source in SOURCES:
        found = source(probe)
        if found is not None:
            for note in probe.notes:
                log.debug("[ntlm] PAC auto-discovery: %s", note)
            return found
    raise PacError("PAC auto-discovery found nothing (tried: "
                   + ", ".join(name for name, _ in SOURCES) + ")"
                   + "".join(f"; {note}" for note in probe.notes))
