"""The lockout guard's counts in an SQLite file, shared by every mitmproxy process naming it.

Workers of `mitm-ntlm start --workers N`, or instances behind a load balancer on one machine,
each have their own memory: counted there, an account could be sent `ntlm_max_failures` wrong
passwords by every process. `SharedLockoutGuard` keeps `LockoutGuard`'s interface and
semantics with the counts in one file: a check-and-reserve is one `BEGIN IMMEDIATE`
transaction, so two processes cannot both take an account's last slot. Times are wall-clock
(`time.time`): the file outlives the processes, and a process that dies leaves attempts in
flight that expire on their own (`attempt_timeout`).

Only the logon path touches the file. `any_blocked()`, asked for every request, answers from
a snapshot at most `fresh_for` seconds old; `blocked()` uses it to skip the file while nobody
is blocked. A stale "nobody" is safe: a logon still needs `try_reserve`, which reads the file
and refuses an account whose failures reach the limit.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions

from .credentials import account_of
from .policy import Attempt, AttemptsBusy
from .untrusted import shown

log = logging.getLogger("mitmproxy_ntlm")

APPLICATION_ID = 0x4E544C4D  # "NTLM" in the file's header: the file is ours
BUSY_TIMEOUT_MS = 5000  # another process's transaction takes microseconds; a stuck one, not
ROW_BYTES = 64  # what a row costs beyond its account name, roughly
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    blocked INTEGER NOT NULL DEFAULT 0,
    expires REAL  -- NULL: until a reset (no cooldown)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accounts_expiry ON accounts (expires);
CREATE INDEX IF NOT EXISTS accounts_blocked ON accounts (blocked) WHERE blocked;
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_account ON attempts (account, expires);
CREATE INDEX IF NOT EXISTS attempts_expiry ON attempts (expires);
"""
ALIVE = "(expires IS NULL OR expires > :now)"


@dataclass(eq=False)
class SharedAttempt(Attempt):
    """An attempt in flight, kept as a row of the file."""

    row: int = 0


class SharedLockoutGuard:
    """`LockoutGuard` with its counts in the SQLite file `path`, bounded as its maps are
    (`max_accounts` rows and about `max_bytes`; accounts not counted yet get no logon when the
    file is full). An unusable file refuses logons (`AttemptsBusy`) rather than miscount."""

    def __init__(self, path: str, limit: int, cooldown: float | None = None,
                 max_accounts: int = 20_000, max_bytes: int = 4 << 20,
                 clock: Callable[[], float] = time.time, fresh_for: float = 1.0) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.limit = limit
        self.cooldown = cooldown
        self.attempt_timeout = 120.0  # the policy sets it from the handshake timeout
        self.on_block: Callable[[], None] | None = None  # called when an account gets blocked
        self.max_accounts = max_accounts
        self.max_bytes = max_bytes
        self.fresh_for = fresh_for
        self._clock = clock
        self._any_blocked = False
        self._any_blocked_until = 0.0  # time.monotonic() until which _any_blocked stands
        self._db = _open_file(self.path)

    # Reads.

    def failures(self, principal: str) -> int:
        try:
            row = self._db.execute(f"SELECT failures FROM accounts WHERE account = :a AND {ALIVE}",
                                   {"a": account_of(principal), "now": self._clock()}).fetchone()
        except sqlite3.Error as e:
            self._broken(e, "counting failures")
            return max(self.limit, 1)  # unknown: as if exhausted, so no slot is skipped
        return int(row[0]) if row else 0

    def blocked(self, principal: str) -> bool:
        if self.limit <= 0 or not self.any_blocked():
            return False
        try:
            row = self._db.execute(
                f"SELECT 1 FROM accounts WHERE account = :a AND blocked AND {ALIVE}",
                {"a": account_of(principal), "now": self._clock()}).fetchone()
        except sqlite3.Error as e:
            self._broken(e, "reading a block")
            return False  # try_reserve refuses the logon
        return row is not None

    def any_blocked(self) -> bool:
        """Whether some account is blocked, as of at most `fresh_for` seconds ago."""
        if self.limit <= 0:
            return False
        now = time.monotonic()
        if now < self._any_blocked_until:
            return self._any_blocked
        self._any_blocked_until = now + self.fresh_for
        try:
            row = self._db.execute(f"SELECT EXISTS (SELECT 1 FROM accounts WHERE blocked AND "
                                   f"{ALIVE})", {"now": self._clock()}).fetchone()
        except sqlite3.Error as e:
            self._broken(e, "reading blocks")  # once per fresh_for; logons still refused
            row = (False,)
        self._any_blocked = bool(row[0])
        return self._any_blocked

    def in_flight(self, principal: str) -> int:
        """Attempts reserved for this account, by any process, and not ended (nor expired)."""
        try:
            return self._live_attempts(self._db, account_of(principal), self._clock())
        except sqlite3.Error as e:
            self._broken(e, "counting logons in flight")
            return 0

    def has_room(self, principal: str) -> bool:
        """Whether a failure of this account can be counted without forgetting another's (see
        `LockoutGuard.has_room`)."""
        try:
            return self._has_room(self._db, account_of(principal), self._clock())
        except sqlite3.Error as e:
            self._broken(e, "counting accounts")
            return False

    # Writes.

    def rejected(self, principal: str) -> int:
        account = account_of(principal)
        now = self._clock()
        blocked_now = False
        try:
            with self._transaction() as db:
                row = db.execute(f"SELECT failures, blocked, expires FROM accounts "
                                 f"WHERE account = :a AND {ALIVE}",
                                 {"a": account, "now": now}).fetchone()
                if row is None and not self._room_for(db, [account], now):
                    log.warning("[ntlm] lockout guard full: the rejection for %s is not "
                                "counted", shown(account))
                    return 1
                count = (row[0] if row else 0) + 1
                was_blocked = bool(row and row[1])
                blocked_now = self.limit > 0 and count >= self.limit and not was_blocked
                expires = row[2] if was_blocked else self._expiry(now)
                db.execute("INSERT OR REPLACE INTO accounts (account, failures, blocked, "
                           "expires) VALUES (?, ?, ?, ?)",
                           (account, count, int(was_blocked or blocked_now), expires))
        except sqlite3.Error as e:
            self._broken(e, f"counting a rejection for {shown(account)}")
            return 1
        if blocked_now:
            self._any_blocked, self._any_blocked_until = True, time.monotonic() + self.fresh_for
            if self.on_block is not None:
                self.on_block()
        return int(count)

    def accepted(self, principal: str) -> None:
        self._write("clearing a count", "DELETE FROM accounts WHERE account = ?",
                    (account_of(principal),))
        self._any_blocked_until = 0.0

    def try_reserve(self, principal: str) -> Attempt | None:
        """A slot for one logon with untried credentials, across all processes (see
        `LockoutGuard.try_reserve`); AttemptsBusy when the file cannot be used."""
        account = account_of(principal)
        now = self._clock()
        expires = now + self.attempt_timeout
        if self.limit <= 0:
            return Attempt(account, expires)
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM attempts WHERE expires <= ?", (now,))
                db.execute("DELETE FROM accounts WHERE expires <= ?", (now,))
                if not self._has_room(db, account, now):
                    return None
                row = db.execute("SELECT failures FROM accounts WHERE account = ?",
                                 (account,)).fetchone()
                if (row[0] if row else 0) + self._live_attempts(db, account, now) >= self.limit:
                    return None
                cursor = db.execute("INSERT INTO attempts (account, expires) VALUES (?, ?)",
                                    (account, expires))
                return SharedAttempt(account, expires, cursor.lastrowid or 0)
        except sqlite3.Error as e:
            self._broken(e, "reserving a logon")
            raise AttemptsBusy(f"mitmproxy-ntlm cannot use its lockout guard's file "
                               f"{self.path} ({e}), so it starts no logon that could fail: "
                               f"check the file and its directory.") from None

    def release(self, attempt: Attempt) -> None:
        if isinstance(attempt, SharedAttempt):
            self._write("ending a logon", "DELETE FROM attempts WHERE id = ?", (attempt.row,))

    def reset(self) -> None:
        """Lifts every block and count, for every process using the file."""
        self._write("resetting", "DELETE FROM accounts", ())
        self._any_blocked_until = 0.0

    # Helpers.

    def _expiry(self, now: float) -> float | None:
        return None if self.cooldown is None else now + self.cooldown

    @staticmethod
    def _live_attempts(db: sqlite3.Connection, account: str, now: float) -> int:
        return int(db.execute("SELECT COUNT(*) FROM attempts WHERE account = ? AND expires > ?",
                              (account, now)).fetchone()[0])

    def _has_room(self, db: sqlite3.Connection, account: str, now: float) -> bool:
        counted = db.execute(f"SELECT 1 FROM accounts WHERE account = :a AND {ALIVE}",
                             {"a": account, "now": now}).fetchone()
        if counted:
            return True
        pending = [name for (name,) in db.execute(
            f"SELECT DISTINCT account FROM attempts WHERE expires > :now AND account NOT IN "
            f"(SELECT account FROM accounts WHERE {ALIVE})", {"now": now})]
        return self._room_for(db, {*pending, account}, now)

    def _room_for(self, db: sqlite3.Connection, accounts: Any, now: float) -> bool:
        """Whether rows for `accounts` (not counted yet) fit beside the counted ones."""
        rows, size = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(account AS BLOB))), 0) FROM accounts "
            f"WHERE {ALIVE}", {"now": now}).fetchone()
        extra = sum(len(a.encode()) + ROW_BYTES for a in accounts)
        return bool(rows + len(accounts) <= self.max_accounts
                    and size + rows * ROW_BYTES + extra <= self.max_bytes)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: it holds the file's write lock from its first statement,
        so what it reads cannot change before it writes."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _write(self, what: str, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as e:
            self._broken(e, what)

    def _broken(self, error: sqlite3.Error, what: str) -> None:
        log.error("[ntlm] lockout guard file %s: %s while %s", self.path, error, what)


def _open_file(path: str) -> sqlite3.Connection:
    """The guard's file, created if need be, in WAL mode; OptionsError naming the cause.

    Processes starting together (workers) set the file up at the same moment: switching to
    WAL takes a lock that SQLite's busy timeout does not wait for, so "locked" is retried
    for as long as that timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return _open_file_once(path)
        except _Locked:
            if time.monotonic() > deadline:
                raise exceptions.OptionsError(
                    f"ntlm_lockout_file {path}: cannot be used: another process keeps it "
                    f"locked") from None
            time.sleep(0.05)


class _Locked(Exception):
    """Another process holds the file's lock while setting it up."""


def _open_file_once(path: str) -> sqlite3.Connection:
    why = _unusable(path)
    if why:
        raise exceptions.OptionsError(f"ntlm_lockout_file {path}: {why}")
    db = None
    try:
        # Account names and failure counts: for this user only (SQLite gives the -wal and
        # -shm files the main file's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync per logon; counts, not money
        db.execute("BEGIN IMMEDIATE")
        owner = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if owner != APPLICATION_ID and (owner or tables - {"accounts", "attempts"}):
            raise exceptions.OptionsError(
                f"ntlm_lockout_file {path}: an SQLite file of another program; name a file of "
                f"its own")
        for statement in SCHEMA.split(";"):  # not executescript: it would commit first
            db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("COMMIT")
    except (sqlite3.Error, OSError, exceptions.OptionsError) as e:
        if db is not None:
            db.close()
        if isinstance(e, exceptions.OptionsError):
            raise
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise _Locked() from None
        cause = "not an SQLite file" if isinstance(e, sqlite3.DatabaseError) and \
            "not a database" in str(e) else f"cannot be used: {e}"
        raise exceptions.OptionsError(f"ntlm_lockout_file {path}: {cause}") from None
    return db


def _unusable(path: str) -> str:
    """Why `path` cannot hold the guard's file, in words SQLite does not give."""
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return "is a directory; name a file in it (e.g. lockout.db)"
    if not os.path.isdir(folder):
        return f"its directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"its directory {folder} is not writable by this user (SQLite keeps the -wal "
                f"and -shm files beside it)")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return "not readable and writable by this user"
    if os.path.exists(path) and not os.path.isfile(path):
        return "not a regular file"
    return ""
