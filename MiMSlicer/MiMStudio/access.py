"""Who may connect, and which paths a client may name.

* :class:`AccessGuard` is a wslink link protocol: wslink asks it to validate the token
  of every new connection (the ``secret`` a page sends, from its URL's ``?secret=``).
  It accepts the configured token only (compared in constant time), and one page at a
  time: the Slicer scene, its views and its jobs belong to that page, so a second
  user's jobs never show in the first user's page (a second page is refused while the
  first is open; each user runs their own server, see the README).
* :func:`page_guard` refuses the page itself, with a page saying why: HTTP 403 when a
  token is required and the address lacks it, 409 while another page holds the session
  (that page retries by itself). The websocket check above is the lock, this is the
  sign on the door.
* :func:`confine` resolves a path a client sent and refuses anything outside the
  allowed folders (``..``, absolute paths elsewhere, symbolic links leading out).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from wslink.websocket import LinkProtocol

from MiMSlicerLib.errors import MiMSlicerError
from MiMStudio.config import PUBLIC_SECRET

log = logging.getLogger("MiMStudio")


def confine(path: str | os.PathLike, roots: Iterable[Path], what: str = "file") -> Path:
    """``path`` resolved (links followed) if it lies inside one of ``roots``; else MiMSlicerError.
    A relative path is taken relative to the first root."""
    roots = [Path(r).resolve() for r in roots]
    text = str(path).strip()
    if not text or "\x00" in text:
        raise MiMSlicerError(f"No {what} given.")
    if not roots:
        raise MiMSlicerError(f"No folder is configured for a {what}; start MiM Studio with --data-dir.")
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise MiMSlicerError(f"Refused: the {what} '{text}' is outside the folders this server shares. "
                         "Choose one from the list.")


class AccessGuard(LinkProtocol):
    """Token check and one-page-at-a-time policy for every connection (see the module doc)."""

    def __init__(self, token: str | None):
        super().__init__()
        self.token = token
        self.client_id = None  # the page that holds the session
        self.refused: list[str] = []  # why connections were refused (for the log and tests)

    async def validateToken(self, token, client_id):  # noqa: N802 (wslink's name)
        expected = self.token if self.token is not None else PUBLIC_SECRET
        if not isinstance(token, str) or not _same(token, expected):
            self._refuse("wrong or missing access token")
            return False
        if self.client_id is not None and self.client_id != client_id:
            self._refuse("another page holds this MiM Studio session")
            return False
        self.client_id = client_id
        return True

    def onClose(self, client_id):  # noqa: N802 (wslink's name)
        if client_id == self.client_id:
            self.client_id = None

    def _refuse(self, why: str) -> None:
        self.refused.append(why)
        print(f"MiM Studio: refused a connection: {why}", flush=True)


REFUSED_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MiM Studio: access token needed</title></head>
<body style="font-family: sans-serif; background: #222; color: #eee; padding: 3em">
<h2>MiM Studio: this address needs its access token</h2>
<p>The server was started with an access token. Open the full address it printed at start
(it ends with <code>?secret=...</code>), or ask the person who started it.</p></body></html>"""


BUSY_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>MiM Studio: in use</title></head>
<body style="font-family: sans-serif; background: #222; color: #eee; padding: 3em">
<h2>MiM Studio is open in another page</h2>
<p>One MiM Studio server serves one page at a time: its scene, views and jobs belong to that
page. Close the other page (or tab) and this one connects by itself (it retries every 10
seconds), or start your own server: <code>make studio</code> (or <code>python -m MiMStudio
--port PORT</code>) and open the address it prints.</p></body></html>"""

TOKEN_COOKIE = "mimstudio_token"  # this browser was let in: a reload (the address no longer has it) is too
BUSY_WAIT_S = 3.0  # a reload closes the old page's connection just after it asks for the new page


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def page_guard(token: str | None, guard: AccessGuard | None = None):
    """aiohttp middleware: the page (``/``, ``/index.html``) only with ``?secret=<token>`` (or, for
    a reload, the token cookie the page got: redirected to the address with the token, which the
    page removes again once connected), and only while no other page holds the session
    (``guard``); else a page saying why (403 / 409)."""

    @web.middleware
    async def guard_page(request, handler):
        if request.path in ("/", "/index.html"):
            if token is not None and not _same(request.query.get("secret", ""), token):
                if _same(request.cookies.get(TOKEN_COOKIE, ""), token):
                    # a reload: the page removed the token from its address once it had connected,
                    # and it connects with the token of its address
                    raise web.HTTPFound(f"{request.path}?secret={quote(token, safe='')}")
                print("MiM Studio: refused the page: wrong or missing access token", flush=True)
                return web.Response(status=403, text=REFUSED_PAGE, content_type="text/html")
            if guard is not None and guard.client_id is not None:
                for _ in range(int(BUSY_WAIT_S / 0.1)):
                    await asyncio.sleep(0.1)
                    if guard.client_id is None:
                        break
                else:
                    print("MiM Studio: refused the page: another page holds this MiM Studio session", flush=True)
                    return web.Response(status=409, text=BUSY_PAGE, content_type="text/html")
            response = await handler(request)
            if token is not None:
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
            return response
        return await handler(request)

    return guard_page
