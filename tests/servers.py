"""Real loopback servers for tests: an origin, a git smart-HTTP server, a package index, Squid.

Everything binds 127.0.0.1 on a port picked by the kernel (Squid refuses port 0, so it gets a
port that was free a moment ago and retries on a clash). Each class has start()/stop(), works as
a context manager and exposes ``.port`` and ``.url``. stop() closes idle keep-alive connections
too, so no server thread or process outlives a test.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, NamedTuple, Self, TypeVar

from mitmproxy_ntlm.testing import http1

logger = logging.getLogger(__name__)

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


def client_env(
    proxy: str | None = None, home: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Environment for curl/git/pip child processes: no inherited proxies or user config.

    With ``proxy`` set, the usual proxy variables point at it (and NO_PROXY is empty, so even
    127.0.0.1 goes through the proxy).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_ENV and not k.startswith("PIP_")  # e.g. PIP_FIND_LINKS
    }
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_CACHE_DIR="1",
    )
    if home is not None:
        env["HOME"] = os.fspath(home)
    if proxy:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env[name] = proxy
    return env


def pattern_bytes(n: int) -> bytes:
    """Deterministic content of ``/bytes/N``: byte i is ``i % 251`` (prime, so shifts show)."""
    block = bytes(range(251))
    return (block * (n // 251 + 1))[:n]


def free_port() -> int:
    """A port free right now on 127.0.0.1, for servers that cannot bind port 0 themselves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, alive: Any = None) -> None:
    """Poll until 127.0.0.1:port accepts a TCP connection (or ``alive()`` turns false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("server process exited during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# --------------------------------------------------------------------------- threaded HTTP base


class _TrackingServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() can end keep-alive ones."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False
    # socketserver's default backlog of 5 overflows under load tests (SYN retries, resets).
    request_queue_size = 1024

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], owner: Any) -> None:
        self.owner = owner
        self.ssl_context: ssl.SSLContext | None = None
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the per-connection thread: wrap TLS here so a slow handshake blocks nobody."""
        if self.ssl_context is not None:
            request.settimeout(10)
            request = self.ssl_context.wrap_socket(request, server_side=True)
            request.settimeout(None)
        with self._active_lock:
            self._active.add(request)
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            with self._active_lock:
                self._active.discard(request)
            with contextlib.suppress(OSError):
                request.close()

    def close_connections(self) -> None:
        """Shut down every open connection so handler threads blocked in recv() return."""
        with self._active_lock:
            conns = list(self._active)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up or fail TLS are normal in tests: log quietly."""
        logger.debug("error serving %s", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 handler with a body reader that understands chunked requests."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end eventually even without stop()
    server: _TrackingServer

    def log_message(self, format: str, *args: Any) -> None:
        """Route access logs to logging instead of stderr."""
        logger.debug("%s %s", type(self.server.owner).__name__, format % args)

    def read_body(self) -> tuple[bytes, bool]:
        """Read the request body by Content-Length or chunked coding (http.server reads
        neither); return (body, chunked)."""
        size = http1.body_size(self)  # this handler's `headers` stand for the request's
        if size is None:
            return http1.read_chunked(self.rfile), True
        return self.rfile.read(size) if size > 0 else b"", False

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a complete response with Content-Length (no body for HEAD)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


R = TypeVar("R")


class _ThreadedServer(Generic[R]):
    """Lifecycle shared by the Python servers: serve_forever in a thread, stop() joins it.

    Each server also keeps a thread-safe log of what it served (records of type R).
    """

    handler: ClassVar[type[_Handler]]
    scheme = "http"

    def __init__(self) -> None:
        self.port = 0
        self._httpd: _TrackingServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[R] = []

    @property
    def requests(self) -> list[R]:
        """Copy of what was served so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, req: R) -> None:
        with self._lock:
            self._requests.append(req)

    @property
    def base_url(self) -> str:
        """Scheme, loopback address and port."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """What a client is pointed at (subclasses narrow it)."""
        return self.base_url

    def _prepare(self) -> None:
        """Subclass hook: build content before the port opens."""

    def _configure(self, httpd: _TrackingServer) -> None:
        """Subclass hook: e.g. attach a TLS context."""

    def start(self) -> Self:
        """Bind, then serve in a background thread; returns when the port accepts connections."""
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._prepare()
        httpd = _TrackingServer(self.handler, self)
        self._configure(httpd)
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end open connections and join every handler thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()  # joins the per-connection threads (block_on_close)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._cleanup()

    def _cleanup(self) -> None:
        """Subclass hook: remove temp dirs."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- origin


class OriginRequest(NamedTuple):
    """One request as the origin saw it, so tests can check what really arrived (and how often)."""

    method: str
    path: str
    body_length: int
    sha256: str
    chunked: bool
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """First value of a request header, case-insensitively."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _OriginHandler(_Handler):
    """Routes of the test origin; every request is recorded before it is answered."""

    server: _TrackingServer

    def _dispatch(self) -> None:
        body, chunked = self.read_body()
        owner: Origin = self.server.owner
        digest = hashlib.sha256(body).hexdigest()
        owner._record(
            OriginRequest(
                self.command,
                self.path,
                len(body),
                digest,
                chunked,
                tuple((k, v) for k, v in self.headers.items()),
            )
        )
        path = self.path.split("?", 1)[0]
        if path.startswith(("http://", "https://")):  # absolute-form: servers must accept it
            path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else "/"
        parts = path.strip("/").split("/")
        method = self.command
        if method in ("GET", "HEAD") and path == "/hello":
            self.send_bytes(200, b"hello")
        elif len(parts) == 2 and parts[0] == "slow" and parts[1].isdigit():
            time.sleep(min(int(parts[1]), 10_000) / 1000)
            self.send_bytes(200, b"slow")
        elif method in ("GET", "HEAD") and len(parts) == 2 and parts[1].isdigit():
            self._send_pattern(parts[0], int(parts[1]))
        elif method in ("GET", "HEAD") and path == "/headers":
            data = json.dumps([[k, v] for k, v in self.headers.items()]).encode()
            self.send_bytes(200, data, "application/json")
        elif method in ("POST", "PUT") and path == "/echo":
            info = {"length": len(body), "sha256": digest, "chunked": chunked, "method": method}
            self.send_bytes(200, json.dumps(info).encode(), "application/json")
        elif len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            self._send_status(int(parts[1]))
        else:
            self.send_bytes(404, b"not found\n")

    def _send_pattern(self, kind: str, n: int) -> None:
        """/bytes/N (Content-Length), /chunked/N (chunked), /close/N (ends with the connection)."""
        if kind not in ("bytes", "chunked", "close") or n > 1 << 30:
            self.send_bytes(404, b"not found\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind == "bytes":
            self.send_header("Content-Length", str(n))
        elif kind == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        block = pattern_bytes(251 * 256)  # a multiple of 251 keeps the pattern seamless
        sent = 0
        while sent < n:
            piece = block[: min(len(block), n - sent)]
            if kind == "chunked":
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
            sent += len(piece)
        if kind == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _send_status(self, status: int) -> None:
        """/status/CODE: an empty response with that status (no body for 204/304)."""
        self.send_response(status)
        if status not in (204, 304):
            self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class Origin(_ThreadedServer[OriginRequest]):
    """Keep-alive HTTP/1.1 origin (optionally TLS) that records every request it receives.

    Routes: ``GET /hello`` -> "hello"; ``GET /bytes/N`` -> ``pattern_bytes(N)`` with
    Content-Length; ``/chunked/N`` the same chunked; ``/close/N`` the same delimited by closing the
    connection; ``GET /headers`` -> JSON list of [name, value]; ``POST|PUT /echo`` -> JSON
    ``{"length", "sha256", "chunked", "method"}``; ``/status/CODE`` -> empty response;
    ``/slow/MS`` -> "slow" after MS milliseconds.
    """

    handler = _OriginHandler

    def wait_for_request(self, path: str, timeout: float = 5.0) -> bool:
        """True once a request for `path` has arrived (a test can then act while it runs)."""
        deadline = time.monotonic() + timeout
        while path not in [r.path for r in self.requests] and time.monotonic() < deadline:
            time.sleep(0.02)
        return path in [r.path for r in self.requests]

    def __init__(self, tls: bool = False) -> None:
        super().__init__()
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._tmp: Path | None = None

    def _prepare(self) -> None:
        if self.tls:
            self._tmp = Path(tempfile.mkdtemp(prefix="origin-tls-"))
            self.cert_path, self.key_path = make_self_signed_cert(self._tmp)

    def _configure(self, httpd: _TrackingServer) -> None:
        if self.tls:
            assert self.cert_path is not None and self.key_path is not None
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_path, self.key_path)
            ctx.set_alpn_protocols(["http/1.1"])
            httpd.ssl_context = ctx

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed cert for localhost/127.0.0.1 usable as its own CA (``--cacert``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --------------------------------------------------------------------------- git


class _GitHandler(_Handler):
    """Runs ``git http-backend`` as a CGI per request and relays its answer."""

    server: _TrackingServer

    def _dispatch(self) -> None:
        owner: GitServer = self.server.owner
        body, chunked = self.read_body()  # chunked is decoded here; CONTENT_LENGTH is exact
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(owner.root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": str(owner.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": "tests.servers.GitServer",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(owner.port),
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        for k, v in self.headers.items():
            key = "HTTP_" + k.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING"):
                env[key] = v
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60
        )
        out = proc.stdout
        sep = min((i for i in (out.find(b"\r\n\r\n"), out.find(b"\n\n")) if i >= 0), default=-1)
        if proc.returncode != 0 and sep < 0:
            logger.debug("git http-backend failed: %s", proc.stderr.decode(errors="replace"))
            self.send_bytes(500, proc.stderr or b"git http-backend failed\n")
            owner._record(GitRequest(self.command, self.path, 500, len(body), chunked))
            return
        if sep < 0:
            head, payload = out.decode("latin-1"), b""
        else:
            head = out[:sep].decode("latin-1")
            payload = out[sep + (4 if out[sep : sep + 4] == b"\r\n\r\n" else 2) :]
        status, headers = 200, {}
        for line in head.splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers[name.strip()] = value.strip()
        content_type = headers.pop("Content-Type", "application/octet-stream")
        owner._record(GitRequest(self.command, self.path, status, len(body), chunked))
        self.send_bytes(status, payload, content_type, headers)

    do_GET = do_POST = do_HEAD = _dispatch


class GitRequest(NamedTuple):
    """One smart-HTTP request, its request body as received and http-backend's status."""

    method: str
    path: str
    status: int
    body_length: int
    chunked: bool


class GitServer(_ThreadedServer[GitRequest]):
    """Smart-HTTP git server for one bare repository ``repo.git`` with two commits.

    Clone and (anonymous) push work; a push of a pack over 1 MB makes git send a chunked POST.

    ``url`` is the clone URL; ``head_commit`` the commit a clone must check out, ``files`` the
    expected work-tree content.
    """

    handler = _GitHandler
    files: ClassVar[dict[str, str]] = {
        "README.md": "# ntlm test repo\n\nServed by tests.servers.GitServer.\n",
        "hello.txt": "hello from the test repository\n",
    }

    def __init__(self) -> None:
        super().__init__()
        self.root = Path()
        self.head_commit = ""
        self._tmp: Path | None = None

    @property
    def url(self) -> str:
        """Clone URL of the repository."""
        return f"{self.base_url}/repo.git"

    def _prepare(self) -> None:
        """Create the bare repository with two commits on ``main``."""
        self._tmp = Path(tempfile.mkdtemp(prefix="gitserver-"))
        self.root = self._tmp / "srv"
        work = self._tmp / "work"
        env = client_env(home=self._tmp) | {
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        }

        def git(*args: str, cwd: Path | None = None) -> str:
            proc = subprocess.run(
                ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
            )
            if proc.returncode != 0:
                raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr}")
            return proc.stdout.strip()

        self.root.mkdir()
        git("init", "-q", "--bare", "-b", "main", str(self.root / "repo.git"))
        git("init", "-q", "-b", "main", str(work))
        (work / "README.md").write_text(self.files["README.md"])
        git("add", "README.md", cwd=work)
        git("commit", "-q", "-m", "first commit", cwd=work)
        (work / "hello.txt").write_text(self.files["hello.txt"])
        git("add", "hello.txt", cwd=work)
        git("commit", "-q", "-m", "second commit", cwd=work)
        git("push", "-q", str(self.root / "repo.git"), "main", cwd=work)
        self.head_commit = git("rev-parse", "HEAD", cwd=work)
        git("config", "http.receivepack", "true", cwd=self.root / "repo.git")  # allow push
        shutil.rmtree(work)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# --------------------------------------------------------------------------- package index


class _IndexHandler(_Handler):
    """PEP 503 pages and the wheel file."""

    server: _TrackingServer

    def _dispatch(self) -> None:
        owner: PackageIndex = self.server.owner
        self.read_body()
        owner._record(self.path)
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        wheel = owner.wheel_path
        if path in ("/simple", "/simple/"):
            html = f'<!DOCTYPE html><html><body><a href="/simple/{owner.project}/">'
            html += f"{owner.project}</a></body></html>\n"
            self.send_bytes(200, html.encode(), "text/html")
        elif path.rstrip("/") == f"/simple/{owner.project}":
            href = f"/packages/{wheel.name}#sha256={owner.wheel_sha256}"
            html = f'<!DOCTYPE html><html><body><a href="{href}">{wheel.name}</a></body></html>\n'
            self.send_bytes(200, html.encode(), "text/html")
        elif path == f"/packages/{wheel.name}":
            self.send_bytes(200, wheel.read_bytes(), "application/octet-stream")
        else:
            self.send_bytes(404, b"not found\n")

    do_GET = do_HEAD = _dispatch


class PackageIndex(_ThreadedServer[str]):
    """PEP 503 simple index with one pure-Python wheel (``ntlmdemo`` 1.0) it builds itself.

    ``url`` is the ``--index-url`` (``.../simple/``).
    """

    handler = _IndexHandler
    project = "ntlmdemo"
    version = "1.0"

    def __init__(self) -> None:
        super().__init__()
        self.wheel_path = Path()
        self.wheel_sha256 = ""
        self._tmp: Path | None = None

    @property
    def url(self) -> str:
        """The index URL for ``pip --index-url``."""
        return f"{self.base_url}/simple/"

    def _prepare(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="pkgindex-"))
        self.wheel_path = build_wheel(self._tmp, self.project, self.version)
        self.wheel_sha256 = hashlib.sha256(self.wheel_path.read_bytes()).hexdigest()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def build_wheel(directory: Path, project: str, version: str) -> Path:
    """Build a valid pure-Python wheel (METADATA, WHEEL, RECORD with hashes) with zipfile."""
    dist_info = f"{project}-{version}.dist-info"
    files = {
        f"{project}/__init__.py": f'"""Demo package from the mitmproxy-ntlm tests."""\n\n'
        f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n"
            "Summary: Tiny package served by the mitmproxy-ntlm test index\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: mitmproxy-ntlm-tests\n"
            "Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text)
    return path


# --------------------------------------------------------------------------- squid


class Squid:
    """Debian's squid in the foreground on 127.0.0.1, as a real NTLM (or open) parent.

    ``mode="ntlm_fake"``: NTLM via ``ntlm_fake_auth`` (real handshakes, any password accepted).
    ``mode="none"``: no authentication. CONNECT is allowed to every port, nothing is cached,
    only loopback clients are served. Runs as user ``proxy`` when started as root.
    """

    MODES = ("ntlm_fake", "none", "custom")

    def __init__(
        self,
        mode: str = "ntlm_fake",
        *,
        children: int = 10,
        extra_config: str = "",
        binary: str = "squid",
        helper: str = "/usr/lib/squid/ntlm_fake_auth",
        auth_lines: list[str] | None = None,
        environment: dict[str, str] | None = None,
        open_domains: tuple[str, ...] = (),
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        self.mode = mode
        self.children = children
        self.extra_config = extra_config
        self.binary = binary
        self.helper = helper
        self.auth_lines = auth_lines or []  # mode "custom": the auth_param lines
        self.environment = environment or {}  # for the helpers (e.g. KRB5_CONFIG)
        # Hosts served without a logon (an `http_access allow` by dstdomain before the rule
        # that asks for one, as corporate parents have for update and intranet sites).
        self.open_domains = open_domains
        self.port = 0
        self.dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Proxy URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log_path(self) -> Path:
        """Squid's access log (native format: ``... TCP_DENIED/407 ... METHOD URL USER ...``)."""
        return self.dir / "access.log"

    @property
    def cache_log_path(self) -> Path:
        """Squid's diagnostic log, useful when a test fails."""
        return self.dir / "cache.log"

    def access_log(self) -> list[str]:
        """Lines of the access log so far (squid writes each line when a transaction ends)."""
        try:
            return self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for_log(self, text: str, timeout: float = 5.0, since: int = 0, count: int = 1) -> bool:
        """True once `count` access log lines after the first `since` contain `text`.

        Squid writes a line when a transaction ends, a moment after the client has its answer.
        """
        def seen() -> bool:
            return sum(text in line for line in self.access_log()[since:]) >= count

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not seen():
            time.sleep(0.05)
        return seen()

    def cache_log(self) -> list[str]:
        """Lines of cache.log so far."""
        try:
            return self.cache_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def _config(self) -> str:
        """squid.conf for this instance: everything in our temp dir, no default ports."""
        d = self.dir
        lines = [
            f"http_port 127.0.0.1:{self.port}",
            "visible_hostname localhost",
            f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log",
            f"access_log stdio:{d}/access.log",
            "cache_store_log none",
            f"coredump_dir {d}",
            "netdb_filename none",
            "cache deny all",
            "cache_mem 8 MB",
            "pinger_enable off",
            "shutdown_lifetime 0 seconds",
            "max_filedescriptors 4096",
            "dns_timeout 5 seconds",
            "acl loopback src 127.0.0.0/8 ::1",
            "http_access deny !loopback",
        ]
        if self.open_domains:  # -n: match the URL's host as written, no reverse lookup
            lines += [f"acl open_domains dstdomain -n {' '.join(self.open_domains)}",
                      "http_access allow open_domains"]
        if self.mode == "ntlm_fake":
            lines += [
                f"auth_param ntlm program {self.helper}",
                f"auth_param ntlm children {self.children} startup=0 idle=1",
                "auth_param ntlm keep_alive on",
                "acl auth proxy_auth REQUIRED",
                "http_access allow auth",
            ]
        elif self.mode == "custom":
            lines += [*self.auth_lines, "acl auth proxy_auth REQUIRED", "http_access allow auth"]
        else:
            lines.append("http_access allow loopback")
        lines.append("http_access deny all")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Write the config, start ``squid -N`` and wait until it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("Squid already started")
        if shutil.which(self.binary) is None and not Path(self.binary).exists():
            raise RuntimeError(f"{self.binary} not found")
        self.dir = Path(tempfile.mkdtemp(prefix="squid-test-"))
        if os.geteuid() == 0:  # squid drops to 'proxy' and must write logs and pid there
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam("proxy")
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        last_error: Exception | None = None
        for _attempt in range(3):
            self.port = free_port()
            conf = self.dir / "squid.conf"
            conf.write_text(self._config())
            check = subprocess.run(
                [self.binary, "-k", "parse", "-f", str(conf)], capture_output=True, timeout=30
            )
            if check.returncode != 0:
                raise RuntimeError(f"squid config rejected: {check.stderr.decode()[-2000:]}")
            with open(self.dir / "stderr.log", "wb") as err:
                self._proc = subprocess.Popen(
                    [self.binary, "-N", "-f", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env={**os.environ, **self.environment},
                    start_new_session=True,  # Ctrl-C in a terminal must not hit squid mid-test
                )
            try:
                self._wait_ready(20)
                return self
            except (RuntimeError, TimeoutError) as e:
                last_error = e
                self._kill()
                if "Address already in use" not in "\n".join(self.cache_log()):
                    break
        self._cleanup_dir()
        raise RuntimeError(f"squid did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> None:
        """Wait for cache.log to report the listening port.

        Probing with a TCP connect would work too, but leaves an ``error:transaction-end-before-
        headers`` line in access.log that tests reading the log would have to skip.
        """
        assert self._proc is not None
        marker = f"local=127.0.0.1:{self.port} "
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"squid exited: {' | '.join(self.cache_log()[-5:])}")
            if any(marker in line for line in self.cache_log()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"squid not listening after {timeout}s")

    def stop(self, graceful: bool = False) -> None:
        """Kill squid and its auth helpers at once, then remove the temp dir.

        A graceful SIGTERM shutdown takes squid 2-3 s (``graceful=True``). Either way helpers
        are left to PID 1 to reap (squid starts them in their own sessions and does not wait
        for them), so short-lived zombie ``ntlm_fake_auth`` entries can show up in ``ps``.
        """
        if self._proc is None:
            return
        self._kill(graceful)
        self._cleanup_dir()

    def _helper_pids(self) -> list[int]:
        """Direct children of squid (its helpers), read from /proc before squid dies."""
        if self._proc is None:
            return []
        pids: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self._proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def _kill(self, graceful: bool = False) -> None:
        helpers = self._helper_pids()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None and graceful:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if proc.poll() is None:
            # Helpers first: while squid lives they are its unreaped children, so their pids
            # cannot have been reused by an unrelated process.
            for pid in helpers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def _cleanup_dir(self) -> None:
        if os.environ.get("KEEP_SQUID_LOGS"):
            logger.warning("squid logs kept in %s", self.dir)
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- NTLM origin


class _NtlmOriginHandler(_OriginHandler):
    """The origin's routes behind IIS-style connection authentication (401 NTLM/Negotiate)."""

    ctx: Any = None
    user: str | None = None

    def _challenge(self, scheme: str | None = None, token: bytes | None = None) -> None:
        owner: NtlmOrigin = self.server.owner  # type: ignore[assignment]
        offer = f"{scheme} {base64.b64encode(token).decode()}" if token else ", ".join(owner.offers)
        self.send_bytes(401, b"logon required\n", headers={"WWW-Authenticate": offer})

    def _dispatch(self) -> None:
        owner: NtlmOrigin = self.server.owner  # type: ignore[assignment]
        if "Authorization" in self.headers:
            owner.count("authorization_headers")
        if self.user is None:
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() not in {o.lower() for o in owner.offers} or not token.strip():
                self.read_body()
                return self._challenge()
            try:
                self.ctx, out = owner.step(self.ctx, base64.b64decode(token), scheme)
            except Exception:
                self.ctx = None
                owner.count("rejected")
                self.read_body()
                return self._challenge()
            if not self.ctx.complete:
                self.read_body()
                return self._challenge(scheme, out)
            self.user = self.ctx.client_principal
            owner.count("accepted")
        owner.logons.append((self.user or "", self.command, self.path))
        return super()._dispatch()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class NtlmOrigin(Origin):
    """An intranet server (think IIS/SharePoint) that checks passwords with pyspnego's acceptor.

    Each connection must authenticate (NTLM, or NTLM inside Negotiate) before any request is
    served; `logons` records (user, method, path) of every request served.
    """

    handler = _NtlmOriginHandler

    def __init__(self, users: dict[str, str], tls: bool = False,
                 offers: tuple[str, ...] = ("NTLM",)) -> None:
        super().__init__(tls=tls)
        self.users = users
        self.offers = offers
        self.logons: list[tuple[str, str, str]] = []
        self.counts = {"accepted": 0, "rejected": 0, "authorization_headers": 0}
        self._user_file = ""

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _prepare(self) -> None:
        super()._prepare()
        fd, self._user_file = tempfile.mkstemp(prefix="ntlm-origin-users-")
        with os.fdopen(fd, "w") as f:
            for name, password in self.users.items():
                domain, _, user = name.partition("\\")
                f.write(f"{domain}:{user}:{password}\n")

    def step(self, ctx: Any, token: bytes, scheme: str) -> tuple[Any, bytes | None]:
        """One acceptor step, with pyspnego's user table pointing at this server's users."""
        import spnego

        from mitmproxy_ntlm.testing import parent as testparent

        with testparent._ENV_LOCK:
            os.environ["NTLM_USER_FILE"] = self._user_file
            if ctx is None:
                protocol = "negotiate" if scheme.lower() == "negotiate" else "ntlm"
                ctx = spnego.server(hostname="intranet", service="http", protocol=protocol)
            return ctx, ctx.step(token)

    def _cleanup(self) -> None:
        super()._cleanup()
        if self._user_file:
            with contextlib.suppress(OSError):
                os.unlink(self._user_file)
