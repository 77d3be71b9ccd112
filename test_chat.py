"""Tests for chat.py: one test per rule of the protocol (see README, "Protocol").

Run them with ``python -m pytest -q test_chat.py``.

Every test builds a fresh server with ``chat.make_app(db=":memory:", ...)``
(``make_app`` resets the Hub's class-level state; ``FileCase`` uses a database
file and can ``restart()``), talks to it through
``websocket_connect`` as a page would, and awaits frames instead of sleeping.
To show that something did NOT arrive, a test sends a later frame with a
``ref`` (``{"type":"rooms","ref":...}``) and checks that its answer is the next
thing received: the server answers each connection's frames in order.

Sections: helpers; connecting and names; rooms; direct messages; errors and
limits; origin, Unicode, HTTP; the property test; persistence and resume
(issue 3, including subprocess tests of SIGKILL/SIGTERM); slow consumers,
liveness and connection caps (issue 5); hardening (issue 8: locks, floods,
pings, Host, the listener, budgets, client ids); connect cost (issue 9:
batches, rosters, storms, /metrics); guards found by mutation (``mutate.py``);
scroll-back, search, read markers, devices and auth frames (issue 11);
messages that change (issue 12).
"""

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import time
import unittest
from unittest import mock
from urllib.parse import urlencode

from hypothesis import HealthCheck, given, settings, strategies as st
from tornado import gen
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream
from tornado.testing import AsyncHTTPTestCase, bind_unused_port, gen_test
from tornado.web import HTTPError
from tornado.websocket import websocket_connect

import chat

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_PY = os.path.join(HERE, "chat.py")

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # UTC, milliseconds
TIME = re.compile(r"^\d\d:\d\d:\d\d$")  # the default --timestamp_format %H:%M:%S
ERROR_CODES = {"bad_json", "bad_request", "bad_room", "not_in_room", "too_long",
               "unknown_user", "mailbox_full", "rate_limited", "too_many_rooms"}
READ_TIMEOUT = 4  # seconds to wait for one frame before failing with a message
async_test = gen_test(timeout=15)


################ Helpers


class ChatTestCase(AsyncHTTPTestCase):
    """A fresh chat server per test, and a few words to speak its protocol."""

    app_options: dict = {}  # per-class make_app overrides (max_text=10, ...)
    app_db = ":memory:"  # FileCase gives each test a file

    def get_app(self):
        # Limits get their own tests; presence is told at once.
        return chat.make_app(**{**dict(db=self.app_db, rate=0, names_per_hour=0, connects_per_minute=0,
                                       offline_grace=0, presence_window=0), **self.app_options})

    def setUp(self):
        super().setUp()
        self.sockets = []  # every client connection, closed in tearDown
        self.tokens = {}  # user name -> token from its welcome
        self.refs = 0

    def tearDown(self):
        for ws in self.sockets:
            ws.close()
        super().tearDown()

    # ---- connecting

    def url(self, port=None, **params):
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return "ws://127.0.0.1:%d/ws?%s" % (port or self.get_http_port(), query)

    async def open_ws(self, name=None, token=None, since=None, headers=None, port=None):
        """The bare WebSocket, nothing read yet."""
        request = HTTPRequest(self.url(port, username=name, token=token, since=since),
                              headers=headers)
        ws = await websocket_connect(request)
        self.sockets.append(ws)
        return ws

    async def connect(self, name, token=None, since=None, port=None):
        """Connect as `name`; return (ws, welcome) once the welcome and one
        `joined` per room of the user have arrived (kept in ws.joined)."""
        ws = await self.open_ws(name, token, since, port=port)
        welcome = await self.read(ws, "the welcome of %s" % name)
        self.assertEqual(welcome["type"], "welcome", welcome)
        self.tokens[welcome["user"]] = welcome["token"]
        ws.joined = {}
        for room in welcome["rooms"]:
            joined = await self.read(ws, "joined %s" % room)
            self.assertEqual(joined["type"], "joined", joined)
            ws.joined[joined["room"]] = joined
        self.assertEqual(sorted(ws.joined), sorted(welcome["rooms"]))
        return ws, welcome

    async def pair(self):
        """UserA and UserB online in the default room, nothing left unread."""
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        await self.sync(a)  # UserB's presence and member frames
        return a, b

    async def refused(self, code, close_code, **params):
        """Connect with these query parameters; expect exactly one error
        frame with `code`, then a close with `close_code`."""
        request = HTTPRequest(self.url(params.pop("port", None), **params))
        ws = await websocket_connect(request)
        self.sockets.append(ws)
        frames = []
        for _ in range(10):
            msg = await self.raw_read(ws, "the %s error" % code)
            if msg is None:
                break
            frames.append(json.loads(msg))
        self.assertEqual(len(frames), 1, "expected only the error frame, got %r" % frames)
        self.assertEqual(frames[0]["type"], "error", frames)
        self.assertEqual(frames[0]["code"], code, frames)
        self.assertIsInstance(frames[0]["message"], str)
        self.assertEqual(ws.close_code, close_code)
        return frames[0]

    # ---- reading

    async def raw_read(self, ws, what):
        try:
            return await gen.with_timeout(datetime.timedelta(seconds=READ_TIMEOUT),
                                          ws.read_message())
        except gen.TimeoutError:
            self.fail("nothing arrived within %ss while waiting for %s" % (READ_TIMEOUT, what))

    async def read(self, ws, what="a frame"):
        """The next frame, decoded; fails clearly if the server closed."""
        msg = await self.raw_read(ws, what)
        if msg is None:
            self.fail("connection closed (code %r, reason %r) while waiting for %s"
                      % (ws.close_code, ws.close_reason, what))
        self.assertIsInstance(msg, str, "the server sends text frames only")
        frame = json.loads(msg)
        self.assertIsInstance(frame, dict)
        self.assertIn("type", frame)
        return frame

    async def until(self, ws, type_, **fields):
        """Read up to the first frame of `type_` with these fields; return
        (frame, the frames skipped before it)."""
        skipped = []
        for _ in range(2000):
            frame = await self.read(ws, "a %r frame with %r (skipped %r)" % (type_, fields, skipped[-5:]))
            if frame["type"] == type_ and all(frame.get(k) == v for k, v in fields.items()):
                return frame, skipped
            skipped.append(frame)
        self.fail("no %r frame among %d frames" % (type_, len(skipped)))

    async def expect(self, ws, type_, **fields):
        frame, _ = await self.until(ws, type_, **fields)
        return frame

    async def presence(self, ws, name, status):
        """Read up to the presence frame that lists `name` as `status`
        ("online" or "offline"); return it."""
        for _ in range(2000):
            frame = await self.expect(ws, "presence")
            self.assertEqual(set(frame), {"type", "online", "offline"}, frame)
            if name in frame[status]:
                return frame
        self.fail("%s never went %s" % (name, status))

    async def member(self, ws, room, name, action):
        """Read up to the member frame of `room` that lists `name` as
        "joined" or "left" (action "join" or "leave"); return it."""
        listed = {"join": "joined", "leave": "left"}[action]
        for _ in range(2000):
            frame = await self.expect(ws, "member", room=room)
            self.assertEqual(set(frame), {"type", "room", "joined", "left"}, frame)
            if name in frame[listed]:
                return frame
        self.fail("%s never %s %s" % (name, listed, room))

    # ---- sending

    def send(self, ws, **frame):
        ws.write_message(json.dumps(frame))

    def ref(self):
        self.refs += 1
        return "~ref~%d" % self.refs

    async def answer(self, ws, ref):
        """(the ack or error carrying `ref`, the frames before it)."""
        before = []
        for _ in range(2000):
            frame = await self.read(ws, "the answer to ref %r (before it: %r)" % (ref, before[-5:]))
            if frame["type"] in ("ack", "error") and frame.get("ref") == ref:
                return frame, before
            before.append(frame)
        self.fail("no answer to ref %r" % ref)

    async def request(self, ws, **frame):
        """Send `frame` with a fresh ref; return (answer, frames before it)."""
        frame.setdefault("ref", self.ref())
        self.send(ws, **frame)
        return await self.answer(ws, frame["ref"])

    async def ack(self, ws, **frame):
        """Send `frame`; it must be acked. Returns (ack, frames before it)."""
        answer, before = await self.request(ws, **frame)
        self.assertEqual(answer["type"], "ack", "expected an ack for %r, got %r" % (frame, answer))
        return answer, before

    async def reply(self, ws, type_, **frame):
        """Send `frame`; return its answer of `type_` (joined, left, rooms),
        which may come before or after the ack."""
        _, before = await self.ack(ws, **frame)
        found = [f for f in before if f["type"] == type_]
        return found[0] if found else await self.expect(ws, type_)

    async def sync(self, ws):
        """Everything that arrived before the answer to a `rooms` request
        (the `rooms` answer itself left out)."""
        _, before = await self.ack(ws, type="rooms")
        answers = [f for f in before if f["type"] == "rooms"]
        if answers:
            before.remove(answers[-1])
        else:
            await self.expect(ws, "rooms")
        return before

    async def quiet(self, ws, who="this connection"):
        """Nothing has arrived that the test did not expect."""
        self.assertEqual(await self.sync(ws), [], "%s received unexpected frames" % who)

    async def error(self, ws, code, **frame):
        """Send `frame` (with a ref unless given); the answer is an error with
        `code`, and nothing else came first."""
        frame.setdefault("ref", self.ref())
        self.send(ws, **frame)
        return await self.next_error(ws, code, frame["ref"])

    async def next_error(self, ws, code, ref=None):
        err = await self.read(ws, "a %s error" % code)
        self.assertEqual(err["type"], "error", err)
        self.assertEqual(err["code"], code, err)
        self.assertIsInstance(err["message"], str)
        self.assertTrue(err["message"].strip())
        if ref is None:
            self.assertNotIn("ref", err)
            self.assertEqual(set(err), {"type", "code", "message"})
        else:
            self.assertEqual(err.get("ref"), ref, "the error must carry the frame's ref: %r" % err)
            self.assertEqual(set(err), {"type", "code", "message", "ref"})
        return err

    async def say(self, ws, text, room=None):
        """Post `text` (to `room`, or the default room; "@name text" is a
        DM); return its ack once the sender's own copy has arrived too."""
        frame = dict(type="message", text=text)
        if room is not None:
            frame["room"] = room
        ack, before = await self.ack(ws, **frame)
        if not any(f.get("id") == ack["id"] for f in before):
            await self.expect(ws, "direct" if text.startswith("@") else "message", id=ack["id"])
        return ack

    async def still_serving(self, a, b, room="general"):
        """After a bad input from `a`: a's next message is acked, and the
        message is the very next thing b receives (b got nothing else)."""
        text = "ok %d" % self.refs  # short: TooLongTest allows 10 characters
        ack = await self.say(a, text, room)
        got = await self.read(b, "the message %r" % text)
        self.assertEqual((got["type"], got.get("text"), got.get("id")), ("message", text, ack["id"]),
                         "the other user received something else first")
        await self.quiet(a, "the sender")
        await self.quiet(b, "the other user")

    def batches(self):
        """A queue that gets an item each time the Announcer sends its presence
        and member batches (call it before the changes it should see)."""
        queue = asyncio.Queue()
        real = chat.Announcer.flush.__func__

        def flush(cls):
            real(cls)
            queue.put_nowait(None)

        patcher = mock.patch.object(chat.Announcer, "flush", classmethod(flush))
        patcher.start()
        self.addCleanup(patcher.stop)
        return queue

    async def batch_sent(self, queue):
        await asyncio.wait_for(queue.get(), READ_TIMEOUT)

    async def health(self, port=None):
        response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/healthz" % (port or self.get_http_port()))
        return json.loads(response.body)

    async def wait_health(self, **want):
        """Fetch /healthz until its fields equal `want` (the server has
        processed closes we cannot otherwise observe)."""
        for _ in range(500):
            h = await self.health()
            if all(h[k] == v for k, v in want.items()):
                return h
        self.fail("/healthz never showed %r (last %r)" % (want, h))

    def assert_message(self, frame, text, sender, room="general"):
        """The shape of a room message."""
        self.assertEqual(set(frame), {"type", "id", "room", "from", "text", "ts", "time"}, frame)
        self.assertEqual((frame["type"], frame["room"], frame["from"], frame["text"]),
                         ("message", room, sender, text))
        self.assert_stamps(frame)

    def assert_direct(self, frame, text, sender, to, **flags):
        """The shape of a direct message (with `buffered`/`queued` flags)."""
        self.assertEqual(set(frame), {"type", "id", "from", "to", "text", "ts", "time"} | set(flags), frame)
        self.assertEqual((frame["type"], frame["from"], frame["to"], frame["text"]),
                         ("direct", sender, to, text))
        for flag, value in flags.items():
            self.assertIs(frame[flag], value)
        self.assert_stamps(frame)

    def assert_stamps(self, frame):
        self.assertIs(type(frame["id"]), int)
        self.assertRegex(frame["ts"], TS)
        self.assertRegex(frame["time"], TIME)
        ts = datetime.datetime.fromisoformat(frame["ts"][:-1] + "+00:00")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLess(abs((now - ts).total_seconds()), 60, "ts is not now in UTC")
        # `time` is the same instant in the server's local time
        self.assertEqual(frame["time"], ts.astimezone().strftime("%H:%M:%S"))


################ Connecting and names


class ConnectTest(ChatTestCase):

    @async_test
    async def test_welcome_then_joined_per_room_then_buffered_directs(self):
        """welcome, then one joined per room of the user, then buffered DMs."""
        a, b = await self.pair()
        await self.ack(b, type="join", room="python")
        b.close()
        await self.presence(a, "UserB", "offline")
        dm = await self.say(a, "@UserB while you were away")

        b = await self.open_ws("UserB", self.tokens["UserB"])
        welcome = await self.read(b)
        self.assertEqual(welcome["type"], "welcome")
        self.assertLessEqual({"type", "user", "token", "online", "rooms", "default_room", "max_text"},
                             set(welcome))
        self.assertEqual(welcome["user"], "UserB")
        self.assertEqual(sorted(welcome["online"]), ["UserA", "UserB"])
        self.assertEqual(sorted(welcome["rooms"]), ["general", "python"])
        self.assertEqual((welcome["default_room"], welcome["max_text"]), ("general", 2000))
        joined = [await self.read(b), await self.read(b)]
        self.assertEqual([f["type"] for f in joined], ["joined", "joined"])
        self.assertEqual(sorted(f["room"] for f in joined), ["general", "python"])
        direct = await self.read(b)
        self.assert_direct(direct, "while you were away", "UserA", "UserB", buffered=True)
        self.assertEqual(direct["id"], dm["id"])
        await self.quiet(b)

    @async_test
    async def test_new_user_is_put_in_default_room_and_members_told(self):
        """A new user's welcome lists the default room; its members get
        {"type":"member","room":"general","joined":["UserB"],"left":[]}."""
        a, _ = await self.connect("UserA")
        self.assertEqual(a.joined["general"]["members"], ["UserA"])
        self.assertEqual(a.joined["general"]["member_count"], 1)
        self.assertEqual(a.joined["general"]["history"], [])
        b, welcome = await self.connect("UserB")
        self.assertEqual(welcome["rooms"], ["general"])
        self.assertEqual(b.joined["general"]["members"], ["UserA", "UserB"])
        self.assertEqual(b.joined["general"]["member_count"], 2)
        frames = await self.sync(a)
        self.assertIn({"type": "member", "room": "general", "joined": ["UserB"], "left": []}, frames)
        self.assertIn({"type": "presence", "online": ["UserB"], "offline": []}, frames)
        self.assertEqual(len(frames), 2, frames)
        await self.quiet(b, "UserB, about its own arrival")

    @async_test
    async def test_first_connection_claims_name_and_gets_token(self):
        """The first connection to a free name is given a token."""
        _, welcome = await self.connect("UserA")
        self.assertIsInstance(welcome["token"], str)
        self.assertGreaterEqual(len(welcome["token"]), 16)

    @async_test
    async def test_owned_name_without_token_is_name_taken_4409(self):
        """A later connection without the token: name_taken, close 4409."""
        await self.connect("UserA")
        await self.refused("name_taken", 4409, username="UserA")

    @async_test
    async def test_owned_name_with_wrong_token_is_name_taken_4409(self):
        await self.connect("UserA")
        await self.refused("name_taken", 4409, username="UserA", token="not-the-token")
        await self.refused("name_taken", 4409, username="UserA", token="")

    @async_test
    async def test_owned_name_with_token_connects(self):
        _, first = await self.connect("UserA")
        _, second = await self.connect("UserA", first["token"])
        self.assertEqual(second["user"], "UserA")

    @async_test
    async def test_token_for_unowned_name_is_ignored_and_new_one_issued(self):
        """A token presented for a name nobody owns is ignored; a new one is issued."""
        _, welcome = await self.connect("Fresh", token="made-up-token")
        self.assertNotEqual(welcome["token"], "made-up-token")
        self.assertTrue(welcome["token"])
        await self.refused("name_taken", 4409, username="Fresh", token="made-up-token")

    @async_test
    async def test_names_are_case_insensitive_and_shown_as_first_written(self):
        """`usera` is `UserA`: it needs UserA's token, and is shown as UserA."""
        _, welcome = await self.connect("UserA")
        await self.refused("name_taken", 4409, username="usera")
        _, again = await self.connect("USERA", welcome["token"])
        self.assertEqual(again["user"], "UserA")
        self.assertEqual(again["online"], ["UserA"])

    @async_test
    async def test_bad_username_is_4400(self):
        """Names are 1-32 characters of A-Z a-z 0-9 _ - . ; anything else: bad_username, 4400."""
        for name in ["", "x" * 33, "bad name", "ali$e", "Jos\u00e9", "a/b", "<script>", "tab\t"]:
            with self.subTest(name=name):
                await self.refused("bad_username", 4400, username=name)
        await self.refused("bad_username", 4400)  # no username at all
        _, welcome = await self.connect("x" * 32)  # the longest allowed
        self.assertEqual(welcome["user"], "x" * 32)
        _, welcome = await self.connect("A-b_c.9")
        self.assertEqual(welcome["user"], "A-b_c.9")

    @async_test
    async def test_every_tab_of_a_user_receives_everything(self):
        """Several tabs of one name: each gets room messages, DMs, and its own
        user's messages sent from another tab."""
        a1, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        b, _ = await self.connect("UserB")
        await self.sync(a1)
        await self.sync(a2)
        ack = await self.say(b, "to the room")
        for tab in (a1, a2):
            self.assert_message(await self.read(tab), "to the room", "UserB")
        ack = await self.say(b, "@UserA just you")
        for tab in (a1, a2):
            got = await self.read(tab)
            self.assert_direct(got, "just you", "UserB", "UserA")
            self.assertEqual(got["id"], ack["id"])
        ack = await self.say(a1, "from tab one")
        self.assertEqual((await self.read(a2))["id"], ack["id"])
        await self.say(a1, "@UserB from tab one")
        self.assert_direct(await self.read(a2), "from tab one", "UserA", "UserB")

    @async_test
    async def test_tabs_opened_and_closed_mid_conversation_get_what_follows(self):
        """A room already talking: a tab that closes gets nothing more, and
        one that opens (a user coming back, a second tab) gets the next
        message, once."""
        a, welcome_a = await self.connect("UserA")
        b, welcome_b = await self.connect("UserB")
        await self.sync(b)
        await self.say(a, "before")
        self.assert_message(await self.read(b), "before", "UserA")
        b.close()
        await self.presence(a, "UserB", "offline")
        b_again, _ = await self.connect("UserB", welcome_b["token"])
        a2, _ = await self.connect("UserA", welcome_a["token"])
        for ws in (a, b_again, a2):
            await self.sync(ws)
        ack = await self.say(a, "after")
        for tab in (b_again, a2):
            got = await self.read(tab)
            self.assert_message(got, "after", "UserA")
            self.assertEqual(got["id"], ack["id"])
            await self.quiet(tab)

    @async_test
    async def test_a_closed_tab_leaves_nothing_behind(self):
        """The live state forgets a closed connection at once: no room keeps
        it, to be written to and held in memory for as long as the room lives."""
        a, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        await self.sync(a)
        a2.close()
        await self.wait_health(connections=1)
        general = chat.Hub.rooms[chat.key("general")]
        self.assertEqual(list(general.here), list(chat.Hub.online[chat.key("UserA")]))
        self.assertEqual(len(general.here), 1)
        await self.say(a, "still here")

    @async_test
    async def test_presence_only_on_first_and_last_tab(self):
        """presence online when the first tab opens, offline when the last
        closes; nothing for the tabs in between. Presence is server-wide:
        UserB shares no room with UserA and is still told."""
        b, _ = await self.connect("UserB")
        await self.reply(b, "left", type="leave", room="general")
        a1, welcome = await self.connect("UserA")
        self.assertEqual(await self.read(b), {"type": "presence", "online": ["UserA"], "offline": []})
        a2, _ = await self.connect("UserA", welcome["token"])
        await self.quiet(b, "UserB after UserA's second tab")
        a1.close()
        await self.wait_health(connections=2)
        await self.quiet(b, "UserB after UserA closed one of two tabs")
        a2.close()
        self.assertEqual(await self.read(b), {"type": "presence", "online": [], "offline": ["UserA"]})
        await self.quiet(b)


################ Rooms


class RoomTest(ChatTestCase):

    @async_test
    async def test_message_shape_and_ack(self):
        """{"type":"message","room":"general","text":"hello","ref":1} ->
        every member gets {"type":"message","id":..,"room","from","text","ts","time"};
        the sender also {"type":"ack","ref":1,"id":..}."""
        a, b = await self.pair()
        self.send(a, type="message", room="general", text="hello", ref=1)
        ack, before = await self.answer(a, 1)
        self.assertEqual(set(ack), {"type", "ref", "id"})
        self.assertEqual((ack["type"], ack["ref"]), ("ack", 1))
        mine = before[0] if before else await self.read(a)
        self.assert_message(mine, "hello", "UserA")
        theirs = await self.read(b)
        self.assertEqual(theirs, mine)
        self.assertEqual(theirs["id"], ack["id"])

    @async_test
    async def test_ids_strictly_increase_over_all_messages(self):
        a, b = await self.pair()
        ids = [(await self.say(a, "one"))["id"]]
        ids.append((await self.say(b, "@UserA two"))["id"])
        ids.append((await self.say(b, "three"))["id"])
        await self.ack(a, type="join", room="python")
        ids.append((await self.say(a, "four", "python"))["id"])
        self.assertEqual(ids, sorted(set(ids)), ids)

    @async_test
    async def test_room_defaults_to_default_room(self):
        """{"type":"message","text":"hi"} goes to the default room."""
        a, b = await self.pair()
        await self.say(a, "no room given")
        self.assert_message(await self.read(b), "no room given", "UserA", "general")

    @async_test
    async def test_room_names_are_case_insensitive(self):
        """`General` is `general`, shown as first written."""
        a, b = await self.pair()
        await self.say(a, "shouting", "GENERAL")
        self.assert_message(await self.read(b), "shouting", "UserA", "general")
        await self.ack(a, type="join", room="Python")
        joined = await self.reply(b, "joined", type="join", room="PYTHON")
        self.assertEqual(joined["room"], "Python")

    @async_test
    async def test_not_in_room(self):
        """A room you are not in, or that does not exist: not_in_room."""
        a, b = await self.pair()
        await self.error(a, "not_in_room", type="message", room="nowhere", text="hi")
        await self.reply(b, "joined", type="join", room="python")
        await self.error(a, "not_in_room", type="message", room="python", text="hi")
        await self.still_serving(a, b)

    @async_test
    async def test_bad_room(self):
        """An invalid room name: bad_room (for message, join, leave, typing)."""
        a, b = await self.pair()
        for room in ["bad room", "r" * 33, "caf\u00e9", "#x", ""]:
            with self.subTest(room=room):
                await self.error(a, "bad_room", type="message", room=room, text="hi")
                await self.error(a, "bad_room", type="join", room=room)
                await self.error(a, "bad_room", type="leave", room=room)
                await self.error(a, "bad_room", type="typing", room=room)
        await self.still_serving(a, b)
        await self.quiet(a)

    @async_test
    async def test_join_answers_joined_and_tells_members(self):
        """join -> joined to all the user's tabs; others get member action join."""
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        joined = await self.reply(a, "joined", type="join", room="python")
        self.assertEqual(joined, {"type": "joined", "room": "python", "members": ["UserA"], "member_count": 1,
                                  "read": 0, "history": []})
        self.assertEqual(await self.read(a2), joined)  # the other tab too
        await self.quiet(b, "UserB, not in python")
        await self.ack(b, type="join", room="python")
        member = await self.read(a)
        self.assertEqual(member, {"type": "member", "room": "python", "joined": ["UserB"], "left": []})
        self.assertEqual(await self.read(a2), member)

    @async_test
    async def test_joined_lists_all_members_online_or_not(self):
        a, b = await self.pair()
        await self.ack(b, type="join", room="python")
        b.close()
        await self.presence(a, "UserB", "offline")
        joined = await self.reply(a, "joined", type="join", room="python")
        self.assertEqual(sorted(joined["members"]), ["UserA", "UserB"])

    @async_test
    async def test_leave_answers_left_and_tells_members(self):
        """leave -> {"type":"left","room":"python"}; others get action leave;
        afterwards messages to it are not_in_room."""
        a, b = await self.pair()
        await self.ack(a, type="join", room="python")
        await self.ack(b, type="join", room="python")
        await self.sync(a)
        left = await self.reply(b, "left", type="leave", room="python")
        self.assertEqual(left, {"type": "left", "room": "python"})
        self.assertEqual(await self.read(a), {"type": "member", "room": "python", "joined": [], "left": ["UserB"]})
        await self.error(b, "not_in_room", type="message", room="python", text="hi")
        await self.error(b, "not_in_room", type="leave", room="python")

    @async_test
    async def test_user_may_leave_default_room(self):
        a, b = await self.pair()
        await self.reply(b, "left", type="leave", room="general")
        await self.sync(a)
        await self.error(b, "not_in_room", type="message", text="hi")
        await self.say(a, "b is gone")
        await self.quiet(b)

    @async_test
    async def test_membership_belongs_to_user_not_connection(self):
        """A room joined in one tab is in the rooms of every later tab."""
        a, welcome = await self.connect("UserA")
        await self.ack(a, type="join", room="python")
        await self.ack(a, type="leave", room="general")
        a.close()
        await self.wait_health(connections=0)
        _, again = await self.connect("UserA", welcome["token"])
        self.assertEqual(again["rooms"], ["python"])

    @async_test
    async def test_rooms_lists_every_room_with_member_count(self):
        """{"type":"rooms"} -> {"type":"rooms","rooms":[{"name":"general","members":2},...]}."""
        a, b = await self.pair()
        await self.ack(a, type="join", room="python")
        answer = await self.reply(b, "rooms", type="rooms")
        self.assertEqual(set(answer), {"type", "rooms"})
        self.assertEqual(sorted(answer["rooms"], key=lambda r: r["name"]),
                         [{"name": "general", "members": 2}, {"name": "python", "members": 1}])

    @async_test
    async def test_typing_relayed_to_room_and_to_user(self):
        """typing with room -> other members; with to -> that user; neither -> bad_request."""
        a, b = await self.pair()
        await self.ack(a, type="typing", room="general")
        self.assertEqual(await self.read(b), {"type": "typing", "user": "UserA", "room": "general"})
        await self.quiet(a, "the typist")  # not echoed to the typist
        await self.ack(b, type="typing", to="usera")
        self.assertEqual(await self.read(a), {"type": "typing", "user": "UserB", "to": "UserA"})
        await self.error(a, "bad_request", type="typing")
        await self.still_serving(a, b)

    @async_test
    async def test_typing_to_offline_user_is_dropped(self):
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        self.send(a, type="typing", to="UserB")
        await self.quiet(a)
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(b, "UserB, who was offline while typed at")


class MaxRoomsTest(ChatTestCase):
    app_options = {"max_rooms": 2}

    @async_test
    async def test_too_many_rooms(self):
        """The server holds --max_rooms rooms: joining a new one is too_many_rooms."""
        a, b = await self.pair()
        await self.reply(a, "joined", type="join", room="second")
        await self.error(a, "too_many_rooms", type="join", room="third")
        await self.reply(b, "joined", type="join", room="Second")  # an existing room is fine
        await self.sync(a)
        await self.still_serving(a, b)


class DefaultRoomTest(ChatTestCase):
    app_options = {"default_room": "lobby"}

    @async_test
    async def test_default_room_option(self):
        a, welcome = await self.connect("UserA")
        self.assertEqual((welcome["default_room"], welcome["rooms"]), ("lobby", ["lobby"]))
        b, _ = await self.connect("UserB")
        await self.say(a, "hi")
        self.assert_message(await self.read(b), "hi", "UserA", "lobby")


class HistoryTest(ChatTestCase):
    app_options = {"history": 3}

    @async_test
    async def test_history_on_join_is_last_n_oldest_first(self):
        """joined.history holds the room's last --history messages, oldest first."""
        a, _ = await self.connect("UserA")
        await self.ack(a, type="join", room="python")
        ids = [(await self.say(a, "m%d" % i, "python"))["id"] for i in range(5)]
        b, _ = await self.connect("UserB")
        joined = await self.reply(b, "joined", type="join", room="python")
        self.assertEqual([m["id"] for m in joined["history"]], ids[2:])
        self.assertEqual([m["text"] for m in joined["history"]], ["m2", "m3", "m4"])
        for m in joined["history"]:
            self.assert_message(m, m["text"], "UserA", "python")
        self.assertNotIn("truncated", joined)

    @async_test
    async def test_history_in_connect_joined(self):
        a, _ = await self.connect("UserA")
        for i in range(4):
            await self.say(a, "m%d" % i)
        b, _ = await self.connect("UserB")
        self.assertEqual([m["text"] for m in b.joined["general"]["history"]], ["m1", "m2", "m3"])


class GreetingBudgetTest(ChatTestCase):
    app_options = {"max_queue": 4000, "max_text": 1000}

    @async_test
    async def test_connect_histories_share_a_budget_and_join_gets_the_rest(self):
        """At connect, room histories share --max_queue bytes, room by room: a
        room cut short says truncated and keeps its newest messages; a join of
        it gets the rest (up to --max_queue bytes of it)."""
        a, _ = await self.connect("UserA")
        await self.ack(a, type="join", room="python")
        general = [(await self.say(a, "%d %s" % (i, "g" * 900)))["id"] for i in range(3)]
        python = [(await self.say(a, "%d %s" % (i, "p" * 900), "python"))["id"] for i in range(3)]
        again, _ = await self.connect("UserA", self.tokens["UserA"])
        self.assertEqual([m["id"] for m in again.joined["general"]["history"]], general)
        self.assertNotIn("truncated", again.joined["general"])
        cut = again.joined["python"]
        self.assertIs(cut.get("truncated"), True)
        kept = [m["id"] for m in cut["history"]]
        self.assertTrue(len(kept) < 3, kept)
        self.assertEqual(kept, python[len(python) - len(kept):], "the newest messages are the ones kept")
        full = await self.reply(again, "joined", type="join", room="python")
        self.assertEqual([m["id"] for m in full["history"]], python)
        self.assertNotIn("truncated", full)


    @async_test
    async def test_replayed_private_messages_are_bounded_and_the_rest_asked_for(self):
        """A connect sequence carries the newest private messages that fit in
        half of --max_queue, oldest first; welcome says directs_truncated, and
        history with "directs" pages back through the rest, with no gap and
        no repeat (issue 8: a reader that stalls cannot be owed them all)."""
        a, b = await self.pair()
        sent = [(await self.say(a, "@UserB %d %s" % (i, "d" * 900)))["id"] for i in range(6)]
        again, welcome = await self.connect("UserB", self.tokens["UserB"], since=0)
        self.assertIs(welcome.get("directs_truncated"), True)
        got = (await self.sync(again))
        self.assertTrue(all(f["type"] == "direct" for f in got), got)
        ids = [f["id"] for f in got]
        self.assertTrue(0 < len(ids) < 6, ids)
        self.assertEqual(ids, sent[len(sent) - len(ids):], "the newest, oldest first")
        seen = list(ids)
        while True:
            page = await self.reply(again, "history", type="history", directs=True, before=seen[0], limit=2)
            self.assertEqual(page["directs"], True)
            seen = [m["id"] for m in page["messages"]] + seen
            if not page["more"]:
                break
        self.assertEqual(seen, sent)
        await self.quiet(again)

    @async_test
    async def test_connect_sequence_of_a_stalled_reader_is_bounded(self):
        """However much waits for a user, one connect sequence is at most
        about --max_queue bytes on the wire."""
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        for i in range(20):
            await self.ack(a, type="message", text="@UserB %d %s" % (i, "m" * 990))
        sock, data = await raw_client(self.get_http_port(), "UserB",
                                      query="&token=%s&since=0" % self.tokens["UserB"])
        loop = asyncio.get_running_loop()
        frames, rest = frames_in(data)
        while not any(json.loads(p).get("type") == "direct" and json.loads(p).get("text", "").startswith("19 ")
                      for _, p in frames):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
            self.assertTrue(chunk, "the connection closed")
            data += chunk
            frames, rest = frames_in(data)
        sock.close()
        self.assertLessEqual(sum(len(p) for _, p in frames), 4000 + 200)


################ Direct messages


class DirectTest(ChatTestCase):

    async def away(self):
        """UserA online; UserB known (owns the name) but offline."""
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        return a

    @async_test
    async def test_direct_to_both_users_every_connection(self):
        """{"type":"message","text":"@userb hello"} -> {"type":"direct","id","from":"UserA",
        "to":"UserB","text":"hello","ts","time"} to every connection of both."""
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        b2, _ = await self.connect("UserB", self.tokens["UserB"])
        self.send(a, type="message", room="ignored-room", text="@userb hello", ref=7)
        ack, before = await self.answer(a, 7)
        self.assertEqual(set(ack), {"type", "ref", "id"})  # no "queued": UserB is online
        mine = before[0] if before else await self.read(a)
        self.assert_direct(mine, "hello", "UserA", "UserB")
        self.assertEqual(mine["id"], ack["id"])
        for ws in (a2, b, b2):
            self.assertEqual(await self.read(ws), mine)
        await self.quiet(a)

    @async_test
    async def test_only_ascii_white_space_after_the_name_makes_it_private(self):
        """"@UserB" + space, tab or newline is private; "@UserB" + U+FEFF or
        U+00A0 is an ordinary room message (the page uses the same rule, so it
        never shows as private a message that everyone got)."""
        a, b = await self.pair()
        for sep in (" ", "\t", "\n"):
            ack = await self.say(a, "@UserB%ssecret" % sep)
            self.assertEqual((await self.expect(b, "direct", id=ack["id"]))["text"], "secret")
        for sep in ("\ufeff", "\u00a0"):
            ack = await self.say(a, "@UserB%spublic" % sep)
            got = await self.expect(b, "message", id=ack["id"])
            self.assertEqual((got["room"], got["text"]), ("general", "@UserB%spublic" % sep))

    @async_test
    async def test_direct_to_offline_user_is_buffered_and_delivered_once(self):
        """Offline recipient: ack says queued; on reconnect the DM comes with
        "buffered": true and the sender gets {"type":"delivered","id":..,"to":"UserB"}."""
        a = await self.away()
        ack = await self.say(a, "@UserB are you there?")
        self.assertEqual(set(ack), {"type", "ref", "id", "queued"})
        self.assertIs(ack["queued"], True)
        await self.sync(a)
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        got = await self.read(b)
        self.assert_direct(got, "are you there?", "UserA", "UserB", buffered=True)
        self.assertEqual(got["id"], ack["id"])
        await self.quiet(b)
        receipt, skipped = await self.until(a, "delivered")
        self.assertEqual(receipt, {"type": "delivered", "id": ack["id"], "to": "UserB"})
        self.assertEqual([f["type"] for f in skipped + await self.sync(a)], ["presence"])
        # delivered means delivered: the next connection does not get it again
        b.close()
        await self.presence(a, "UserB", "offline")
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(b, "UserB on its second return")

    @async_test
    async def test_buffered_directs_only_for_the_token_holder(self):
        """Typing someone's name is not enough to read their private
        messages: without or with a wrong token the connection gets only
        name_taken, and the DM stays buffered for the owner."""
        a = await self.away()
        ack = await self.say(a, "@UserB secret")
        await self.refused("name_taken", 4409, username="UserB")
        await self.refused("name_taken", 4409, username="userb", token="guess")
        await self.quiet(a, "the sender (no delivered receipt yet)")
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        got = await self.read(b)
        self.assertEqual((got["id"], got["text"], got["buffered"]), (ack["id"], "secret", True))

    @async_test
    async def test_unknown_user_is_not_buffered(self):
        """@Nobody (never connected): unknown_user; nothing kept for Nobody."""
        a, b = await self.pair()
        await self.error(a, "unknown_user", type="message", text="@Nobody hello")
        nobody, _ = await self.connect("Nobody")
        await self.quiet(nobody, "the new user Nobody")
        await self.sync(a)
        await self.sync(b)
        await self.still_serving(a, b)

    @async_test
    async def test_blank_direct_text_is_bad_request(self):
        a, b = await self.pair()
        await self.error(a, "bad_request", type="message", text="@UserB    ")
        await self.error(a, "bad_request", type="message", text="@UserB \t\n")
        await self.still_serving(a, b)


class MailboxTest(ChatTestCase):
    app_options = {"mailbox": 2}

    @async_test
    async def test_mailbox_full(self):
        """Past --mailbox buffered DMs: mailbox_full, never a silent drop."""
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        ids = []
        for text in ("one", "two"):
            ids.append((await self.say(a, "@UserB " + text))["id"])
        await self.error(a, "mailbox_full", type="message", text="@UserB three")
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        got = [await self.read(b), await self.read(b)]
        self.assertEqual([(f["id"], f["text"]) for f in got], list(zip(ids, ["one", "two"])))
        await self.quiet(b)


################ Errors and limits


class ErrorTest(ChatTestCase):

    @async_test
    async def test_bad_json(self):
        """Text that is not JSON: bad_json; the connection stays open."""
        a, b = await self.pair()
        for text in ["not json", "{", '{"type": "message", "text": "hi",}']:
            a.write_message(text)
            await self.next_error(a, "bad_json")
        await self.still_serving(a, b)

    @async_test
    async def test_binary_frame_is_bad_json(self):
        a, b = await self.pair()
        a.write_message(json.dumps({"type": "message", "text": "hi"}).encode(), binary=True)
        await self.next_error(a, "bad_json")
        await self.still_serving(a, b)

    @async_test
    async def test_json_that_is_not_an_object(self):
        """[1,2], 42, "text", null: valid JSON but not a frame, so bad_request
        (bad_json is for text that is not JSON); nothing else happens."""
        a, b = await self.pair()
        for text in ["[1, 2]", "[1]", "42", '"text"', "null"]:
            a.write_message(text)
            await self.next_error(a, "bad_request")
        await self.still_serving(a, b)

    @async_test
    async def test_unknown_type_is_bad_request(self):
        a, b = await self.pair()
        await self.error(a, "bad_request", type="dance")
        await self.error(a, "bad_request", type="MESSAGE", text="hi")
        await self.error(a, "bad_request", type=5)
        await self.error(a, "bad_request", text="no type")
        await self.still_serving(a, b)

    @async_test
    async def test_missing_or_ill_typed_field_is_bad_request(self):
        a, b = await self.pair()
        await self.error(a, "bad_request", type="message")
        await self.error(a, "bad_request", type="message", text=5)
        await self.error(a, "bad_request", type="message", text=None)
        await self.error(a, "bad_request", type="message", text=["hi"])
        await self.error(a, "bad_request", type="message", text="hi", room=5)
        await self.error(a, "bad_request", type="join")
        await self.error(a, "bad_request", type="join", room=["general"])
        await self.error(a, "bad_request", type="leave")
        await self.error(a, "bad_request", type="typing", to=5)
        await self.still_serving(a, b)

    @async_test
    async def test_empty_or_blank_text_is_bad_request(self):
        a, b = await self.pair()
        for text in ["", " ", "\t\n  ", "\u3000", "\u200b\u200b", "\ufeff \u2060", "@UserB \u200b"]:
            with self.subTest(text=text):
                await self.error(a, "bad_request", type="message", text=text)
        await self.still_serving(a, b)

    @async_test
    async def test_lone_surrogate_is_bad_request(self):
        """Text that is not valid Unicode ("\\ud800" in the JSON): bad_request."""
        a, b = await self.pair()
        a.write_message('{"type": "message", "text": "a\\ud800b", "ref": "s"}')
        await self.next_error(a, "bad_request", "s")
        a.write_message('{"type": "message", "text": "\\udfff", "ref": "t"}')
        await self.next_error(a, "bad_request", "t")
        await self.still_serving(a, b)

    @async_test
    async def test_ref_must_be_string_or_integer(self):
        """ref of another type (or a string over 100 chars): bad_request, ref not echoed."""
        a, b = await self.pair()
        for ref in [[1], {"x": 1}, 1.5, True, "r" * 101]:
            with self.subTest(ref=ref):
                self.send(a, type="rooms", ref=ref)
                await self.next_error(a, "bad_request")
        self.send(a, type="rooms", ref="r" * 100)
        ack, before = await self.answer(a, "r" * 100)
        self.assertEqual(ack["type"], "ack")
        if not before:
            await self.expect(a, "rooms")
        await self.still_serving(a, b)

    @async_test
    async def test_every_frame_with_ref_gets_exactly_one_answer(self):
        """message, join, leave, rooms, typing: each answered by one ack."""
        a, b = await self.pair()
        for frame in [dict(type="message", text="x"), dict(type="join", room="p"),
                      dict(type="leave", room="p"), dict(type="rooms"),
                      dict(type="typing", room="general"), dict(type="typing", to="UserB")]:
            with self.subTest(frame=frame):
                await self.ack(a, ref=99, **frame)
                answers = [f for f in await self.sync(a) if f["type"] in ("ack", "error")]
                self.assertEqual(answers, [])

    @async_test
    async def test_frame_over_64_kib_closes_1009(self):
        a, b = await self.pair()
        a.write_message("x" * (64 * 1024 + 1))
        self.assertIsNone(await self.raw_read(a, "the close"))
        self.assertEqual(a.close_code, 1009)
        await self.presence(b, "UserA", "offline")
        c, _ = await self.connect("UserC")
        await self.sync(b)
        await self.still_serving(c, b)


class TooLongTest(ChatTestCase):
    app_options = {"max_text": 10}

    @async_test
    async def test_too_long_counts_code_points(self):
        """--max_text 10: ten code points are fine, eleven are too_long; an
        emoji is one code point."""
        a, b = await self.pair()
        for text in ["a" * 10, "\U0001F600" * 10, "\u05e9" * 10]:
            await self.say(a, text)
            self.assertEqual((await self.read(b))["text"], text)
        for text in ["a" * 11, "\U0001F600" * 11, "a" * 1000]:
            await self.error(a, "too_long", type="message", text=text)
        await self.still_serving(a, b)

    @async_test
    async def test_too_long_counts_the_whole_direct_text_as_sent(self):
        """"@UserB " + 3 chars is 10: fine; + 4 chars is 11: too_long."""
        a, b = await self.pair()
        await self.say(a, "@UserB abc")
        self.assertEqual((await self.read(b))["text"], "abc")
        await self.error(a, "too_long", type="message", text="@UserB abcd")
        await self.still_serving(a, b)


class RateLimitTest(ChatTestCase):
    app_options = {"rate": 2, "burst": 3}

    @async_test
    async def test_rate_limited_after_burst_then_recovers(self):
        """--rate 2 --burst 3: three frames pass, the fourth is rate_limited;
        the connection stays open and works again once the bucket refills."""
        a, b = await self.pair()  # pair() spent one of UserA's three
        await self.say(a, "one")
        await self.say(a, "two")
        await self.error(a, "rate_limited", type="message", text="three")
        self.assertEqual([(await self.read(b))["text"] for _ in "12"], ["one", "two"])
        await self.quiet(b, "UserB (no 'three')")
        # The bucket refills with time, so this is the one test that waits on
        # the clock: one token takes 1/rate = 0.5 s.
        await asyncio.sleep(0.6)
        ack = await self.say(a, "four")
        got = await self.expect(b, "message")
        self.assertEqual((got["text"], got["id"]), ("four", ack["id"]))


################ Origin, Unicode, HTTP


class OriginTest(ChatTestCase):
    app_options = {"origins": ["https://chat.example.org"]}

    @async_test
    async def test_foreign_origin_is_403(self):
        with self.assertRaises(HTTPClientError) as caught:
            await self.open_ws("UserA", headers={"Origin": "http://evil.example.com"})
        self.assertEqual(caught.exception.code, 403)

    @async_test
    async def test_same_origin_is_allowed(self):
        ws = await self.open_ws("UserA", headers={"Origin": "http://127.0.0.1:%d" % self.get_http_port()})
        self.assertEqual((await self.read(ws))["type"], "welcome")

    @async_test
    async def test_origins_option_allows_listed_origins(self):
        ws = await self.open_ws("UserA", headers={"Origin": "https://chat.example.org"})
        self.assertEqual((await self.read(ws))["type"], "welcome")
        with self.assertRaises(HTTPClientError) as caught:
            await self.open_ws("UserB", headers={"Origin": "https://chat.example.org.evil.com"})
        self.assertEqual(caught.exception.code, 403)


class UnicodeTest(ChatTestCase):
    TEXTS = [
        "h\u00e9llo w\u00f6rld",
        "\U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467",
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",  # Hebrew, right-to-left
        "\u0645\u0631\u062d\u0628\u0627 123",  # Arabic, right-to-left
        "zero\u200bwidth\u200c\u200d\ufeffjoiners",
        "\u202eevil override\u202c",
        "  leading and trailing spaces  ",
        "line one\nline two",
        "<script>alert('x')</script> &amp; <b>bold</b> \"quoted\"",
    ]

    @async_test
    async def test_room_text_relayed_exactly(self):
        a, b = await self.pair()
        for text in self.TEXTS:
            with self.subTest(text=text):
                ack = await self.say(a, text)
                got = await self.read(b)
                self.assertEqual((got["text"], got["id"]), (text, ack["id"]))
        b2, _ = await self.connect("UserC")
        self.assertEqual([m["text"] for m in b2.joined["general"]["history"]], self.TEXTS)

    @async_test
    async def test_direct_text_relayed_exactly(self):
        a, b = await self.pair()
        for text in self.TEXTS:
            if text != text.lstrip():
                continue  # the white space after @name separates it from the text
            with self.subTest(text=text):
                await self.say(a, "@UserB " + text)
                self.assertEqual((await self.read(b))["text"], text)


class HttpTest(ChatTestCase):

    def test_page_is_served(self):
        response = self.fetch("/")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers["Content-Type"].startswith("text/html"))
        self.assertIn(b"<", response.body)

    @async_test
    async def test_healthz_fields(self):
        """{"status":"ok","connections":N,"users_online":N,"rooms":N}."""
        a, b = await self.pair()
        await self.connect("UserA", self.tokens["UserA"])
        await self.ack(a, type="join", room="python")
        response = await AsyncHTTPClient().fetch(self.get_url("/healthz"))
        self.assertTrue(response.headers["Content-Type"].startswith("application/json"))
        h = json.loads(response.body)
        self.assertEqual(h["status"], "ok")
        self.assertEqual((h["connections"], h["users_online"]), (3, 2))
        self.assertEqual(h["rooms"] if isinstance(h["rooms"], int) else len(h["rooms"]), 2)


    def test_page_allows_only_its_own_inline_script(self):
        """The Content-Security-Policy names each inline script of the page by
        its hash and nothing else, so a script injected into the page cannot run;
        every other directive and header keeps the page to itself."""
        response = self.fetch("/")
        policy = dict(p.strip().split(" ", 1) for p in response.headers["Content-Security-Policy"].split(";"))
        scripts = re.findall(rb"<script\b[^>]*>(.*?)</script>", response.body, re.DOTALL)
        self.assertTrue(scripts)
        allowed = {"'sha256-%s'" % base64.b64encode(hashlib.sha256(s).digest()).decode() for s in scripts}
        self.assertEqual(set(policy["script-src"].split()), allowed)
        self.assertEqual(policy, {
            "default-src": "'none'", "script-src": policy["script-src"], "style-src": "'unsafe-inline'",
            "img-src": "'self' data:", "connect-src": "'self'", "base-uri": "'none'",
            "form-action": "'self'", "frame-ancestors": "'none'"})  # no framing: no clickjacking
        self.assertEqual(response.headers["X-Content-Type-Options"], "nosniff")
        self.assertEqual(response.headers["Referrer-Policy"], "no-referrer")


class WireTest(ChatTestCase):
    """The fast write path, its public-API fallback, and what they put on the wire."""

    def test_ws_frame_headers_follow_rfc6455(self):
        """Short, 16-bit and 64-bit payload lengths each get their header (RFC 6455 5.2)."""
        for n, header in [(5, b"\x81\x05"), (126, b"\x81\x7e\x00\x7e"),
                          (70000, b"\x81\x7f" + (70000).to_bytes(8, "big"))]:
            self.assertEqual(chat.ws_frame(b"x" * n), header + b"x" * n)

    @async_test
    async def test_send_now_takes_what_the_kernel_takes_and_keeps_order(self):
        """send_now() writes straight to the socket only while the stream has
        nothing pending; the rest follows through stream.write(), in order."""
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = IOStream(left)
        try:
            data = bytes(range(256)) * 4096  # 1 MiB: more than the kernel holds
            sent = chat.send_now(writer, data)
            self.assertTrue(0 < sent < len(data), sent)
            writer.write(data[sent:])
            self.assertTrue(writer.writing())
            received = right.recv(1 << 16)  # the kernel has room again, the stream still has data pending
            self.assertEqual(chat.send_now(writer, b"later"), 0, "it must queue behind what is pending")
            writer.write(b"later")
            reader = IOStream(right)
            received += await reader.read_bytes(len(data) + 5 - len(received))
            self.assertEqual(received, data + b"later")
        finally:
            writer.close()
            right.close()

    @async_test
    async def test_connections_write_prebuilt_frames(self):
        """With Tornado as it is, every connection takes the pre-built frame path."""
        a, b = await self.pair()
        self.assertTrue(all(c.outbox.stream is not None for tabs in chat.Hub.online.values() for c in tabs))
        ack = await self.say(a, "x" * 200)  # a 16-bit length frame
        self.assertEqual((await self.expect(b, "message"))["id"], ack["id"])

    @async_test
    async def test_without_raw_stream_everything_goes_through_write_message(self):
        """If Tornado's internals change, raw_stream() says None and the chat still works."""
        original = chat.raw_stream
        chat.raw_stream = lambda handler: None
        try:
            a, b = await self.pair()
            self.assertTrue(all(c.outbox.stream is None for tabs in chat.Hub.online.values() for c in tabs))
            await self.still_serving(a, b)
            await self.say(a, "@UserB psst")
            self.assertEqual((await self.expect(b, "direct"))["text"], "psst")
        finally:
            chat.raw_stream = original


class LogTest(ChatTestCase):

    @async_test
    async def test_tokens_never_reach_the_log(self):
        """Every log line (access log, errors, tracebacks) shows a connection's
        URL with the token blotted out, however the client spells it."""
        lines = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = lambda record: lines.append(logging.Formatter().format(record))
        loggers = [logging.getLogger(n) for n in ("tornado.access", "tornado.application", "tornado.general", "chat")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        try:
            a, welcome = await self.connect("UserA")
            token = welcome["token"]
            base = "ws://127.0.0.1:%d/ws?username=UserA&" % self.get_http_port()
            for query in ("token=%s" % token, "%%74oken=%s" % token, "token=%s&since=%%ff" % token,
                          "token=%s&since=99999999999999999999" % token):
                ws = await websocket_connect(base + query)
                self.sockets.append(ws)
                self.assertEqual((await self.read(ws, "the welcome"))["type"], "welcome", query)
            code = (await self.reply(a, "link", type="link"))["code"]  # a link code signs in as well
            ws = await websocket_connect(base + "link=" + code)
            self.sockets.append(ws)
            self.assertEqual((await self.read(ws, "the welcome"))["type"], "welcome")
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(handler)
                logger.setLevel(level)
        self.assertTrue([line for line in lines if "token=***" in line], lines)
        self.assertTrue([line for line in lines if "%74oken=***" in line], lines)
        self.assertEqual([line for line in lines if token in line or code in line], [])


class QueryTest(ChatTestCase):

    @async_test
    async def test_a_since_that_is_not_a_message_id_is_ignored(self):
        """since=%ff (not UTF-8), since=1e20 (past SQLite's integers), since=-1 and
        since=x connect as if no since was given, and leave no ghost behind."""
        a, _ = await self.connect("UserA")
        await self.say(a, "hello")
        await self.say(a, "@UserA note to self")
        for since in ("%ff", "99999999999999999999", "-1", "x", "", "1_0"):
            ws = await websocket_connect("ws://127.0.0.1:%d/ws?username=UserA&token=%s&since=%s"
                                         % (self.get_http_port(), self.tokens["UserA"], since))
            welcome = await self.read(ws, "the welcome with since=%s" % since)
            joined = await self.read(ws, "joined with since=%s" % since)
            self.assertEqual(welcome["type"], "welcome")
            self.assertEqual([m["text"] for m in joined["history"]], ["hello"], since)
            self.assertNotIn("truncated", joined)
            await self.quiet(ws, "a connection with since=%s (no replayed DMs)" % since)
            ws.close()
            await self.wait_health(connections=1)


class SnapshotTest(unittest.TestCase):

    def test_a_connection_leaving_mid_broadcast_stops_nothing(self):
        """send_to() is given live sets (a user's tabs); a tab that is closed on
        the way (1013) leaves that set, and the others still get the frame."""

        class Tab:
            writing, closed = True, False  # the Outbox, full: a write in flight

            def __init__(self, tabs):
                self.tabs, self.got, self.outbox = tabs, [], self

            def push(self, wire, payload, bulk=False):  # ... and past --max_queue
                self.got.append(payload)
                return False

            def too_slow(self):
                self.tabs.discard(self)  # what closing with 1013 does

        tabs: set = set()
        everyone = [Tab(tabs) for _ in range(5)]
        tabs.update(everyone)
        chat.send_to(tabs, {"type": "left", "room": "python"})
        self.assertEqual([len(t.got) for t in everyone], [1] * 5)


class NamesPerHourTest(ChatTestCase):
    app_options = {"names_per_hour": 1}

    @async_test
    async def test_one_address_claims_ten_new_names_then_rate_limited_4429(self):
        """Names are kept for good, so one address may claim 10 at once and
        then --names_per_hour; owners still connect, and nobody else notices."""
        first, welcome = await self.connect("User0")
        for i in range(1, 10):
            await self.connect("User%d" % i)
        await self.sync(first)
        await self.refused("rate_limited", 4429, username="User10")
        again, _ = await self.connect("User0", welcome["token"])
        await self.quiet(first, "User0 (no presence for the refused User10)")


class MaxUsersTest(ChatTestCase):
    app_options = {"max_users": 2}

    @async_test
    async def test_a_new_name_past_max_users_is_server_full_4503(self):
        """Owned names are bounded too; people who already own one still get in."""
        a, welcome = await self.connect("UserA")
        await self.connect("UserB")
        await self.sync(a)
        await self.refused("server_full", 4503, username="UserC")
        await self.connect("UserA", welcome["token"])


################ The property test: random frames never break the server


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "@", "@Nobody hi", "@UserB", "\ud800"]),
                  st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3))
typed_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "join", "leave", "rooms", "typing", "dance", "", "Message"])},
    optional={
        "room": st.one_of(st.sampled_from(["general", "General", "python", "bad room", "x" * 33]),
                          st.text(max_size=10), json_values),
        "text": st.one_of(texts, json_values),
        "to": st.one_of(st.sampled_from(["Nobody", "bad name"]), st.text(max_size=10), json_values),
        "ref": st.one_of(st.integers(), st.text(max_size=110), json_values),
    })
random_frames = st.one_of(
    typed_frames.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60),
)


class EncodeNamesTest(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(names=st.lists(st.one_of(st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True),
                                    st.text(st.one_of(st.sampled_from('"\\,\x00\x1f\x7f\u00e9\u2028'),
                                                      st.characters(blacklist_categories=("Cs",))),
                                            max_size=6)), max_size=12))
    def test_rosters_are_written_exactly_as_json_would(self, names):
        """The fast path for name lists writes what json would, whatever the
        names hold (a stray quote or control character takes json itself)."""
        self.assertEqual(chat.encode_names(names), chat.encode(names))


class PropertyTest(ChatTestCase):
    runs = 0

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=st.lists(random_frames, min_size=1, max_size=8))
    def test_random_frames_never_break_the_server(self, frames):
        """Whatever a client throws, it gets only well-formed answers, keeps
        its connection, others receive nothing of it, and a normal exchange
        between two users still works."""
        self.io_loop.run_sync(lambda: self.scenario(frames), timeout=20)

    async def scenario(self, frames):
        PropertyTest.runs += 1
        na, nb = "Fz%dA" % self.runs, "Fz%dB" % self.runs
        a, _ = await self.connect(na)
        b, _ = await self.connect(nb)
        await self.reply(b, "left", type="leave", room="general")  # b shares no room with a
        await self.sync(b)
        await self.sync(a)
        try:
            for frame in frames:
                a.write_message(frame, binary=isinstance(frame, bytes))
            for f in await self.sync(a):
                if f["type"] == "error":
                    self.assertIn(f["code"], ERROR_CODES, f)
                    self.assertIsInstance(f["message"], str)
            # a normal exchange still works, both ways, and b saw nothing else
            ack = await self.say(a, "@%s ping" % nb)
            got, before = await self.until(b, "direct", id=ack["id"])
            self.assertEqual(got["text"], "ping")
            self.assertEqual([f for f in before if f["type"] != "typing" or f.get("user") != na], [],
                             "the other user received frames it should not have")
            ack = await self.say(b, "@%s pong" % na)
            self.assertEqual((await self.expect(a, "direct", id=ack["id"]))["text"], "pong")
        finally:
            a.close()
            b.close()


################ Persistence and resume (issue 3)


class FileCase(ChatTestCase):
    """A server on a database file of its own; restart() is a second
    make_app on the same file, as a restarted process would be."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="chat-test-")
        self.db = self.app_db = os.path.join(self.tmp, "chat.db")
        super().setUp()

    def tearDown(self):
        super().tearDown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def restart(self):
        for ws in self.sockets:
            ws.close()
        await self.wait_health(connections=0)
        self._app = self.get_app()
        self.http_server.request_callback = self._app


class PersistenceTest(FileCase):
    """A second make_app on the same file is a restart."""

    @async_test
    async def test_restart_keeps_the_epoch_and_a_new_database_has_another(self):
        """The epoch names the database: the same after a restart, another for
        a new file or :memory: (so clients know their ids are void)."""
        _, before = await self.connect("UserA")
        await self.restart()
        _, after = await self.connect("UserA", self.tokens["UserA"])
        self.assertEqual(after["epoch"], before["epoch"])
        for path in (":memory:", os.path.join(self.tmp, "new.db")):
            other = chat.Store(path)
            self.assertNotEqual(other.epoch, before["epoch"])
            other.close()

    @async_test
    async def test_restart_keeps_rooms_names_history_and_buffered_directs(self):
        a, b = await self.pair()
        await self.ack(a, type="join", room="python")
        said = await self.say(a, "remember me", "python")
        b.close()
        await self.presence(a, "UserB", "offline")
        dm = await self.say(a, "@UserB kept for you")
        self.assertTrue(dm["queued"])
        await self.restart()

        await self.refused("name_taken", 4409, username="UserA")
        await self.refused("name_taken", 4409, username="UserB")
        a, welcome = await self.connect("UserA", self.tokens["UserA"])
        self.assertEqual(sorted(welcome["rooms"]), ["general", "python"])
        self.assertEqual([m["id"] for m in a.joined["python"]["history"]], [said["id"]])
        self.assert_message(a.joined["python"]["history"][0], "remember me", "UserA", "python")
        await self.quiet(a)
        b, welcome = await self.connect("UserB", self.tokens["UserB"])
        self.assertEqual(welcome["rooms"], ["general"])
        self.assertEqual(sorted(b.joined["general"]["members"]), ["UserA", "UserB"])
        got = await self.read(b)
        self.assert_direct(got, "kept for you", "UserA", "UserB", buffered=True)
        self.assertEqual(got["id"], dm["id"])
        await self.quiet(b)
        self.assertEqual(await self.expect(a, "delivered"), {"type": "delivered", "id": dm["id"], "to": "UserB"})
        later = await self.say(a, "after the restart")
        self.assertGreater(later["id"], dm["id"])
        # delivered is stored too: another restart does not deliver it again
        await self.restart()
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(b)

    @async_test
    async def test_tokens_are_not_stored_in_clear(self):
        a, b = await self.pair()
        await self.say(a, "something to write")
        await self.restart()
        await self.connect("UserA", self.tokens["UserA"])  # the stored hash still matches
        stored = b""
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(self.db + suffix):
                with open(self.db + suffix, "rb") as f:
                    stored += f.read()
        self.assertIn(b"something to write", stored)
        for token in self.tokens.values():
            self.assertNotIn(token.encode(), stored)

    @async_test
    async def test_database_file_mode_is_0600(self):
        a, _ = await self.connect("UserA")
        await self.say(a, "hi")
        self.assertEqual(os.stat(self.db).st_mode & 0o777, 0o600)


class ResumeTest(ChatTestCase):

    async def gap(self):
        """UserB saw up to `seen`, sent a DM after it, then dropped; UserA
        said two things and sent UserB a DM meanwhile."""
        a, b = await self.pair()
        seen = (await self.say(a, "seen by both"))["id"]
        await self.expect(b, "message", id=seen)
        own = await self.say(b, "@UserA sent before the drop")
        b.close()
        await self.presence(a, "UserB", "offline")
        missed = [(await self.say(a, "missed %d" % i))["id"] for i in (1, 2)]
        dm = await self.say(a, "@UserB missed dm")
        return a, seen, own["id"], missed, dm["id"]

    @async_test
    async def test_since_from_another_database_counts_from_zero(self):
        """welcome carries the database's epoch. A client that resumes with
        since=ID&epoch=E from another database (deleted, restored, :memory:)
        gets everything, as if since=0: its ids mean nothing here."""
        a, welcome = await self.connect("UserA")
        ids = [(await self.say(a, "m%d" % i))["id"] for i in (1, 2)]
        self.assertRegex(welcome["epoch"], r"^[0-9a-f]{16}$")
        token = self.tokens["UserA"]
        same, _ = await self.open_and_greet(token, since=ids[-1], epoch=welcome["epoch"])
        self.assertEqual(same["history"], [])
        other, _ = await self.open_and_greet(token, since=ids[-1], epoch="0123456789abcdef")
        self.assertEqual([m["id"] for m in other["history"]], ids)

    async def open_and_greet(self, token, **params):
        """Connect UserA with these query parameters; (its joined general, welcome)."""
        ws = await websocket_connect(self.url(username="UserA", token=token, **params))
        self.sockets.append(ws)
        welcome = await self.read(ws, "the welcome")
        joined = await self.read(ws, "joined general")
        return joined, welcome

    @async_test
    async def test_since_delivers_exactly_the_missed_messages(self):
        """/ws?...&since=ID: history holds only messages after ID, and the
        user's DMs after ID come again, each exactly once."""
        a, seen, own, missed, dm = await self.gap()
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=seen)
        joined = b.joined["general"]
        self.assertEqual([m["id"] for m in joined["history"]], missed)
        self.assertFalse(joined.get("truncated", False))
        directs = [await self.read(b), await self.read(b)]
        self.assertEqual([(f["type"], f["id"]) for f in directs], [("direct", own), ("direct", dm)])
        self.assert_direct(directs[0], "sent before the drop", "UserB", "UserA")
        self.assert_direct(directs[1], "missed dm", "UserA", "UserB", buffered=True)
        await self.quiet(b)
        # caught up: since = the newest id gives nothing again
        b.close()
        await self.presence(a, "UserB", "offline")
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=dm)
        self.assertEqual(b.joined["general"]["history"], [])
        await self.quiet(b)

    @async_test
    async def test_since_replays_own_undelivered_direct_as_queued(self):
        a, b = await self.pair()
        seen = (await self.say(a, "x"))["id"]
        b.close()
        await self.presence(a, "UserB", "offline")
        dm = await self.say(a, "@UserB not yet")
        a2, _ = await self.connect("UserA", self.tokens["UserA"], since=seen)
        got = await self.read(a2)
        self.assert_direct(got, "not yet", "UserA", "UserB", queued=True)
        self.assertEqual(got["id"], dm["id"])
        await self.quiet(a2)

    @async_test
    async def test_non_numeric_since_is_ignored(self):
        a, seen, own, missed, dm = await self.gap()
        b, _ = await self.connect("UserB", self.tokens["UserB"], since="abc")
        self.assertEqual([m["id"] for m in b.joined["general"]["history"]], [seen] + missed)
        got = await self.read(b)
        self.assertEqual((got["id"], got["buffered"]), (dm, True))
        await self.quiet(b)


class TruncatedTest(ChatTestCase):
    app_options = {"history": 3}

    @async_test
    async def test_truncated_when_gap_exceeds_history(self):
        a, b = await self.pair()
        seen = (await self.say(a, "seen"))["id"]
        b.close()
        await self.presence(a, "UserB", "offline")
        missed = [(await self.say(a, "m%d" % i))["id"] for i in range(5)]
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=seen)
        joined = b.joined["general"]
        self.assertEqual([m["id"] for m in joined["history"]], missed[-3:])
        self.assertIs(joined.get("truncated"), True)
        b.close()
        await self.presence(a, "UserB", "offline")
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=missed[1])
        self.assertEqual([m["id"] for m in b.joined["general"]["history"]], missed[2:])
        self.assertFalse(b.joined["general"].get("truncated", False))


class ProcessCase(ChatTestCase):
    """chat.py as a subprocess on a free port, with its own database."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="chat-test-")
        self.db = os.path.join(self.tmp, "chat.db")
        self.procs = []
        super().setUp()

    def tearDown(self):
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                self.io_loop.run_sync(proc.wait)
        super().tearDown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def start(self, *args, ready=True, argv=None, preexec_fn=None):
        """Run chat.py on a free port; return (proc, port, stderr lines).
        Waits for its "listening on" log line, then checks /healthz."""
        sock, port = bind_unused_port()
        sock.close()
        if argv is None:
            argv = ["--port", str(port), "--db", self.db, "--rate", "0"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, CHAT_PY, *[a.replace("PORT", str(port)) for a in argv], *args,
            cwd=self.tmp, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn)
        self.procs.append(proc)
        lines = []
        if not ready:
            return proc, port, lines
        for _ in range(200):
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
            if not line:
                self.fail("chat.py exited before listening: %r" % b"".join(lines))
            lines.append(line)
            if b"listening on" in line:
                break

        proc.waiting = []  # (text, future) of logged() calls

        async def drain():  # keep reading so the pipe never fills
            async for line in proc.stderr:
                lines.append(line)
                for text, seen in proc.waiting:
                    if text in line and not seen.done():
                        seen.set_result(line)
        proc.drain = asyncio.ensure_future(drain())
        self.assertEqual((await self.health(port))["status"], "ok")
        return proc, port, lines



    async def logged(self, proc, lines, text, timeout=10):
        """Wait until chat.py logs a line holding text; return it."""
        for line in lines:
            if text in line:
                return line
        seen = asyncio.get_running_loop().create_future()
        proc.waiting.append((text, seen))
        return await asyncio.wait_for(seen, timeout)


class ProcessTest(ProcessCase):
    """chat.py as a process: kill -9, SIGTERM, a corrupt database."""

    @gen_test(timeout=30)
    async def test_kill_9_loses_no_acked_message(self):
        """DMs acked to a sender survive SIGKILL: after a restart each is
        delivered once, with receipts; names still need their tokens; ids go on."""
        proc, port, log1 = await self.start()
        a, _ = await self.connect("UserA", port=port)
        b, _ = await self.connect("UserB", port=port)
        await self.presence(a, "UserB", "online")  # or its arrival and leaving are one batch, and cancel out
        said = await self.say(a, "in the room")
        b.close()
        await self.presence(a, "UserB", "offline")
        dms = []
        for i in range(3):
            ack = await self.say(a, "@UserB dm %d" % i)
            self.assertTrue(ack["queued"])
            dms.append(ack["id"])
        proc.kill()
        self.assertEqual(await proc.wait(), -signal.SIGKILL)
        await proc.drain

        proc, port, log2 = await self.start()
        await self.refused("name_taken", 4409, username="UserB", port=port)
        await self.refused("name_taken", 4409, username="UserA", port=port)
        a, _ = await self.connect("UserA", self.tokens["UserA"], port=port)
        b, _ = await self.connect("UserB", self.tokens["UserB"], port=port)
        self.assertIn(said["id"], [m["id"] for m in b.joined["general"]["history"]])
        got = [await self.read(b) for _ in dms]
        self.assertEqual([(f["type"], f["id"], f["text"], f["buffered"]) for f in got],
                         [("direct", id_, "dm %d" % i, True) for i, id_ in enumerate(dms)])
        await self.quiet(b)
        receipts = [await self.expect(a, "delivered") for _ in dms]
        self.assertEqual(sorted(r["id"] for r in receipts), dms)
        later = await self.say(a, "after kill -9")
        self.assertGreater(later["id"], max(dms))
        log = b"".join(log1 + log2)
        self.assertNotIn(b"Traceback", log)
        for token in self.tokens.values():
            self.assertNotIn(token.encode(), log, "a token appears in the log")

    @gen_test(timeout=30)
    async def test_sigterm_closes_clients_1001_and_exits_0(self):
        """SIGTERM: clients are closed with 1001 (one still to send its auth
        frame too), the exit code is 0, and the WAL is checkpointed into the
        database file, so that file alone is a whole backup. Another program
        (an admin's sqlite3 shell) has the file open here, so closing the
        server's connection alone would not do it."""
        proc, port, log = await self.start()
        a, _ = await self.connect("UserA", port=port)
        said = await self.say(a, "hi")
        waiting = await websocket_connect(self.url(port, username="UserB", auth=1))  # its auth frame not sent
        self.sockets.append(waiting)
        other = sqlite3.connect(self.db)
        self.addCleanup(other.close)
        other.execute("SELECT count(*) FROM messages").fetchone()
        proc.send_signal(signal.SIGTERM)
        for _ in range(10):
            if await self.raw_read(a, "the close") is None:
                break
        self.assertEqual(a.close_code, 1001)
        self.assertIsNone(await self.raw_read(waiting, "the close of the one still to sign in"))
        self.assertEqual(waiting.close_code, 1001, "told too, not cut off when the process exits")
        self.assertEqual(await asyncio.wait_for(proc.wait(), 5), 0)
        await proc.drain
        self.assertNotIn(b"Traceback", b"".join(log))
        wal = self.db + "-wal"
        self.assertEqual(os.path.getsize(wal) if os.path.exists(wal) else 0, 0, "the WAL was not checkpointed")
        backup = os.path.join(self.tmp, "backup.db")
        shutil.copyfile(self.db, backup)
        copy = sqlite3.connect(backup)
        self.addCleanup(copy.close)
        self.assertEqual(copy.execute("SELECT id FROM messages").fetchall(), [(said["id"],)])

    @gen_test(timeout=30)
    async def test_command_line_forms_and_config_file(self):
        """--x=v and --x v, dashes or underscores; --config FILE, with the
        command line winning over the file."""
        config = os.path.join(self.tmp, "chat.conf")
        with open(config, "w") as f:
            f.write('default_room = "lobby"\nmax_text = 50\n')
        proc, port, log = await self.start(argv=[
            "--port=PORT", "--db", self.db, "--config=" + config, "--max-text", "60", "--rate=0"])
        _, welcome = await self.connect("UserA", port=port)
        self.assertEqual((welcome["default_room"], welcome["max_text"]), ("lobby", 60))
        proc.terminate()
        self.assertEqual(await asyncio.wait_for(proc.wait(), 5), 0)
        await proc.drain

    @gen_test(timeout=30)
    async def test_corrupt_database_is_a_clear_error_at_start(self):
        with open(self.db, "wb") as f:
            f.write(b"this is not an SQLite database\n" * 200)
        proc, _, _ = await self.start(ready=False)
        code = await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode("utf-8", "replace")
        self.assertNotEqual(code, 0)
        self.assertNotIn("Traceback", err)
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertTrue(1 <= len(lines) <= 2, "expected a one-line error, got:\n" + err)
        self.assertTrue("database" in err.lower() or self.db in err, err)

    def test_unwritable_database_is_a_clear_error(self):
        """A database that cannot be created or written is refused at start,
        with a sentence naming it (main() logs it as one line and exits 1)."""
        for path in (os.path.join(self.tmp, "no-such-dir", "chat.db"), self.tmp):
            with self.assertRaises(chat.StoreError) as caught:
                chat.Store(path)
            self.assertIn(repr(path), str(caught.exception))


################ Slow consumers, liveness, caps (issue 5)


async def raw_client(port, name, rcvbuf=None, query=""):
    """A hand-made WebSocket client: handshake, then it reads nothing more
    (and so never answers pings). Returns (socket, bytes after the headers)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        "GET /ws?username=%s%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (name, query, port, key)).encode())
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), READ_TIMEOUT)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise AssertionError("handshake refused: %r" % head)
    return sock, rest


def frames_in(data):
    """(the whole frames in server-to-client bytes as (opcode, payload), the bytes left over)."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        opcode, length, start = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if start + size > len(data):
                break
            length, start = int.from_bytes(data[start:start + size], "big"), start + size
        if start + length > len(data):
            break
        frames.append((opcode, data[start:start + length]))
        pos = start + length
    return frames, data[pos:]


def close_code_in(data):
    """The status code of the first close frame in server-to-client bytes."""
    pos = 0
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, = struct.unpack(">H", data[pos:pos + 2])
            pos += 2
        elif length == 127:
            length, = struct.unpack(">Q", data[pos:pos + 8])
            pos += 8
        payload = data[pos:pos + length]
        pos += length
        if opcode == 0x8:
            return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
    return None


class SlowConsumerTest(ChatTestCase):
    app_options = {"max_text": 30000, "max_queue": 64 * 1024, "rate": 0}

    @gen_test(timeout=30)
    async def test_stalled_client_closed_1013_while_others_keep_receiving(self):
        """A client that stops reading is closed with 1013 once it is owed
        more than --max_queue (64 KiB here); the reading client misses nothing."""
        a, _ = await self.connect("UserA")
        stalled, data = await raw_client(self.get_http_port(), "Stalled", rcvbuf=4096)
        await self.presence(a, "Stalled", "online")
        sent, received, seen = [], [], []
        # 6 MB: past 64 KiB plus what the kernels buffer (Linux lets a socket's
        # send buffer grow to tcp_wmem's 4 MB)
        for i in range(240):
            ack, before = await self.ack(a, type="message", text="%d %s" % (i, "x" * 25000))
            sent.append(ack["id"])
            seen += before
        seen += await self.sync(a)
        received = [f["id"] for f in seen if f["type"] == "message"]
        self.assertEqual(received, sent, "the reading client missed messages")
        # Now the stalled client reads again: what it was sent ends in close 1013.
        # (It reads as the kernel hands it over, a few KiB at a time: the
        # close comes after megabytes, and the server sends nothing after it.)
        loop, data = asyncio.get_running_loop(), bytearray(data)
        while (code := close_code_in(data)) is None:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(stalled, 1 << 20), READ_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as e:
                self.fail("no close frame in %d bytes (%r)" % (len(data), e))
            if not chunk:
                self.fail("the connection ended without a close frame (%d bytes)" % len(data))
            data += chunk
        self.assertEqual(code, 1013)
        # it answers the close as a browser would, and is shown offline
        await loop.sock_sendall(stalled, b"\x88\x82" + b"\x00" * 4 + struct.pack(">H", 1013))
        if not [f for f in seen if f["type"] == "presence" and "Stalled" in f["offline"]]:
            await self.presence(a, "Stalled", "offline")
        stalled.close()
        self.assertEqual((await self.health())["connections"], 1)
        await self.say(a, "still served")

    @gen_test(timeout=30)
    async def test_the_server_holds_at_most_max_queue_for_a_stalled_client(self):
        """What a client that stopped reading costs the server is bounded:
        the bytes waiting for it in the process stay within --max_queue (and
        the one frame that crossed it); the kernel's buffers hold the rest."""
        a, _ = await self.connect("UserA")
        stalled, _ = await raw_client(self.get_http_port(), "Stalled", rcvbuf=4096)
        await self.presence(a, "Stalled", "online")
        outbox = next(iter(chat.Hub.online[chat.key("Stalled")])).outbox
        most, text = 0, "x" * 25000
        for i in range(240):
            await self.ack(a, type="message", text="%d %s" % (i, text))
            if outbox.closed:
                break
            # queued here, and handed to the stream but not yet to the kernel
            most = max(most, sum(map(len, outbox.out)) + len(outbox.stream._write_buffer))
        self.assertTrue(outbox.closed, "the stalled client was never closed")
        self.assertLessEqual(most, 64 * 1024 + len(text) + 100)
        self.assertGreater(most, 0, "nothing was ever held back: the client did not stall")
        stalled.close()


class BigGreetingTest(ChatTestCase):
    app_options = {"max_text": 30000, "max_queue": 64 * 1024, "rate": 0}

    @async_test
    async def test_kept_messages_larger_than_max_queue_all_arrive_once_with_receipts(self):
        """150 KB of kept DMs: the connect sequence carries the newest that fit
        in half of --max_queue, history with "directs" the rest; each arrives
        once, and every sender gets its receipt."""
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        b.close()
        await self.presence(a, "UserB", "offline")
        sent = []
        for i in range(5):
            ack, _ = await self.ack(a, type="message", text="@UserB %d %s" % (i, "y" * 29000))
            self.assertIs(ack.get("queued"), True)
            sent.append(ack["id"])
        b, welcome = await self.connect("UserB", self.tokens["UserB"])
        self.assertIs(welcome.get("directs_truncated"), True)
        kept = await self.sync(b)
        self.assertEqual([(f["type"], f["id"], f.get("buffered")) for f in kept], [("direct", sent[-1], True)])
        got = [f["id"] for f in kept]
        while True:
            page = await self.reply(b, "history", type="history", directs=True, before=got[0])
            self.assertTrue(all(m.get("buffered") for m in page["messages"]), "they were still waiting")
            got = [m["id"] for m in page["messages"]] + got
            if not page["more"]:
                break
        self.assertEqual(got, sent)
        receipts = [await self.expect(a, "delivered", to="UserB") for _ in sent]
        self.assertEqual(sorted(r["id"] for r in receipts), sent)
        await self.quiet(a, "UserA")
        await self.quiet(b, "UserB")
        again, welcome = await self.connect("UserB", self.tokens["UserB"])
        self.assertNotIn("directs_truncated", welcome)
        await self.quiet(again, "UserB, once all were delivered")


class SlowAnswerTest(ChatTestCase):
    """Answers a client asked for (its connect sequence, a join) go at its
    pace: a slow but steady reader is neither cut off by --max_queue while
    the room talks, nor dropped because its pong waits behind them."""
    app_options = {"max_text": 60000, "max_queue": 4 << 20, "mailbox": 120, "history": 120,
                   "rate": 0, "ping_interval": 1.0, "ping_timeout": 1.0}

    def setUp(self):
        # Like a real link, not loopback: the kernel holds 64 KiB of what the
        # server sends, not megabytes, so the server's own queue does the work.
        original = chat.raw_stream

        def small_send_buffer(handler):
            stream = original(handler)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
            return stream

        chat.raw_stream = small_send_buffer
        self.addCleanup(setattr, chat, "raw_stream", original)
        super().setUp()

    async def read_slowly_until(self, sock, data, want_id):
        """Read a raw client's bytes at 64 KiB per 30 ms until the frame with
        want_id arrives; return (text frames, close frames)."""
        loop, texts, closes = asyncio.get_running_loop(), [], []
        for _ in range(2000):
            frames, data = frames_in(data)
            texts += [json.loads(p) for op, p in frames if op == 0x1]
            closes += [p for op, p in frames if op == 0x8]
            if closes or any(f.get("id") == want_id for f in texts):
                return texts, closes
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), READ_TIMEOUT)
            self.assertTrue(chunk, "the server closed the connection")
            data += chunk
            await asyncio.sleep(0.03)  # the reader's own pace: 2 MB/s, 3 s for 7 MB, longer than 2 pings
        self.fail("never got frame %d" % want_id)

    @gen_test(timeout=60)
    async def test_a_connect_sequence_larger_than_the_kernel_holds(self):
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        b.close()
        await self.presence(a, "UserB", "offline")
        sent = [(await self.ack(a, type="message", text="@UserB %d %s" % (i, "q" * 59000)))[0]["id"]
                for i in range(120)]  # 7 MB of kept DMs
        slow, data = await raw_client(self.get_http_port(), "UserB", rcvbuf=1 << 16,
                                      query="&token=" + self.tokens["UserB"])
        try:
            await self.presence(a, "UserB", "online")
            (conn,) = chat.Hub.online["userb"]
            self.assertTrue(conn.outbox.writing, "the kernel took it all: this test needs a bigger answer")
            live = await self.say(a, "meanwhile in general")
            texts, closes = await self.read_slowly_until(slow, data, live["id"])
            self.assertEqual(closes, [], "closed while reading its connect sequence")
            self.assertIs(texts[0].get("directs_truncated"), True, "half of 4 MiB holds about 35 of them")
            kept = [f["id"] for f in texts if f["type"] == "direct"]
            self.assertGreater(len(kept), 30)
            self.assertEqual(kept, sent[len(sent) - len(kept):], "the newest ones, oldest first")
            self.assertEqual([f["id"] for f in texts if f["type"] == "message"], [live["id"]])
        finally:
            slow.close()



class SlowJoinTest(SlowAnswerTest):
    app_options = {"max_text": 60000, "max_queue": 2 << 20, "history": 120, "rate": 0}
    test_a_connect_sequence_larger_than_the_kernel_holds = None  # SlowAnswerTest's own

    async def big_room_and_a_slow_client(self, messages):
        """UserA in "big" with `messages` posts of 59 KB; a raw client "Slow"
        that the server's kernel buffers little for. Returns (a, ids, socket, data)."""
        a, _ = await self.connect("UserA")
        await self.ack(a, type="join", room="big")
        ids = [(await self.say(a, "%d %s" % (i, "h" * 59000), "big"))["id"] for i in range(messages)]
        slow, data = await raw_client(self.get_http_port(), "Slow", rcvbuf=1 << 16)
        await self.presence(a, "Slow", "online")
        return a, ids, slow, data

    async def send_raw(self, sock, text):
        await asyncio.get_running_loop().sock_sendall(
            sock, b"\x81" + bytes([0x80 | len(text)]) + b"\x00" * 4 + text)

    @gen_test(timeout=60)
    async def test_a_join_answer_and_the_talk_after_it_pass_the_cap_together(self):
        """A 2 MB joined frame (33 posts of 59 KB, just under --max_queue) is
        asked for: the room's talk that follows it does not count it."""
        a, history, slow, data = await self.big_room_and_a_slow_client(33)
        try:
            await self.send_raw(slow, b'{"type":"join","room":"big"}')
            await self.member(a, "big", "Slow", "join")
            (conn,) = chat.Hub.online["slow"]
            self.assertTrue(conn.outbox.writing, "the kernel took it all: this test needs a bigger answer")
            live = await self.say(a, "%s meanwhile in big" % ("m" * 59000), "big")
            texts, closes = await self.read_slowly_until(slow, data, live["id"])
            self.assertEqual(closes, [], "closed while reading its join answer")
            (joined,) = [f for f in texts if f["type"] == "joined" and f["room"] == "big"]
            self.assertEqual([m["id"] for m in joined["history"]], history)
        finally:
            slow.close()

    @gen_test(timeout=60)
    async def test_asking_again_and_again_without_reading_is_too_slow_1013(self):
        """Only --max_queue bytes of answers may be owed at once: a client that
        keeps asking for a big history and reads nothing is closed with 1013."""
        a, _, slow, data = await self.big_room_and_a_slow_client(33)
        try:
            await self.send_raw(slow, b'{"type":"join","room":"big"}')
            await self.member(a, "big", "Slow", "join")
            for _ in range(5):
                await self.send_raw(slow, b'{"type":"join","room":"big"}')
            await self.presence(a, "Slow", "offline")
        finally:
            slow.close()


class LivenessTest(ChatTestCase):
    app_options = {"ping_interval": 0.3, "ping_timeout": 0.3}

    @async_test
    async def test_vanished_client_goes_offline_after_ping_timeout(self):
        """A client that vanishes without a close frame (it never answers a
        ping) is dropped and shown offline within 2 x the interval, give or
        take; clients that answer pings stay."""
        a, _ = await self.connect("UserA")
        ghost, _ = await raw_client(self.get_http_port(), "Ghost")
        try:
            await self.presence(a, "Ghost", "online")
            start = self.io_loop.time()
            offline = self.presence(a, "Ghost", "offline")
            try:  # 2 x 0.3 s by the rule; 2 s leaves room for a busy machine
                await gen.with_timeout(datetime.timedelta(seconds=2), offline)
            except gen.TimeoutError:
                self.fail("Ghost still online 2 s after it stopped answering pings")
            self.assertLess(self.io_loop.time() - start, 2)
        finally:
            ghost.close()
        self.assertEqual((await self.health())["connections"], 1)
        await self.quiet(a, "UserA, who answers pings")


    @async_test
    async def test_a_client_that_stops_reading_is_dropped_whatever_it_sends(self):
        """Pongs count only when they echo our latest ping, which waits behind
        everything the client is owed: a client that stopped reading cannot
        stay online by sending unsolicited pongs and frames."""
        a, _ = await self.connect("UserA")
        ghost, _ = await raw_client(self.get_http_port(), "Ghost")
        loop = asyncio.get_running_loop()

        async def pretend_to_be_alive():  # a misbehaving client's own pace, bounded
            mask = b"\x00" * 4  # a zero mask leaves the payload as it is
            text = b'{"type":"rooms"}'
            for _ in range(100):
                try:
                    await loop.sock_sendall(ghost, b"\x8a\x82" + mask + b"hi")  # unsolicited pong
                    await loop.sock_sendall(ghost, b"\x81" + bytes([0x80 | len(text)]) + mask + text)
                except OSError:  # dropped: what the test waits for
                    return
                await asyncio.sleep(0.05)

        pretender = asyncio.ensure_future(pretend_to_be_alive())
        try:
            await self.presence(a, "Ghost", "online")
            offline = self.presence(a, "Ghost", "offline")
            try:
                await gen.with_timeout(datetime.timedelta(seconds=3), offline)
            except gen.TimeoutError:
                self.fail("a client that reads nothing stayed online by sending pongs")
        finally:
            pretender.cancel()
            ghost.close()


class TabCapTest(ChatTestCase):
    app_options = {"max_tabs": 2, "max_conns_per_ip": 0}

    @async_test
    async def test_max_tabs_is_too_many_connections_4429(self):
        b, _ = await self.connect("UserB")
        a1, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        await self.sync(b)
        await self.refused("too_many_connections", 4429, username="UserA", token=welcome["token"])
        await self.quiet(b, "UserB")
        await self.say(a1, "the first two tabs still work")
        await self.expect(a2, "message")
        a1.close()
        await self.wait_health(connections=2)
        await self.connect("UserA", welcome["token"])  # a free slot again


class IpCapTest(ChatTestCase):
    app_options = {"max_tabs": 0, "max_conns_per_ip": 3}

    @async_test
    async def test_max_conns_per_ip_is_too_many_connections_4429(self):
        a, welcome = await self.connect("UserA")
        await self.connect("UserA", welcome["token"])
        await self.connect("UserB")
        await self.sync(a)
        await self.refused("too_many_connections", 4429, username="UserC")
        await self.quiet(a, "UserA (no presence for a refused UserC)")


class NoCapTest(ChatTestCase):
    app_options = {"max_tabs": 0, "max_conns_per_ip": 0}

    @gen_test(timeout=30)
    async def test_zero_turns_caps_off(self):
        """--max_tabs 0 --max_conns_per_ip 0: more than the defaults (10 tabs,
        200 per address) are all let in."""
        _, welcome = await self.connect("UserA")
        for _ in range(205):
            ws = await self.open_ws("UserA", welcome["token"])
            self.assertEqual((await self.read(ws))["type"], "welcome")
        self.assertEqual((await self.health())["connections"], 206)


################ Hardening (issue 8)


def client_frame(opcode, payload=b"", fin=True, masked=True):
    """One client-to-server WebSocket frame (payload under 126 bytes)."""
    assert len(payload) < 126
    head = bytes([(0x80 if fin else 0) | opcode])
    if not masked:
        return head + bytes([len(payload)]) + payload
    mask = os.urandom(4)
    return head + bytes([0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_close(sock, data=b""):
    """Read a raw client's socket until the server's close frame; its code
    (None for a close frame without one). Fails if the TCP connection ends first."""
    loop = asyncio.get_running_loop()
    for _ in range(10000):
        frames, _ = frames_in(data)
        closes = [p for op, p in frames if op == 0x8]
        if closes:
            return struct.unpack(">H", closes[0][:2])[0] if len(closes[0]) >= 2 else None
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
        if not chunk:
            raise AssertionError("the connection ended without a close frame")
        data += chunk
    raise AssertionError("no close frame")


class LockedDatabaseTest(ProcessCase):
    """Item 1: a write that fails is rolled back whole, is never acked, and
    the server recovers by itself when the lock goes away."""

    @gen_test(timeout=60)
    async def test_a_locked_database_refuses_writes_and_loses_no_acked_message(self):
        proc, port, log1 = await self.start("--offline_grace", "0")
        a, _ = await self.connect("UserA", port=port)
        b, _ = await self.connect("UserB", port=port)
        await self.presence(a, "UserB", "online")
        room_ids = [(await self.say(a, "before the lock"))["id"]]
        b.close()
        await self.presence(a, "UserB", "offline")
        waiting = await self.say(a, "@UserB kept for you")
        lock = sqlite3.connect(self.db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # as an admin's sqlite3 shell would
        try:
            await self.error(a, "server_error", type="message", text="while locked")
            await self.error(a, "server_error", type="message", text="@UserB while locked")
            await self.error(a, "server_error", type="join", room="newroom")
            await self.refused("server_error", 1011, username="UserC", port=port)
            # A user with waiting mail is still let in and greeted; the mark
            # that it was delivered waits for the lock to go.
            b, _ = await self.connect("UserB", self.tokens["UserB"], port=port)
            kept = await self.expect(b, "direct", id=waiting["id"])
            self.assertIs(kept["buffered"], True)
            await self.error(b, "server_error", type="message", text="still locked")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        room_ids.append((await self.say(a, "after the lock"))["id"])
        reply = await self.say(b, "@UserA got it")
        await self.reply(a, "joined", type="join", room="newroom")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(await asyncio.wait_for(proc.wait(), 10), 0)
        await proc.drain

        db = sqlite3.connect(self.db)
        stored = [row[0] for row in db.execute("SELECT id FROM messages ORDER BY id")]
        db.close()
        self.assertEqual(stored, sorted(room_ids + [waiting["id"], reply["id"]]),
                         "every acked message is stored, and nothing that was refused")
        proc, port, log2 = await self.start()
        a, _ = await self.connect("UserA", self.tokens["UserA"], port=port)
        self.assertEqual([m["id"] for m in a.joined["general"]["history"]], room_ids)
        self.assertIn("newroom", a.joined)
        self.assertNotIn(b"Traceback", b"".join(log1 + log2))


class RefusedWriteTest(ChatTestCase):
    """A write that fails in the middle of several statements leaves nothing
    half-done, and the next write commits."""

    @async_test
    async def test_a_failed_claim_is_rolled_back_whole(self):
        a, _ = await self.connect("UserA")
        store = chat.Hub.store
        with mock.patch.object(store, "set_member", side_effect=sqlite3.OperationalError("disk I/O error")):
            await self.refused("server_error", 1011, username="UserC")
        self.assertFalse(store.db.in_transaction, "the failed claim left a transaction open")
        self.assertIsNone(store.db.execute("SELECT 1 FROM users WHERE key = 'userc'").fetchone())
        c, welcome = await self.connect("UserC")  # the name is still free
        self.assertEqual(welcome["user"], "UserC")
        ack = await self.say(a, "and on we go")
        self.assertEqual(store.db.execute("SELECT count(*) FROM messages WHERE id = ?", (ack["id"],)).fetchone()[0], 1)


class HistoryRequestTest(ChatTestCase):
    """Scroll-back and the private messages a connect sequence left out."""

    @async_test
    async def test_room_history_pages_back_with_no_gap(self):
        a, b = await self.pair()
        ids = [(await self.say(a, "m%d" % i))["id"] for i in range(7)]
        page = await self.reply(a, "history", type="history", room="general", limit=3)
        self.assertEqual((page["room"], [m["id"] for m in page["messages"]], page["more"]),
                         ("general", ids[-3:], True))
        page = await self.reply(a, "history", type="history", room="General", before=ids[1], limit=3)
        self.assertEqual(([m["id"] for m in page["messages"]], page["more"]), (ids[:1], False))
        self.assertEqual(page["messages"][0]["text"], "m0")

    @async_test
    async def test_history_with_one_user_holds_only_that_conversation(self):
        a, b = await self.pair()
        c, _ = await self.connect("UserC")
        ab = (await self.say(a, "@UserB for b"))["id"]
        await self.say(a, "@UserC for c")
        ba = (await self.say(b, "@UserA back"))["id"]
        page = await self.reply(a, "history", type="history", **{"with": "userb"})
        self.assertEqual((page["with"], [m["id"] for m in page["messages"]], page["more"]), ("UserB", [ab, ba], False))
        page = await self.reply(c, "history", type="history", **{"with": "UserB"})
        self.assertEqual(page["messages"], [], "nobody sees others' private messages")

    @async_test
    async def test_bad_history_requests(self):
        a, b = await self.pair()
        await self.error(a, "not_in_room", type="history", room="elsewhere")
        await self.error(a, "unknown_user", type="history", **{"with": "Nobody"})
        for frame in ({"room": "general", "before": "x"}, {"room": "general", "before": 0},
                      {"room": "general", "limit": 0}, {"room": "general", "limit": 201},
                      {"room": "general", "limit": True}, {}, {"directs": 1}):
            with self.subTest(frame=frame):
                await self.error(a, "bad_request", type="history", **frame)
        await self.still_serving(a, b)


class ResumeCostTest(ChatTestCase):
    """Item 6: what a connect or a history request reads is an indexed
    search, so its cost does not grow with the messages stored."""
    app_options = {"history": 5}

    @async_test
    async def test_connect_and_history_never_scan_the_messages(self):
        a, b = await self.pair()
        for i in range(20):
            await self.say(a, "m%d" % i)
            await self.say(a, "@UserB d%d" % i)
        b.close()
        await self.say(a, "@UserB waiting")
        db = chat.Hub.store.db
        statements = []
        db.set_trace_callback(statements.append)
        try:
            again, _ = await self.connect("UserB", self.tokens["UserB"], since=1)
            self.assertIs(again.joined["general"].get("truncated"), True)
            await self.ack(again, type="history", room="general", before=30)
            await self.ack(again, type="history", **{"with": "UserA"})
            await self.ack(again, type="history", directs=True, before=30)
            await self.ack(again, type="search", q="d1")
        finally:
            db.set_trace_callback(None)
        reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        self.assertGreater(len(reads), 3)
        for sql in reads:
            plan = " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql))
            self.assertNotRegex(plan, r"\bSCAN messages\b", "a full scan: %s\n%s" % (sql, plan))


class EncodeOnceTest(ChatTestCase):
    """Item 10: a join answers with messages as they were first encoded."""

    @async_test
    async def test_joining_again_encodes_no_message(self):
        a, b = await self.pair()
        for i in range(5):
            await self.say(a, "m%d" % i)
        with mock.patch.object(chat, "encode", wraps=chat.encode) as encode:
            joined = await self.reply(a, "joined", type="join", room="general")
        self.assertEqual(len(joined["history"]), 5)
        encoded = [c.args[0] for c in encode.call_args_list]
        self.assertFalse([f for f in encoded if isinstance(f, dict) and f.get("type") == "message"], encoded)


class PingForgeryTest(ChatTestCase):
    """Item 3: each connection's ping is its own; a sibling cannot answer it."""
    app_options = {"ping_interval": 0.3, "ping_timeout": 0.3}

    @gen_test(timeout=30)
    async def test_a_stalled_connection_is_dropped_though_a_reader_echoes_its_pings(self):
        port = self.get_http_port()
        reader, data = await raw_client(port, "Reader")
        stalled, _ = await raw_client(port, "Stalled")
        loop = asyncio.get_running_loop()
        pings = 0
        await self.wait_health(connections=2)
        for _ in range(400):
            chunk = await asyncio.wait_for(loop.sock_recv(reader, 65536), READ_TIMEOUT)
            self.assertTrue(chunk, "the reading connection was dropped")
            data += chunk
            frames, data = frames_in(data)
            for op, payload in frames:
                if op == 0x9:  # answer it, and forge the same answer for the stalled one
                    pings += 1
                    await loop.sock_sendall(reader, client_frame(0xA, payload))
                    await loop.sock_sendall(stalled, client_frame(0xA, payload))
            if (await self.health())["connections"] == 1:
                break
        else:
            self.fail("the stalled connection survived %d rounds of forged pongs" % pings)
        self.assertEqual(chat.Hub.online.keys(), {"reader"})
        reader.close()
        stalled.close()


class WireTest2(ChatTestCase):
    """Item 11: RFC 6455 as a client may break it."""

    async def closed_with(self, frame):
        sock, data = await raw_client(self.get_http_port(), "Raw%d" % len(chat.Hub.users))
        try:
            await asyncio.get_running_loop().sock_sendall(sock, frame)
            return await read_close(sock, data)
        finally:
            sock.close()

    @async_test
    async def test_text_that_is_not_utf8_closes_1007(self):
        self.assertEqual(await self.closed_with(client_frame(0x1, b'{"type":"rooms","x":"\xff\xfe"}')), 1007)

    @async_test
    async def test_an_unmasked_frame_closes_1002(self):
        self.assertEqual(await self.closed_with(client_frame(0x1, b'{"type":"rooms"}', masked=False)), 1002)

    @async_test
    async def test_an_unmasked_frame_right_behind_a_good_one_is_not_acted_on(self):
        """Both in one packet: the second's header is read at once, and is
        refused before Tornado reads on, so nobody receives its message."""
        b, _ = await self.connect("UserB")
        await self.sync(b)
        good = client_frame(0x1, b'{"type":"message","text":"first"}')
        bad = client_frame(0x1, b'{"type":"message","text":"second"}', masked=False)
        self.assertEqual(await self.closed_with(good + bad), 1002)
        got, _ = await self.until(b, "message")
        self.assertEqual(got["text"], "first")
        self.assertEqual([f for f in await self.sync(b) if f["type"] == "message"], [])

    @async_test
    async def test_a_close_code_the_rfc_forbids_is_never_sent_back(self):
        for code, answer in ((1005, 1002), (1006, 1002), (1015, 1002), (2000, 1002), (1000, 1000), (4000, 4000)):
            with self.subTest(code=code):
                self.assertEqual(await self.closed_with(client_frame(0x8, struct.pack(">H", code))), answer)


class FloodTest(ChatTestCase):
    """Item 10: every wire frame counts, and a connection that keeps going
    over its limits is closed with 4429 rather than costing a core."""
    app_options = {"rate": 5, "burst": 20}

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(chat, "FLOOD_CLOSE_AFTER", 0.3)  # not 10 s of a test's time
        patcher.start()
        self.addCleanup(patcher.stop)

    async def flood(self, first, frame):
        """Send `first`, then `frame` over and over until the server closes;
        return the close code and the text frames received."""
        sock, data = await raw_client(self.get_http_port(), "Flooder")
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, first)
            started = time.monotonic()
            while time.monotonic() - started < 12:  # bounded: the server must close long before
                try:
                    await loop.sock_sendall(sock, frame * 50)
                except ConnectionError:  # it closed on us mid-send: what it sent first is still to read
                    pass
                ended = False
                try:
                    while not ended:
                        chunk = sock.recv(65536)
                        ended = not chunk
                        data += chunk
                except BlockingIOError:
                    pass
                except ConnectionError:  # closed, and reset for the frames still coming: what came is all
                    break
                frames, _ = frames_in(data)
                if ended or any(op == 0x8 for op, _ in frames):
                    break
            code = await read_close(sock, data)
            texts = [json.loads(p) for op, p in frames_in(data)[0] if op == 0x1]
            return code, texts
        finally:
            sock.close()

    @gen_test(timeout=30)
    async def test_a_flood_of_pings_closes_4429(self):
        code, texts = await self.flood(b"", client_frame(0x9, b"p"))
        self.assertEqual(code, 4429)
        self.assertEqual(texts[-1]["code"], "rate_limited")

    @gen_test(timeout=30)
    async def test_a_flood_of_empty_fragments_closes_4429(self):
        code, _ = await self.flood(client_frame(0x1, b"{", fin=False), client_frame(0x0, b"", fin=False))
        self.assertEqual(code, 4429)

    @gen_test(timeout=30)
    async def test_messages_past_the_limit_for_long_close_4429(self):
        code, texts = await self.flood(b"", client_frame(0x1, b'{"type":"rooms"}'))
        self.assertEqual(code, 4429)
        self.assertIn("rate_limited", [t.get("code") for t in texts])

    @async_test
    async def test_typing_has_its_own_budget_and_extras_are_dropped_quietly(self):
        a, b = await self.pair()
        for i in range(chat.TYPING[0] + 3):
            ack, _ = await self.ack(a, type="typing", room="general")
        got = await self.sync(b)
        self.assertEqual([f["type"] for f in got], ["typing"] * chat.TYPING[0], "the extras were dropped")
        sent = 0
        while (await self.request(a, type="message", text="m%d" % sent))[0]["type"] == "ack":
            sent += 1
        self.assertGreaterEqual(sent, 19, "typing spent the message budget (burst 20, one spent by pair())")


class ConnectBudgetTest(ChatTestCase):
    """Item 9: connects per user and per address are budgeted, and a user
    whose connection flaps is not announced again."""
    app_options = {"connects_per_minute": 1, "offline_grace": 1.0}

    @async_test
    async def test_a_flapping_user_is_not_announced_twice(self):
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        await self.presence(a, "UserB", "online")
        await self.sync(a)
        b.close()
        await self.wait_health(connections=1)
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(a, "UserA, while UserB flapped")
        b.close()
        await self.presence(a, "UserB", "offline")  # after --offline_grace

    @async_test
    async def test_connects_per_user_past_the_budget_get_4429(self):
        _, welcome = await self.connect("UserA")  # claiming the name is not counted
        for _ in range(chat.AT_ONCE):
            ws, _ = await self.connect("UserA", welcome["token"])
            ws.close()
        await self.refused("rate_limited", 4429, username="UserA", token=welcome["token"])
        await self.connect("UserB")  # others are not held back

    @gen_test(timeout=30)
    async def test_connects_per_address_past_the_budget_get_4429(self):
        for i in range(10 * chat.AT_ONCE):
            ws = await self.open_ws("User%d" % i)
            self.assertEqual((await self.read(ws))["type"], "welcome")
            ws.close()
        await self.refused("rate_limited", 4429, username="OneTooMany")


class RoomBudgetTest(ChatTestCase):
    """Item 7: one user cannot use up --max_rooms, and empty rooms go."""
    app_options = {"rooms_per_hour": 1}

    @async_test
    async def test_new_rooms_per_user_are_budgeted(self):
        a, b = await self.pair()
        for i in range(chat.AT_ONCE):
            await self.ack(a, type="join", room="room%d" % i)
        await self.error(a, "rate_limited", type="join", room="onemore")
        await self.ack(b, type="join", room="room0")  # joining is not creating
        await self.ack(b, type="join", room="bs-own")  # and the budget is per user
        await self.ack(a, type="leave", room="room1")
        await self.ack(a, type="join", room="room1")  # it still exists: no budget spent

    @async_test
    async def test_rooms_per_user_are_capped(self):
        a, b = await self.pair()
        with mock.patch.object(chat, "ROOMS_PER_USER", 3):
            await self.ack(a, type="join", room="two")
            await self.ack(a, type="join", room="three")
            await self.error(a, "too_many_rooms", type="join", room="four")
            await self.ack(b, type="join", room="three")  # per user

    @async_test
    async def test_a_room_empty_for_a_day_is_forgotten_with_its_messages(self):
        a, b = await self.pair()
        await self.ack(a, type="join", room="old")
        await self.say(a, "in the old room", room="old")
        await self.ack(a, type="join", room="busy")
        await self.ack(a, type="leave", room="old")
        await self.ack(a, type="leave", room="general")
        chat.Hub.sweep(time.monotonic() + chat.ROOM_IDLE + 1)
        rooms = await self.reply(a, "rooms", type="rooms")
        self.assertEqual(sorted(r["name"] for r in rooms["rooms"]), ["busy", "general"],
                         "the default room and rooms with members stay")
        joined = await self.reply(a, "joined", type="join", room="old")
        self.assertEqual(joined["history"], [], "a new room of the same name starts empty")
        self.assertIsNone(chat.Hub.store.db.execute("SELECT 1 FROM messages WHERE text LIKE '%old room%'"
                          .replace("text", "frame")).fetchone())


class MailboxMemoryTest(FileCase):
    """Item 8: waiting private messages live in SQLite; RAM holds a count."""
    app_options = {"mailbox": 5}

    @gen_test(timeout=30)
    async def test_fifty_full_mailboxes_hold_counts_in_ram_and_arrive_after_a_restart(self):
        a, _ = await self.connect("Sender")
        names = ["Box%d" % i for i in range(50)]
        for name in names:
            ws, _ = await self.connect(name)
            ws.close()
        await self.wait_health(connections=1)
        for name in names:
            for i in range(5):
                await self.ack(a, type="message", text="@%s %d %s" % (name, i, "x" * 1000))
            await self.error(a, "mailbox_full", type="message", text="@%s one more" % name)
        self.assertEqual(chat.Hub.mailboxes, {chat.key(n): 5 for n in names})
        self.assertTrue(all(type(v) is int for v in chat.Hub.mailboxes.values()))
        await self.restart()
        self.assertEqual(chat.Hub.mailboxes, {chat.key(n): 5 for n in names}, "counts come back from SQLite")
        ws, _ = await self.connect("Box7", self.tokens["Box7"])
        got = await self.sync(ws)
        self.assertEqual([f["text"].split()[0] for f in got], ["0", "1", "2", "3", "4"])
        self.assertTrue(all(f["buffered"] and f["to"] == "Box7" for f in got))
        self.assertNotIn("box7", chat.Hub.mailboxes)


class ClientIdTest(FileCase):
    """Issue 10's page re-sends after a reconnect: a cid already stored is
    acked with its first id and not posted again."""

    @async_test
    async def test_a_repeated_cid_is_acked_with_the_first_id(self):
        a, b = await self.pair()
        first, _ = await self.ack(a, type="message", text="once", cid="c-1")
        await self.expect(b, "message", id=first["id"])
        again, _ = await self.ack(a, type="message", text="once", cid="c-1")
        self.assertEqual(again["id"], first["id"])
        await self.quiet(b, "UserB got it a second time")
        b.close()
        dm, _ = await self.ack(a, type="message", text="@UserB later", cid="c-2")
        self.assertIs(dm.get("queued"), True)
        await self.restart()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        repeat, _ = await self.ack(a, type="message", text="@UserB later", cid="c-2")
        self.assertEqual((repeat["id"], repeat.get("queued")), (dm["id"], True), "remembered across a restart")
        other, _ = await self.ack(a, type="message", text="once", cid="c-3")
        self.assertGreater(other["id"], dm["id"])

    @async_test
    async def test_cids_are_per_user_and_checked(self):
        a, b = await self.pair()
        mine, _ = await self.ack(a, type="message", text="a's", cid="same")
        theirs, _ = await self.ack(b, type="message", text="b's", cid="same")
        self.assertNotEqual(mine["id"], theirs["id"])
        await self.sync(a)
        for cid in ("", "x" * 65, "has space", 7, "é"):
            with self.subTest(cid=cid):
                await self.error(a, "bad_request", type="message", text="hi", cid=cid)


class HostTest(ChatTestCase):
    """Item 5: DNS rebinding. Only requests naming this server get / and /ws."""
    app_options = {"hosts": ["chat.example.org", "other.example:8443"]}

    async def status(self, path, host):
        try:
            response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d%s" % (self.get_http_port(), path),
                                                     headers={"Host": host})
            return response.code
        except HTTPClientError as e:
            return e.code

    @async_test
    async def test_a_foreign_host_gets_403_on_the_page_and_the_socket(self):
        port = self.get_http_port()
        host = "rebind.attacker.example:%d" % port
        self.assertEqual(await self.status("/", host), 403)
        self.assertEqual(await self.status("/metrics", host), 403, "the counts are not the rebinding page's either")
        self.assertEqual(await self.status("/", "chat.example.org"), 200)
        self.assertEqual(await self.status("/metrics", "chat.example.org"), 403,
                         "a proxy on this machine passing the public name on does not open the counts")
        self.assertEqual(await self.status("/metrics", "localhost.attacker.example:%d" % port), 403)

    @async_test
    async def test_metrics_are_asked_for_by_address_on_any_port(self):
        """A scraper names the server by address: behind a port mapping, or on
        port 80 (no port in Host), it still gets the counts."""
        port = self.get_http_port()
        for host in ("127.0.0.1:%d" % port, "127.0.0.1", "10.0.0.5:9000", "[::1]:%d" % port, "LOCALHOST"):
            with self.subTest(host=host):
                self.assertEqual(await self.status("/metrics", host), 200)
        self.assertEqual(await self.status("/healthz", host), 200)
        request = HTTPRequest(self.url(username="Victim"), headers={"Host": host, "Origin": "http://" + host})
        with self.assertRaises(HTTPClientError) as caught:
            await websocket_connect(request)
        self.assertEqual(caught.exception.code, 403)
        self.assertEqual(chat.Hub.users, {}, "nothing was claimed")

    @async_test
    async def test_this_servers_names_are_allowed(self):
        port = self.get_http_port()
        for host, code in (("127.0.0.1:%d" % port, 200), ("localhost:%d" % port, 200), ("[::1]:%d" % port, 200),
                           ("LOCALHOST:%d" % port, 200), ("localhost:1", 403), ("localhost", 403),
                           ("chat.example.org", 200), ("chat.example.org:443", 200),
                           ("other.example:8443", 200), ("other.example", 403), ("10.0.0.1:%d" % port, 403)):
            with self.subTest(host=host):
                self.assertEqual(await self.status("/", host), code)


class LookalikeTest(ChatTestCase):
    """Item 12: a new name that reads as an owned one is refused."""

    @async_test
    async def test_names_too_close_to_an_owned_one_are_refused(self):
        await self.connect("Ana.Lee")
        await self.connect("Bob0")
        for name in ("analee", "Ana_Lee", "ana-lee", "AnaLee", "AnaIee", "Ana1ee", "B0bo", "bobO", "Bob_0"):
            with self.subTest(name=name):
                err = await self.refused("bad_username", 4400, username=name)
                self.assertIn("too close", err["message"])
        _, welcome = await self.connect("Ana.Lee", self.tokens["Ana.Lee"])  # the owner still gets in
        self.assertEqual(welcome["user"], "Ana.Lee")
        await self.connect("Anna")  # a different name is fine


class ListenerTest(ProcessCase):
    """Item 4: connections before any request: a header timeout, a total
    cap, and running out of file descriptors."""

    async def connect_raw(self, port, send=b"GET / HTTP/1.1\r\n"):
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        if send:
            await asyncio.get_running_loop().sock_sendall(sock, send)
        return sock

    async def ended(self, sock, limit=10):
        """Read until the server closes; what it sent."""
        loop, data = asyncio.get_running_loop(), b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), limit)
            if not chunk:
                return data
            data += chunk

    async def healthy(self, port):
        for _ in range(200):
            try:
                return await self.health(port)
            except (HTTPClientError, OSError):  # refused (503) until the closes are seen: ask again
                pass
        self.fail("/healthz never answered")

    @gen_test(timeout=30)
    async def test_a_request_that_never_finishes_its_headers_is_closed(self):
        proc, port, _ = await self.start("--header_timeout", "0.5")
        sock = await self.connect_raw(port)
        self.assertEqual(await self.ended(sock), b"")
        sock.close()

    @gen_test(timeout=30)
    async def test_max_conns_counts_http_connections(self):
        proc, port, _ = await self.start("--max_conns", "3")
        held = [await self.connect_raw(port) for _ in range(3)]
        await self.wait_for_count(port, held)
        extra = await self.connect_raw(port, send=b"")
        self.assertIn(b" 503 ", await self.ended(extra))
        extra.close()
        for sock in held:
            sock.close()
        self.assertEqual((await self.healthy(port))["status"], "ok")

    async def wait_for_count(self, port, held):
        """The server has accepted the held connections (a 4th is refused)."""
        for sock in held:
            await asyncio.get_running_loop().sock_sendall(sock, b"X-Wait: 1\r\n")

    @gen_test(timeout=40)
    async def test_running_out_of_descriptors_logs_little_and_recovers(self):
        import resource

        def few_files():
            resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

        proc, port, lines = await self.start("--max_conns", "0", preexec_fn=few_files)
        held = [await self.connect_raw(port) for _ in range(80)]
        await self.logged(proc, lines, b"cannot accept")
        for sock in held:
            sock.close()
        self.assertEqual((await self.healthy(port))["status"], "ok")
        log = b"".join(lines)
        self.assertIn(b"cannot accept", log)
        self.assertNotIn(b"Traceback", log)
        self.assertLess(log.count(b"cannot accept"), 15, "at most a line a second")

    @gen_test(timeout=30)
    async def test_the_soft_file_limit_is_raised_to_the_hard_one(self):
        import resource

        def low_soft_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))

        proc, port, _ = await self.start(preexec_fn=low_soft_limit)
        with open("/proc/%d/limits" % proc.pid) as f:
            limit = [line for line in f if line.startswith("Max open files")][0].split()
        self.assertEqual(limit[3:5], ["4096", "4096"])


class UsageTest(ProcessCase):
    """Item 13: a mistake on the command line is one line and exit 2."""

    @gen_test(timeout=30)
    async def test_a_mistyped_option_is_one_line_and_exit_2(self):
        for argv, word in ((["--bogus"], "--bogus"), (["--port", "notanumber"], "notanumber"),
                           (["--config", "/no/such/file.conf"], "/no/such/file.conf")):
            with self.subTest(argv=argv):
                proc, _, _ = await self.start(ready=False, argv=argv)
                code = await asyncio.wait_for(proc.wait(), 10)
                err = (await proc.stderr.read()).decode()
                self.assertEqual(code, 2, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(word, err)
                self.assertIn("--help", err)
                self.assertNotIn("Traceback", err)


################ Connect cost independent of the crowd (issue 9)


class PresenceBatchTest(ChatTestCase):
    """Presence and membership changes of one --presence_window go out as
    one frame each, encoded once; a change undone within it is not told."""
    app_options = {"presence_window": 0.3}

    @async_test
    async def test_arrivals_within_the_window_are_one_frame(self):
        batches = self.batches()
        a, _ = await self.connect("UserA")
        await self.batch_sent(batches)  # UserA alone in it: not told about itself
        for name in ("userC", "UserB", "UserD"):
            await self.connect(name)
        frame = await self.read(a, "the batch")
        self.assertEqual(frame, {"type": "presence", "online": ["UserB", "userC", "UserD"], "offline": []})
        member = await self.read(a, "the member batch")
        self.assertEqual(member, {"type": "member", "room": "general", "joined": ["UserB", "userC", "UserD"],
                                  "left": []})
        await self.quiet(a)

    @async_test
    async def test_leaving_and_coming_back_within_the_window_is_not_told(self):
        batches = self.batches()
        a, _ = await self.connect("UserA")
        await self.batch_sent(batches)
        b, _ = await self.connect("UserB")
        await self.presence(a, "UserB", "online")
        await self.sync(a)
        b.close()
        await self.wait_health(connections=1)
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.batch_sent(batches)
        await self.quiet(a, "UserA, while UserB left and came back within the window")
        b.close()
        frame = await self.presence(a, "UserB", "offline")
        self.assertEqual(frame, {"type": "presence", "online": [], "offline": ["UserB"]})

    @async_test
    async def test_each_name_once_with_its_latest_state(self):
        a, _ = await self.connect("UserA")
        c, _ = await self.connect("UserC")
        await self.presence(a, "UserC", "online")
        await self.sync(a)
        b, _ = await self.connect("UserB")  # online, then ...
        c.close()  # ... UserC offline in the same window
        await self.wait_health(connections=2)
        frame = await self.expect(a, "presence")
        self.assertEqual(frame, {"type": "presence", "online": ["UserB"], "offline": ["UserC"]})


class RosterTest(ChatTestCase):
    """welcome and joined carry at most --roster names; members pages the rest."""
    app_options = {"roster": 2}

    @async_test
    async def test_rosters_are_capped_and_counted(self):
        names = ["dave", "Bob", "carol", "Ann", "eve"]
        for name in names:
            ws, _ = await self.connect(name)
        ws, welcome = await self.connect("Zed")
        self.assertEqual((welcome["online"], welcome["online_count"]), (["Ann", "Bob"], 6))
        joined = ws.joined["general"]
        self.assertEqual((joined["members"], joined["member_count"]), (["Ann", "Bob"], 6))

    @async_test
    async def test_members_pages_through_everyone(self):
        names = ["dave", "Bob", "carol", "Ann", "eve"]
        for name in names:
            ws, _ = await self.connect(name)
        got, after = [], None
        for _ in range(5):
            frame = {"type": "members", "room": "general"}
            if after:
                frame["after"] = after
            page = await self.reply(ws, "members", **frame)
            self.assertEqual(page["room"], "general")
            got += page["members"]
            after = page["members"][-1]
            if not page["more"]:
                break
        self.assertEqual(got, ["Ann", "Bob", "carol", "dave", "eve"])
        online = await self.reply(ws, "members", type="members", after="bob")
        self.assertEqual((online["members"], online["more"]), (["carol", "dave"], True))
        self.assertNotIn("room", online)
        await self.error(ws, "not_in_room", type="members", room="elsewhere")
        await self.error(ws, "bad_request", type="members", after="not a name")

    @async_test
    async def test_lists_follow_who_comes_goes_joins_and_leaves(self):
        """The online and member lists are kept sorted from batch to batch,
        not sorted afresh: they still say who is there after changes."""
        socks = {name: (await self.connect(name))[0] for name in ("dave", "Bob", "carol", "Ann")}
        await self.reply(socks["carol"], "left", type="leave", room="general")
        await self.member(socks["dave"], "general", "carol", "leave")
        socks["Bob"].close()
        await self.presence(socks["dave"], "Bob", "offline")
        ws, welcome = await self.connect("Cy")
        await self.reply(socks["carol"], "joined", type="join", room="general")
        await self.member(ws, "general", "carol", "join")
        self.assertEqual((welcome["online"], welcome["online_count"]), (["Ann", "carol"], 4))
        online, members = [], []
        for got, room in ((online, None), (members, "general")):
            after = None
            while True:
                frame = {"type": "members", **({"room": room} if room else {}), **({"after": after} if after else {})}
                page = await self.reply(ws, "members", **frame)
                got += page["members"]
                if not page["more"]:
                    break
                after = page["members"][-1]
        self.assertEqual(online, ["Ann", "carol", "Cy", "dave"])
        self.assertEqual(members, ["Ann", "Bob", "carol", "Cy", "dave"])  # Bob is a member while away

    @async_test
    async def test_your_own_name_is_in_your_welcome_and_joined(self):
        for name in ("Ann", "Bob", "Cy"):
            await self.connect(name)
        ws, welcome = await self.connect("Al")  # sorts before the others, and is new
        self.assertEqual(welcome["online"], ["Al", "Ann"])
        self.assertEqual(ws.joined["general"]["members"], ["Al", "Ann"])


class StormTest(ChatTestCase):
    """A reconnect storm of N users writes frames in proportion to N, not N²."""
    app_options = {"presence_window": 0.2}

    async def storm(self, n, prefix):
        names = ["%s%03d" % (prefix, i) for i in range(n)]
        first = [await self.connect(name) for name in names]
        await self.wait_health(users_online=len(chat.Hub.online))
        for ws, _ in first:
            ws.close()
        await self.wait_health(users_online=0)
        while not self.queue.empty():
            self.queue.get_nowait()
        if chat.Announcer.presence or chat.Announcer.membership:
            await self.batch_sent(self.queue)  # the offline batch
        before = sum(n for (family, _), n in chat.Metrics.counts.items() if family == "frames_out")
        again = await asyncio.gather(*[self.connect(name, self.tokens[name]) for name in names])
        await asyncio.gather(*[self.presence_seen(ws) for ws, _ in again])
        after = sum(n for (family, _), n in chat.Metrics.counts.items() if family == "frames_out")
        for ws, _ in again:
            ws.close()
        await self.wait_health(users_online=0)
        return after - before

    async def presence_seen(self, ws):
        while True:
            frame = await self.read(ws)
            if frame["type"] == "presence":
                return

    @gen_test(timeout=60)
    async def test_frames_written_in_a_storm_grow_linearly(self):
        self.queue = self.batches()
        small = await self.storm(30, "a")
        big = await self.storm(60, "b")
        self.assertLess(big, 2.6 * small, "frames for 30 users: %d, for 60: %d" % (small, big))


class MetricsTest(ChatTestCase):

    async def scrape(self):
        response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/metrics" % self.get_http_port())
        self.assertTrue(response.headers["Content-Type"].startswith("text/plain"))
        return response.body.decode()

    @async_test
    async def test_metrics_count_what_the_server_does(self):
        a, b = await self.pair()
        await self.say(a, "one")
        a.write_message("not json")
        await self.next_error(a, "bad_json")
        text = await self.scrape()
        for line in ('chat_frames_in_total{type="message"} 1', 'chat_frames_out_total{type="message"} 2',
                     'chat_errors_total{code="bad_json"} 1', "chat_connections 2", "chat_users_online 2",
                     "chat_rooms 1", "# TYPE chat_db_write_seconds histogram", 'chat_db_write_seconds_bucket{le="+Inf"}',
                     "# TYPE chat_event_loop_lag_seconds gauge"):
            self.assertIn(line, text)

    @async_test
    async def test_metrics_are_for_loopback_and_metrics_from_only(self):
        class Remote:
            is_loopback = False
        with mock.patch.object(chat.ipaddress, "ip_address", return_value=Remote()):
            with self.assertRaises(HTTPClientError) as caught:
                await self.scrape()
        self.assertEqual(caught.exception.code, 403)
################ Guards found by mutation (issue 8, item 14)
# Each test here fails on a change to chat.py (a mutant, see mutate.py) that
# once broke a promise of README without any test noticing.


class Clock:
    """chat's view of the time module, with monotonic() `ahead` seconds
    later than the real one: as if every connection had been idle that long."""

    def __init__(self, ahead):
        self.ahead = ahead

    def monotonic(self):
        return time.monotonic() + self.ahead

    def __getattr__(self, name):
        return getattr(time, name)


class PrivacyTest(ChatTestCase):

    @async_test
    async def test_a_direct_message_reaches_nobody_else(self):
        """A DM goes to the connections of its sender and its recipient only:
        a third user online, in the same room, gets nothing of it, whether
        the recipient is online or away."""
        a, b = await self.pair()
        c, _ = await self.connect("UserC")
        await self.sync(a)
        await self.sync(b)
        ack = await self.say(a, "@UserB for your eyes only")
        self.assertEqual((await self.read(b))["id"], ack["id"])
        await self.quiet(c, "UserC, a bystander")
        b.close()
        await self.presence(c, "UserB", "offline")
        ack = await self.say(a, "@UserB kept for you")
        self.assertIs(ack["queued"], True)
        await self.quiet(c, "UserC, a bystander")

    @async_test
    async def test_leave_tells_every_tab_of_the_user(self):
        """Membership is the user's: leaving in one tab sends left to all its tabs."""
        a1, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        await self.ack(a1, type="join", room="python")
        await self.expect(a2, "joined", room="python")
        left = await self.reply(a1, "left", type="leave", room="python")
        self.assertEqual(left, {"type": "left", "room": "python"})
        self.assertEqual(await self.read(a2), left)
        await self.quiet(a2, "the other tab")

    @async_test
    async def test_typing_goes_to_the_others_not_to_the_typists_tabs(self):
        a1, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        b, _ = await self.connect("UserB")
        await self.sync(a1)
        await self.sync(a2)
        _, before = await self.ack(a1, type="typing", room="general")
        self.assertEqual(before, [], "the typist got something before its ack")
        self.assertEqual(await self.read(b), {"type": "typing", "user": "UserA", "room": "general"})
        await self.quiet(a2, "the typist's other tab")


class StoreFailureTest(ChatTestCase):
    """A message the database did not take is answered server_error, and is
    relayed to nobody, kept nowhere, and the connection carries on."""

    async def refused_by_the_store(self, ws, text):
        with mock.patch.object(chat.Hub.store, "add_message",
                               side_effect=sqlite3.OperationalError("disk I/O error")), \
                self.assertLogs("chat", "ERROR"):
            await self.error(ws, "server_error", type="message", text=text)  # and nothing before it

    @async_test
    async def test_a_room_message_the_store_refused_reaches_nobody(self):
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        await self.refused_by_the_store(a, "lost to a full disk")
        await self.quiet(a2, "the sender's other tab")
        await self.quiet(b, "another member")
        c, _ = await self.connect("UserC")
        self.assertEqual(c.joined["general"]["history"], [], "a refused message is in the history")
        await self.sync(a)
        await self.sync(b)
        await self.still_serving(a, b)

    @async_test
    async def test_a_direct_message_the_store_refused_reaches_nobody(self):
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        await self.refused_by_the_store(a, "@UserB lost to a full disk")
        await self.quiet(a2, "the sender's other tab")
        await self.quiet(b, "the recipient")
        b.close()
        await self.presence(a, "UserB", "offline")
        await self.refused_by_the_store(a, "@UserB lost while you were away")
        b, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(b, "UserB back: nothing was kept for it")
        await self.sync(a)
        ack = await self.say(a, "@UserB works again")
        self.assertEqual((await self.read(b))["id"], ack["id"])


class BurstCapTest(ChatTestCase):
    app_options = {"rate": 0.01, "burst": 3}  # one token per 100 s: only the burst counts here

    @async_test
    async def test_an_idle_connection_still_sends_only_burst_at_once(self):
        """However long a connection was quiet, its bucket holds --burst
        frames: of four sent at once after an hour, the fourth is rate_limited."""
        a, b = await self.pair()  # pair() spent one of UserA's three
        with mock.patch.object(chat, "time", Clock(ahead=3600)):
            refs = [self.ref() for _ in range(4)]
            for i, ref in enumerate(refs):
                self.send(a, type="message", text="burst %d" % i, ref=ref)
            answers = [(await self.answer(a, ref))[0] for ref in refs]
        self.assertEqual([f["type"] for f in answers], ["ack", "ack", "ack", "error"], answers)
        self.assertEqual(answers[3]["code"], "rate_limited")
        self.assertEqual([(await self.read(b))["text"] for _ in range(3)], ["burst 0", "burst 1", "burst 2"])
        await self.quiet(b, "UserB (no 'burst 3')")


class RestartTest(FileCase):
    """A second make_app on the same file is a restart (as in PersistenceTest)."""
    app_options = {"history": 3}


    @async_test
    async def test_restart_keeps_each_rooms_newest_history_oldest_first(self):
        """A restart reloads each room's newest --history messages, oldest first."""
        a, _ = await self.connect("UserA")
        await self.ack(a, type="join", room="python")
        general, python = [], []
        for i in range(5):  # interleaved: each room's history is its own
            general.append((await self.say(a, "g%d" % i))["id"])
            python.append((await self.say(a, "p%d" % i, "python"))["id"])
        await self.restart()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        for room, ids, prefix in (("general", general, "g"), ("python", python, "p")):
            history = a.joined[room]["history"]
            self.assertEqual([m["id"] for m in history], ids[-3:], room)
            self.assertEqual([m["text"] for m in history], [prefix + "2", prefix + "3", prefix + "4"])
        later = await self.say(a, "after the restart")
        joined = await self.reply(a, "joined", type="join", room="general")  # already in: a fresh copy
        self.assertEqual([m["id"] for m in joined["history"]], general[-2:] + [later["id"]])

    @async_test
    async def test_a_room_left_stays_left_after_a_restart(self):
        a, _ = await self.connect("UserA")
        await self.ack(a, type="join", room="python")
        await self.reply(a, "left", type="leave", room="general")
        await self.restart()
        _, welcome = await self.connect("UserA", self.tokens["UserA"])
        self.assertEqual(welcome["rooms"], ["python"])
        b, _ = await self.connect("UserB")
        self.assertEqual(b.joined["general"]["members"], ["UserB"])


class OpenFailureLogTest(ChatTestCase):

    @async_test
    async def test_a_failure_in_open_logs_the_url_without_its_token(self):
        """When open() itself fails (a bug), the connection ends and the error
        line names the request with its token blotted out; the server goes on."""
        _, welcome = await self.connect("UserA")
        token = welcome["token"]
        for failure in (RuntimeError("a bug"), HTTPError(500, "a bug")):
            with self.subTest(failure=failure):
                with mock.patch.object(chat, "raw_stream", side_effect=failure), \
                        self.assertLogs(level="WARNING") as logs:
                    ws = await self.open_ws("UserA", token)
                    self.assertIsNone(await self.raw_read(ws, "the end of the connection"))
                lines = "\n".join(logs.output)
                self.assertIn("/ws?username=UserA&token=***", lines)
                self.assertNotIn(token, lines)
        await self.connect("UserA", token)


class GreetingBudgetGuardTest(ChatTestCase):
    app_options = {"max_queue": 4000, "max_text": 1000}

    @async_test
    async def test_a_room_cut_short_at_connect_keeps_its_newest_messages(self):
        a, _ = await self.connect("UserA")
        ids = [(await self.say(a, "%d %s" % (i, "g" * 700)))["id"] for i in range(6)]  # about 4.9 KB
        again, _ = await self.connect("UserA", self.tokens["UserA"])
        joined = again.joined["general"]
        self.assertIs(joined.get("truncated"), True)
        kept = [m["id"] for m in joined["history"]]
        self.assertTrue(0 < len(kept) < len(ids), kept)
        self.assertEqual(kept, ids[len(ids) - len(kept):], "the newest messages are the ones kept")

    @async_test
    async def test_room_histories_get_only_what_private_messages_leave(self):
        """Private messages come first, up to half of --max_queue bytes; room
        histories share what they leave (truncated; a join fetches the rest)."""
        a, b = await self.pair()
        room = [(await self.say(a, "%d %s" % (i, "r" * 900)))["id"] for i in range(3)]  # about 3 KB
        for i in range(5):  # about 5 KB
            await self.say(a, "@UserB %d %s" % (i, "d" * 900))
        again, welcome = await self.connect("UserB", self.tokens["UserB"], since=0)
        directs = await self.sync(again)
        self.assertIs(welcome.get("directs_truncated"), True)
        self.assertLessEqual(sum(len(json.dumps(f)) for f in directs), 2000)
        joined = again.joined["general"]
        self.assertIs(joined.get("truncated"), True)
        self.assertLess(len(joined["history"]), 3)
        sequence = [welcome, joined] + directs
        self.assertLessEqual(sum(len(json.dumps(f, ensure_ascii=False, separators=(",", ":"))) for f in sequence), 4000)
        full = await self.reply(again, "joined", type="join", room="general")
        self.assertEqual([m["id"] for m in full["history"]], room)


class IpCapFreedTest(ChatTestCase):
    app_options = {"max_tabs": 0, "max_conns_per_ip": 2}

    @async_test
    async def test_a_closed_connection_frees_its_place(self):
        a, welcome = await self.connect("UserA")
        a2, _ = await self.connect("UserA", welcome["token"])
        await self.refused("too_many_connections", 4429, username="UserA", token=welcome["token"])
        a2.close()
        await self.wait_health(connections=1)
        await self.connect("UserA", welcome["token"])


class FrameErrorGuardTest(ChatTestCase):

    @async_test
    async def test_nan_and_infinity_are_not_json(self):
        """Python's json accepts NaN and Infinity; JSON does not: bad_json."""
        a, b = await self.pair()
        for text in ["NaN", "-Infinity", '{"type": "rooms", "ref": 1, "x": NaN}',
                     '{"type": "message", "text": "hi", "n": Infinity}']:
            with self.subTest(text=text):
                a.write_message(text)
                await self.next_error(a, "bad_json")
        await self.still_serving(a, b)

    @async_test
    async def test_a_failure_on_one_frame_is_server_error_and_the_connection_goes_on(self):
        """Even a bug answers a frame with exactly one error carrying its ref."""
        a, b = await self.pair()
        with mock.patch.object(chat.ChatSocket, "do_rooms", side_effect=RuntimeError("a bug")), \
                self.assertLogs("chat", "ERROR"):
            await self.error(a, "server_error", type="rooms")
        await self.still_serving(a, b)


class OriginsWrittenAnyhowTest(ChatTestCase):
    app_options = {"origins": ["https://Chat.Example.org/"]}

    @async_test
    async def test_listed_origins_match_whatever_their_case_or_trailing_slash(self):
        """Browsers send an Origin in lower case without a slash; --origins
        matches it however the operator wrote it."""
        ws = await self.open_ws("UserA", headers={"Origin": "https://chat.example.org"})
        self.assertEqual((await self.read(ws))["type"], "welcome")
        with self.assertRaises(HTTPClientError) as caught:
            await self.open_ws("UserB", headers={"Origin": "https://chat.example.org.evil.com"})
        self.assertEqual(caught.exception.code, 403)


class LongPingTimeoutTest(ChatTestCase):
    app_options = {"ping_interval": 0.3, "ping_timeout": 60}

    @async_test
    async def test_a_silent_client_is_dropped_within_two_intervals_whatever_the_timeout(self):
        """--ping_timeout counts at most --ping_interval: a vanished client is
        shown offline within 2 x the interval, however long the timeout says."""
        a, _ = await self.connect("UserA")
        ghost, _ = await raw_client(self.get_http_port(), "Ghost")
        try:
            await self.presence(a, "Ghost", "online")
            offline = self.presence(a, "Ghost", "offline")
            try:  # 2 x 0.3 s by the rule; 2 s leaves room for a busy machine
                await gen.with_timeout(datetime.timedelta(seconds=2), offline)
            except gen.TimeoutError:
                self.fail("Ghost still online 2 s after it stopped answering pings")
        finally:
            ghost.close()


################ Conversations that last: scroll-back, search, read markers, devices (issue 11)


class ScrollBackTest(ChatTestCase):
    app_options = {"history": 20}

    @gen_test(timeout=60)
    async def test_scroll_back_to_the_first_of_a_thousand_messages(self):
        a, _ = await self.connect("UserA")
        sent = []
        for i in range(1000):
            frame = {"type": "message", "text": "m%d" % i, "ref": i}
            self.send(a, **frame)
        for i in range(1000):
            ack, _ = await self.answer(a, i)
            sent.append(ack["id"])
        again, _ = await self.connect("UserA", self.tokens["UserA"])
        shown = [m["id"] for m in again.joined["general"]["history"]]
        self.assertEqual(shown, sent[-20:])
        while True:
            page = await self.reply(again, "history", type="history", room="general", before=shown[0], limit=200)
            ids = [m["id"] for m in page["messages"]]
            self.assertTrue(ids, "an empty page while more was promised")
            shown = ids + shown
            if not page["more"]:
                break
        self.assertEqual(shown, sent, "every message once, in order, back to the first")
        self.assertEqual(page["messages"][0]["text"], "m0")


class SearchTest(FileCase):

    async def search(self, ws, q, **more):
        return await self.reply(ws, "results", type="search", q=q, **more)

    @async_test
    async def test_search_finds_words_in_your_rooms_and_your_own_private_messages_only(self):
        a, b = await self.pair()
        c, _ = await self.connect("UserC")
        await self.ack(c, type="join", room="secret")
        room = await self.say(a, "the deploy logs are in /var/log")
        mine = await self.say(b, "@UserA deploy logs attached")
        await self.say(c, "@UserB deploy logs for your eyes only")  # UserB's, not UserA's
        await self.say(c, "deploy logs of the secret room", room="secret")
        await self.say(a, "deployment is not a word match")
        found = await self.search(a, "Deploy LOGS")
        self.assertEqual(found["q"], "Deploy LOGS")
        self.assertEqual([m["id"] for m in found["messages"]], [mine["id"], room["id"]], "newest first")
        self.assertIs(found["more"], False)
        self.assertEqual((await self.search(a, "deploy logs eyes"))["messages"], [])
        self.assertEqual((await self.search(b, "eyes"))["messages"][0]["text"], "deploy logs for your eyes only")
        await self.ack(a, type="leave", room="general")
        found = await self.search(a, "deploy logs")
        self.assertEqual([m["id"] for m in found["messages"]], [mine["id"]], "only the rooms it is in now")

    @async_test
    async def test_search_pages_back_with_before(self):
        a, _ = await self.connect("UserA")
        ids = [(await self.say(a, "needle %d" % i))["id"] for i in range(chat.SEARCH_PAGE + 5)]
        first = await self.search(a, "needle")
        self.assertEqual(len(first["messages"]), chat.SEARCH_PAGE)
        self.assertIs(first["more"], True)
        rest = await self.search(a, "needle", before=first["messages"][-1]["id"])
        self.assertEqual([m["id"] for m in first["messages"] + rest["messages"]], ids[::-1])
        self.assertIs(rest["more"], False)

    @async_test
    async def test_search_syntax_is_only_words(self):
        a, b = await self.pair()
        await self.say(a, "NEAR OR AND quoted")
        await self.sync(b)
        for q in ('"unbalanced', "NEAR(a b)", "a OR b*", "col:umn", "^start", "-minus"):
            with self.subTest(q=q):
                await self.reply(a, "results", type="search", q=q)  # answered, never a server_error
        for frame in ({"q": ""}, {"q": "  !!! "}, {"q": 5}, {"q": "x" * 201}, {"q": "ok", "before": "x"}, {}):
            with self.subTest(frame=frame):
                await self.error(a, "bad_request", type="search", **frame)
        await self.still_serving(a, b)

    @async_test
    async def test_words_that_did_not_reach_the_index_before_a_crash_are_indexed_at_start(self):
        a, _ = await self.connect("UserA")
        lost = await self.say(a, "written just before the crash")
        store = chat.Hub.store
        self.assertIn(lost["id"], store.unindexed, "words go to the index in batches")
        store.unindexed.clear()  # as kill -9 would lose them
        await self.restart()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        found = await self.search(a, "crash")
        self.assertEqual([m["id"] for m in found["messages"]], [lost["id"]])

    @async_test
    async def test_messages_from_before_search_are_indexed_at_the_first_start(self):
        a, _ = await self.connect("UserA")
        old = await self.say(a, "written before the upgrade")
        db = sqlite3.connect(self.db)
        db.execute("DROP TABLE search")  # as a database from before search
        db.commit()
        db.close()
        await self.restart()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        found = await self.search(a, "upgrade")
        self.assertEqual([m["id"] for m in found["messages"]], [old["id"]])


class ReadMarkerTest(FileCase):

    @async_test
    async def test_read_markers_reach_the_other_devices_move_forward_and_survive_a_restart(self):
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        room = [(await self.say(b, "r%d" % i))["id"] for i in range(3)]
        dm = await self.say(b, "@UserA private")
        await self.sync(a)
        await self.sync(a2)
        _, before = await self.ack(a, type="read", room="general", id=room[1])
        self.assertEqual(before, [], "the tab that moved the marker is not told")
        self.assertEqual(await self.read(a2), {"type": "read", "room": "general", "id": room[1]})
        await self.quiet(a, "the tab that sent it")
        await self.ack(a, type="read", room="general", id=room[0])  # backwards: nothing changes
        _, before = await self.ack(a2, type="read", **{"with": "userb", "id": dm["id"]})
        self.assertEqual(before, [], "the tab that moved the marker is not told")
        self.assertEqual(await self.read(a), {"type": "read", "with": "UserB", "id": dm["id"]})
        await self.quiet(a2)
        await self.restart()
        again, welcome = await self.connect("UserA", self.tokens["UserA"])
        self.assertEqual(again.joined["general"]["read"], room[1])
        self.assertEqual(welcome["read_with"], {"UserB": dm["id"]})
        b2, welcome = await self.connect("UserB", self.tokens["UserB"])
        self.assertEqual((welcome["read_with"], b2.joined["general"]["read"]), ({}, 0), "markers are per user")

    @async_test
    async def test_what_a_room_said_before_you_joined_is_not_unread(self):
        """A join moves the joiner's read marker in the room to the newest id:
        the history it gets is not news, what is said after it is."""
        a, b = await self.pair()
        said = await self.say(a, "before Cy came")
        c, _ = await self.connect("UserC")  # a new name starts in the default room
        general = c.joined["general"]
        self.assertEqual((general["read"], general["history"][-1]["id"]), (said["id"], said["id"]))
        await self.ack(a, type="join", room="python")
        first = await self.say(a, "python, before Bo joined", room="python")
        joined = await self.reply(b, "joined", type="join", room="python")
        self.assertEqual((joined["read"], [m["id"] for m in joined["history"]]), (first["id"], [first["id"]]))
        after = await self.say(a, "python, after", room="python")
        self.assertGreater(after["id"], joined["read"], "what is said after the join is unread")
        await self.reply(b, "left", type="leave", room="python")
        meanwhile = await self.say(a, "python, while Bo was out", room="python")
        joined = await self.reply(b, "joined", type="join", room="python")
        self.assertEqual(joined["read"], meanwhile["id"], "nor what was said while it was out")
        await self.restart()
        again, _ = await self.connect("UserB", self.tokens["UserB"])
        self.assertEqual(again.joined["python"]["read"], meanwhile["id"])

    @async_test
    async def test_bad_read_markers(self):
        a, b = await self.pair()
        ack = await self.say(a, "x")
        await self.sync(b)
        for frame in ({"room": "general"}, {"room": "general", "id": 0}, {"room": "general", "id": ack["id"] + 99},
                      {"room": "general", "id": "1"}, {"id": ack["id"]}):
            with self.subTest(frame=frame):
                await self.error(a, "bad_request", type="read", **frame)
        await self.error(a, "not_in_room", type="read", room="elsewhere", id=ack["id"])
        await self.error(a, "unknown_user", type="read", id=ack["id"], **{"with": "Nobody"})
        await self.still_serving(a, b)


class DeviceTest(ChatTestCase):
    """One name on many devices: a one-time code links a new one, each has
    its own token, and any can be signed out."""

    async def link_code(self, ws):
        return await self.reply(ws, "link", type="link")

    @async_test
    async def test_a_code_links_a_second_device_once(self):
        a, welcome = await self.connect("Ana")
        link = await self.link_code(a)
        self.assertRegex(link["code"], r"^[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}$")
        self.assertRegex(link["expires"], TS)
        ws = await self.open_ws("Ana")
        ws.close()
        phone = await websocket_connect(self.url(username="Ana", link=link["code"].lower().replace("-", "")))
        self.sockets.append(phone)
        second = await self.read(phone)
        self.assertEqual((second["type"], second["user"]), ("welcome", "Ana"))
        self.assertNotEqual(second["token"], welcome["token"], "a token of its own")
        self.assertNotEqual(second["device"], welcome["device"])
        await self.refused("name_taken", 4409, username="Ana", link=link["code"])  # used up
        again, welcome_again = await self.connect("Ana", second["token"])  # the phone's own token signs it in
        self.assertEqual(welcome_again["device"], second["device"])
        again.close()
        devices = await self.reply(a, "devices", type="devices")
        self.assertEqual([(d["id"], d["current"]) for d in devices["devices"]],
                         [(welcome["device"], True), (second["device"], False)])
        self.assertTrue(all(d["label"] and TS.match(d["last_used"]) for d in devices["devices"]))

    @async_test
    async def test_revoking_a_device_closes_it_4401_and_its_token_stops_working(self):
        a, first = await self.connect("Ana")
        link = await self.link_code(a)
        phone = await websocket_connect(self.url(username="Ana", link=link["code"]))
        self.sockets.append(phone)
        second = await self.read(phone)
        await self.ack(a, type="revoke", device=second["device"])
        closing = await self.expect(phone, "error")
        self.assertEqual((closing["type"], closing["code"]), ("error", "revoked"))
        self.assertIsNone(await self.raw_read(phone, "the close"))
        self.assertEqual(phone.close_code, 4401)
        await self.refused("name_taken", 4409, username="Ana", token=second["token"])
        await self.connect("Ana", first["token"])  # the other device is still signed in
        await self.error(a, "bad_request", type="revoke", device=second["device"])  # gone
        b, _ = await self.connect("Bob")
        await self.error(b, "bad_request", type="revoke", device=first["device"])  # not Bob's

    @async_test
    async def test_logout_signs_this_device_out_and_the_name_stays_owned(self):
        a, welcome = await self.connect("Ana")
        await self.ack(a, type="logout")
        self.assertEqual((await self.read(a))["code"], "revoked")
        self.assertIsNone(await self.raw_read(a, "the close"))
        self.assertEqual(a.close_code, 4401)
        await self.refused("name_taken", 4409, username="Ana", token=welcome["token"])
        await self.refused("name_taken", 4409, username="Ana")



class LinkBudgetTest(ChatTestCase):
    app_options = {"names_per_hour": 1}

    @async_test
    async def test_wrong_link_codes_are_budgeted_per_address(self):
        await self.connect("Ana")
        for _ in range(chat.AT_ONCE):
            await self.refused("name_taken", 4409, username="Ana", link="AAAA-AAAA")
        await self.refused("rate_limited", 4429, username="Ana", link="AAAA-AAAA")


class AuthFrameTest(ChatTestCase):
    """Tokens out of URLs: with auth=1 the credentials come in the first frame."""

    async def auth(self, name, frame):
        ws = await websocket_connect(self.url(username=name, auth=1))
        self.sockets.append(ws)
        ws.write_message(json.dumps(frame))
        return ws

    @async_test
    async def test_a_token_in_the_first_frame_signs_in_and_nothing_comes_before(self):
        a, welcome = await self.connect("Ana")
        ws = await self.auth("Ana", {"type": "auth", "token": welcome["token"]})
        first = await self.read(ws)
        self.assertEqual((first["type"], first["user"], first["device"]), ("welcome", "Ana", welcome["device"]))

    @async_test
    async def test_a_link_code_in_the_first_frame_signs_a_new_device_in(self):
        a, welcome = await self.connect("Ana")
        code = (await self.reply(a, "link", type="link"))["code"]
        ws = await self.auth("Ana", {"type": "auth", "link": code})
        first = await self.read(ws)
        self.assertEqual((first["type"], first["user"]), ("welcome", "Ana"))
        self.assertNotEqual(first["token"], welcome["token"])

    @async_test
    async def test_a_wrong_or_missing_credential_is_name_taken(self):
        await self.connect("Ana")
        for frame in ({"type": "auth", "token": "wrong"}, {"type": "auth"}, {"type": "message", "text": "hi"},
                      {"type": "auth", "token": 7}):
            with self.subTest(frame=frame):
                ws = await self.auth("Ana", frame)
                err = await self.read(ws)
                self.assertEqual((err["type"], err["code"]), ("error", "name_taken"))
                self.assertIsNone(await self.raw_read(ws, "the close"))
                self.assertEqual(ws.close_code, 4409)

    @async_test
    async def test_no_auth_frame_in_time_is_name_taken(self):
        await self.connect("Ana")
        with mock.patch.object(chat, "AUTH_SECONDS", 0.2):
            ws = await websocket_connect(self.url(username="Ana", auth=1))
            self.sockets.append(ws)
            err = await self.read(ws)
        self.assertEqual((err["type"], err["code"]), ("error", "name_taken"))
        self.assertIsNone(await self.raw_read(ws, "the close"))
        self.assertEqual(ws.close_code, 4409)
        self.assertEqual(sum(len(tabs) for tabs in chat.Hub.online.values()), 1, "only the first connection")

    @async_test
    async def test_a_free_name_with_auth_is_claimed(self):
        ws = await self.auth("Newbie", {"type": "auth", "token": "from a name since released"})
        first = await self.read(ws)
        self.assertEqual((first["type"], first["user"]), ("welcome", "Newbie"))


class ReleaseTest(ProcessCase):

    @gen_test(timeout=30)
    async def test_release_frees_a_lost_name_and_keeps_its_messages(self):
        proc, port, _ = await self.start()
        a, welcome = await self.connect("Ana", port=port)
        said = await self.say(a, "still here after release")
        bob, _ = await self.connect("Bob", port=port)
        await self.say(bob, "@Ana the alarm PIN is 0000")
        proc.terminate()
        self.assertEqual(await asyncio.wait_for(proc.wait(), 10), 0)
        await proc.drain
        release = await asyncio.create_subprocess_exec(
            sys.executable, CHAT_PY, "--db", self.db, "--release", "ana", stderr=asyncio.subprocess.PIPE)
        err = (await release.stderr.read()).decode()
        self.assertEqual(await release.wait(), 0, err)
        self.assertIn("released", err)
        proc, port, _ = await self.start()
        lost = welcome["token"]
        ana, welcome = await self.connect("Ana", port=port)  # anyone may claim it now
        self.assertNotEqual(welcome["token"], lost)
        self.assertIn(said["id"], [m["id"] for m in ana.joined["general"]["history"]])
        self.assertEqual(await self.sync(ana), [], "the former owner's private messages are not the new owner's")
        page = await self.reply(ana, "history", type="history", directs=True)
        self.assertEqual(page["messages"], [])
        self.assertEqual((await self.reply(ana, "results", type="search", q="alarm"))["messages"], [])
        again = await asyncio.create_subprocess_exec(
            sys.executable, CHAT_PY, "--db", self.db, "--release", "nobody", stderr=asyncio.subprocess.PIPE)
        await again.stderr.read()
        self.assertEqual(await again.wait(), 1)


class ReviewFixesTest(FileCase):
    """Defects an independent review found, each kept fixed by a test."""

    @async_test
    async def test_a_search_for_what_is_not_text_is_bad_request(self):
        a, b = await self.pair()
        await self.error(a, "bad_request", type="search", q="hello \ud800")  # a lone surrogate
        await self.still_serving(a, b)

    @async_test
    async def test_an_auth_frame_is_refused_with_its_ref_and_a_token_that_is_not_text_too(self):
        await self.connect("Ana")
        for ref, token in ((7, "\ud800"), (8, "wrong")):
            with self.subTest(token=token):
                ws = await websocket_connect(self.url(username="Ana", auth=1))
                self.sockets.append(ws)
                ws.write_message(json.dumps({"type": "auth", "token": token, "ref": ref}))
                await self.next_error(ws, "name_taken", ref)
                self.assertIsNone(await self.raw_read(ws, "the close"))
                self.assertEqual(ws.close_code, 4409)

    @async_test
    async def test_release_changes_no_other_name_that_starts_the_same(self):
        abby, _ = await self.connect("abby")
        await self.connect("ab")
        bob, _ = await self.connect("bob")
        await self.say(bob, "@abby kiwi")
        for ws in self.sockets:
            ws.close()
        await self.wait_health(connections=0)
        chat.Hub.store.close()
        self.assertEqual(chat.release("ab", self.db), 0)
        await self.restart()
        abby, _ = await self.connect("abby", self.tokens["abby"])
        found = await self.reply(abby, "results", type="search", q="kiwi")
        self.assertEqual([m["text"] for m in found["messages"]], ["kiwi"])

    @async_test
    async def test_a_revoked_connection_cannot_act_while_its_close_is_pending(self):
        a, welcome = await self.connect("Ana")
        bob, _ = await self.connect("Bob")
        await self.sync(a)
        code = (await self.reply(a, "link", type="link"))["code"]
        thief, data = await raw_client(self.get_http_port(), "Ana", query="&link=" + code)
        await self.sync(a)
        devices = (await self.reply(a, "devices", type="devices"))["devices"]
        await self.ack(a, type="revoke", device=max(d["id"] for d in devices))
        self.assertEqual(await read_close(thief, data), 4401)
        loop = asyncio.get_running_loop()
        for frame in ({"type": "message", "text": "posted after my device was revoked"},
                      {"type": "revoke", "device": welcome["device"]}):
            await loop.sock_sendall(thief, client_frame(0x1, json.dumps(frame).encode()[:125]))
        thief.close()
        await self.quiet(bob, "Bob, after the thief's frames")
        await self.connect("Ana", welcome["token"])  # still signed in

    @async_test
    async def test_ids_never_go_back_after_the_newest_were_forgotten(self):
        a, _ = await self.connect("Ana")
        await self.ack(a, type="join", room="side")
        newest = (await self.say(a, "the newest id", room="side"))["id"]
        await self.ack(a, type="leave", room="side")
        chat.Hub.sweep(time.monotonic() + chat.ROOM_IDLE + 1)
        await self.restart()
        a, _ = await self.connect("Ana", self.tokens["Ana"])
        self.assertGreater((await self.say(a, "after the restart"))["id"], newest)

    @async_test
    async def test_a_link_code_dies_with_a_revoked_device(self):
        a, welcome = await self.connect("Ana")
        code = (await self.reply(a, "link", type="link"))["code"]
        await self.ack(a, type="logout")
        await self.refused("name_taken", 4409, username="Ana", link=code)

    @async_test
    async def test_a_revoke_that_cannot_be_stored_is_one_error_and_no_ack(self):
        a, welcome = await self.connect("Ana")
        with mock.patch.object(chat.Hub.store, "drop_device", side_effect=sqlite3.OperationalError("locked")):
            await self.error(a, "server_error", type="logout")
        await self.connect("Ana", welcome["token"])  # not signed out

    @async_test
    async def test_an_auth_frame_with_a_ref_is_acked(self):
        _, welcome = await self.connect("Ana")
        ws = await websocket_connect(self.url(username="Ana", auth=1))
        self.sockets.append(ws)
        ws.write_message(json.dumps({"type": "auth", "token": welcome["token"], "ref": 42}))
        ack, before = await self.answer(ws, 42)
        self.assertEqual((ack["type"], before[0]["type"]), ("ack", "welcome"))

    @async_test
    async def test_member_rosters_count_against_the_connect_budget(self):
        rooms = ["room%d" % i for i in range(8)]
        for i in range(12):
            ws, _ = await self.connect("member%02d%s" % (i, "x" * 22))
            for room in rooms:
                await self.ack(ws, type="join", room=room)
            ws.close()
        await self.restart()
        sock, data = await raw_client(self.get_http_port(), "member00" + "x" * 22,
                                      query="&token=" + self.tokens["member00" + "x" * 22])
        loop = asyncio.get_running_loop()
        while len([p for op, p in frames_in(data)[0] if b'"type":"joined"' in p]) < 9:
            data += await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
        sock.close()
        # a room past the budget still gets its bare joined frame (about 90 bytes)
        self.assertLessEqual(sum(len(p) for _, p in frames_in(data)[0]), 4000 + 300)
    test_member_rosters_count_against_the_connect_budget.app_options = {"max_queue": 4000}

    def get_app(self):
        options = getattr(getattr(self, self._testMethodName, None), "app_options", {})
        self.app_options = options
        return super().get_app()
################ Messages that change (issue 12)


class WallClock:
    """chat's view of the time module with time() `ahead` seconds later:
    as if every message had been sent that long ago."""

    def __init__(self, ahead):
        self.ahead = ahead

    def time(self):
        return time.time() + self.ahead

    def __getattr__(self, name):
        return getattr(time, name)


class ChangeCase(ChatTestCase):
    """A server on a file (erasure is about bytes on disk), and words for changes."""

    def get_app(self):
        self.db = os.path.join(tempfile.mkdtemp(prefix="chat-test-"), "chat.db")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.db), True)
        return self.make_app()

    def make_app(self):
        # Debian's SQLite zeroes what it frees by default; other builds do not.
        # Start from theirs, so the server must ask for it.
        real = sqlite3.connect

        def connect(*args, **kwargs):
            db = real(*args, **kwargs)
            db.execute("PRAGMA secure_delete=OFF")
            return db

        with mock.patch.object(sqlite3, "connect", connect):
            return chat.make_app(**{**dict(db=self.db, rate=0, names_per_hour=0, connects_per_minute=0,
                                           offline_grace=0, presence_window=0), **self.app_options})

    async def change(self, ws, **frame):
        """Send an edit, delete or react; it must be acked with the id of its
        event, which the sender's connection got just before."""
        ack, before = await self.ack(ws, **frame)
        events = [f for f in before if f.get("id") == ack["id"]]
        self.assertEqual(len(events), 1, "the sender's own copy of the event, once: %r" % before)
        return events[0]

    async def post(self, ws, text, **frame):
        """Post a message (with reply_to, say); return the sender's copy."""
        ack, before = await self.ack(ws, type="message", text=text, **frame)
        found = [f for f in before if f.get("id") == ack["id"]]
        return found[0] if found else await self.expect(ws, "direct" if text.startswith("@") else "message",
                                                       id=ack["id"])

    async def history(self, ws, **frame):
        return (await self.reply(ws, "history", type="history", **frame))["messages"]

    def on_disk(self):
        """Every byte of the database: the file and its WAL."""
        stored = b""
        for suffix in ("", "-wal", "-journal"):
            if os.path.exists(self.db + suffix):
                with open(self.db + suffix, "rb") as f:
                    stored += f.read()
        return stored

    async def erased(self):
        """Wait, off the event loop, until the Store says the deletes so far are erased."""
        # A busy checkpoint is tried again each second: allow a loaded machine a few.
        done = await asyncio.get_running_loop().run_in_executor(None, chat.Hub.store.checkpointer.wait_erased, 10)
        self.assertTrue(done, "the erasure did not finish within 10 s")


class ChangeTest(ChangeCase):

    @async_test
    async def test_edit_and_delete_reach_who_sees_the_message_and_nobody_else(self):
        """A room message's changes go to the room's members; a private
        one's to both sides, with from/to instead of room. Others online
        (not in the room, or not a side) get nothing."""
        a, b = await self.pair()
        c, _ = await self.connect("UserC")  # in general, not a side of the private message
        d, _ = await self.connect("UserD")
        await self.reply(d, "left", type="leave", room="general")  # online, not in the room
        for ws in (a, b, c):
            await self.sync(ws)
        said = await self.post(a, "typo")
        await self.expect(b, "message", id=said["id"])
        await self.expect(c, "message", id=said["id"])
        edited = await self.change(a, type="edit", id=said["id"], text="fixed")
        self.assertEqual(set(edited), {"type", "id", "target", "room", "text", "ts", "time"}, edited)
        self.assertEqual((edited["type"], edited["target"], edited["room"], edited["text"]),
                         ("edited", said["id"], "general", "fixed"))
        self.assert_stamps(edited)
        self.assertGreater(edited["id"], said["id"], "a new id from the messages' sequence")
        deleted = await self.change(a, type="delete", id=said["id"])
        self.assertEqual(deleted, {"type": "deleted", "id": deleted["id"], "target": said["id"], "room": "general"})
        self.assertGreater(deleted["id"], edited["id"])
        for ws in (b, c):
            self.assertEqual([await self.read(ws), await self.read(ws)], [edited, deleted])
        await self.quiet(d, "UserD, not in the room")

        dm = await self.post(a, "@UserB secret typo")
        await self.expect(b, "direct", id=dm["id"])
        edited = await self.change(a, type="edit", id=dm["id"], text="secret fixed")
        self.assertEqual({k: edited[k] for k in ("type", "target", "from", "to", "text")},
                         {"type": "edited", "target": dm["id"], "from": "UserA", "to": "UserB", "text": "secret fixed"})
        self.assertNotIn("room", edited)
        deleted = await self.change(a, type="delete", id=dm["id"])
        self.assertEqual(deleted, {"type": "deleted", "id": deleted["id"], "target": dm["id"],
                                   "from": "UserA", "to": "UserB"})
        self.assertEqual([await self.read(b), await self.read(b)], [edited, deleted])
        await self.quiet(b)
        await self.quiet(c, "UserC, not a side of the private message")
        await self.quiet(d, "UserD")

    @async_test
    async def test_changes_made_while_away_arrive_on_resume_once_after_the_current_state(self):
        """A client back with since=ID gets messages newer than ID in their
        current state, then the changes after ID to the messages it had,
        oldest first, each once: edit (the latest of a message's edits),
        delete, reaction, private ones too."""
        a, b = await self.pair()
        old = await self.post(a, "old text")
        gone = await self.post(a, "soon gone")
        dm = await self.post(a, "@UserB private old")
        seen = (await self.expect(b, "direct", id=dm["id"]))["id"]
        b.close()
        await self.presence(a, "UserB", "offline")
        await self.change(a, type="edit", id=old["id"], text="interim text")  # superseded: not replayed
        e1 = await self.change(a, type="edit", id=old["id"], text="new text")
        e2 = await self.change(a, type="delete", id=gone["id"])
        e3 = await self.change(a, type="edit", id=dm["id"], text="private new")
        e4 = await self.change(a, type="react", id=old["id"], emoji="👍")
        newer = await self.post(a, "newer")
        e5 = await self.change(a, type="edit", id=newer["id"], text="newer, edited")  # comes as current state
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=seen)
        history = b.joined["general"]["history"]
        self.assertEqual([(m["id"], m["text"]) for m in history], [(newer["id"], "newer, edited")])
        self.assertEqual(history[0]["edited"], e5["ts"])
        got = await self.sync(b)
        self.assertEqual(got, [e1, e2, e3, e4], "each change once, oldest first, shaped as live")
        await self.quiet(b)
        b.close()
        await self.presence(a, "UserB", "offline")
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=e5["id"])
        await self.quiet(b)  # caught up: nothing again

        # A fresh page (no since) gets only the current state, no events.
        fresh, _ = await self.connect("UserB", self.tokens["UserB"])
        shown = {m["id"]: m for m in fresh.joined["general"]["history"]}
        self.assertEqual((shown[old["id"]]["text"], shown[old["id"]]["edited"], shown[old["id"]]["reactions"]),
                         ("new text", e1["ts"], {"👍": ["UserA"]}))
        self.assertEqual(shown[gone["id"]], {"type": "message", "id": gone["id"], "room": "general",
                                             "from": "UserA", "ts": gone["ts"], "time": gone["time"],
                                             "deleted": True})
        await self.quiet(fresh)

    @async_test
    async def test_a_deleted_message_leaves_no_text_in_the_file_history_search_or_replay(self):
        """Edited, quoted, then deleted: the text (old and new) is gone from the
        database file and its WAL once the erasure is done, and from every
        answer; the tombstone keeps its type and place."""
        a, b = await self.pair()
        said = await self.post(a, "the password is hunter2xyzzy")
        await self.change(a, type="edit", id=said["id"], text="the codeword is plughzork")
        reply = await self.post(b, "noted", reply_to=said["id"])
        self.assertEqual(reply["quote"], "the codeword is plughzork")
        dm = await self.post(a, "@UserB whisperquux")
        await self.sync(b)
        for word in (b"hunter2xyzzy", b"plughzork", b"whisperquux"):
            self.assertIn(word, self.on_disk(), "the check below could not fail")
        await self.change(a, type="delete", id=said["id"])
        await self.change(a, type="delete", id=dm["id"])
        await self.erased()
        stored = self.on_disk()
        for word in (b"hunter2xyzzy", b"plughzork", b"whisperquux"):
            self.assertNotIn(word, stored)

        tombstone = {"type": "message", "id": said["id"], "room": "general", "from": "UserA",
                     "ts": said["ts"], "time": said["time"], "deleted": True}
        room = await self.history(b, room="general")
        self.assertEqual(room, [tombstone, {**reply, "quote": None}])
        directs = await self.history(b, directs=True)
        self.assertEqual(directs, [{"type": "direct", "id": dm["id"], "from": "UserA", "to": "UserB",
                                    "ts": dm["ts"], "time": dm["time"], "deleted": True}])
        for word in ("hunter2xyzzy", "plughzork", "whisperquux", "password"):
            found = await self.reply(b, "results", type="search", q=word)
            self.assertEqual(found["messages"], [], word)
        b.close()
        await self.presence(a, "UserB", "offline")
        ws = await self.open_ws("UserB", self.tokens["UserB"], since=0)  # replay of everything
        everything = json.dumps(await self.sync(ws), ensure_ascii=False)
        for word in ("hunter2xyzzy", "plughzork", "whisperquux"):
            self.assertNotIn(word, everything)
        self.assertIn('"deleted": true', everything)

    @async_test
    async def test_shutting_down_finishes_the_erasure(self):
        """Store.close() erases what the Checkpointer's thread has not: here it
        never runs, and the text is still gone after the restart."""
        with mock.patch.object(chat.Checkpointer, "run", lambda checkpointer: None):
            self.http_server.request_callback = self.make_app()
        a, _ = await self.connect("UserA")
        said = await self.post(a, "erase me zyzzyvaquux")
        await self.change(a, type="delete", id=said["id"])
        self.assertIn(b"zyzzyvaquux", self.on_disk(), "nothing erased it yet")
        self.assertFalse(chat.Hub.store.checkpointer.wait_erased(0))
        self.http_server.request_callback = self.make_app()  # closes the old Store
        self.assertNotIn(b"zyzzyvaquux", self.on_disk())

    @async_test
    async def test_after_a_restart_ids_go_on_past_the_last_change(self):
        """Changes take ids from the messages' sequence, so a restart must
        count them too, or a new message could reuse an event's id."""
        a, _ = await self.connect("UserA")
        said = await self.post(a, "first")
        edited = await self.change(a, type="edit", id=said["id"], text="second")
        a.close()
        await self.wait_health(connections=0)
        self.http_server.request_callback = self.make_app()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        self.assertGreater((await self.post(a, "third"))["id"], edited["id"])

    @async_test
    async def test_nobody_changes_what_they_cannot_see_and_the_answer_never_tells_if_it_exists(self):
        """Someone else's private message, a message of a room one is not in,
        an event's id and an id never used: the same not_found, word for
        word, and nothing changes."""
        a, b = await self.pair()
        c, _ = await self.connect("UserC")
        await self.sync(a)
        await self.sync(b)
        dm = await self.post(a, "@UserB between us")
        await self.expect(b, "direct", id=dm["id"])
        await self.ack(a, type="join", room="inner")
        inner = await self.post(a, "inner circle", room="inner")
        event = await self.change(a, type="react", id=inner["id"], emoji="🎉")
        await self.sync(b)
        await self.sync(c)
        answers = []
        for id in (dm["id"], inner["id"], event["id"], chat.Hub.last_id + 1000):
            for frame in ({"type": "edit", "text": "mine now"}, {"type": "delete"}, {"type": "react", "emoji": "👍"}):
                with self.subTest(id=id, frame=frame):
                    err = await self.error(c, "not_found", id=id, **frame)
                    answers.append((err["code"], err["message"]))
        self.assertEqual(len(set(answers)), 1, "the answers differ: %r" % set(answers))
        await self.quiet(c)
        said = await self.post(a, "in general")
        await self.expect(b, "message", id=said["id"])
        await self.reply(b, "left", type="leave", room="general")
        await self.error(b, "not_found", type="react", id=said["id"], emoji="👍")  # not in the room now
        await self.change(a, type="delete", id=said["id"])
        for frame in ({"type": "edit", "text": "again"}, {"type": "delete"}, {"type": "react", "emoji": "👍"}):
            await self.error(a, "not_found", id=said["id"], **frame)  # deleted: gone for changes
        self.assertEqual([m["text"] for m in await self.history(a, directs=True)], ["between us"])
        self.assertEqual(await self.history(a, room="inner"), [{**inner, "reactions": {"🎉": ["UserA"]}}])
        await self.quiet(a)
        await self.quiet(b)


class ChangeRulesTest(ChangeCase):
    app_options = {"max_text": 10, "edit_window": 60}

    @async_test
    async def test_only_the_author_changes_a_message_with_a_new_messages_text_rules(self):
        a, b = await self.pair()
        said = await self.post(a, "mine")
        await self.expect(b, "message", id=said["id"])
        await self.error(b, "forbidden", type="edit", id=said["id"], text="yours")
        await self.error(b, "forbidden", type="delete", id=said["id"])
        for text, code in (("x" * 11, "too_long"), ("", "bad_request"), (" \u200b", "bad_request"),
                           ("\ud800", "bad_request"), (5, "bad_request"), (None, "bad_request"),
                           ("@UserB hi", "bad_request")):  # a room message never starts like a private one
            with self.subTest(text=text):
                await self.error(a, code, type="edit", id=said["id"], text=text)
        for id in ("1", 0, -1, True, None, 2**63, 1.5):
            with self.subTest(id=id):
                await self.error(a, "bad_request", type="delete", id=id)
        await self.quiet(b, "the other user")
        self.assertEqual(await self.history(a, room="general"), [said], "nothing changed")
        edited = await self.change(a, type="edit", id=said["id"], text="x" * 10)
        self.assertEqual(edited["text"], "x" * 10)
        dm = await self.post(a, "@UserB @C")
        self.assertEqual((await self.change(a, type="edit", id=dm["id"], text="@C hey"))["text"], "@C hey")

    @async_test
    async def test_edit_and_delete_are_too_late_past_the_edit_window_and_reactions_never_are(self):
        a, b = await self.pair()
        said = await self.post(a, "hi")
        with mock.patch.object(chat, "time", WallClock(61)):
            await self.error(a, "too_late", type="edit", id=said["id"], text="late")
            await self.error(a, "too_late", type="delete", id=said["id"])
            await self.change(b, type="react", id=said["id"], emoji="👍")
        with mock.patch.object(chat, "time", WallClock(59)):
            await self.change(a, type="edit", id=said["id"], text="in time")
            await self.change(a, type="delete", id=said["id"])


class ReactionTest(ChangeCase):

    @async_test
    async def test_a_reaction_toggles_and_every_answer_shows_who_reacted(self):
        a, b = await self.pair()
        said = await self.post(a, "react to me")
        await self.expect(b, "message", id=said["id"])
        on = await self.change(b, type="react", id=said["id"], emoji="👍")
        self.assertEqual(on, {"type": "reaction", "id": on["id"], "target": said["id"], "room": "general",
                              "emoji": "👍", "user": "UserB", "on": True})
        self.assertEqual(await self.read(a), on)
        await self.change(a, type="react", id=said["id"], emoji="👍")
        await self.change(a, type="react", id=said["id"], emoji="🎉")
        shown = (await self.history(b, room="general"))[0]
        self.assertEqual(shown["reactions"], {"👍": ["UserB", "UserA"], "🎉": ["UserA"]})
        off = await self.change(b, type="react", id=said["id"], emoji="👍")
        self.assertEqual((off["user"], off["on"]), ("UserB", False))
        joined = await self.reply(b, "joined", type="join", room="general")
        self.assertEqual(joined["history"][0]["reactions"], {"👍": ["UserA"], "🎉": ["UserA"]})
        await self.change(a, type="react", id=said["id"], emoji="👍")
        await self.change(a, type="react", id=said["id"], emoji="🎉")
        self.assertEqual(await self.history(b, room="general"), [said], "no reactions: no key")
        dm = await self.post(a, "@UserB psst")
        on = await self.change(b, type="react", id=dm["id"], emoji="❤️")
        self.assertEqual((on["from"], on["to"], on["on"]), ("UserA", "UserB", True))
        self.assertEqual((await self.expect(a, "reaction", id=on["id"])), on)

    @async_test
    async def test_twenty_different_emoji_at_most_and_only_emoji(self):
        a, b = await self.pair()
        said = await self.post(a, "many")
        twenty = [chr(0x1F600 + i) for i in range(chat.MAX_REACTIONS)]
        for emoji in twenty:
            await self.change(b, type="react", id=said["id"], emoji=emoji)
        await self.sync(a)
        await self.error(a, "bad_request", type="react", id=said["id"], emoji="🙂")  # a 21st
        await self.change(a, type="react", id=said["id"], emoji=twenty[0])  # one of the twenty: fine
        for emoji in ("👍🏽", "🇫🇷", "1️⃣", "🧑\u200d💻", "❤️"):
            with self.subTest(emoji=emoji):
                other = await self.post(a, "x")
                await self.change(a, type="react", id=other["id"], emoji=emoji)
        fresh = await self.post(a, "no reactions yet")
        for emoji in ("a", "1", " ", "\n", "", "👍👍", "👍 ", "é", "日", "\u200d", "👍\u200d", "\ufe0f",
                      "🇫🇷🇩🇪", "x" * 17, "\ud83d", 5, None, ["👍"]):
            with self.subTest(emoji=emoji):
                await self.error(a, "bad_request", type="react", id=fresh["id"], emoji=emoji)
        self.assertNotIn("reactions", (await self.history(a, room="general"))[-1])
        shown = (await self.history(a, room="general", limit=1, before=said["id"] + 1))[0]
        self.assertEqual(list(shown["reactions"]), twenty)


class ReplyTest(ChangeCase):

    @async_test
    async def test_a_reply_quotes_the_current_text_of_a_message_in_its_own_conversation(self):
        a, b = await self.pair()
        long = await self.post(a, "q" * 99 + "é and more")
        reply = await self.post(b, "yes", reply_to=long["id"])
        self.assertEqual((reply["reply_to"], reply["quote"]), (long["id"], "q" * 99 + "é"))
        self.assertEqual(await self.expect(a, "message", id=reply["id"]), reply)
        await self.change(a, type="edit", id=long["id"], text="short now")
        self.assertEqual((await self.history(b, room="general"))[-1]["quote"], "short now")
        await self.change(a, type="delete", id=long["id"])
        self.assertIsNone((await self.history(b, room="general"))[-1]["quote"])
        late = await self.post(b, "replying to a tombstone", reply_to=long["id"])
        self.assertIsNone(late["quote"])
        dm = await self.post(a, "@UserB private")
        back = await self.post(b, "@UserA private back", reply_to=dm["id"])
        self.assertEqual((back["reply_to"], back["quote"]), (dm["id"], "private"))

    @async_test
    async def test_a_reply_to_another_conversation_or_to_nothing_is_bad_request_alike(self):
        """reply_to must name a message of the same room, or of the same two
        people: anything else gets the same bad_request, and nothing is posted."""
        a, b = await self.pair()
        c, _ = await self.connect("UserC")
        await self.sync(a)
        await self.sync(b)
        await self.ack(a, type="join", room="python")
        elsewhere = await self.post(a, "in python", room="python")
        theirs = await self.post(c, "@UserA between C and A")
        mine = await self.post(a, "@UserB between A and B")
        event = await self.change(a, type="react", id=mine["id"], emoji="👍")
        await self.sync(b)
        answers = set()
        for frame in ({"text": "hi", "reply_to": elsewhere["id"]},  # another room
                      {"text": "hi", "reply_to": mine["id"]},  # a private message, from a room
                      {"text": "@UserA hi", "reply_to": theirs["id"]},  # another pair's
                      {"text": "@UserA hi", "reply_to": event["id"]},  # an event
                      {"text": "hi", "reply_to": chat.Hub.last_id + 100}):  # nothing
            with self.subTest(frame=frame):
                err = await self.error(b, "bad_request", type="message", **frame)
                answers.add(err["message"])
        self.assertEqual(len(answers), 1, answers)
        for bad in ("1", 0, True, [1]):
            await self.error(b, "bad_request", type="message", text="hi", reply_to=bad)
        await self.quiet(a)
        await self.quiet(b)


################ Guards found by the second mutation run
# Each test here fails on a change to chat.py (a mutant, see mutate.py) that
# broke a promise of README or chat.py's docstring, after the Hub/Outbox
# restructuring and issues 8, 9 and 11, without any test noticing.


class MovingClock:
    """chat's view of the time module, with a monotonic() that stands still
    until the test moves it (now += seconds). It starts on a whole second,
    so that adding halves and whole seconds is exact."""

    def __init__(self):
        self.now = float(int(time.monotonic()) + 1)

    def monotonic(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


class FloodTimeTest(ChatTestCase):
    """README: a connection that keeps sending past its limits for 10 s is
    closed with 4429; a pause of a second ends a flood. A broken frame costs
    a token too. (A budget of one frame, refilled too slowly to matter.)"""
    app_options = {"rate": 0.001, "burst": 1}

    def setUp(self):
        super().setUp()
        self.clock = MovingClock()
        patcher = mock.patch.object(chat, "time", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)

    async def over(self, ws, seconds):
        """A frame past the budget every half second for `seconds`: each is rate_limited."""
        for _ in range(int(seconds * 2)):
            self.clock.now += 0.5
            await self.error(ws, "rate_limited", type="rooms")

    @async_test
    async def test_ten_seconds_past_the_limits_close_4429(self):
        a, _ = await self.connect("Flooder")
        await self.ack(a, type="rooms")  # the budget
        await self.error(a, "rate_limited", type="rooms")  # the flood starts
        await self.over(a, 9.5)
        self.clock.now += 0.5
        self.send(a, type="rooms", ref=self.ref())
        await self.next_error(a, "rate_limited")  # without the ref: about the connection
        self.assertIsNone(await self.raw_read(a, "the close"))
        self.assertEqual(a.close_code, 4429)

    @async_test
    async def test_a_pause_of_a_second_starts_the_count_again(self):
        a, _ = await self.connect("Flooder")
        await self.ack(a, type="rooms")
        await self.error(a, "rate_limited", type="rooms")
        await self.over(a, 5)
        self.clock.now += 2
        await self.error(a, "rate_limited", type="rooms")  # a new flood
        await self.over(a, 9.5)  # 16.5 s since the first, 9.5 s of this one: still open

    @async_test
    async def test_a_broken_frame_costs_a_token(self):
        a, _ = await self.connect("Flooder")
        a.write_message("not json")
        await self.next_error(a, "bad_json")
        await self.error(a, "rate_limited", type="rooms")


class TypingBudgetTest(ChatTestCase):
    """README: typing has its own small budget, 3 at once and one every 2 s;
    extra ones are acked and dropped."""
    app_options = {"rate": 5, "burst": 20}

    @async_test
    async def test_three_at_once_then_one_every_two_seconds(self):
        clock = MovingClock()
        with mock.patch.object(chat, "time", clock):
            a, b = await self.pair()
            for _ in range(5):
                await self.ack(a, type="typing", room="general")
            self.assertEqual([f["type"] for f in await self.sync(b)], ["typing"] * 3)
            clock.now += 2
            for _ in range(2):
                await self.ack(a, type="typing", room="general")
            self.assertEqual([f["type"] for f in await self.sync(b)], ["typing"])

    @async_test
    async def test_typing_to_yourself_reaches_none_of_your_tabs(self):
        a, b = await self.pair()
        a2, _ = await self.connect("UserA", self.tokens["UserA"])
        await self.ack(a, type="typing", to="usera")
        await self.quiet(a2, "the other tab")
        await self.quiet(a)
        await self.quiet(b)


class PageSizeTest(ChatTestCase):
    """README: history holds at most limit (default 50) and search at most
    50; "more" says older ones exist, "before" pages back (ids below it)."""

    @async_test
    async def test_pages_of_fifty_and_more_only_when_there_is_more(self):
        a, _ = await self.connect("UserA")
        ids = [(await self.say(a, "needle %d" % i))["id"] for i in range(50)]
        found = await self.reply(a, "results", type="search", q="needle")
        self.assertEqual((len(found["messages"]), found["more"]), (50, False), "exactly 50: no more")
        page = await self.reply(a, "history", type="history", room="general", limit=50)
        self.assertEqual((len(page["messages"]), page["more"]), (50, False), "exactly the limit: no more")
        page = await self.reply(a, "history", type="history", room="general", limit=49)
        self.assertEqual((len(page["messages"]), page["more"]), (49, True))
        ids += [(await self.say(a, "needle %d" % i))["id"] for i in range(50, 55)]
        page = await self.reply(a, "history", type="history", room="general")
        self.assertEqual(([m["id"] for m in page["messages"]], page["more"]), (ids[5:], True),
                         "the newest 50 by default")
        found = await self.reply(a, "results", type="search", q="needle")
        self.assertEqual(([m["id"] for m in found["messages"]], found["more"]), (ids[:4:-1], True))
        found = await self.reply(a, "results", type="search", q="needle", before=ids[3])
        self.assertEqual([m["id"] for m in found["messages"]], ids[2::-1])
        page = await self.reply(a, "history", type="history", room="general", before=ids[3])
        self.assertEqual([m["id"] for m in page["messages"]], ids[:3])


class AuthPerAddressTest(ChatTestCase):
    """--max_conns_per_ip holds for connections that sign in with an auth
    frame: they are not counted while they wait for it, so the cap is
    checked again when it comes."""
    app_options = {"max_conns_per_ip": 2}

    @async_test
    async def test_auth_frames_do_not_get_round_max_conns_per_ip(self):
        _, welcome = await self.connect("Ana")
        waiting = []
        for _ in range(4):
            ws = await websocket_connect(self.url(username="Ana", auth=1))
            self.sockets.append(ws)
            waiting.append(ws)
        for ws in waiting:
            ws.write_message(json.dumps({"type": "auth", "token": welcome["token"]}))
        answers = [await self.read(ws) for ws in waiting]
        self.assertEqual(sorted(f.get("code", f["type"]) for f in answers), ["too_many_connections"] * 3 + ["welcome"])
        self.assertEqual(chat.Hub.per_ip["127.0.0.1"], 2)

    @async_test
    async def test_at_the_cap_a_connection_is_refused_before_its_auth_frame(self):
        await self.connect("Ana")
        await self.connect("Bob")
        ws = await websocket_connect(self.url(username="Ana", auth=1))
        self.sockets.append(ws)
        await self.next_error(ws, "too_many_connections")
        self.assertIsNone(await self.raw_read(ws, "the close"))
        self.assertEqual(ws.close_code, 4429)


class BadRefRateTest(ChatTestCase):
    """A frame with a ref that is not valid pays its token like any other."""
    app_options = {"rate": 0.01, "burst": 3}

    @async_test
    async def test_frames_with_a_bad_ref_are_rate_limited_too(self):
        a, _ = await self.connect("Ana")
        codes = []
        for _ in range(4):
            self.send(a, type="message", text="x", ref=[1])
            codes.append((await self.read(a))["code"])
        self.assertEqual(codes, ["bad_request"] * 3 + ["rate_limited"])


class AuthGuardTest(ChatTestCase):

    @async_test
    async def test_only_an_auth_frame_carries_credentials(self):
        _, welcome = await self.connect("Ana")
        ws = await websocket_connect(self.url(username="Ana", auth=1))
        self.sockets.append(ws)
        ws.write_message(json.dumps({"type": "message", "token": welcome["token"], "text": "hi"}))
        err = await self.read(ws)
        self.assertEqual((err["type"], err["code"]), ("error", "name_taken"))
        self.assertIsNone(await self.raw_read(ws, "the close"))
        self.assertEqual(ws.close_code, 4409)

    @async_test
    async def test_the_auth_frame_is_awaited_ten_seconds(self):
        _, welcome = await self.connect("Ana")
        loop = self.io_loop
        real, delays = loop.call_later, []

        def spy(delay, callback, *args, **kwargs):
            if getattr(callback, "__name__", "") == "_no_auth":
                delays.append(delay)
            return real(delay, callback, *args, **kwargs)

        with mock.patch.object(loop, "call_later", spy):
            ws = await websocket_connect(self.url(username="Ana", auth=1))
            self.sockets.append(ws)
            ws.write_message(json.dumps({"type": "auth", "token": welcome["token"]}))
            self.assertEqual((await self.read(ws))["type"], "welcome")
        self.assertEqual(delays, [10])


class LinkGuardTest(ChatTestCase):
    """README: a one-time code, valid 10 minutes, one per user at a time,
    for that user only; the new device gets an unguessable token of its own."""

    async def code(self, ws):
        return (await self.reply(ws, "link", type="link"))["code"]

    @async_test
    async def test_a_code_lasts_ten_minutes_and_a_new_one_replaces_the_last(self):
        a, welcome = await self.connect("Ana")
        await self.connect("Bob")
        first = await self.code(a)
        second = await self.code(a)
        await self.refused("name_taken", 4409, username="Ana", link=first)  # replaced by the second
        await self.refused("name_taken", 4409, username="Bob", link=second)  # Ana's, not Bob's
        third = await self.code(a)
        with mock.patch.object(chat, "time", Clock(595)):
            phone = await websocket_connect(self.url(username="Ana", link=third))
            self.sockets.append(phone)
            hello = await self.read(phone)
        self.assertEqual((hello["type"], hello["user"]), ("welcome", "Ana"))
        self.assertGreaterEqual(len(hello["token"]), 32, "as unguessable as the first token")
        late = await self.code(a)
        with mock.patch.object(chat, "time", Clock(605)):
            await self.refused("name_taken", 4409, username="Ana", link=late)


class RestartGuardTest(ChatTestCase):
    """What a restart must not undo: a revoked device, the lookalikes of
    owned names, and what --release frees."""

    def fresh_app(self):
        return chat.make_app(db=self.db, rate=0, names_per_hour=0, connects_per_minute=0, offline_grace=0,
                             presence_window=0)

    def get_app(self):
        self.db = os.path.join(tempfile.mkdtemp(prefix="chat-test-"), "chat.db")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.db), True)
        return self.fresh_app()

    def restart(self):
        self.http_server.request_callback = self.fresh_app()

    @async_test
    async def test_a_revoked_device_and_a_lookalike_stay_refused_after_a_restart(self):
        a, welcome = await self.connect("Ana.Lee")
        code = (await self.reply(a, "link", type="link"))["code"]
        phone = await websocket_connect(self.url(username="Ana.Lee", link=code))
        self.sockets.append(phone)
        second = await self.read(phone)
        await self.ack(a, type="revoke", device=second["device"])
        self.restart()
        await self.refused("name_taken", 4409, username="Ana.Lee", token=second["token"])
        await self.refused("bad_username", 4400, username="AnaLee")
        await self.connect("Ana.Lee", welcome["token"])

    @async_test
    async def test_release_frees_the_name_however_written_and_its_old_tokens_stop_working(self):
        a, welcome = await self.connect("Ana")
        a.close()
        await self.wait_health(connections=0)
        with mock.patch("sys.stderr"):
            self.assertEqual(chat.release("ANA", self.db), 0)
            self.assertEqual(chat.release("Nobody", self.db), 1, "an unknown name exits 1")
        self.restart()
        _, claimed = await self.connect("Ana")  # a new owner
        self.assertNotEqual(claimed["token"], welcome["token"])
        await self.refused("name_taken", 4409, username="Ana", token=welcome["token"])

    @async_test
    async def test_a_database_from_before_cids_gets_the_column(self):
        a, _ = await self.connect("UserA")
        await self.say(a, "written before the upgrade")
        db = sqlite3.connect(self.db)
        db.executescript("""
            CREATE TABLE old (id INTEGER PRIMARY KEY, room TEXT, sender TEXT NOT NULL, recipient TEXT,
                              delivered INTEGER NOT NULL, frame TEXT NOT NULL);
            INSERT INTO old SELECT id, room, sender, recipient, delivered, frame FROM messages;
            DROP TABLE messages;
            ALTER TABLE old RENAME TO messages;
        """)  # as a database from before cids
        db.close()
        self.restart()
        a, _ = await self.connect("UserA", self.tokens["UserA"])
        first, _ = await self.ack(a, type="message", text="once", cid="c-1")
        again, _ = await self.ack(a, type="message", text="once", cid="c-1")
        self.assertEqual(again["id"], first["id"])


class MetricsFromTest(ChatTestCase):
    app_options = {"metrics_from": ["127.0.0.1"]}

    @async_test
    async def test_an_address_listed_in_metrics_from_may_read_metrics(self):
        class Remote:
            is_loopback = False
        with mock.patch.object(chat.ipaddress, "ip_address", return_value=Remote()):
            response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/metrics" % self.get_http_port())
        self.assertEqual(response.code, 200)


class HostGuardTest(ChatTestCase):
    app_options = {"origins": ["https://Chat.Example.net/"]}

    async def status(self, host):
        try:
            response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/" % self.get_http_port(),
                                                     headers={"Host": host})
            return response.code
        except HTTPClientError as e:
            return e.code

    @async_test
    async def test_a_host_named_in_origins_is_this_server(self):
        self.assertEqual(await self.status("chat.example.net"), 200)
        self.assertEqual(await self.status("elsewhere.example.net"), 403)

    def test_listening_on_every_address_allows_addresses_not_names(self):
        conf = chat.dataclasses.replace(chat.Hub.conf, host="0.0.0.0", hosts=set())
        self.assertTrue(chat.host_allowed("10.1.2.3:5000", 5000, conf))
        self.assertFalse(chat.host_allowed("10.1.2.3:5001", 5000, conf))
        self.assertFalse(chat.host_allowed("rebind.attacker.example:5000", 5000, conf))


class EmptyRoomGuardTest(ChatTestCase):

    @async_test
    async def test_the_default_room_stays_and_a_forgotten_room_comes_back_empty(self):
        a, b = await self.pair()
        await self.reply(a, "joined", type="join", room="attic")
        await self.say(a, "old words", room="attic")
        await self.reply(a, "left", type="leave", room="attic")
        await self.reply(a, "left", type="leave", room="general")
        await self.reply(b, "left", type="leave", room="general")
        chat.Hub.sweep(now=time.monotonic() + chat.ROOM_IDLE + 1)
        self.assertIn("general", chat.Hub.rooms, "the default room always stays")
        self.assertNotIn("attic", chat.Hub.rooms)
        joined = await self.reply(a, "joined", type="join", room="attic")
        self.assertEqual(joined["history"], [], "its messages went with it")


class GraceRosterTest(ChatTestCase):
    app_options = {"offline_grace": 30}

    @async_test
    async def test_a_user_within_the_grace_is_still_listed_online(self):
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        await self.presence(a, "UserB", "online")
        b.close()
        await self.wait_health(connections=1)
        await self.connect("UserC")
        await self.presence(a, "UserC", "online")  # the online list is refreshed now
        _, welcome = await self.connect("UserD")
        self.assertEqual((welcome["online"], welcome["online_count"]), (["UserA", "UserB", "UserC", "UserD"], 4))


class RefusedFrameGuardTest(ChatTestCase):

    @async_test
    async def test_nothing_after_a_protocol_error_is_acted_on(self):
        a, b = await self.pair()
        sock, data = await raw_client(self.get_http_port(), "Sneak")
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, client_frame(0x1, b'{"type":"rooms"}', masked=False)
                                    + client_frame(0x1, json.dumps({"type": "message", "text": "sneaky"}).encode())
                                    + client_frame(0x8, struct.pack(">H", 1000)))
            self.assertEqual(await read_close(sock, data), 1002)
            while await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT):
                pass  # until the server has read it all and hung up
        finally:
            sock.close()
        got = await self.sync(b) + await self.sync(a)
        self.assertNotIn("sneaky", [f.get("text") for f in got])


class TokenGuardTest(ChatTestCase):

    @async_test
    async def test_a_token_opens_only_the_name_it_was_issued_for(self):
        await self.pair()
        await self.refused("name_taken", 4409, username="UserA", token=self.tokens["UserB"])


class ReplayLimitTest(ChatTestCase):
    app_options = {"mailbox": 3}

    @async_test
    async def test_a_replay_as_long_as_the_mailbox_says_directs_truncated(self):
        a, b = await self.pair()
        for i in range(4):
            await self.say(b, "@UserA dm %d" % i)
        ws = await self.open_ws("UserA", self.tokens["UserA"], since=0)
        welcome = await self.read(ws)
        self.assertIs(welcome.get("directs_truncated"), True, "there may be more: the client asks with history")


class WireFrameTest(ChatTestCase):
    """README: every wire frame (pings too) counts against four times
    --rate/--burst, and a connection past it for 10 s is closed (4429)."""
    app_options = {"rate": 0.001, "burst": 1}

    @async_test
    async def test_pings_past_four_times_the_burst_for_ten_seconds_close_4429(self):
        clock = MovingClock()
        loop = asyncio.get_running_loop()
        with mock.patch.object(chat, "time", clock):
            sock, data = await raw_client(self.get_http_port(), "Pinger")
            try:
                async def ping():
                    """A ping, answered by a pong (the server has counted it)."""
                    nonlocal data
                    await loop.sock_sendall(sock, client_frame(0x9, b"p"))
                    while True:
                        frames, data = frames_in(data)
                        if any(op == 0xA for op, _ in frames):
                            return
                        self.assertNotIn(0x8, [op for op, _ in frames], "closed too soon")
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
                        self.assertTrue(chunk, "closed too soon")
                        data += chunk

                for _ in range(5):  # the fifth is past 4 x burst: the flood starts
                    await ping()
                for _ in range(19):  # 9.5 s more, never pausing a second
                    clock.now += 0.5
                    await ping()
                clock.now += 0.5
                await loop.sock_sendall(sock, client_frame(0x9, b"p"))
                self.assertEqual(await read_close(sock, data), 4429)
            finally:
                sock.close()


class RoomPrivacyTest(ChatTestCase):
    """history, members and read of a room need membership, also when the room exists."""

    @async_test
    async def test_a_room_you_are_not_in_is_not_in_room(self):
        a, b = await self.pair()
        await self.reply(a, "joined", type="join", room="attic")
        said = await self.say(a, "attic secret", room="attic")
        await self.sync(b)
        await self.error(b, "not_in_room", type="history", room="attic")
        await self.error(b, "not_in_room", type="members", room="attic")
        await self.error(b, "not_in_room", type="read", room="attic", id=said["id"])
        await self.still_serving(a, b)

    @async_test
    async def test_a_room_empty_for_less_than_a_day_stays(self):
        a, _ = await self.connect("UserA")
        await self.reply(a, "joined", type="join", room="attic")
        await self.reply(a, "left", type="leave", room="attic")
        chat.Hub.sweep(now=time.monotonic() + chat.ROOM_IDLE - 60)
        self.assertIn("attic", chat.Hub.rooms)


class BatchGuardTest(ChatTestCase):
    """Batches, flushed by hand (the window is long): a batch of several
    users goes to each of them too, and a change undone within the window
    is not told."""
    app_options = {"presence_window": 30}

    @async_test
    async def test_users_arriving_in_one_window_learn_of_each_other(self):
        a, _ = await self.connect("UserA")
        chat.Announcer.flush()
        b, _ = await self.connect("UserB")
        c, _ = await self.connect("UserC")
        chat.Announcer.flush()
        frame = await self.expect(b, "presence")
        self.assertEqual(frame, {"type": "presence", "online": ["UserB", "UserC"], "offline": []})
        frame = await self.expect(b, "member", room="general")
        self.assertEqual(frame["joined"], ["UserB", "UserC"])

    @async_test
    async def test_joining_and_leaving_within_the_window_is_not_told(self):
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        await self.reply(b, "joined", type="join", room="attic")
        chat.Announcer.flush()
        await self.sync(a)
        await self.sync(b)
        await self.reply(a, "joined", type="join", room="attic")
        await self.reply(a, "left", type="leave", room="attic")
        chat.Announcer.flush()
        await self.quiet(b, "UserB, while UserA joined and left within the window")

    @async_test
    async def test_leaving_and_coming_back_within_the_window_is_not_told(self):
        a, _ = await self.connect("UserA")
        b, _ = await self.connect("UserB")
        chat.Announcer.flush()
        await self.sync(a)
        b.close()
        await self.wait_health(connections=1)
        await self.connect("UserB", self.tokens["UserB"])
        chat.Announcer.flush()
        await self.quiet(a, "UserA, while UserB left and came back within the window")


class HistoryDeliversTest(ChatTestCase):
    """Kept messages left out of a connect sequence and read with history
    are delivered then: the sender gets its receipts, and they do not come
    again on the next connect."""
    app_options = {"max_queue": 4000, "max_text": 1000}

    @async_test
    async def test_kept_messages_read_through_history_are_delivered_once(self):
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        sent = [(await self.say(a, "@UserB %d %s" % (i, "d" * 900)))["id"] for i in range(6)]
        again, welcome = await self.connect("UserB", self.tokens["UserB"])
        self.assertIs(welcome.get("directs_truncated"), True)
        seen = [f["id"] for f in await self.sync(again)]
        while True:
            page = await self.reply(again, "history", type="history", directs=True, before=seen[0], limit=2)
            self.assertTrue(all(m.get("buffered") for m in page["messages"]), page)
            seen = [m["id"] for m in page["messages"]] + seen
            if not page["more"]:
                break
        self.assertEqual(seen, sent)
        receipts = [f["id"] for f in await self.sync(a) if f["type"] == "delivered"]
        self.assertEqual(sorted(receipts), sent)
        again.close()
        await self.presence(a, "UserB", "offline")
        third, _ = await self.connect("UserB", self.tokens["UserB"])
        await self.quiet(third, "UserB, who has read them all")

    @async_test
    async def test_a_history_answer_holds_at_most_max_queue_bytes(self):
        a, _ = await self.connect("UserA")
        said = [(await self.say(a, "%d %s" % (i, "h" * 900)))["id"] for i in range(6)]
        page = await self.reply(a, "history", type="history", room="general")
        got = [m["id"] for m in page["messages"]]
        self.assertTrue(0 < len(got) < 6, got)
        self.assertEqual((got, page["more"]), (said[len(said) - len(got):], True), "the newest that fit")


class MembersPageTest(ChatTestCase):
    """members: "more" says more names follow, and only then."""
    app_options = {"roster": 2}

    @async_test
    async def test_more_only_when_more_follow(self):
        a, b = await self.pair()
        for room in (None, "general"):
            page = await self.reply(a, "members", type="members", **({"room": room} if room else {}))
            self.assertEqual((page["members"], page["more"]), (["UserA", "UserB"], False), "exactly a page")
        await self.connect("UserC")
        await self.presence(a, "UserC", "online")  # the online list is refreshed now
        page = await self.reply(a, "members", type="members")
        self.assertEqual((page["members"], page["more"]), (["UserA", "UserB"], True))
        page = await self.reply(a, "members", type="members", after="UserA")
        self.assertEqual((page["members"], page["more"]), (["UserB", "UserC"], False))


class FullDisk:
    """A Store's connection on a disk with no room for a statement that
    holds `marker`: SQLite rolls back the whole transaction, as it does for
    SQLITE_FULL (the rest is the real connection)."""

    def __init__(self, db, marker):
        self.db, self.marker = db, marker

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql, args=()):
        if any(isinstance(arg, str) and self.marker in arg for arg in args):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, args)


class GroupCommitTest(FileCase):
    """The changes of one event-loop turn are committed together, before any
    frame about them is written: an ack means the change is on disk, and a
    commit that fails is taken back before anyone hears of it."""

    async def until_closed(self, ws, what):
        """The frames that arrive before the server closes ws."""
        frames = []
        for _ in range(100):
            msg = await self.raw_read(ws, what)
            if msg is None:
                return frames
            frames.append(json.loads(msg))
        self.fail("%s: still open after %r" % (what, frames[-3:]))

    def committed(self, sql, *args):
        """What another connection to the file sees: only what is committed."""
        other = sqlite3.connect(self.db)
        try:
            return other.execute(sql, args).fetchall()
        finally:
            other.close()

    @async_test
    async def test_a_change_is_on_disk_when_its_ack_arrives(self):
        a, b = await self.pair()
        ack = await self.say(a, "on disk")
        self.assertEqual(self.committed("SELECT id FROM messages WHERE id = ?", ack["id"]), [(ack["id"],)])
        await self.reply(a, "joined", type="join", room="attic")
        self.assertEqual(self.committed("SELECT user FROM members WHERE room = 'attic'"), [("usera",)])

    @async_test
    async def test_a_lost_commit_tells_nobody_and_everyone_comes_back_to_what_is_kept(self):
        a, b = await self.pair()
        kept = await self.say(a, "kept")
        await self.expect(b, "message", id=kept["id"])
        with mock.patch.object(chat.Hub.store, "_commit", side_effect=sqlite3.OperationalError("disk I/O error")), \
                self.assertLogs("chat", "ERROR"):
            # In one loop turn of the server: an answer that writes nothing, then the message.
            a.protocol.stream.set_nodelay(True)  # both frames in the server's socket before it reads
            self.send(a, type="rooms", ref="r-rooms")
            self.send(a, type="message", text="lost words", cid="c-lost", ref="r-lost")
            self.assertEqual(await self.until_closed(a, "UserA's close"), [], "no ack, no copy of the message")
            self.assertEqual(await self.until_closed(b, "UserB's close"), [], "nothing of the lost message")
        self.assertEqual((a.close_code, b.close_code), (1011, 1011))
        self.assertEqual(self.committed("SELECT count(*) FROM messages WHERE cid = 'c-lost'"), [(0,)])
        # Both come back with since; the live state is what the database kept.
        a, _ = await self.connect("UserA", self.tokens["UserA"], since=kept["id"])
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=kept["id"])
        self.assertEqual([m["text"] for m in a.joined["general"]["history"]], [])
        history = await self.reply(a, "history", type="history", room="general")
        self.assertEqual([m["text"] for m in history["messages"]], ["kept"])
        await self.sync(a)
        chat.Hub.store.index_pending()  # the index's timer: nothing of the lost message is written
        other = await self.say(a, "other words")  # the lost message's id, given again
        found = await self.reply(a, "results", type="search", q="lost")
        self.assertEqual(found["messages"], [], "the lost words are in no index")
        # The page sends the unacked message again, with its cid: now it is kept, once.
        again, _ = await self.ack(a, type="message", text="lost words", cid="c-lost")
        self.assertEqual([(await self.expect(b, "message"))["id"] for _ in range(2)], [other["id"], again["id"]])
        found = await self.reply(a, "results", type="search", q="lost")
        self.assertEqual([m["id"] for m in found["messages"]], [again["id"]])

    @async_test
    async def test_after_a_lost_commit_each_change_commits_alone_for_a_while(self):
        """So a disk that stays broken refuses one change at a time, with an
        error to its sender, instead of closing everyone again and again."""
        a, b = await self.pair()
        store = chat.Hub.store
        with mock.patch.object(store, "_commit", side_effect=sqlite3.OperationalError("disk I/O error")), \
                self.assertLogs("chat", "ERROR"):
            self.send(a, type="message", text="lost")
            await self.until_closed(a, "UserA's close")
            a, _ = await self.connect("UserA", self.tokens["UserA"])
            b, _ = await self.connect("UserB", self.tokens["UserB"])
            await self.sync(a)
            alone = await self.say(a, "committed alone")  # the group's commit would fail
            await self.expect(b, "message", id=alone["id"])
            self.assertEqual(self.committed("SELECT id FROM messages WHERE id = ?", alone["id"]), [(alone["id"],)])
            store.alone_until -= store.LOST_ALONE  # a minute later: grouped again
            self.send(a, type="message", text="lost again")
            self.assertEqual(await self.until_closed(b, "UserB's close"), [])

    @async_test
    async def test_a_change_the_disk_refuses_first_in_its_turn_is_refused_alone(self):
        """SQLite rolls back a whole transaction when the disk is full. When
        the refused change was the first of its turn, nothing else was lost:
        its sender gets an error, and the next change of the turn is kept."""
        a, b = await self.pair()
        store = chat.Hub.store
        store.db = FullDisk(store.db, "no room")
        self.addCleanup(setattr, store, "db", store.db.db)
        a.protocol.stream.set_nodelay(True)  # both frames in the server's socket before it reads
        with self.assertLogs("chat", "ERROR"):
            self.send(a, type="message", text="no room for this", ref="r-full")
            self.send(a, type="message", text="this fits", ref="r-fits")
            refused, _ = await self.answer(a, "r-full")
            kept, _ = await self.answer(a, "r-fits")
        self.assertEqual((refused["type"], refused["code"], kept["type"]), ("error", "server_error", "ack"))
        got = await self.expect(b, "message")
        self.assertEqual((got["id"], got["text"]), (kept["id"], "this fits"))
        await self.quiet(b, "UserB")

    @async_test
    async def test_a_full_disk_refuses_the_change_alone(self):
        """A write the disk cannot take, alone in its turn, is refused like
        any failed write: an error to its sender, and everything else goes on."""
        a, b = await self.pair()
        db = chat.Hub.store.db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute("PRAGMA max_page_count = %d" % pages)  # the disk fills up
        kept = []
        with self.assertLogs("chat", "ERROR"):
            for i in range(20):  # the pages' free room takes a few first
                answer, _ = await self.request(a, type="message", text="%d %s" % (i, "x" * 1990))
                if answer["type"] == "error":
                    break
                kept.append(answer["id"])
        self.assertEqual(answer["code"], "server_error", answer)
        self.assertEqual(a.close_code, None, "the sender's connection stays")
        got = [(await self.expect(b, "message"))["id"] for _ in kept]
        self.assertEqual(got, kept)
        await self.quiet(b, "UserB, while the disk was full")
        self.assertEqual(self.committed("SELECT count(*) FROM messages"), [(len(kept),)])
        db.execute("PRAGMA max_page_count = 1073741823")  # room again
        await self.still_serving(a, b)


class IndexBatchTest(ChatTestCase):
    """Search words are written in batches; a failed batch loses nothing."""

    @async_test
    async def test_a_batch_the_index_refused_is_written_by_the_next_search(self):
        a, b = await self.pair()
        said = await self.say(a, "words that wait for the index")
        store = chat.Hub.store
        with mock.patch.object(store, "_alone", side_effect=sqlite3.OperationalError("locked")):
            with self.assertLogs("chat", "WARNING"):
                store._index_later()  # the timer's turn: the index is locked
        self.assertIn(said["id"], store.unindexed, "kept for the next try")
        found = await self.reply(a, "results", type="search", q="wait index")
        self.assertEqual([m["id"] for m in found["messages"]], [said["id"]])
        self.assertEqual(store.unindexed, {})


class MaxConnsTest(ChatTestCase):
    """--max_conns connections in all, HTTP ones included: the one past it
    gets a bare 503; a closed one frees its place. (The Listener in-process,
    so the test can wait for its count.)"""

    @async_test
    async def test_max_conns_connections_and_not_one_more(self):
        listening, port = bind_unused_port()
        server = chat.Listener(self._app)
        server.max_conns = 2
        server.add_sockets([listening])
        loop = asyncio.get_running_loop()
        held = []

        async def open_one():
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            held.append(sock)
            return sock

        async def count(n):
            for _ in range(1000):
                if server.http_open == n:
                    return
                await asyncio.sleep(0)  # one turn of the loop
            self.fail("the server never counted %d connections (%d)" % (n, server.http_open))

        try:
            for _ in range(2):
                await open_one()
            await count(2)
            extra = await open_one()
            answer = await asyncio.wait_for(loop.sock_recv(extra, 4096), READ_TIMEOUT)
            self.assertIn(b" 503 ", answer)
            held.pop(0).close()
            await count(1)
            again = await open_one()
            await loop.sock_sendall(again, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await asyncio.wait_for(loop.sock_recv(again, 4096), READ_TIMEOUT)
            self.assertIn(b" 200 ", answer)
        finally:
            for sock in held:
                sock.close()
            server.stop()
            await server.close_all_connections()


class SlowWriteAliveTest(ChatTestCase):
    """README: a write the kernel had to hold back and then took counts as
    an answer to a ping (a reader busy with a big answer is alive, even if
    its pong waits behind it). The ping round is run by hand: the time of
    the last held-back write is set, as Outbox._written sets it."""

    @async_test
    async def test_a_held_back_write_taken_after_the_ping_counts_as_alive(self):
        a, _ = await self.connect("Reader")
        connection, = chat.Hub.online["reader"]
        sent = time.monotonic()
        connection._heard = sent - 100  # no pong since long before the ping
        connection.outbox.written_at = sent + 1  # but a held-back write was taken after it
        chat.Liveness._drop_silent([connection], sent)
        self.assertFalse(connection._dead)
        await self.ack(a, type="rooms")
        connection.outbox.written_at = sent - 1  # nothing taken since the ping: gone
        chat.Liveness._drop_silent([connection], sent)
        self.assertTrue(connection._dead)


class MailboxFailureTest(ChatTestCase):
    """A private message the database refused is not counted as kept: the
    recipient's mailbox still takes --mailbox messages."""
    app_options = {"mailbox": 2}

    @async_test
    async def test_a_refused_message_leaves_the_mailbox_as_it_was(self):
        a, b = await self.pair()
        b.close()
        await self.presence(a, "UserB", "offline")
        with mock.patch.object(chat.Hub.store, "add_message", side_effect=sqlite3.OperationalError("disk I/O error")), \
                self.assertLogs("chat", "ERROR"):
            await self.error(a, "server_error", type="message", text="@UserB lost")
        for i in range(2):
            ack, _ = await self.ack(a, type="message", text="@UserB kept %d" % i)
            self.assertIs(ack.get("queued"), True)
        await self.error(a, "mailbox_full", type="message", text="@UserB one too many")
