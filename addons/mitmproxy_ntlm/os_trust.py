"""Check upstream TLS against the operating system's CA store, not only certifi's.

Behind a TLS-inspecting corporate gateway, every server certificate is signed by the
company's CA, which IT installs into the OS store; certifi (mitmproxy's default) does not
have it, so every intercepted https would fail. When the user has chosen no trust store
(`ssl_verify_upstream_trusted_ca` and `_confdir` both empty), the OS store is used, and one
INFO line says so at start. The user's own setting always wins.
"""

from __future__ import annotations

import logging
import os
import ssl

from mitmproxy import ctx

log = logging.getLogger("mitmproxy_ntlm")

WELL_KNOWN_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS (system roots only), BSDs
)


def os_trust_store() -> tuple[str, str] | None:
    """("file" or "dir", path) of the OS CA store that OpenSSL would use, or None."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *WELL_KNOWN_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return "file", candidate
    for candidate in (paths.capath, paths.openssl_capath):
        if candidate and os.path.isdir(candidate):
            return "dir", candidate
    return None


class OsTrustStore:
    """Addon part: at start, point mitmproxy's upstream verification at the OS CA store."""

    def running(self) -> None:
        opts = ctx.options
        if opts.ssl_verify_upstream_trusted_ca or opts.ssl_verify_upstream_trusted_confdir:
            return  # the user's choice
        if opts.ssl_insecure:
            return  # upstream certificates are not checked at all
        store = os_trust_store()
        if store is None:
            log.info("[ntlm] no OS CA store found: upstream TLS certificates are checked "
                     "against certifi's CAs (set ssl_verify_upstream_trusted_ca to a PEM bundle "
                     "that has your company's CA)")
            return
        kind, path = store
        if kind == "file":
            opts.update(ssl_verify_upstream_trusted_ca=path)
        else:
            opts.update(ssl_verify_upstream_trusted_confdir=path)
        log.info("[ntlm] upstream TLS certificates are checked against the OS CA store %s "
                 "(where a company's TLS inspection CA lives); set "
                 "ssl_verify_upstream_trusted_ca to use another", path)
