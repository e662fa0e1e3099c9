"""A short soak: 40 httpx clients for 8 s through mitmdump into the pyspnego parent, two users.

Uses bench/soak.py (the full load test, run by hand) for everything: the rig, the clients, the
fd/RSS sampling and the isolation check. RSS growth is not asserted: 8 s is still warm-up.
"""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = pytest.mark.slow  # left out of CI's reduced runs on the older mitmproxy lines


def test_isolation_check_finds_violations() -> None:
    """The checker is not vacuous: wrong user, shared connection, untagged, squid names."""
    rec = soak.Record
    ok = [
        rec(1, "CORP\\alice", "GET", "http://127.0.0.1:1/hello?who=CORP%5Calice&n=1"),
        rec(2, "CORP\\bob", "CONNECT", "127.0.0.1:443"),
        rec(3, "CORP\\alice", "CONNECT", "localhost:443"),
    ]
    assert soak.check_isolation(ok) == []
    bad = [
        *ok,
        rec(6, "CORP\\alice", "GET", "http://127.0.0.1:1/hello?who=CORP%5Cbob&n=2"),
        rec(4, None, "GET", "http://127.0.0.1:1/hello?who=CORP%5Cbob"),
        rec(5, "CORP\\bob", "GET", "http://127.0.0.1:1/hello"),
        rec(1, "CORP\\bob", "GET", "http://127.0.0.1:1/hello?who=CORP%5Cbob&n=3"),
    ]
    problems = soak.check_isolation(bad)
    assert len(problems) == 4, problems  # three bad records; connection 1 carried two users
    assert "connection 1 carried" in problems[-1]
    squid = [
        rec(None, "C\\a", "GET", "http://127.0.0.1:1/?who=CORP%5Calice"),
        rec(None, "C\\b", "GET", "http://127.0.0.1:1/?who=CORP%5Cbob"),
    ]
    assert soak.check_isolation(squid, exact=False) == []
    squid.append(rec(None, "C\\a", "CONNECT", "127.0.0.1:443"))
    assert len(soak.check_isolation(squid, exact=False)) == 1


def test_short_soak_two_users_pyspnego() -> None:
    config = soak.SoakConfig(clients=40, seconds=8, parent="pyspnego", users=2)
    result = soak.run(config)
    report = soak.summary(result)
    assert result.total_failed == 0, report
    assert result.total_ok > 200 and all(result.stats.ok[k] for k in soak.KINDS), report
    assert result.violations == [], report
    assert result.records_checked > 100, report
    assert set(result.users_at_parent) == {"CORP\\alice", "CORP\\bob"}, report
    assert result.handshakes > 0, report
    assert result.fds_end <= result.fds_start + soak.FD_SLACK, report
