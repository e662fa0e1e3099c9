"""What mitmproxy loads with `-s` (addons/ntlm.py re-exports it): the addons, as one object.

For every event (several per request) mitmproxy walks each addon of a script, four levels deep
(script loader, script, module, addon), and asks each one for the hook by name; it also asks
the script module itself. Both walks are per-request costs that bench/instructions.py counts:
- the four addons sit behind one `AddonGroup`, so the walk meets one object instead of four;
- the module answers every hook name (`absent_hooks`): a name a module lacks costs CPython
  three formatted AttributeErrors per lookup.
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
from mitmproxy import hooks

from mitmproxy_ntlm.access import ClientAccess
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.origin import OriginAuth
from mitmproxy_ntlm.routing import ParentRouter


class AddonGroup:
    """Addons that mitmproxy sees as one: each hook calls the parts that have it, in order,
    and the parts' commands are the group's. An exception in one part ends that event for
    the rest, as it does for the addons of one script."""

    def __init__(self, *parts: object) -> None:
        self.parts = parts
        for name in hooks.all_hooks:
            handlers = [h for part in parts if callable(h := getattr(part, name, None))]
            if handlers:
                setattr(self, name, _in_order(handlers))
        for part in parts:
            for attr in dir(part):
                if not attr.startswith("_") and hasattr(method := getattr(part, attr),
                                                        "command_name"):
                    setattr(self, attr, method)  # mitmproxy collects commands by attribute


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


# Order matters: access control first; then the router decides which flows go to a parent;
# then the auth addon acts on them.
addons = [AddonGroup(ClientAccess(), ParentRouter(), NtlmUpstreamAuth(), OriginAuth())]


def absent_hooks(namespace: dict[str, object]) -> dict[str, None]:
    """Every hook name the script module lacks, mapped to None (mitmproxy skips a None hook)."""
    return {name: None for name in hooks.all_hooks if name not in namespace}
