"""Several instances behind a real HAProxy or nginx (stream) running the shipped configs.

Two mitmdump instances in multi-user mode sit in front of one password-checking parent, each
with its own workstation name (W1, W2), behind the balancer. Clients come from different
loopback addresses (127.0.0.n, each its own user). The parent decodes every Type 3, so it
knows which instance logged on which user. An instance forwards a user's request only on a
parent connection it authenticated as that user itself, so "all of a user's logons carry one
workstation" means "all of that client's requests went through one instance".
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mitmproxy_ntlm.locations import CONFIGS
from mitmproxy_ntlm.messages import describe_authenticate
from mitmproxy_ntlm.testing.parent import ParentProxy
from tests.constants import TEST_DOMAIN
from tests.mitm import Mitmdump, curl
from tests.processes import terminate
from tests.servers import Origin, free_port, wait_port

MULTI = {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN}
WORKSTATIONS = ("W1", "W2")
CLIENTS = range(2, 40)  # 127.0.0.n; the first ones that reach both instances are used
ENOUGH_CLIENTS = 4


def user(n: int) -> str:
    return f"user{n}"


def password(n: int) -> str:
    return f"Pass-{n}-x"


def pointed_at_loopback(text: str, listen: str, port: int, server: str, ports: list[int]) -> str:
    """The shipped config with its listen address and each instance's address on loopback."""
    text, count = re.subn(listen, rf"\g<1>127.0.0.1:{port}", text, flags=re.MULTILINE)
    assert count == 1, "the shipped config should listen once"
    instances = iter(ports)
    text, count = re.subn(server, lambda m: f"{m.group(1)}127.0.0.1:{next(instances)}", text,
                          flags=re.MULTILINE)
    assert count == len(ports), "the shipped config should name one server per test instance"
    return text


def nginx_stream_module() -> str:
    """The `load_module` line nginx needs for `stream {}` ('' when built in); skip if absent."""
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=30).stderr
    if "--with-stream=dynamic" in built:
        modules = re.search(r"--modules-path=(\S+)", built)
        module = Path(modules.group(1) if modules else "/usr/lib/nginx/modules")
        module /= "ngx_stream_module.so"
        if not module.is_file():
            pytest.skip(f"nginx's stream module is not installed ({module}; Debian: "
                        "apt install libnginx-mod-stream)")
        return f"load_module {module};"
    if re.search(r"--with-stream(\s|$)", built):
        return ""
    pytest.skip("nginx is built without the stream module")


class Balancer:
    """HAProxy or nginx, not root, on a free loopback port, in the foreground; stopped by PID."""

    def __init__(self, kind: str, workdir: Path, instance_ports: list[int]) -> None:
        self.kind = kind
        self.dir = workdir / kind
        self.dir.mkdir()
        self.instance_ports = instance_ports
        self.log = self.dir / "out.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """Write the shipped config pointed at loopback; the command that runs it."""
        d = self.dir
        if self.kind == "haproxy":
            listen = pointed_at_loopback((CONFIGS / "haproxy.cfg").read_text(), r"^(\s*bind )\S+$",
                                         self.port, r"^(\s*server \S+ )[\d.]+:\d+",
                                         self.instance_ports)
            (d / "haproxy.cfg").write_text(listen)
            return ["haproxy", "-db", "-f", str(d / "haproxy.cfg"), "-p", str(d / "haproxy.pid")]
        stream = pointed_at_loopback((CONFIGS / "nginx-stream.conf").read_text(),
                                     r"^(\s*listen )\d+(?=;)", self.port,
                                     r"^(\s*server )[\d.]+:\d+", self.instance_ports)
        (d / "stream.conf").write_text(stream)
        (d / "nginx.conf").write_text(f"""{nginx_stream_module()}
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
include {d}/stream.conf;
""")
        return ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]

    def start(self) -> Balancer:
        for _attempt in range(3):  # the free port may be taken before the balancer binds it
            self.port = free_port()
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                             cwd=self.dir)
            try:
                wait_port(self.port, 10, lambda: self.proc is not None and self.proc.poll() is None)
                return self
            except (RuntimeError, TimeoutError):
                self.stop()
        raise RuntimeError(f"{self.kind} did not start:\n{self.output()}")

    def output(self) -> str:
        logs = [self.log, self.dir / "error.log"]
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None


@pytest.fixture(params=["haproxy", "nginx"])
def balancer_kind(request: pytest.FixtureRequest) -> str:
    """The balancer to run; skips before anything starts when it is not installed."""
    kind = str(request.param)
    if shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed (Debian: apt install {kind})")
    if kind == "nginx":
        nginx_stream_module()
    return kind


@pytest.fixture
def users_parent(make_parent: Callable[..., ParentProxy]) -> ParentProxy:
    return make_parent(users={f"{TEST_DOMAIN}\\{user(n)}": password(n) for n in CLIENTS})


@pytest.fixture
def balancer(balancer_kind: str, users_parent: ParentProxy, mitm: Callable[..., Mitmdump],
             tmp_path: Path) -> Iterator[Balancer]:
    instances = [mitm(users_parent.url, {**MULTI, "ntlm_workstation": ws}, "--ignore-hosts", ".*")
                 for ws in WORKSTATIONS]
    lb = Balancer(balancer_kind, tmp_path, [m.port for m in instances])
    try:
        yield lb.start()
    finally:
        lb.stop()


def fetch(lb: Balancer, n: int, url: str, *args: str) -> str:
    """One request of client n (from 127.0.0.n, as user n) through the balancer, on a new
    connection."""
    r = curl("--interface", f"127.0.0.{n}", "--proxy-user", f"{user(n)}:{password(n)}",
             "-x", lb.url, *args, url, timeout=30)
    return r.stdout if r.returncode == 0 else f"curl {r.returncode}: {r.stderr}"


def logons(parent: ParentProxy) -> Counter[tuple[str, str]]:
    """(user, workstation) of every Type 3 the parent received: which instance logged on whom."""
    described = (describe_authenticate(base64.b64decode(t)) for t in list(parent.type3_tokens))
    return Counter((d["user"], d["workstation"]) for d in described)


def instances_of(parent: ParentProxy) -> dict[str, set[str]]:
    """Per user, the instances (workstations) that logged it on."""
    found: dict[str, set[str]] = {}
    for name, ws in logons(parent):
        found.setdefault(name, set()).add(ws)
    return found


def test_each_client_keeps_its_instance_and_its_warm_pool(
    balancer: Balancer, users_parent: ParentProxy, origin: Origin, tls_origin: Origin
) -> None:
    parent, lb = users_parent, balancer
    # One plain-http request per client address, until both instances have clients.
    clients: list[int] = []
    for n in CLIENTS:
        assert fetch(lb, n, f"{origin.url}/hello?client={n}") == "hello", lb.output()
        clients.append(n)
        used = set().union(*instances_of(parent).values())
        if len(clients) >= ENOUGH_CLIENTS and used == set(WORKSTATIONS):
            break
    # Both instances take clients: the balancer spreads client addresses.
    assert set().union(*instances_of(parent).values()) == set(WORKSTATIONS), instances_of(parent)
    first = {name: next(iter(ws)) for name, ws in instances_of(parent).items()}

    # Two more rounds of plain http, the clients taking turns, each request a new connection
    # and two in a row from each client (a round robin would send them to both instances).
    for _round in range(2):
        for n in clients:
            for _ in range(2):
                assert fetch(lb, n, f"{origin.url}/hello?client={n}") == "hello", lb.output()
    requests = parent.snapshot().requests
    assert len(requests) == 5 * len(clients)
    # Every request arrived as the user of the address it came from.
    assert all(rec.user == f"{TEST_DOMAIN}\\{user(int(rec.target.split('client=')[1]))}"
               for rec in requests), requests
    # The pool stays warm: one logon per user, on one instance, for its five requests.
    assert logons(parent) == Counter({(user(n), first[user(n)]): 1 for n in clients})

    # CONNECT (passthrough) tunnels: each is a logon of its own, on the same instance.
    for n in clients:
        for _ in range(2):
            body = fetch(lb, n, f"{tls_origin.url}/hello", "--cacert", str(tls_origin.cert_path))
            assert body == "hello", lb.output()
    tunnels = [rec for rec in parent.snapshot().requests if rec.method == "CONNECT"]
    assert Counter(rec.user for rec in tunnels) == Counter(
        {f"{TEST_DOMAIN}\\{user(n)}": 2 for n in clients})
    # Affinity: every logon of a user, http and CONNECT, came from the instance it first met.
    assert instances_of(parent) == {user(n): {first[user(n)]} for n in clients}
    assert parent.snapshot().rejected_count == 0
