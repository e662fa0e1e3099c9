"""mitmweb's own HTTP API for tests: flows, the flow dump, commands and options.

mitmweb 12 wants the token it prints at start on every request, and both lines check writes
by double submit (the same XSRF value as cookie and header; the cookie's name changed in 12).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import httpx

from tests.mitm import Mitmdump


class MitmwebApi:
    """The API of a started mitmweb whose web server listens on `port`."""

    def __init__(self, m: Mitmdump, port: int) -> None:
        assert m.wait_for("Web server listening")
        token = re.search(r"token=([\w-]+)", m.output)
        self.base = f"http://127.0.0.1:{port}"
        # the UI's address for a browser (mitmweb 12 prints a token; 11 has none)
        self.page_url = f"{self.base}/" + (f"?token={token.group(1)}" if token else "")
        self.xsrf = secrets.token_hex(16)
        self.client = httpx.Client(
            params={"token": token.group(1)} if token else {},
            cookies={"_xsrf": self.xsrf, "_mitmproxy_xsrf": self.xsrf},
            headers={"X-XSRFToken": self.xsrf}, timeout=10)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(self.base + path)

    def flows(self) -> list[dict]:
        return self.get("/flows").json()

    def dump(self) -> bytes:
        return self.get("/flows/dump").content

    def command(self, name: str, *args: str) -> str:
        """A command's result, its lines joined (the addon's commands return lines)."""
        r = self.run(name, *args)
        assert r.status_code == 200, r.text
        value = r.json().get("value", r.json())
        return "\n".join(value) if isinstance(value, list) else str(value)

    def run(self, name: str, *args: str) -> httpx.Response:
        return self.client.post(f"{self.base}/commands/{name}", json={"arguments": list(args)})

    def options(self) -> dict[str, Any]:
        r = self.get("/options")
        assert r.status_code == 200, r.text[:200]
        return r.json()

    def set(self, **options: Any) -> httpx.Response:
        """Change options as mitmweb's options editor does (400 when refused)."""
        return self.client.put(self.base + "/options", json=options)
