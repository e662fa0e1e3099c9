"""mitmweb in a real headless Chromium: what a person debugging a logon sees (issue 21).

Each test starts mitmweb with the addon, sends real requests with curl, and reads the page the
way a person would: the flow list's rows (status, mark, comment column), the Comment tab, the
Response tab's decoded view. Screenshots go to $NTLM_WEB_ARTIFACTS (default tests/artifacts/).
Debian's chromium is driven by Playwright without any browser download.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.constants import TEST_DOMAIN, TEST_PASSWORD, TEST_USER
from tests.mitm import ROOT, Mitmdump, curl
from tests.servers import free_port
from tests.web import MitmwebApi

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium to drive (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("NTLM_WEB_ARTIFACTS") or ROOT / "tests" / "artifacts")
PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY, RECYCLE, WARNING = "\N{KEY}", "\N{BLACK UNIVERSAL RECYCLING SYMBOL}", "\N{WARNING SIGN}"




@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's chromium, headless, with a fresh profile; closed after the module."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1600, "height": 520})
        yield context
        context.close()


class WebPage:
    """One mitmweb tab: its flow list rows and the selected flow's tabs."""

    def __init__(self, browser: Any, m: Mitmdump, port: int) -> None:
        self.url = MitmwebApi(m, port).page_url
        self.page = browser.new_page()
        self.page.goto(self.url)
        self.page.wait_for_selector(".main-view")

    def rows(self) -> list[dict[str, str]]:
        """Every row of the flow list, top to bottom, as the page shows it."""
        return self.page.eval_on_selector_all(".flow-table tbody tr.has-request", """rows =>
            rows.map(r => ({
                path: [...(r.querySelector('.col-path')?.childNodes ?? [])]
                    .filter(n => n.nodeType === Node.TEXT_NODE)
                    .map(n => n.textContent).join('').trim(),
                method: r.querySelector('.col-method')?.innerText.trim() ?? '',
                status: r.querySelector('.col-status')?.innerText.trim() ?? '',
                comment: r.querySelector('.col-comment')?.innerText.trim() ?? '',
                mark: (r.querySelector('.marker')?.innerText ?? '').replace(/\uFE0F/g, '').trim(),
            }))""")

    def wait_rows(self, ready: Callable[[list[dict[str, str]]], bool],
                  timeout: float = 15) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if ready(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def open(self, index: int, tab: str) -> str:
        """Select the flow in row `index`, open its `tab` (Request, Response, Comment...), and
        return the detail pane's text."""
        self.page.locator(".flow-table tbody tr.has-request").nth(index).click()
        self.page.locator(".flow-detail nav a", has_text=tab).click()
        self.page.wait_for_timeout(300)
        return self.page.inner_text(".flow-detail")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def web(browser: Any, tmp_path: Path) -> Iterator[Callable[..., tuple[Mitmdump, WebPage]]]:
    """Factory: mitmweb with the addon (legs shown) and a browser tab on it."""
    started: list[tuple[Mitmdump, WebPage]] = []

    def start(parent_url: str, password: str, *args: str,
              **options: Any) -> tuple[Mitmdump, WebPage]:
        port = free_port()
        m = Mitmdump(parent_url, {"ntlm_username": TEST_USER, "ntlm_domain": TEST_DOMAIN,
                                  "ntlm_password_env": "PW", "web_port": port,
                                  "ntlm_show_legs": True, **options}, *args,
                     confdir=tmp_path, tool="mitmweb", env={"PW": password}).start()
        page = WebPage(browser, m, port)
        started.append((m, page))
        return m, page

    yield start
    for m, page in started:
        page.close()
        m.stop()


def _stories(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r["comment"] and not r["comment"].startswith("NTLM leg")]


def test_good_password_reads_407_200_200_with_marks_comments_and_the_decoded_view(
        web, parent, origin) -> None:
    m, page = web(parent.url, TEST_PASSWORD)
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    # Top to bottom as in Fiddler: Type 1 -> 407 + Type 2, Type 3 -> 200, then the request.
    # The legs arrive after their flow is listed; the list is then reloaded (a reset message),
    # so the order may take a moment to settle.
    rows = page.wait_rows(lambda rows: len(_stories(rows)) == 1
                          and [r["status"] for r in rows] == ["407", "200", "200"])
    assert [r["status"] for r in rows] == ["407", "200", "200"], rows
    leg = f"for GET {origin.url}/hello (flow "
    assert rows[0]["comment"].startswith(f"NTLM leg 1 of 2 {leg}"), rows
    assert rows[1]["comment"].startswith(f"NTLM leg 2 of 2 {leg}"), rows
    assert rows[2]["comment"].startswith(f"NTLMv2 as {PRINCIPAL} via 127.0.0.1:"), rows
    assert "Type 1 -> 407 Type 2 challenge from 127.0.0.1:" in rows[0]["comment"]
    assert f"Type 3 as {PRINCIPAL} (NTLMv2, responses not shown) -> 200" in rows[1]["comment"]
    assert rows[2]["mark"] == KEY and rows[0]["mark"] == rows[1]["mark"] == ""
    assert "handshake requests listed above it" in rows[2]["comment"]
    page.shot("good-password-list")
    comment = page.open(2, "Comment")
    assert re.search(rf"NTLMv2 as {re.escape(PRINCIPAL)} via 127\.0\.0\.1:\d+, 3 legs", comment)
    # The 407 leg: the parent's page, and the challenge decoded (H21a's content view).
    response = page.open(0, "Response")
    assert "Proxy-Authenticate" in response and "NTLM TlRMTVNT" in response
    assert "NTLM Type 2 (Challenge)" in response and "NetBIOS computer" in response, response
    page.shot("good-password-leg1-decoded")
    # A new client connection gets the pooled parent connection: marked as reused.
    assert curl("-x", m.url, f"{origin.url}/hello").stdout == "hello"
    rows = page.wait_rows(lambda rows: len(_stories(rows)) == 2)
    assert rows[-1]["mark"] == RECYCLE and "reused pooled connection" in rows[-1]["comment"], rows


def test_wrong_password_and_failed_tunnels_show_the_parents_answer_and_why(
        web, parent, origin, tls_origin) -> None:
    m, page = web(parent.url, "not-the-password", "--ignore-hosts", r"^localhost:",
                  ntlm_max_failures=10)
    assert "rejected the NTLM credentials" in curl("-x", m.url, f"{origin.url}/hello").stdout
    tls_port = tls_origin.url.rsplit(":", 1)[1]
    curl("-k", "-x", m.url, f"https://127.0.0.1:{tls_port}/hello")  # intercepted
    curl("-k", "-x", m.url, f"https://localhost:{tls_port}/hello")  # passed through
    def settled(rows: list[dict[str, str]]) -> bool:  # both tunnels listed, legs above the GET
        stories = _stories(rows)
        get = [i for i, r in enumerate(rows) if r in stories and r["method"] == "GET"]
        legs = [i for i, r in enumerate(rows)
                if r["comment"].startswith("NTLM leg ") and " for GET " in r["comment"]]
        return sum(r["method"] == "CONNECT" for r in stories) == 2 and bool(get) \
            and bool(legs) and max(legs) < get[0]

    rows = page.wait_rows(settled)
    stories = _stories(rows)
    get = next((r for r in stories if r["path"] == f"{origin.url}/hello"), None)
    assert get is not None, rows
    assert get["mark"] == WARNING, rows
    assert get["comment"].startswith(f"parent 127.0.0.1:{parent.port} rejected credentials "
                                     f"for {PRINCIPAL}"), rows
    legs = [r for r in rows if r["comment"].startswith("NTLM leg ") and
            f"GET {origin.url}/hello" in r["comment"]]
    assert [r["status"] for r in legs] == ["407", "407"], rows
    assert rows.index(legs[-1]) < rows.index(get)
    # Both CONNECTs: the parent's 407, not the 200 mitmproxy had told the client.
    connects = [r for r in stories if r["method"] == "CONNECT"]
    assert [r["status"] for r in connects] == ["407", "407"], rows
    for r in connects:
        assert r["mark"] == WARNING
        assert "the client had been told 200 Connection established before the handshake" \
            in r["comment"], r
    page.shot("wrong-password-list")
    detail = page.open(rows.index(get), "Comment")
    assert f"rejected credentials for {PRINCIPAL}" in detail
    page.shot("wrong-password-comment")
    connect = rows.index(connects[-1])
    response = page.open(connect, "Response")
    assert "407\xa0Proxy Authentication Required" in response or \
        "407 Proxy Authentication Required" in response, response
    page.shot("wrong-password-connect-response")


def test_intercepted_connect_with_good_password_lists_the_tunnel_and_its_legs(
        web, parent, tls_origin) -> None:
    m, page = web(parent.url, TEST_PASSWORD, ssl_insecure=True)  # the origin's own cert
    assert curl("-k", "-x", m.url, f"{tls_origin.url}/hello").stdout == "hello"
    expected = [("CONNECT", "407"), ("CONNECT", "200"), ("CONNECT", "200"), ("GET", "200")]
    rows = page.wait_rows(lambda rows: len(_stories(rows)) == 2 and
                          [(r["method"], r["status"]) for r in rows] == expected)
    assert [(r["method"], r["status"]) for r in rows] == expected, rows
    assert rows[2]["mark"] == KEY and rows[3]["mark"] == ""
    assert rows[2]["comment"].startswith(f"NTLMv2 as {PRINCIPAL} via 127.0.0.1:")
    assert "this connection was authenticated for an earlier request" in rows[3]["comment"]
    page.shot("intercepted-connect-list")
