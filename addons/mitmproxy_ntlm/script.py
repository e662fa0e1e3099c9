"""The addon list mitmproxy loads with `-s` (addons/ntlm.py re-exports it)."""

from mitmproxy_ntlm.addon import NtlmUpstreamAuth

addons = [NtlmUpstreamAuth()]
