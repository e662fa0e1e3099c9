"""Who may use the proxy: a proxy that adds someone's corporate identity is not an open relay.

In single-user mode every client is logged on at the parent as the configured user, so the
addon refuses to listen beyond loopback unless clients must authenticate (multi-user mode or
mitmproxy's proxyauth) or `ntlm_allow_remote` says it is meant (CNTLM's `Gateway yes`).
`ntlm_allow_clients` / `ntlm_deny_clients` are CNTLM's Allow/Deny lists.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode

from . import options
from .schemes import SchemeMode

log = logging.getLogger("mitmproxy_ntlm")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: Sequence[str], option: str) -> list[Network]:
    networks = []
    for item in options.items([element.replace(";", ",") for element in value]):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise exceptions.OptionsError(f"{option}: {item} is not an IP or CIDR") from None
    return networks


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (all interfaces) or a host name


def single_identity(opts: Any) -> str | None:
    """Whose identity every client gets in single-user mode (None: each client brings its own,
    or there is none). Winbind and Kerberos without ntlm_username lend the logged-on user's
    or the ticket's identity just the same."""
    if opts.ntlm_multiuser:
        return None
    if opts.ntlm_username:
        return str(opts.ntlm_username)
    if opts.ntlm_winbind:
        return "the logged-on user (ntlm_winbind)"
    scheme = SchemeMode(opts.ntlm_scheme)
    if scheme is not SchemeMode.NTLM and (opts.ntlm_kerberos_ccache or opts.ntlm_kerberos_keytab
                                          or scheme is SchemeMode.KERBEROS):
        return "the principal of the Kerberos ticket"
    return None


class ClientAccess:
    """Refuses unsafe listen addresses in single-user mode and applies Allow/Deny lists."""

    def __init__(self) -> None:
        self.allow: list[Network] = []
        self.deny: list[Network] = []

    def load(self, loader: Loader) -> None:
        options.declare(loader, options.ACCESS)

    def configure(self, updated: set[str]) -> None:
        if not updated & options.READ_BY_ACCESS:
            return
        opts = ctx.options
        self.allow = parse_networks(opts.ntlm_allow_clients, "ntlm_allow_clients")
        self.deny = parse_networks(opts.ntlm_deny_clients, "ntlm_deny_clients")
        identity = single_identity(opts)
        if identity is None or opts.proxyauth or opts.ntlm_allow_remote:
            return
        for spec in opts.mode:
            mode = ProxyMode.parse(spec)
            if mode.type_name in ("local", "osproxy"):
                continue  # captures local processes; nothing listens for others
            host = mode.listen_host(opts.listen_host)
            if not is_loopback(host):
                where = host or "all interfaces"
                raise exceptions.OptionsError(
                    f"mitmproxy-ntlm refuses to listen on {where} ({spec}) in single-user mode: "
                    f"anyone who can reach it would be logged on at the parent as "
                    f"{identity}. Listen on loopback (--listen-host 127.0.0.1), make "
                    f"clients authenticate (--set ntlm_multiuser=true), or allow it knowingly "
                    f"with --set ntlm_allow_remote=true (best with ntlm_allow_clients)."
                )

    def idle_hooks(self) -> set[str]:
        """Without Allow/Deny lists every client may connect (see script.AddonGroup)."""
        return set() if self.allow or self.deny else {"client_connected"}

    def client_connected(self, client: Any) -> None:
        if not (self.allow or self.deny) or not client.peername:
            return
        ip = ipaddress.ip_address(client.peername[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        refused = any(ip in net for net in self.deny) or (
            bool(self.allow) and not any(ip in net for net in self.allow))
        if refused:
            client.error = "refused by ntlm_allow_clients / ntlm_deny_clients"
            log.warning("[ntlm] client %s refused by ntlm_allow_clients/ntlm_deny_clients", ip)
