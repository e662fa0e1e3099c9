"""mitmproxy-ntlm: authenticate to NTLM parent proxies from inside mitmproxy."""

__version__ = "0.1.0"
