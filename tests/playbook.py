"""Drive a mitmproxy layer without a network: events in, commands out.

mitmproxy tests its layers this way (its `Playbook`, which the installed package does not
ship). `LayerDriver` is the small part these tests need: it hands an event to the layer,
collects every command the layer yields, and answers what the proxy server would answer
(connections open at once, hooks complete as `on_hook` leaves the flow), so a test only plays
the peers: it feeds the bytes the client and the parent send and reads what the layer sends
them. Timers are recorded, never fired: a test fires one with `wake`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.proxy import commands, events, layer


class LayerDriver:
    """One layer and the proxy server around it."""

    def __init__(self, top: layer.Layer,
                 on_hook: Callable[[commands.StartHook], None] | None = None,
                 refuse: Callable[[connection.Server], str | None] | None = None) -> None:
        self.layer = top
        self.on_hook = on_hook  # e.g. picks the next layer, or edits a flow
        self.refuse = refuse  # an error for connections that cannot be opened
        self.commands: list[commands.Command] = []  # everything yielded so far
        self.opened: list[connection.Server] = []
        self.timers: list[commands.RequestWakeup] = []

    def feed(self, event: events.Event) -> list[commands.Command]:
        """Hand `event` to the layer, and the replies to what it asks meanwhile; the commands."""
        out: list[commands.Command] = []
        pending: deque[events.Event] = deque([event])
        while pending:
            # A layer's generator must run to its end before the next event goes in.
            for command in list(self.layer.handle_event(pending.popleft())):
                out.append(command)
                reply = self._answer(command)
                if reply is not None:
                    pending.append(reply)
        self.commands += out
        return out

    def start(self) -> list[commands.Command]:
        return self.feed(events.Start())

    def receive(self, conn: connection.Connection, data: bytes) -> list[commands.Command]:
        """`conn`'s peer sent `data`."""
        return self.feed(events.DataReceived(conn, data))

    def close(self, conn: connection.Connection) -> list[commands.Command]:
        """`conn`'s peer closed it."""
        conn.state &= ~connection.ConnectionState.CAN_READ
        return self.feed(events.ConnectionClosed(conn))

    def wake(self, timer: commands.RequestWakeup) -> list[commands.Command]:
        """The delay `timer` asked for has passed."""
        return self.feed(events.Wakeup(timer))

    def _answer(self, command: commands.Command) -> events.Event | None:
        if isinstance(command, commands.OpenConnection):
            conn = command.connection
            assert isinstance(conn, connection.Server)
            error = self.refuse(conn) if self.refuse is not None else None
            if error is None:
                conn.state = connection.ConnectionState.OPEN
                conn.timestamp_start = 1.0
                self.opened.append(conn)
            return events.OpenConnectionCompleted(command, error)
        if isinstance(command, commands.CloseConnection):
            command.connection.state = connection.ConnectionState.CLOSED
        elif isinstance(command, commands.RequestWakeup):
            self.timers.append(command)
        elif isinstance(command, commands.StartHook) and command.blocking:
            if self.on_hook is not None:
                self.on_hook(command)
            return events.HookCompleted(command)
        return None


def sent_to(conn: connection.Connection, cmds: list[commands.Command]) -> bytes:
    """The bytes `cmds` send on `conn`, in order."""
    return b"".join(c.data for c in cmds
                    if isinstance(c, commands.SendData) and c.connection is conn)


def closed(conn: connection.Connection, cmds: list[commands.Command]) -> bool:
    return any(isinstance(c, commands.CloseConnection) and c.connection is conn for c in cmds)
