"""Memory given back after a busy period (issue 24): when to trim, driven by explicit times."""

from __future__ import annotations

import platform

import pytest

from mitmproxy_ntlm import memory
from mitmproxy_ntlm.script import new_group


def observe_all(periods: memory.QuietPeriods, readings: list[tuple[float, int]]) -> list[float]:
    """The moments at which `periods` said to trim, for (time, open connections) readings."""
    return [now for now, open_connections in readings if periods.observe(now, open_connections)]


def test_trims_once_per_quiet_period_after_a_busy_one() -> None:
    periods = memory.QuietPeriods(quiet_seconds=5)
    readings = [(0, 3), (1, 0), (5.9, 0), (6, 0), (7, 0), (60, 0)]  # busy, then quiet for long
    readings += [(61, 1), (62, 0), (66, 0), (67, 0), (68, 0)]  # a second busy period
    assert observe_all(periods, readings) == [6, 67]


def test_trims_once_after_start_up_then_not_without_connections() -> None:
    periods = memory.QuietPeriods(quiet_seconds=5)
    assert observe_all(periods, [(t, 0) for t in range(0, 100, 3)]) == [6]


def test_a_connection_restarts_the_quiet_wait() -> None:
    periods = memory.QuietPeriods(quiet_seconds=5)
    readings = [(0, 2), (1, 0), (4, 1), (5, 0), (9, 0), (10, 0)]
    assert observe_all(periods, readings) == [10]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_found_on_glibc() -> None:
    assert memory._malloc_trim() is not None
    memory.give_back_memory()  # collects and trims without raising


def test_the_script_group_runs_the_memory_trim() -> None:
    group = new_group()
    assert any(isinstance(part, memory.MemoryTrim) for part in group.parts)
    assert group.running is not None and group.done is not None


class _Cycle:
    """An object in a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_start_up_objects_are_frozen_while_running_and_thawed_by_a_runtime_change() -> None:
    """Frozen, a cycle made at start-up is never collected; a runtime option change gives
    it back to the collector (it may be an object the change replaced)."""
    import gc
    import weakref

    from mitmproxy.test import taddons

    part = memory.MemoryTrim()
    try:
        with taddons.context(part) as tctx:
            tctx.configure(part, ssl_insecure=True)  # start-up: nothing frozen yet
            frozen_before = gc.get_freeze_count()  # Python 3.12 starts with a few hundred
            leftover = _Cycle()
            gone = weakref.ref(leftover)
            part.running()
            assert gc.get_freeze_count() > frozen_before + 1000  # the whole test process
            del leftover
            gc.collect()
            assert gone() is not None  # frozen: the collector does not look at it
            tctx.configure(part, ssl_insecure=False)  # at runtime
            assert gc.get_freeze_count() == 0
            gc.collect()
            assert gone() is None
            part.running()  # a reloaded script's new part freezes again ...
            assert gc.get_freeze_count() > frozen_before + 1000
            part.done()  # ... and unloading it thaws
            assert gc.get_freeze_count() == 0
    finally:
        part.done()
        gc.unfreeze()
