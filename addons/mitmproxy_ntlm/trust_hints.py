"""How a user makes tools trust mitmproxy's CA, for intercepted HTTPS (`mitm-ntlm ca`).

Passthrough (the default of `mitm-ntlm start`) needs none of this: the tools see the servers'
own certificates. Only hosts that mitmproxy intercepts are signed by its CA. Tools that bring
their own CA list (pip, Python, Node, Java) also need a word after the OS store has it.
"""

from __future__ import annotations

from pathlib import Path

from .os_trust import os_trust_store


def trust_instructions(ca: Path) -> str:
    """Commands for the tools people point at a CNTLM replacement, and for the OS store."""
    cer = ca.with_name("mitmproxy-ca-cert.cer")
    store = os_trust_store()
    bundle = store[1] if store and store[0] == "file" else "/etc/ssl/certs/ca-certificates.crt"
    created = "" if ca.exists() else "  (mitmproxy creates it at its first start)"
    return f"""\
mitmproxy's CA certificate: {ca}{created}
Intercepted HTTPS is signed by it; make your tools trust it (hosts passed through need nothing).
  For one command:  curl --cacert {ca} ...
  The OS store (curl, git, apt, wget and most tools):
    Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/mitmproxy.crt
                   sudo update-ca-certificates
    Fedora/RHEL:   sudo cp {ca} /etc/pki/ca-trust/source/anchors/ && sudo update-ca-trust
    macOS:         sudo security add-trusted-cert -d -r trustRoot \\
                     -k /Library/Keychains/System.keychain {ca}
    Windows:       certutil -user -addstore Root {cer}
  Tools with their own CA list (after the OS step, {bundle} has it):
    git:     git config --global http.sslCAInfo {bundle}
    pip:     pip config set global.cert {bundle}
    Python:  export REQUESTS_CA_BUNDLE={bundle} SSL_CERT_FILE={bundle}
    npm:     export NODE_EXTRA_CA_CERTS={ca}
    Java:    keytool -importcert -cacerts -alias mitmproxy -file {ca}   (JDK 9+, as root)
"""
