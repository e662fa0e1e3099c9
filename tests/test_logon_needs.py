"""When a new parent connection goes without credentials first (`logon_needs`), sans I/O."""

from __future__ import annotations

from mitmproxy_ntlm import wire
from mitmproxy_ntlm.logon_needs import MISSES_TO_STOP, LogonNeeds

P = "proxy:8080"


def to(host: str) -> wire.Head:
    """A request for `host`, as a parent receives it."""
    return wire.parse_request_head(f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"
                                   .encode())


def test_nothing_goes_without_credentials_until_the_parent_lets_one_through() -> None:
    needs = LogonNeeds()
    assert not needs.may_skip_logon(P, to("a.example"))
    needs.asked(P, to("a.example"), guessed=False)  # the usual 407 to a Type 1: nothing learnt
    assert not needs.asks_for and not needs.may_skip_logon(P, to("b.example"))
    needs.let_through(P, to("a.example"))
    assert needs.may_skip_logon(P, to("b.example"))
    assert not needs.may_skip_logon("other:3128", to("b.example"))


def test_hosts_the_parent_asked_for_carry_their_type1_and_the_others_still_guess() -> None:
    needs = LogonNeeds()
    needs.let_through(P, to("updates.example"))
    needs.asked(P, to("intranet.example"), guessed=True)
    assert not needs.may_skip_logon(P, to("intranet.example"))
    assert needs.may_skip_logon(P, to("updates.example"))
    assert needs.may_skip_logon(P, to("new.example"))
    needs.let_through(P, to("intranet.example"))  # its rules changed: it lets this host through
    assert needs.may_skip_logon(P, to("intranet.example"))


def test_a_parent_that_starts_asking_everyone_stops_the_guessing_after_a_few_misses() -> None:
    # A laptop left the network the parent lets through (VPN): every host needs a logon now.
    # Each wrong guess costs a round trip, so after MISSES_TO_STOP in a row new connections
    # carry their Type 1 again, whatever their host.
    needs = LogonNeeds()
    needs.let_through(P, to("a.example"))
    for n in range(MISSES_TO_STOP):
        assert needs.may_skip_logon(P, to(f"host{n}.example"))
        needs.asked(P, to(f"host{n}.example"), guessed=True)
    assert not needs.may_skip_logon(P, to("never-seen.example"))
    assert needs.status() == []
    needs.let_through(P, to("a.example"))  # back on that network: guessing starts again
    assert needs.may_skip_logon(P, to("never-seen.example"))


def test_a_connection_let_through_in_between_restarts_the_count() -> None:
    needs = LogonNeeds()
    needs.let_through(P, to("open.example"))
    for round_ in range(3):  # domain rules: asked, asked, let through: it keeps guessing
        for n in range(MISSES_TO_STOP - 1):
            needs.asked(P, to(f"new{n}-{round_}.example"), guessed=True)
        needs.let_through(P, to("open.example"))
    assert needs.may_skip_logon(P, to("another.example"))
    assert needs.lets_through.get(P) == 0


def test_known_hosts_asked_again_do_not_count_as_misses() -> None:
    # A Type 1 sent at once (the host is known to need one) draws the usual 407: no guess.
    needs = LogonNeeds()
    needs.let_through(P, to("open.example"))
    needs.asked(P, to("intranet.example"), guessed=True)
    for _ in range(5):
        needs.asked(P, to("intranet.example"), guessed=False)
    assert needs.may_skip_logon(P, to("another.example"))
