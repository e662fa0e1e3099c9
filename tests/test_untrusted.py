"""Client-supplied text (user names, hosts, URLs) is escaped and bounded wherever it is
written out: log lines, flow comments, error pages."""

from __future__ import annotations

import base64
import http.client
import io
import logging

from mitmproxy.io import FlowReader

from mitmproxy_ntlm.untrusted import EscapedLogArguments, shown
from tests.constants import TEST_DOMAIN

FORGED = "[ntlm] forged line"
HOSTILE_USER = f"alice\r\n{FORGED}"


def test_shown_escapes_what_is_not_printable_and_bounds_the_length() -> None:
    assert shown("CORP\\alice") == "CORP\\alice"  # a domain user reads as typed
    assert shown(HOSTILE_USER) == "alice\\r\\n" + FORGED
    assert shown("a\x1b[2Jb\x00\u2028\udcff") == "a\\x1b[2Jb\\x00\\u2028\\udcff"
    long = shown("x" * 20_000, limit=100)
    assert long == "x" * 100 + "... (19900 more characters)"


def test_every_log_argument_is_escaped_numbers_stay_numbers() -> None:
    record = logging.LogRecord("mitmproxy_ntlm", logging.INFO, __file__, 1,
                               "[ntlm] %s authenticates as %s after %d tries (%.1f ms)",
                               ("127.0.0.1", HOSTILE_USER, 2, 1.25), None)
    assert EscapedLogArguments().filter(record)
    assert record.getMessage() == (f"[ntlm] 127.0.0.1 authenticates as alice\\r\\n{FORGED} "
                                   f"after 2 tries (1.2 ms)")
    bare = logging.LogRecord("mitmproxy_ntlm", logging.INFO, __file__, 1,
                             f"[ntlm] {HOSTILE_USER}", None, None)
    assert EscapedLogArguments().filter(bare) and "\n" not in bare.getMessage()


def test_a_forged_log_line_in_a_basic_user_name_stays_one_escaped_line(
        mitm, make_parent, origin, tmp_path):  # type: ignore[no-untyped-def]
    parent = make_parent(users={"CORP\\alice": "Alice-Pass-1"})
    flows_file = tmp_path / "flows"
    m = mitm(parent.url, {"ntlm_multiuser": True, "ntlm_domain": TEST_DOMAIN,
                          "save_stream_file": str(flows_file)})
    token = base64.b64encode(f"{HOSTILE_USER}:wrong".encode()).decode()
    host, port = m.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.request("GET", f"{origin.url}/hello", headers={"Proxy-Authorization": f"Basic {token}"})
    response = conn.getresponse()
    page = response.read().decode()
    conn.close()
    assert response.status == 407
    assert f"alice\\r\\n{FORGED}" in page and "\r" not in page and page.count("\n") == 1
    assert m.wait_for(f"alice\\r\\n{FORGED}")  # logged, escaped
    m.stop()
    assert not any(line.startswith(FORGED) for line in m.lines), m.output
    [flow] = FlowReader(io.BytesIO(flows_file.read_bytes())).stream()
    assert f"alice\\r\\n{FORGED}" in flow.comment and "\n" not in flow.comment
