"""The pool of authenticated parent connections, lent per request (as CNTLM and Px do).

- `sockets`: the idle sockets, per-user counts, waiters and read-to-the-end (no mitmproxy);
- `reuse`: when an authenticated connection may go back to the pool (framing of the
  responses it carries), kept for the engine;
- `lending`: how a socket moves between a client connection's parent layer and the pool
  (mitmproxy's `ConnectionHandler` side: streams, opening from the pool).
"""

from .sockets import ParentPool, PooledConnection, PoolKey, PoolStats, Reservation, Waiter

__all__ = ["ParentPool", "PoolKey", "PoolStats", "PooledConnection", "Reservation", "Waiter"]
