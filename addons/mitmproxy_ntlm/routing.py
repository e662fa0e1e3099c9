"""Regular and SOCKS5 modes: send traffic through the parent proxy named by `ntlm_parent`.

In upstream mode mitmproxy routes everything to the parent itself. In regular mode (the client
names the target) and SOCKS5 mode, this addon does it per flow:
- plain http: the flow gets a fresh server connection object whose `via` is the parent (never
  the shared placeholder, whose `via` would leak into later requests);
- CONNECT and SOCKS5 tunnels: the tunnel's server connection gets `via`, and the NTLM parent
  layer goes under whatever mitmproxy then chooses for the tunnel, as upstream mode does.
Both need `connection_strategy=lazy`: with eager, mitmproxy connects to the target directly
before any routing can happen.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.net import server_spec
from mitmproxy.proxy import layer
from mitmproxy.proxy.mode_specs import RegularMode, Socks5Mode

from . import mitmproxy_internals

log = logging.getLogger("mitmproxy_ntlm")


class ParentRouter:
    """Routes regular-mode and SOCKS5-mode traffic through `ntlm_parent`."""

    def __init__(self) -> None:
        self.parent: Any = None  # mitmproxy ServerSpec: (scheme, (host, port))

    def load(self, loader: Loader) -> None:
        loader.add_option("ntlm_parent", str, "",
                          "Parent proxy URL for regular and socks5 modes, e.g. "
                          "http://proxy.corp.example:8080 (upstream mode names its parent in "
                          "--mode upstream:URL instead). Needs connection_strategy=lazy.")

    def configure(self, updated: set[str]) -> None:
        if "ntlm_parent" not in updated and "connection_strategy" not in updated:
            return
        value = ctx.options.ntlm_parent
        if not value:
            self.parent = None
            return
        try:
            spec = server_spec.parse(value, default_scheme="http")
        except ValueError as e:
            raise exceptions.OptionsError(f"ntlm_parent: {e}") from None
        if spec[0] not in ("http", "https"):
            raise exceptions.OptionsError("ntlm_parent must be an http:// or https:// URL")
        if ctx.options.connection_strategy != "lazy":
            raise exceptions.OptionsError(
                "ntlm_parent needs --set connection_strategy=lazy: with the default (eager) "
                "mitmproxy connects to each target directly before it can be routed")
        self.parent = spec
        log.info("[ntlm] regular/socks5 traffic goes through the parent %s:%d",
                 spec[1][0], spec[1][1])

    def _routes(self, client: connection.Client) -> bool:
        return self.parent is not None and isinstance(client.proxy_mode, RegularMode | Socks5Mode)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._routes(flow.client_conn) or flow.server_conn.via or flow.response:
            return
        if flow.request.method == "CONNECT":
            return
        server = connection.Server(address=(flow.request.host, flow.request.port))
        server.via = self.parent
        flow.server_conn = server

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self._routes(flow.client_conn) and not flow.response:
            flow.server_conn.via = self.parent

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # Script addons see next_layer before mitmproxy's own decision: putting the parent tunnel
        # here makes mitmproxy decide (TLS, TCP passthrough, HTTP) for the layer under it.
        context = nextlayer.context
        if not self._routes(context.client) or nextlayer.layer is not None:
            return
        if context.server.address is None:
            return  # e.g. the SOCKS5 handshake itself
        if any(isinstance(x, mitmproxy_internals.NtlmUpstreamProxy) for x in context.layers):
            return
        if isinstance(context.client.proxy_mode, RegularMode) and context.server.via is None:
            return  # regular mode before/without CONNECT: plain http is routed per flow
        context.server.via = self.parent
        nextlayer.layer = mitmproxy_internals.parent_tunnel(context)
