"""The engine's legs, sans I/O: request bytes in, actions out, pyspnego's acceptor as the parent.

Only the engine's public steps are used (from_child, from_parent, start_connect, reconnected,
parent_closed, timed_out, and `reuse.track` as the layer sets it), with a real UpstreamPolicy
and real NTLM messages, so these tests hold whatever the engine's inside looks like.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mitmproxy_ntlm.engine import (
    Action,
    AuthEngine,
    CloseParent,
    Established,
    Failed,
    Reconnect,
    StartTimer,
    ToChild,
    ToParent,
)
from mitmproxy_ntlm.policy import UpstreamPolicy
from tests.constants import TEST_PRINCIPAL
from tests.peers import (
    BODY,
    CONNECT,
    GET,
    OK,
    POST,
    TYPE1,
    TYPE3,
    WRONG_SECRET,
    NtlmAcceptor,
    auth_required,
    auth_token,
    policy_for,
    request_head,
    response_head,
    use_user_file,
)

REJECTED = auth_required("NTLM")  # the parent's answer to a Type 3 it does not accept


@pytest.fixture(autouse=True)
def _parent_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_user_file(tmp_path, monkeypatch)


def new_engine(policy: UpstreamPolicy, client_id: str = "client-1",
               can_reconnect: bool = True) -> AuthEngine:
    return AuthEngine(policy, "parent:3128", "127.0.0.1:50000", target_host="parent",
                      can_reconnect=can_reconnect, client_id=client_id)


def sent(actions: list[Action]) -> bytes:
    """What went to the parent."""
    return b"".join(a.data for a in actions if isinstance(a, ToParent))


def shown(actions: list[Action]) -> bytes:
    """What went to the client."""
    return b"".join(a.data for a in actions if isinstance(a, ToChild))


def without_auth(request: bytes) -> list[tuple[bytes, bytes]]:
    """The request's header lines, its Proxy-Authorization left out."""
    fields = request_head(request).headers.fields
    return [f for f in fields if f[0].lower() != b"proxy-authorization"]


def authenticate(engine: AuthEngine, request: bytes = GET) -> NtlmAcceptor:
    """Run the legs for a GET and pass OK on; the acceptor of this connection."""
    parent = NtlmAcceptor()
    leg1 = sent(engine.from_child(request))
    leg3 = sent(engine.from_parent(parent.challenge(leg1)))
    assert parent.accepts(leg3)
    assert shown(engine.from_parent(OK)) == OK
    return parent


def test_get_carries_type1_then_type3_and_only_the_final_response_reaches_the_client() -> None:
    policy = policy_for()
    engine = new_engine(policy)
    parent = NtlmAcceptor()

    first = engine.from_child(GET)
    assert [type(a) for a in first] == [ToParent, StartTimer]
    leg1 = sent(first)
    assert request_head(leg1).method == "GET"  # the request itself carries the Type 1
    assert auth_token(leg1).startswith(TYPE1)
    assert without_auth(leg1) == without_auth(GET)

    second = engine.from_parent(parent.challenge(leg1))
    assert shown(second) == b""  # the 407 stays hidden
    leg3 = sent(second)
    assert auth_token(leg3).startswith(TYPE3)
    assert without_auth(leg3) == without_auth(GET)
    assert parent.accepts(leg3) and parent.principal == TEST_PRINCIPAL

    passed: list[Action] = []
    for i in range(0, len(OK), 7):  # as the parent's bytes happen to arrive
        passed += engine.from_parent(OK[i:i + 7])
    assert shown(passed) == OK and sent(passed) == b""
    assert not any(isinstance(a, CloseParent) for a in passed)
    assert sent(engine.from_child(GET)) == GET  # the connection stays authenticated
    assert policy.guard.failures(TEST_PRINCIPAL) == 0


@pytest.mark.parametrize("body_later", [False, True], ids=["body-with-head", "body-later"])
def test_a_post_goes_after_a_head_probe_and_its_body_is_sent_once(body_later: bool) -> None:
    engine = new_engine(policy_for())
    parent = NtlmAcceptor()

    if body_later:  # the body arrives while the probe's answer is awaited: held back
        first = engine.from_child(POST) + engine.from_child(BODY)
    else:
        first = engine.from_child(POST + BODY)
    leg1 = sent(first)
    probe = request_head(leg1)
    assert probe.method == "HEAD" and probe.url == "http://origin.test/form"
    assert auth_token(leg1).startswith(TYPE1)
    assert BODY not in leg1  # nothing with side effects before the parent asked for NTLM

    leg3 = sent(engine.from_parent(parent.challenge(leg1, head_only=True)))
    assert request_head(leg3).method == "POST"
    assert leg3.count(BODY) == 1 and leg3.endswith(b"\r\n\r\n" + BODY)
    assert parent.accepts(leg3)
    assert shown(engine.from_parent(OK)) == OK


def test_a_parent_needing_no_auth_serves_the_request_once() -> None:
    engine = new_engine(policy_for())
    leg1 = sent(engine.from_child(GET))
    assert auth_token(leg1).startswith(TYPE1)
    assert shown(engine.from_parent(OK)) == OK
    assert sent(engine.from_child(GET)) == GET  # no Type 1 on this connection again


def test_a_post_to_a_parent_needing_no_auth_follows_its_probe_with_the_body_once() -> None:
    engine = new_engine(policy_for())
    probe = sent(engine.from_child(POST + BODY))
    assert request_head(probe).method == "HEAD"
    answer = engine.from_parent(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n")  # a HEAD's
    assert shown(answer) == b""  # the probe's answer is not the client's
    assert sent(answer) == POST + BODY
    assert shown(engine.from_parent(OK)) == OK


def test_after_a_parent_let_a_connection_through_the_next_asks_without_credentials() -> None:
    # Credentials such a parent never verifies would otherwise hold every new connection to
    # ntlm_max_failures at a time (the lockout guard's slots for untried credentials).
    from mitmproxy_ntlm.policy import LockoutGuard

    policy = policy_for()
    policy.guard = LockoutGuard(1)
    first = new_engine(policy, "client-1")
    assert auth_token(sent(first.from_child(GET))).startswith(TYPE1)  # nothing learnt yet
    assert shown(first.from_parent(OK)) == OK
    busy = new_engine(policy, "client-2")  # holds the only slot: untried credentials
    assert policy.attempt(busy.policy.creds) is not None  # type: ignore[arg-type]

    second = new_engine(policy, "client-3")
    actions = second.from_child(GET)
    assert [type(a) for a in actions] == [ToParent, StartTimer]  # not waiting for the slot
    assert sent(actions) == GET  # as the client sent it: no Proxy-Authorization
    assert shown(second.from_parent(OK)) == OK
    assert second.trace is not None and second.trace.result == "no auth needed"


def test_a_407_to_a_request_without_credentials_starts_the_legs() -> None:
    policy = policy_for()
    first = new_engine(policy)
    sent(first.from_child(POST + BODY))
    sent(first.from_parent(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n"))  # probe
    first.from_parent(OK)

    engine = new_engine(policy, "client-2")
    probe = sent(engine.from_child(POST + BODY))
    assert request_head(probe).method == "HEAD" and b"Proxy-Authorization" not in probe
    asked = engine.from_parent(auth_required("NTLM", head_only=True))
    assert shown(asked) == b""
    leg1 = sent(asked)
    assert request_head(leg1).method == "HEAD" and auth_token(leg1).startswith(TYPE1)
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(leg1, head_only=True)))
    assert parent.accepts(leg3) and leg3.count(BODY) == 1
    assert shown(engine.from_parent(OK)) == OK
    assert engine.trace is not None and engine.trace.result == "authenticated"
    assert engine.trace.stages[0]["stage"] == "sent without credentials"
    # The parent asks again: the next new connection sends its Type 1 with the request.
    assert auth_token(sent(new_engine(policy, "client-3").from_child(GET))).startswith(TYPE1)


def test_a_parent_that_asks_for_some_hosts_only_is_asked_with_credentials_for_those() -> None:
    # Squid lets some domains through without a logon and asks for the others: once it asked
    # for a host, new connections for that host carry their Type 1 at once, while the other
    # hosts still go without credentials (before, every change of answer cost a round trip).
    policy = policy_for()
    free, asked = GET, GET.replace(b"origin.test", b"intranet.test")
    first = new_engine(policy, "c1")
    assert auth_token(sent(first.from_child(free))).startswith(TYPE1)
    assert shown(first.from_parent(OK)) == OK  # no logon needed: it lets connections through

    challenged = new_engine(policy, "c2")
    assert b"Proxy-Authorization" not in sent(challenged.from_child(asked))
    leg1 = sent(challenged.from_parent(auth_required("NTLM")))
    parent = NtlmAcceptor()
    assert parent.accepts(sent(challenged.from_parent(parent.challenge(leg1))))
    assert shown(challenged.from_parent(OK)) == OK

    again = new_engine(policy, "c3")
    assert auth_token(sent(again.from_child(asked.replace(b"/page", b"/other")))).startswith(
        TYPE1)
    still_free = new_engine(policy, "c4")
    assert sent(still_free.from_child(free)) == free  # the host it let through: no token
    assert shown(still_free.from_parent(OK)) == OK
    kept = new_engine(policy, "c6")  # a connection let through, then asked for another host
    sent(kept.from_child(free))
    assert shown(kept.from_parent(OK)) == OK
    other = asked.replace(b"intranet.test", b"wiki.test")
    assert sent(kept.from_child(other)) == other
    leg1 = sent(kept.from_parent(auth_required("NTLM")))
    assert auth_token(leg1).startswith(TYPE1)  # the legs, on this connection
    assert auth_token(sent(new_engine(policy, "c7").from_child(other))).startswith(TYPE1)
    connect = new_engine(policy, "c5")  # a CONNECT names the host without a scheme
    assert auth_token(sent(connect.start_connect(
        b"CONNECT INTRANET.test:443 HTTP/1.1\r\nHost: intranet.test:443\r\n\r\n"))
    ).startswith(TYPE1)


def test_a_parent_that_starts_asking_every_host_gets_type1s_again_after_a_few_misses() -> None:
    from mitmproxy_ntlm.logon_needs import MISSES_TO_STOP

    policy = policy_for()
    first = new_engine(policy, "c0")
    sent(first.from_child(GET))
    assert shown(first.from_parent(OK)) == OK  # let through (the laptop's office network)
    for n in range(MISSES_TO_STOP):  # now every host needs a logon (on the VPN)
        request = GET.replace(b"origin.test", b"host%d.test" % n)
        engine = new_engine(policy, f"c{n + 1}")
        assert sent(engine.from_child(request)) == request  # a guess: no token
        leg1 = sent(engine.from_parent(auth_required("NTLM")))
        parent = NtlmAcceptor()
        assert parent.accepts(sent(engine.from_parent(parent.challenge(leg1))))
        assert shown(engine.from_parent(OK)) == OK
    fresh = GET.replace(b"origin.test", b"never-seen.test")
    assert auth_token(sent(new_engine(policy, "c9").from_child(fresh))).startswith(TYPE1)


def test_a_rechallenge_on_an_authenticated_connection_replays_the_request() -> None:
    engine = new_engine(policy_for())
    authenticate(engine)
    assert sent(engine.from_child(GET)) == GET

    again = engine.from_parent(auth_required("NTLM", body=b"log on again\n"))
    assert shown(again) == b""
    leg1 = sent(again)
    assert auth_token(leg1).startswith(TYPE1) and without_auth(leg1) == without_auth(GET)
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(leg1)))
    assert parent.accepts(leg3)
    second_ok = OK.replace(b"from origin", b"once more!!")
    assert shown(engine.from_parent(second_ok)) == second_ok


def test_a_407_that_closes_the_connection_asks_for_a_new_one_and_the_legs_start_over() -> None:
    engine = new_engine(policy_for())
    leg1 = sent(engine.from_child(GET))
    closing = NtlmAcceptor().challenge(leg1, close=True)
    assert engine.from_parent(closing) == [Reconnect()]

    restarted = engine.reconnected(None)
    assert [type(a) for a in restarted] == [ToParent, StartTimer]
    parent = NtlmAcceptor()  # the handshake runs on the new connection
    leg3 = sent(engine.from_parent(parent.challenge(sent(restarted))))
    assert parent.accepts(leg3)
    assert shown(engine.from_parent(OK)) == OK


def test_a_parent_closing_after_every_407_gets_one_reconnect_not_a_loop() -> None:
    engine = new_engine(policy_for())
    leg1 = sent(engine.from_child(GET))
    assert engine.from_parent(NtlmAcceptor().challenge(leg1, close=True)) == [Reconnect()]
    leg1 = sent(engine.reconnected(None))
    out = engine.from_parent(NtlmAcceptor().challenge(leg1, close=True))
    assert not any(isinstance(a, Reconnect | ToParent) for a in out)
    assert response_head(shown(out)).status_code == 502
    assert b"persistent connection" in shown(out) and out[-1] == CloseParent()


def test_a_rechallenge_that_closes_the_connection_asks_for_a_new_one() -> None:
    engine = new_engine(policy_for())
    authenticate(engine)
    sent(engine.from_child(GET))
    assert engine.from_parent(auth_required("NTLM", close=True)) == [Reconnect()]
    leg1 = sent(engine.reconnected(None))
    assert auth_token(leg1).startswith(TYPE1) and without_auth(leg1) == without_auth(GET)


def test_rejections_are_counted_and_the_third_stops_the_credentials() -> None:
    policy = policy_for(WRONG_SECRET)
    pages = []
    for count in (1, 2, 3):
        engine = new_engine(policy, client_id=f"client-{count}")
        parent = NtlmAcceptor()
        leg1 = sent(engine.from_child(GET))
        leg3 = sent(engine.from_parent(parent.challenge(leg1)))
        assert not parent.accepts(leg3)
        out = engine.from_parent(REJECTED)
        page = shown(out)
        pages.append(page)
        assert response_head(page).status_code == 502
        assert f"Consecutive rejections: {count} of 3".encode() in page
        assert out[-1] == CloseParent() and sent(out) == b""
        assert policy.guard.failures(TEST_PRINCIPAL) == count
    assert policy.guard.blocked(TEST_PRINCIPAL)

    blocked = new_engine(policy, client_id="client-4").from_child(GET)
    assert sent(blocked) == b""  # no fourth logon reaches the domain controller
    pages.append(shown(blocked))
    assert b"stopped sending the credentials" in pages[-1]
    assert policy.guard.failures(TEST_PRINCIPAL) == 3
    assert not any(WRONG_SECRET.encode() in page for page in pages)


def test_a_client_retrying_after_a_rejection_sends_no_second_logon() -> None:
    policy = policy_for(WRONG_SECRET)
    engine = new_engine(policy)
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(sent(engine.from_child(GET)))))
    assert not parent.accepts(leg3)
    engine.from_parent(REJECTED)

    retry = new_engine(policy).from_child(GET)  # same client, new parent connection
    assert sent(retry) == b"" and b"rejected" in shown(retry)
    assert policy.guard.failures(TEST_PRINCIPAL) == 1


def test_connect_legs_end_in_established_with_the_first_tunnel_bytes() -> None:
    engine = new_engine(policy_for())
    parent = NtlmAcceptor()
    first = engine.start_connect(CONNECT)
    leg1 = sent(first)
    assert request_head(leg1).method == "CONNECT" and auth_token(leg1).startswith(TYPE1)
    leg3 = sent(engine.from_parent(parent.challenge(leg1)))
    assert request_head(leg3).method == "CONNECT" and parent.accepts(leg3)

    server_hello = b"\x16\x03\x03\x00\x2afirst tunnel bytes"
    out = engine.from_parent(b"HTTP/1.1 200 Connection established\r\n\r\n" + server_hello)
    assert out == [Established(server_hello)]


def test_a_connect_without_credentials_is_answered_timed_out_or_challenged() -> None:
    policy = policy_for()
    first = new_engine(policy)
    assert auth_token(sent(first.start_connect(CONNECT))).startswith(TYPE1)
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert first.from_parent(established) == [Established(b"")]  # let through: learnt

    opened = new_engine(policy, "client-2")
    actions = opened.start_connect(CONNECT)
    assert sent(actions) == CONNECT and isinstance(actions[-1], StartTimer)
    assert opened.from_parent(established + b"tls") == [Established(b"tls")]

    silent = new_engine(policy, "client-3")
    timer = silent.start_connect(CONNECT)[-1]
    assert isinstance(timer, StartTimer)
    failed = silent.timed_out(timer.generation)[0]
    assert isinstance(failed, Failed) and failed.status == 504
    assert "did not answer the CONNECT within 30 s" in failed.reason
    quiet = new_engine(policy, "client-5")
    timer = quiet.from_child(GET)[-1]
    assert isinstance(timer, StartTimer)
    assert b"did not answer the request within 30 s" in shown(quiet.timed_out(timer.generation))
    dropped = new_engine(policy, "client-6")
    dropped.start_connect(CONNECT)
    closed = dropped.parent_closed()[0]
    assert isinstance(closed, Failed) and "handshake" not in closed.reason
    assert "closed the connection before answering the CONNECT (sent without" in closed.reason

    asked = new_engine(policy, "client-4")
    sent(asked.start_connect(CONNECT))
    leg1 = sent(asked.from_parent(auth_required("NTLM")))
    assert request_head(leg1).method == "CONNECT" and auth_token(leg1).startswith(TYPE1)
    parent = NtlmAcceptor()
    assert parent.accepts(sent(asked.from_parent(parent.challenge(leg1))))
    assert asked.from_parent(established) == [Established(b"")]


def test_a_connect_with_rejected_credentials_fails_as_an_auth_failure() -> None:
    engine = new_engine(policy_for(WRONG_SECRET))
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(sent(engine.start_connect(CONNECT)))))
    assert not parent.accepts(leg3)
    out = engine.from_parent(REJECTED)
    assert len(out) == 2 and out[1] == CloseParent()
    failed = out[0]
    assert isinstance(failed, Failed) and failed.auth_failure
    assert "rejected the NTLM credentials" in failed.reason


def test_a_connect_refused_after_authentication_fails_with_the_parents_status() -> None:
    engine = new_engine(policy_for())
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(sent(engine.start_connect(CONNECT)))))
    assert parent.accepts(leg3)
    out = engine.from_parent(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    failed = out[0]
    assert isinstance(failed, Failed) and not failed.auth_failure
    assert "refused the CONNECT after authentication: 403 Forbidden" in failed.reason


MARKER = "P4RENT-BYTES-7Q"


@pytest.mark.parametrize("challenge", [
    f"NTLM {MARKER}!!",  # not base64
    "NTLM " + base64.b64encode(b"\x00GARBAGE " + MARKER.encode() + b"\x01" * 40).decode(),
    "NTLM " + base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00" + MARKER.encode()).decode(),
], ids=["not-base64", "not-ntlmssp", "truncated-type2"])
def test_a_malformed_challenge_fails_clearly_without_quoting_the_parent(challenge: str) -> None:
    engine = new_engine(policy_for())
    engine.from_child(GET)
    out = engine.from_parent(auth_required(challenge))
    page = shown(out)
    assert response_head(page).status_code == 502
    assert b"challenge" in page and b"parent proxy parent:3128" in page
    assert MARKER.encode() not in page and challenge[5:].encode() not in page
    assert sent(out) == b"" and out[-1] == CloseParent()
    assert engine.from_parent(OK) == []  # nothing more from this connection reaches anyone


def test_bytes_with_no_request_outstanding_close_the_connection_unseen() -> None:
    engine = new_engine(policy_for())
    assert engine.from_parent(OK) == [CloseParent()]
    assert engine.from_parent(b"more") == []


@pytest.mark.parametrize("split", [None, len(OK) - 3, len(OK)],
                         ids=["with-the-response", "in-its-last-chunk", "in-a-later-chunk"])
def test_bytes_after_a_complete_response_close_the_connection_unseen(split: int | None) -> None:
    engine = new_engine(policy_for())
    engine.reuse.track = True  # as the layer sets it when the connection may be pooled
    parent = NtlmAcceptor()
    leg3 = sent(engine.from_parent(parent.challenge(sent(engine.from_child(GET)))))
    assert parent.accepts(leg3)
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother"
    arriving = OK + stray
    out = engine.from_parent(arriving[:split])
    out += engine.from_parent(arriving[split:]) if split else []
    assert shown(out) == OK  # this client's response, and not a byte more
    assert out[-1] == CloseParent()
    assert engine.from_parent(b"even more") == []


def test_no_answer_to_the_handshake_in_time_is_a_504() -> None:
    engine = new_engine(policy_for())
    timers = [a for a in engine.from_child(GET) if isinstance(a, StartTimer)]
    assert len(timers) == 1
    assert engine.timed_out(timers[0].generation - 1) == []  # an earlier handshake's timer
    out = engine.timed_out(timers[0].generation)
    page = shown(out)
    assert response_head(page).status_code == 504
    assert b"did not answer the NTLM handshake within 30 s" in page
    assert out[-1] == CloseParent()


def test_the_timer_still_covers_the_type3_leg_and_ends_with_the_response() -> None:
    engine = new_engine(policy_for())
    parent = NtlmAcceptor()
    first = engine.from_child(GET)
    generation = next(a.generation for a in first if isinstance(a, StartTimer))
    leg3 = sent(engine.from_parent(parent.challenge(sent(first))))
    assert parent.accepts(leg3)
    assert response_head(shown(engine.timed_out(generation))).status_code == 504

    engine = new_engine(policy_for())
    first = engine.from_child(GET)
    generation = next(a.generation for a in first if isinstance(a, StartTimer))
    parent = NtlmAcceptor()
    assert parent.accepts(sent(engine.from_parent(parent.challenge(sent(first)))))
    engine.from_parent(OK)
    assert engine.timed_out(generation) == []  # a served connection is not cut


def test_a_parent_closing_during_the_handshake_is_a_clear_502() -> None:
    engine = new_engine(policy_for())
    engine.from_child(GET)
    out = engine.parent_closed()
    page = shown(out)
    assert response_head(page).status_code == 502
    assert b"closed the connection during the NTLM handshake (after the Type 1)" in page
