"""NTLM single sign-on through winbind: Samba's `ntlm_auth` helper answers the challenge with
the logged-on user's cached credentials, as curl's `--ntlm-wb` and Firefox do on Linux.

No password is ever in mitmproxy: `ntlm_auth --helper-protocol=ntlmssp-client-1
--use-cached-creds` asks winbindd, which holds the user's NT hash since their logon (pam_winbind
`cached_login`, or `wbinfo --ccache-save`). One helper process runs per handshake (its NTLMSSP
state is that of one exchange), started ahead of need; it ends after the Type 3, when the
handshake is dropped, or at shutdown. Each answer is awaited (on the event loop: the engine is
synchronous) for at most ANSWER_TIMEOUT seconds; winbindd answers from its cache in
milliseconds, without asking the DC.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import selectors
import shutil
import subprocess
import tempfile
import time
import weakref
from collections import OrderedDict

from .credentials import Credentials, split_principal
from .handshake import ChallengeError, NtlmClientError

PROGRAM = "ntlm_auth"
ANSWER_TIMEOUT = 5.0
MAX_ANSWER_BYTES = 64 * 1024  # a Type 3 in base64 is a few KB
INSTALL_HINT = "install Samba's winbind package (Debian/Ubuntu: apt-get install winbind)"
NO_CACHE_HINT = (
    "log on to this machine through winbind with cached logons (pam_winbind cached_login, "
    "winbind offline logon = yes) or store the credentials with `wbinfo --ccache-save=USER%PASS`"
    " as the user mitmproxy runs as; `wbinfo -p` checks that winbindd runs")


def program() -> str | None:
    """The path of ntlm_auth, or None when it is not installed."""
    return shutil.which(PROGRAM)


def winbind_identity(user: str, domain: str, workstation: str) -> Credentials:
    """The identity whose cached credentials winbind uses: ntlm_username (DOMAIN\\user,
    user@domain) or else the logged-on user; no secret (winbind holds it)."""
    name, dom = split_principal(user or getpass.getuser(), domain)
    return Credentials(user=name, domain=dom, workstation=workstation.upper(), nt_hash=b"",
                       lm_hash=b"", winbind=True)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End one helper (it holds nothing worth a graceful exit) and reap it."""
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            if stream:
                stream.close()


def _end_all(running: dict[int, subprocess.Popen[bytes]]) -> None:
    for proc in list(running.values()):
        running.pop(proc.pid, None)
        _end(proc)


class WinbindHelpers:
    """The ntlm_auth processes, by PID: each handshake takes one, and one spare per user and
    parent is started ahead, so a handshake does not wait for ntlm_auth to start up (tens of
    ms on mitmproxy's event loop). Spares and helpers of abandoned handshakes are killed at
    shutdown, or when this object is dropped (a new configuration)."""

    MAX_SPARES = 8

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._spares: OrderedDict[tuple[str, ...], subprocess.Popen[bytes]] = OrderedDict()
        weakref.finalize(self, _end_all, self._running)

    def start(self, creds: Credentials, target_host: str) -> subprocess.Popen[bytes]:
        """A helper for one handshake as `creds` with `target_host`; NtlmClientError when
        ntlm_auth cannot be started."""
        path = self.path or program()
        if path is None:
            raise NtlmClientError(f"ntlm_winbind is set but {PROGRAM} is not installed: "
                                  f"{INSTALL_HINT}")
        args = (path, "--helper-protocol=ntlmssp-client-1", "--use-cached-creds",
                f"--username={creds.user}", "--target-service=http",
                f"--target-hostname={target_host}",
                *((f"--domain={creds.domain}",) if creds.domain else ()),
                *((f"--workstation={creds.workstation}",) if creds.workstation else ()))
        proc = self._spares.pop(args, None)
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self.stop(proc)
            proc = self._spawn(args)
        with contextlib.suppress(NtlmClientError):
            self._spares[args] = self._spawn(args)  # starts up while this handshake runs
            while len(self._spares) > self.MAX_SPARES:
                self.stop(self._spares.popitem(last=False)[1])
        return proc

    def _spawn(self, args: tuple[str, ...]) -> subprocess.Popen[bytes]:
        errors = tempfile.TemporaryFile()  # read only on failure; a pipe could fill and block
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errors, start_new_session=True)
        except OSError as e:
            errors.close()
            raise NtlmClientError(f"cannot start {args[0]} ({e.strerror or e}): "
                                  f"{INSTALL_HINT}") from None
        proc.stderr = errors  # type: ignore[assignment]  # a file, not a pipe: see above
        self._running[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        self._running.pop(proc.pid, None)
        _end(proc)

    def stop_all(self) -> None:
        self._spares.clear()
        _end_all(self._running)

    @property
    def running(self) -> list[int]:
        """PIDs of the helpers of handshakes in progress and of the spares."""
        return list(self._running)

    @property
    def spares(self) -> int:
        return len(self._spares)


class WinbindHandshake:
    """The NtlmHandshake shape (negotiate, authenticate) with ntlm_auth making the messages:
    `YR` -> `YR <Type 1>`, `TT <Type 2>` -> `AF <Type 3>` (or `KK`); `PW` means winbind has
    no cached credentials for the user, `BH <reason>` that the helper failed."""

    single_leg = False
    mechanism = "NTLM"

    def __init__(self, creds: Credentials, helpers: WinbindHelpers, target_host: str,
                 scheme: str = "NTLM") -> None:
        self.creds = creds
        self.scheme = scheme
        self._helpers = helpers
        self._proc = helpers.start(creds, target_host)
        self._type1: bytes | None = None
        weakref.finalize(self, helpers.stop, self._proc)  # dropped after its Type 1

    def negotiate(self) -> bytes:
        if self._type1 is None:
            self._type1 = self._ask(b"YR", b"YR", "the Type 1")
        return self._type1

    def authenticate(self, challenge: bytes) -> bytes:
        """The Type 3 answering `challenge`; ChallengeError when the challenge is unusable,
        NtlmClientError when winbind cannot answer it."""
        if not challenge.startswith(b"NTLMSSP\x00\x02\x00\x00\x00"):
            raise ChallengeError("the NTLM challenge is not an NTLMSSP Type 2 message")
        self.negotiate()
        try:
            return self._ask(b"TT " + base64.b64encode(challenge), (b"AF", b"KK"), "the Type 3")
        finally:
            self._helpers.stop(self._proc)

    def _ask(self, request: bytes, answers: bytes | tuple[bytes, ...], what: str) -> bytes:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(request + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it exited: the answer below is the end of its output
        line = self._read_line()
        word, _, rest = line.partition(b" ")
        if word in ((answers,) if isinstance(answers, bytes) else answers) and rest:
            try:
                return base64.b64decode(rest, validate=True)
            except ValueError:
                raise self._failed(f"{PROGRAM} answered {what} with invalid base64") from None
        if word == b"PW":
            raise self._failed(f"winbind has no cached credentials for {self.creds.principal} "
                               f"(or winbindd is not running): {NO_CACHE_HINT}")
        if word == b"BH":
            reason = rest.decode("ascii", "replace")[:200] or "no reason given"
            raise self._failed(f"{PROGRAM} could not make {what} for {self.creds.principal} "
                               f"({reason}); {NO_CACHE_HINT}")
        if not line:
            raise self._failed(f"{PROGRAM} ended without making {what}"
                               f"{self._exit_reason()}; {NO_CACHE_HINT}")
        raise self._failed(f"{PROGRAM} gave an unexpected answer to {request[:2].decode()}")

    def _read_line(self) -> bytes:
        """One answer line, waiting at most ANSWER_TIMEOUT; b"" when the helper ended."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        data = bytearray()
        deadline = time.monotonic() + ANSWER_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise self._failed(f"{PROGRAM} did not answer within {ANSWER_TIMEOUT:g} s "
                                       f"(is winbindd stuck? `wbinfo -p` checks it)")
                chunk = os.read(fd, 8192)
                if not chunk:
                    return bytes(data).strip()
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise self._failed(f"{PROGRAM} sent an answer over {MAX_ANSWER_BYTES} bytes")
        return bytes(data.split(b"\n", 1)[0]).strip()

    def _exit_reason(self) -> str:
        """The exit status and the last line ntlm_auth wrote to stderr, if it has exited."""
        try:
            status = self._proc.wait(0.5)
        except subprocess.TimeoutExpired:
            return ""
        errors = self._proc.stderr
        last = ""
        if errors is not None:
            with contextlib.suppress(OSError, ValueError):
                errors.seek(0)
                lines = errors.read(4096).decode("utf-8", "replace").strip().splitlines()
                last = lines[-1][:200] if lines else ""
        return f" (exit status {status}{': ' + last if last else ''})"

    def _failed(self, text: str) -> NtlmClientError:
        self._helpers.stop(self._proc)
        return NtlmClientError(f"NTLM single sign-on through winbind failed: {text}")
