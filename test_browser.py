"""Browser tests for the page (index.html), in a real Chromium driven by Playwright.

Each test is one rule a user can see. The server runs as a subprocess
(``python chat.py --port PORT --db TMP/chat.db --rate 0 --names_per_hour 0``) on a free port;
every browser context is a separate user (its own localStorage, so its own
token). Tests wait with Playwright's ``expect``/``wait_for``, never with sleeps.

Screenshots for the README (docs/desktop.png, docs/phone.png)::

    SCREENSHOTS=1 python -m pytest -q test_browser.py -k screenshots
    python test_browser.py --screenshots          # the same

Needs Debian's ``chromium`` (/usr/bin/chromium) and ``pip install playwright``;
without either the whole module is skipped with the reason.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect

HERE = pathlib.Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
START_TIMEOUT = 15.0   # seconds for the server to say it is listening
expect.set_options(timeout=10_000)


################ The server as a subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """chat.py on a free port with its own database; restart() keeps both."""

    def __init__(self, db: pathlib.Path) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "chat.py"), "--port", str(self.port), "--db", str(self.db), "--rate", "0", "--names_per_hour", "0"],
            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def drain(stream) -> None:
            # Keep reading so the server never blocks on a full pipe.
            for line in stream:
                self.log.append(line)
                if "listening on" in line:
                    ready.set()
            ready.set()  # the process ended: stop waiting

        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("chat.py did not start:\n" + "".join(self.log[-30:]))
        with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
            assert r.status == 200

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("chat") / "chat.db")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path):
    """A server for one test (restarts, clean screenshots)."""
    srv = Server(tmp_path / "chat.db")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield b
    b.close()
    pw.stop()


################ Helpers


def unique(prefix: str) -> str:
    """A user name or text no other test uses (names: at most 32 characters)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def open_chat(browser, srv, name, *, viewport=None, context=None, route=None, query=""):
    """A page signed in as `name`, connected. Pass `context` to be the same
    browser (same localStorage, so the same token) again."""
    ctx = context or browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
    page = ctx.new_page()
    errors: list = []
    page.on("pageerror", lambda e: errors.append(e))
    page.js_errors = errors
    if route:
        page.route_web_socket(re.compile(r"/ws\?"), route)
    page.goto(f"{srv.url}/?username={name}{query}")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(page.locator("#me-name")).to_have_text(name)
    return page


def say(page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def shown(page, text: str):
    """Message texts on screen that contain `text`."""
    return page.locator("#messages .msg .text").filter(has_text=text)


def person(page, name: str):
    return page.locator(f'#people-list li[data-user="{name.lower()}"] button')


def dm_row(page, name: str):
    return page.locator(f'#dm-list li[data-user="{name.lower()}"]')


def no_sideways_scroll(page) -> None:
    widths = page.evaluate("""() => {
        const d = document.documentElement, m = document.getElementById('messages');
        const widest = Math.max(0, ...[...document.querySelectorAll('.msg .bubble, .topbar, .composer')]
            .map(e => e.getBoundingClientRect().right));
        return {doc: d.scrollWidth, view: d.clientWidth, list: m.scrollWidth, listView: m.clientWidth, widest};
    }""")
    assert widths["doc"] <= widths["view"], widths
    assert widths["list"] <= widths["listView"], widths
    assert widths["widest"] <= widths["view"] + 0.5, widths


################ Tests: one user-visible rule each


def test_room_message_appears_in_the_other_window(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    text = unique("hello room ")
    say(pa, text)
    expect(shown(pb, text)).to_have_count(1)
    expect(pb.locator("#messages .msg").filter(has_text=text).locator(".from")).to_have_text(a)
    # The sender sees it once too, marked as their own.
    expect(pa.locator("#messages .msg.own").filter(has_text=text)).to_have_count(1)
    expect(pa.locator("#input")).to_have_value("")
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_direct_message_only_in_the_private_conversation(browser, server):
    a, b, c = unique("A"), unique("B"), unique("C")
    pa, pb, pc = (open_chat(browser, server, n) for n in (a, b, c))
    expect(person(pa, b)).to_be_visible()
    person(pa, b).click()                       # the sidebar person opens the conversation
    expect(pa.locator("#conv-title")).to_have_text(b)
    expect(pa.locator("#private-banner")).to_be_visible()
    secret = unique("secret ")
    say(pa, secret)                             # no @prefix needed in a DM conversation
    expect(pa.locator("#messages .msg.own.dm").filter(has_text=secret)).to_have_count(1)
    expect(pa.locator("#messages .msg .text").filter(has_text="@")).to_have_count(0)

    # B: an unread private conversation with A, nothing in the room.
    expect(dm_row(pb, a).locator(".badge")).to_have_text("1")
    expect(pb.locator("#conv-title")).to_have_text("# general")
    expect(shown(pb, secret)).to_have_count(0)
    dm_row(pb, a).locator("button").click()
    expect(shown(pb, secret)).to_have_count(1)
    expect(dm_row(pb, a).locator(".badge")).to_have_count(0)

    # A's room view does not show it; C sees it nowhere.
    pa.locator('#room-list li[data-key="r:general"] .side-item').click()
    expect(pa.locator("#conv-title")).to_have_text("# general")
    expect(shown(pa, secret)).to_have_count(0)
    expect(pc.locator("body")).not_to_contain_text(secret)
    expect(dm_row(pc, a)).to_have_count(0)
    for p in (pa, pb, pc):
        p.context.close()


def test_presence_goes_offline_when_a_context_closes(browser, server):
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a)
    pb = open_chat(browser, server, b)
    expect(person(pa, b)).to_be_visible()
    expect(person(pa, b).locator(".dot")).to_have_attribute("data-presence", "online")
    person(pa, b).click()
    expect(dm_row(pa, b).locator(".dot")).to_have_attribute("data-presence", "online")
    pb.context.close()
    expect(person(pa, b)).to_have_count(0)
    expect(dm_row(pa, b).locator(".dot")).to_have_attribute("data-presence", "offline")
    expect(pa.locator("#conv-sub")).to_contain_text("Offline")
    pa.context.close()


def test_html_in_a_message_is_shown_as_text(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    payload = '<img src=x onerror="window.__x=1">'
    say(pa, payload)
    for p in (pa, pb):
        expect(p.locator("#messages .msg .text").filter(has_text=payload)).to_have_count(1)
        assert p.locator("#messages img").count() == 0
        assert p.evaluate("window.__x") is None
    # Links: http(s) only, opened safely; other schemes stay text.
    say(pa, "see https://example.org/a?b=1, not javascript:window.__y=1")
    link = pb.locator("#messages a")
    expect(link).to_have_count(1)
    expect(link).to_have_attribute("href", "https://example.org/a?b=1")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")
    pa.context.close(), pb.context.close()


def test_dm_to_offline_user_is_queued_then_delivered(browser, server):
    a, c = unique("A"), unique("C")
    pa = open_chat(browser, server, a)
    pc = open_chat(browser, server, c)          # C has connected once: a known user
    c_browser = pc.context
    expect(person(pa, c)).to_be_visible()
    pc.close()                                  # same context keeps C's token
    expect(person(pa, c)).to_have_count(0)      # C is offline

    text = unique("see you later ")
    say(pa, f"@{c} {text}")                     # the @name prefix from the room
    expect(pa.locator("#conv-title")).to_have_text(c)
    mine = pa.locator("#messages .msg.own.dm").filter(has_text=text)
    expect(mine).to_have_count(1)
    expect(mine.locator(".status")).to_have_text("queued")

    pc = open_chat(browser, server, c, context=c_browser)
    expect(dm_row(pc, a).locator(".badge")).to_have_text("1")
    expect(mine.locator(".status")).to_have_text("delivered")
    dm_row(pc, a).locator("button").click()
    expect(shown(pc, text)).to_have_count(1)
    pa.context.close(), c_browser.close()


def test_reconnects_after_restart_and_shows_missed_messages_once(browser, own_server):
    # A's socket goes through a gate: while held, A's reconnect attempts are
    # refused (close 1013), so B can talk while A is certainly away.
    held = threading.Event()

    def gate(ws):
        if held.is_set():
            ws.close(code=1013, reason="held by the test")
        else:
            ws.connect_to_server()

    pa = open_chat(browser, own_server, "UserA", route=gate)
    pb = open_chat(browser, own_server, "UserB")
    say(pb, "before the restart")
    expect(shown(pa, "before the restart")).to_have_count(1)

    held.set()
    own_server.restart()                        # closes every socket (1001)
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
    expect(pa.locator("#conn-state")).to_contain_text("Reconnecting")
    expect(pb.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=20_000)

    for text in ("missed one", "missed two"):
        say(pb, text)
        expect(shown(pb, text)).to_have_count(1)   # acked and stored
    say(pb, "@UserA missed privately")
    expect(pb.locator("#messages .msg.dm").filter(has_text="missed privately")).to_have_count(1)
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")

    held.clear()
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=40_000)
    for text in ("before the restart", "missed one", "missed two"):
        expect(shown(pa, text)).to_have_count(1)
    ids = pa.eval_on_selector_all("#messages .msg", "els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)), ids
    expect(dm_row(pa, "UserB").locator(".badge")).to_have_text("1")
    dm_row(pa, "UserB").locator("button").click()
    expect(shown(pa, "missed privately")).to_have_count(1)
    assert not pa.js_errors
    pa.context.close(), pb.context.close()


def test_a_server_with_a_new_database_is_not_ignored(browser, own_server):
    """Restarted on an empty database (deleted, or :memory:), the server
    counts ids from 1 again: an open page must start over, not take the new
    messages for ones it already has."""
    pa = open_chat(browser, own_server, "UserA")
    pb = open_chat(browser, own_server, "UserB")
    for text in ("old one", "old two", "old three"):
        say(pb, text)
        expect(shown(pa, text)).to_have_count(1)
    own_server.stop()
    for path in own_server.db.parent.glob(own_server.db.name + "*"):
        path.unlink()                           # the database is gone
    own_server.start()
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=20_000)
    expect(pb.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=20_000)
    say(pb, "new one")                          # id 1 again
    expect(shown(pa, "new one")).to_have_count(1)
    expect(shown(pa, "old one")).to_have_count(0)
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_phone_width_has_no_sideways_scroll_and_sends(browser, server):
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, viewport={"width": 375, "height": 740})
    pb = open_chat(browser, server, b)
    no_sideways_scroll(pa)
    # The sidebar is folded behind the menu button.
    expect(pa.locator("#sidebar")).to_be_hidden()
    pa.locator("#menu-btn").click()
    expect(pa.locator("#sidebar")).to_be_visible()
    expect(pa.locator("#menu-btn")).to_have_attribute("aria-expanded", "true")
    pa.keyboard.press("Escape")
    expect(pa.locator("#sidebar")).to_be_hidden()

    long_word = "x" * 300
    long_url = "https://example.org/" + "very-long-path/" * 25
    say(pa, f"phone {long_word}")
    expect(shown(pb, "phone x")).to_have_count(1)
    say(pb, f"reply {long_url}")
    expect(shown(pa, "reply")).to_have_count(1)
    no_sideways_scroll(pa)
    pa.context.close(), pb.context.close()


################ Screenshots for the README (opt-in)


@pytest.mark.skipif(not os.environ.get("SCREENSHOTS"), reason="set SCREENSHOTS=1 to save docs/*.png")
def test_screenshots(browser, own_server):
    docs = HERE / "docs"
    docs.mkdir(exist_ok=True)
    alice = open_chat(browser, own_server, "Alice")
    bob = open_chat(browser, own_server, "Bob")
    carol = open_chat(browser, own_server, "Carol")
    for page in (alice, bob, carol):
        page.locator("#join-input").fill("python")
        page.locator("#join-input").press("Enter")
        expect(page.locator("#conv-title")).to_have_text("# python")
    for page, text in [
        (bob, "Has anyone tried the new asyncio TaskGroup API?"),
        (carol, "Yes! It makes cancellation much easier to reason about."),
        (carol, "The docs are good: https://docs.python.org/3/library/asyncio-task.html"),
        (alice, "I moved our worker pool to it last week. Fewer leaks."),
    ]:
        say(page, text)
        expect(shown(alice, text)).to_have_count(1)
    for page in (alice, bob, carol):
        page.locator('#room-list li[data-key="r:general"] .side-item').click()
    for page, text in [
        (carol, "Morning all, standup in 10 minutes"),
        (bob, "On my way. @Alice can you share the release notes?"),
        (alice, "Sure, posting them now.\nShort version: faster start-up, fewer bugs."),
        (alice, "Full notes: https://example.org/releases/2.4"),
        (carol, "Thanks! The reconnect fix is a big one for the phone app."),
        (bob, "Agreed, no more lost messages on flaky Wi-Fi."),
    ]:
        say(page, text)
        expect(shown(alice, text.split("\n")[0])).to_have_count(1)
    say(carol, "@Alice lunch at 12:30?")
    say(bob, "@Alice thanks for the review!")
    expect(dm_row(alice, "Bob").locator(".badge")).to_have_text("1")
    bob.locator('#room-list li[data-key="r:general"] .side-item').click()
    bob.locator("#input").fill("typing")
    bob.locator("#input").press("Space")
    expect(alice.locator("#typing")).to_contain_text("Bob is typing")
    alice.locator("#input").fill("Looks great, ")
    alice.screenshot(path=str(docs / "desktop.png"))

    # Bob again, on a phone: a new context with Bob's stored token.
    phone_ctx = browser.new_context(viewport={"width": 375, "height": 740},
                                    storage_state=bob.context.storage_state())
    phone = open_chat(browser, own_server, "Bob", context=phone_ctx)
    expect(shown(phone, "Sure, posting them now")).to_have_count(1)
    phone.screenshot(path=str(docs / "phone.png"))
    for page in (alice, bob, carol, phone):
        page.context.close()


if __name__ == "__main__":
    if "--screenshots" in sys.argv:
        os.environ["SCREENSHOTS"] = "1"
        sys.exit(pytest.main(["-q", __file__, "-k", "screenshots"]))
    sys.exit(pytest.main(["-q", __file__]))
