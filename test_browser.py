"""Browser tests for the page (index.html), in a real Chromium driven by Playwright.

Each test is one rule a user can see. The server runs as a subprocess
(``python chat.py --port PORT --db TMP/chat.db --rate 0 --names_per_hour 0``) on a free port;
every browser context is a separate user (its own localStorage, so its own
token). Tests wait with Playwright's ``expect``/``wait_for``, never with sleeps.
A test that needs the server's real send budget uses ``limited_server``; one
that needs a server answer chat.py does not give stands in for it with
``page.route_web_socket``. The page is never told it is under test: where a
test needs a hidden tab or a browser API, it sets what the page reads.

The accessibility audit injects axe-core when ``AXE_CORE_JS`` names its
``axe.min.js`` (``npm install --prefix DIR axe-core``); it is skipped otherwise.

Screenshots for the README (docs/desktop.png, docs/phone.png)::

    SCREENSHOTS=1 python -m pytest -q test_browser.py -k screenshots
    python test_browser.py --screenshots          # the same

Needs Debian's ``chromium`` (/usr/bin/chromium) and ``pip install playwright``;
without either the whole module is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
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

    def __init__(self, db: pathlib.Path, *args: str) -> None:
        self.db = db
        self.args = list(args) or ["--rate", "0", "--names_per_hour", "0"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "chat.py"), "--port", str(self.port), "--db", str(self.db), *self.args],
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


@pytest.fixture
def limited_server(tmp_path):
    """A server with the default send budget (5 frames a second, 20 at once)."""
    srv = Server(tmp_path / "chat.db", "--names_per_hour", "0")
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


def reconnect_gate():
    """(held, route) for open_chat: while held is set, the page's reconnect
    attempts are refused (close 1013), so it certainly stays away."""
    held = threading.Event()

    def gate(ws):
        if held.is_set():
            ws.close(code=1013, reason="held by the test")
        else:
            ws.connect_to_server()

    return held, gate


def test_reconnects_after_restart_and_shows_missed_messages_once(browser, own_server):
    # A's socket goes through a gate: while held, A's reconnect attempts are
    # refused (close 1013), so B can talk while A is certainly away.
    held, gate = reconnect_gate()

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


def join(page, room: str) -> None:
    page.locator("#join-input").fill(room)
    page.locator("#join-input").press("Enter")
    expect(page.locator("#conv-title")).to_have_text(f"# {room}")


def room_row(page, room: str):
    return page.locator(f'#room-list li[data-key="r:{room.lower()}"]')


def set_away(page, away: bool) -> None:
    """Make the tab hidden and unfocused (or back): headless pages always look
    focused and visible, so the test sets what the page reads and tells it."""
    page.evaluate("""(away) => {
        Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => away ? 'hidden' : 'visible'});
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => away});
        document.hasFocus = () => !away;
        document.dispatchEvent(new Event('visibilitychange'));
    }""", away)


def frames_sent(context) -> list:
    """Every frame the context's pages send from now on, parsed."""
    sent: list = []

    def on_ws(ws) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    context.on("page", lambda page: page.on("websocket", on_ws))
    return sent


################ Tests: never lose a typed message (issue 10 item 1)


def test_sixty_fast_messages_arrive_once_each_in_order(browser, limited_server):
    """With the server's default budget (5 a second, 20 at once), 60 messages
    typed as fast as possible all arrive, in order, once; nothing shows jargon."""
    ca = browser.new_context(viewport={"width": 1280, "height": 800})
    sent = frames_sent(ca)
    pa = open_chat(browser, limited_server, "UserA", context=ca)
    pb = open_chat(browser, limited_server, "UserB")
    texts = [f"fast {i:02d}" for i in range(60)]
    for text in texts:
        say(pa, text)
    expect(shown(pb, "fast ")).to_have_count(60, timeout=60_000)
    assert shown(pb, "fast ").all_inner_texts() == texts
    expect(pa.locator("#pending-list li")).to_have_count(0, timeout=30_000)
    expect(pa.locator("#messages .msg.own").filter(has_text="fast ")).to_have_count(60)
    # Every message went with a ref and a client id, each cid its own.
    messages = [f for f in sent if f.get("type") == "message"]
    assert all("ref" in f and re.fullmatch(r"[\x21-\x7e]{1,64}", f["cid"]) for f in messages)
    assert len({f["cid"] for f in messages}) == 60
    # Typing hints do not ride along with every message.
    assert len([f for f in sent if f.get("type") == "typing"]) <= 5
    expect(pa.locator("body")).not_to_contain_text("frames")
    expect(pa.locator("body")).not_to_contain_text("Not sent")
    assert not pa.js_errors
    ca.close(), pb.context.close()


def test_slow_down_answers_are_waited_out_in_plain_words(browser, server):
    """A "rate_limited" answer means wait and send again: the person reads
    "Sending a bit slower…", never the server's wording, and nothing is lost."""
    refused = {"n": 0}

    def gate(ws):
        srv = ws.connect_to_server()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "message" and "patient" in frame.get("text", "") and refused["n"] < 4:
                refused["n"] += 1
                ws.send(json.dumps({"type": "error", "code": "rate_limited",
                                    "message": "slow down: at most 5 frames a second", "ref": frame["ref"]}))
                return
            srv.send(message)
        ws.on_message(from_page)

    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, route=gate)
    pb = open_chat(browser, server, b)
    say(pa, "patient one")
    say(pa, "patient two")
    expect(pa.locator("#send-status")).to_have_text("Sending a bit slower…")
    expect(shown(pb, "patient")).to_have_text(["patient one", "patient two"])
    expect(pa.locator("#send-status")).to_be_hidden()
    expect(pa.locator("body")).not_to_contain_text("frames a second")
    assert refused["n"] == 4
    pa.context.close(), pb.context.close()


def test_a_message_that_cannot_be_sent_stays_with_retry(browser, server):
    """After repeated failures the message stays on screen as "Not sent" with
    Retry; Retry sends it."""
    failing = threading.Event()
    failing.set()

    def gate(ws):
        srv = ws.connect_to_server()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "message" and failing.is_set():
                ws.send(json.dumps({"type": "error", "code": "server_error",
                                    "message": "the server could not save that; try again", "ref": frame["ref"]}))
                return
            srv.send(message)
        ws.on_message(from_page)

    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, route=gate)
    pb = open_chat(browser, server, b)
    text = unique("stubborn ")
    say(pa, text)
    mine = pa.locator("#pending-list li").filter(has_text=text)
    expect(mine.locator(".status")).to_have_text("Sending…")
    expect(mine.locator(".status")).to_contain_text("Not sent", timeout=15_000)
    expect(mine.locator(".status")).to_contain_text("The server could not save it.")
    failing.clear()
    mine.get_by_role("button", name="Retry").click()
    expect(shown(pb, text)).to_have_count(1)
    expect(pa.locator("#pending-list li")).to_have_count(0)
    expect(shown(pa, text)).to_have_count(1)
    pa.context.close(), pb.context.close()


CID_SERVER = '"cid"' in (HERE / "chat.py").read_text(encoding="utf-8")


@pytest.mark.skipif(not CID_SERVER, reason="chat.py does not de-duplicate by client id (cid) yet")
def test_a_message_whose_ack_was_lost_is_sent_again_once(browser, server):
    """The connection drops after the server took a message but before its
    ack arrived: the page sends it again after reconnecting, with the same
    client id, and it is posted once."""
    seen: list = []
    state = {"drop_ref": None, "dropped": False}

    def gate(ws):
        srv = ws.connect_to_server()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "message" and "fragile" in frame.get("text", ""):
                seen.append(frame)
                if not state["dropped"]:
                    state["drop_ref"] = frame["ref"]
            srv.send(message)

        def from_server(message):
            frame = json.loads(message)
            if frame.get("type") == "ack" and frame.get("ref") == state["drop_ref"] and not state["dropped"]:
                state["dropped"] = True
                ws.close(code=1012, reason="test: lost on the way")
                return
            ws.send(message)
        ws.on_message(from_page)
        srv.on_message(from_server)

    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, route=gate)
    pb = open_chat(browser, server, b)
    text = unique("fragile ")
    say(pa, text)
    expect(shown(pb, text)).to_have_count(1)
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=20_000)
    expect(pa.locator("#pending-list li")).to_have_count(0)
    assert len(seen) == 2 and seen[0]["cid"] == seen[1]["cid"], seen
    expect(shown(pb, text)).to_have_count(1)
    expect(shown(pa, text)).to_have_count(1)
    pa.context.close(), pb.context.close()


def test_a_late_ack_for_a_private_message_does_not_move_you(browser, own_server):
    """"@Ned text" typed in a room during an outage goes to Ned once the
    connection is back, but the page stays in the room: the text typed since
    is still meant for the room, and Enter sends it there."""
    held, gate = reconnect_gate()

    mia, ned = unique("Mia"), unique("Ned")
    pn = open_chat(browser, own_server, ned)           # Ned is a known user
    pm = open_chat(browser, own_server, mia, route=gate)
    expect(pm.locator("#conv-title")).to_have_text("# general")
    held.set()
    own_server.restart()
    expect(pm.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
    private = unique("dm queued during outage ")
    say(pm, f"@{ned} {private}")
    expect(pm.locator("#pending-list li .status")).to_have_text(f"Sending privately to {ned}…")
    public = unique("this is meant for everyone in general ")
    pm.locator("#input").fill(public)
    held.clear()
    expect(pm.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=40_000)
    expect(pm.locator("#pending-list li")).to_have_count(0)     # acked
    expect(dm_row(pm, ned)).to_have_count(1)
    # Still in the room, with the draft meant for it.
    expect(pm.locator("#conv-title")).to_have_text("# general")
    expect(pm.locator("#input")).to_have_value(public)
    expect(pm.locator("#input")).to_have_attribute("placeholder", "Message #general")
    pm.locator("#input").press("Enter")
    expect(pn.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=40_000)
    expect(shown(pn, public)).to_have_count(1)
    expect(pn.locator("#conv-title")).to_have_text("# general")
    dm_row(pn, mia).locator("button").click()
    expect(shown(pn, private)).to_have_count(1)
    expect(shown(pn, public)).to_have_count(0)            # not sent privately
    # And the private message is in Mia's conversation with Ned.
    dm_row(pm, ned).locator("button").click()
    expect(shown(pm, private)).to_have_count(1)
    assert not pm.js_errors
    pm.context.close(), pn.context.close()


@pytest.mark.skipif(not CID_SERVER, reason="chat.py does not de-duplicate by client id (cid) yet")
def test_messages_waiting_to_be_sent_survive_a_reload_and_are_posted_once(browser, server):
    """Messages typed while disconnected, and one whose ack never came, are
    kept in this browser for their user: after a reload they are sent (the
    unacked one with its client id, so it is posted once). Another user
    signing in on the same browser neither sees nor sends them."""
    held = threading.Event()
    swallow = threading.Event()
    swallow.set()
    routes: list = []

    def gate(ws):
        if held.is_set():
            ws.close(code=1013, reason="held by the test")
            return
        routes.append(ws)
        srv = ws.connect_to_server()
        refs: set = set()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "message" and "fragile" in frame.get("text", ""):
                refs.add(frame["ref"])
            srv.send(message)

        def from_server(message):
            frame = json.loads(message)
            if frame.get("type") == "ack" and frame.get("ref") in refs and swallow.is_set():
                return                                  # the ack is lost on the way
            ws.send(message)
        ws.on_message(from_page)
        srv.on_message(from_server)

    mia, ned, zed = unique("Mia"), unique("Ned"), unique("Zed")
    pn = open_chat(browser, server, ned)
    cm = browser.new_context(viewport={"width": 1280, "height": 800})
    sent = frames_sent(cm)
    pm = open_chat(browser, server, mia, context=cm, route=gate)
    fragile = unique("fragile ")
    say(pm, fragile)
    expect(shown(pn, fragile)).to_have_count(1)         # posted; Mia never hears so
    expect(shown(pm, fragile)).to_have_count(1)         # but sees its echo, so it waits
    expect(pm.locator("#pending-list li")).to_have_count(0)   # for its ack off screen
    held.set()
    routes[-1].close(code=1012, reason="test: the connection drops")
    expect(pm.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
    in_room, in_private = unique("typed offline "), unique("typed offline privately ")
    say(pm, in_room)
    say(pm, f"@{ned} {in_private}")
    expect(pm.locator("#pending-list li")).to_have_count(2)

    # Zed on the same browser: nothing of Mia's is shown or sent.
    pz = open_chat(browser, server, zed, context=cm)
    expect(pz.locator("#pending-list li")).to_have_count(0)
    say(pz, "zed here")
    expect(shown(pn, "zed here")).to_have_count(1)      # anything Zed sent came before it
    expect(shown(pn, in_room)).to_have_count(0)
    expect(dm_row(pn, mia)).to_have_count(0)
    pz.close()

    held.clear()
    swallow.clear()
    pm.reload()
    expect(pm.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(pm.locator("#me-name")).to_have_text(mia)
    expect(shown(pn, in_room)).to_have_count(1)
    expect(pm.locator("#pending-list li")).to_have_count(0)
    expect(shown(pm, in_room)).to_have_count(1)
    expect(shown(pm, fragile)).to_have_count(1)
    expect(shown(pn, fragile)).to_have_count(1)         # sent again, posted once
    expect(pm.locator("#conv-title")).to_have_text("# general")
    expect(dm_row(pn, mia).locator(".badge")).to_have_text("1")
    dm_row(pn, mia).locator("button").click()
    expect(shown(pn, in_private)).to_have_count(1)
    again = [f for f in sent if f.get("type") == "message" and fragile in f.get("text", "")]
    assert len(again) >= 2 and len({f["cid"] for f in again}) == 1, again
    assert not [f for f in sent if f.get("type") == "message" and f.get("text") == in_room][1:], sent
    # Nothing is left waiting: a reload sends nothing more.
    pm.reload()
    expect(pm.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(pm.locator("#pending-list li")).to_have_count(0)
    pn.locator('#room-list li[data-key="r:general"] .side-item').click()
    say(pm, "after the second reload")
    expect(shown(pn, "after the second reload")).to_have_count(1)
    expect(shown(pn, in_room)).to_have_count(1)
    expect(shown(pn, fragile)).to_have_count(1)
    assert not pm.js_errors
    cm.close(), pn.context.close()


################ Tests: a background tab (issue 10 item 2)


def test_background_tab_counts_unread_in_title_and_favicon(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    room = unique("bg")
    join(pa, room), join(pb, room)
    plain_icon = pa.locator("#favicon").get_attribute("href")
    expect(pa).to_have_title(f"#{room} · Chat")
    set_away(pa, True)
    for i in range(3):
        say(pb, f"while away {i}")
    expect(pa).to_have_title(f"(3) #{room} · Chat")
    icon = pa.locator("#favicon").get_attribute("href")
    assert icon.startswith("data:image/png;base64,") and icon != plain_icon
    # Coming back at the end of the list reads them: title and icon clear, "New" stays.
    set_away(pa, False)
    expect(pa).to_have_title(f"#{room} · Chat")
    assert pa.locator("#favicon").get_attribute("href") == plain_icon
    expect(pa.locator("#new-divider + li.msg .text")).to_have_text("while away 0")
    pa.context.close(), pb.context.close()


# The stub also counts on <html data-notes data-sounds>, so that tests wait
# with expect() (Playwright's wait_for_function compiles its predicate in the
# page, which the page's CSP, without 'unsafe-eval', refuses).
NOTIFICATION_STUB = """
window.__notes = []; window.__asked = 0; window.__sounds = 0;
const __count = (name, n) => { document.documentElement.dataset[name] = String(n); };
window.Notification = class {
  constructor(title, opts) {
    this.title = title; this.body = opts.body; window.__notes.push(this); __count('notes', window.__notes.length);
  }
  close() {}
  static requestPermission() { window.__asked += 1; this.permission = 'granted'; return Promise.resolve('granted'); }
};
window.Notification.permission = 'default';
window.AudioContext = class {
  constructor() { window.__sounds += 1; __count('sounds', window.__sounds); this.currentTime = 0; this.destination = {}; }
  createGain() { return { connect() {}, gain: { setValueAtTime() {}, exponentialRampToValueAtTime() {} } }; }
  createOscillator() { return { connect() {}, start() {}, stop() {}, frequency: { setValueAtTime() {} } }; }
  close() {}
};
"""


def test_notifications_are_opt_in_and_open_the_conversation(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.grant_permissions(["notifications"])
    ctx.add_init_script(NOTIFICATION_STUB)
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, context=ctx)
    pb = open_chat(browser, server, b)
    assert pa.evaluate("window.__asked") == 0          # never asked on load
    expect(pa.locator("#notify-btn")).to_have_attribute("aria-pressed", "false")
    expect(pa.locator("#sound-btn")).to_have_attribute("aria-pressed", "false")   # sound is off by default
    set_away(pa, True)
    long = "x" * 150
    say(pb, f"@{a} {long}")
    expect(dm_row(pa, b).locator(".badge")).to_have_text("1")
    expect(pb.locator("#conv-title")).to_have_text(a)
    assert pa.evaluate("window.__notes.length") == 0 and pa.evaluate("window.__sounds") == 0

    pa.locator("#notify-btn").click()                   # the visible control asks
    expect(pa.locator("#notify-btn")).to_have_attribute("aria-pressed", "true")
    assert pa.evaluate("window.__asked") == 1
    set_away(pa, True)
    text = "ping " + "y" * 120
    say(pb, text)                                       # B is in the conversation with A now
    expect(pa.locator("html")).to_have_attribute("data-notes", "1")
    note = pa.evaluate("({title: __notes[0].title, body: __notes[0].body})")
    assert note == {"title": b, "body": text[:100]}
    room_row(pb, "general").locator(".side-item").click()
    say(pb, "just chatting, nobody named")              # a plain room message: no notification
    say(pb, f"hello @{a}, a mention")                   # a mention of you: one
    expect(pa.locator("html")).to_have_attribute("data-notes", "2")
    expect(shown(pa, "just chatting")).to_have_count(1)
    assert pa.evaluate("__notes[1].title") == f"{b} in #general"
    pa.evaluate("__notes[0].onclick()")                 # clicking opens the conversation
    expect(pa.locator("#conv-title")).to_have_text(b)
    expect(shown(pa, "ping y")).to_have_count(1)
    # The sound is a separate opt-in, made on the spot (nothing fetched).
    pa.locator("#sound-btn").click()
    expect(pa.locator("#sound-btn")).to_have_attribute("aria-pressed", "true")
    sounds = pa.evaluate("window.__sounds")
    say(pb, f"@{a} with sound")
    expect(pa.locator("html")).to_have_attribute("data-sounds", str(sounds + 1))
    ctx.close(), pb.context.close()


################ Tests: "@Ben text", mentions (issue 10 item 3)


def test_private_chip_says_who_will_get_the_message(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    box = pa.locator("#input")
    expect(pa.locator("#private-chip")).to_be_hidden()
    box.fill(f"@{b}")                                   # no white space yet: not private
    expect(pa.locator("#private-chip")).to_be_hidden()
    box.fill(f"@{b} are you there?")
    expect(pa.locator("#private-chip")).to_have_text(f"Private to {b}")
    expect(pa.locator("#send-btn")).to_have_text("Send privately")
    box.fill(f"hi @{b} are you there?")                 # a mention later on is public
    expect(pa.locator("#private-chip")).to_be_hidden()
    expect(pa.locator("#send-btn")).to_have_text("Send")
    box.fill(f"@{b} only for you")
    pa.locator("#send-btn").click()
    expect(pa.locator("#conv-title")).to_have_text(b)
    expect(dm_row(pb, a).locator(".badge")).to_have_text("1")
    expect(pa.locator("#private-chip")).to_be_hidden()
    pa.context.close(), pb.context.close()


def test_completion_anywhere_lists_offline_members_and_inserts_a_public_mention(browser, server):
    stem = unique("M")[:7]                              # a prefix only these two share
    a, b, c = unique("A"), stem + "bx", stem + "co"
    room = unique("comp")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    ctx_c = browser.new_context()
    pc = open_chat(browser, server, c, context=ctx_c)
    for p in (pa, pb, pc):
        join(p, room)
    pc.close()                                          # C is offline but still a member
    expect(person(pa, c)).to_have_count(0)
    box = pa.locator("#input")
    box.fill("thanks ")
    box.press_sequentially("@" + stem)
    options = pa.locator("#completion [role=option]")
    expect(options).to_have_count(2)
    expect(pa.locator("#completion")).to_contain_text(c)    # offline, listed anyway
    expect(box).to_have_attribute("aria-expanded", "true")
    first = options.nth(0).get_attribute("id")
    expect(box).to_have_attribute("aria-activedescendant", first)
    box.press("ArrowDown")
    expect(box).to_have_attribute("aria-activedescendant", options.nth(1).get_attribute("id"))
    expect(options.nth(1)).to_have_attribute("aria-selected", "true")
    name = options.nth(1).locator(".comp-name").inner_text()
    box.press("Tab")
    expect(box).to_have_value(f"thanks @{name} ")
    expect(box).to_have_attribute("aria-expanded", "false")
    expect(pa.locator("#private-chip")).to_be_hidden()      # a public mention
    box.press_sequentially("for the review")
    box.press("Enter")
    expect(shown(pb, f"thanks @{name} for the review")).to_have_count(1)
    expect(pb.locator("#messages .msg .mention-tag").filter(has_text=name)).to_have_count(1)
    pa.context.close(), pb.context.close(), ctx_c.close()


def test_a_mention_of_you_raises_its_own_badge(browser, server):
    a, b = unique("A"), unique("B")
    room = unique("men")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    join(pa, room), join(pb, room)
    room_row(pa, "general").locator(".side-item").click()   # A looks elsewhere
    say(pb, "nothing for A")
    say(pb, f"but @{a} should see this")
    row = room_row(pa, room)
    expect(row.locator(".unread-badge")).to_have_text("2")
    expect(row.locator(".mention-badge")).to_have_text("@1")
    expect(row.locator(".side-item")).to_have_accessible_name(re.compile(r"^Room \S+ @1 mention 2 unread$"))
    row.locator(".side-item").click()
    expect(row.locator(".badge")).to_have_count(0)
    expect(pa.locator("#messages .msg.mention")).to_have_count(1)
    pa.context.close(), pb.context.close()


################ Tests: new messages and scrolling (issue 10 item 4)


def fill_room(sender, reader, room: str, n: int, label: str) -> None:
    for i in range(n):
        say(sender, f"{label} {i:02d}\nsecond line so the list scrolls")
    expect(shown(reader, f"{label} {n - 1:02d}")).to_have_count(1)


def scroll_top(page, px: int) -> None:
    """Scroll the message list as a person would, and let the page see it."""
    page.evaluate("""(px) => new Promise((done) => {
        const m = document.getElementById('messages');
        const before = m.scrollTop;
        m.scrollTop = px;
        if (m.scrollTop === before) return done();
        m.addEventListener('scroll', () => setTimeout(done, 0), {once: true});
    })""", px)


def test_new_messages_while_scrolled_up_show_a_jump_button(browser, server):
    a, b = unique("A"), unique("B")
    room = unique("jump")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    join(pa, room), join(pb, room)
    fill_room(pb, pa, room, 30, "filler")
    expect(pa.locator("#jump-new")).to_be_hidden()
    scroll_top(pa, 0)
    for i in range(3):
        say(pb, f"fresh {i}")
    expect(pa.locator("#jump-new")).to_have_text("3 new ↓")
    expect(pa).to_have_title(f"(3) #{room} · Chat")
    pa.locator("#jump-new").click()
    first = pa.locator("#messages .msg").filter(has_text="fresh 0")
    expect(first).to_be_in_viewport()
    expect(first).to_be_focused()
    scroll_top(pa, 10**6)                                # read to the end
    expect(pa.locator("#jump-new")).to_be_hidden()
    expect(pa).to_have_title(f"#{room} · Chat")
    pa.context.close(), pb.context.close()


def test_opening_a_conversation_shows_new_divider_and_keeps_each_scroll(browser, server):
    a, b = unique("A"), unique("B")
    one, two = unique("one"), unique("two")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    join(pa, two), join(pb, two)
    join(pa, one), join(pb, one)
    fill_room(pb, pa, one, 30, "one")
    scroll_top(pa, 300)
    room_row(pa, two).locator(".side-item").click()
    pb.locator('#room-list li[data-key="r:%s"] .side-item' % two.lower()).click()
    say(pb, "seen before")
    expect(shown(pa, "seen before")).to_have_count(1)
    room_row(pa, one).locator(".side-item").click()
    assert pa.evaluate("document.getElementById('messages').scrollTop") == 300
    for text in ("unread first", "unread second"):
        say(pb, text)
    expect(room_row(pa, two).locator(".unread-badge")).to_have_text("2")
    room_row(pa, two).locator(".side-item").click()
    expect(pa.locator("#new-divider")).to_have_text("New messages start here")
    expect(pa.locator("#new-divider span").first).to_have_text("New")           # what the eye sees
    expect(pa.locator("#new-divider + li.msg .text")).to_have_text("unread first")
    expect(pa.locator("#new-divider")).to_have_count(1)
    room_row(pa, one).locator(".side-item").click()
    room_row(pa, two).locator(".side-item").click()
    expect(shown(pa, "unread second")).to_have_count(1)
    expect(pa.locator("#new-divider")).to_have_count(0)    # read: no divider next time
    pa.context.close(), pb.context.close()


def test_what_a_room_said_before_you_joined_is_not_counted_unread(browser, server):
    """B joins a room with a history from a tab it then leaves (so that tab
    never marks anything read): B's other tab lists the room with no count
    for what was said before, and counts what is said after."""
    a, b, room = unique("A"), unique("B"), unique("den")
    pa = open_chat(browser, server, a)
    join(pa, room)
    for i in range(3):
        say(pa, f"said before {i}")
        expect(shown(pa, f"said before {i}")).to_have_count(1)
    pb = open_chat(browser, server, b)
    other = open_chat(browser, server, b, context=pb.context)
    set_away(pb, True)
    join(pb, room)
    expect(shown(pb, "said before 2")).to_have_count(1)      # the history is there to read
    expect(room_row(other, room)).to_have_count(1)
    expect(other.locator("#conv-title")).to_have_text("# general")
    say(pa, "said after")
    expect(room_row(other, room).locator(".unread-badge")).to_have_text("1")
    room_row(other, room).locator(".side-item").click()
    expect(other.locator("#new-divider + li.msg .text")).to_have_text("said after")
    assert not other.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


################ Tests: phone, direction, display safety (items 5, 6, issue 8 item 12)


def test_phone_menu_button_shows_unread_elsewhere(browser, server):
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, viewport={"width": 375, "height": 740})
    pb = open_chat(browser, server, b)
    expect(pa.locator("#menu-badge")).to_be_hidden()
    say(pb, f"@{a} psst")
    expect(pa.locator("#menu-badge")).to_be_visible()
    expect(pa.locator("#menu-btn")).to_have_accessible_name(re.compile("1 unread"))
    pa.locator("#menu-btn").click()
    dm_row(pa, b).locator("button").click()
    expect(pa.locator("#sidebar")).to_be_hidden()
    expect(shown(pa, "psst")).to_have_count(1)
    expect(pa.locator("#menu-badge")).to_be_hidden()
    room_row(pb, "general").locator(".side-item").click()
    say(pb, f"hey @{a} over here")                        # a mention in a room behind the menu
    expect(pa.locator("#menu-badge")).to_have_class(re.compile("mention"))
    pa.context.close(), pb.context.close()


def char_lefts(page, locator_text: str, chars: str) -> list:
    """x of the first occurrence of each character in the rendered message, in order given."""
    return page.evaluate("""([needle, chars]) => {
        const p = [...document.querySelectorAll('#messages .msg .text')].find(e => e.textContent.includes(needle));
        const walker = document.createTreeWalker(p, NodeFilter.SHOW_TEXT);
        const xs = {};
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
            for (let i = 0; i < n.data.length; i++) {
                const ch = n.data[i];
                if (chars.includes(ch) && !(ch in xs)) {
                    const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
                    xs[ch] = r.getBoundingClientRect().left;
                }
            }
        }
        return [...chars].map(c => xs[c]);
    }""", [locator_text, chars])


def test_right_to_left_messages_are_laid_out_right_to_left(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    expect(pa.locator("#input")).to_have_attribute("dir", "auto")
    hebrew = "שלום לכולם"                                   # "hello everyone"
    say(pb, hebrew)
    say(pb, "plain left to right")
    text = shown(pa, hebrew)
    expect(text).to_have_attribute("dir", "auto")
    assert text.evaluate("e => getComputedStyle(e).direction") == "rtl"
    assert shown(pa, "plain left").evaluate("e => getComputedStyle(e).direction") == "ltr"
    first, last = char_lefts(pa, hebrew, "שם")            # ש starts the text, ם ends it
    assert first > last, (first, last)
    pa.context.close(), pb.context.close()


def test_direction_overrides_in_a_message_are_inert(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    tag = unique("inv")
    say(pb, f"{tag} invoice_\u202Egnp.exe and \u2067more\u2069")
    text = shown(pa, tag)
    expect(text).to_have_count(1)
    content = text.text_content()
    assert not re.search("[\u202a-\u202e\u2066-\u2069]", content), repr(content)
    expect(text.locator(".bidi-ctl")).to_have_count(3)
    expect(text.locator(".bidi-ctl").first).to_have_text("U+202E")
    g, x = char_lefts(pa, tag, "gx")                      # "gnp.exe" reads left to right, not "exe.png"
    assert g < x, (g, x)
    pa.context.close(), pb.context.close()


def test_links_show_punycode_hosts_and_www_addresses_link(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    say(pb, "pay at https://p\u0430ypal.com/login now")          # a Cyrillic "а"
    link = pa.locator("#messages a").filter(has_text="/login")
    expect(link).to_have_count(1)
    expect(link).to_have_text(re.compile(r"^https://xn--[a-z0-9-]+\.com/login$"))
    host = link.evaluate("a => new URL(a.href).hostname")
    assert host.startswith("xn--") and host in link.inner_text()
    say(pb, "see www.example.org/docs.")
    www = pa.locator("#messages a").filter(has_text="www.example.org")
    expect(www).to_have_attribute("href", "https://www.example.org/docs")
    expect(www).to_have_text("www.example.org/docs")
    pa.context.close(), pb.context.close()


################ Tests: accessibility (issue 10 item 7)


def test_log_role_and_focus_follows_switching_and_leaving(browser, server):
    a = unique("A")
    room = unique("focus")
    pa = open_chat(browser, server, a)
    expect(pa.locator("#messages")).to_have_attribute("role", "log")
    box = pa.locator("#input")
    expect(box).to_have_attribute("role", "combobox")
    expect(box).to_have_attribute("aria-controls", "completion")
    expect(pa.locator("#completion")).to_have_attribute("role", "listbox")
    join(pa, room)
    expect(box).to_be_focused()
    room_row(pa, "general").locator(".side-item").focus()
    pa.keyboard.press("Enter")                          # switch by keyboard
    expect(pa.locator("#conv-title")).to_have_text("# general")
    expect(box).to_be_focused()
    room_row(pa, room).locator(".leave").click()
    expect(room_row(pa, room)).to_have_count(0)
    expect(box).to_be_focused()
    pa.context.close()


AXE_JS = os.environ.get("AXE_CORE_JS", "")


@pytest.mark.skipif(not os.path.isfile(AXE_JS),
                    reason="set AXE_CORE_JS to axe.min.js (npm install --prefix DIR axe-core) to run the audit")
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_audit_finds_no_serious_issues(browser, server, scheme):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme=scheme)
    ctx.add_init_script(path=AXE_JS)                    # the page itself fetches nothing
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, context=ctx)
    pb = open_chat(browser, server, b)
    say(pb, f"hello @{a}, see https://example.org")
    second, reply = unique("a second one, grouped "), unique("a reply ")
    say(pb, second)
    say(pb, f"@{a} and a private one")
    expect(dm_row(pa, b).locator(".badge")).to_have_text("1")
    expect(pb.locator("#conv-title")).to_have_text(a)         # the private message opened its conversation
    room_row(pb, "general").locator(".side-item").click()
    act(pb, second, "React")                                 # a reaction chip, a reply's quote, an edit
    pb.get_by_role("button", name="React with party").click()
    act(pb, second, "Reply")
    say(pb, reply)
    act(pb, reply, "Edit")
    pb.locator("#input").fill(reply + ", edited")
    pb.locator("#input").press("Enter")
    expect(msg_row(pa, reply + ", edited").locator(".edited")).to_be_visible()
    expect(msg_row(pa, second).locator(".chip")).to_have_count(1)
    pa.locator("#input").fill(f"@{b} private draft")
    expect(pa.locator("#private-chip")).to_be_visible()
    for phase in ("room", "actions", "completion", "dm", "search", "devices"):
        if phase == "actions":
            pa.locator("#input").fill("")
            act(pa, reply + ", edited", "Reply")
            expect(pa.locator("#compose-bar")).to_be_visible()
            act(pa, second, "React")
            expect(pa.locator("#emoji-picker")).to_be_visible()
        if phase == "search":
            pa.locator("#search-input").fill("private")
            pa.locator("#search-input").press("Enter")
            expect(pa.locator("#search-results .result mark")).to_have_text("private")
        if phase == "devices":
            pa.locator("#devices-btn").click()
            pa.locator("#link-make").click()
            expect(pa.locator("#link-code")).to_have_text(re.compile(r"\S"))
            pa.locator("#logout-start").click()
            expect(pa.locator("#logout-confirm")).to_be_visible()
        if phase == "completion":
            pa.locator("#input").fill("")
            pa.locator("#input").press_sequentially("@")
            expect(pa.locator("#completion")).to_be_visible()
        if phase == "dm":
            dm_row(pa, b).locator("button").click()
        result = pa.evaluate("""async () => {
            const r = await axe.run(document, {resultTypes: ['violations']});
            return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
                .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}));
        }""")
        assert result == [], (phase, result)
    ctx.close(), pb.context.close()


################ Tests: names (issue 10 item 8)


def test_change_name_asks_first_and_the_bare_address_signs_back_in(browser, server):
    a = unique("A")
    pa = open_chat(browser, server, a)
    pa.locator("#switch-name").click()
    dialog = pa.locator("#switch-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(a)
    expect(dialog).to_contain_text("stays yours")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "online")
    pa.locator("#switch-name").click()
    dialog.get_by_role("button", name="Use another name").click()
    expect(pa.locator("#login")).to_be_visible()
    # Back to the bare address: this browser's name comes straight back, no click.
    pa.goto(server.url + "/")
    expect(pa.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(pa.locator("#me-name")).to_have_text(a)
    expect(pa.locator("#login")).to_be_hidden()
    pa.context.close()


################ Tests: small things (issue 10 item 9)


def test_grouped_messages_show_their_time_on_hover_and_focus(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    say(pb, "first of a group")
    say(pb, "second of a group")
    second = pa.locator("#messages .msg").filter(has_text="second of a group")
    expect(second).to_have_class(re.compile(r"\bcont\b"))
    stamp = second.locator(".hover-time")
    expect(stamp).to_be_hidden()
    second.locator(".bubble").hover()
    expect(stamp).to_be_visible()
    expect(stamp).to_have_text(re.compile(r"\d"))
    pa.locator("#conv-title").hover()
    expect(stamp).to_be_hidden()
    pa.locator("#messages").focus()
    pa.keyboard.press("End")                            # the last message, by keyboard
    expect(second).to_be_focused()
    expect(stamp).to_be_visible()
    pa.context.close(), pb.context.close()


def hue(hex_colour: str) -> float:
    import colorsys
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)[0] * 360


def test_avatar_colours_come_from_twelve_separate_hues(browser, server):
    pa = open_chat(browser, server, unique("A"))
    colours = pa.evaluate("AVATAR_COLORS")
    hues = sorted(hue(c) for c in colours)
    assert len(set(colours)) >= 12
    gaps = [(hues[(i + 1) % len(hues)] - hues[i]) % 360 for i in range(len(hues))]
    assert min(gaps) >= 15, gaps
    b_colour, d_colour = pa.evaluate("[avatarColor('UserB'), avatarColor('UserD')]")
    assert b_colour != d_colour
    pa.context.close()


def test_leaving_the_last_room_shows_a_join_box(browser, server):
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    say(pb, f"@{a} a private chat exists")
    expect(dm_row(pa, b)).to_have_count(1)
    room_row(pa, "general").locator(".leave").click()
    expect(pa.locator("#no-room")).to_be_visible()
    expect(pa.locator("#conv-title")).to_have_text("Chat")     # not the private conversation
    expect(pa.locator("#empty-join-input")).to_be_focused()
    pa.locator("#empty-join-input").fill("general")
    pa.locator("#empty-join-input").press("Enter")
    expect(pa.locator("#conv-title")).to_have_text("# general")
    expect(pa.locator("#no-room")).to_be_hidden()
    pa.context.close(), pb.context.close()


def test_on_a_phone_enter_adds_a_line_and_send_sends(browser, server):
    ctx = browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True, is_mobile=True)
    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a, context=ctx)
    pb = open_chat(browser, server, b)
    box = pa.locator("#input")
    box.press_sequentially("line one")
    box.press("Enter")
    box.press_sequentially("line two")
    expect(box).to_have_value("line one\nline two")
    pa.locator("#send-btn").tap()
    expect(shown(pb, "line one")).to_have_text("line one\nline two")
    expect(box).to_have_value("")
    ctx.close(), pb.context.close()


################ Tests: the connection (issue 8 items 2 and 9)


def test_private_messages_left_out_of_the_greeting_are_fetched(browser, own_server):
    """When the welcome says "directs_truncated", the page asks for the older
    private messages ({"type":"history","directs":true,"before":ID}) and shows
    them once, in order. The test stands in for the server's side of it."""
    asked: list = []

    def gate(ws):
        srv = ws.connect_to_server()
        held: list = []

        def from_server(message):
            frame = json.loads(message)
            if frame.get("type") == "welcome":
                frame["directs_truncated"] = True
                message = json.dumps(frame)
            elif frame.get("type") == "direct" and frame["text"].startswith("older"):
                held.append(frame)               # "left out" of the connect sequence
                return
            ws.send(message)

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") == "history" and frame.get("directs"):
                asked.append(frame)
                ws.send(json.dumps({"type": "history", "directs": True, "messages": held, "more": False}))
                ws.send(json.dumps({"type": "ack", "ref": frame["ref"]}))
                return
            srv.send(message)
        srv.on_message(from_server)
        ws.on_message(from_page)

    ctx = browser.new_context()
    pa = open_chat(browser, own_server, "UserA", context=ctx)
    pa.close()                                          # UserA is known, and away
    pb = open_chat(browser, own_server, "UserB")
    say(pb, "@UserA older one")
    expect(pb.locator("#conv-title")).to_have_text("UserA")    # B is in the conversation now
    for text in ("older two", "newest"):
        say(pb, text)
        expect(pb.locator("#messages .msg.dm").filter(has_text=text)).to_have_count(1)
    pa = open_chat(browser, own_server, "UserA", context=ctx, route=gate)
    dm_row(pa, "UserB").locator("button").click()
    expect(pa.locator("#messages .msg .text")).to_have_text(["older one", "older two", "newest"])
    newest_id = int(pa.locator("#messages .msg").filter(has_text="newest").get_attribute("data-id"))
    assert len(asked) == 1 and asked[0]["before"] == newest_id and asked[0]["limit"] == 200, asked
    ctx.close(), pb.context.close()


def refused_page(browser, server, route):
    """A new page whose WebSocket is answered by `route` (standing in for a
    server that refuses it), once it says it is reconnecting: (page, state)."""
    page = browser.new_context().new_page()
    page.route_web_socket(re.compile(r"/ws\?"), route)
    page.goto(f"{server.url}/?username={unique('A')}")
    state = page.locator("#conn-state")
    expect(state).to_have_attribute("data-state", "reconnecting")
    return page, state


def test_a_busy_server_makes_the_page_wait_longer(browser, server):
    """Close code 4429 (too many connections or connects) is not fatal, and
    the next try waits at least 15 s instead of about 1 s."""
    def busy(ws):
        ws.close(code=4429, reason="too many connects")

    page, state = refused_page(browser, server, busy)
    expect(state).to_contain_text("The server is busy")
    wait = float(re.search(r"Next try in ([\d.]+) s", state.get_attribute("title")).group(1))
    assert wait >= 15, wait
    expect(page.locator("#login")).to_be_hidden()
    page.context.close()


def test_a_refused_connect_shows_the_servers_reason(browser, server):
    """A 4429 that comes with an error frame (a new name from an address that
    made many lately) shows the server's words, not only "busy"."""
    def refuse(ws):
        ws.send(json.dumps({"type": "error", "code": "rate_limited",
                            "message": "too many new names from your address; try later"}))
        ws.close(code=4429, reason="rate_limited")

    page, state = refused_page(browser, server, refuse)
    expect(state).to_contain_text("too many new names from your address; try later")
    page.context.close()


def connect_bot(stack: contextlib.ExitStack, srv, name: str):
    """A user with no browser: a plain WebSocket client (it answers pings by
    itself and reads only when told), closed with `stack` at the latest.
    Close it sooner to make the user go offline."""
    from websockets.sync.client import connect
    ws = stack.enter_context(connect(f"ws://127.0.0.1:{srv.port}/ws?username={name}", open_timeout=10))
    assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
    return ws


def wait_told(ws, name: str) -> None:
    """Read ws until a presence batch says `name` is online: the server has
    told everyone, so a page opened now gets a count and a list that agree."""
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == "presence" and name in frame["online"]:
            return


def people_names(page) -> list[str]:
    """The names the people list holds, as loaded (drawn or not)."""
    return page.evaluate("() => shownRoster().r.names.slice()")


def scroll_people_to_end(page, loaded: int) -> None:
    """Scroll the sidebar to its end until the list holds `loaded` names."""
    for _ in range(20):
        page.evaluate("() => { const b = document.getElementById('side-scroll'); b.scrollTop = b.scrollHeight; }")
        if len(people_names(page)) >= loaded and page.locator("#people-more").is_hidden():
            return
        page.wait_for_timeout(100)   # the next page is on its way; scroll again once it is drawn
    raise AssertionError(f"loaded {len(people_names(page))} of {loaded}: {people_names(page)}")


def test_scrolling_the_people_list_loads_every_name_page_by_page(browser, tmp_path):
    """With --roster 5 and 12 people, welcome and joined carry 5 names each;
    scrolling the list to its end asks for the next ones ("members" with
    "after": the last name held) until none are left. Every name can be
    reached, online and in the room's member list, and the counts are the
    server's from the start."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--roster", "5")
    srv.start()
    stack = contextlib.ExitStack()
    try:
        tag = uuid.uuid4().hex[:4]
        names = [f"P{i:02d}{tag}" for i in range(11)]
        bots = [connect_bot(stack, srv, n) for n in names]
        wait_told(bots[0], names[-1])
        me = f"P99{tag}"
        asked: list[dict] = []
        ctx = browser.new_context(viewport={"width": 1280, "height": 600})
        page = ctx.new_page()
        errors: list = []
        page.on("pageerror", lambda e: errors.append(e))
        page.on("websocket", lambda ws: ws.on(
            "framesent", lambda payload: asked.append(json.loads(payload))
            if '"members"' in str(payload) else None))
        page.goto(f"{srv.url}/?username={me}")
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
        everyone = sorted(names + [me], key=str.lower)
        expect(page.locator("#online-count")).to_have_text("12")      # online_count, not the 5 loaded
        expect(page.locator("#conv-sub")).to_have_text("12 members")  # member_count
        scroll_people_to_end(page, 12)
        assert people_names(page) == everyone
        for name in everyone:
            expect(person(page, name)).to_have_count(1)
        online_pages = [f for f in asked if "room" not in f]
        assert [f["after"].lower() for f in online_pages] == [everyone[4].lower(), everyone[9].lower()], asked
        expect(person(page, me)).to_contain_text("(you)")

        page.locator("#show-members").click()                          # the room's members
        expect(page.locator("#show-members")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#member-count")).to_have_text("12")
        scroll_people_to_end(page, 12)
        assert people_names(page) == everyone
        assert len([f for f in asked if f.get("room") == "general"]) == 2, asked
        expect(page.locator("#people-list li")).to_have_count(12)
        expect(page.locator("#online-count")).to_have_text("12")
        page.locator("#show-online").click()
        expect(page.locator("#people-h")).to_have_text("People online")
        assert not errors
        ctx.close()
    finally:
        stack.close()
        srv.stop()


def test_counts_follow_presence_and_member_batches(browser, tmp_path):
    """The online count starts at online_count and moves with each batch:
    up for names going online, down for names going offline, names past
    the loaded ones included; our own name in a batch changes nothing. The
    header's member count follows member batches the same way."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--roster", "3",
                 "--offline_grace", "0")
    srv.start()
    stack, bots = contextlib.ExitStack(), {}
    try:
        # A sorts first; the Z names sort after the three loaded ones.
        bots.update((n, connect_bot(stack, srv, n)) for n in ["Bo", "Cy", "Zed1", "Zed2"])
        wait_told(bots["Bo"], "Zed2")
        routes: list = []

        def relay(ws):
            # The real server, but the page's requests for more names are
            # held back: it keeps the 3 it was sent, and the rest must be
            # counted from the batches. (And a frame of our own, below.)
            server = ws.connect_to_server()
            ws.on_message(lambda m: None if '"members"' in str(m) else server.send(m))
            routes.append(ws)

        page = open_chat(browser, srv, "Al", route=relay)
        count, members = page.locator("#online-count"), page.locator("#conv-sub")
        expect(count).to_have_text("5")
        expect(members).to_have_text("5 members")
        assert people_names(page) == ["Al", "Bo", "Cy"]

        bots["Zed1"].close()                                           # past the loaded names
        expect(count).to_have_text("4")
        bots["Bo"].close()                                             # a loaded one
        expect(count).to_have_text("3")
        expect(person(page, "Bo")).to_have_count(0)
        expect(members).to_have_text("5 members")                      # offline is still a member
        for n in ["Ann", "Zed3"]:                                      # together: one batch
            bots[n] = connect_bot(stack, srv, n)
        expect(count).to_have_text("5")
        expect(members).to_have_text("7 members")
        expect(person(page, "Ann")).to_have_count(1)
        bots["Cy"].send(json.dumps({"type": "leave", "room": "general"}))
        expect(members).to_have_text("6 members")
        assert page.evaluate("() => S.people.count") == srv_online(srv)

        # Our own name in a batch (we arrived in the same window as others)
        # changes nothing: welcome counted us already.
        routes[-1].send(json.dumps({"type": "presence", "online": ["Al", "Bo"], "offline": []}))
        expect(count).to_have_text("6")
        routes[-1].send(json.dumps({"type": "presence", "online": [], "offline": ["al", "Bo"]}))
        expect(count).to_have_text("5")
        expect(person(page, "Al")).to_contain_text("(you)")
        bots["Zed2"].close()
        expect(count).to_have_text("4")
        assert not page.js_errors
        page.context.close()
    finally:
        stack.close()
        srv.stop()


def srv_online(srv) -> int:
    with urllib.request.urlopen(srv.url + "/healthz", timeout=5) as r:
        return json.loads(r.read())["users_online"]



################ Tests: conversations that last (issue 11)


def acked(ws, ref) -> None:
    """Read a bot's frames until the ack (or error) of `ref`."""
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame.get("ref") == ref and frame["type"] in ("ack", "error"):
            assert frame["type"] == "ack", frame
            return


def bot_say(ws, room: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        ws.send(json.dumps({"type": "message", "room": room, "text": text, "ref": f"s{i}"}))
    acked(ws, f"s{len(texts) - 1}")


def list_top(page, message_id: str) -> float:
    """Where a message is, in px below the top edge of the message list."""
    return page.evaluate("""(id) => {
        const li = document.querySelector('#msg-list > li[data-id="' + id + '"]');
        return li.getBoundingClientRect().top - document.getElementById('messages').getBoundingClientRect().top;
    }""", message_id)


def test_scrolling_to_the_top_loads_older_messages_in_place(browser, tmp_path):
    """With --history 20 and 120 messages, the page opens with the last 20;
    each scroll to the top brings the page before, and the message that was
    at the top stays where it was, until "Beginning of the conversation".
    Then every message is there once, in order."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--history", "20")
    srv.start()
    stack = contextlib.ExitStack()
    try:
        texts = [f"line {i:03d} of the story" for i in range(120)]
        bot_say(connect_bot(stack, srv, "Teller"), "general", texts)
        page = open_chat(browser, srv, "Reader")
        lines = page.locator("#messages .msg .text")
        expect(lines).to_have_count(20)
        beginning = page.locator("#messages .beginning")
        for _ in range(10):
            if beginning.count():
                break
            n = lines.count()
            first = page.locator("#messages .msg").first.get_attribute("data-id")
            # Where the first message will be when the list is scrolled to its top.
            at_top = list_top(page, first) + page.evaluate("document.getElementById('messages').scrollTop")
            scroll_top(page, 0)
            expect(lines).not_to_have_count(n)
            expect(page.locator("#older-loading")).to_be_hidden()
            # Older messages came in above it, and it stayed where it was.
            assert abs(list_top(page, first) - at_top) <= 2, (list_top(page, first), at_top)
        expect(beginning).to_have_text("Beginning of the conversation in #general")
        assert lines.all_inner_texts() == texts
        ids = [int(i) for i in page.eval_on_selector_all("#messages .msg", "els => els.map(e => e.dataset.id)")]
        assert ids == sorted(set(ids)), ids
        assert not page.js_errors
        page.context.close()
    finally:
        stack.close()
        srv.stop()


def test_tab_to_a_link_in_a_message_keeps_focus_and_place_while_older_ones_load(browser, tmp_path):
    """Tab from the message list to the first link in a message: the list
    scrolls up to it, older messages load above, and the link keeps focus and
    its place on screen (the list is redrawn, focus does not fall to the page)."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--history", "20")
    srv.start()
    stack = contextlib.ExitStack()
    try:
        texts = [f"line {i:03d} of the story" for i in range(120)]
        texts[100] = "line 100 links https://example.org/first-link here"
        bot_say(connect_bot(stack, srv, "Teller"), "general", texts)
        page = open_chat(browser, srv, unique("Tabber"))
        lines = page.locator("#messages .msg .text")
        expect(lines).to_have_count(20)
        link = page.locator('#messages a[href="https://example.org/first-link"]')
        page.locator("#messages").focus()
        page.keyboard.press("Tab")                      # to the first link in the list
        expect(lines).to_have_count(70)                 # the page before (50) came in above
        expect(page.locator("#older-loading")).to_be_hidden()
        expect(link).to_be_focused()
        # Still in view where it was, not at the top of the older messages.
        place = page.evaluate("""() => {
            const a = document.activeElement, m = document.getElementById('messages');
            const r = a.getBoundingClientRect(), b = m.getBoundingClientRect();
            return {top: r.top - b.top, bottom: b.bottom - r.bottom, scroll: m.scrollTop};
        }""")
        assert place["top"] >= 0 and place["bottom"] >= 0 and place["scroll"] > 150, place
        assert not page.js_errors
        page.context.close()
    finally:
        stack.close()
        srv.stop()


def test_search_opens_the_message_in_its_conversation(browser, tmp_path):
    """A word typed in the search box lists the messages with that word
    (whole words, not parts of words), with who, where and the word marked;
    a click opens the conversation at the message, lit up, fetched first
    when the page did not hold it; the messages between it and the newest
    come with a click, none twice."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--history", "20")
    srv.start()
    stack = contextlib.ExitStack()
    try:
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = open_chat(browser, srv, "Ana", context=ctx)
        join(page, "ops")
        room_row(page, "general").locator(".side-item").click()
        ben = connect_bot(stack, srv, "Ben")
        ben.send(json.dumps({"type": "join", "room": "ops", "ref": "j"}))
        acked(ben, "j")
        fillers = [f"filler {i:02d}\nwith more lines\nso that 20 fill the screen" for i in range(30)]
        bot_say(ben, "ops", ["the deploy logs are in /var/log/app", "a deployment is not a match"] + fillers)
        page.close()
        page = open_chat(browser, srv, "Ana", context=ctx)        # holds only the last 20 of #ops
        expect(page.locator("#conv-title")).to_have_text("# general")
        expect(shown(page, "deploy logs")).to_have_count(0)

        page.locator("#search-input").fill("deplo")               # part of a word finds nothing
        page.locator("#search-input").press("Enter")
        expect(page.locator("#search-status")).to_contain_text("Nothing found")
        page.locator("#search-input").fill("deploy logs")
        page.locator("#search-input").press("Enter")
        result = page.locator("#search-results .result")
        expect(result).to_have_count(1)
        expect(result.locator(".from")).to_have_text("Ben")
        expect(result.locator(".where")).to_have_text("#ops")
        expect(result.locator("mark")).to_have_text(["deploy", "logs"])
        expect(page.locator("#messages")).to_be_hidden()           # results stand in for the conversation

        result.click()
        expect(page.locator("#conv-title")).to_have_text("# ops")
        found = page.locator("#messages .msg").filter(has_text="the deploy logs")
        expect(found).to_be_in_viewport()
        expect(found).to_have_class(re.compile(r"\bfound\b"))
        expect(found).to_be_focused()
        gap = page.locator("#messages .note.gap")
        expect(gap).to_have_count(1)                               # the newest 20 are further down
        gap.get_by_role("button").click()
        expect(gap).to_have_count(0)
        texts = page.locator("#messages .msg .text").all_inner_texts()
        assert texts[-32:] == ["the deploy logs are in /var/log/app", "a deployment is not a match"] + fillers, texts
        assert len(texts) == len(set(texts)), texts
        assert not page.js_errors
        ctx.close()
    finally:
        stack.close()
        srv.stop()


def make_link(page) -> str:
    page.locator("#devices-btn").click()
    expect(page.locator("#devices-dialog")).to_be_visible()
    page.locator("#link-make").click()
    expect(page.locator("#link-code")).to_have_text(re.compile(r"\S"))
    link = page.locator("#link-url").input_value()
    code = page.locator("#link-code").inner_text()
    assert link.endswith("link=" + code), (link, code)
    expect(page.locator("#link-expiry")).to_contain_text("until")
    return link


def unread(page, row) -> str:
    """A sidebar row's unread count, "0" for none."""
    badge = row.locator(".unread-badge")
    return badge.inner_text() if badge.count() else "0"


def test_a_device_linked_by_code_shows_the_same_unread_counts(browser, own_server):
    """Another browser opens the link made in the first one: it is signed in
    as the same name, with the same unread counts; reading in the first one
    clears the count in the second; "Sign out" on the first signs the second
    out, and it says so."""
    stack = contextlib.ExitStack()
    try:
        first = open_chat(browser, own_server, "Ana")
        join(first, "side")
        room_row(first, "general").locator(".side-item").click()
        ben = connect_bot(stack, own_server, "Ben")
        ben.send(json.dumps({"type": "join", "room": "side", "ref": "j"}))
        acked(ben, "j")
        bot_say(ben, "side", ["one", "two", "three"])
        ben.send(json.dumps({"type": "message", "text": "@Ana a private word", "ref": "d"}))
        acked(ben, "d")
        expect(room_row(first, "side").locator(".unread-badge")).to_have_text("3")
        expect(dm_row(first, "Ben").locator(".unread-badge")).to_have_text("1")

        link = make_link(first)
        first.locator("#devices-dialog").get_by_role("button", name="Done").click()
        second = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        second.js_errors = []
        second.on("pageerror", lambda e: second.js_errors.append(e))
        second.goto(link)
        expect(second.locator("#conn-state")).to_have_attribute("data-state", "online")
        expect(second.locator("#me-name")).to_have_text("Ana")
        assert "link=" not in second.url                       # used up: not kept in the address bar
        expect(room_row(second, "side").locator(".unread-badge")).to_have_text("3")
        expect(dm_row(second, "Ben").locator(".unread-badge")).to_have_text("1")
        for row in ("general", "side"):
            assert unread(first, room_row(first, row)) == unread(second, room_row(second, row))

        room_row(first, "side").locator(".side-item").click()   # read on the first device
        expect(room_row(second, "side").locator(".unread-badge")).to_have_count(0)
        expect(dm_row(second, "Ben").locator(".unread-badge")).to_have_text("1")
        second.reload()                                         # and after a reload
        expect(second.locator("#conn-state")).to_have_attribute("data-state", "online")
        expect(dm_row(second, "Ben").locator(".unread-badge")).to_have_text("1")
        expect(room_row(second, "side").locator(".unread-badge")).to_have_count(0)

        first.locator("#devices-btn").click()
        devices = first.locator("#device-list li.device")
        expect(devices).to_have_count(2)
        expect(devices.filter(has_text="this device")).to_have_count(1)
        devices.filter(has_not_text="this device").get_by_role("button", name=re.compile("^Sign out")).click()
        expect(devices).to_have_count(1)
        expect(second.locator("#login")).to_be_visible()
        expect(second.locator("#login-err")).to_contain_text("signed out")
        expect(first.locator("#conn-state")).to_have_attribute("data-state", "online")
        assert not first.js_errors and not second.js_errors
        first.context.close(), second.context.close()
    finally:
        stack.close()


def test_logout_warns_first_then_asks_for_a_name(browser, server):
    """"Log out" on the only device says first what it costs: the name stays
    taken until an admin runs --release. After it, the page forgets its key
    and asks for a name, and the old name is still taken."""
    a = unique("A")
    page = open_chat(browser, server, a)
    page.locator("#devices-btn").click()
    expect(page.locator("#device-list li.device")).to_have_count(1)
    page.locator("#logout-start").click()
    warning = page.locator("#logout-confirm")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("only device")
    expect(warning).to_contain_text(f"python chat.py --release {a}")
    expect(warning).to_contain_text("Link another device first")
    warning.get_by_role("button", name="Cancel").click()
    expect(warning).to_be_hidden()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")

    page.locator("#logout-start").click()
    warning.get_by_role("button", name="Log out").click()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-err")).to_contain_text("logged out")
    assert page.evaluate("(k) => localStorage.getItem(k)", f"chat.token.{a.lower()}") is None
    page.locator("#login-form").get_by_role("button").click()    # the same name again: still owned
    expect(page.locator("#login-err")).to_contain_text("taken")
    page.context.close()


def test_the_token_never_travels_in_the_socket_url(browser, server):
    """Proxies log URLs: the page sends its token as the first frame on a
    socket opened with auth=1, never as token= in the address."""
    ctx = browser.new_context()
    sockets: list = []

    def on_ws(ws) -> None:
        entry = {"url": ws.url, "sent": []}
        sockets.append(entry)
        ws.on("framesent", lambda payload: entry["sent"].append(json.loads(payload)))

    ctx.on("page", lambda p: p.on("websocket", on_ws))
    a = unique("A")
    page = open_chat(browser, server, a, context=ctx)
    page.reload()                                       # now with a saved token
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(page.locator("#me-name")).to_have_text(a)
    token = page.evaluate("(k) => localStorage.getItem(k)", f"chat.token.{a.lower()}")
    assert token and len(sockets) == 2, sockets
    assert all("token" not in s["url"] for s in sockets), sockets
    assert "auth=1" not in sockets[0]["url"]             # a new name: nothing to show yet
    assert "auth=1" in sockets[1]["url"]
    assert sockets[1]["sent"][0] == {"type": "auth", "token": token}
    ctx.close()


################ Tests: messages that change (issue 12)


def msg_row(page, text: str):
    """The message on screen whose text contains `text`."""
    return page.locator("#msg-list > li.msg").filter(has=page.locator(".text", has_text=text))


def act(page, text: str, action: str) -> None:
    """Point at a message and click one of its actions (Reply, React, Edit, Delete)."""
    msg_row(page, text).hover()
    page.locator("#msg-actions").get_by_role("button", name=action, exact=True).click()


def say_acked(ws, frame: dict) -> int:
    """A bot's frame, sent; the id its ack gives."""
    ref = uuid.uuid4().hex[:8]
    ws.send(json.dumps({**frame, "ref": ref}))
    while True:
        got = json.loads(ws.recv(timeout=10))
        if got.get("ref") == ref:
            assert got["type"] == "ack", got
            return got["id"]


def test_an_edit_and_a_delete_in_one_window_show_in_the_other(browser, server):
    """The author edits through the message's actions: both windows show the
    new text marked "edited" (the time in its title). Delete asks first; once
    confirmed both windows say "message deleted", and the old text is nowhere
    in the other window's page. Others' messages offer no Edit or Delete."""
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    draft, doomed = unique("first draft "), unique("regret this ")
    for text in (draft, doomed):
        say(pa, text)
        expect(shown(pb, text)).to_have_count(1)

    act(pa, draft, "Edit")
    expect(pa.locator("#compose-label")).to_have_text("Editing:")
    expect(pa.locator("#compose-quote")).to_have_text(draft)
    expect(pa.locator("#input")).to_have_value(draft)
    expect(pa.locator("#send-label")).to_have_text("Save")
    fixed = unique("fixed text ")
    pa.locator("#input").fill(fixed)
    pa.locator("#input").press("Enter")
    for p in (pa, pb):
        edited = msg_row(p, fixed).locator(".edited")
        expect(edited).to_have_text("edited")
        expect(edited).to_have_attribute("title", re.compile(r"^Edited \d"))
        expect(shown(p, draft)).to_have_count(0)
    expect(pa.locator("#compose-bar")).to_be_hidden()
    expect(pa.locator("#input")).to_have_value("")

    msg_row(pb, fixed).hover()                               # B may reply and react, not edit
    expect(pb.locator("#msg-actions")).to_be_visible()
    expect(pb.locator('#msg-actions [data-act="reply"]')).to_be_visible()
    expect(pb.locator('#msg-actions [data-act="edit"]')).to_be_hidden()
    expect(pb.locator('#msg-actions [data-act="delete"]')).to_be_hidden()

    dialog = pa.locator("#delete-dialog")
    doomed_id = msg_row(pb, doomed).get_attribute("data-id")
    act(pa, doomed, "Delete")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()     # asked first: nothing happens
    expect(dialog).to_be_hidden()
    expect(shown(pb, doomed)).to_have_count(1)
    act(pa, doomed, "Delete")
    dialog.get_by_role("button", name="Delete").click()
    for p in (pa, pb):
        expect(p.locator(f'#msg-list > li.msg.deleted[data-id="{doomed_id}"] .text')).to_have_text("message deleted")
        expect(shown(p, doomed)).to_have_count(0)
    html = pb.content()
    assert doomed not in html and draft not in html
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_a_reply_quotes_its_original_and_the_quote_leads_there(browser, tmp_path):
    """A reply shows its quote above its text. With --history 20 and 60
    messages between them, the original is not loaded: clicking the quote
    fetches it and lights it up in view. Replying from the page, the composer
    says "Replying to NAME: quote", and the message sent carries reply_to.
    When the original is deleted, its replies say "message deleted"."""
    srv = Server(tmp_path / "chat.db", "--rate", "0", "--names_per_hour", "0", "--history", "20")
    srv.start()
    stack = contextlib.ExitStack()
    try:
        teller = connect_bot(stack, srv, "Teller")
        original = say_acked(teller, {"type": "message", "room": "general", "text": "the original question"})
        bot_say(teller, "general", [f"filler {i:02d}" for i in range(60)])
        say_acked(teller, {"type": "message", "room": "general", "text": "the answer", "reply_to": original})
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        sent = frames_sent(ctx)
        page = open_chat(browser, srv, "Reader", context=ctx)
        quote = msg_row(page, "the answer").locator(".quote")
        expect(quote).to_contain_text("the original question")
        expect(shown(page, "the original question")).to_have_count(0)     # only its quote is here
        quote.click()
        found = msg_row(page, "the original question")
        expect(found).to_be_in_viewport()
        expect(found).to_have_class(re.compile(r"\bfound\b"))
        expect(quote).to_contain_text("Teller: the original question")   # held now: the quote names its author

        act(page, "filler 59", "Reply")
        bar = page.locator("#compose-bar")
        expect(page.locator("#compose-label")).to_have_text("Replying to Teller:")
        expect(page.locator("#compose-quote")).to_have_text("filler 59")
        expect(page.locator("#input")).to_be_focused()
        say(page, "my own reply")
        expect(msg_row(page, "my own reply").locator(".quote")).to_contain_text("filler 59")
        expect(bar).to_be_hidden()
        filler_id = int(msg_row(page, "filler 59").get_attribute("data-id"))
        assert [f.get("reply_to") for f in sent if f.get("text") == "my own reply"] == [filler_id], sent

        teller.send(json.dumps({"type": "delete", "id": original}))
        expect(quote.locator(".gone")).to_have_text("message deleted")
        expect(page.locator("body")).not_to_contain_text("the original question")
        assert not page.js_errors
        ctx.close()
    finally:
        stack.close()
        srv.stop()


def test_a_reaction_toggled_from_two_windows(browser, server):
    """React opens eight emoji; a reaction shows as a chip with a count and,
    in its tooltip, who reacted; your own is marked. Clicking a chip adds or
    takes back yours: 1, 2, then 1 again, in both windows. The keyboard
    reaches the same actions through the message's "…" button."""
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    text = unique("react to me ")
    say(pa, text)
    expect(shown(pb, text)).to_have_count(1)

    # A, by keyboard: the list, ↑ to the message, Tab to "…", Enter, → React, Enter, → ❤️, Enter.
    pa.locator("#messages").focus()
    pa.keyboard.press("ArrowUp")
    expect(msg_row(pa, text)).to_be_focused()
    pa.keyboard.press("Tab")
    more = pa.locator("#msg-more")
    expect(more).to_be_focused()
    pa.keyboard.press("Enter")
    expect(pa.locator('#msg-actions [data-act="reply"]')).to_be_focused()
    pa.keyboard.press("Escape")                              # Esc closes, back on "…"
    expect(more).to_be_focused()
    expect(more).to_have_attribute("aria-expanded", "false")
    pa.keyboard.press("Enter")
    pa.keyboard.press("ArrowRight")
    expect(pa.locator('#msg-actions [data-act="react"]')).to_be_focused()
    pa.keyboard.press("Enter")
    expect(pa.locator("#emoji-picker button")).to_have_count(8)
    pa.keyboard.press("ArrowRight")
    expect(pa.get_by_role("button", name="React with heart")).to_be_focused()
    pa.keyboard.press("Enter")
    heart = msg_row(pb, text).locator('.chip[data-emoji="❤️"]')
    expect(heart.locator(".chip-count")).to_have_text("1")
    expect(heart).to_have_attribute("title", a)

    # B, by mouse: React, 👍.
    act(pb, text, "React")
    pb.get_by_role("button", name="React with thumbs up").click()
    expect(pb.locator("#emoji-picker")).to_be_hidden()
    chip = {p: msg_row(p, text).locator('.chip[data-emoji="👍"]') for p in (pa, pb)}
    for p in (pa, pb):
        expect(chip[p].locator(".chip-count")).to_have_text("1")
        expect(chip[p]).to_have_attribute("title", b)
    expect(chip[pb]).to_have_attribute("aria-pressed", "true")   # yours is marked
    expect(chip[pa]).to_have_attribute("aria-pressed", "false")

    chip[pa].click()                                         # A adds theirs
    for p in (pa, pb):
        expect(chip[p].locator(".chip-count")).to_have_text("2")
        expect(chip[p]).to_have_attribute("title", f"{b}, {a}")
    expect(chip[pa]).to_have_attribute("aria-pressed", "true")
    chip[pb].click()                                         # B takes theirs back
    for p in (pa, pb):
        expect(chip[p].locator(".chip-count")).to_have_text("1")
        expect(chip[p]).to_have_attribute("title", a)
    expect(chip[pb]).to_have_attribute("aria-pressed", "false")
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_a_window_offline_during_an_edit_and_a_delete_shows_both_after_reconnect(browser, server):
    """B's socket is dropped and held closed while A edits one message and
    deletes another (which B had replied to). Back online, B resumes with
    since=: it shows the edit and the deletion, its reply quotes "message
    deleted", each message once, and neither old text is anywhere in its page."""
    held = threading.Event()
    routes: list = []

    def gate(ws):
        if held.is_set():
            ws.close(code=1013, reason="held by the test")
        else:
            routes.append((ws, ws.connect_to_server()))

    a, b = unique("A"), unique("B")
    pa = open_chat(browser, server, a)
    pb = open_chat(browser, server, b, route=gate)
    old, doomed = unique("old wording "), unique("soon gone ")
    for text in (old, doomed):
        say(pa, text)
        expect(shown(pb, text)).to_have_count(1)
    act(pb, doomed, "Reply")
    say(pb, "answering that")
    expect(msg_row(pa, "answering that").locator(".quote")).to_contain_text(doomed)

    doomed_id = msg_row(pb, doomed).get_attribute("data-id")
    held.set()
    page_side, server_side = routes[-1]
    page_side.close(code=1001, reason="dropped by the test")
    server_side.close()
    expect(pb.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")

    new = unique("new wording ")
    act(pa, old, "Edit")
    pa.locator("#input").fill(new)
    pa.locator("#input").press("Enter")
    expect(msg_row(pa, new).locator(".edited")).to_be_visible()
    act(pa, doomed, "Delete")
    pa.locator("#delete-dialog").get_by_role("button", name="Delete").click()
    expect(msg_row(pa, "answering that").locator(".quote .gone")).to_have_text("message deleted")
    expect(shown(pb, old)).to_have_count(1)                  # B was away: it could not know yet

    held.clear()
    pb.locator("#retry-now").click()
    expect(pb.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=40_000)
    expect(msg_row(pb, new).locator(".edited")).to_have_text("edited")
    expect(pb.locator(f'#msg-list > li.msg[data-id="{doomed_id}"]')).to_have_class(re.compile(r"\bdeleted\b"))
    expect(msg_row(pb, "answering that").locator(".quote .gone")).to_have_text("message deleted")
    ids = pb.eval_on_selector_all("#msg-list > li.msg", "els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)), ids
    for p in (pa, pb):
        html = p.content()
        assert old not in html and doomed not in html
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_arrow_up_edits_your_last_message_and_esc_cancels(browser, server):
    """↑ in an empty message box edits your last message in the open
    conversation (not someone else's, not with a draft in the box): the
    composer says "Editing" with its text; Esc gives the box back as it was;
    Enter saves."""
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, server, a), open_chat(browser, server, b)
    earlier, last, theirs = unique("earlier "), unique("my last "), unique("theirs ")
    for page, text in ((pa, earlier), (pa, last), (pb, theirs)):
        say(page, text)
        expect(shown(pa, text)).to_have_count(1)
    box, bar = pa.locator("#input"), pa.locator("#compose-bar")
    box.fill("a draft")
    box.press("ArrowUp")                                     # a draft in the box: ↑ only moves the caret
    expect(bar).to_be_hidden()
    box.fill("")
    box.press("ArrowUp")
    expect(pa.locator("#compose-label")).to_have_text("Editing:")
    expect(pa.locator("#compose-quote")).to_have_text(last)
    expect(box).to_have_value(last)
    box.press("Escape")
    expect(bar).to_be_hidden()
    expect(box).to_have_value("")
    expect(msg_row(pa, last).locator(".edited")).to_have_count(0)

    box.press("ArrowUp")
    changed = unique("changed ")
    box.fill(changed)
    box.press("Enter")
    expect(msg_row(pb, changed).locator(".edited")).to_be_visible()
    expect(shown(pb, last)).to_have_count(0)
    expect(shown(pb, earlier)).to_have_count(1)
    expect(shown(pb, theirs)).to_have_count(1)
    expect(box).to_have_value("")
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


def test_a_refused_change_is_told_in_a_plain_sentence(browser, server):
    """not_found, forbidden and too_late each read as a sentence, never the
    server's wording; a refused edit's text comes back to the box. (The
    server's answers stand in here: the real ones need a deleted message, a
    second author or an --edit_window.)"""
    answer = {"code": ""}

    def refuse(ws):
        server_side = ws.connect_to_server()

        def from_page(message):
            frame = json.loads(message)
            if frame.get("type") in ("edit", "delete", "react") and answer["code"]:
                ws.send(json.dumps({"type": "error", "code": answer["code"], "message": "SERVER WORDS",
                                    "ref": frame["ref"]}))
            else:
                server_side.send(message)
        ws.on_message(from_page)

    a = unique("A")
    pa = open_chat(browser, server, a, route=refuse)
    text = unique("try to change me ")
    say(pa, text)
    expect(msg_row(pa, text)).to_have_count(1)
    box, error = pa.locator("#input"), pa.locator("#error")
    for code, sentence in (("too_late", "It is too late to change that message"),
                           ("forbidden", "Only the person who wrote a message can edit or delete it."),
                           ("not_found", "That message is not there any more")):
        answer["code"] = code
        box.fill("")
        box.press("ArrowUp")
        box.fill(f"{code} attempt")
        box.press("Enter")
        expect(error).to_contain_text(sentence)
        expect(error).to_contain_text("Your text is back in the message box.")
        expect(box).to_have_value(f"{code} attempt")
        expect(error).not_to_contain_text("SERVER WORDS")
    answer["code"] = "too_late"
    box.fill("")
    act(pa, text, "React")
    pa.get_by_role("button", name="React with eyes").click()
    expect(error).to_have_text(re.compile(r"^It is too late to change that message"))
    expect(shown(pa, text)).to_have_count(1)
    assert not pa.js_errors
    pa.context.close()


################ Tests: two processes over Redis (issue 13)


@pytest.fixture
def redis_pair(tmp_path):
    """Two chat.py processes sharing one redis-server: one server to a user."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []
    try:
        for n in range(2):
            srv = Server(tmp_path / f"unused{n}.db", "--rate", "0", "--names_per_hour", "0",
                         "--redis", f"redis://127.0.0.1:{port}/0", "--presence_window", "0")
            for _ in range(50):  # redis-server takes a moment to listen; chat.py refuses to start before
                try:
                    srv.start()
                    break
                except RuntimeError:
                    srv.log.clear()
                    threading.Event().wait(0.1)
            else:
                raise RuntimeError("chat.py could not reach redis-server")
            servers.append(srv)
        yield servers
    finally:
        for srv in servers:
            srv.stop()
        redis.kill()
        redis.wait(5)


def test_two_processes_over_redis_are_one_chat(browser, redis_pair):
    p1, p2 = redis_pair
    a, b = unique("A"), unique("B")
    pa, pb = open_chat(browser, p1, a), open_chat(browser, p2, b)
    expect(person(pa, b).locator(".dot")).to_have_attribute("data-presence", "online")
    text = unique("across processes ")
    say(pa, text)
    expect(shown(pb, text)).to_have_count(1)
    expect(pa.locator("#messages .msg.own").filter(has_text=text)).to_have_count(1)
    secret = unique("private ")
    say(pb, f"@{a} {secret}")
    expect(dm_row(pa, b).locator(".badge")).to_have_text("1")
    dm_row(pa, b).locator("button").click()
    expect(shown(pa, secret)).to_have_count(1)
    # A reload of B lands on the same process and finds both messages, once each.
    pb.reload()
    expect(pb.locator("#conn-state")).to_have_attribute("data-state", "online")
    expect(shown(pb, text)).to_have_count(1)
    assert not pa.js_errors and not pb.js_errors
    pa.context.close(), pb.context.close()


################ Screenshots for the README (opt-in)


@pytest.mark.skipif(not os.environ.get("SCREENSHOTS"), reason="set SCREENSHOTS=1 to save docs/*.png")
def test_screenshots(browser, own_server):
    """docs/desktop.png: the New divider and the Private chip; docs/phone.png:
    "N new ↓" and the ☰ badge; docs/dark.png: dark mode, a failed send."""
    docs = HERE / "docs"
    docs.mkdir(exist_ok=True)
    alice = open_chat(browser, own_server, "Alice")
    bob = open_chat(browser, own_server, "Bob")
    carol = open_chat(browser, own_server, "Carol")
    for page in (alice, bob, carol):
        join(page, "python")
    for page, text in [
        (bob, "Has anyone tried the new asyncio TaskGroup API?"),
        (carol, "Yes! It makes cancellation much easier to reason about."),
        (carol, "The docs are good: https://docs.python.org/3/library/asyncio-task.html"),
        (alice, "I moved our worker pool to it last week. Fewer leaks."),
    ]:
        say(page, text)
        expect(shown(alice, text)).to_have_count(1)
    for page in (bob, carol):
        room_row(page, "general").locator(".side-item").click()
    for page, text, *rest in [
        (carol, "Morning all, standup in 10 minutes"),
        (bob, "On my way."),
        (bob, "Running two minutes late, start without me"),
        (carol, "No rush. Agenda: the 2.4 release, the phone app, and lunch plans."),
        (bob, "Back. I red the notes from yesterday, looks good."),
        (carol, "Dana from the Tel Aviv office joins us today; she says:"),
        (carol, "שלום לכולם, נתראה בפגישה!"),
        (bob, "Can someone share the release notes?"),
        (carol, "Thanks! The reconnect fix is a big one for the phone app.", "I red the notes"),
        (bob, "Agreed, no more lost messages on flaky Wi-Fi. @Alice is it in 2.4?"),
    ]:
        if len(rest) == 1:
            act(page, rest[0], "Reply")
        say(page, text)
        expect(shown(bob, text.split("\n")[0])).to_have_count(1)
    # Messages that change: a typo fixed, reactions, one taken back.
    act(bob, "I red the notes", "Edit")
    bob.locator("#input").fill("Back. I read the notes from yesterday, looks good.")
    bob.locator("#input").press("Enter")
    expect(msg_row(carol, "I read the notes").locator(".edited")).to_be_visible()
    for page, text, emoji in [(bob, "The reconnect fix", "party"), (carol, "The reconnect fix", "party"),
                              (carol, "On my way", "thumbs up")]:
        act(page, text, "React")
        page.get_by_role("button", name=f"React with {emoji}").click()
    expect(msg_row(bob, "The reconnect fix").locator(".chip-count")).to_have_text("2")
    act(bob, "Running two minutes late", "Delete")
    bob.locator("#delete-dialog").get_by_role("button", name="Delete").click()
    expect(shown(carol, "Running two minutes late")).to_have_count(0)
    expect(room_row(alice, "general").locator(".mention-badge")).to_have_text("@1")
    room_row(alice, "general").locator(".side-item").click()     # opens at the New divider
    expect(alice.locator("#new-divider")).to_be_visible()
    say(carol, "@Alice lunch at 12:30?")
    expect(dm_row(alice, "Carol").locator(".badge")).to_have_text("1")
    expect(carol.locator("#conv-title")).to_have_text("Alice")   # the private message opened it
    room_row(carol, "general").locator(".side-item").click()
    bob.evaluate("S.typingSent.clear()")     # Bob's last hint went seconds ago; the picture wants one now
    bob.locator("#input").fill("typing")
    bob.locator("#input").press("Space")
    expect(alice.locator("#typing")).to_contain_text("Bob is typing")
    alice.locator("#input").fill("@Bob yes, it is in 2.4: I will send you the notes")
    expect(alice.locator("#private-chip")).to_be_visible()
    msg_row(alice, "No rush. Agenda").hover()               # a message's actions
    expect(alice.locator("#msg-actions")).to_be_visible()
    alice.screenshot(path=str(docs / "desktop.png"))

    # Bob on a phone, reading back while the room goes on.
    phone_ctx = browser.new_context(viewport={"width": 375, "height": 740},
                                    storage_state=bob.context.storage_state())
    phone = open_chat(browser, own_server, "Bob", context=phone_ctx)
    expect(shown(phone, "Morning all")).to_have_count(1)
    scroll_top(phone, 0)
    for text in ("Release notes are up: https://example.org/releases/2.4",
                 "Nice work everyone", "Demo after lunch?"):
        say(carol, text)
    expect(phone.locator("#jump-new")).to_have_text("3 new ↓")
    say(alice, "@Bob sent!")
    expect(phone.locator("#menu-badge")).to_be_visible()
    expect(alice.locator("#conv-title")).to_have_text("Bob")
    room_row(alice, "general").locator(".side-item").click()
    phone.screenshot(path=str(docs / "phone.png"))

    # Carol in dark mode, with a message that could not go.
    dark_ctx = browser.new_context(viewport={"width": 1100, "height": 700}, color_scheme="dark",
                                   storage_state=carol.context.storage_state())
    dark = open_chat(browser, own_server, "Carol", context=dark_ctx)
    expect(shown(dark, "Demo after lunch?")).to_have_count(1)
    say(dark, "@Nobody99 are you coming to the demo?")     # nobody of that name: it cannot go
    expect(dark.locator("#pending-list .status")).to_contain_text("Not sent")
    dark.locator("#input").fill("Demo at 2 works for me")
    dark.screenshot(path=str(docs / "dark.png"))
    for page in (alice, bob, carol, phone, dark):
        page.context.close()


if __name__ == "__main__":
    if "--screenshots" in sys.argv:
        os.environ["SCREENSHOTS"] = "1"
        sys.exit(pytest.main(["-q", __file__, "-k", "screenshots"]))
    sys.exit(pytest.main(["-q", __file__]))
