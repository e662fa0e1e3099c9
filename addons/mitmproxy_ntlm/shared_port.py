"""More than one core: several mitmproxy processes (workers) listening on one port.

mitmdump runs its proxy on one thread, so a busy team gateway or a machine full of IDEs and
package managers saturates one core. With `ntlm_shared_port` each worker binds its listener
with SO_REUSEPORT and the kernel (Linux) hands each new client connection to one of them, by a
hash of the connection's addresses. A worker keeps its own pool of authenticated parent
connections; the lockout guard counts across workers when they share `ntlm_lockout_file`
(`mitm-ntlm start --workers N` sets both). Only processes of the same user can join a port.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from mitmproxy import exceptions

from . import mitmproxy_internals, options
from .runtime import Runtime

log = logging.getLogger("mitmproxy_ntlm")


class SharedPort:
    """Owns `ntlm_shared_port`: the runtime's `shared_port`, installed before the listeners
    start (the script's first `configure` runs before mitmproxy binds its ports)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def load(self, loader: Any) -> None:
        options.declare(loader, options.LISTEN)

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if not updated & options.READ_BY_LISTEN:
            return
        wanted = bool(ctx.options.ntlm_shared_port)
        if wanted and not hasattr(socket, "SO_REUSEPORT"):
            raise exceptions.OptionsError(
                "ntlm_shared_port needs SO_REUSEPORT, which this system does not have (Linux, "
                "macOS and the BSDs have it): run one mitmproxy per port instead")
        if wanted and not sys.platform.startswith("linux"):
            log.warning("[ntlm] ntlm_shared_port: on %s, SO_REUSEPORT lets processes share the "
                        "port but does not spread connections over them as Linux does",
                        sys.platform)
        if wanted == self.runtime.shared_port:
            return
        self.runtime.shared_port = wanted
        try:
            mitmproxy_internals.sync(self.runtime)
        except mitmproxy_internals.UnsupportedMitmproxy as e:
            self.runtime.shared_port = False
            raise exceptions.OptionsError(str(e)) from None
        if wanted:
            log.info("[ntlm] listening with SO_REUSEPORT: other workers may share the port")

    def done(self) -> None:
        if self.runtime.shared_port:
            self.runtime.shared_port = False
            mitmproxy_internals.sync(self.runtime)
