"""Hostile client input in multi-user mode: lockout guard per account with bounded attempts in
flight, bounded memory for endless bogus users, names that cannot be a logon."""

from __future__ import annotations

import base64
import functools
import http.client
import threading

import pytest

from mitmproxy_ntlm.bounded import BoundedMap
from mitmproxy_ntlm.credentials import CredentialError, Credentials, account_of
from mitmproxy_ntlm.multiuser import client_credentials, decode_basic
from mitmproxy_ntlm.policy import AttemptsBusy, AuthUnavailable, LockoutGuard, UpstreamPolicy
from tests.mitm import run_concurrently

USERS = {"CORP\\alice": "Alice-Pass-1", "CORP\\bob": "Bob-Pass-2"}
MULTI = {"ntlm_multiuser": True, "ntlm_domain": "CORP"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(proxy_url: str, url: str, auth: str, conn: http.client.HTTPConnection | None = None
        ) -> tuple[int, str]:
    """One request through the proxy on `conn` (or a new connection)."""
    host, port = proxy_url.removeprefix("http://").split(":")
    c = conn or http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request("GET", url, headers={"Proxy-Authorization": auth})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace") + str(r.headers)
    finally:
        if conn is None:
            c.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- bounded maps (unit)


def test_bounded_map_caps_entries_bytes_and_idle_time() -> None:
    clock = FakeClock()
    m: BoundedMap[str, str] = BoundedMap(max_entries=3, max_bytes=10_000, ttl=60, clock=clock)
    for key in "abcd":
        m[key] = key
    assert m.keys() == ["b", "c", "d"]  # the oldest went first
    m["b"] = "again"  # storing refreshes
    m["e"] = "e"
    assert m.keys() == ["d", "b", "e"]
    clock.now += 61
    m["f"] = "f"  # idle entries expire
    assert m.keys() == ["f"] and "d" not in m and m.get("b") is None

    big: BoundedMap[str, str] = BoundedMap(max_entries=1000, max_bytes=50_000)
    for i in range(100):
        big[f"user{i}"] = "x" * 2_000
    assert big.bytes <= 50_000 and 10 < len(big) < 30
    assert "user99" in big and "user0" not in big
    big["huge"] = "x" * 100_000  # larger than the whole budget: not kept
    assert "huge" not in big and big.bytes <= 50_000
    assert big.pop("user99") == "x" * 2_000 and "user99" not in big
    big.clear()
    assert len(big) == 0 and big.bytes == 0


def test_bounded_map_measures_an_object_once_when_stored_again() -> None:
    m: BoundedMap[str, list[str]] = BoundedMap(max_entries=10, max_bytes=100_000)
    value: list[str] = []
    m["k"] = value
    first = m.bytes
    value.append("y" * 1000)
    m["k"] = value  # the same object: refreshed, not measured again
    assert m.bytes == first
    m["k"] = list(value)  # a new object: measured
    assert m.bytes > first + 900


# ---------------------------------------------------------------- the guard (unit)


def test_account_ignores_case_and_domain_spelling() -> None:
    spellings = ["CORP\\alice", "corp\\ALICE", "alice@corp", "Alice@CORP.EXAMPLE", "alice",
                 "OTHER\\alicE"]
    assert {account_of(s) for s in spellings} == {"alice"}
    assert account_of("CORP\\bob") != account_of("CORP\\alice")


def test_account_ignores_width_and_accents() -> None:
    """AD compares sAMAccountName ignoring width (and likely accents): one count for all."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "alice")
    spellings = [f"CORP\\{fullwidth}", "alíce@corp", "CORP\\ÀLICE", "CORP\\ali\u0301ce"]
    assert {account_of(s) for s in spellings} == {"alice"}
    assert account_of("CORP\\bob") != account_of("CORP\\alice")


def test_guard_counts_per_account_and_bounds_attempts_in_flight() -> None:
    clock = FakeClock()
    guard = LockoutGuard(3, cooldown=300, clock=clock)
    guard.attempt_timeout = 60
    attempts = [guard.try_reserve(p) for p in ("CORP\\alice", "corp\\ALICE", "alice@corp")]
    assert all(attempts) and guard.in_flight("CORP\\Alice") == 3
    assert guard.try_reserve("CORP\\alice") is None  # 0 failures + 3 in flight
    assert guard.try_reserve("CORP\\bob") is not None  # another account
    guard.rejected("corp\\ALICE")
    guard.release(attempts[0])  # ended with the rejection: still 1 + 2 = 3
    assert guard.try_reserve("alice@CORP") is None
    guard.release(attempts[1])  # ended without an answer (timeout): 1 + 1
    again = guard.try_reserve("alice@CORP")
    assert again is not None
    guard.rejected("CORP\\alice")
    guard.rejected("alice@corp.example")
    assert guard.blocked("CORP\\alice") and guard.blocked("corp\\ALICE")
    assert guard.blocked("alice@corp") and not guard.blocked("CORP\\bob")
    clock.now += 301
    assert not guard.blocked("CORP\\alice") and guard.failures("CORP\\alice") == 0
    # An attempt whose connection vanished without an outcome frees its slot on its own.
    guard2 = LockoutGuard(1, clock=clock)
    guard2.attempt_timeout = 60
    assert guard2.try_reserve("u") is not None and guard2.try_reserve("U") is None
    clock.now += 61
    assert guard2.try_reserve("u") is not None


def test_guard_memory_is_bounded_for_endless_bogus_users() -> None:
    guard = LockoutGuard(3, cooldown=300, max_accounts=500)
    for i in range(5_000):
        guard.rejected(f"CORP\\bogus-{i}-" + "x" * 200)
    assert len(guard._failures) <= 500 and guard._failures.bytes <= 4 << 20
    assert guard.failures("CORP\\bogus-0-" + "x" * 200) == 1  # counts are kept, not evicted


def test_full_guard_refuses_new_accounts_instead_of_forgetting_counts() -> None:
    """Bogus accounts flooding the guard must not erase alice's failures or block: when the
    guard is full, accounts it does not count yet get no logon until counts expire."""
    clock = FakeClock()
    policy = UpstreamPolicy(creds=None, multiuser=True,
                            guard=LockoutGuard(3, cooldown=300, max_accounts=4, clock=clock))
    guard = policy.guard
    alice = client_credentials("CORP\\alice", "wrong", "CORP", "WS")
    for _ in range(3):
        policy.attempt_ended(policy.attempt(alice))
        guard.rejected("CORP\\alice")
    assert guard.blocked("CORP\\alice")
    clock.now += 100
    in_flight = []
    for i in range(3):  # fill the guard: two counted, one still in flight
        bogus = client_credentials(f"CORP\\bogus{i}", "x", "CORP", "WS")
        in_flight.append(policy.attempt(bogus))
        if i < 2:
            policy.rejected_by_parent(bogus, "parent:3128")
            policy.attempt_ended(in_flight.pop())
    with pytest.raises(AttemptsBusy, match="until some of those counts expire"):
        policy.attempt(client_credentials("CORP\\bogus9", "x", "CORP", "WS"))
    assert guard.blocked("CORP\\alice") and guard.failures("alice") == 3
    policy.rejected_by_parent(client_credentials("CORP\\bogus2", "x", "CORP", "WS"), "p")
    policy.attempt_ended(in_flight.pop())
    guard.rejected("CORP\\fixed")  # a logon that held no slot: not counted, nothing evicted
    assert guard.blocked("CORP\\alice") and guard.failures("alice") == 3
    assert guard.failures("bogus2") == 1 and guard.failures("fixed") == 0
    bob = client_credentials("CORP\\bob", "pw", "CORP", "WS")
    with pytest.raises(AttemptsBusy):
        policy.attempt(bob)
    clock.now += 201  # alice's block and count expire with age, then there is room again
    assert not guard.blocked("CORP\\alice")
    assert policy.attempt(bob) is not None


def test_policy_needs_no_slot_for_credentials_the_parent_accepted() -> None:
    policy = UpstreamPolicy(creds=None, multiuser=True, guard=LockoutGuard(2, cooldown=300))
    right = client_credentials("CORP\\alice", "right", "CORP", "WS")
    wrong = [client_credentials(u, f"wrong{i}", "CORP", "WS")
             for i, u in enumerate(("corp\\ALICE", "alice@corp", "Alice"))]
    first, second = policy.attempt(wrong[0]), policy.attempt(wrong[1])
    with pytest.raises(AttemptsBusy, match="at most 2 logons at a time"):
        policy.attempt(wrong[2])
    policy.attempt_ended(first)
    slot = policy.attempt(right)
    policy.accepted(right)  # resets the count and remembers the pair
    policy.attempt_ended(slot)
    policy.attempt_ended(second)
    assert policy.attempt(right) is None  # known good: no slot
    policy.rejected_by_parent(wrong[2], "parent:3128", "c1")
    policy.identities["c2"] = client_credentials("alice@CORP", "wrong2", "CORP", "WS")
    with pytest.raises(AuthUnavailable):  # the same secret for the same account: refused
        policy.credentials("c2")


def test_pool_forgets_the_closed_connections_of_endless_users() -> None:
    """The pool counts open parent connections per user; users that never come back must not
    leave their (closed) connections counted forever."""
    from mitmproxy_ntlm.pool import ParentPool, PoolKey

    class Writer:
        closing = False

        def is_closing(self) -> bool:
            return self.closing

    pool = ParentPool(60, 10, per_key=16, wait_timeout=5.0, grace=0.0)
    writers = []
    for i in range(3_000):
        creds = Credentials(f"bogus{i}", "CORP", "WS", nt_hash=b"\0" * 16)
        writer = Writer()
        pool.track(PoolKey("http", ("127.0.0.1", 3128), creds), writer)  # type: ignore[arg-type]
        writer.closing = True  # the parent rejected the logon and closed
        writers.append(writer)
    assert len(pool._live) <= 1_001


# ---------------------------------------------------------------- names that cannot be a logon


def test_user_names_that_cannot_be_a_logon_are_refused() -> None:
    with pytest.raises(CredentialError, match="user name is empty"):
        client_credentials("CORP\\", "pw", "CORP", "WS")
    with pytest.raises(CredentialError, match="user name is empty"):
        client_credentials("", "pw", "CORP", "WS")
    with pytest.raises(CredentialError, match=r"user name is too long \(300 bytes"):
        client_credentials("CORP\\" + "u" * 300, "pw", "CORP", "WS")
    with pytest.raises(CredentialError, match="domain is too long"):
        client_credentials("alice@" + "d" * 300, "pw", "CORP", "WS")
    with pytest.raises(CredentialError, match="password is empty"):
        client_credentials("CORP\\alice", "", "CORP", "WS")
    with pytest.raises(CredentialError, match="Basic credentials are too long"):
        decode_basic(basic("CORP\\" + "u" * 100_000, "pw"))
    assert client_credentials("CORP\\" + "u" * 256, "pw", "CORP", "WS").user == "u" * 256


def test_empty_or_huge_user_name_gets_a_clear_407_and_nothing_reaches_the_parent(
        mitm, make_parent, origin) -> None:
    parent = make_parent(users=USERS)
    m = mitm(parent.url, MULTI)
    url = f"{origin.url}/hello"
    status, text = get(m.url, url, basic("CORP\\", "pw"))
    assert status == 407 and "user name is empty" in text
    assert 'Proxy-Authenticate: Basic realm="mitmproxy-ntlm"' in text
    status, text = get(m.url, url, basic("CORP\\" + "u" * 100_000, "pw"))
    assert status == 407 and "too long" in text and "challenge" not in text
    status, text = get(m.url, url, basic("CORP\\" + "u" * 1_000, "pw"))
    assert status == 407 and "user name is too long (1000 bytes" in text
    stats = parent.snapshot()
    assert stats.type1_count == 0 and stats.type3_count == 0


# ---------------------------------------------------------------- lockout guard (real parent)


def test_racing_wrong_passwords_and_case_variants_cost_at_most_the_limit(
        mitm, make_parent, origin) -> None:
    parent = make_parent(users=USERS)
    m = mitm(parent.url, {**MULTI, "ntlm_max_failures": 3})
    spellings = ["CORP\\alice", "corp\\ALICE", "alice@corp", "Corp\\Alice", "ALICE@CORP",
                 "alice"]
    statuses: list[int] = []
    start = threading.Barrier(30)

    def client(i: int) -> None:
        start.wait(10)
        status, _ = get(m.url, f"{origin.url}/hello",
                        basic(spellings[i % len(spellings)], f"wrong-{i}"))
        statuses.append(status)

    run_concurrently([functools.partial(client, i) for i in range(30)])
    assert statuses == [407] * 30
    assert parent.snapshot().rejected_count <= 3
    assert parent.snapshot().rejected_count >= 1
    # The block on the account stops every spelling of it, the right password too.
    for user in ("CORP\\alice", "corp\\ALICE", "alice@corp"):
        status, text = get(m.url, f"{origin.url}/hello", basic(user, "Alice-Pass-1"))
        assert status == 407 and "Too many rejected logons" in text, text
    assert parent.snapshot().rejected_count <= 3 and parent.snapshot().accepted_count == 0
    # Another account is not affected, and racing right passwords all get through (they wait
    # for a slot instead of being refused).
    results: list[tuple[int, str]] = []
    run_concurrently([lambda: results.append(get(m.url, f"{origin.url}/hello",
                                                 basic("CORP\\bob", "Bob-Pass-2")))
                      for _ in range(8)])
    assert [status for status, _ in results] == [200] * 8


# ---------------------------------------------------------------- memory (real mitmdump)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_endless_bogus_users_do_not_grow_memory(mitm, make_parent, origin) -> None:
    """Distinct user names with wrong passwords, fast, over keep-alive: huge ones (refused at
    once) and ones at the cap (real failed logons at the parent, which fill every per-user
    map). The issue measured 83 -> 910 MB for 5,400 requests with 20 KB names."""
    parent = make_parent(users=USERS)
    m = mitm(parent.url, MULTI)
    assert m.proc is not None
    url = f"{origin.url}/hello"
    host, port = m.url.removeprefix("http://").split(":")

    def bogus(worker: int, count: int, name_bytes: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(count):
            prefix = f"CORP\\w{worker}-{i}-"
            user = prefix + "x" * (name_bytes - len(prefix) + len("CORP\\"))
            conn.request("GET", url, headers={"Proxy-Authorization": basic(user, f"pw{i}")})
            r = conn.getresponse()
            r.read()
            assert r.status == 407
            if r.will_close:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.close()

    bogus(99, 20, 256)  # warm up: imports and first allocations are not growth
    bogus(98, 20, 20_000)
    before = _rss_mb(m.proc.pid)
    run_concurrently([functools.partial(bogus, w, 300, 20_000) for w in range(4)]
                     + [functools.partial(bogus, 10 + w, 50, 256) for w in range(4)])
    grown = _rss_mb(m.proc.pid) - before
    print(f"mitmdump RSS {before:.0f} MB, grew by {grown:.1f} MB")
    assert grown < 50, f"mitmdump grew by {grown:.0f} MB"
    assert parent.snapshot().type3_count == 20 + 4 * 50  # only names at the cap logged on


# ---------------------------------------------------------------- the engine waits (sans-I/O)


def test_engine_waits_for_a_slot_then_logs_on_or_refuses() -> None:
    """With every slot of the account taken, a request sends nothing and asks to be woken;
    it logs on once a slot frees, is refused once the account is blocked, and gives up (407)
    after the handshake timeout."""
    from mitmproxy_ntlm import engine as eng

    policy = UpstreamPolicy(creds=None, multiuser=True, guard=LockoutGuard(1, cooldown=300),
                            handshake_timeout=5)
    request = b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n\r\n"

    def engine_for(client: str, user: str) -> eng.AuthEngine:
        policy.identities[client] = client_credentials(user, f"pw-{client}", "CORP", "WS")
        return eng.AuthEngine(policy, "parent:3128", client, "example.invalid",
                              client_id=client)

    first, second, third = (engine_for(c, u) for c, u in
                            (("c1", "CORP\\alice"), ("c2", "corp\\ALICE"), ("c3", "alice@corp")))
    assert any(isinstance(a, eng.ToParent) for a in first.from_child(request))
    waiting = second.from_child(request)
    assert [type(a) for a in waiting] == [eng.StartTimer] and waiting[0].delay
    assert second.timed_out(waiting[0].generation)[0].delay  # still taken: wait on
    first._fail("the parent closed the connection")  # ends without a verdict: slot free
    resumed = second.timed_out(second.generation)
    assert any(isinstance(a, eng.ToParent) and b"NTLM " in a.data for a in resumed)
    waiting = third.from_child(request)
    assert [type(a) for a in waiting] == [eng.StartTimer]
    third._wait_until = 0.0  # the handshake timeout has passed
    refused = third.timed_out(third.generation)
    assert any(isinstance(a, eng.ToChild) and b"407" in a.data
               and b"at most 1 logon at a time" in a.data for a in refused)
    assert policy.guard.in_flight("alice") == 1  # the second engine's logon


def test_engine_refuses_to_hold_a_body_beyond_the_replay_limit_while_waiting() -> None:
    """A request waiting for a slot holds its body in memory: past ntlm_replay_limit it gets
    a 413 that says why, instead of buffering whatever the client sends."""
    from mitmproxy_ntlm import engine as eng

    policy = UpstreamPolicy(creds=None, multiuser=True, guard=LockoutGuard(1, cooldown=300),
                            handshake_timeout=5, replay_limit=1000)
    for client in ("c1", "c2"):
        policy.identities[client] = client_credentials("CORP\\alice", f"pw-{client}", "CORP",
                                                       "WS")
    first, second = (eng.AuthEngine(policy, "parent:3128", c, "example.invalid", client_id=c)
                     for c in ("c1", "c2"))
    get = b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n\r\n"
    assert any(isinstance(a, eng.ToParent) for a in first.from_child(get))  # takes the slot
    post = (b"POST http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n"
            b"Content-Length: 100000\r\n\r\n")
    assert [type(a) for a in second.from_child(post + b"x" * 600)] == [eng.StartTimer]
    refused = second.from_child(b"x" * 600)
    assert any(isinstance(a, eng.ToChild) and a.data.startswith(b"HTTP/1.1 413")
               and b"ntlm_replay_limit" in a.data for a in refused)
    assert any(isinstance(a, eng.CloseParent) for a in refused)
    assert second.from_child(b"x" * 50_000) == []  # nothing more is held
    assert second._replay is not None and len(second._replay) <= 1000
