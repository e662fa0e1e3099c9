"""Client-supplied text on its way into a log line, a flow comment or an error page.

User names, hosts, URLs and header values come from whoever connects. Written out raw, a CR/LF
in a Basic user name forges whole log lines, an ESC sequence rewrites the terminal, and a
20 KB name fills the log. `shown` is the one way such text gets out: characters that are not
printable become escapes as in `repr` (`\\r`, `\\n`, `\\x1b`, `\\u2028`), and the text is cut
to a bounded length. Backslashes stay as typed, so `DOMAIN\\user` reads as the user wrote it.
`EscapedLogArguments` applies it to every argument of every log call of this package, so no
call can forget it.
"""

from __future__ import annotations

import logging

LOG_LIMIT = 1000  # characters of one log argument (a user name, a host, a URL, a reason)
PAGE_LIMIT = 4000  # characters of an error page body or a flow comment

LOGGER = "mitmproxy_ntlm"


def shown(value: object, limit: int = LOG_LIMIT) -> str:
    """`value` as text that stays on one line and within `limit` characters (plus a note
    saying how much was cut)."""
    text = value if isinstance(value, str) else str(value)
    cut = ""
    if len(text) > limit:
        cut = f"... ({len(text) - limit} more characters)"
        text = text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                       for ch in text)
    return text + cut


class EscapedLogArguments(logging.Filter):
    """Shows every argument of a log record through `shown` (numbers stay numbers for %d);
    a message without arguments is escaped as a whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(a if isinstance(a, int | float) else shown(a) for a in args)
        elif isinstance(args, dict) and args:
            record.args = {k: v if isinstance(v, int | float) else shown(v)
                           for k, v in args.items()}
        elif not args:
            msg = record.msg if isinstance(record.msg, str) else str(record.msg)
            if not msg.isprintable():
                record.msg = shown(msg, limit=PAGE_LIMIT)
        return True


def escape_log_records() -> None:
    """Install `EscapedLogArguments` on the package's logger (once)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, EscapedLogArguments) for f in logger.filters):
        logger.addFilter(EscapedLogArguments())
