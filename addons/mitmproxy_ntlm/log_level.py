"""Log records only when something shows them.

mitmproxy sets the root logger to DEBUG and hands every record, whatever its level, to its
deprecated `add_log` event: the record is formatted, handed to the event loop through
`call_soon_threadsafe` (a write to its wake-up socket) and then offered to every addon. So a
DEBUG record costs about as much when mitmdump's termlog hides it as when it is shown. The
handshake stages are DEBUG records (five per logon), and mitmproxy writes two per closed
connection ("closing transports"): work for nobody on a proxy that logs at info.

`LogLevel` sets the level of the `mitmproxy_ntlm` and `mitmproxy` loggers to what is shown:
DEBUG (their parent's, unset) when the termlog shows debug or an event log keeps records
(mitmweb, the console: their event log can show debug), INFO otherwise. Under a termlog that
shows only warnings or errors (and no event log), the addon's own logger goes up to that
level too: its one INFO record per logon (formatted, handed to the event loop, offered to
every addon) cost an intercepted tunnel 1.3% of its instructions (51.9 against 51.2 M).
mitmproxy's own INFO records are left as they are, as for stock mitmproxy. The stages are
kept on the flows either way.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

OWN = "mitmproxy_ntlm"
QUIETED = (OWN, "mitmproxy")
"""The loggers whose DEBUG records are dropped when nothing shows them."""


def debug_shown() -> bool:
    """Whether some part of mitmproxy displays DEBUG records."""
    if getattr(ctx.options, "termlog_verbosity", "info") == "debug":
        return True
    return ctx.master.addons.get("eventstore") is not None


def termlog_level() -> int:
    """The lowest level mitmproxy's termlog prints (INFO when it names an unknown one)."""
    level = logging.getLevelName(str(getattr(ctx.options, "termlog_verbosity", "info")).upper())
    return level if isinstance(level, int) else logging.INFO


class LogLevel:
    """Owns the level of the `QUIETED` loggers while the addon is loaded."""

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            self.apply()

    def running(self) -> None:
        self.apply()  # every addon (an event log) is there now

    def apply(self) -> None:
        if debug_shown():
            levels = dict.fromkeys(QUIETED, logging.NOTSET)
        else:
            levels = {**dict.fromkeys(QUIETED, logging.INFO),
                      OWN: max(logging.INFO, termlog_level())}
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    def done(self) -> None:
        for name in QUIETED:
            logging.getLogger(name).setLevel(logging.NOTSET)
