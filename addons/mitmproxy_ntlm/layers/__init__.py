"""mitmproxy layers that run the engine on a connection (installed by `mitmproxy_internals`).

- `upstream`: the tunnel to the parent proxy (NTLM/Negotiate legs, failover, the pool);
- `connect_answer`: a multi-user CONNECT answered with the parent's verdict, not before it;
- `origin_auth`: automatic logon to allow-listed intranet servers (their 401).
"""
