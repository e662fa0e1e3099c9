"""Every place where mitmproxy-ntlm swaps or reads a private part of mitmproxy, with the check
of the mitmproxy version that was tested.

`sync(runtime)` installs what the runtime's state needs, and puts mitmproxy's own back for
the rest (`uninstall` puts everything back):
- with a policy: `layers.http._upstream_proxy.HttpUpstreamProxy` (mitmproxy looks the class up
  through its module at call time) becomes `layers.upstream.NtlmUpstreamProxy`, and
  `HttpStream.handle_connect_regular`/`handle_connect_finish` the wrappers of
  `layers.connect_answer`, plus its `ServerTlsFirst` addon;
- with a pool: `ConnectionHandler.open_connection`/`handle_connection` the wrappers that lend
  sockets (`pool.lending`); with direct tunnels, `handle_connection` of a client looks at its
  first bytes (`direct_tunnel`);
- with origin logons: `layers.http.HttpClient` becomes `layers.origin_auth`'s factory;
- with a shared port (workers): `AsyncioServerInstance.listen` binds TCP listeners with
  SO_REUSEPORT (`_listen_shared`).
Every swapped-in function carries `_ntlm_original`, so that a reloaded script finds
mitmproxy's own. The version check refuses mitmproxy lines not in
`versions.TESTED_MITMPROXY` (`_upstream_proxy.py`, `tunnel.py`, `server.py`, `_http1.py` were
compared between them, see docs/design.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import mitmproxy
from mitmproxy import connection
from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy.proxy import commands, layer, mode_servers, server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _upstream_proxy

from .pool import lending
from .versions import NEWEST_MITMPROXY, TESTED_MITMPROXY, mitmproxy_tested

if TYPE_CHECKING:
    from .runtime import Runtime

SUPPORTED = TESTED_MITMPROXY


def _original(owner: Any, name: str) -> Any:
    """mitmproxy's own attribute, also when a script loaded before this one swapped it."""
    current = getattr(owner, name)
    return getattr(current, "_ntlm_original", current)


ORIGINAL_UPSTREAM_LAYER: type[_upstream_proxy.HttpUpstreamProxy] = _original(
    _upstream_proxy, "HttpUpstreamProxy")
ORIGINAL_HTTP_CLIENT: type[layer.Layer] = _original(http_layers, "HttpClient")
ORIGINAL_OPEN = _original(server.ConnectionHandler, "open_connection")
ORIGINAL_HANDLE = _original(server.ConnectionHandler, "handle_connection")
ORIGINAL_CONNECT_REGULAR = _original(http_layers.HttpStream, "handle_connect_regular")
ORIGINAL_CONNECT_FINISH = _original(http_layers.HttpStream, "handle_connect_finish")
ORIGINAL_LISTEN = _original(mode_servers.AsyncioServerInstance, "listen")


class UnsupportedMitmproxy(RuntimeError):
    pass


def mitmproxy_version() -> str:
    from mitmproxy import version

    return getattr(version, "VERSION", getattr(mitmproxy, "__version__", "unknown"))


def check_version(version: str | None = None) -> None:
    """Refuse to patch a mitmproxy whose private layers we have not tested."""
    version = version or mitmproxy_version()
    if not mitmproxy_tested(version):
        tested = ", ".join(v + "x" for v in SUPPORTED)
        newest = " or ".join(f"'mitmproxy=={v}' (Python {py})"
                             for py, v in NEWEST_MITMPROXY.items())
        raise UnsupportedMitmproxy(
            f"mitmproxy-ntlm replaces a private mitmproxy layer and is tested with mitmproxy "
            f"{tested}; this is mitmproxy {version}. Install a tested version, e.g. "
            f"pip install {newest}."
        )
    for name in ("_handshake_finished", "on_handshake_error", "event_to_child"):
        if not hasattr(ORIGINAL_UPSTREAM_LAYER, name):  # pragma: no cover - guards silent drift
            raise UnsupportedMitmproxy(f"mitmproxy {version}: TunnelLayer.{name} is missing")
    for name in ("open_connection", "handle_connection", "server_event", "handle_hook"):
        if not hasattr(server.ConnectionHandler, name):  # pragma: no cover
            raise UnsupportedMitmproxy(f"mitmproxy {version}: ConnectionHandler.{name} is missing")
    for name in ("handle_connect_regular", "handle_connect_finish"):
        if not hasattr(http_layers.HttpStream, name):  # pragma: no cover
            raise UnsupportedMitmproxy(f"mitmproxy {version}: HttpStream.{name} is missing")
    for name in ("listen", "handle_stream"):
        if not hasattr(mode_servers.AsyncioServerInstance, name):  # pragma: no cover
            raise UnsupportedMitmproxy(
                f"mitmproxy {version}: AsyncioServerInstance.{name} is missing")


# ---------------------------------------------------------------------- the swaps

_bound: Runtime | None = None
"""The runtime the swapped-in ConnectionHandler methods serve (set by `sync`)."""


def _open_connection(self: server.ConnectionHandler,
                     command: commands.OpenConnection) -> Coroutine[Any, Any, None]:
    runtime = _bound
    if runtime is None or command.connection not in runtime.openings.pending:
        return ORIGINAL_OPEN(self, command)  # type: ignore[no-any-return]
    return lending.open_connection(self, command, runtime.openings, ORIGINAL_OPEN)


def _handle_connection(self: server.ConnectionHandler,
                       conn: connection.Connection) -> Coroutine[Any, Any, None]:
    runtime = _bound
    if runtime is not None and runtime.direct is not None and conn is self.client:
        return runtime.direct.serve(self, runtime, ORIGINAL_HANDLE)
    if runtime is None or not runtime.openings.opened:  # not a parent connection of ours
        return ORIGINAL_HANDLE(self, conn)  # type: ignore[no-any-return]
    return lending.handle_connection(self, conn, runtime.openings, ORIGINAL_HANDLE)


async def _listen_shared(self: mode_servers.AsyncioServerInstance, host: str,
                         port: int) -> list[Any]:
    """mitmproxy's TCP listener with SO_REUSEPORT: each worker process binds the same port
    and the kernel spreads new connections over them. A port chosen by the system (0) or a
    UDP listener cannot be shared: mitmproxy's own then."""
    if port == 0 or self.mode.transport_protocol != "tcp":
        return await ORIGINAL_LISTEN(self, host, port)  # type: ignore[no-any-return]
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


_open_connection._ntlm_original = ORIGINAL_OPEN  # type: ignore[attr-defined]
_listen_shared._ntlm_original = ORIGINAL_LISTEN  # type: ignore[attr-defined]
_handle_connection._ntlm_original = ORIGINAL_HANDLE  # type: ignore[attr-defined]


def _swap(owner: Any, name: str, ours: Any, original: Any, on: bool) -> None:
    setattr(owner, name, ours if on else original)


def sync(runtime: Runtime) -> None:
    """Install what `runtime` needs now (see the module docstring), mitmproxy's own for the
    rest. Called by the addons after each change of the runtime."""
    global _bound
    from .layers import connect_answer, origin_auth, upstream

    upstream_on = runtime.policy is not None
    pool_on = upstream_on and runtime.pool is not None
    origin_on = runtime.origin_engines is not None
    if upstream_on or origin_on or runtime.shared_port:
        check_version()
    _bound = runtime if (upstream_on or origin_on) else None
    upstream.NtlmUpstreamProxy.runtime = runtime if upstream_on else None
    origin_auth.OriginAuthLayer.runtime = runtime if origin_on else None
    _swap(_upstream_proxy, "HttpUpstreamProxy", upstream.NtlmUpstreamProxy,
          ORIGINAL_UPSTREAM_LAYER, upstream_on)
    stream = http_layers.HttpStream
    _swap(stream, "handle_connect_regular", connect_answer.handle_connect_regular,
          ORIGINAL_CONNECT_REGULAR, upstream_on)
    _swap(stream, "handle_connect_finish", connect_answer.handle_connect_finish,
          ORIGINAL_CONNECT_FINISH, upstream_on)
    _swap(server.ConnectionHandler, "open_connection", _open_connection, ORIGINAL_OPEN, pool_on)
    _swap(server.ConnectionHandler, "handle_connection", _handle_connection, ORIGINAL_HANDLE,
          pool_on or (upstream_on and runtime.direct is not None))
    _swap(http_layers, "HttpClient", origin_auth.http_client_with_origin_auth,
          ORIGINAL_HTTP_CLIENT, origin_on)
    _swap(mode_servers.AsyncioServerInstance, "listen", _listen_shared, ORIGINAL_LISTEN,
          runtime.shared_port)
    master = getattr(mitmproxy_ctx, "master", None)
    if master is not None:
        # Only under connection_strategy=lazy (eager, the default, already sets up server TLS
        # first): every addon in mitmproxy's chain costs it a few microseconds on every event,
        # about 1% of the CPU of a kept-alive request.
        wanted = upstream_on and getattr(master.options, "connection_strategy", "") == "lazy"
        tls_first = master.addons.get(connect_answer.ServerTlsFirst.name)
        if wanted and tls_first is None:
            master.addons.add(connect_answer.ServerTlsFirst())
        elif not wanted and tls_first is not None:
            master.addons.remove(tls_first)


def share_listeners() -> None:
    """Listen with SO_REUSEPORT from the start: for a worker process (`workers.run_worker`),
    before mitmproxy binds. mitmproxy 12 loads `-s` scripts in a task that races its
    listeners, so the script's `ntlm_shared_port` may come after the first bind."""
    check_version()
    _swap(mode_servers.AsyncioServerInstance, "listen", _listen_shared, ORIGINAL_LISTEN, True)


def uninstall(runtime: Runtime | None = None) -> None:
    """Put all of mitmproxy's own back (addon unloaded or script reloaded); with `runtime`,
    its pool is closed and its layers switched off too."""
    from .runtime import Runtime

    if runtime is not None:
        runtime.replace_pool(None)
        runtime.policy = None
        runtime.origin_engines = None
        runtime.shared_port = False
        runtime.direct = None
    sync(runtime if runtime is not None else Runtime())


def installed() -> bool:
    return _upstream_proxy.HttpUpstreamProxy is not ORIGINAL_UPSTREAM_LAYER


# The swaps of single objects' event handlers (a CONNECT answered after the parent, see
# layers.connect_answer): mitmproxy layers dispatch through `self._handle_event`.

def redirect_events(obj: layer.Layer, handler: Callable[..., Any]) -> None:
    obj._handle_event = handler  # type: ignore[method-assign]


def restore_events(obj: layer.Layer) -> None:
    if "_handle_event" in vars(obj):
        del obj._handle_event


# ---------------------------------------------------------------------- private reads

def option_typespec(opts: Any, name: str) -> Any:
    """The declared type of any mitmproxy option (OptManager keeps them private)."""
    return opts._options[name].typespec


def set_strings(raw: Any) -> list[str] | None:
    """The `--set` strings of a value mitmproxy kept for an option not declared yet (its
    private `_UnconvertedStrings`), or None for a config.yaml value."""
    return getattr(raw, "val", None)


def unregister_contentview(registry: Any, name: str, view: Any) -> None:
    """mitmproxy 12's content view registry has no public removal: drop our entry and tell
    listeners (mitmweb) as its `register` does."""
    by_name = getattr(registry, "_by_name", {})
    if by_name.get(name) is view:
        del by_name[name]
        registry.on_change.send(view)
