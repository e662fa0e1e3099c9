"""A client's proxy credentials end at mitmproxy.

`Proxy-Authorization` is addressed to the proxy the client talks to, i.e. to us: in multi-user
mode it carries a user's domain password in Basic. Left on the request, mitmproxy forwards it
to wherever the flow goes: an origin server (NoProxy, PAC DIRECT, roaming, requests inside
tunnels, SOCKS5), or the parent, and it stays on the flow for mitmweb and saved flows. The
addon reads the multi-user identity from it first, then drops it from every request and
CONNECT, whatever the route (see `NtlmUpstreamAuth.requestheaders`).
"""

from __future__ import annotations

from mitmproxy import http

# Request headers that carry the client's credentials for this proxy.
CLIENT_PROXY_CREDENTIALS = ("Proxy-Authorization",)


def drop_client_proxy_credentials(headers: http.Headers) -> None:
    """Remove every value of the client's proxy credential headers (any spelling)."""
    for name in CLIENT_PROXY_CREDENTIALS:
        if name in headers:
            del headers[name]


def relayed_to_parent(flow: http.HTTPFlow, upstream_mode: bool) -> bool:
    """The request itself goes to a parent proxy (absolute-form plain http), as opposed to an
    origin (direct, or inside a tunnel). The same test as mitmproxy's `upstream_auth`."""
    return (flow.server_conn.via is not None or upstream_mode) and flow.request.scheme == "http"
