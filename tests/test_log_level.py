"""The loggers' levels follow what mitmproxy shows (`log_level.LogLevel`)."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy.addons.eventstore import EventStore
from mitmproxy.addons.termlog import TermLog
from mitmproxy.test import taddons

from mitmproxy_ntlm.log_level import QUIETED, LogLevel


def levels() -> list[int]:
    return [logging.getLogger(name).level for name in QUIETED]


def test_records_are_dropped_only_while_nothing_shows_them() -> None:
    part = LogLevel()
    try:
        with taddons.context(TermLog(), part) as tctx:
            tctx.configure(part, termlog_verbosity="info")
            assert levels() == [logging.INFO] * len(QUIETED)
            assert not logging.getLogger("mitmproxy_ntlm").isEnabledFor(logging.DEBUG)
            assert not logging.getLogger("mitmproxy.proxy.server").isEnabledFor(logging.DEBUG)
            tctx.configure(part, termlog_verbosity="debug")
            assert levels() == [logging.NOTSET] * len(QUIETED)
            tctx.configure(part, termlog_verbosity="warn")
            own, mitmproxy = levels()
            assert own == logging.WARNING  # the addon's INFO records: nothing prints them
            assert mitmproxy == logging.INFO  # mitmproxy's own records as for stock mitmproxy
            own_logger = logging.getLogger("mitmproxy_ntlm")  # trace.py's: a logon's result
            assert own_logger.isEnabledFor(logging.WARNING)
            assert not own_logger.isEnabledFor(logging.INFO)
            tctx.configure(part, termlog_verbosity="error")
            assert levels() == [logging.ERROR, logging.INFO]
            tctx.configure(part, termlog_verbosity="alert")  # mitmproxy's level above info
            assert levels()[0] == logging.INFO + 1
            tctx.configure(part, termlog_verbosity="info")
            assert levels() == [logging.INFO] * len(QUIETED)  # and back
            part.done()
            assert levels() == [logging.NOTSET] * len(QUIETED)
    finally:
        part.done()


def test_an_event_log_keeps_debug_records() -> None:
    async def run() -> None:  # mitmproxy's event log needs a running loop
        part = LogLevel()
        try:
            with taddons.context(TermLog(), EventStore(), part) as tctx:
                tctx.configure(part, termlog_verbosity="info")
                part.running()
                assert levels() == [logging.NOTSET] * len(QUIETED)  # mitmweb, the console
        finally:
            part.done()

    asyncio.run(run())
