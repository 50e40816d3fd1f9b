"""MiM Studio's safety rules, tried from a real browser against the live server: a wrong
token is refused, a second page cannot see the first one's session, a client naming a
path outside the shared folders is refused, an oversized upload gets a clear message
(and a small one loads)."""

from __future__ import annotations

from mimstudio_testing import MAX_UPLOAD_MB, screenshot, trigger


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.goto(url)
    return context, page


def _wslink_hello(base: str, secret: str) -> str:
    """Open the page's websocket as a client would and say hello with ``secret``: the
    ``clientID`` granted, or the server's error message."""
    import asyncio

    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    async def hello():
        async with aiohttp.ClientSession() as session, session.ws_connect(base.replace("http", "ws") + "ws") as ws:
            message = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": secret}]}
            for chunk in generate_chunks(msgpack.packb(message), 0):
                await ws.send_bytes(chunk)
            unchunker = UnChunker()
            while True:
                reply = unchunker.process_chunk((await ws.receive(timeout=10)).data)
                if reply is not None and reply.get("id") == "system:c0:0":
                    return reply.get("result", {}).get("clientID") or reply["error"]["message"]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        return pool.submit(asyncio.run, hello()).result(timeout=30)


def test_wrong_or_missing_token_is_refused(browser, studio, page):
    for url in (studio.base + "?secret=not-the-token", studio.base):
        context, other = _open(browser, url)
        try:
            assert "this address needs its access token" in other.inner_text("body")
            assert other.locator("#load-btn").count() == 0
            screenshot(other, "06_wrong_token_refused")
        finally:
            context.close()
    assert studio.log("refused the page: wrong or missing access token")


def test_a_second_page_does_not_get_the_first_pages_session(browser, studio, page):
    """One page per server: a second page, even with the token, gets no session (its jobs and
    scene would be the first user's)."""
    context, other = _open(browser, studio.url)
    try:
        assert "MiM Studio is open in another page" in other.inner_text("body")  # says why, and what to do
        assert "make studio" in other.inner_text("body")
        assert other.locator("#load-btn").count() == 0
        screenshot(other, "06b_second_page_refused")
    finally:
        context.close()
    # past the sign: a client speaking wslink itself (its own framing) gets no session either
    assert _wslink_hello(studio.base, studio.token) == "Authentication failed"
    assert studio.log("refused the page: another page holds this MiM Studio session")
    assert studio.log("refused a connection: another page holds this MiM Studio session")
    page.wait_for_selector("#load-btn")  # the first page still works
    # a reload of it is the same page, not a second one; its address lost the token once it connected
    assert "secret=" not in page.url
    page.reload()
    page.wait_for_selector("#load-btn", timeout=30_000)
    assert "secret=" not in page.url  # the page took the token out of its address again


def test_paths_outside_the_shared_folders_are_refused(page, studio_data):
    for value in ("data:../../../../etc/passwd", "data:/etc/passwd", "sample:../../../../../etc/hostname",
                  "upload:../../../etc/passwd", "/etc/passwd", "file:/etc/passwd"):
        trigger(page, "load_volume", value)
        page.wait_for_function("document.querySelector('#alert').innerText.startsWith('Refused')", timeout=10_000)
        assert "outside the folders" in page.inner_text("#alert") or "names no sample" in page.inner_text("#alert")
        trigger(page, "refresh")  # clears nothing, but keeps the page in sync
        page.evaluate("() => window.trame.state.set('alert_text', '')")
    trigger(page, "preview", "data:../../")
    page.wait_for_function("document.querySelector('#alert').innerText.length > 0", timeout=10_000)
    assert page.inner_text("#alert").startswith(("Refused", "Load a volume"))


def test_upload_size_limit_and_a_small_upload(page, tmp_path, studio_data):
    big = tmp_path / "big_ct.nii.gz"
    big.write_bytes(b"\0" * int((MAX_UPLOAD_MB + 0.5) * 1024 * 1024))
    page.set_input_files("#upload", str(big))
    page.wait_for_function("document.querySelector('#alert').innerText.includes('accepts uploads up to')",
                           timeout=10_000)
    message = page.inner_text("#alert")
    assert "'big_ct.nii.gz' is 1.5 MB" in message and "up to 1.0 MB" in message
    screenshot(page, "07_upload_too_large")

    page.set_input_files("#upload", str(studio_data.ct))  # 0.5 MB
    page.wait_for_function("document.querySelector('#alert').innerText.includes('Loaded ct_small')",
                           timeout=30_000)
    assert page.locator("#volume-select").input_value() == "Uploaded: ct_small.nii.gz"
