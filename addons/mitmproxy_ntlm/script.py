"""The addon list mitmproxy loads with `-s` (addons/ntlm.py re-exports it)."""

from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.routing import ParentRouter

# The router runs first: it decides which flows go to a parent, the auth addon then acts on them.
addons = [ParentRouter(), NtlmUpstreamAuth()]
