"""Tickets obtained with clients' passwords (multi-user mode): reused only for the same secret.

Only the KDC call (`KerberosTickets._kinit`) is replaced, by a KDC that knows each user's
password; the cache and the choice of ticket are the real code.
"""

from __future__ import annotations

import time

import pytest

from mitmproxy_ntlm import kerberos
from mitmproxy_ntlm.kerberos import KerberosRejected, KerberosSettings, KerberosTickets, Ticket
from mitmproxy_ntlm.multiuser import client_credentials

PASSWORDS = {"alice@corp.test": "Alice-Pass-1", "bob@corp.test": "Bob-Pass-1"}  # lower case


class FakeKdc:
    """Issues a fresh ticket for the right password, refuses a wrong one; counts the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.issued = 0

    def kinit(self, principal: str, *, keytab: str, password: str | None) -> Ticket:
        self.calls.append(principal)
        if PASSWORDS.get(principal.lower()) != password:
            raise KerberosRejected(f"the KDC rejected the password for {principal}")
        self.issued += 1
        return Ticket(ccache=f"MEMORY:{self.issued}", principal=principal,
                      expires=time.time() + 3600, source="password")


@pytest.fixture
def kdc(monkeypatch: pytest.MonkeyPatch) -> FakeKdc:
    fake = FakeKdc()
    monkeypatch.setattr(KerberosTickets, "_kinit", fake.kinit)
    return fake


def login(tickets: KerberosTickets, user: str, password: str) -> Ticket:
    creds = client_credentials(user, password, "CORP", "WS", keep_password=True)
    return tickets.ticket(creds, multiuser=True)


@pytest.fixture
def tickets() -> KerberosTickets:
    if not kerberos.available():
        pytest.skip("the Kerberos extra is not installed")
    return KerberosTickets(KerberosSettings(realm="CORP.TEST"))


def test_same_user_and_password_reuse_the_ticket(kdc: FakeKdc, tickets: KerberosTickets) -> None:
    first = login(tickets, "alice", "Alice-Pass-1")
    assert login(tickets, "CORP\\alice", "Alice-Pass-1") is first
    assert kdc.calls == ["alice@CORP.TEST"]


def test_a_wrong_password_never_gets_the_cached_ticket(kdc: FakeKdc,
                                                       tickets: KerberosTickets) -> None:
    alices = login(tickets, "alice", "Alice-Pass-1")
    with pytest.raises(KerberosRejected):
        login(tickets, "alice", "mallory-guess")
    assert kdc.calls == ["alice@CORP.TEST", "alice@CORP.TEST"]  # asked the KDC again
    # Alice keeps her ticket; the wrong password still gets nothing on a second try.
    assert login(tickets, "alice", "Alice-Pass-1") is alices
    with pytest.raises(KerberosRejected):
        login(tickets, "ALICE", "mallory-guess")
    assert len(kdc.calls) == 3


def test_a_new_password_gets_a_new_ticket(kdc: FakeKdc, tickets: KerberosTickets,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    old = login(tickets, "alice", "Alice-Pass-1")
    monkeypatch.setitem(PASSWORDS, "alice@corp.test", "Alice-Pass-2")  # changed at the domain
    new = login(tickets, "alice", "Alice-Pass-2")
    assert new is not old and new.ccache != old.ccache and len(kdc.calls) == 2
    with pytest.raises(KerberosRejected):  # the old password is no key to the cache any more
        login(tickets, "alice", "Alice-Pass-1")


def test_users_never_share_tickets(kdc: FakeKdc, tickets: KerberosTickets) -> None:
    alices = login(tickets, "alice", "Alice-Pass-1")
    bobs = login(tickets, "bob", "Bob-Pass-1")
    assert bobs is not alices and bobs.principal == "bob@CORP.TEST"
    with pytest.raises(KerberosRejected):  # Bob's password is not Alice's
        login(tickets, "alice", "Bob-Pass-1")
    assert kdc.calls == ["alice@CORP.TEST", "bob@CORP.TEST", "alice@CORP.TEST"]


def test_the_cache_is_bounded(kdc: FakeKdc, tickets: KerberosTickets,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kerberos, "MAX_OWNED_TICKETS", 3)
    for n in range(5):
        monkeypatch.setitem(PASSWORDS, f"user{n}@corp.test", f"Pass-{n}")
        login(tickets, f"user{n}", f"Pass-{n}")
    assert [t["principal"] for t in tickets.status()] == [f"user{n}@CORP.TEST" for n in (2, 3, 4)]
    login(tickets, "user0", "Pass-0")  # dropped: asked again
    assert kdc.calls.count("user0@CORP.TEST") == 2
