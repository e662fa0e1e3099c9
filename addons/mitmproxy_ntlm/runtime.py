"""The state that mitmproxy's connection layers reach at run time, with one owner.

mitmproxy builds its layers itself, one stack per connection, and hands them nothing of ours.
So the script creates one `Runtime` (`script.new_group`) and hands it to the addons; each sets
what its options say (the auth addon the policy and the pool, the router the parents, the
origin addon its engine factory) and calls `mitmproxy_internals.sync`, which installs the
layers bound to it. The layers only read it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .pool.lending import Openings

if TYPE_CHECKING:
    from mitmproxy import connection

    from .direct_tunnel import DirectTunnels
    from .engine import AuthEngine
    from .parents import ParentList
    from .policy import UpstreamPolicy
    from .pool import ParentPool

@dataclass
class TunnelCounts:
    """CONNECT tunnels the addon relayed itself (`direct_tunnel`), for ntlm.status."""

    opened: int = 0
    failed: int = 0
    open_now: int = 0


OriginEngineFactory = Callable[[Any], "AuthEngine | None"]
"""Given a mitmproxy context: the engine that logs on to that intranet server, or None."""


@dataclass(eq=False)
class Runtime:
    """What the parent and origin layers of every connection share."""

    # Credentials, lockout guard, traces (NtlmUpstreamAuth); None: no parent logon.
    policy: UpstreamPolicy | None = None
    # Authenticated parent connections lent per request (NtlmUpstreamAuth); None: off.
    pool: ParentPool | None = None
    # Failover list and roaming (ParentRouter).
    parents: ParentList | None = None
    roaming: bool = False
    # Automatic logon to allow-listed intranet servers (OriginAuth); None: off.
    origin_engines: OriginEngineFactory | None = None
    # Listeners shared with other processes by SO_REUSEPORT (SharedPort, ntlm_shared_port).
    shared_port: bool = False
    # CONNECTs to ignore_hosts relayed outside mitmproxy's layers (DirectTunnelSwitch); None: off.
    direct: DirectTunnels | None = None
    direct_counts: TunnelCounts = field(default_factory=TunnelCounts)
    # Parent connections being opened through the pool (see pool.lending).
    openings: Openings = field(default_factory=Openings)
    # Server connections whose tunnel failed after the CONNECT was answered: the status and
    # text that requests inside it get (see layers.upstream.answer_failed_tunnel).
    failed_tunnels: weakref.WeakKeyDictionary[connection.Connection, tuple[int, str]] = field(
        default_factory=weakref.WeakKeyDictionary)

    def replace_pool(self, pool: ParentPool | None) -> None:
        """A new pool (or none): the old one's connections are closed."""
        old = self.pool
        if old is not None and old is not pool:
            old.close_all()
        self.pool = pool
