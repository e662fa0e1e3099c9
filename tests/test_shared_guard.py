"""The lockout guard shared by several mitmproxy processes (ntlm_lockout_file): two guards on
one file act as one, and two real mitmdumps on one file send the parent no more wrong
passwords for an account than ntlm_max_failures in all."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyauth import ProxyAuth
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from mitmproxy_ntlm import options
from mitmproxy_ntlm.access import ClientAccess
from mitmproxy_ntlm.addon import NtlmUpstreamAuth
from mitmproxy_ntlm.multiuser import client_credentials
from mitmproxy_ntlm.origin import OriginAuth
from mitmproxy_ntlm.policy import AttemptsBusy, UpstreamPolicy, new_guard
from mitmproxy_ntlm.routing import ParentRouter
from mitmproxy_ntlm.runtime import Runtime
from mitmproxy_ntlm.script import AddonGroup
from mitmproxy_ntlm.shared_guard import SharedLockoutGuard
from tests.mitm import run_concurrently
from tests.test_options import assert_clean_refusal

USERS = {"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": "CORP"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # wall-clock seconds, as the file keeps them

    def __call__(self) -> float:
        return self.now


def two_guards(path: Path, limit: int = 3, **kwargs: object
               ) -> tuple[SharedLockoutGuard, SharedLockoutGuard]:
    """Two processes' guards on one file (fresh_for=0: `blocked()` reads the file each time)."""
    kwargs.setdefault("fresh_for", 0)
    a, b = (SharedLockoutGuard(str(path), limit, **kwargs) for _ in range(2))  # type: ignore[arg-type]
    for guard in (a, b):
        guard.attempt_timeout = 60
    return a, b


def as_alice(proxy_url: str) -> str:
    """The proxy URL with alice's right password (httpx sends it as Basic)."""
    user = quote("CORP\\alice")
    return proxy_url.replace("http://", f"http://{user}:Alice-Pass-1@", 1)


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# ---------------------------------------------------------------- two guards, one file


def test_two_guards_on_one_file_share_slots_failures_and_blocks(tmp_path: Path) -> None:
    a, b = two_guards(tmp_path / "lockout.db", cooldown=300)
    slots = [a.try_reserve("CORP\\alice"), a.try_reserve("alice@corp"), b.try_reserve("ALICE")]
    assert all(slots) and a.in_flight("alice") == b.in_flight("Corp\\Alice") == 3
    assert a.try_reserve("alice") is None and b.try_reserve("CORP\\ALICE") is None  # the 4th
    assert b.try_reserve("CORP\\bob") is not None  # another account
    for slot in slots:  # three wrong passwords, rejected in A
        a.rejected("corp\\Alice")
        b.release(slot)  # released by whichever process: the row is in the file
    assert b.blocked("CORP\\alice") and b.blocked("alice@corp") and b.failures("ALICE") == 3
    assert b.any_blocked() and not b.blocked("CORP\\bob")
    assert b.try_reserve("alice") is None and a.in_flight("alice") == 0
    b.reset()  # ntlm.reset or SIGHUP in B lifts the block in A
    assert not a.blocked("alice") and a.failures("alice") == 0 and a.try_reserve("alice")
    b.rejected("alice")
    a.accepted("CORP\\alice")  # a logon accepted anywhere ends the consecutive count
    assert b.failures("alice") == 0


def test_a_stale_nobody_blocked_still_refuses_the_logon(tmp_path: Path) -> None:
    """`any_blocked()` (asked per request) may lag by `fresh_for`; the logon path does not."""
    path = tmp_path / "lockout.db"
    a, _ = two_guards(path)
    b = SharedLockoutGuard(str(path), 3, fresh_for=3600)
    assert not b.any_blocked()  # remembered for an hour
    for _ in range(3):
        a.rejected("alice")
    assert not b.any_blocked() and not b.blocked("alice")  # stale, by design
    assert b.try_reserve("alice") is None  # but no slot: the file says 3 of 3
    b.rejected("bob")
    b.rejected("bob")
    b.rejected("bob")  # its own block shows at once
    assert b.any_blocked() and b.blocked("bob")


def test_another_process_rejection_voids_accepted_credentials(tmp_path: Path) -> None:
    """Credentials the parent accepted need no slot, until a rejection of the account is
    counted by any process: then they take a slot like any others."""
    a, b = two_guards(tmp_path / "lockout.db", limit=2, cooldown=300)
    policy = UpstreamPolicy(creds=None, multiuser=True, guard=b)
    alice = client_credentials("CORP\\alice", "was-right", "CORP", "WS")
    slot = policy.attempt(alice)
    policy.accepted(alice)
    policy.attempt_ended(slot)
    assert policy.attempt(alice) is None  # known good here: no slot
    a.rejected("alice")  # the password changed; another process learns it first
    assert a.try_reserve("alice") is not None  # 1 failure + 1 in flight: all slots
    with pytest.raises(AttemptsBusy, match="1 rejection plus 1 logon"):
        policy.attempt(alice)


def test_attempts_of_a_dead_process_expire_and_blocks_cool_down(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "lockout.db"
    a, b = two_guards(path, cooldown=300, clock=clock)
    assert all(a.try_reserve("alice") for _ in range(3))
    del a  # the process dies mid-logon: its rows stay in the file
    assert b.try_reserve("alice") is None
    clock.now += 61  # attempt_timeout
    assert b.in_flight("alice") == 0 and b.try_reserve("alice") is not None
    for _ in range(3):
        b.rejected("alice")
    clock.now += 299
    assert b.blocked("alice")
    clock.now += 2
    assert not b.blocked("alice") and b.failures("alice") == 0
    b.try_reserve("bob")
    assert rows(path, "accounts") == 0 and rows(path, "attempts") == 1  # expired rows deleted


def test_full_file_refuses_new_accounts_instead_of_forgetting_counts(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "lockout.db"
    a, b = two_guards(path, cooldown=300, clock=clock, max_accounts=4)
    for _ in range(3):
        a.rejected("alice")
    clock.now += 100
    for i in range(2):
        b.rejected(f"bogus{i}")
    pending = a.try_reserve("bogus2")  # in flight, not counted yet: it has a row to come
    assert pending is not None and not b.has_room("bogus9") and b.try_reserve("bogus9") is None
    a.rejected("bogus2")
    a.release(pending)  # four rows: full
    b.rejected("fixed")  # a logon that held no slot: not counted, nothing forgotten
    assert b.failures("fixed") == 0 and a.blocked("alice") and a.failures("alice") == 3
    assert b.try_reserve("bob") is None
    clock.now += 201  # alice's block and count expire, then there is room again
    assert b.try_reserve("bob") is not None and not b.blocked("alice")
    many = SharedLockoutGuard(str(tmp_path / "many.db"), 3, cooldown=300, max_accounts=500)
    for i in range(2_000):
        many.rejected(f"CORP\\bogus-{i}-" + "x" * 200)
    assert rows(tmp_path / "many.db", "accounts") == 500
    assert many.failures("CORP\\bogus-0-" + "x" * 200) == 1  # kept, not evicted


# ---------------------------------------------------------------- the option


def test_bad_lockout_file_values_get_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a database, just some text. " * 8)
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE bookmarks (url TEXT)")
    cases = {
        str(tmp_path): "is a directory",
        str(tmp_path / "missing" / "lockout.db"): "its directory .*missing does not exist",
        str(tmp_path / "notes.txt"): "not an SQLite file",
        str(tmp_path / "other.db"): "an SQLite file of another program",
        "/dev/null": "not a regular file",
    }
    for value, cause in cases.items():
        opts = SimpleNamespace(ntlm_lockout_file=value, ntlm_max_failures=3)
        expected = f"ntlm_lockout_file {re.escape(value)}: {cause}"
        with pytest.raises(exceptions.OptionsError, match=expected):
            new_guard(opts)
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")  # untouched
    assert "ntlm_lockout_file" in options.READ_BY_POLICY & options.READ_BY_ORIGIN


def test_bad_lockout_file_stops_start_up(mitm, parent, tmp_path: Path) -> None:
    m = mitm(parent.url, {**MULTI, "ntlm_lockout_file": str(tmp_path)}, expect_failure=True)
    assert_clean_refusal(m, f"ntlm_lockout_file {tmp_path}: is a directory")


@contextlib.contextmanager
def addon_process() -> Iterator[tuple[Any, AddonGroup, NtlmUpstreamAuth]]:
    """The addons of one mitmproxy process, configured through mitmproxy's test context."""
    runtime = Runtime()
    auth = NtlmUpstreamAuth(runtime)
    group = AddonGroup(ClientAccess(), ParentRouter(runtime), auth, OriginAuth(runtime))
    with taddons.context(ProxyAuth(), Proxyserver(), group) as tctx:
        yield tctx, group, auth
        group.done()


def test_restart_keeps_shared_counts_an_options_change_resets_them(tmp_path: Path) -> None:
    """A worker (re)starting must not wipe what the others counted; an option changed while
    running lifts the guard, as it does for the guard in memory."""
    lockout = str(tmp_path / "lockout.db")
    settings = {"listen_host": "127.0.0.1", "mode": ["upstream:http://127.0.0.1:3128"],
                "ntlm_username": "alice", "ntlm_domain": "CORP", "ntlm_password": "x",
                "ntlm_max_failures": 2, "ntlm_lockout_file": lockout}

    async def two_processes() -> None:  # one loop: mitmproxy's log handlers outlive a context
        with addon_process() as (tctx, group, first):
            tctx.configure(group, **settings)
            policy = first.policy
            assert policy is not None and policy.creds is not None
            for _ in range(2):
                policy.rejected_by_parent(policy.creds, "parent:8080")
        with addon_process() as (tctx, group, second):
            tctx.configure(group, **settings)
            tctx.configure(group, ntlm_workstation="WS2")  # still starting up
            reason = second._blocked_reason() or ""
            assert "stopped sending the credentials" in reason and lockout in reason
            second.running()
            tctx.configure(group, ntlm_handshake_timeout=10)
            assert second._blocked_reason() is None

    asyncio.run(two_processes())


# ---------------------------------------------------------------- two real mitmdumps


def test_two_mitmdumps_on_one_file_cost_at_most_the_limit(mitm, make_parent, origin,
                                                           tmp_path: Path) -> None:
    parent = make_parent(users=USERS)
    settings = {**MULTI, "ntlm_max_failures": 3,
                "ntlm_lockout_file": str(tmp_path / "lockout.db")}
    proxies = [mitm(parent.url, settings), mitm(parent.url, settings)]
    spellings = ["CORP\\alice", "corp\\ALICE", "alice@corp", "Alice"]
    statuses: list[int] = []
    start = threading.Barrier(32)

    def client(i: int) -> None:
        user, proxy = spellings[i % len(spellings)], proxies[i % 2].url
        with httpx.Client(proxy=proxy.replace("http://", f"http://{quote(user)}:wrong-{i}@"),
                          timeout=60) as c:
            start.wait(10)
            statuses.append(c.get(f"{origin.url}/hello").status_code)

    run_concurrently([functools.partial(client, i) for i in range(32)])
    assert statuses == [407] * 32
    rejected = parent.snapshot().rejected_count
    assert 1 <= rejected <= 3, rejected  # 3 per process without the shared file
    for m in proxies:  # blocked in both, the right password too
        r = httpx.get(f"{origin.url}/hello", proxy=as_alice(m.url), timeout=30)
        assert r.status_code == 407 and "Too many rejected logons" in r.text, r.text
    assert parent.snapshot().accepted_count == 0
    first, second = proxies
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGHUP)  # resets the file: the block lifts in both
    assert first.wait_for("lockout guard reset")
    for m in (second, first):
        r = httpx.get(f"{origin.url}/hello", proxy=as_alice(m.url), timeout=30)
        assert (r.status_code, r.text) == (200, "hello")
    assert parent.snapshot().rejected_count == rejected
