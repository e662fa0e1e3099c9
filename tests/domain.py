"""A Samba AD domain controller on loopback, and Squid checking logons against it.

The DC is real: NTLM logons go through Squid's `ntlm_auth` helper to winbind and the DC's
SAM, Kerberos tickets come from its KDC, and a wrong password raises the account's
`badPwdCount`. It binds the standard ports (88, 389, 445, ...) on 127.0.0.1 only, so one runs
per machine; it needs root (Samba and the winbind privileged pipe) and the Debian packages
samba, winbind and krb5-user.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from tests.servers import Squid

REALM = "CORP.TEST"
DOMAIN = "CORP"
ADMIN_PASSWORD = "Admin-Pass-9!"
SERVICE_HOST = "localhost"  # Squid is addressed by this name: its SPN is HTTP/localhost


class SambaDC:
    """Provision a fresh domain in a temp dir, run `samba` in the foreground, stop it."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users  # name -> password
        self.dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def smb_conf(self) -> Path:
        return self.dir / "etc" / "smb.conf"

    @property
    def krb5_conf(self) -> Path:
        return self.dir / "krb5.conf"

    @property
    def proxy_keytab(self) -> Path:
        return self.dir / "proxy.keytab"

    @property
    def log_path(self) -> Path:
        return self.dir / "log.samba"

    def env(self) -> dict[str, str]:
        """Environment for Kerberos clients of this realm (kinit, gssapi, Squid's helpers)."""
        return {"KRB5_CONFIG": str(self.krb5_conf)}

    def _tool(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["samba-tool", *args, "-s", str(self.smb_conf)],
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"samba-tool {args[0]} {args[1]}: {proc.stderr[-1500:]}")
        return proc.stdout

    def start(self) -> Self:
        for binary in ("samba", "samba-tool", "ntlm_auth", "kinit"):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} not found: apt-get install samba winbind krb5-user")
        if os.geteuid() != 0:
            raise RuntimeError("the domain controller tests need root")
        if _port_open(88) or _port_open(445):
            raise RuntimeError("ports 88/445 are taken: another DC or Samba runs here")
        self.dir = Path(tempfile.mkdtemp(prefix="samba-dc-"))
        self.dir.chmod(0o755)
        subprocess.run(
            ["samba-tool", "domain", "provision", f"--realm={REALM}", f"--domain={DOMAIN}",
             "--server-role=dc", "--dns-backend=NONE", f"--adminpass={ADMIN_PASSWORD}",
             f"--targetdir={self.dir}", "--option=interfaces=lo",
             "--option=bind interfaces only=yes"],
            check=True, capture_output=True, timeout=180)
        conf = self.smb_conf.read_text()
        conf = re.sub(r"\tlog file = .*\n", "", conf).replace(
            "[global]\n",
            f"[global]\n\tlog file = {self.log_path}\n\tlog level = 1 auth_audit:3\n"
            f"\tmax log size = 0\n\tpid directory = {self.dir}\n"
            # RPC endpoints above the kernel's ephemeral ports (32768-60999 by default), where
            # a client socket of another test can hold the port Samba wants
            f"\trpc server dynamic port range = {_rpc_ports()}\n", 1)
        self.smb_conf.write_text(conf)
        self.krb5_conf.write_text(
            f"[libdefaults]\n\tdefault_realm = {REALM}\n\tdns_lookup_realm = false\n"
            f"\tdns_lookup_kdc = false\n\trdns = false\n"
            f"[realms]\n\t{REALM} = {{\n\t\tkdc = 127.0.0.1\n\t}}\n"
            f"[domain_realm]\n\t{SERVICE_HOST} = {REALM}\n")
        # A lockout threshold makes the DC count bad passwords (badPwdCount); 10 is above the
        # addon's guard (3), as a real domain's usually is.
        self._tool("domain", "passwordsettings", "set", "--max-pwd-age=0", "--complexity=off",
                   "--account-lockout-threshold=10")
        for name, password in self.users.items():
            self._tool("user", "create", name, password)
        self._tool("user", "create", "svc-proxy", "Svc-Pass-7!x")
        self._tool("spn", "add", f"HTTP/{SERVICE_HOST}", "svc-proxy")
        self._tool("domain", "exportkeytab", str(self.proxy_keytab),
                   f"--principal=HTTP/{SERVICE_HOST}")
        self._grant_squid_access()
        for attempt in range(3):  # a just-stopped DC can hold an RPC endpoint for a moment
            self._proc = subprocess.Popen(
                ["samba", "--foreground", "--no-process-group", "-s", str(self.smb_conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            try:
                self._wait_ready(30)
                return self
            except RuntimeError:
                self._kill()
                if attempt == 2:
                    raise
                time.sleep(3)
        return self

    def _grant_squid_access(self) -> None:
        """Squid runs its helpers as `proxy`: winbind's privileged pipe and the keytab."""
        with contextlib.suppress(KeyError):
            subprocess.run(["usermod", "-aG", "winbindd_priv", "proxy"], check=True,
                           capture_output=True)
            gid = grp.getgrnam("winbindd_priv").gr_gid
            privileged = self.dir / "state" / "winbindd_privileged"
            privileged.mkdir(parents=True, exist_ok=True)
            os.chown(privileged, 0, gid)
            privileged.chmod(0o750)
            import pwd

            proxy = pwd.getpwnam("proxy")
            os.chown(self.proxy_keytab, proxy.pw_uid, proxy.pw_gid)

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the KDC answers and winbind authenticates a user."""
        deadline = time.monotonic() + timeout
        name, password = next(iter(self.users.items()))
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"samba exited: {self.log_tail()}")
            if _port_open(88):
                check = subprocess.run(
                    ["ntlm_auth", f"--username={name}", f"--domain={DOMAIN}",
                     f"--password={password}", f"--configfile={self.smb_conf}"],
                    capture_output=True, text=True, timeout=30)
                if check.returncode == 0:
                    try:  # the KDC answers too
                        self.kinit(name, password, self.dir / "ready-cc")
                        return
                    except RuntimeError:
                        pass
            time.sleep(0.3)
        raise TimeoutError(f"the DC did not become ready: {self.log_tail()}")

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def auth_log(self, user: str) -> list[str]:
        """The DC's own audit lines for logons of `user`: Kerberos in log.samba, NTLM (through
        winbind, which logs each check more than once) in log.wb-CORP."""
        lines: list[str] = []
        for path in sorted(self.dir.glob("log.*")):
            with contextlib.suppress(OSError):
                lines += [line.strip() for line in path.read_text(errors="replace").splitlines()
                          if line.strip().startswith("Auth:") and user.lower() in line.lower()]
        return lines

    def bad_password_count(self, user: str) -> int:
        """`badPwdCount` of the account, as the DC keeps it (reset by a good logon)."""
        out = self._tool("user", "show", user, "--attributes=badPwdCount")
        match = re.search(r"badPwdCount: (\d+)", out)
        return int(match.group(1)) if match else 0

    def kinit(self, user: str, password: str, ccache: Path, lifetime: str = "") -> None:
        """A ticket cache for `user`, as a user would fill it with kinit."""
        args = ["kinit", *(["-l", lifetime] if lifetime else []), f"{user}@{REALM}"]
        for attempt in range(3):  # the KDC's workers can be busy restarting for a moment
            proc = subprocess.run(
                args, input=password + "\n", text=True, capture_output=True, timeout=30,
                env={**os.environ, **self.env(), "KRB5CCNAME": f"FILE:{ccache}"})
            if proc.returncode == 0:
                return
            if "incorrect" in proc.stderr or attempt == 2:
                break
            time.sleep(1)
        raise RuntimeError(f"kinit {user}: {proc.stderr.strip()}")

    def cache_logon(self, user: str, password: str) -> None:
        """Give winbind cached credentials for `user` (for callers with this uid), as a logon
        through pam_winbind with cached_login does; ntlm_auth --use-cached-creds uses them."""
        proc = subprocess.run(["wbinfo", f"--ccache-save={DOMAIN}\\{user}%{password}"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"wbinfo --ccache-save {user}: {proc.stdout}{proc.stderr}")

    def export_keytab(self, user: str, path: Path) -> None:
        self._tool("domain", "exportkeytab", str(path), f"--principal={user}@{REALM}")

    def _kill(self) -> None:
        """Stop samba and every process it forked (some leave its process group)."""
        if self._proc is None:
            return
        family = _descendants(self._proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(5)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._proc = None

    def stop(self) -> None:
        self._kill()
        if self.dir != Path() and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def domain_squid(dc: SambaDC, schemes: tuple[str, ...] = ("negotiate", "ntlm")) -> Squid:
    """Squid that checks every logon at `dc`: NTLM with Samba's ntlm_auth, Negotiate with
    negotiate_wrapper (Kerberos via the proxy's keytab, NTLM inside Negotiate via ntlm_auth).
    Offered in the order given."""
    ntlm_helper = (f"/usr/bin/ntlm_auth --helper-protocol=squid-2.5-ntlmssp "
                   f"--configfile={dc.smb_conf}")
    lines: list[str] = []
    for scheme in schemes:
        if scheme == "negotiate":
            lines += [
                f"auth_param negotiate program /usr/lib/squid/negotiate_wrapper_auth "
                f"--ntlm {ntlm_helper} --kerberos /usr/lib/squid/negotiate_kerberos_auth "
                f"-k {dc.proxy_keytab} -s HTTP/{SERVICE_HOST}@{REALM}",
                "auth_param negotiate children 10 startup=0 idle=1",
                "auth_param negotiate keep_alive on",
            ]
        else:
            lines += [f"auth_param ntlm program {ntlm_helper}",
                      "auth_param ntlm children 10 startup=0 idle=1",
                      "auth_param ntlm keep_alive on"]
    return Squid("custom", auth_lines=lines, environment=dc.env(),
                 extra_config="strip_query_terms off")


def programs_below(root: int) -> list[str]:
    """The names of the processes running below `root` (e.g. helpers a proxy started)."""
    names = []
    for pid in _descendants(root):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def _descendants(root: int) -> list[int]:
    """All processes below `root`, read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rpc_ports() -> str:
    """A range for Samba's dynamic RPC endpoints that client sockets never take."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        high = 60999
    start = min(high + 1, 65535 - 200)
    return f"{start}-{start + 199}"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
