"""The "NTLM/Negotiate" content view in mitmweb and the console, on mitmproxy 11 and 12.

mitmproxy's extension point for showing decoded data is the content view, and its API changed
in mitmproxy 12: 11 has `contentviews.View` (called with keyword metadata, returning lines of
(style, text)) with `add`/`remove`; 12 has the `Contentview` protocol (`prettify(data, metadata)`
returning text, `metadata.http_message`) and a registry without a public way to remove a view.
This module is the one place that knows both. The text itself comes from `authview.render`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mitmproxy import contentviews

from . import authview, mitmproxy_internals

NAME = "NTLM/Negotiate"

if hasattr(contentviews, "Contentview"):  # mitmproxy 12 and later

    class AuthTokenView(contentviews.Contentview):
        name = NAME  # type: ignore[assignment]  # the protocol's default is derived from the class
        syntax_highlight = "none"  # type: ignore[assignment]

        def prettify(self, data: bytes, metadata: Any) -> str:
            return "\n".join(authview.render(metadata.http_message, metadata.flow, data))

        def render_priority(self, data: bytes, metadata: Any) -> float:
            return authview.priority(metadata.http_message, data)

    def _add(view: Any) -> None:
        contentviews.add(view)

    def _remove(view: Any) -> None:
        mitmproxy_internals.unregister_contentview(contentviews.registry, NAME.lower(), view)

else:  # mitmproxy 11

    class AuthTokenView(contentviews.View):  # type: ignore[no-redef]
        name = NAME

        def __call__(self, data: bytes, *, http_message: Any = None, flow: Any = None,
                     **metadata: Any) -> tuple[str, Iterator[list[tuple[str, str]]]]:
            lines = authview.render(http_message, flow, data)
            return NAME, iter([[("text", line)] for line in lines])

        def render_priority(self, data: bytes, *, http_message: Any = None,
                            **metadata: Any) -> float:
            return authview.priority(http_message, data)

    def _add(view: Any) -> None:
        stale = contentviews.get(NAME)  # left by a script instance that was not unloaded
        if stale is not None:
            contentviews.remove(stale)
        contentviews.add(view)

    def _remove(view: Any) -> None:
        if view in contentviews.views:
            contentviews.remove(view)


class TokenViewAddon:
    """Adds the view when the script loads and removes it in `done`, so a reload leaves one."""

    def __init__(self) -> None:
        self.view: Any = None

    def load(self, loader: Any) -> None:
        self.view = AuthTokenView()
        _add(self.view)

    def done(self) -> None:
        if self.view is not None:
            _remove(self.view)
            self.view = None
