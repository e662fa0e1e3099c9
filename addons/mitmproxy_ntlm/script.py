"""What mitmproxy loads with `-s`: addons/ntlm.py says `addons = [new_group()]`.

The addon's parts sit behind one `AddonGroup`, which answers every hook name (None where no
part has it, so mitmproxy skips it), except the deprecated `add_log`, whose mere presence makes
mitmproxy print a deprecation warning at every start. A hook a part does not need under the
current options (`idle_hooks`, asked after every `configure`) is not offered at all, since each
hook call costs mitmproxy more than most of our hooks do (`requestheaders` and `http_connect`
always run: they drop the client's proxy credentials from every request).

The script module names every hook, as None (`unset_hooks`): mitmproxy asks it for each
event's hook before it walks its `addons`, and a name a module lacks costs CPython an
AttributeError, raised and formatted. With the names there, mitmproxy's walk down to the group
took 0.80 us per event instead of 2.17 (timeit, December): 16 events per kept-alive request,
1.5% of stock mitmdump's CPU per request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

# Every module that defines hooks, so that `hooks.all_hooks` names them all.
import mitmproxy.addonmanager
import mitmproxy.log
import mitmproxy.proxy.layers
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import ctx, exceptions, hooks

from mitmproxy_ntlm import options
from mitmproxy_ntlm.access import ClientAccess
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.contentview import TokenViewAddon
from mitmproxy_ntlm.direct_tunnel import DirectTunnelSwitch
from mitmproxy_ntlm.log_level import LogLevel
from mitmproxy_ntlm.memory import MemoryTrim
from mitmproxy_ntlm.origin import OriginAuth
from mitmproxy_ntlm.os_trust import OsTrustStore
from mitmproxy_ntlm.routing import ParentRouter
from mitmproxy_ntlm.runtime import Runtime
from mitmproxy_ntlm.shared_port import SharedPort

DEPRECATED_HOOKS = frozenset({"add_log"})
"""Hook names mitmproxy warns about when an addon merely has the attribute."""


class AddonGroup:
    """Addons that mitmproxy sees as one: each hook calls the parts that have it, in order,
    and the parts' commands are the group's. An exception in one part ends that event for
    the rest, as it does for the addons of one script.

    A part may name hooks it has no use for under the current options (`idle_hooks()`):
    after each `configure` the group stops offering them, until an option change needs
    them again."""

    def __init__(self, *parts: object) -> None:
        self.parts = parts
        self._startup_problems: list[str] = []
        self._own_hooks: dict[str, Callable[..., Any]] = {"load": self._after_load}
        self._bind(configured=False)
        for part in parts:
            for attr in dir(part):
                if not attr.startswith("_") and hasattr(method := getattr(part, attr),
                                                        "command_name"):
                    setattr(self, attr, method)  # mitmproxy collects commands by attribute

    def _bind(self, configured: bool) -> None:
        idle = [_idle_hooks(part) if configured else frozenset() for part in self.parts]
        for name in hooks.all_hooks:
            if name == "configure" or name in DEPRECATED_HOOKS:
                continue
            handlers = [h for part, off in zip(self.parts, idle, strict=True)
                        if name not in off and callable(h := getattr(part, name, None))]
            handlers += [h for h in (self._own_hooks.get(name),) if h is not None]
            # None: mitmproxy skips the hook without calling anything.
            setattr(self, name, _in_order(handlers) if handlers else None)

    def configure(self, updated: set[str]) -> None:
        try:
            problems = self._startup_problems + options.problems(ctx.options, updated)
            self._startup_problems = []
            if problems:
                raise exceptions.OptionsError("\n".join(problems))
            for part in self.parts:
                configure = getattr(part, "configure", None)
                if callable(configure):
                    configure(updated)
        except exceptions.OptionsError as e:
            if set(updated) >= ctx.options.keys() and not _proxy_running():
                # The script loader's first configure: mitmproxy would log this with a
                # traceback and still bring up its listeners; end start-up here instead.
                raise SystemExit(startup_failure(str(e))) from None
            raise
        finally:  # also after an OptionsError: mitmproxy then configures the old values again
            self._bind(configured=True)

    def _after_load(self, loader: Any) -> None:
        """Values mitmproxy kept for our options until they were declared, checked now."""
        self._startup_problems += options.take_deferred(ctx.options)


def startup_failure(message: str) -> str:
    """One line per problem, each saying it is mitmproxy-ntlm's, then that nothing started."""
    lines = [line if line.startswith("mitmproxy-ntlm") else f"mitmproxy-ntlm: {line}"
             for line in message.splitlines() if line.strip()]
    return "\n".join([*lines, "mitmproxy-ntlm: not started"])


def _proxy_running() -> bool:
    """Whether mitmproxy is past start-up (a script reloaded at runtime must not exit it).
    Without a script loader (tests that build the addons themselves): as if running."""
    loader = ctx.master.addons.get("scriptloader")
    return bool(getattr(loader, "is_running", True))


def _idle_hooks(part: object) -> frozenset[str]:
    idle = getattr(part, "idle_hooks", None)
    return frozenset(idle()) if callable(idle) else frozenset()


def _in_order(handlers: list[Callable[..., Any]]) -> Callable[..., Any]:
    if len(handlers) == 1:
        return handlers[0]
    if any(inspect.iscoroutinefunction(h) for h in handlers):
        async def call_async(*args: Any) -> None:
            for handler in handlers:
                result = handler(*args)
                if inspect.isawaitable(result):
                    await result
        return call_async

    def call(*args: Any) -> None:
        for handler in handlers:
            handler(*args)
    return call


def unset_hooks() -> dict[str, None]:
    """Every hook name, None: for the script module's namespace (see the module docstring)."""
    return dict.fromkeys(sorted(set(hooks.all_hooks) - DEPRECATED_HOOKS))


def new_group() -> AddonGroup:
    """The script's addons as mitmproxy sees them (addons/ntlm.py: `addons = [new_group()]`)."""
    # Order matters: access control first; then the router decides which flows go to a
    # parent; then the auth addon acts on them.
    # One runtime for the parts whose state the connection layers read (see runtime.py).
    runtime = Runtime()
    return AddonGroup(ClientAccess(), ParentRouter(runtime), NtlmUpstreamAuth(runtime),
                      OriginAuth(runtime), SharedPort(runtime), DirectTunnelSwitch(runtime),
                      OsTrustStore(), TokenViewAddon(), MemoryTrim(), LogLevel())
