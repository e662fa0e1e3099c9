"""The addon list mitmproxy loads with `-s` (addons/ntlm.py re-exports it)."""

from mitmproxy_ntlm.access import ClientAccess
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.origin import OriginAuth
from mitmproxy_ntlm.routing import ParentRouter

# Order matters: access control first; then the router decides which flows go to a parent;
# then the auth addon acts on them.
addons = [ClientAccess(), ParentRouter(), NtlmUpstreamAuth(), OriginAuth()]
