"""PAC files (as Px uses them): `FindProxyForURL(url, host)` decides the parent per request.

The JavaScript runs in pacparser (a maintained PAC engine with the standard helper functions:
`shExpMatch`, `isInNet`, `dnsResolve`, ...). The file is read at configuration and again
by `pac_watch` (on a schedule, on network changes); decisions are cached per scheme and host.
pacparser cannot be interrupted, so each new script is first test-evaluated in a child process
with a time limit (`check_pac`); a script that passed is trusted for the per-host lookups.
"""

from __future__ import annotations

import http.client
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass

from .bounded import bounded_set
from .parents import ServerSpec
from .userfile import FileRefused, read_regular_file

log = logging.getLogger("mitmproxy_ntlm")


PAC_MAX_BYTES = 8 * 1024 * 1024
PAC_CHECK_SECONDS = 3.0  # a test evaluation (start of a Python, parse, two lookups) takes ~0.1 s
# Run by `check_pac` in a child Python: the script comes on stdin, so nothing is interpolated.
_CHECK_PROGRAM = """
import sys, pacparser
pacparser.init()
pacparser.parse_pac_string(sys.stdin.read())
for url, host in (("http://example.com/", "example.com"), ("https://intranet/", "intranet")):
    try:
        pacparser.find_proxy(url, host)
    except Exception:
        pass  # answered (with an error): the proxy goes direct for such hosts
"""


class PacError(ValueError):
    pass


@dataclass(frozen=True)
class Found:
    """A PAC script and where it came from (for the log); `spoofable`: anyone on the LAN may
    have served it (WPAD), so it may only name the parents ntlm_pac_parents allows."""
    script: str
    source: str
    spoofable: bool = False


def load_pac(location: str, timeout: float = 10) -> str:
    """The PAC script from a file path or an http(s) URL (fetched without any proxy, at most
    PAC_MAX_BYTES)."""
    if location.startswith(("http://", "https://")):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(location, timeout=timeout) as response:
                data = read_within(response, PAC_MAX_BYTES + 1, time.monotonic() + timeout)
        except (OSError, http.client.HTTPException) as e:
            raise PacError(f"ntlm_pac: cannot fetch {location}: {e}") from None
        if len(data) > PAC_MAX_BYTES:
            raise PacError(f"ntlm_pac: {location} is larger than {PAC_MAX_BYTES} bytes")
        return data.decode("utf-8", "replace")
    try:
        data = read_regular_file(location, "ntlm_pac", limit=PAC_MAX_BYTES)
    except FileRefused as e:
        raise PacError(str(e)) from None
    return data.decode("utf-8", "replace")


def read_within(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    """At most `limit` bytes of the body, given up at `deadline` (monotonic): the socket
    timeout bounds each read only, and a server dripping a byte at a time would never end."""
    data = bytearray()
    while len(data) < limit:
        if time.monotonic() > deadline:
            raise TimeoutError("the server took too long to send the file")
        chunk = response.read1(min(64 * 1024, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def check_pac(script: str, timeout: float = PAC_CHECK_SECONDS) -> None:
    """Raise PacError unless the script parses and answers FindProxyForURL for sample URLs
    within `timeout` seconds, tried in a child process: pacparser cannot be interrupted, so a
    script that loops (`for(;;){}`) would otherwise hang the proxy for good."""
    try:
        # -P: nothing is imported from the working directory; no environment: the password
        # may be in it (ntlm_password_env)
        done = subprocess.run([sys.executable, "-P", "-c", _CHECK_PROGRAM],
                              input=script.encode(), capture_output=True, timeout=timeout,
                              check=False, env={"PATH": os.environ.get("PATH", "")})
    except subprocess.TimeoutExpired:
        raise PacError(f"ntlm_pac: the PAC script did not finish within {timeout:g} s "
                       f"(a loop?): refused") from None
    except OSError as e:
        raise PacError(f"ntlm_pac: cannot test the PAC script: {e}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1][:200] if lines else f"exit status {done.returncode}"
        raise PacError(f"ntlm_pac: the PAC script fails ({reason!r})")


def parse_result(result: str) -> list[ServerSpec | None]:
    """`PROXY a:1; PROXY b:2; DIRECT` -> [("http", ("a", 1)), ("http", ("b", 2)), None]."""
    choices: list[ServerSpec | None] = []
    for part in result.split(";"):
        words = part.split()
        if not words:
            continue
        kind = words[0].upper()
        if kind == "DIRECT":
            choices.append(None)
        elif kind in ("PROXY", "HTTP", "HTTPS") and len(words) == 2:
            host, _, port = words[1].rpartition(":")
            if not host or not port.isdigit():
                continue
            scheme = "https" if kind == "HTTPS" else "http"
            choices.append((scheme, (host.strip("[]"), int(port))))
        # SOCKS entries cannot carry NTLM: skipped.
    return choices


class PacResolver:
    """Evaluates one PAC script; pacparser holds one script per process."""

    def __init__(self, script: str, cache_size: int = 1024) -> None:
        import pacparser  # only here: the PAC engine's memory, for proxies that use PAC

        self._engine = pacparser
        pacparser.init()
        try:
            pacparser.parse_pac_string(script)
        except Exception as e:
            pacparser.cleanup()
            raise PacError(f"ntlm_pac: the PAC script does not parse ({e})") from None
        self.script = script
        self._cache: OrderedDict[tuple[str, str], list[ServerSpec | None]] = OrderedDict()
        self._cache_size = cache_size

    def choices(self, scheme: str, host: str, url: str) -> list[ServerSpec | None]:
        key = (scheme, host)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            result = self._engine.find_proxy(url, host)
        except Exception as e:
            log.warning("[ntlm] PAC FindProxyForURL failed for %s (%s): going direct", host, e)
            result = "DIRECT"
        choices = parse_result(result) or [None]
        log.debug("[ntlm] PAC %s -> %s", host, result)
        bounded_set(self._cache, key, choices, self._cache_size)
        return choices

    def close(self) -> None:
        self._engine.cleanup()
