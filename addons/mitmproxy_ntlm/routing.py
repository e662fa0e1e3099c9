"""Where traffic goes: parent lists with failover, NoProxy, PAC, roaming, regular/SOCKS5 modes.

In upstream mode mitmproxy sends everything to the `--mode` parent; `ntlm_parent` adds failover
parents behind it. In regular mode (the client names the target) and SOCKS5 mode this addon
routes per flow:
- plain http: the flow gets a fresh server connection object whose `via` is the chosen parent
  (never the shared placeholder, whose `via` would leak into later requests);
- CONNECT and SOCKS5 tunnels: the tunnel's server connection gets `via`, and the NTLM parent
  layer goes under whatever mitmproxy then chooses for the tunnel, as upstream mode does.
NoProxy hosts and PAC `DIRECT` answers go direct. Routing needs `connection_strategy=lazy`:
with eager, mitmproxy connects to the target directly before any routing can happen.
Failover and roaming (going direct when no parent answers) happen in the parent layer, where
a failed connect is seen; see `layers.upstream.NtlmUpstreamProxy`, which reads the list from the
`Runtime`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import socket

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer
from mitmproxy.proxy.mode_specs import ProxyMode, RegularMode, Socks5Mode, UpstreamMode

from . import discovery, options
from .layers.upstream import NtlmUpstreamProxy, parent_tunnel
from .pac import Found, PacError, PacResolver, check_pac, load_pac
from .pac_watch import PacWatcher
from .parents import NoProxy, ParentList, ServerSpec, parse_parents, spec_text
from .runtime import Runtime

log = logging.getLogger("mitmproxy_ntlm")

PAC_AUTO = "auto"
REFUSED_LOGGED_MAX = 256  # distinct refused PAC parents logged per PAC


class ParentRouter:
    """Chooses the parent (or direct) for each connection and keeps the failover list."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime if runtime is not None else Runtime()
        self.parents = ParentList([])
        self.noproxy = NoProxy("")
        self.pac: PacResolver | None = None
        self.roaming = False
        self._going_direct = False
        self._pac_location = ""
        self._pac_refresh = 0
        self._pac_watch: PacWatcher | None = None
        self._pac_parents: list[str] | None = None  # host wildcards; None: any
        self._pac_parent_patterns: list[str] = []
        self._pac_spoofable = False
        self._refused_logged: set[ServerSpec] = set()
        self._running = False

    def load(self, loader: Loader) -> None:
        options.declare(loader, options.ROUTING)

    def configure(self, updated: set[str]) -> None:
        if not updated & options.READ_BY_ROUTER:
            return
        opts = ctx.options
        try:
            specs = parse_parents(", ".join(options.items(opts.ntlm_parent)))
            self.noproxy = NoProxy(", ".join(options.items(opts.ntlm_noproxy)))
        except ValueError as e:
            raise exceptions.OptionsError(f"mitmproxy-ntlm: {e}") from None
        upstream = [m for m in (ProxyMode.parse(s) for s in opts.mode)
                    if isinstance(m, UpstreamMode)]
        first = [(m.scheme, m.address) for m in upstream]
        self.parents = ParentList(first + [s for s in specs if s not in first],
                                  retry_after=float(opts.ntlm_parent_retry))
        self._pac_parent_patterns = [p.lower() for p in options.items(opts.ntlm_pac_parents)]
        self._update_pac_parents()
        if updated & {"ntlm_pac", "ntlm_pac_refresh"}:
            self._configure_pac(opts.ntlm_pac, opts.ntlm_pac_refresh, "ntlm_pac" in updated)
        self.roaming = opts.ntlm_roaming
        routes = bool(specs or self.pac or self._pac_location)
        if routes and self._routed_modes() and opts.connection_strategy != "lazy":
            raise exceptions.OptionsError(
                "ntlm_parent/ntlm_pac need --set connection_strategy=lazy in regular and socks5 "
                "mode: with the default (eager) mitmproxy connects to each target directly "
                "before it can be routed")
        self.runtime.parents, self.runtime.roaming = self.parents, self.roaming
        if specs:
            log.info("[ntlm] parents in failover order: %s",
                     ", ".join(f"{h}:{p}" for _, (h, p) in self.parents.specs))

    def _configure_pac(self, location: str, refresh: int, changed: bool) -> None:
        """Load an explicit PAC now (a bad one is refused at once); `auto` is discovered by the
        watcher, which also fetches either again on its schedule. The same location set again
        (SIGHUP) is fetched again in the background, keeping the current PAC if that fails."""
        if (changed and self._pac_watch is not None and location == self._pac_location
                and refresh == self._pac_refresh):
            self._pac_watch.reload_now()
            return
        if self._pac_watch is not None:
            self._pac_watch.stop()
            self._pac_watch = None
        if changed:
            self._use_pac(None)
            if location and location != PAC_AUTO:
                try:
                    found = Found(load_pac(location), location)
                    check_pac(found.script)
                    self._use_pac(found)
                except PacError as e:
                    raise exceptions.OptionsError(str(e)) from None
        self._pac_location, self._pac_refresh = location, refresh
        if not location:
            return
        auto = location == PAC_AUTO
        passed = self.pac.script if self.pac is not None else None
        refused: tuple[str, PacError] | None = None

        def load() -> Found:
            """Runs in the watcher's thread: the test evaluation never blocks the loop. The
            script that passed last, or was refused last, is not evaluated again."""
            nonlocal passed, refused
            if auto:
                found = discovery.discover(discovery.SystemProbe(is_own=self._is_own))
            else:
                found = Found(load_pac(location), location)
            if refused is not None and found.script == refused[0]:
                raise PacError(str(refused[1]))
            if found.script != passed:
                try:
                    check_pac(found.script)
                except PacError as e:
                    refused = (found.script, e)
                    raise
                passed = found.script
            return found

        self._pac_watch = PacWatcher(location, load, self._use_pac, refresh, fetch_at_start=auto)
        if self.pac is not None:
            self._pac_watch.known(self.pac.script)
        if self._running:
            self._pac_watch.start()

    def _use_pac(self, found: Found | None) -> None:
        """Switch to this PAC (None: none); pacparser holds one script, so the old one is
        closed first and restored if the new one does not parse."""
        old = self.pac
        if old is not None:
            old.close()
            self.pac = None
        self.parents.forget_learned()
        if found is None:
            self._pac_spoofable = False
            self._update_pac_parents()
            return
        try:
            self.pac = PacResolver(found.script)
        except PacError:
            if old is not None:
                self.pac = PacResolver(old.script)
            raise
        self._pac_spoofable = found.spoofable
        self._update_pac_parents()
        log.info("[ntlm] PAC file loaded from %s", found.source)

    def _update_pac_parents(self) -> None:
        """The hosts a PAC may name as parent (None: any). A PAC found by WPAD may come from
        anyone on the LAN, so by default it may only pick among the configured parents (a PAC
        or proxy setting the user configured is trusted)."""
        self._refused_logged.clear()
        if self._pac_parent_patterns:
            self._pac_parents = self._pac_parent_patterns
        elif self._pac_spoofable:
            # called only when the list holds no learned (PAC-named) parents
            self._pac_parents = [host.lower() for _, (host, _) in self.parents.specs]
        else:
            self._pac_parents = None

    def _pac_parent_allowed(self, spec: ServerSpec) -> bool:
        """Whether this PAC answer may get connections (and the logon); logged once if not."""
        host, port = spec[1]
        if self._is_own(host, port):
            reason = "is this mitmproxy"
        elif self._pac_parents is not None and not any(
                fnmatch.fnmatchcase(host.lower(), p) for p in self._pac_parents):
            reason = "is not an allowed parent (ntlm_pac_parents)"
        else:
            return True
        if spec not in self._refused_logged and len(self._refused_logged) < REFUSED_LOGGED_MAX:
            self._refused_logged.add(spec)
            log.warning("[ntlm] the PAC names the proxy %r, which %s: skipped",
                        spec_text(spec), reason)
        return False

    def _is_own(self, host: str, port: int) -> bool:
        """Whether host:port is this mitmproxy (a discovered proxy must not loop back to us)."""
        if port not in self._own_ports():
            return False
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return host.lower() in ("localhost", socket.gethostname().lower(),
                                    str(ctx.options.listen_host).lower())
        return address.is_loopback or address.is_unspecified or str(address) == str(
            ctx.options.listen_host)

    @staticmethod
    def _own_ports() -> set[int]:
        """The ports mitmproxy listens on: configured, and bound (`-p 0` picks one)."""
        listen_port = ctx.options.listen_port  # None: each mode's default; 0: any free one
        ports = {m.custom_listen_port or (m.default_port if listen_port is None else listen_port)
                 for m in map(ProxyMode.parse, ctx.options.mode)}
        server = ctx.master.addons.get("proxyserver")
        if server is not None:
            ports.update(addr[1] for addr in server.listen_addrs())
        return ports

    def running(self) -> None:
        self._running = True
        if self._pac_watch is not None:
            self._pac_watch.start()

    def done(self) -> None:
        self._running = False
        if self._pac_watch is not None:
            self._pac_watch.stop()
            self._pac_watch = None
        if self.pac is not None:
            self.pac.close()
            self.pac = None
        self.runtime.parents, self.runtime.roaming = None, False

    @staticmethod
    def _routed_modes() -> bool:
        return any(isinstance(ProxyMode.parse(s), RegularMode | Socks5Mode)
                   for s in ctx.options.mode)

    def idle_hooks(self) -> set[str]:
        """No routing (no ntlm_parent or ntlm_pac in regular or socks5 mode): no hook to run
        (see script.AddonGroup)."""
        if (self.parents.specs or self.pac or self._pac_location) and self._routed_modes():
            return set()
        return {"requestheaders", "http_connect", "next_layer"}

    def _routes(self, client: connection.Client) -> bool:
        if not (self.parents.specs or self.pac):
            return False
        return isinstance(client.proxy_mode, RegularMode | Socks5Mode)

    def choose(self, scheme: str, host: str, port: int) -> ServerSpec | None:
        """The parent for a connection to host:port, or None to go direct."""
        if self.noproxy and self.noproxy.matches(host):
            return None
        if self.pac is not None:
            url = f"{scheme}://{host}:{port}/"
            choices = [c for c in self.pac.choices(scheme, host, url)
                       if c is None or self._pac_parent_allowed(c)]
            if not choices:
                return None  # no proxy the PAC named may be used: as if it said DIRECT
            for spec in choices:
                if spec is not None:
                    self.parents.remember(spec)
            alive = [c for c in choices if c is None or self.parents.alive(c)]
            choice = (alive or choices)[0]
            if choice is None:
                return None
        else:
            choice = self.parents.ordered()[0]
        if self.roaming and self.parents.all_dead():
            if not self._going_direct:
                log.warning("[ntlm] no parent proxy answers: going direct (ntlm_roaming)")
                self._going_direct = True
            return None
        if self._going_direct:
            log.info("[ntlm] trying the parent proxies again")
            self._going_direct = False
        return choice

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._routes(flow.client_conn) or flow.server_conn.via or flow.response:
            return
        if flow.request.method == "CONNECT":
            return
        parent = self.choose(flow.request.scheme, flow.request.host, flow.request.port)
        if parent is None:
            return
        server = connection.Server(address=(flow.request.host, flow.request.port))
        server.via = parent
        flow.server_conn = server

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self._routes(flow.client_conn) and not flow.response:
            flow.server_conn.via = self.choose("https", flow.request.host, flow.request.port)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # Script addons see next_layer before mitmproxy's own decision: putting the parent tunnel
        # here makes mitmproxy decide (TLS, TCP passthrough, HTTP) for the layer under it.
        context = nextlayer.context
        if not self._routes(context.client) or nextlayer.layer is not None:
            return
        if context.server.address is None:
            return  # e.g. the SOCKS5 handshake itself
        if any(isinstance(x, NtlmUpstreamProxy) for x in context.layers):
            return
        if isinstance(context.client.proxy_mode, RegularMode):
            if context.server.via is None:
                return  # plain http (routed per flow), or a CONNECT that goes direct
        else:
            host, port = context.server.address
            context.server.via = self.choose("https", host, port)
            if context.server.via is None:
                return
        nextlayer.layer = parent_tunnel(context)
