"""chat.py: a small, self-hostable real-time chat server in one Tornado module.

Run it with ``python chat.py --port 5000`` and open
``http://localhost:5000/?username=UserA``. Everything below this docstring
implements the protocol it describes.

Endpoints
---------
``GET /``         the page (index.html: HTML, CSS and JS in one file).
``GET /healthz``  ``{"status":"ok","connections":3,"users_online":2,"rooms":4}``.
``GET /metrics``  Prometheus text (loopback and ``--metrics_from`` only).
``GET /ws?username=NAME[&auth=1|&token=TOKEN|&link=CODE][&since=ID][&epoch=E]``
                  the WebSocket.

``/`` and ``/ws`` answer only requests whose ``Host`` is this server's: a
loopback name on its port, the ``--host`` address, or one listed with
``--hosts`` or ``--origins`` (anything else is 403, which stops DNS
rebinding); ``/metrics`` only a ``Host`` that is an IP address or
``localhost``, on any port; ``/healthz`` answers any. A WebSocket from a
foreign ``Origin`` is 403 too.

Names
-----
User and room names are 1-32 characters from ``A-Z a-z 0-9 _ - .``. They are
matched case-insensitively (``@userb`` reaches ``UserB``, ``General`` is
``general``) and shown as first written. A new name that differs from an
owned one only by ``.``, ``-``, ``_`` or the lookalikes I/l/1 and O/0 is
refused (``bad_username``), so nobody can pass as somebody else.

The first connection to a free name owns it and receives a ``token`` in its
``welcome``: the token of this device. Every later connection to that name
must present a token of one of its devices, or a one-time link code (which
makes a new device); without one the server answers ``name_taken`` and
closes with 4409 at once. With ``auth=1`` the credentials come in the first
frame instead of the URL (which proxies log): ``{"type":"auth","token":"..."}``
or ``{"type":"auth","link":"K7QF-2MXD"}``; the server sends nothing until it
arrives, and answers ``name_taken`` if none comes within 10 s. One user may
hold many connections (tabs and devices); each receives everything sent to
the user.

Frames
------
One JSON object per text frame, always with a ``"type"``. The same key names
are used in both directions. A client frame may carry ``"ref"`` (a string of
at most 100 characters or an integer): such a frame is answered on its
connection by exactly one ``ack`` or one ``error`` carrying that ``ref``.

On connect the server sends, in order:

1. ``{"type":"welcome","user":"UserA","token":"...","device":1,
   "rooms":["general"],"default_room":"general","max_text":2000,
   "epoch":"9f2c...","read_with":{"UserB":140},"online":["UserA"],
   "online_count":1}`` (the epoch names the database that ids count in;
   ``read_with`` the read markers of private conversations; ``online`` is
   the first ``--roster`` names, sorted case-insensitively, and
   ``online_count`` counts them all);
2. for each of the user's rooms ``{"type":"joined","room":"general",
   "members":["UserA","UserB"],"member_count":2,"read":150,
   "history":[message, ...]}`` (members as ``online``; ``read`` the user's
   read marker, 0 for none, which a join sets to the newest id so far;
   history oldest first);
3. private messages, oldest first: those kept while the user was offline
   (``"buffered": true``), and with ``since=ID`` also those to or from the
   user with a larger id (one the user sent that still waits says
   ``"queued": true``);
4. with ``since=ID``, the changes (``edited``, ``deleted``, ``reaction``,
   below) with a larger id to messages up to ID in the conversations the
   user can see now, oldest first, as they were sent live. Messages are
   always sent in their current state, so a newer message's changes are
   not sent again, and a message edited twice, or edited then deleted,
   comes as its last change only.

What one connect sequence carries is bounded by ``--max_queue`` bytes, so
that a client that never reads costs little. Private messages take the
newest that fit in half of it; when some were left out, ``welcome`` says
``"directs_truncated": true`` and the client asks for the rest with
``history`` (below). Room histories share what is left; a room cut short, or
one where more were missed than the history keeps, says ``"truncated":
true``. With ``since=ID`` (the highest id the client has seen) each
``history`` holds only messages with a larger id. A ``since`` that is not a
number is ignored, and one sent with another database's ``epoch=`` counts
as 0. Changes take the newest that fit in what is left, at most 1,000; a
client that gets that many (or was away long) should ask for its open
conversations again with ``history``. The sequence is not in id order, so a
client should move its resume point only after it has all of it: the answer
to its first frame comes after.

Presence changes (a user's first connection opens, its last one closes)
are gathered for ``--presence_window`` seconds and go to everyone as one
frame: ``{"type":"presence","online":["UserB"],"offline":["UserC"]}``. Both
keys are always there, each name once, with its latest state; a change
undone within the window is not told, and a user whose last connection
comes back within ``--offline_grace`` seconds was never away. Membership
changes go to the room's members the same way: ``{"type":"member",
"room":"python","joined":["UserA"],"left":[]}``. A receiver may find its
own name in a batch.

Client to server, and what comes back::

    {"type":"message","room":"general","text":"hello","ref":1,"cid":"c7"}
        -> to every member: {"type":"message","id":101,"room":"general",
           "from":"UserA","text":"hello","ts":"2026-11-24T15:04:05.123Z",
           "time":"15:04:05"}; to the sender also {"type":"ack","ref":1,"id":101}
           "cid" (optional, 1-64 printable ASCII characters) is the client's
           own id for the message: a repeat with a cid already stored for
           this user is not posted again but acked with the first id, so a
           page may re-send safely after a reconnect.
           "reply_to":101 (optional) names a message of the same room, or of
           the same two users: the message then carries "reply_to":101 and
           "quote", the first 100 characters of 101's current text (null
           once 101 is deleted); bad_request for any other id.
    {"type":"message","text":"@UserB hi"}   a direct message ("@name" + ASCII
                                            white space starts one)
        -> to both users: {"type":"direct","id":102,"from":"UserA",
           "to":"UserB","text":"hi","ts":...,"time":...}. If UserB has no
           connection it is kept for them, the ack says "queued": true, and
           the sender later gets {"type":"delivered","id":102,"to":"UserB"}.
    {"type":"edit","id":101,"text":"fixed"}   (its author only)
        -> to everyone who sees 101 (the room's members, or both sides of a
           private message): {"type":"edited","id":230,"target":101,
           "room":"general","text":"fixed","ts":...,"time":...} ("from" and
           "to" of 101 instead of "room" for a private message); to the
           sender also {"type":"ack","ref":...,"id":230}. From then on 101
           carries the new text and "edited":"<ts>" in every answer, and
           replies to it quote the new text. Text rules as for a message; a
           room message may not start with "@name ".
    {"type":"delete","id":101}    (its author only)
        -> {"type":"deleted","id":231,"target":101,"room":"general"} (or
           "from"/"to"), to the same people. From then on 101 is a tombstone
           in every answer: {"type":"message","id":101,"room":"general",
           "from":"UserA","ts":...,"time":...,"deleted":true} (a private one
           stays "direct", with "from" and "to"), with no text, reply or
           reactions, and search cannot find it. Its text is erased from the
           database within seconds, and before a clean shutdown ends.
    {"type":"react","id":101,"emoji":"👍"}
        -> toggles the user's reaction: {"type":"reaction","id":232,
           "target":101,"room":"general","emoji":"👍","user":"UserA",
           "on":true} (or "from"/"to"), to the same people. A message with
           reactions carries "reactions":{"👍":["UserA","UserB"]} (names in
           the order they reacted) in every answer; without any, no key.
    Each change has an id of its own, from the same sequence as messages.
    {"type":"join","room":"python"}     -> {"type":"joined",...}; the room
                                           gets a member batch
    {"type":"leave","room":"python"}    -> {"type":"left","room":"python"};
                                           the room gets a member batch
    {"type":"rooms"}                    -> {"type":"rooms","rooms":
                                            [{"name":"general","members":12}]}
    {"type":"members","room":"general","after":"Bob"}
        -> {"type":"members","room":"general","members":[...],"more":true}:
           the next --roster member names after "after" (from the start
           without it); without "room", the users online.
    {"type":"history","room":"general","before":101,"limit":50}
    {"type":"history","with":"UserB","before":101}
    {"type":"history","directs":true,"before":101}
        -> {"type":"history","room":"general","more":true,"messages":[...]}
           (or "with", or "directs"): the newest messages with an id below
           "before" (all, without it), oldest first, at most "limit" (1-200,
           default 50) and --max_queue bytes; "more" says older ones exist.
           "with" is one private conversation, "directs" all of the user's.
    {"type":"search","q":"deploy logs","before":230}
        -> {"type":"results","q":"deploy logs","more":false,"messages":[...]}:
           newest first, at most 50, messages holding every word (words,
           not substrings) in the rooms the user is in and its own private
           messages; "before" pages back.
    {"type":"read","room":"general","id":150}  or  "with":"UserB"
        -> moves the user's read marker forward (never back); its other
           connections get the same frame.
    {"type":"link"}     -> {"type":"link","code":"K7QF-2MXD","expires":ISO}:
                           a one-time code for a new device, 10 minutes
    {"type":"devices"}  -> {"type":"devices","devices":[{"id":1,"label":
                           "Firefox","last_used":ISO,"current":true}]}
    {"type":"revoke","device":2}  signs a device out: its token stops
                           working and its connections close with 4401
                           ("revoked"); {"type":"logout"} is this device
    {"type":"typing","room":"general"}  -> others get {"type":"typing",
    {"type":"typing","to":"UserB"}         "user":"UserA","room":...} or "to"

``id`` is an integer that increases over every message of the server (it
may skip numbers); ``ts`` is UTC with milliseconds; ``time`` is local, in
``--timestamp_format``. Text is stored and relayed exactly as sent: escaping
it is the page's job.

Errors
------
``{"type":"error","code":CODE,"message":"a sentence","ref":...}``; the
connection stays open and nothing else changes. Codes: ``bad_json`` (also for
binary frames), ``bad_request``, ``bad_room``, ``not_in_room``, ``too_long``,
``unknown_user``, ``mailbox_full``, ``rate_limited``, ``too_many_rooms``,
``not_found`` (edit, delete or react: no such message, an event's id, a
deleted message, or one the user cannot see now; the same answer in every
case, so it tells nothing), ``forbidden`` (not the author), ``too_late``
(past ``--edit_window``), ``server_error`` (nothing was stored: try again); at connect
``bad_username`` (close 4400), ``name_taken`` (4409), ``too_many_connections``
and ``rate_limited`` (4429: also for link codes tried past
``--names_per_hour``), ``server_full`` (4503), ``server_error`` (1011);
``revoked`` (4401) when the device is signed out. Every connection is closed
with 1011 when the database lost a moment's changes (a full disk): none of
them was acked or relayed, so resume with ``since`` and send again what was
not acked.

Limits
------
A frame over 64 KiB closes with 1009, an unmasked one with 1002, a text
frame that is not UTF-8 with 1007. A connection that owes more than
``--max_queue`` bytes beyond the answers it asked for (its connect sequence,
joins and histories, each at most ``--max_queue`` bytes) has stopped
reading: it is closed with 1013 and may resume with ``since``. Server
shutdown closes with 1001. ``--max_text`` code points per message;
``--rate``/``--burst`` frames per connection (``typing`` has a small budget
of its own, and extra ones are dropped), with every wire frame (pings and
fragments too) counted against four times that; a connection that keeps
sending past its limits for 10 s is closed with 4429. ``--history``
messages per room; ``--mailbox`` kept messages per user; ``--max_tabs`` and
``--max_conns_per_ip`` connections; ``--max_conns`` connections in all,
HTTP ones included, and headers must arrive within ``--header_timeout``;
``--connects_per_minute`` per user (ten times that per address);
``--max_rooms`` rooms, 100 per user, and ``--rooms_per_hour`` new rooms per
user; ``--max_users`` owned names, ``--names_per_hour`` new names per
address (``rate_limited``, close 4429). A client that stops answering pings
(each connection's ping carries its own random payload, and a pong counts
only if it echoes it; a write the kernel had to hold back and then took
counts too) is dropped after ``--ping_interval`` + ``--ping_timeout``
seconds. A room with no members for a day is forgotten, with its messages.
``--edit_window`` seconds (0: no limit) after sending, a message may still be
edited or deleted; reactions have no limit in time. An emoji is one emoji
(a single grapheme: with its skin tone, flag or keycap, or parts joined by
U+200D) of at most 16 bytes of UTF-8; a message holds at most 20 different
emoji.

Storage
-------
``python chat.py --release NAME`` frees a name whose devices are all lost
(with the server stopped); its messages stay.

SQLite (``--db``, WAL mode) is written before anything is acked or relayed;
a write that fails is rolled back whole and answered ``server_error``. The
class-level dicts on Hub are the live state, loaded at start; private
messages that wait for their reader stay in SQLite.

Several processes (``--redis URL``, chat_redis.py)
--------------------------------------------------
Every change is an event with an id from one sequence. With ``--redis`` a
Lua script gives the id and appends the event to one Redis stream, the
shared log, together with its durable copy; every process reads the log and
applies each event, in id order, to its own class-level dicts and its own
SQLite copy (``--db`` is not used), and sends it to its own connections. A
sender's ack waits until its process has applied the event. Each process
renews a key with a TTL; when one dies, a janitor marks its users offline.
While Redis is away, sends get ``server_error`` and connects close with
1013. Ids then skip numbers: never assume they are consecutive. ``welcome``
and ``/healthz`` carry ``"node"``, the process serving the connection.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import calendar
import collections
import contextlib
import contextvars
import dataclasses
import functools
import gc
import hashlib
import ipaddress
import json
import logging
import os
import re
import resource
import secrets
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import unicodedata
import urllib.parse
from typing import Any, Awaitable, Callable, ClassVar, Collection, Iterable, Iterator, NamedTuple, Optional, Sequence

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.options
import tornado.web
import tornado.websocket
from tornado.log import access_log
from tornado.options import define, options, parse_command_line, parse_config_file

log = logging.getLogger("chat")
HERE = os.path.dirname(os.path.abspath(__file__))


################ Settings

define("config", type=str, default=None, help="Python file of option settings (the command line wins)")
define("host", default="127.0.0.1", help="address to listen on")
define("port", default=5000, help="port to listen on")
define("debug", default=False, help="debug logging and autoreload")
define("db", default="chat.db", help="SQLite database path, or :memory:")
define("default_room", default="general", help="room every new user joins")
define("timestamp_format", default="%H:%M:%S", help="strftime format of a message's local 'time'")
define("history", default=100, help="messages kept per room and sent on join")
define("mailbox", default=500, help="direct messages kept per offline user")
define("max_text", default=2000, help="characters per message")
define("rate", default=5.0, help="frames per second per connection (0 turns limiting off)")
define("burst", default=20, help="frames a connection may send at once")
define("origins", type=str, multiple=True, default=[], help="extra allowed Origin values")
define("hosts", type=str, multiple=True, default=[], help="extra allowed Host names, NAME or NAME:PORT")
define("max_conns", default=20000, help="open connections in all, HTTP ones included (0: no cap)")
define("header_timeout", default=10.0, help="seconds a client has to send a request's headers")
define("max_tabs", default=10, help="connections per user (0: no cap)")
define("max_conns_per_ip", default=200, help="connections per address (0: no cap)")
define("connects_per_minute", default=30.0, help="new connections per user after 10 at once; ten times that per address (0: no cap)")
define("max_rooms", default=1000, help="rooms on the server (0: no cap)")
define("rooms_per_hour", default=20.0, help="new rooms one user may create per hour, after 10 at once (0: no cap)")
define("max_users", default=10000, help="owned names on the server (0: no cap)")
define("names_per_hour", default=30.0, help="new names one address may claim per hour, after 10 at once (0: no cap)")
define("max_queue", default=1 << 20, help="bytes one connection may be owed before it is closed (1013)")
define("release", type=str, default=None, help="free the name NAME in --db (with the server stopped), then exit")
define("offline_grace", default=1.0, help="seconds a user may be gone before others see them offline")
define("presence_window", default=0.25, help="seconds presence and membership changes are gathered into one frame (0: each loop turn)")
define("roster", default=1000, help="names of users online, or of a room's members, sent at once")
define("metrics_from", type=str, multiple=True, default=[], help="addresses besides loopback that may read /metrics")
define("ping_interval", default=20.0, help="seconds between pings")
define("ping_timeout", default=20.0, help="seconds to wait for a pong (at most ping_interval)")
define("edit_window", default=0.0, help="seconds after sending that a message may still be edited or deleted (0: no limit)")
define("redis", type=str, default=None, help="redis://HOST:PORT/DB: run as one of many processes sharing this Redis (see chat_redis.py)")
define("processes", default=1, help="processes sharing --port (0: one per core; more than 1 needs --redis)")
define("node_ttl", default=10.0, help="with --redis: seconds a silent process is still taken for alive")
define("redis_log", default=100000, help="with --redis: events the shared log keeps")
define("redis_history", default=10000, help="with --redis: events kept in Redis per room and per user's private messages")

MAX_FRAME = 64 * 1024  # bytes in one client frame; larger closes with 1009
MAX_REF = 100  # characters in a string ref
MAX_CID = 64  # characters in a client's message id
WRITE_CHUNK = 256 * 1024  # frames handed to the kernel at once (a bigger frame goes whole): each done shows the reader is alive
AT_ONCE = 10  # names per address, rooms per user and connects per user allowed before their hourly/minutely rates apply
ROOMS_PER_USER = 100  # rooms one user may be in
HISTORY_PAGE = (50, 200)  # messages a history answer holds: by default, at most
TYPING = (3, 0.5)  # typing frames a connection may send at once, and per second after that
WIRE_FACTOR = 4  # every wire frame (pings, fragments too) counts against this times --rate/--burst
FLOOD_CLOSE_AFTER = 10.0  # seconds of sending past the limits before a connection is closed with 4429
FLOOD_GAP = 1.0  # a pause this long ends a flood
ROOM_IDLE = 24 * 3600.0  # seconds a room may stand empty before it is forgotten
SWEEP_EVERY = 600.0  # seconds between sweeps of empty rooms and full token buckets
AUTH_SECONDS = 10.0  # how long a connection with auth=1 may take to send its auth frame
LINK_SECONDS = 600.0  # how long a code from {"type":"link"} signs a new device in
LINK_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/1 or O/0 to misread
SEARCH_PAGE = 50  # results a search answer holds
MAX_QUERY = 200  # characters in a search
WORD = re.compile(r"\w+")  # what search matches: words, not substrings
LISTEN_BACKLOG = 4096  # connects the kernel may hold before they are accepted (a reconnect storm)
INDEX_EVERY = 0.2  # seconds a new message's words may wait for the search index (written in batches)
HISTORY_CACHE = 64 << 20  # bytes of encoded room histories kept in RAM (the least recently used are dropped)
QUOTE = 100  # characters of its target a reply quotes
MAX_EMOJI = 16  # bytes (UTF-8) in one reaction's emoji
MAX_REACTIONS = 20  # distinct emoji on one message
MAX_CHANGES = 1000  # change events a connect sequence carries at most
IN_FLIGHT = 64  # with --redis: messages of one connection waiting for the backplane at once (then reading waits)
GC_THRESHOLDS = (50_000, 2, 100)  # the cyclic collector's, for a server process (see main)
TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux: hold small writes back until uncorked (see ChatSocket.get)


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings one app runs with: the options, overridden by make_app()."""

    host: str
    port: int
    debug: bool
    db: str
    default_room: str
    timestamp_format: str
    history: int
    mailbox: int
    max_text: int
    rate: float
    burst: int
    origins: list
    hosts: list
    max_conns: int
    header_timeout: float
    max_tabs: int
    max_conns_per_ip: int
    connects_per_minute: float
    max_rooms: int
    rooms_per_hour: float
    max_users: int
    names_per_hour: float
    max_queue: int
    offline_grace: float
    presence_window: float
    roster: int
    metrics_from: list
    ping_interval: float
    ping_timeout: float
    edit_window: float
    redis: Optional[str]
    node_ttl: float
    redis_log: int
    redis_history: int


SETTINGS = [field.name for field in dataclasses.fields(Config)]  # what make_app() may override


################ Names and validation

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
# "@name" + white space at the start of a text makes it a direct message. The
# white space is ASCII only, and the page uses the very same class: a text the
# page shows as private must never be posted to a room.
DIRECT = re.compile(r"@([A-Za-z0-9_.\-]{1,32})[ \t\n\r\f\v]+(.*)", re.DOTALL)
# Text made only of these shows nothing: white space and zero-width characters.
BLANK = re.compile(r"[\s\u180e\u200b-\u200f\u2060-\u2064\ufeff]*")
CID = re.compile(r"[!-~]{1,%d}" % MAX_CID)  # printable ASCII, no space
# What two names look like to a reader: separators dropped, I/l/1 and O/0 alike.
LOOKALIKE = str.maketrans({".": None, "-": None, "_": None, "i": "l", "1": "l", "0": "o"})


class ChatError(Exception):
    """A client's mistake: becomes one error frame and changes nothing else."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The close code for each error a connect can be refused with.
CLOSE_CODES = {"bad_username": 4400, "name_taken": 4409, "rate_limited": 4429, "too_many_connections": 4429,
               "server_full": 4503, "server_error": 1013}


def key(name: str) -> str:
    """The case-insensitive identity of a user or room name."""
    return name.lower()


def skeleton(name: str) -> str:
    """What a name looks like: two names with one skeleton pass for each other."""
    return name.lower().translate(LOOKALIKE)


def check_name(value: Any, code: str) -> str:
    """A valid user or room name, or ChatError(code)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ChatError(code, "names are 1-32 characters from A-Z a-z 0-9 _ - .")
    return value


def check_room(value: Any) -> str:
    """A room name from a frame: missing or not a string is bad_request, a bad name bad_room."""
    if not isinstance(value, str):
        raise ChatError("bad_request", "'room' must be a room name")
    return check_name(value, "bad_room")


def is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates ("\\ud800"), which are not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, limit: int) -> str:
    """A message text: a non-blank string of valid Unicode within the limit."""
    if not isinstance(value, str):
        raise ChatError("bad_request", "'text' must be a string")
    if len(value) > limit:  # len() counts code points, as promised
        raise ChatError("too_long", f"messages are at most {limit} characters")
    if BLANK.fullmatch(value):
        raise ChatError("bad_request", "the message is empty")
    if not is_unicode(value):
        raise ChatError("bad_request", "the text is not valid Unicode")
    return value


def check_ref(value: Any) -> Any:
    """A client's ref, which must survive a round trip through JSON unchanged."""
    if isinstance(value, str) and len(value) <= MAX_REF and is_unicode(value):
        return value
    if is_int(value) and abs(value) < 2**53:
        return value
    raise ChatError("bad_request", f"'ref' must be an integer or a string of at most {MAX_REF} characters")


def check_cid(value: Any) -> Optional[str]:
    """A message's client id, or None when the frame has none."""
    if value is None:
        return None
    if not isinstance(value, str) or not CID.fullmatch(value):
        raise ChatError("bad_request", f"'cid' must be 1-{MAX_CID} printable ASCII characters")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_page(frame: dict) -> tuple[Optional[int], int]:
    """A history request's (before, limit)."""
    before, limit = frame.get("before"), frame.get("limit", HISTORY_PAGE[0])
    if before is not None and not (is_int(before) and 0 < before < 2**63):
        raise ChatError("bad_request", "'before' must be a message id")
    if not (is_int(limit) and 1 <= limit <= HISTORY_PAGE[1]):
        raise ChatError("bad_request", f"'limit' must be 1-{HISTORY_PAGE[1]}")
    return before, limit


def check_id(value: Any, field: str = "id") -> int:
    """A message id from a frame (whether it exists is for the caller to say)."""
    if not (is_int(value) and 0 < value < 2**63):
        raise ChatError("bad_request", f"'{field}' must be a message id")
    return value


# What may follow an emoji's first code point within one grapheme: variation
# selectors, skin tones, the combining keycap, and tag characters (subdivision
# flags). A zero-width joiner (U+200D) starts another part of the same emoji.
EMOJI_EXTEND = re.compile("[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff\u20e3\U000e0020-\U000e007f]*")
FLAG = re.compile("[\U0001f1e6-\U0001f1ff]{2}")  # two regional indicators: a flag
KEYCAP = re.compile("[0-9#*]\ufe0f?\u20e3")  # 1️⃣ #️⃣: the one place ASCII may appear


def check_emoji(value: Any) -> str:
    """A reaction: one emoji (one grapheme cluster) of at most MAX_EMOJI bytes.

    Graphemes are approximated, not fully segmented (Unicode's rules need
    tables Python lacks): a flag, a keycap, or parts joined by U+200D, each
    part a symbol (no letter, digit, mark, space or control, nothing ASCII)
    followed only by EMOJI_EXTEND characters. So 👍, 👍🏽, ❤️, 🇫🇷, 1️⃣ and
    🧑‍💻 pass; "a", "1", "👍👍" and "é" do not."""
    if not isinstance(value, str) or not is_unicode(value) or not 0 < len(value.encode()) <= MAX_EMOJI:
        raise ChatError("bad_request", f"'emoji' must be one emoji of at most {MAX_EMOJI} bytes")
    if FLAG.fullmatch(value) or KEYCAP.fullmatch(value):
        return value
    for part in value.split("\u200d"):
        if (not part or part[0].isascii() or FLAG.match(part[0] * 2)
                or unicodedata.category(part[0])[0] in "LNZCM" or not EMOJI_EXTEND.fullmatch(part, 1)):
            raise ChatError("bad_request", "'emoji' must be one emoji")
    return value


def reject_constant(name: str) -> None:
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def parse_frame(data: str | bytes) -> dict:
    """One client frame as a JSON object, or ChatError."""
    if isinstance(data, bytes):
        raise ChatError("bad_json", "frames must be text, not binary")
    try:
        frame = json.loads(data, parse_constant=reject_constant)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than Python's stack
        raise ChatError("bad_json", "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ChatError("bad_request", "a frame must be a JSON object")
    return frame


def peek_type(data: str | bytes) -> Any:
    """A frame's "type", or None for a frame that is not a JSON object
    (parse_frame says why, where the frame is handled)."""
    try:
        frame = json.loads(data)
    except ValueError:
        return None
    return frame.get("type") if isinstance(frame, dict) else None


def parse_since(value: Optional[str]) -> Optional[int]:
    """The resume point from ?since=, or None when absent or not a message id
    (plain digits, within SQLite's integers)."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


class Bucket:
    """A token bucket: `size` at once, then `rate` a second. Every budget
    the server keeps (frames, typing, names, rooms, connects) is one."""

    __slots__ = ("tokens", "when")

    def __init__(self, size: float) -> None:
        self.tokens = float(size)
        self.when = time.monotonic()

    def take(self, size: float, rate: float) -> bool:
        """Spend one token if there is one."""
        now = time.monotonic()
        self.tokens = min(float(size), self.tokens + (now - self.when) * rate)
        self.when = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, size: float, rate: float) -> bool:
        """Whether it has refilled, so forgetting it changes nothing."""
        return self.tokens + (time.monotonic() - self.when) * rate >= size


class Budgets:
    """The server-wide budgets, one Bucket per key of each kind: new names
    and link codes tried per address, new rooms per user, connects per user
    and per address.
    Buckets that have refilled are forgotten by sweep(), so the dicts hold
    only keys that were busy lately."""

    def __init__(self, conf: Config) -> None:
        per_minute = conf.connects_per_minute / 60
        self.kinds: dict[str, tuple[float, float]] = {  # kind -> (size, tokens per second); rate 0: no limit
            "name": (AT_ONCE, conf.names_per_hour / 3600),
            "link": (AT_ONCE, conf.names_per_hour / 3600),  # tries of link codes per address, like names
            "room": (AT_ONCE, conf.rooms_per_hour / 3600),
            "connect": (AT_ONCE, per_minute),
            "connect_ip": (10 * AT_ONCE, 10 * per_minute),
        }
        self.buckets: dict[str, dict[str, Bucket]] = {kind: {} for kind in self.kinds}

    def take(self, kind: str, who: str) -> bool:
        size, rate = self.kinds[kind]
        if rate <= 0:
            return True
        bucket = self.buckets[kind].get(who)
        if bucket is None:
            bucket = self.buckets[kind][who] = Bucket(size)
        return bucket.take(size, rate)

    def sweep(self) -> None:
        for kind, (size, rate) in self.kinds.items():
            buckets = self.buckets[kind]
            for who in [w for w, b in buckets.items() if b.full(size, rate)]:
                del buckets[who]


class Metrics:
    """What GET /metrics reports, in Prometheus text format: counters kept
    as the server works (cheap: one dict update per frame sent, not per
    receiver), gauges read from the Hub when asked."""

    WRITE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5)  # seconds

    counts: ClassVar[collections.Counter] = collections.Counter()  # (family, label) -> count
    writes: ClassVar[list[int]] = [0] * (len(WRITE_BUCKETS) + 1)  # database commits per bucket, then +Inf
    write_seconds: ClassVar[float] = 0.0
    lag: ClassVar[float] = 0.0  # the event loop's latest delay running a callback, in seconds

    @classmethod
    def reset(cls) -> None:
        cls.counts = collections.Counter()
        cls.writes = [0] * (len(cls.WRITE_BUCKETS) + 1)
        cls.write_seconds = cls.lag = 0.0

    @classmethod
    def count(cls, family: str, label: str, n: int = 1) -> None:
        cls.counts[family, label] += n

    @classmethod
    def sent(cls, kind: str, receivers: int) -> None:
        cls.counts["frames_out", kind] += receivers

    @classmethod
    def wrote(cls, seconds: float) -> None:
        cls.writes[bisect.bisect_left(cls.WRITE_BUCKETS, seconds)] += 1
        cls.write_seconds += seconds

    @classmethod
    def render(cls) -> str:
        out = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP chat_{name} {text}\n# TYPE chat_{name} {kind}")

        for name, label, text in (("frames_in", "type", "client frames handled, by type"),
                                  ("frames_out", "type", "frames sent, one per receiver, by type"),
                                  ("refused", "code", "connections refused at connect, by error code"),
                                  ("errors", "code", "error frames answered, by code"),
                                  ("closes", "code", "connections closed by the server for being slow (1013)")):
            family(f"{name}_total", "counter", text)
            for (fam, value), n in sorted(cls.counts.items()):
                if fam == name:
                    out.append(f'chat_{name}_total{{{label}="{value}"}} {n}')
        family("deliveries_total", "counter", "frames sent, counting each receiver")
        out.append(f"chat_deliveries_total {sum(n for (fam, _), n in cls.counts.items() if fam == 'frames_out')}")
        for name, value, text in (("connections", sum(len(t) for t in Hub.online.values()), "open WebSocket connections"),
                                  ("users_online", len(Hub.online), "users with a connection"),
                                  ("rooms", len(Hub.rooms), "rooms"),
                                  ("event_loop_lag_seconds", cls.lag, "the event loop's delay in running a callback")):
            family(name, "gauge", text)
            out.append(f"chat_{name} {value}")
        family("db_write_seconds", "histogram", "time of one database commit")
        total = 0
        for bound, n in zip((*cls.WRITE_BUCKETS, "+Inf"), cls.writes):
            total += n
            out.append(f'chat_db_write_seconds_bucket{{le="{bound}"}} {total}')
        out.append(f"chat_db_write_seconds_sum {cls.write_seconds:.6f}\nchat_db_write_seconds_count {total}")
        return "\n".join(out) + "\n"

    @classmethod
    def measure_lag(cls) -> None:
        """Every second: how late does a callback run?"""
        asked = time.monotonic()

        def ran() -> None:
            cls.lag = time.monotonic() - asked

        tornado.ioloop.IOLoop.current().add_callback(ran)


################ Outgoing frames: each shape is built here and nowhere else


def stamp(timestamp_format: str) -> tuple[str, str]:
    """(UTC ISO 8601 with milliseconds, local time in timestamp_format) for now."""
    now = time.time()
    return utc_iso(now), local_second(int(now), timestamp_format)


def utc_iso(when: float) -> str:
    """A time.time() as UTC ISO 8601 with milliseconds."""
    seconds, millis = divmod(int(when * 1000), 1000)
    return utc_second(seconds) + f".{millis:03d}Z"


# Formatting a time costs more than the rest of a message's stamp, and a busy
# room stamps many messages in one second: each second is formatted once.
@functools.lru_cache(maxsize=4)
def utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


@functools.lru_cache(maxsize=4)
def local_second(seconds: int, timestamp_format: str) -> str:
    return time.strftime(timestamp_format, time.localtime(seconds))


def parse_ts(ts: str) -> float:
    """A ts (utc_iso) as a time.time()."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000


def welcome_payload(user: str, token: str, device: int, roster: bytes, online_count: int, rooms: list,
                    read_with: dict, conf: Config, epoch: str, directs_truncated: bool, node: Optional[str]) -> bytes:
    """The welcome frame; `roster` is the online list, encoded once for every welcome."""
    frame = {"type": "welcome", "user": user, "token": token, "device": device, "rooms": rooms,
             "default_room": conf.default_room, "max_text": conf.max_text, "epoch": epoch, "read_with": read_with}
    if directs_truncated:
        frame["directs_truncated"] = True
    if node is not None:  # with --redis: which process serves this connection
        frame["node"] = node
    return b"%s,\"online\":%s,\"online_count\":%d}" % (encode(frame)[:-1], roster, online_count)


def joined_payload(room: str, members: bytes, member_count: int, read: int, history: list[bytes],
                   truncated: bool) -> bytes:
    """A joined frame, put together from parts that are encoded once each:
    the room's member list, and each message as it was first sent."""
    tail = b'],"truncated":true}' if truncated else b"]}"
    return b"".join((b'{"type":"joined","room":', encode(room), b',"members":', members,
                     b',"member_count":%d,"read":%d,"history":[' % (member_count, read), b",".join(history), tail))


def listing_payload(kind: str, head: dict, messages: list[bytes], more: bool) -> bytes:
    """A list of stored messages: {"type":kind, head..., "more":..., "messages":[...]}
    (a history or search answer)."""
    start = encode({"type": kind, **head, "more": more})
    return b"".join((start[:-1], b',"messages":[', b",".join(messages), b"]}"))


def flagged(payload: bytes, flag: str) -> bytes:
    """A stored message with one more key set to true ("buffered", "queued"),
    without decoding it: a message payload is a JSON object."""
    return b'%s,"%s":true}' % (payload[:-1], flag.encode())


def dressed(row: Row, reader: str) -> bytes:
    """A stored message as reader (a user key) is sent it: a private one
    that still waits says "buffered" to its reader and "queued" to its sender."""
    id, payload, sender, recipient, delivered = row
    if recipient is None or delivered:
        return payload
    return flagged(payload, "buffered" if recipient == reader else "queued")


def message_frame(id: int, room: str, sender: str, text: str, ts: str, local: str,
                  reply: Optional[tuple[int, Optional[str]]] = None) -> dict:
    frame = {"type": "message", "id": id, "room": room, "from": sender, "text": text, "ts": ts, "time": local}
    if reply is not None:
        frame["reply_to"], frame["quote"] = reply
    return frame


def direct_frame(id: int, sender: str, to: str, text: str, ts: str, local: str,
                 reply: Optional[tuple[int, Optional[str]]] = None) -> dict:
    frame = {"type": "direct", "id": id, "from": sender, "to": to, "text": text, "ts": ts, "time": local}
    if reply is not None:
        frame["reply_to"], frame["quote"] = reply
    return frame


def tombstone_frame(message: dict) -> dict:
    """What a deleted message becomes: its place and time, no text, nothing
    else (no reply, no reactions)."""
    kept = ("type", "id", "room", "from", "to", "ts", "time")
    return {**{k: message[k] for k in kept if k in message}, "deleted": True}


def where(message: dict) -> dict:
    """The conversation of a message, as change events name it: its room,
    or the from/to of a private one."""
    if message["type"] == "message":
        return {"room": message["room"]}
    return {"from": message["from"], "to": message["to"]}


def edited_frame(id: int, message: dict, text: str, ts: str, local: str) -> dict:
    return {"type": "edited", "id": id, "target": message["id"], **where(message), "text": text, "ts": ts,
            "time": local}


def deleted_frame(id: int, message: dict) -> dict:
    return {"type": "deleted", "id": id, "target": message["id"], **where(message)}


def reaction_frame(id: int, message: dict, emoji: str, user: str, on: bool) -> dict:
    return {"type": "reaction", "id": id, "target": message["id"], **where(message), "emoji": emoji,
            "user": user, "on": on}


def delivered_frame(id: int, to: str) -> dict:
    return {"type": "delivered", "id": id, "to": to}


def presence_frame(online: list, offline: list) -> dict:
    return {"type": "presence", "online": online, "offline": offline}


def member_frame(room: str, joined: list, left: list) -> dict:
    return {"type": "member", "room": room, "joined": joined, "left": left}


def read_frame(head: dict, id: int) -> dict:
    return {"type": "read", **head, "id": id}


def link_frame(code: str, expires: str) -> dict:
    return {"type": "link", "code": code, "expires": expires}


def devices_frame(devices: list) -> dict:
    return {"type": "devices", "devices": devices}


def members_frame(room: Optional[str], names: list, more: bool) -> dict:
    frame: dict = {"type": "members"}
    if room is not None:
        frame["room"] = room
    frame.update(members=names, more=more)
    return frame


def left_frame(room: str) -> dict:
    return {"type": "left", "room": room}


def rooms_frame(rooms: list) -> dict:
    return {"type": "rooms", "rooms": rooms}


def typing_frame(user: str, room: Optional[str], to: Optional[str]) -> dict:
    return {"type": "typing", "user": user, **({"room": room} if room else {"to": to})}


def ack_frame(ref: Any, id: Optional[int] = None, queued: bool = False) -> dict:
    frame: dict = {"type": "ack", "ref": ref}
    if id is not None:
        frame["id"] = id
    if queued:
        frame["queued"] = True
    return frame


def error_frame(code: str, message: str, ref: Any = None) -> dict:
    frame = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


################ The wire: encode once, frame once, write coalesced


def encode(frame: Any) -> bytes:
    """A frame's JSON payload; done once per frame however many receive it."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


def encode_names(names: list[str]) -> bytes:
    """A list of user or room names as JSON, exactly as encode() writes it,
    five times faster (1,000 names: 14 µs, not 70): names are 1-32 of
    A-Z a-z 0-9 _ - . (check_name), which JSON never escapes. A list with
    anything JSON would escape (a quote beyond the separators', a
    backslash, a control character) takes encode()."""
    joined = '","'.join(names)
    data = f'["{joined}"]'.encode() if names else b"[]"
    if (joined.count('"') != 2 * (len(names) - 1) or b"\\" in data
            or len(data.translate(None, CONTROL_BYTES)) != len(data)):
        return encode(names)
    return data


CONTROL_BYTES = bytes(range(32))  # what JSON strings must escape, besides " and \


def ws_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed, final WebSocket text frame (RFC 6455 5.2), as servers send."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def raw_stream(handler: tornado.websocket.WebSocketHandler) -> Optional[tornado.iostream.IOStream]:
    """The socket's stream when pre-built frames may be written to it, else None.

    The protocol object keeps its stream as ``.stream``, and a frame we build
    ourselves is only right when no compression was negotiated (we never
    offer it). When this returns None the connection falls back to the
    public write_message().
    """
    protocol = handler.ws_connection
    stream = getattr(protocol, "stream", None)
    # Exactly IOStream: an SSLIOStream's socket must never see our bytes directly.
    if type(stream) is not tornado.iostream.IOStream or getattr(protocol, "_compressor", None) is not None:
        return None
    return stream


def send_now(stream: tornado.iostream.IOStream, data: bytes) -> int:
    """Hand data straight to the kernel when the stream has nothing pending;
    how many bytes went. The rest goes through stream.write(), in order.

    This skips IOStream's per-write bookkeeping (a Future, buffer updates),
    about a third of the cost of delivering one message to one socket.
    """
    if stream.writing() or stream.closed():
        return 0
    try:
        return stream.socket.send(data)
    except OSError:  # EAGAIN, or a reset that stream.write() will notice and report
        return 0


def nagle_stays_off(value: bool) -> None:
    """A WebSocket's stream.set_nodelay: TCP_NODELAY is set once (see ChatSocket.get)."""


def may_send_close(code: int) -> bool:
    """Whether a close code may appear on the wire (RFC 6455 7.4): 1004-1006
    and 1015 never may, 1016-2999 are not assigned."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, stricter where a client may misbehave.

    Tornado reads frames in ``_receive_frame``, which reads the two header
    bytes first through ``_read_bytes``; these overrides hook in there. The
    rest of Tornado's handling is kept as it is.

    - Every wire frame, control frames and fragments included, is counted by
      the handler's ``frame_arrived``: a flood of pings or empty fragments
      costs its sender, not the server.
    - A frame from the client that is not masked is refused with 1002.
    - A text frame that is not UTF-8 is closed with 1007 (Tornado drops the
      TCP connection without a close frame).
    - A close code that may not be sent (1005 echoed back, say) becomes 1002.
    """

    _header_next = False  # the next _read_bytes is a frame's first two bytes
    _refused = False  # closed for a protocol error: only the client's close frame is read now

    # Plain functions that hand back Tornado's awaitables, not coroutines: an
    # idle connection waits inside these calls, and a coroutine of ours in
    # that chain would keep its frame alive, about 1 KiB per connection.
    def _receive_frame(self) -> Awaitable[None]:
        self._header_next = True
        return super()._receive_frame()

    def _read_bytes(self, n: int) -> Awaitable[bytes]:
        if not self._header_next:
            return super()._read_bytes(n)
        self._header_next = False
        # What Tornado's _read_bytes does, then the check before Tornado reads
        # on: a callback added first runs first, and a read already done is
        # checked now.
        future = self.stream.read_bytes(n)
        self._wire_bytes_in += n
        if future.done():
            self._header_read(future)
        else:
            future.add_done_callback(self._header_read)
        return future

    def _header_read(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # closed: Tornado's await of it ends the connection
        self.handler.frame_arrived()
        if not future.result()[1] & 0x80 and not self._refused:  # RFC 6455 5.1: a server must refuse these
            self._refuse(1002, "client frames must be masked")

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        if self._refused and opcode != 0x8:
            return None
        if opcode == 0x1 and not self.client_terminated:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._refuse(1007, "text frames must be UTF-8")
                return None
            self._message_bytes_in += len(data)
            return self._run_callback(self.handler.on_message, text)
        return super()._handle_message(opcode, data)

    def _refuse(self, code: int, reason: str) -> None:
        self._refused = True
        self.handler.refused_frame(code, reason)

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        if code is not None and not may_send_close(code):
            code, reason = 1002, "invalid close code"
        super().close(code, reason)


################ Storage: SQLite, written through before anything is acked


class StoreError(Exception):
    """The database cannot be used; raised at start, with a sentence for people."""


Row = tuple  # (id, frame JSON as bytes, sender key, recipient key or None, delivered)


class Stored(NamedTuple):
    """One stored message, looked up by id to be changed or replied to."""

    id: int
    room: Optional[str]  # room key, None for a private message
    sender: str  # user key
    recipient: Optional[str]  # user key of a private message
    frame: dict  # its current frame, decoded


class Store:
    """The durable copy of the state: users, rooms, memberships and messages.

    Each change is committed before the server acks or relays it. The
    changes of one event-loop turn commit together (group commit): the
    turn's first write opens a transaction, and sync() commits it at the
    end of the turn, or sooner, before any frame is written (Outbox.flush
    calls it). A burst of messages then costs one commit per turn, not one
    per message (about 40 µs each here). A change of several statements runs
    in ``transaction()``, a savepoint in the group: all of it or none.

    A write that fails is refused alone, as ever, unless SQLite undid the
    whole group with it (a full disk), or the commit itself failed. Then
    the group is lost (_lose): nobody was told of its changes, but the live
    state has them, so on_lost (Hub.lost) closes every connection and loads
    the state again, and for LOST_ALONE seconds each write commits by
    itself (autocommit), so that a disk that stays full refuses one change
    at a time. With --redis (on_lost is None) every write commits alone:
    Redis is the durable copy there. A change that failed is rolled back
    (to its savepoint, or whole), never left for a later commit to keep.

    Another process may hold the write lock (an admin's sqlite3 shell, a
    VACUUM). A write then waits at most BUSY_MS and raises
    sqlite3.OperationalError, which the client sees as ``server_error``: the
    event loop never stalls for long, and the server recovers by itself
    when the lock goes away.

    WAL with synchronous=NORMAL survives the process being killed at any
    moment; only a power cut may lose the last commits. Checkpoints (copying
    the WAL into the database file) run in a thread of their own.

    Private messages waiting for an offline reader stay here (``delivered``
    is 0) and nowhere else: the live state keeps only how many each user
    has. Every read the server makes per connect or request is an indexed
    search: its cost does not grow with the number of stored messages.

    A message's row holds its current state: an edit, a delete or a
    reaction rewrites ``frame`` in place (and the frames of its replies,
    whose quotes follow it), and the change itself is a row of ``events``,
    in the same id sequence, for clients that resume with ``since``.
    A delete erases the text for real. ``secure_delete`` makes SQLite zero
    what it frees, in the same transaction; but FTS5 (SQLite 3.40) keeps a
    deleted row's words in its index segments until they merge, and the WAL
    keeps old copies of pages until it is checkpointed. So a delete asks
    the Store's Checkpointer to erase it, off the event loop, and close()
    waits for that.
    """

    LOST_ALONE = 60.0  # seconds each write commits alone after a group was lost
    BUSY_MS = 100  # the longest a write waits for another process's lock

    SCHEMA = [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS users (key TEXT PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS members (room TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (room, user))",
        """CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY,      -- the message id clients see
            room TEXT,                   -- room key, NULL for a direct message
            sender TEXT NOT NULL,        -- user key
            recipient TEXT,              -- user key of a direct message
            delivered INTEGER NOT NULL,  -- 0 while a direct message waits in a mailbox
            frame TEXT NOT NULL,         -- the message frame as JSON, exactly as relayed
            cid TEXT                     -- the sender's client id for it, if it gave one
        )""",
        # Added after the first release: a database from before gets them here.
        "ALTER TABLE messages ADD COLUMN cid TEXT",
        "ALTER TABLE messages ADD COLUMN reply_to INTEGER",  # the id a reply quotes
        "CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id) WHERE room IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS directs_by_sender ON messages (sender, id) WHERE room IS NULL",
        "CREATE INDEX IF NOT EXISTS directs_by_recipient ON messages (recipient, id) WHERE room IS NULL",
        "CREATE INDEX IF NOT EXISTS directs_by_pair ON messages (sender, recipient, id) WHERE room IS NULL",
        "CREATE INDEX IF NOT EXISTS mail ON messages (recipient, id) WHERE delivered = 0",
        "CREATE INDEX IF NOT EXISTS messages_by_cid ON messages (sender, cid) WHERE cid IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS messages_by_reply ON messages (reply_to) WHERE reply_to IS NOT NULL",
        # Changes to messages (edited, deleted, reaction), in the id sequence of messages.
        """CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY,      -- the event id clients see
            room TEXT,                   -- room key, NULL for a change to a private message
            party1 TEXT,                 -- its sender's user key (private messages)
            party2 TEXT,                 -- its recipient's user key (private messages)
            target INTEGER NOT NULL,     -- the message it changes
            frame TEXT NOT NULL          -- the event frame as JSON, exactly as relayed
        )""",
        "CREATE INDEX IF NOT EXISTS events_by_room ON events (room, id) WHERE room IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS events_by_party1 ON events (party1, id) WHERE room IS NULL",
        "CREATE INDEX IF NOT EXISTS events_by_party2 ON events (party2, id) WHERE room IS NULL",
        "CREATE INDEX IF NOT EXISTS events_by_target ON events (target)",
        # One row per device a user is signed in on: its own token, by hash.
        """CREATE TABLE IF NOT EXISTS devices (
            id INTEGER PRIMARY KEY,
            user TEXT NOT NULL,          -- user key
            token_hash TEXT NOT NULL UNIQUE,
            label TEXT NOT NULL,         -- the browser's family, as its user agent says
            last_used TEXT NOT NULL      -- UTC ISO 8601, the last connect
        )""",
        "CREATE INDEX IF NOT EXISTS devices_by_user ON devices (user)",
        # Names from before devices: their one token becomes their first device.
        "INSERT INTO devices (user, token_hash, label, last_used)"
        " SELECT key, token_hash, 'first device', '' FROM users WHERE key NOT IN (SELECT user FROM devices)",
        # How far each user has read each conversation: "#room" or "@user" keys.
        "CREATE TABLE IF NOT EXISTS reads (user TEXT NOT NULL, conv TEXT NOT NULL, id INTEGER NOT NULL,"
        " PRIMARY KEY (user, conv))",
    ]
    # Full-text search: the words of every message by message id (its rowid),
    # and the conversation it is in as words of its own (see conv_words), so
    # that the search itself keeps to the asker's conversations: matches
    # elsewhere cost nothing, however many there are.
    SEARCH = ("CREATE VIRTUAL TABLE search USING fts5(text, conv, tokenize = 'unicode61 remove_diacritics 2')",
              "INSERT INTO search (rowid, text, conv) SELECT id, json_extract(frame, '$.text'),"
              " CASE WHEN room IS NULL THEN 'u' || hex(sender) || ' u' || hex(recipient) ELSE 'r' || hex(room) END"
              " FROM messages")
    COLUMNS = "id, frame, sender, recipient, delivered"  # a Row

    def __init__(self, path: str) -> None:
        self.path = path
        # Group commit (see _group), once the Hub sets on_lost: what to do when a group is lost.
        self.on_lost: Optional[Callable[[], None]] = None
        self.grouped = False  # the loop turn's group is open
        self.group_size = 0  # the changes in it (statements, and transactions as one)
        self.group_unindexed = 0  # how many of unindexed were there when it opened
        self.alone_until = 0.0  # monotonic time until which each write commits alone (after a loss)
        try:
            if path != ":memory:" and not os.path.exists(path):
                # Create the file ourselves so that it is private from the first byte;
                # SQLite gives its -wal and -shm files the same mode.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                      timeout=self.BUSY_MS / 1000)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer does it
            self.db.execute("PRAGMA secure_delete=ON")  # what a delete frees is zeroed, not left behind
            with self.transaction():  # proves we can write, now rather than mid-chat
                for statement in self.SCHEMA:
                    added = re.match(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", statement)
                    if added and self._has_column(*added.groups()):
                        continue
                    self.db.execute(statement)
                if not self._has_column("search", "conv"):
                    # First start with this search: index what is already there, once.
                    self.db.execute("DROP TABLE IF EXISTS search")
                    for statement in self.SEARCH:
                        self.db.execute(statement)
                # Words of the newest messages may not have reached the index
                # (they are written in batches, and the process was killed): now.
                self.db.execute(self.SEARCH[1] + " WHERE id > (SELECT coalesce(max(rowid), 0) FROM search)")
                # Ids never go back, even when the newest messages were forgotten with their room.
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('last_id', (SELECT coalesce(max(id), 0) FROM messages))")
                # The epoch names this database: message ids count within it, so a
                # client that saw ids from another (deleted, or :memory:) must start over.
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
            self.epoch: str = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot use database {path!r}: {e}") from None
        self.unindexed: dict[int, tuple[Optional[str], str]] = {}  # message id -> (its words, its conversation)
        self.indexing: Optional[object] = None  # the timer of the next index_pending
        self.closed = False
        self.checkpointer = Checkpointer(path)

    def _has_column(self, table: str, column: str) -> bool:
        return any(row[1] == column for row in self.db.execute(f"PRAGMA table_info({table})"))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All the writes inside commit together, or none of them do: a
        savepoint within the loop turn's group, or a transaction of its own."""
        if not self._group():
            with self._alone():
                yield
            return
        self.db.execute("SAVEPOINT change")
        try:
            yield
            self.db.execute("RELEASE change")
            self.group_size += 1
        except BaseException as failure:
            try:
                self.db.execute("ROLLBACK TO change")  # this change only: the group's others stay
                self.db.execute("RELEASE change")
            except sqlite3.Error:  # SQLite had undone the whole group (a full disk), not just this
                self._lose(failure)
            raise

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        """A transaction of its own, committed before it returns."""
        started = time.perf_counter()
        self.db.execute("BEGIN IMMEDIATE")  # takes the write lock now: fails fast, never half-way
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        finally:
            Metrics.wrote(time.perf_counter() - started)

    def write(self, sql: str, args: tuple) -> None:
        """One statement that changes something: in the loop turn's group, in
        the transaction it is in, or committed by itself."""
        if self._group():
            try:
                self.db.execute(sql, args)
            except sqlite3.Error as e:
                if not self.db.in_transaction:  # SQLite undid the whole group (a full disk), not just this
                    self._lose(e)
                raise
            self.group_size += 1
            return
        if self.db.in_transaction:
            self.db.execute(sql, args)
            return
        started = time.perf_counter()
        try:
            self.db.execute(sql, args)
        finally:
            Metrics.wrote(time.perf_counter() - started)

    # ---- group commit: a loop turn's writes commit together

    def _group(self) -> bool:
        """Whether writes go into the loop turn's group now; opens it at the
        turn's first write, and asks for its commit at the turn's end."""
        if self.grouped:
            return True
        if self.on_lost is None or self.db.in_transaction or time.monotonic() < self.alone_until:
            return False
        self.db.execute("BEGIN IMMEDIATE")  # another process's lock fails this write alone, as ever
        self.grouped = True
        self.group_size = 0
        self.group_unindexed = len(self.unindexed)
        tornado.ioloop.IOLoop.current().add_callback(self.sync)
        return True

    def sync(self) -> bool:
        """Commit the group: at the end of the loop turn, and before any
        frame is written (Outbox.flush), so what a client is told is on
        disk. False if it was lost (then on_lost has run)."""
        if not self.grouped:
            return True
        started = time.perf_counter()
        try:
            if not self.db.in_transaction:
                raise sqlite3.OperationalError("SQLite rolled the group back")
            self._commit()
        except sqlite3.Error as e:
            return not self._lose(e)
        finally:
            Metrics.wrote(time.perf_counter() - started)
        self.grouped = False
        return True

    def _commit(self) -> None:
        self.db.execute("COMMIT")

    def _lose(self, error: BaseException) -> bool:
        """The group is gone (its commit failed, or SQLite rolled it back).
        If it held changes (not just the write that failed, which is refused
        as it would be alone): forget them here, write alone for LOST_ALONE
        seconds (a disk that stays full then refuses one change at a time),
        and tell the Hub, whose live state has them. Whether it held any."""
        self.grouped = False
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        if not self.group_size:
            return False
        for id in list(self.unindexed)[self.group_unindexed:]:
            del self.unindexed[id]  # their ids will be given again, to other messages
        self.alone_until = time.monotonic() + self.LOST_ALONE
        log.error("the database lost the changes of a moment (%s); writing each change alone for %g s",
                  error, self.LOST_ALONE)
        if self.on_lost is not None:
            self.on_lost()
        return True

    def load(self) -> dict:
        """Everything the live state starts from (room histories are read when needed)."""
        q = self.db.execute
        return {
            "users": q("SELECT key, name FROM users").fetchall(),
            "devices": q("SELECT token_hash, user, id FROM devices").fetchall(),
            "rooms": dict(q("SELECT key, name FROM rooms").fetchall()),
            "members": q("SELECT room, user FROM members").fetchall(),
            "mail": dict(q("SELECT recipient, count(*) FROM messages WHERE delivered = 0 GROUP BY recipient")),
            # Ids never go back: the newest may have been forgotten with their room.
            "last_id": q("SELECT max(coalesce((SELECT max(id) FROM messages), 0),"
                         " coalesce((SELECT max(id) FROM events), 0),"
                         " (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'last_id'))").fetchone()[0],
        }

    # ---- writes

    def add_user(self, user: str, name: str, token_hash: str) -> None:
        self.write("INSERT INTO users VALUES (?, ?, ?)", (user, name, token_hash))

    def add_device(self, user: str, token_hash: str, label: str, now: str, id: Optional[int] = None) -> int:
        """A new device (token) of user; its id (given, with --redis)."""
        self.write("INSERT INTO devices (id, user, token_hash, label, last_used) VALUES (?, ?, ?, ?, ?)",
                   (id, user, token_hash, label, now))
        return self.db.execute("SELECT id FROM devices WHERE token_hash = ?", (token_hash,)).fetchone()[0]

    def touch_device(self, id: int, now: str) -> None:
        self.write("UPDATE devices SET last_used = ? WHERE id = ?", (now, id))

    def drop_device(self, id: int) -> None:
        self.write("DELETE FROM devices WHERE id = ?", (id,))

    def devices(self, user: str) -> list[tuple[int, str, str]]:
        """(id, label, last used) of each of user's devices."""
        return self.db.execute("SELECT id, label, last_used FROM devices WHERE user = ? ORDER BY id",
                               (user,)).fetchall()

    def set_read(self, user: str, conv: str, id: int) -> bool:
        """Move user's read marker in conv forward to id; False if it was there already."""
        return self.db.execute(
            "INSERT INTO reads VALUES (?, ?, ?) ON CONFLICT (user, conv) DO UPDATE SET id = excluded.id"
            " WHERE excluded.id > reads.id", (user, conv, id)).rowcount > 0

    def reads(self, user: str) -> dict[str, int]:
        """user's read markers by conversation ("#room", "@user")."""
        return dict(self.db.execute("SELECT conv, id FROM reads WHERE user = ?", (user,)))

    def release(self, user: str) -> bool:
        """Free a name: its devices, memberships and markers go. Its messages
        stay, as written, but no longer belong to the key: whoever claims
        the name next can neither read its private messages nor edit them."""
        former = f"~released~{secrets.token_hex(4)}~{user}"  # not a name: nobody can ever claim it
        self.index_pending()
        with self.transaction():
            found = self.db.execute("DELETE FROM users WHERE key = ?", (user,)).rowcount > 0
            for table, column in (("devices", "user"), ("members", "user"), ("reads", "user")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (user,))
            for table, column in (("messages", "sender"), ("messages", "recipient"), ("events", "party1"),
                                  ("events", "party2")):
                self.db.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (former, user))
            # Whole words only: another name's word may start with this one's ("u6162" in "u61626279").
            self.db.execute("UPDATE search SET conv = trim(replace(' ' || conv || ' ', ?, ?))",
                            (f" {conv_word('u', user)} ", f" {conv_word('u', former)} "))
        return found

    def add_room(self, room: str, name: str) -> None:
        self.write("INSERT INTO rooms VALUES (?, ?)", (room, name))

    def drop_room(self, room: str) -> None:
        """Forget a room and its messages (it has no members)."""
        self.index_pending()
        with self.transaction():
            self.db.execute("UPDATE meta SET value = max(CAST(value AS INTEGER), (SELECT coalesce(max(id), 0)"
                            " FROM messages), (SELECT coalesce(max(id), 0) FROM events)) WHERE key = 'last_id'")
            self.db.execute("DELETE FROM search WHERE rowid IN (SELECT id FROM messages WHERE room = ?)", (room,))
            self.db.execute("DELETE FROM messages WHERE room = ?", (room,))
            self.db.execute("DELETE FROM events WHERE room = ?", (room,))
            self.db.execute("DELETE FROM members WHERE room = ?", (room,))
            self.db.execute("DELETE FROM rooms WHERE key = ?", (room,))

    def set_member(self, room: str, user: str, member: bool) -> None:
        if member:
            self.write("INSERT OR IGNORE INTO members VALUES (?, ?)", (room, user))
        else:
            self.write("DELETE FROM members WHERE room = ? AND user = ?", (room, user))

    def add_message(self, id: int, room: Optional[str], sender: str, recipient: Optional[str],
                    delivered: bool, payload: bytes, cid: Optional[str], text: str,
                    reply_to: Optional[int] = None) -> None:
        """A message, committed with its loop turn's group. Its words go to
        the search index within INDEX_EVERY, many messages in one
        transaction: one at a time, FTS5 would cost a message 100 µs more
        (see index_pending)."""
        self.write("INSERT INTO messages (id, room, sender, recipient, delivered, frame, cid, reply_to)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (id, room, sender, recipient, int(delivered), payload.decode(), cid, reply_to))
        conv = conv_word("r", room) if room is not None else f"{conv_word('u', sender)} {conv_word('u', recipient)}"
        self.unindexed[id] = (text, conv)
        if self.indexing is None:
            self.indexing = tornado.ioloop.IOLoop.current().call_later(INDEX_EVERY, self._index_later)

    def index_pending(self) -> None:
        """Write the words of the messages stored since the last time, in one
        transaction. Whatever reads or changes the index calls this first, so
        it never misses a stored message; if the process dies first, the
        next start indexes what is missing."""
        if not self.unindexed:
            return
        if not self.sync():  # the group first, then the index alone: never lost with a group
            raise sqlite3.OperationalError("the database lost the changes of a moment")
        rows = [(id, text, conv) for id, (text, conv) in self.unindexed.items()]
        with self._alone():
            self.db.executemany("INSERT INTO search (rowid, text, conv) VALUES (?, ?, ?)", rows)
        self.unindexed.clear()

    def _index_later(self) -> None:
        self.indexing = None
        try:
            self.index_pending()
        except sqlite3.Error as e:  # locked: they wait for the next message, search or close
            log.warning("search index not updated yet: %s", e)

    # ---- changes to a message: call them inside transaction(), with add_event

    def rewrite(self, id: int, payload: bytes, text: Optional[str] = None) -> None:
        """A message's new current state (and its new words, for an edit)."""
        self.write("UPDATE messages SET frame = ? WHERE id = ?", (payload.decode(), id))
        if text is not None:
            self.write("UPDATE search SET text = ? WHERE rowid = ?", (text, id))

    def erase(self, id: int, payload: bytes) -> None:
        """A message becomes its tombstone: the text goes from its row, from
        search, and from the events that carried it (all its earlier ones:
        a client that missed them needs only the deletion)."""
        self.write("UPDATE messages SET frame = ?, reply_to = NULL WHERE id = ?", (payload.decode(), id))
        self.write("DELETE FROM search WHERE rowid = ?", (id,))
        self.write("DELETE FROM events WHERE target = ?", (id,))

    def drop_edits(self, target: int) -> None:
        """Forget a message's earlier edits (a new one holds all a client needs)."""
        self.write("DELETE FROM events WHERE target = ? AND json_extract(frame, '$.type') = 'edited'", (target,))

    def add_event(self, id: int, message: Stored, payload: bytes) -> None:
        self.write("INSERT INTO events (id, room, party1, party2, target, frame) VALUES (?, ?, ?, ?, ?, ?)",
                   (id, message.room, message.sender if message.room is None else None, message.recipient,
                    message.id, payload.decode()))

    def mark_delivered(self, ids: list) -> list[tuple[int, str]]:
        """(id, sender key) of those of ids that were waiting, and now are not."""
        with self.transaction():  # one commit for a whole mailbox, not one per message
            marks = ",".join("?" * len(ids)) or "NULL"
            waiting = self.db.execute(f"SELECT id, sender FROM messages WHERE id IN ({marks}) AND delivered = 0"
                                      " ORDER BY id", ids).fetchall()
            self.db.executemany("UPDATE messages SET delivered = 1 WHERE id = ?", [(i,) for i, _ in waiting])
        return waiting

    # ---- reads, each an indexed search

    def _rows(self, sql: str, args: tuple) -> list[Row]:
        return [(i, f.encode(), s, r, d) for i, f, s, r, d in self.db.execute(sql, args)]

    def message(self, id: int) -> Optional[Stored]:
        found = self.db.execute("SELECT id, room, sender, recipient, frame FROM messages WHERE id = ?",
                                (id,)).fetchone()
        return Stored(*found[:4], json.loads(found[4])) if found else None

    def replies(self, id: int) -> list[tuple[int, dict]]:
        """(id, frame) of the messages that reply to message id."""
        return [(i, json.loads(f)) for i, f in
                self.db.execute("SELECT id, frame FROM messages WHERE reply_to = ?", (id,))]

    def changes(self, user: str, rooms: list[str], since: int, limit: int) -> list[bytes]:
        """The newest `limit` change events after since, newest first, to
        messages up to since (a newer message is sent in its current state):
        in `rooms`, and to user's own private messages."""
        marks = ",".join("?" * len(rooms)) or "NULL"
        # Three indexed searches rather than one OR, which SQLite may answer by scanning.
        return [f.encode() for _, f in self.db.execute(
            f"SELECT * FROM (SELECT id, frame FROM events WHERE room IN ({marks}) AND id > ? AND target <= ?"
            " ORDER BY id DESC LIMIT ?)"
            " UNION SELECT * FROM (SELECT id, frame FROM events WHERE room IS NULL AND party1 = ? AND id > ?"
            " AND target <= ? ORDER BY id DESC LIMIT ?)"
            " UNION SELECT * FROM (SELECT id, frame FROM events WHERE room IS NULL AND party2 = ? AND id > ?"
            " AND target <= ? ORDER BY id DESC LIMIT ?) ORDER BY id DESC LIMIT ?",
            (*rooms, since, since, limit, user, since, since, limit, user, since, since, limit, limit))]

    def by_cid(self, sender: str, cid: str) -> Optional[Row]:
        rows = self._rows(f"SELECT {self.COLUMNS} FROM messages WHERE sender = ? AND cid = ?", (sender, cid))
        return rows[0] if rows else None

    def room_page(self, room: str, before: Optional[int], limit: int) -> list[Row]:
        """The newest `limit` messages of a room below `before`, newest first."""
        return self._rows(f"SELECT {self.COLUMNS} FROM messages WHERE room = ? AND id < ?"
                          " ORDER BY id DESC LIMIT ?", (room, before or 2**63 - 1, limit))

    def room_has(self, room: str, after: int, before: int) -> bool:
        """Whether the room has a message with after < id < before."""
        return self.db.execute("SELECT 1 FROM messages WHERE room = ? AND id > ? AND id < ? LIMIT 1",
                               (room, after, before)).fetchone() is not None

    def direct_page(self, user: str, other: Optional[str], before: Optional[int], after: int,
                    limit: int) -> list[Row]:
        """The newest `limit` private messages of user with after < id < before,
        newest first: those with `other`, or all of them when other is None."""
        sent = "sender = ?" + (" AND recipient = ?" if other else "")
        got = "recipient = ?" + (" AND sender = ?" if other else "")
        args = (user, other) if other else (user,)
        window = (after, before or 2**63 - 1)
        # Two indexed searches rather than one OR, which SQLite may answer by scanning.
        rows = self._rows(
            f"SELECT * FROM (SELECT {self.COLUMNS} FROM messages WHERE room IS NULL AND {sent}"
            " AND id > ? AND id < ? ORDER BY id DESC LIMIT ?)"
            f" UNION SELECT * FROM (SELECT {self.COLUMNS} FROM messages WHERE room IS NULL AND {got}"
            " AND id > ? AND id < ? ORDER BY id DESC LIMIT ?) ORDER BY id DESC LIMIT ?",
            (*args, *window, limit, *args, *window, limit, limit))
        return rows

    def search(self, user: str, rooms: list[str], words: list[str], before: Optional[int],
               limit: int) -> list[Row]:
        """The newest `limit` messages below `before` holding every word, newest
        first: in `rooms` and user's own private messages, nobody else's."""
        self.index_pending()
        # Each word quoted, so FTS5 syntax cannot sneak in; the conversations
        # as their words, so the index only ever looks at the asker's.
        convs = " OR ".join([conv_word("r", r) for r in rooms] + [conv_word("u", user)])
        match = "text : (%s) AND conv : (%s)" % (" AND ".join('"%s"' % w for w in words), convs)
        return self._rows(
            "SELECT m.id, m.frame, m.sender, m.recipient, m.delivered FROM search JOIN messages m ON m.id = search.rowid"
            " WHERE search MATCH ? AND search.rowid < ? ORDER BY search.rowid DESC LIMIT ?",
            (match, before or 2**63 - 1, limit))

    def mail(self, user: str, limit: int) -> list[Row]:
        """The newest `limit` private messages still waiting for user, newest first."""
        return self._rows(f"SELECT {self.COLUMNS} FROM messages WHERE recipient = ? AND delivered = 0"
                          " ORDER BY id DESC LIMIT ?", (user, limit))

    def mail_count(self, user: str) -> int:
        return self.db.execute("SELECT count(*) FROM messages WHERE recipient = ? AND delivered = 0",
                               (user,)).fetchone()[0]

    def adopt_epoch(self, epoch: str) -> None:
        """Count ids in a data set named elsewhere (with --redis: in Redis)."""
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
        self.epoch = epoch

    def close(self) -> None:
        """Commit, index what waits, finish erasing, fold the WAL back into the database file and close it."""
        if self.closed:
            return
        self.closed = True
        self.on_lost = None  # stopping: a last commit that fails has nothing left to take back
        self.sync()
        if self.indexing is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self.indexing)
            self.indexing = None
        try:
            self.index_pending()
        except sqlite3.Error as e:  # the next start indexes them
            log.warning("search index not updated at shutdown: %s", e)
        self.checkpointer.stop(self.db)
        self.db.close()


class Checkpointer:
    """A Store's thread of its own, with its own connection: it folds the
    WAL into the database every EVERY seconds (PASSIVE never blocks the
    server's writes), and erases deleted text when a delete asks: it merges
    the search index ('optimize'), which drops the deleted words, and
    checkpoints with TRUNCATE, which drops the WAL's old copies of pages;
    once for many deletes. stop() runs it once more, and does itself what
    the thread could not. For :memory: there is no thread: nothing is on
    disk to erase."""

    EVERY = 1.0  # seconds

    def __init__(self, path: str) -> None:
        self.path = path
        self.stopping = threading.Event()
        self.wake = threading.Event()  # its alarm: stopping, or text to erase
        self.erasing = threading.Condition()  # guards asked and erased
        self.asked = 0  # deletes committed that want erasing
        self.erased = 0  # of those, how many are erased from the index and the WAL
        self.thread: Optional[threading.Thread] = None
        if path != ":memory:":
            self.thread = threading.Thread(target=self.run, name="checkpoint", daemon=True)
            self.thread.start()

    def run(self) -> None:
        """The thread, with its own connection. Runs once more when stopping."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA secure_delete=ON")
            while True:
                self.wake.wait(self.EVERY)
                self.wake.clear()
                try:
                    if not self.erase(db):
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError as e:
                    if e.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                        raise
                    log.warning("checkpoint of %s put off: %s", self.path, e)  # the next turn tries again
                if self.stopping.is_set():
                    break
        except sqlite3.Error as e:
            log.warning("checkpoints of %s stopped: %s", self.path, e)
        finally:
            db.close()

    def erase(self, db: sqlite3.Connection) -> bool:
        """If deletes wait to be erased: merge the search index (which drops
        their words) and checkpoint the WAL away. Whether it tried."""
        with self.erasing:
            asked = self.asked
        if asked <= self.erased:
            return False
        db.execute("INSERT INTO search (search) VALUES ('optimize')")
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:  # else a reader held old pages: the next turn tries again
            with self.erasing:
                self.erased = asked
                self.erasing.notify_all()
        return True

    def erase_soon(self) -> None:
        """A delete was committed: erase its text from the index and the WAL
        in the background (many deletes in a moment cost one merge)."""
        with self.erasing:
            self.asked += 1
            if self.thread is None:  # :memory: has no file to erase from
                self.erased = self.asked
        self.wake.set()

    def wait_erased(self, timeout: Optional[float] = None) -> bool:
        """Block until every delete committed so far is erased; False on timeout."""
        with self.erasing:
            asked = self.asked
            return self.erasing.wait_for(lambda: self.erased >= asked, timeout)

    def stop(self, db: sqlite3.Connection) -> None:
        """Stop the thread after one more turn; then, on the Store's own
        connection, erase or checkpoint what it could not."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join()
        try:
            if not self.erase(db):  # the thread could not finish: do it here
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("checkpoint of %s failed: %s", self.path, e)


def conv_word(kind: str, key: str) -> str:
    """A conversation as one word for the search index: "r" + a room key or
    "u" + a user key, in hex (a word of letters and digits only, as SQL's
    hex() writes it)."""
    return kind + key.encode().hex().upper()


def token_hash(token: str) -> str:
    """What is stored instead of a token. Tokens are 192 random bits, so a
    plain SHA-256 cannot be reversed by guessing; no salt or slow hash needed."""
    return hashlib.sha256(token.encode()).hexdigest()


class History:
    """Each room's newest --history messages, as the JSON they were sent as,
    for joins and connects: encoded once, never again.

    Only recently used rooms are held, up to HISTORY_CACHE bytes in all; a
    room that is not held is read from the Store (an indexed search) when it
    is next needed. So RAM does not grow with the number of rooms, and a
    join costs a list join, not an encoding of the whole history.
    """

    def __init__(self, store: Store, size: int, cap: int = HISTORY_CACHE) -> None:
        self.store, self.size, self.cap = store, size, cap
        self.rooms: collections.OrderedDict[str, list[tuple[int, bytes]]] = collections.OrderedDict()
        self.bytes = 0  # payload bytes held in all

    def get(self, room: str) -> list[tuple[int, bytes]]:
        """The room's newest messages as (id, payload), oldest first."""
        held = self.rooms.get(room)
        if held is None:
            rows = self.store.room_page(room, None, self.size) if self.size > 0 else []
            held = self.rooms[room] = [(id, payload) for id, payload, *_ in reversed(rows)]
            self.bytes += sum(len(p) for _, p in held)
            self._evict()
        self.rooms.move_to_end(room)
        return held

    def add(self, room: str, id: int, payload: bytes) -> None:
        """A message was stored in the room (if the room is not held, the
        next get() reads it from the Store with the rest)."""
        held = self.rooms.get(room)
        if held is None:
            return
        held.append((id, payload))
        self.bytes += len(payload)
        while len(held) > self.size:
            self.bytes -= len(held.pop(0)[1])
        self._evict()

    def replace(self, room: str, id: int, payload: bytes) -> None:
        """A held message changed (edited, deleted, reacted to): its new payload."""
        held = self.rooms.get(room)
        if not held:
            return
        at = bisect.bisect_left(held, id, key=lambda m: m[0])  # held in id order
        if at < len(held) and held[at][0] == id:
            self.bytes += len(payload) - len(held[at][1])
            held[at] = (id, payload)
            self._evict()

    def drop(self, room: str) -> None:
        held = self.rooms.pop(room, None)
        if held is not None:
            self.bytes -= sum(len(p) for _, p in held)

    def _evict(self) -> None:
        while self.bytes > self.cap and len(self.rooms) > 1:
            _, held = self.rooms.popitem(last=False)
            self.bytes -= sum(len(p) for _, p in held)


################ Live state


class User:
    """An owned name. Its tokens, one per device, are in Hub.devices."""

    __slots__ = ("name", "rooms")

    def __init__(self, name: str) -> None:
        self.name = name  # as first written
        self.rooms: set[str] = set()  # room keys; changed only by Hub.set_member


class Room:
    """A room: who belongs to it. Its recent messages are in History."""

    __slots__ = ("name", "members", "names", "roster", "empty_since", "here")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[str] = set()  # user keys; changed only by Hub.set_member
        # The member list as clients see it, refreshed by Announcer.flush with the
        # member frames that tell the change: every name sorted, and the
        # first --roster of them encoded once for every joined frame.
        self.names: list[str] = []
        self.roster = b"[]"
        self.empty_since: Optional[float] = time.monotonic()  # when the last member left; None while it has members
        # Its members' connections here, kept in step as they come and go and
        # as members join and leave (Hub._here): a message to the room walks
        # no member list, and a connect rebuilds nothing.
        self.here: dict[ChatSocket, None] = {}


def sorted_names(names: Iterable[str]) -> list[str]:
    """Names in the order clients are sent them: case-insensitively."""
    return sorted(names, key=key)


def resorted(names: list[str], came: list[str], went: list[str]) -> list[str]:
    """A sorted list of names with went taken out and came put in (each
    name once, even if it was already there). Sorting a list that is
    sorted but for a few names at its end costs about one pass over it: with
    10,000 online this is a quarter of sorting them afresh, every batch."""
    if went or came:
        gone = set(went).union(came)
        names = [name for name in names if name not in gone]
    return sorted(names + came, key=key)


def page_after(names: list[str], after: Any, size: int) -> tuple[list[str], bool]:
    """The names of a sorted list that come after `after` (None: from the
    start), at most size of them, and whether more follow."""
    start = 0 if after is None else bisect.bisect_right(names, key(check_name(after, "bad_request")), key=key)
    return names[start:start + size], start + size < len(names)


def roster_with(names: list[str], roster: bytes, me: str, size: int) -> tuple[bytes, int]:
    """The encoded roster (the first `size` of the sorted `names`) and how
    many names it stands for, with `me` counted and in its place if it is
    missing: a list refreshed before me arrived or joined. Costs a copy of
    at most `size` names, only when needed. The count is of the same moment
    as the names, so a client adding the batches that follow counts right."""
    at = bisect.bisect_left(names, key(me), key=key)
    if at < len(names) and names[at] == me:
        return roster, len(names)
    if at >= size:
        return roster, len(names) + 1
    return encode_names((names[:at] + [me] + names[at:])[:size]), len(names) + 1


################ Outbox: one connection's write queue


class Outbox:
    """What one connection is owed, and how it gets written.

    Frames are queued whole, already framed (a frame many receive is
    encoded and framed once, and its bytes shared), and written once per
    loop turn by flush_all: a burst of messages costs one system call per
    connection, not one per message. Writing goes straight to the kernel
    while it takes it (send_now); what it does not take goes through the
    stream, one write in flight at a time, and what piles up meanwhile
    waits here, counted.

    The backpressure policy reads as one line where it is used:
    ``if not outbox.push(wire, payload, bulk): close(1013)``. push() refuses
    when the connection owes more than --max_queue bytes while a write is
    in flight (the kernel holds all it will, and the reader is not taking
    more), not counting the answers it asked for ("bulk": its connect
    sequence, joins and histories, each bounded by --max_queue; after the
    connect sequence only --max_queue bytes of them count as asked for at a
    time, so a client that asks and never reads is cut off too).
    """

    dirty: ClassVar[list[Outbox]] = []  # outboxes with frames to write this loop turn

    __slots__ = ("handler", "stream", "limit", "out", "owed", "pushed", "writing", "closed", "bulk",
                 "bulk_cap", "written_at")

    def __init__(self, handler: tornado.websocket.WebSocketHandler, limit: int) -> None:
        self.handler = handler  # for the fallback, Tornado's write_message()
        self.stream = raw_stream(handler)  # None: the fallback
        self.limit = limit  # --max_queue
        self.out: list[bytes] = []  # whole wire frames waiting (a list: a deque costs 600 bytes more)
        self.owed = 0  # bytes queued or being written
        self.pushed = 0  # bytes ever queued; with owed, where each byte stands in line
        self.writing = False  # a stream write is in flight
        self.closed = False  # nothing more is written
        self.bulk: list[list[int]] = []  # [start, end) of answers it asked for, not yet all written
        self.bulk_cap = float("inf")  # bulk bytes it may be owed at once: the connect sequence bounds itself
        self.written_at = 0.0  # when a write the kernel held back was taken: the reader is alive

    def push(self, wire: bytes, payload: bytes, bulk: bool = False) -> bool:
        """Queue one frame; False when the reader has stopped reading.
        (push_many writes out the usual path of this for speed: they agree.)"""
        if self.closed:
            return True
        size = len(wire)
        start = self.pushed
        self.pushed = start + size
        self.owed += size
        if bulk:
            self._asked(start, size)
        if self.stream is None:
            return self._fallback(payload, size)
        out = self.out
        out.append(wire)
        if self.writing:
            return self._within_limit()
        if len(out) == 1:
            dirty = Outbox.dirty
            if not dirty:
                tornado.ioloop.IOLoop.current().add_callback(Outbox.flush_all)
            dirty.append(self)
        return True

    @classmethod
    def push_many(cls, connections: Sequence[ChatSocket], wire: bytes, payload: bytes,
                  bulk: bool = False) -> list[ChatSocket]:
        """push() the same frame to each connection; those whose reader has
        stopped. A message to a room of 200 is 200 pushes, and a call each
        was half their cost: the usual case (an open raw stream with no
        write in flight, not asked for) is written out here, as in push."""
        slow = []
        size = len(wire)
        dirty = cls.dirty
        for connection in connections:
            outbox = connection.outbox
            if bulk or outbox.writing or outbox.closed or outbox.stream is None:
                if not outbox.push(wire, payload, bulk):
                    slow.append(connection)
                continue
            outbox.pushed += size
            outbox.owed += size
            out = outbox.out
            out.append(wire)
            if len(out) == 1:
                if not dirty:
                    tornado.ioloop.IOLoop.current().add_callback(Outbox.flush_all)
                dirty.append(outbox)
        return slow

    def _asked(self, start: int, size: int) -> None:
        """Bytes [start, start + size) answer the connection's own request."""
        if self._bulk_owed() + size <= self.bulk_cap:
            if self.bulk and self.bulk[-1][1] == start:
                self.bulk[-1][1] = start + size  # one range for a whole connect sequence
            else:
                self.bulk.append([start, start + size])

    def _fallback(self, payload: bytes, size: int) -> bool:
        """Tornado frames and writes it (see raw_stream), once what it says is committed."""
        if not Hub.store.sync():
            return True
        try:
            future = self.handler.write_message(payload)
        except tornado.websocket.WebSocketClosedError:
            return True
        future.add_done_callback(lambda f: self._written(size))
        return self._within_limit()

    def _within_limit(self) -> bool:
        """Whether what it owes, its own answers aside, is within --max_queue."""
        return self.owed - self._bulk_owed() <= self.limit

    @classmethod
    def flush_all(cls) -> None:
        """Each outbox owed frames gets them in one write."""
        dirty, cls.dirty = cls.dirty, []
        for outbox in dirty:
            outbox.flush()

    def flush(self) -> None:
        """Write what is queued: straight to the kernel while it takes it, at
        most WRITE_CHUNK bytes at a time, the rest through the stream. What
        it says is committed first (Store.sync); if that failed, the Hub has
        closed the connections the lost changes concern."""
        if not Hub.store.sync():
            return
        while not self.writing and not self.closed and self.out:
            data = self._take(WRITE_CHUNK)
            sent = send_now(self.stream, data)
            self._paid(sent)
            if sent < len(data):
                self._write_rest(data[sent:])

    def _take(self, limit: int) -> bytes:
        """Whole frames from the front of out, joined: all of them when they
        fit in limit (the usual case), else as many as fit, at least one.
        Never part of a frame: Tornado writes its own control frames (a pong,
        a close) to the same stream, and they must fall between ours."""
        out = self.out
        if self.owed <= limit:  # not writing, so everything owed is in out
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            return data
        count, size = 1, len(out[0])
        while count < len(out) and size + len(out[count]) <= limit:
            size += len(out[count])
            count += 1
        data = out[0] if count == 1 else b"".join(out[:count])
        del out[:count]
        return data

    def _write_rest(self, data: bytes) -> None:
        """What the kernel did not take goes through the stream, which writes
        it when the socket has room; _written then carries on."""
        try:
            future = self.stream.write(data)
        except tornado.iostream.StreamClosedError:
            self.closed = True
            return
        if not self.stream.writing():
            self._paid(len(data))
            return
        self.writing = True
        future.add_done_callback(lambda f, n=len(data): self._written(n))

    def _paid(self, n: int) -> None:
        """n more bytes reached the kernel (they were owed first in, first out)."""
        self.owed -= n
        done = self.pushed - self.owed  # bytes written so far
        while self.bulk and self.bulk[0][1] <= done:
            self.bulk.pop(0)

    def _bulk_owed(self) -> int:
        """Bytes of answers it asked for that are not written yet."""
        if not self.bulk:
            return 0
        done = self.pushed - self.owed
        return sum(end - max(start, done) for start, end in self.bulk)

    def _written(self, n: int) -> None:
        self._paid(n)
        self.writing = False
        # A write that had to wait is done: the peer is reading, so it is
        # alive even if its pong is still queued behind a big answer.
        self.written_at = time.monotonic()
        if self.out:
            self.flush()

    def close(self, drain: bool) -> None:
        """Write nothing more; with drain, first hand what is queued (an error
        frame saying why) to the stream, to go before the close frame."""
        if drain and self.out and not self.closed and self.stream is not None and Hub.store.sync():
            with contextlib.suppress(tornado.iostream.StreamClosedError):
                self.stream.write(b"".join(self.out))
        self.out.clear()
        self.closed = True


def send_to(connections: Iterable[ChatSocket], frame: Optional[dict], payload: Optional[bytes] = None,
            bulk: bool = False) -> None:
    """One frame (or its payload, already encoded) to many connections:
    encoded and framed once, the same bytes pushed into each one's Outbox.
    A bulk frame answers the connection's own request (see Outbox)."""
    payload = payload or encode(frame)
    wire = ws_frame(payload)
    # A snapshot: a connection closed on the way (1013) leaves the live sets.
    connections = tuple(connections)
    for connection in Outbox.push_many(connections, wire, payload, bulk):
        connection.too_slow()
    Metrics.sent(frame["type"] if frame else payload_type(payload), len(connections))


def payload_type(payload: bytes) -> str:
    """The type of a frame built as bytes: every builder puts it first."""
    return payload[9:payload.index(b'"', 9)].decode() if payload.startswith(b'{"type":"') else "?"


################ Backplane: where a change gets its id and becomes durable


class Ready:
    """What a commit returns in one process: an awaitable that is already
    done. Awaiting it returns at once, with no task and no loop turn, so a
    handler of the single-process server costs what a plain call does."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Iterator[Any]:
        return self.value
        yield  # never reached: it makes this a generator, so await returns at once


def finish(coroutine: Any) -> None:
    """Run a coroutine that cannot wait (all it awaits is Ready) to its end, now."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a handler waited in the single-process server")


class Backplane:
    """The single-process backplane. commit() gives an event its id (the
    kinds clients have always seen ids for: messages and their changes),
    applies it at once (Hub.apply writes the Store first, so a change is
    durable before anything is sent or acked) and returns the result Ready.
    Link codes are kept here, in RAM, for LINK_SECONDS.

    chat_redis.RedisBackplane has the same methods and waits = True: there
    a Lua script gives every event an id and appends it to the shared log,
    and each process's read loop applies it.
    """

    waits = False  # whether commit() may really wait (then ChatSocket runs handlers as tasks)
    healthy = True  # False while the backplane cannot take changes (then connects are refused)
    node = "local"  # this process, as presence and read events name it
    NUMBERED = frozenset({"message", "direct", "edit", "delete", "react"})

    def __init__(self) -> None:
        self.links: dict[str, tuple[str, float]] = {}  # code -> (user key, monotonic expiry)

    def commit(self, event: dict) -> Any:
        if event["kind"] in self.NUMBERED:
            event["id"] = Hub.next_id()
        return Ready(Hub.apply(event))

    def signal(self, event: dict) -> None:
        """A change that is not kept (typing): applied now, in every process."""
        Hub.apply(event)

    def presence(self, user: str, on: bool, device: Optional[int]) -> None:
        """This process got user's first connection (on), or lost its last."""
        Hub.apply({"kind": "presence", "user": user, "node": self.node, "on": on, "device": device,
                   "at": utc_iso(time.time())})

    def put_link(self, code: str, user: str, seconds: float) -> Ready:
        """A user has one code at a time: a new one replaces the last."""
        self.drop_link(user)
        self.links[code] = (user, time.monotonic() + seconds)
        return Ready(None)

    def take_link(self, code: str) -> Ready:
        """The user a live code signs in as, or None; it is used up either way."""
        found = self.links.pop(code, None)
        return Ready(found[0] if found is not None and found[1] > time.monotonic() else None)

    def drop_link(self, user: str) -> None:
        for code in [c for c, (u, _) in self.links.items() if u == user]:
            del self.links[code]

    def sweep_links(self, now: float) -> None:
        for code in [c for c, (_, expires) in self.links.items() if expires <= now]:
            del self.links[code]

    def health(self) -> str:
        """"ok", or "degraded" while changes cannot be shared (load balancers route around it)."""
        return "ok"

    def caught_up(self) -> Ready:
        """Wait until this process has applied every change made so far (here: it has)."""
        return Ready(None)

    async def start(self) -> None:
        """Before the first connection (main): with --redis, load the state."""

    async def stop(self) -> None:
        """At shutdown, after the connections are closed."""


################ Hub: the shared state, and the one place it changes


class Hub:
    """The server's live state, in class-level dicts, and the methods that
    change it: each dict names the few that do.

    Every change is an event, and follows one path. A connection
    (ChatSocket) checks the client's rights and calls a method here, which
    builds the event and commits it to the backplane: there it gets its id
    and becomes durable. Then apply() runs it: the Store is written first,
    then the dicts, then the frames go out through send_to. With one
    process the backplane is Backplane, which applies at once; with --redis
    it is chat_redis.RedisBackplane, and every process applies every event
    from the shared log, in the same order. So apply_<kind> must decide
    from the event and the state alone: the same answer everywhere.

    Who is online and who is in which room is told to others in batches,
    by the Announcer.
    """

    conf: ClassVar[Config]
    store: ClassVar[Store]
    backplane: ClassVar[Backplane]  # where events get ids and become durable
    history: ClassVar[History]  # each room's recent messages, encoded
    budgets: ClassVar[Budgets]  # names per address, rooms per user, connects; changed by Budgets.take, sweep
    users: ClassVar[dict[str, User]] = {}  # user key -> owned name; changed by claim
    devices: ClassVar[dict[str, tuple[str, int]]] = {}  # token hash -> (user key, device id); changed by claim, add_device, revoke
    lookalikes: ClassVar[dict[str, str]] = {}  # skeleton(name) -> user key; changed by claim
    rooms: ClassVar[dict[str, Room]] = {}  # room key -> room; changed by apply_member, apply_claim, sweep
    online: ClassVar[dict[str, set[ChatSocket]]] = {}  # user key -> open connections here; changed by arrive, depart
    present: ClassVar[dict[str, frozenset[str]]] = {}  # user key -> the processes it has connections on; changed by apply_presence
    alone_on: ClassVar[dict[str, frozenset[str]]] = {}  # node -> {node}, one shared set for the users of one process
    leaving: ClassVar[dict[str, object]] = {}  # user key -> timer that tells others it left; changed by apply_presence, gone
    mailboxes: ClassVar[dict[str, int]] = {}  # user key -> private messages waiting in the Store; changed by apply_direct, apply_delivered
    per_ip: ClassVar[dict[str, int]] = {}  # address -> open connections; changed by arrive, depart
    last_id: ClassVar[int] = 0  # the highest event id given out or applied; changed by next_id, apply
    timers: ClassVar[list[tornado.ioloop.PeriodicCallback]] = []  # Liveness.ping_all and sweep

    @classmethod
    def load(cls, conf: Config, store: Store, backplane: Optional[Backplane] = None) -> None:
        """Start from what the Store holds (make_app: at start, and per test)."""
        state = store.load()
        cls.conf, cls.store = conf, store
        cls.backplane = backplane or Backplane()
        # One process: a loop turn's writes commit together (with --redis, Redis keeps them).
        store.on_lost = None if cls.backplane.waits else cls.lost
        cls.history = History(store, conf.history)
        cls.budgets = Budgets(conf)
        cls.users = {k: User(name) for k, name in state["users"]}
        cls.devices = {h: (user, id) for h, user, id in state["devices"]}
        cls.lookalikes = {}
        for k, user in cls.users.items():
            cls.lookalikes.setdefault(skeleton(user.name), k)
        cls.rooms = {k: Room(name) for k, name in state["rooms"].items()}
        for room, user in state["members"]:
            if room in cls.rooms and user in cls.users:
                cls.rooms[room].members.add(user)
                cls.rooms[room].empty_since = None
                cls.users[user].rooms.add(room)
        for room in cls.rooms.values():
            Announcer.set_members(room, sorted_names(cls.users[u].name for u in room.members))
        cls.mailboxes = state["mail"]
        loop = tornado.ioloop.IOLoop.current()
        for handle in cls.leaving.values():
            loop.remove_timeout(handle)
        cls.online, cls.present, cls.leaving, cls.per_ip = {}, {}, {}, {}
        Announcer.reset()
        for timer in cls.timers:
            timer.stop()
        cls.timers = []
        cls.last_id = state["last_id"]

    @classmethod
    def lost(cls) -> None:
        """The Store lost a loop turn's writes (Store.sync). Nobody was told
        of them, since frames are written only after the commit, but the
        dicts and the queued frames have them: every connection is closed
        (1011) with what it was owed, and the state is loaded again from
        the Store. Clients come back and resume with since; the page sends
        again what was not acked."""
        ChatSocket.close_all(1011, "server error", depart=False)
        cls.load(cls.conf, cls.store, cls.backplane)

    # ---- every change is an event: commit, then apply

    @classmethod
    def commit(cls, kind: str, **fields: Any) -> Any:
        """A change, as an event, to the backplane: it gets its id there and is
        made durable, then apply() runs it (in every process, with --redis).
        Await the result: what apply returned, or the ChatError it raised."""
        return cls.backplane.commit({"kind": kind, **fields})

    @classmethod
    def apply(cls, event: dict) -> Any:
        """The one place an event changes the state: the Store first, then the
        dicts, then the frames go out. Deterministic, so that every process
        applying the same events in the same order agrees (a ChatError here,
        such as a full mailbox, refuses the event everywhere)."""
        if event.get("id", 0) > cls.last_id:
            cls.last_id = event["id"]
        return getattr(cls, "apply_" + event["kind"])(event)

    # ---- names and devices

    @classmethod
    async def claim(cls, name: str, label: str, ip: str) -> tuple[User, str, int]:
        """A free name becomes this person's, with a first device (its token);
        they start in the default room. (user, token, device id)."""
        token = secrets.token_urlsafe(24)
        user, device = await cls.commit("claim", user=key(name), name=name, hash=token_hash(token), label=label,
                                        at=utc_iso(time.time()), room=cls.conf.default_room, ip=ip)
        return user, token, device

    @classmethod
    def apply_claim(cls, event: dict) -> tuple[User, int]:
        """The name, the device, the room (if new) and the membership commit together."""
        user_key, room_key, hashed = event["user"], key(event["room"]), event["hash"]
        with cls.store.transaction():
            cls.store.add_user(user_key, event["name"], hashed)
            device = cls.store.add_device(user_key, hashed, event["label"], event["at"], event.get("device"))
            if room_key not in cls.rooms:
                cls.store.add_room(room_key, event["room"])
            cls.store.set_member(room_key, user_key, True)
            cls.read_from_join(user_key, room_key)
        user = cls.users[user_key] = User(event["name"])
        cls.devices[hashed] = (user_key, device)
        cls.lookalikes.setdefault(skeleton(event["name"]), user_key)
        room = cls.rooms.get(room_key) or cls.rooms.setdefault(room_key, Room(event["room"]))
        cls.set_member(room, user_key, True)
        return user, device

    @classmethod
    def device_of(cls, token: Any) -> Optional[tuple[str, int]]:
        """(user key, device id) of a token, or None."""
        return cls.devices.get(token_hash(token)) if isinstance(token, str) else None

    @classmethod
    async def add_device(cls, user: str, label: str) -> tuple[str, int]:
        """A new device for user: (its token, its id)."""
        token = secrets.token_urlsafe(24)
        device = await cls.commit("device", user=user, hash=token_hash(token), label=label, at=utc_iso(time.time()))
        return token, device

    @classmethod
    def apply_device(cls, event: dict) -> int:
        device = cls.store.add_device(event["user"], event["hash"], event["label"], event["at"], event.get("device"))
        cls.devices[event["hash"]] = (event["user"], device)
        return device

    @classmethod
    async def revoke(cls, user: str, device: int) -> list[ChatSocket]:
        """Sign a device out: its token stops working, and so does any link
        code the user has out (the device may have made it). Returns the
        device's connections here, for the caller to close (4401) after its ack."""
        cls.backplane.drop_link(user)
        return await cls.commit("revoke", user=user, device=device, node=cls.backplane.node)

    @classmethod
    def apply_revoke(cls, event: dict) -> list[ChatSocket]:
        cls.store.drop_device(event["device"])
        for hashed in [h for h, (u, d) in cls.devices.items() if d == event["device"]]:
            del cls.devices[hashed]
        signed_out = [c for c in cls.online.get(event["user"], ()) if c.device == event["device"]]
        if event.get("node", cls.backplane.node) != cls.backplane.node:  # nobody here waits to ack it first
            for connection in signed_out:
                connection.refuse(ChatError("revoked", "this device was signed out"), 4401)
        return signed_out

    @classmethod
    async def link(cls, user: str) -> tuple[str, float]:
        """A one-time code that signs a new device in as user within LINK_SECONDS.
        A user has one code at a time: a new one replaces the last."""
        code = "".join(secrets.choice(LINK_ALPHABET) for _ in range(8))
        code = code[:4] + "-" + code[4:]
        await cls.backplane.put_link(code, user, LINK_SECONDS)
        return code, time.time() + LINK_SECONDS

    @classmethod
    async def use_link(cls, code: Any, user: str) -> bool:
        """Whether code is a live code for user; it is used up either way."""
        if not isinstance(code, str):
            return False
        code = code.strip().upper().replace(" ", "")
        if len(code) == 8:
            code = code[:4] + "-" + code[4:]
        return await cls.backplane.take_link(code) == user

    # ---- connections and presence

    @classmethod
    def arrive(cls, connection: ChatSocket, user: str, ip: str) -> None:
        """An accepted connection of user joins the live state."""
        if not cls.timers:
            cls.timers = [tornado.ioloop.PeriodicCallback(cls.sweep, 1000 * SWEEP_EVERY),
                          tornado.ioloop.PeriodicCallback(Metrics.measure_lag, 1000)]
            if cls.conf.ping_interval > 0:
                cls.timers.append(tornado.ioloop.PeriodicCallback(Liveness.ping_all, 1000 * cls.conf.ping_interval))
            for timer in cls.timers:
                timer.start()
        cls.per_ip[ip] = cls.per_ip.get(ip, 0) + 1
        tabs = cls.online.setdefault(user, set())
        tabs.add(connection)
        for room_key in cls.users[user].rooms:
            cls._here(cls.rooms[room_key], (connection,), True)
        if len(tabs) == 1:
            cls.backplane.presence(user, True, connection.device)

    @classmethod
    def depart(cls, connection: ChatSocket, user: str, ip: str) -> None:
        cls.per_ip[ip] -= 1
        if not cls.per_ip[ip]:
            del cls.per_ip[ip]
        tabs = cls.online[user]
        tabs.discard(connection)
        for room_key in cls.users[user].rooms:
            cls._here(cls.rooms[room_key], (connection,), False)
        if not tabs:
            del cls.online[user]
            cls.backplane.presence(user, False, None)

    @classmethod
    def apply_presence(cls, event: dict) -> None:
        """A process gained its user's first connection, or lost its last. The
        user is online while some process has one; others are told in the
        Announcer's next batch, and of a user gone from every process only
        after --offline_grace (one back by then was never away)."""
        user, node = event["user"], event["node"]
        if user not in cls.users:
            return
        nodes = cls.present.get(user)
        if event["on"]:
            if event.get("device") is not None and event["node"] != cls.backplane.node:
                with contextlib.suppress(sqlite3.Error):  # another process's connect: the device list's date
                    cls.store.touch_device(event["device"], event["at"])
            if nodes:
                cls.present[user] = nodes | {node}
                return
            # Sets that never change, one per process, shared: 200 bytes less per user online.
            cls.present[user] = cls.alone_on.get(node) or cls.alone_on.setdefault(node, frozenset((node,)))
            back = cls.leaving.pop(user, None)
            if back is not None:  # gone and back within --offline_grace: nobody was told it left
                tornado.ioloop.IOLoop.current().remove_timeout(back)
            else:
                log.debug("%s is online", cls.users[user].name)
                Announcer.tell_presence(user, "online")
            return
        if not nodes or node not in nodes:
            return
        if len(nodes) > 1:
            cls.present[user] = nodes - {node}
            return
        del cls.present[user]
        if cls.conf.offline_grace > 0:
            cls.leaving[user] = tornado.ioloop.IOLoop.current().call_later(cls.conf.offline_grace, cls.gone, user)
        else:
            cls.gone(user)

    @classmethod
    def gone(cls, user: str) -> None:
        """The user's last connection closed and it has not come back."""
        cls.leaving.pop(user, None)
        log.debug("%s is offline", cls.users[user].name)
        Announcer.tell_presence(user, "offline")

    @classmethod
    def everyone_but(cls, user: Optional[str] = None) -> list:
        """The connections here (of everyone, or everyone but user)."""
        return [c for u, tabs in cls.online.items() if u != user for c in tabs]

    @classmethod
    def members_online(cls, room: Room, but: Optional[str] = None) -> Collection[ChatSocket]:
        """The connections here of the room's members (but one's). All of
        them are kept (Room.here): send_to takes its own snapshot."""
        if but is not None:
            return [c for u in room.members if u != but for c in cls.online.get(u, ())]
        return room.here

    @staticmethod
    def _here(room: Room, connections: Iterable[ChatSocket], present: bool) -> None:
        """These connections are the room's now, or no longer (Room.here)."""
        here = room.here
        for connection in connections:
            if present:
                here[connection] = None
            else:
                here.pop(connection, None)

    @classmethod
    def tabs(cls, *users: str) -> set:
        """The connections here of these users."""
        return set().union(*(cls.online.get(u, ()) for u in users))

    # ---- rooms

    @classmethod
    async def join(cls, user: str, name: str) -> None:
        """user joins the room called name, created if new: within the
        creator's --rooms_per_hour (here) and --max_rooms (in apply)."""
        if key(name) not in cls.rooms:
            if cls.conf.max_rooms and len(cls.rooms) >= cls.conf.max_rooms:
                raise ChatError("too_many_rooms", "the server has as many rooms as it allows")
            if not cls.budgets.take("room", user):
                raise ChatError("rate_limited", "you have made many rooms lately; try again later")
        await cls.commit("member", user=user, room=name, on=True)

    @classmethod
    async def leave(cls, user: str, room: Room) -> None:
        await cls.commit("member", user=user, room=room.name, on=False)

    @classmethod
    def apply_member(cls, event: dict) -> None:
        """A join (the room created if new) or a leave: stored, then applied,
        then the user's connections here get joined or left."""
        user, room_key = event["user"], key(event["room"])
        room = cls.rooms.get(room_key)
        if event["on"]:
            if room is None:
                if cls.conf.max_rooms and len(cls.rooms) >= cls.conf.max_rooms:
                    raise ChatError("too_many_rooms", "the server has as many rooms as it allows")
                with cls.store.transaction():
                    cls.store.add_room(room_key, event["room"])
                    cls.store.set_member(room_key, user, True)
                room = cls.rooms[room_key] = Room(event["room"])
            elif user in room.members:
                # Not news here; but a process loading from Redis meets a rejoin
                # after the first join it keeps, and must mark what the others did.
                cls.read_from_join(user, room_key)
                return
            else:
                with cls.store.transaction():
                    cls.store.set_member(room_key, user, True)
                    cls.read_from_join(user, room_key)
            cls.set_member(room, user, True)
            tabs = cls.online.get(user)
            if tabs:
                read = cls.store.reads(user).get("#" + room_key, 0)
                joined = Greeting.joined(room, user, None, cls.conf.max_queue, read)[0]
                send_to(tabs, None, joined, bulk=True)
        else:
            if room is None or user not in room.members:
                return
            cls.store.set_member(room_key, user, False)
            cls.set_member(room, user, False)
            send_to(cls.online.get(user, ()), left_frame(room.name))

    @classmethod
    def read_from_join(cls, user: str, room_key: str) -> None:
        """What a room said before one joined it is not unread: a join moves
        the user's read marker there to the newest id so far (with --redis,
        where a membership is numbered, that is the join's own id). Part of
        the join event, so every process applying it agrees."""
        if cls.last_id:
            cls.store.set_read(user, "#" + room_key, cls.last_id)

    @classmethod
    def set_member(cls, room: Room, user: str, member: bool) -> None:
        """A stored membership change, in the live state; the room is told in the next batch."""
        cls._here(room, cls.online.get(user, ()), member)
        if member:
            room.members.add(user)
            cls.users[user].rooms.add(key(room.name))
            room.empty_since = None
        else:
            room.members.discard(user)
            cls.users[user].rooms.discard(key(room.name))
            if not room.members:
                room.empty_since = time.monotonic()
        Announcer.tell_member(key(room.name), user, member)

    @classmethod
    def sweep(cls, now: Optional[float] = None) -> None:
        """Every SWEEP_EVERY: forget refilled budgets, and rooms that have
        stood empty for ROOM_IDLE (so that --max_rooms is not used up for
        good). The default room always stays. (With --redis, rooms stay.)"""
        now = time.monotonic() if now is None else now
        cls.budgets.sweep()
        cls.backplane.sweep_links(now)
        if cls.backplane.waits:
            return
        for k, room in list(cls.rooms.items()):
            if (room.members or room.empty_since is None or now - room.empty_since < ROOM_IDLE
                    or k == key(cls.conf.default_room)):
                continue
            try:
                cls.store.drop_room(k)
            except sqlite3.Error as e:
                log.warning("could not forget the empty room %s: %s", room.name, e)
                continue
            del cls.rooms[k]
            cls.history.drop(k)
            log.info("forgot the room %s, empty for a day", room.name)

    # ---- messages

    @classmethod
    def next_id(cls) -> int:
        cls.last_id += 1
        return cls.last_id

    @classmethod
    async def post(cls, sender: str, room: Room, text: str, cid: Optional[str], reply_to: Optional[int]) -> dict:
        """A new room message. Its time is taken here, once, for every process."""
        ts, local = stamp(cls.conf.timestamp_format)
        return await cls.commit("message", user=sender, room=room.name, text=text, cid=cid, reply_to=reply_to,
                                ts=ts, time=local)

    @classmethod
    def apply_message(cls, event: dict) -> dict:
        """Stored, kept in history, sent to every member. A repeated cid is
        not posted again: the first one's frame is the answer."""
        sender, room_key = event["user"], key(event["room"])
        row = cls.store.by_cid(sender, event["cid"]) if event["cid"] is not None else None
        if row is not None:
            return json.loads(row[1])
        message = message_frame(event["id"], cls.rooms[room_key].name, cls.users[sender].name, event["text"],
                                event["ts"], event["time"], cls.quote(event["reply_to"]))
        payload = encode(message)
        cls.store.add_message(message["id"], room_key, sender, None, True, payload, event["cid"], event["text"],
                              event["reply_to"])
        cls.history.add(room_key, message["id"], payload)
        send_to(cls.members_online(cls.rooms[room_key]), message, payload)
        return message

    @classmethod
    def quote(cls, reply_to: Optional[int]) -> Optional[tuple[int, Optional[str]]]:
        """(id, quote) for a reply: the first QUOTE characters of its target
        as it is now (None once deleted); None for a message that is not one."""
        if reply_to is None:
            return None
        target = cls.store.message(reply_to)
        return reply_to, None if target is None or target.frame.get("deleted") else target.frame["text"][:QUOTE]

    @classmethod
    async def direct(cls, sender: str, to: User, text: str, cid: Optional[str],
                     reply_to: Optional[int]) -> tuple[dict, bool]:
        """A new direct message; the second value says it waits for its reader."""
        ts, local = stamp(cls.conf.timestamp_format)
        return await cls.commit("direct", user=sender, to=key(to.name), text=text, cid=cid, reply_to=reply_to,
                                ts=ts, time=local)

    @classmethod
    def apply_direct(cls, event: dict) -> tuple[dict, bool]:
        """Stored, then sent, or kept in the Store for its reader while it has
        no connection anywhere ("waiting", as the backplane saw it)."""
        sender, recipient = event["user"], event["to"]
        if event["cid"] is not None:
            row = cls.store.by_cid(sender, event["cid"])
            if row is not None:
                return json.loads(row[1]), not row[4]
        waiting = event["waiting"] if "waiting" in event else recipient not in cls.online
        kept = cls.mailboxes.get(recipient, 0)
        if waiting and kept >= cls.conf.mailbox and "waiting" not in event:  # (with --redis, Redis counted)
            raise ChatError("mailbox_full", f"{cls.users[recipient].name} has {kept} messages waiting; try later")
        message = direct_frame(event["id"], cls.users[sender].name, cls.users[recipient].name, event["text"],
                               event["ts"], event["time"], cls.quote(event["reply_to"]))
        payload = encode(message)
        cls.store.add_message(message["id"], None, sender, recipient, not waiting, payload, event["cid"],
                              event["text"], event["reply_to"])
        if waiting:
            cls.mailboxes[recipient] = kept + 1
            if recipient in cls.online:
                # It connected here after the backplane looked: it gets the
                # message now, so the message is delivered after all.
                send_to(cls.tabs(sender), message, payload)
                send_to(cls.tabs(recipient), None, flagged(payload, "buffered"))
                cls.deliver(recipient, [(message["id"], payload, sender, recipient, 0)])
                return message, waiting
        send_to(cls.tabs(sender, recipient), message, payload)
        return message, waiting

    @classmethod
    def deliver(cls, user: str, rows: list[Row]) -> None:
        """These waiting messages have just been sent to the user: mark them
        so and tell the senders. If the mark cannot be stored they stay
        waiting, and come again (same ids) on the next connect."""
        done = cls.backplane.commit({"kind": "delivered", "user": user, "ids": [row[0] for row in rows]})
        if not isinstance(done, Ready):  # with --redis: nobody waits for it, but a failure is logged
            done = asyncio.ensure_future(done)
            done.add_done_callback(lambda f: f.cancelled() or f.exception() is None
                                   or log.warning("could not mark messages to %s delivered: %s", user, f.exception()))

    @classmethod
    def _unmailed(cls, user: str, count: int) -> None:
        """count of user's waiting messages wait no more (delivered, or deleted)."""
        left = cls.mailboxes.get(user, 0) - count
        if left > 0:
            cls.mailboxes[user] = left
        else:
            cls.mailboxes.pop(user, None)

    @classmethod
    def apply_delivered(cls, event: dict) -> None:
        user = event["user"]
        try:
            ids = cls.store.mark_delivered(event["ids"])
        except sqlite3.Error as e:
            log.warning("could not mark %d messages to %s delivered: %s", len(event["ids"]), cls.users[user].name, e)
            return
        cls._unmailed(user, len(ids))
        for id, sender in ids:
            send_to(cls.online.get(sender, ()), delivered_frame(id, cls.users[user].name))

    # ---- changes to messages: each an event with an id of its own

    @classmethod
    async def edit(cls, user: str, target: Stored, text: str) -> dict:
        ts, local = stamp(cls.conf.timestamp_format)
        return await cls.commit("edit", user=user, target=target.id, text=text, ts=ts, time=local)

    @classmethod
    async def delete(cls, user: str, target: Stored) -> dict:
        # The tombstone rides along: with --redis the message itself is erased
        # from Redis, and a process loading later rebuilds the tombstone from this.
        tomb = {"room": target.room, "sender": target.sender, "recipient": target.recipient,
                "frame": tombstone_frame(target.frame)}
        return await cls.commit("delete", user=user, target=target.id, tomb=tomb)

    @classmethod
    async def react(cls, user: str, target: Stored, emoji: str) -> dict:
        return await cls.commit("react", user=user, target=target.id, emoji=emoji)

    @classmethod
    def _current(cls, event: dict) -> Stored:
        """The message an edit, delete or react changes, as it is now (it may
        have been deleted since the client asked)."""
        target = cls.store.message(event["target"])
        if target is None or target.frame.get("deleted"):
            raise ChatError("not_found", "there is no such message that you can see")
        return target

    @classmethod
    def apply_edit(cls, event: dict) -> dict:
        """A message's new text: its frame says "edited", its replies quote
        the new text, and whoever sees it gets an edited event."""
        target, text = cls._current(event), event["text"]
        frame = edited_frame(event["id"], target.frame, text, event["ts"], event["time"])
        cls._change(target, {**target.frame, "text": text, "edited": event["ts"]}, frame, text)
        return frame

    @classmethod
    def apply_delete(cls, event: dict) -> dict:
        """A message becomes a tombstone; its text is erased everywhere."""
        tomb = event.get("tomb")
        if tomb is not None and cls.store.message(event["target"]) is None:
            # Loading from Redis, which erased the message itself: its place
            # comes back (no text), to be deleted again here.
            place = {k: v for k, v in tomb["frame"].items() if k != "deleted"}
            cls.store.add_message(event["target"], tomb["room"], tomb["sender"], tomb["recipient"], True,
                                  encode(place), None, "")
        target = cls._current(event)
        frame = deleted_frame(event["id"], target.frame)
        cls._change(target, tombstone_frame(target.frame), frame, None)
        cls.store.checkpointer.erase_soon()
        if target.recipient is not None and cls.store.mark_delivered([target.id]):
            cls._unmailed(target.recipient, 1)  # a private message still waiting waits no more
        return frame

    @classmethod
    def apply_react(cls, event: dict) -> dict:
        """Toggle user's reaction: on if it had none with this emoji, else off."""
        target, user, emoji = cls._current(event), event["user"], event["emoji"]
        name = cls.users[user].name
        reactions = {e: list(names) for e, names in target.frame.get("reactions", {}).items()}
        names = reactions.setdefault(emoji, [])
        on = not any(key(n) == user for n in names)
        if on:
            if len(reactions) > MAX_REACTIONS:  # this emoji is new, and one too many
                raise ChatError("bad_request", f"a message holds at most {MAX_REACTIONS} different emoji")
            names.append(name)
        else:
            names[:] = [n for n in names if key(n) != user]
        message = {k: v for k, v in target.frame.items() if k != "reactions"}
        kept = {e: names for e, names in reactions.items() if names}
        if kept:
            message["reactions"] = kept
        frame = reaction_frame(event["id"], target.frame, emoji, name, on)
        cls._change(target, message, frame, None)
        return frame

    @classmethod
    def _change(cls, target: Stored, message: dict, event: dict, text: Optional[str]) -> None:
        """Store a message's new state with its event, in one transaction;
        then history, then whoever can see the message. An edit (text) or a
        delete (a tombstone) also changes the quotes of its replies."""
        payload, told = encode(message), encode(event)
        deleted = message.get("deleted", False)
        replies = []
        if text is not None or deleted:
            quote = None if deleted else text[:QUOTE]
            replies = [(id, encode({**frame, "quote": quote})) for id, frame in cls.store.replies(target.id)]
        cls.store.index_pending()  # the words it changes or erases must be in the index first
        with cls.store.transaction():
            if deleted:
                cls.store.erase(target.id, payload)
            else:
                if text is not None:
                    cls.store.drop_edits(target.id)
                cls.store.rewrite(target.id, payload, text)
            for id, reply in replies:
                cls.store.rewrite(id, reply)
            cls.store.add_event(event["id"], target, told)
        if target.room is not None:
            for id, changed in ((target.id, payload), *replies):
                cls.history.replace(target.room, id, changed)
            send_to(cls.members_online(cls.rooms[target.room]), event, told)
        else:
            send_to(cls.tabs(target.sender, target.recipient), event, told)

    # ---- read markers and signals

    @classmethod
    async def read(cls, user: str, conv: str, upto: int, head: dict, connection: ChatSocket) -> None:
        await cls.commit("read", user=user, conv=conv, upto=upto, head=head, node=cls.backplane.node,
                         conn=id(connection))

    @classmethod
    def apply_read(cls, event: dict) -> None:
        """Forward only: the same or an older id changes nothing. The user's
        other connections get the frame (not the one that moved it)."""
        if cls.store.set_read(event["user"], event["conv"], event["upto"]):
            mine = event["node"] == cls.backplane.node
            send_to([c for c in cls.online.get(event["user"], ()) if not (mine and id(c) == event["conn"])],
                    read_frame(event["head"], event["upto"]))

    @classmethod
    def apply_typing(cls, event: dict) -> None:
        """A signal, not kept: to the room's other members, or to one user."""
        if event.get("room") is not None:
            room = cls.rooms.get(key(event["room"]))
            if room is not None:
                send_to(cls.members_online(room, but=key(event["user"])), typing_frame(event["user"], room.name, None))
        else:
            send_to(cls.online.get(key(event["to"]), ()), typing_frame(event["user"], None, event["to"]))


################ Announcer: who is online and in which room, told in batches


class Announcer:
    """Presence and membership changes, gathered for --presence_window
    seconds and told as one frame each, encoded once for every receiver:
    ``presence`` to everyone, ``member`` per room. A reconnect storm of N
    users then costs each receiver one frame per window, not N, and N
    frames in all per window, not N². A change and its undoing within the
    window cancel out.

    The Hub tells it each change it applies (tell_presence, tell_member);
    flush() reads the Hub's users, rooms and connections to word and
    address the frames. The online list and each room's member list that
    welcome and joined carry are refreshed by the same flush, so a client
    that got one, and then every batch after it, has the whole picture.
    """

    # Changes not yet told, and what welcome says
    presence: ClassVar[dict[str, str]] = {}  # user key -> "online" or "offline"; changed by tell_presence, flush
    membership: ClassVar[dict[str, dict[str, str]]] = {}  # room key -> user key -> "join" or "leave"; changed by tell_member, flush
    timer: ClassVar[Optional[object]] = None  # the next flush (True: the next loop turn); changed by _changed, flush, reset
    names: ClassVar[list[str]] = []  # everyone online, sorted as clients see them; changed by set_online
    roster: ClassVar[bytes] = b"[]"  # the first --roster of names, encoded once for every welcome; changed by set_online

    @classmethod
    def reset(cls) -> None:
        """Nothing waits to be told, and nobody is online (Hub.load)."""
        if cls.timer not in (None, True):
            tornado.ioloop.IOLoop.current().remove_timeout(cls.timer)
        cls.presence, cls.membership, cls.timer = {}, {}, None
        cls.set_online([])

    @classmethod
    def set_online(cls, names: list[str]) -> None:
        """Everyone online, sorted, and the first --roster names encoded
        (flush; and chat_redis, which loads who is online elsewhere)."""
        cls.names = names
        cls.roster = encode_names(names[:Hub.conf.roster])

    @staticmethod
    def set_members(room: Room, names: list[str]) -> None:
        """The room's member list, sorted, and its first --roster names encoded."""
        room.names = names
        room.roster = encode_names(names[:Hub.conf.roster])

    @classmethod
    def tell_presence(cls, user: str, status: str) -> None:
        """Tell everyone at the next flush; undoing a change not yet told cancels it."""
        if cls.presence.pop(user, None) is None:
            cls.presence[user] = status
        cls._changed()

    @classmethod
    def tell_member(cls, room_key: str, user: str, member: bool) -> None:
        """Tell the room at the next flush; undoing a change not yet told cancels it."""
        changes = cls.membership.setdefault(room_key, {})
        if changes.pop(user, None) is None:
            changes[user] = "join" if member else "leave"
        cls._changed()

    @classmethod
    def _changed(cls) -> None:
        if cls.timer is None:
            loop = tornado.ioloop.IOLoop.current()
            if Hub.conf.presence_window > 0:
                cls.timer = loop.call_later(Hub.conf.presence_window, cls.flush)
            else:
                loop.add_callback(cls.flush)
                cls.timer = True

    @classmethod
    def flush(cls) -> None:
        """Send the gathered changes, one frame per kind and room, and refresh
        the lists that welcome and joined carry."""
        cls.timer = None
        presence, cls.presence = cls.presence, {}
        membership, cls.membership = cls.membership, {}
        users = Hub.users
        if presence:
            came = sorted_names(users[u].name for u, s in presence.items() if s == "online")
            went = sorted_names(users[u].name for u, s in presence.items() if s == "offline")
            cls.set_online(resorted(cls.names, came, went))
            send_to(Hub.everyone_but(cls._alone(presence)), presence_frame(came, went))
        for room_key, changes in membership.items():
            room = Hub.rooms.get(room_key)
            if room is None or not changes:
                continue
            joined = sorted_names(users[u].name for u, a in changes.items() if a == "join")
            left = sorted_names(users[u].name for u, a in changes.items() if a == "leave")
            cls.set_members(room, resorted(room.names, joined, left))
            send_to(Hub.members_online(room, but=cls._alone(changes)), member_frame(room.name, joined, left))

    @staticmethod
    def _alone(changes: dict) -> Optional[str]:
        """The user a batch is only about: it already knows, and is not sent it.
        (A bigger batch goes to everyone; a receiver may find its own name.)"""
        return next(iter(changes)) if len(changes) == 1 else None


################ Greeting: the connect sequence


class Greeting:
    """The connect sequence of a connection just let in: welcome, one
    joined per room, then private messages, then (with since) what changed
    meanwhile; at most about --max_queue bytes in all (see the manual).
    Private messages take the newest that fit in half; room histories share
    what is left, in the order of the rooms' names.

    It is the one answer built from every part of the state at once, under
    one budget, and it is sent once: it lives only while it is sent. A
    joined frame is built the same way for a join later (joined), here or
    on another connection of the user (Hub.apply_member).
    """

    __slots__ = ("connection", "user", "me")

    def __init__(self, connection: ChatSocket, user: User) -> None:
        self.connection = connection
        self.user = user
        self.me: str = connection.user  # type: ignore[assignment]  # its key: set before it is greeted

    def send(self, token: str, since: Optional[int]) -> None:
        """The whole sequence, into the connection's Outbox; then its mail is delivered."""
        connection, user, me = self.connection, self.user, self.me
        conf = Hub.conf
        directs, cut = self._owed_directs(since, conf.max_queue // 2)
        my_rooms = sorted_names(Hub.rooms[r].name for r in user.rooms)
        roster, online_count = roster_with(Announcer.names, Announcer.roster, user.name, conf.roster)
        reads = Hub.store.reads(me)
        read_with = {Hub.users[c[1:]].name: id for c, id in reads.items() if c[0] == "@" and c[1:] in Hub.users}
        welcome = welcome_payload(user.name, token, connection.device, roster, online_count, my_rooms, read_with, conf,
                                  Hub.store.epoch, cut, Hub.backplane.node if Hub.backplane.waits else None)
        connection.send_payload(welcome)
        budget = max(0, conf.max_queue - len(welcome) - sum(len(p) for _, p in directs))  # what rooms share
        for r in sorted(user.rooms):
            joined, budget = Greeting.joined(Hub.rooms[r], me, since, budget, reads.get("#" + r, 0))
            connection.send_payload(joined)
        for _, payload in directs:
            connection.send_payload(payload)
        if since:  # what changed since, to messages it has (newer ones came in their current state)
            for payload in self._owed_changes(since, sorted(user.rooms), budget):
                connection.send_payload(payload)
        mail = [row for row, _ in directs if row[3] == me and not row[4]]
        if mail and not connection._dead:
            Hub.deliver(me, mail)
        # From now on answers it asks for (joins, histories) may be owed up to
        # this much beyond --max_queue; a client that asks and never reads is cut off.
        connection.outbox.bulk_cap = conf.max_queue

    def _owed_directs(self, since: Optional[int], budget: int) -> tuple[list[tuple[Row, bytes]], bool]:
        """The private messages a connect sequence carries, oldest first, as
        (row, payload): those waiting for the user, and with since those
        after it; only the newest that fit in budget bytes. The second value
        says whether any were left out."""
        mailbox = Hub.conf.mailbox
        # Most people have no mail waiting, and Hub.mailboxes knows: no query then.
        waiting = Hub.store.mail(self.me, mailbox) if Hub.mailboxes.get(self.me) else []
        rows = {row[0]: row for row in waiting}
        cut = False
        if since is not None:
            replay = Hub.store.direct_page(self.me, None, None, since, mailbox)
            cut = len(replay) == mailbox  # there may be more beyond the limit
            rows.update((row[0], row) for row in replay)
        chosen = []
        for id in sorted(rows, reverse=True):
            payload = dressed(rows[id], self.me)
            if len(payload) > budget:
                cut = True  # the rest are older: the client asks for them with history
                break
            budget -= len(payload)
            chosen.append((rows[id], payload))
        chosen.reverse()
        return chosen, cut

    def _owed_changes(self, since: int, rooms: list[str], budget: int) -> list[bytes]:
        """The change events after since, oldest first: the newest that fit
        in budget bytes, at most MAX_CHANGES. A client that missed more asks
        for its conversations again with history (see the manual)."""
        chosen = []
        for payload in Hub.store.changes(self.me, rooms, since, MAX_CHANGES):
            if len(payload) > budget:
                break
            budget -= len(payload)
            chosen.append(payload)
        chosen.reverse()
        return chosen

    @staticmethod
    def joined(room: Room, user: str, since: Optional[int], budget: int, read: int) -> tuple[bytes, int]:
        """The joined frame of room for user (a key), holding only messages
        after since and only the newest that fit in budget bytes; and what
        is left of it. It says "truncated" when messages after since were
        left out: cut for the budget, or older than the history keeps."""
        roster, member_count = roster_with(room.names, room.roster, Hub.users[user].name, Hub.conf.roster)
        if len(roster) > budget:
            roster = b"[]"  # the client pages through the members it lacks (member_count says how many)
        room_budget = budget - len(joined_payload(room.name, roster, member_count, read, [], True))
        held = Hub.history.get(key(room.name))
        newer = held if since is None else [m for m in held if m[0] > since]
        truncated = False
        if since is not None and newer and len(newer) == len(held):
            # Every kept message is new to it: were there more before them? An
            # indexed look-up, so a resume costs the same however big the room.
            truncated = Hub.store.room_has(key(room.name), since, held[0][0])
        fits = 0
        for _, payload in reversed(newer):
            if len(payload) + 1 > room_budget:  # and its comma
                break
            room_budget -= len(payload) + 1
            fits += 1
        truncated = truncated or fits < len(newer)
        kept = [payload for _, payload in newer[len(newer) - fits:]]
        joined = joined_payload(room.name, roster, member_count, read, kept, truncated)
        return joined, max(0, budget - len(joined))


################ Liveness: a client that vanished sends no close frame, so we ask


class Liveness:
    """Every --ping_interval: ping each connection, and --ping_timeout later
    drop those that answered neither this ping nor anything else.

    A client that vanishes just after a pong is pinged at most one interval
    later and dropped one timeout after that: within 2 x the interval. The
    ping waits behind whatever the connection is owed, so a client that
    stopped reading is dropped the same way, whatever else it sends.
    We do this rather than use Tornado's own ping timeout, which waits
    five more seconds for a close handshake a vanished client never sends.

    One timer for the process (Hub.arrive starts it), not one per
    connection; what it knows of a connection is two attributes of it, its
    latest ping's payload and when it was last heard from.
    """

    @staticmethod
    def heard(connection: ChatSocket, data: bytes) -> None:
        """A pong came."""
        # Each connection's ping carries its own random payload, and it waits
        # behind everything written before it: only a client that read all
        # of that can echo it, and no other connection can answer for it.
        if data == connection._ping_payload:
            connection._heard = time.monotonic()

    @classmethod
    def ping_all(cls) -> None:
        """Ping every open connection, and look again --ping_timeout later."""
        sent = time.monotonic()
        pinged = [c for c in Hub.everyone_but() if not c._dead]
        for connection in pinged:
            connection._ping_payload = secrets.token_bytes(8)
            try:
                connection.ping(connection._ping_payload)
            except tornado.websocket.WebSocketClosedError:
                pass
        tornado.ioloop.IOLoop.current().call_later(Hub.conf.ping_timeout, cls._drop_silent, pinged, sent)

    @classmethod
    def _drop_silent(cls, pinged: list, sent: float) -> None:
        """Close those of pinged heard from neither by a pong nor by a taken
        write since sent, without a close handshake the peer would never answer."""
        for connection in pinged:
            if max(connection._heard, connection.outbox.written_at) < sent and not connection._dead:
                log.info("%s stopped answering pings", connection.user)
                connection._dead = True
                connection.outbox.close(drain=False)
                if connection.outbox.stream is not None:
                    connection.outbox.stream.close()  # no close handshake with a peer that is gone
                else:
                    connection.close(1001, "ping timed out")


################ Pipeline: with --redis, a connection's frames in flight, answered in order


class Pipeline:
    """With --redis: one connection's frames while the backplane has them,
    and the order their answers go out in.

    A message waits for the backplane, and the next frame need not wait for
    it: its append goes out right behind, on the same connection to Redis,
    so a client that sends fast fills the log's batches. Any other frame (a
    join, a history) waits until the frames before it are applied, so that
    it sees their effects; and answers always go out in frame order: the
    task of each frame holds its answers to the connection (HELD) until the
    frame before it is answered. Tornado reads the next frame at once after
    a message, up to IN_FLIGHT of them; after anything else, when it is done.

    A connection gets one at its first frame with --redis. In one process
    every handler finishes before the next frame is read, in order already,
    and none is made.
    """

    # The answers of the frame a task handles, held back until the frames
    # before it are answered: (connection, [(frame, payload, bulk)]).
    HELD: ClassVar[contextvars.ContextVar[Optional[tuple]]] = contextvars.ContextVar("held", default=None)

    __slots__ = ("connection", "answered", "in_flight")

    def __init__(self, connection: ChatSocket) -> None:
        self.connection = connection
        self.answered: Optional[asyncio.Future] = None  # done once the latest frame's answers are out
        self.in_flight = 0  # frames being handled at once

    def take(self, data: str | bytes) -> Optional[asyncio.Future]:
        """Start handling one frame; what Tornado must wait for before it
        reads the next, if anything."""
        before, self.answered = self.answered, asyncio.get_running_loop().create_future()
        message = peek_type(data) == "message"
        self.in_flight += 1
        task = asyncio.ensure_future(self._in_order(data, before, self.answered, message))
        return None if message and self.in_flight < IN_FLIGHT else task

    async def _in_order(self, data: str | bytes, before: Optional[asyncio.Future], answered: asyncio.Future,
                        message: bool) -> None:
        """One frame: handled (a message at once, anything else after the
        frames before it), its answers held until theirs are out."""
        connection = self.connection
        held: list[tuple[Optional[dict], Optional[bytes], bool]] = []
        Pipeline.HELD.set((connection, held))
        try:
            if before is not None and not message:
                await before
            await connection._handle(data)
            if before is not None:
                await before
        finally:
            Pipeline.release(connection)
            Pipeline.HELD.set(None)
            self.in_flight -= 1
            answered.set_result(None)

    @staticmethod
    def hold(connection: ChatSocket, frame: Optional[dict], payload: Optional[bytes], bulk: bool) -> bool:
        """Hold an answer to connection if this task is handling one of its
        frames (it goes out when that frame is answered); False: send it now."""
        held = Pipeline.HELD.get()
        if held is None or held[0] is not connection:
            return False
        held[1].append((frame, payload, bulk))
        return True

    @staticmethod
    def release(connection: ChatSocket) -> None:
        """Send the answers held for connection now, before what must follow
        them at once (the close of a refused connection)."""
        held = Pipeline.HELD.get()
        if held is not None and held[0] is connection:
            for frame, payload, bulk in held[1]:
                send_to((connection,), frame, payload, bulk)
            held[1].clear()


################ Admission: who may come in, and as whom


class Admission:
    """The checks a connect passes before it is let in, cheapest first. A
    refusal is a ChatError whose code gives its close code (CLOSE_CODES);
    it changes nothing but the budget it spent. ChatSocket asks at the door
    when the connection opens, and for its credentials then or, with
    auth=1, when its auth frame comes.

    * At the door: the backplane can store changes, the address is under
      --max_conns_per_ip, and has connects left (ten times
      --connects_per_minute).
    * An owned name: the token of one of its devices, or a link code (whose
      tries per address are budgeted as new names are); then --max_tabs,
      and the user's --connects_per_minute.
    * A free name: not a lookalike of an owned one, --max_users, and the
      address's --names_per_hour.
    """

    @staticmethod
    def door(ip: str) -> None:
        """Before any name is looked at."""
        if not Hub.backplane.healthy:
            raise ChatError("server_error", "the server cannot store messages just now; try again soon")
        Admission.address(ip)
        if not Hub.budgets.take("connect_ip", ip):
            raise ChatError("rate_limited", "too many connections from your address lately; wait a minute")

    @staticmethod
    def address(ip: str) -> None:
        """--max_conns_per_ip, asked at the door and again with the credentials:
        others may have come in while this one waited for its auth frame (or,
        with --redis, for the backplane)."""
        conf = Hub.conf
        if conf.max_conns_per_ip and Hub.per_ip.get(ip, 0) >= conf.max_conns_per_ip:
            raise ChatError("too_many_connections", "too many connections from your address")

    @staticmethod
    async def credentials(name: str, token: Optional[str], link: Optional[str],
                          ip: str) -> tuple[Optional[User], Optional[int]]:
        """(the user, the id of the device its token names): (None, None) for
        a free name, (user, None) for a link code, which this uses up."""
        conf, user_key = Hub.conf, key(name)
        user, device = Hub.users.get(user_key), None
        if user is None or (link is None and Hub.device_of(token) is None):
            # With --redis the name or the device may be minutes old on another
            # process and not applied here yet: catch up before judging.
            await Hub.backplane.caught_up()
            user = Hub.users.get(user_key)
        Admission.address(ip)
        if user is not None:
            if link is not None:
                if not Hub.budgets.take("link", ip):
                    raise ChatError("rate_limited", "too many link codes from your address; try later")
                if not await Hub.use_link(link, user_key):
                    raise ChatError("name_taken", f"{user.name} is taken, and that code is not valid")
            else:
                found = Hub.device_of(token)
                if found is None or found[0] != user_key:
                    raise ChatError("name_taken", f"{user.name} is taken; pick another name")
                device = found[1]
            if conf.max_tabs and len(Hub.online.get(user_key, ())) >= conf.max_tabs:
                raise ChatError("too_many_connections", f"{user.name} has too many tabs open")
            if not Hub.budgets.take("connect", user_key):
                raise ChatError("rate_limited", f"{user.name} connected too often lately; wait a minute")
        else:
            twin = Hub.lookalikes.get(skeleton(name))
            if twin is not None:
                raise ChatError("bad_username", f"{name} is too close to the name {Hub.users[twin].name}; pick another")
            if conf.max_users and len(Hub.users) >= conf.max_users:
                raise ChatError("server_full", "this server has all the users it allows")
            if not Hub.budgets.take("name", ip):
                raise ChatError("rate_limited", "too many new names from your address; try later")
        return user, device


################ The socket: one connection, the protocol only


class ChatSocket(tornado.websocket.WebSocketHandler):
    """One connection of one user: the handshake, and the client's frames,
    each checked and handed to the Hub. Admission decides whether it comes
    in, its Greeting sends the connect sequence, Liveness pings it, and what
    it is owed waits in its Outbox."""

    sockets: ClassVar[int] = 0  # WebSocket connections open, accepted or not; changed by open, on_close

    user: Optional[str] = None  # user key, set once the connection is accepted
    device: Optional[int] = None  # the id of the device (token) it signed in with
    awaiting: ClassVar[dict[ChatSocket, None]] = {}  # opened with auth=1, its auth frame not come yet; see _await
    _awaiting: Optional[tuple] = None  # (name, since, timer) while an auth frame is awaited
    _auth_ref: Any = None  # the ref of its auth frame: a refusal carries it, and the ack after welcome
    _counted = False  # counted in sockets
    _dead = False  # closing: nothing more is read or written
    _departed = False
    _flood_start = _flood_last = -FLOOD_CLOSE_AFTER  # when the current run of refused frames began, and its latest
    _ping_payload = b""  # this connection's latest ping; only a pong that echoes it counts (Liveness)
    _pipeline: Optional[Pipeline] = None  # with --redis, from its first frame: its frames in flight

    # ---- connection life

    def open(self) -> Optional[asyncio.Future]:
        """Check the name and limits, then send welcome, joined, and mail;
        the 101 response (held back since get) leaves with the first of them."""
        try:
            waiting = self._open()
        except BaseException:
            self._uncork()
            raise
        if waiting is None:
            self._uncork()
        else:
            waiting.add_done_callback(lambda _: self._uncork())
        return waiting

    def _open(self) -> Optional[asyncio.Future]:
        ChatSocket.sockets += 1
        self._counted = True
        conf = Hub.conf
        self.outbox = Outbox(self, conf.max_queue)
        self._messages = Bucket(conf.burst)  # frames it may send: --rate, --burst
        self._frames = Bucket(WIRE_FACTOR * conf.burst)  # wire frames of any kind
        self._typing = Bucket(TYPING[0])
        self._heard = time.monotonic()  # when it was last heard from (Liveness)
        # Frames are already gathered into one write per loop turn; Nagle's
        # algorithm would only hold that write back for the peer's delayed ACK.
        # (Where get could set it already, this call does nothing.)
        self.set_nodelay(True)
        try:
            name = check_name(self._query("username"), "bad_username")
            Admission.door(self.request.remote_ip)
        except ChatError as e:
            return self.refuse(e, CLOSE_CODES[e.code])
        token, link, since = self._query("token"), self._query("link"), parse_since(self._query("since"))
        if since is not None and self._query("epoch") not in (None, Hub.store.epoch):
            since = 0  # its ids are from another database: everything is new to it
        if self._query("auth") == "1" and token is None and link is None:
            # The credentials come in the first frame, not the URL (which proxies log).
            self._await(name, since)
            return None
        return self._run(self._admit(name, token, link, since))

    def _run(self, coroutine: Any) -> Optional[asyncio.Future]:
        """Run a handler. In one process it finishes now; with --redis it may
        wait for the backplane, and Tornado waits for it before it hands us
        the connection's next frame, so answers keep their order."""
        if Hub.backplane.waits:
            return asyncio.ensure_future(coroutine)
        finish(coroutine)
        return None

    async def _admit(self, name: str, token: Optional[str], link: Optional[str], since: Optional[int]) -> None:
        """Let the connection in as name if its token or link code allows it
        (or claim the name if it is free), then send the connect sequence."""
        ip, user_key = self.request.remote_ip, key(name)
        label = device_label(self.request.headers.get("User-Agent", ""))
        try:
            user, device = await Admission.credentials(name, token, link, ip)
            if user is None:
                user, token, device = await Hub.claim(name, label, ip)
            elif device is None:
                token, device = await Hub.add_device(user_key, label)
            else:
                # A device known before: its date for the device list. (A new one
                # was stored with today's date a moment ago: no second write.)
                with contextlib.suppress(sqlite3.Error):  # only a date: never worth refusing
                    Hub.store.touch_device(device, utc_iso(time.time()))
        except sqlite3.Error as e:
            log.error("could not store the new name or device of %s: %s", name, e)
            return self.refuse(ChatError("server_error", "the server could not save your name; try again"), 1011)
        except ChatError as e:  # refused; or another process took the name first, or the backplane is away
            return self.refuse(e, CLOSE_CODES.get(e.code, 4400))
        if self._dead:  # it went away while the backplane stored its name
            return
        self.user, self.device = user_key, device
        Hub.arrive(self, self.user, ip)
        try:
            Greeting(self, user).send(token, since)
        except Exception:  # a bug, not the client's doing: never leave a ghost online
            log.exception("could not greet %s", user.name)
            self._close(1011, "server error")

    async def _auth(self, data: str | bytes) -> None:
        """The first frame of a connection opened with auth=1:
        {"type":"auth","token":"..."} or {"type":"auth","link":"K7QF-2MXD"}."""
        name, since = self._stop_awaiting()
        try:
            frame = parse_frame(data)
        except ChatError:
            frame = {}
        with contextlib.suppress(ChatError):  # its ref, if it has a good one, is answered like any other
            self._auth_ref = check_ref(frame["ref"]) if "ref" in frame else None
        token, link = (v if isinstance(v, str) and is_unicode(v) else None for v in (frame.get("token"), frame.get("link")))
        if frame.get("type") != "auth" or (token is None and link is None):
            return self.refuse(ChatError("name_taken", "the first frame must be an auth frame with a token or a link"), 4409)
        await self._admit(name, token, link, since)
        ref, self._auth_ref = self._auth_ref, None  # later refusals answer later frames
        if self.user is not None and not self._dead:
            self._ack(ref)

    def _await(self, name: str, since: Optional[int]) -> None:
        """Wait AUTH_SECONDS for the auth frame. Such a connection has no user
        yet, so it is kept in ChatSocket.awaiting for close_all to find."""
        self._awaiting = (name, since, tornado.ioloop.IOLoop.current().call_later(AUTH_SECONDS, self._no_auth))
        ChatSocket.awaiting[self] = None

    def _stop_awaiting(self) -> tuple[str, Optional[int]]:
        """No more waiting (the frame came, or the connection closes): the name
        and since it was opened with, if it was waiting."""
        if self._awaiting is None:
            return "", None
        name, since, timer = self._awaiting
        self._awaiting = None
        del ChatSocket.awaiting[self]
        tornado.ioloop.IOLoop.current().remove_timeout(timer)
        return name, since

    def _no_auth(self) -> None:
        if self._awaiting is not None and not self._dead:
            self._stop_awaiting()
            self.refuse(ChatError("name_taken", f"no auth frame came within {AUTH_SECONDS:g} seconds"), 4409)

    def get_websocket_protocol(self) -> Optional[tornado.websocket.WebSocketProtocol]:
        """Tornado's protocol, made stricter by Protocol."""
        protocol = super().get_websocket_protocol()
        if protocol is None:
            return None
        return Protocol(self, False, protocol.params)

    def _query(self, name: str) -> Optional[str]:
        """A query argument, or None when absent or not valid UTF-8."""
        try:
            return self.get_query_argument(name, None, strip=False)
        except tornado.web.HTTPError:
            return None

    def refuse(self, error: ChatError, code: int) -> None:
        Metrics.count("refused", error.code)
        Pipeline.release(self)  # this frame's answers (a logout's ack) go before the close
        send_to((self,), error_frame(error.code, error.message, self._auth_ref))
        self._close(code, error.code)

    def on_close(self) -> None:
        self._dead = True
        ChatSocket.corked.pop(id(self), None)
        self._stop_awaiting()  # closed before its auth frame came
        if self._counted:
            self._counted = False
            ChatSocket.sockets -= 1
        self._depart()

    def _depart(self) -> None:
        if self.user is not None and not self._departed:
            self._departed = True
            Hub.depart(self, self.user, self.request.remote_ip)

    def on_pong(self, data: bytes) -> None:
        Liveness.heard(self, data)

    # ---- client frames: on_message dispatches to do_<type>

    def on_message(self, data: str | bytes) -> Optional[asyncio.Future]:
        if self._awaiting is not None:
            return self._run(self._auth(data))
        if self._dead or self.user is None:
            return None  # refused or closing: Tornado reads on until the client's close frame, we do not act on it
        if not Hub.backplane.waits:
            finish(self._handle(data))
            return None
        if self._pipeline is None:  # with --redis a handler may wait for the backplane
            self._pipeline = Pipeline(self)
        return self._pipeline.take(data)

    async def _handle(self, data: str | bytes) -> None:
        """One client frame: checked, dispatched to do_<type>, answered."""
        ref = None
        try:
            try:
                frame = parse_frame(data)
            except ChatError:
                self._spend()  # a broken frame costs a token too
                raise
            bad_ref = None
            if "ref" in frame:
                try:
                    ref = check_ref(frame["ref"])
                except ChatError as e:
                    bad_ref = e  # refused once the frame has paid its token, as any frame does
            kind = frame.get("type")
            if kind == "typing":
                if Hub.conf.rate > 0 and not self._typing.take(*TYPING):
                    self._flooding()
                    return self._ack(ref)  # a signal, not a message: extra ones are dropped
            elif not self._spend():
                raise ChatError("rate_limited", "you are sending too fast; wait a moment and try again")
            if bad_ref is not None:
                raise bad_ref
            if not isinstance(kind, str):
                raise ChatError("bad_request", "a frame needs a string 'type'")
            handler = getattr(self, "do_" + kind, None)
            if handler is None:
                raise ChatError("bad_request", f"unknown frame type {kind[:40]!r}")
            Metrics.count("frames_in", kind)
            await handler(frame, ref)
        except ChatError as e:
            Metrics.count("errors", e.code)
            self.send(error_frame(e.code, e.message, ref))
        except sqlite3.Error as e:  # nothing was stored, relayed or acked: the client may try again
            Metrics.count("errors", "server_error")
            log.error("storage failed, a frame from %s was refused: %s", self.user, e)
            self.send(error_frame("server_error", "the server could not save that; try again", ref))
        except Exception:  # a bug: log it (without the URL and its token), keep the connection
            Metrics.count("errors", "server_error")
            log.exception("error handling a frame from %s", self.user)
            self.send(error_frame("server_error", "the server failed on that frame", ref))

    def _spend(self) -> bool:
        """One frame from the --rate/--burst budget, if there is one."""
        conf = Hub.conf
        if conf.rate <= 0 or self._messages.take(conf.burst, conf.rate):
            return True
        self._flooding()
        return False

    def frame_arrived(self) -> None:
        """Protocol: a wire frame of any kind arrived (a ping, a fragment)."""
        conf = Hub.conf
        if conf.rate > 0 and not self._frames.take(WIRE_FACTOR * conf.burst, WIRE_FACTOR * conf.rate):
            self._flooding()

    def refused_frame(self, code: int, reason: str) -> None:
        """Protocol: the client broke RFC 6455 (1002, 1007)."""
        self._close(code, reason)

    def _flooding(self) -> None:
        """A frame went over a budget. A connection that keeps going over for
        FLOOD_CLOSE_AFTER seconds, with no pause of FLOOD_GAP, is closed:
        answering it would cost the server more than the limit allows."""
        now = time.monotonic()
        if now - self._flood_last > FLOOD_GAP:
            self._flood_start = now
        self._flood_last = now
        if now - self._flood_start >= FLOOD_CLOSE_AFTER and not self._dead:
            log.info("closing a connection of %s: it kept sending too fast", self.user)
            self.refuse(ChatError("rate_limited", "you kept sending too fast; reconnect in a while"), 4429)

    def _ack(self, ref: Any, **fields: Any) -> None:
        if ref is not None:
            self.send(ack_frame(ref, **fields))

    def _my_room(self, name: Any) -> Room:
        """The room a frame names, which the user must be in."""
        room = Hub.rooms.get(key(check_room(name)))
        if room is None or self.user not in room.members:
            raise ChatError("not_in_room", f"you are not in {name}; join it first")
        return room

    def _known_user(self, name: Any) -> User:
        if not isinstance(name, str):
            raise ChatError("bad_request", "'to' must be a user name")
        user = Hub.users.get(key(name)) if NAME.fullmatch(name) else None
        if user is None:
            raise ChatError("unknown_user", f"nobody called {name[:40]!r} has ever been here")
        return user

    async def do_message(self, frame: dict, ref: Any) -> None:
        # {"type":"message","room":"general","text":"hello","cid":"c7"}  or  text "@UserB hello"
        text = check_text(frame.get("text"), Hub.conf.max_text)
        cid = check_cid(frame.get("cid"))  # a repeat is answered with the first message (apply decides)
        direct = DIRECT.match(text)
        if direct:
            to = self._known_user(direct[1])
            if BLANK.fullmatch(direct[2]):
                raise ChatError("bad_request", "the message is empty")
            pair = {self.user, key(to.name)}
            reply = self._reply(frame.get("reply_to"), lambda m: m.room is None and {m.sender, m.recipient} == pair)
            message, queued = await Hub.direct(self.user, to, direct[2], cid, reply)
            self._ack(ref, id=message["id"], queued=queued)
        else:
            room = frame.get("room")
            room = self._my_room(Hub.conf.default_room if room is None else room)
            reply = self._reply(frame.get("reply_to"), lambda m: m.room == key(room.name))
            message = await Hub.post(self.user, room, text, cid, reply)
            self._ack(ref, id=message["id"])

    def _reply(self, reply_to: Any, same: Callable[[Stored], bool]) -> Optional[int]:
        """The id a message's "reply_to" names, which must be a message of
        the same conversation; None without one. One answer for every other
        id, so nobody learns what exists elsewhere."""
        if reply_to is None:
            return None
        target = Hub.store.message(check_id(reply_to, "reply_to"))
        if target is None or not same(target):
            raise ChatError("bad_request", "'reply_to' must be a message of this conversation")
        return target.id

    def _target(self, frame: dict, author: bool) -> Stored:
        """The message a change names: one this user can see now, not
        deleted, and (for author) its own, sent within --edit_window."""
        target = Hub.store.message(check_id(frame.get("id")))
        if target is None or target.frame.get("deleted") or not self._sees(target):
            # The same answer for a message that does not exist (or an event's
            # id), one in a room the user is not in, someone else's private
            # one, or a deleted one: it tells nothing.
            raise ChatError("not_found", "there is no such message that you can see")
        if author:
            if target.sender != self.user:
                raise ChatError("forbidden", "only its author may change a message")
            window = Hub.conf.edit_window
            if window > 0 and time.time() - parse_ts(target.frame["ts"]) > window:
                raise ChatError("too_late", f"messages may be changed for {window:g} seconds after sending")
        return target

    def _sees(self, message: Stored) -> bool:
        """Whether the user may see a message now: one of a room it is in, or
        a private one it sent or received."""
        if message.room is not None:
            return message.room in Hub.users[self.user].rooms
        return self.user in (message.sender, message.recipient)

    async def do_edit(self, frame: dict, ref: Any) -> None:
        # {"type":"edit","id":101,"text":"fixed"}
        text = check_text(frame.get("text"), Hub.conf.max_text)
        target = self._target(frame, author=True)
        if target.room is not None and DIRECT.match(text):
            # A room message never starts like a private one: pages rely on it.
            raise ChatError("bad_request", "a room message cannot start with @name")
        self._ack(ref, id=(await Hub.edit(self.user, target, text))["id"])

    async def do_delete(self, frame: dict, ref: Any) -> None:
        # {"type":"delete","id":101}
        self._ack(ref, id=(await Hub.delete(self.user, self._target(frame, author=True)))["id"])

    async def do_react(self, frame: dict, ref: Any) -> None:
        # {"type":"react","id":101,"emoji":"👍"}
        emoji = check_emoji(frame.get("emoji"))
        self._ack(ref, id=(await Hub.react(self.user, self._target(frame, author=False), emoji))["id"])

    async def do_join(self, frame: dict, ref: Any) -> None:
        # {"type":"join","room":"python"}
        name = check_room(frame.get("room"))
        room = Hub.rooms.get(key(name))
        read = Hub.store.reads(self.user).get("#" + key(name), 0)
        if room is not None and self.user in room.members:
            self.send_payload(Greeting.joined(room, self.user, None, Hub.conf.max_queue, read)[0])  # a fresh copy
        else:
            if len(Hub.users[self.user].rooms) >= ROOMS_PER_USER:
                raise ChatError("too_many_rooms", f"you are in {ROOMS_PER_USER} rooms; leave one first")
            await Hub.join(self.user, name)  # every connection of the user gets joined
        self._ack(ref)

    async def do_leave(self, frame: dict, ref: Any) -> None:
        # {"type":"leave","room":"python"}
        room = self._my_room(frame.get("room"))
        await Hub.leave(self.user, room)  # every connection of the user gets left
        self._ack(ref)

    async def do_rooms(self, frame: dict, ref: Any) -> None:
        # {"type":"rooms"}
        listing = [{"name": r.name, "members": len(r.members)} for _, r in sorted(Hub.rooms.items())]
        self.send(rooms_frame(listing))
        self._ack(ref)

    async def do_members(self, frame: dict, ref: Any) -> None:
        # {"type":"members","room":"general","after":"Name"}  or, for everyone online, without "room"
        if frame.get("room") is not None:
            room = self._my_room(frame["room"])
            names, more = page_after(room.names, frame.get("after"), Hub.conf.roster)
            self.send(members_frame(room.name, names, more), bulk=True)
        else:
            names, more = page_after(Announcer.names, frame.get("after"), Hub.conf.roster)
            self.send(members_frame(None, names, more), bulk=True)
        self._ack(ref)

    async def do_history(self, frame: dict, ref: Any) -> None:
        # {"type":"history","room":"general","before":101,"limit":50}
        # {"type":"history","with":"UserB",...}  or  {"type":"history","directs":true,...}
        before, limit = check_page(frame)
        if frame.get("room") is not None:
            room = self._my_room(frame["room"])
            head: dict = {"room": room.name}
            rows = Hub.store.room_page(key(room.name), before, limit + 1)
        elif frame.get("with") is not None:
            other = self._known_user(frame["with"])
            head = {"with": other.name}
            rows = Hub.store.direct_page(self.user, key(other.name), before, 0, limit + 1)
        elif frame.get("directs") is True:
            head = {"directs": True}
            rows = Hub.store.direct_page(self.user, None, before, 0, limit + 1)
        else:
            raise ChatError("bad_request", "history needs a 'room', a 'with', or \"directs\": true")
        more, budget, kept = len(rows) > limit, Hub.conf.max_queue, []
        for row in rows[:limit]:  # newest first: keep the newest that fit
            payload = dressed(row, self.user)
            if len(payload) > budget and kept:
                more = True
                break
            budget -= len(payload)
            kept.append((row, payload))
        kept.reverse()
        self.send_payload(listing_payload("history", head, [p for _, p in kept], more))
        mail = [row for row, _ in kept if row[3] == self.user and not row[4]]
        if mail and not self._dead:  # not if the answer just closed it (1013): they were not delivered
            Hub.deliver(self.user, mail)
        self._ack(ref)

    async def do_search(self, frame: dict, ref: Any) -> None:
        # {"type":"search","q":"deploy logs","before":230}
        q = frame.get("q")
        if not isinstance(q, str) or len(q) > MAX_QUERY or not is_unicode(q):
            raise ChatError("bad_request", f"'q' must be a search of at most {MAX_QUERY} characters of text")
        words = WORD.findall(q)[:20]
        if not words:
            raise ChatError("bad_request", "search for at least one word")
        before, _ = check_page({"before": frame.get("before")})
        rooms = sorted(Hub.users[self.user].rooms)  # the rooms it is in now, and its own private messages
        rows = Hub.store.search(self.user, rooms, words, before, SEARCH_PAGE + 1)
        found = [dressed(row, self.user) for row in rows[:SEARCH_PAGE]]
        self.send_payload(listing_payload("results", {"q": q}, found, len(rows) > SEARCH_PAGE))
        self._ack(ref)

    async def do_read(self, frame: dict, ref: Any) -> None:
        # {"type":"read","room":"general","id":150}  or  {"type":"read","with":"UserB","id":140}
        id = frame.get("id")
        if not (is_int(id) and 0 < id <= Hub.last_id):
            raise ChatError("bad_request", "'id' must be a message id")
        if frame.get("room") is not None:
            room = self._my_room(frame["room"])
            conv, head = "#" + key(room.name), {"room": room.name}
        elif frame.get("with") is not None:
            other = self._known_user(frame["with"])
            conv, head = "@" + key(other.name), {"with": other.name}
        else:
            raise ChatError("bad_request", "read needs a 'room' or a 'with'")
        await Hub.read(self.user, conv, id, head, self)
        self._ack(ref)

    async def do_link(self, frame: dict, ref: Any) -> None:
        # {"type":"link"}
        code, expires = await Hub.link(self.user)
        self.send(link_frame(code, utc_iso(expires)))
        self._ack(ref)

    async def do_devices(self, frame: dict, ref: Any) -> None:
        # {"type":"devices"}
        listing = [{"id": id, "label": label, "last_used": used, "current": id == self.device}
                   for id, label, used in Hub.store.devices(self.user)]
        self.send(devices_frame(listing))
        self._ack(ref)

    async def do_revoke(self, frame: dict, ref: Any) -> None:
        # {"type":"revoke","device":3}
        device = frame.get("device")
        if not is_int(device) or device not in [id for id, _, _ in Hub.store.devices(self.user)]:
            raise ChatError("bad_request", "'device' must be the id of one of your devices")
        self._signed_out(await Hub.revoke(self.user, device), ref)

    async def do_logout(self, frame: dict, ref: Any) -> None:
        # {"type":"logout"}
        self._signed_out(await Hub.revoke(self.user, self.device), ref)

    def _signed_out(self, connections: list[ChatSocket], ref: Any) -> None:
        """The revoke is stored: ack it, then close the device's connections."""
        self._ack(ref)
        for connection in connections:
            connection.refuse(ChatError("revoked", "this device was signed out"), 4401)

    async def do_typing(self, frame: dict, ref: Any) -> None:
        # {"type":"typing","room":"general"}  or  {"type":"typing","to":"UserB"}
        me = Hub.users[self.user].name
        if frame.get("room") is not None:
            room = self._my_room(frame["room"])
            Hub.backplane.signal({"kind": "typing", "user": me, "room": room.name})
        elif frame.get("to") is not None:
            to = self._known_user(frame["to"])
            if key(to.name) != self.user:  # your other tabs need not see you typing
                Hub.backplane.signal({"kind": "typing", "user": me, "to": to.name})
        else:
            raise ChatError("bad_request", "typing needs a 'room' or a 'to'")
        self._ack(ref)

    # ---- sending and closing

    def send(self, frame: dict, bulk: bool = False) -> None:
        """One frame to this connection (an answer: with --redis, held in frame order, see Pipeline)."""
        if not Pipeline.hold(self, frame, None, bulk):
            send_to((self,), frame, bulk=bulk)

    def send_payload(self, payload: bytes) -> None:
        """An answer this connection asked for, already encoded."""
        if not Pipeline.hold(self, None, payload, True):
            send_to((self,), None, payload, bulk=True)

    def too_slow(self) -> None:
        """It stopped reading: the kernel holds all it will and still more is
        owed. Drop it rather than hold it for ever; it can come back with
        ?since= and miss nothing."""
        log.info("closing a connection of %s: %d bytes unread", self.user, self.outbox.owed)
        Metrics.count("closes", "1013")
        self.outbox.close(drain=False)
        self._close(1013, "too slow; reconnect with since")

    def _close(self, code: int, reason: str) -> None:
        """Close after whatever is queued (an error frame explaining why)."""
        self._stop_awaiting()
        self.outbox.close(drain=not self._dead)
        self._dead = True
        self.close(code, reason)
        self._depart()  # gone now for everybody else, not after the close handshake

    @classmethod
    def close_all(cls, code: int, reason: str, depart: bool = True) -> None:
        """Close every connection (shutdown, Hub.lost), those still waiting
        for their auth frame too. Nobody is told about the others leaving:
        they are all leaving, and will be back. Without depart, they leave
        state that is about to be loaded again."""
        everyone = Hub.everyone_but() + list(cls.awaiting)
        for connection in everyone:
            connection._stop_awaiting()  # an auth frame that comes now is not read
            connection._dead = True
            connection._departed = connection._departed or not depart
            connection.outbox.close(drain=False)
        for connection in everyone:
            connection.close(code, reason)

    # ---- the handshake

    corked: ClassVar[dict[int, socket.socket]] = {}  # id(connection) -> its socket, while get holds the 101 back

    def get(self, *args: Any, **kwargs: Any) -> Awaitable[None]:
        # Tornado sends the 101 response by itself, and the connect sequence
        # a moment later: two packets, two wake-ups of the client. Corked,
        # they leave as one when open() is done (at most 200 ms later if
        # anything went wrong: Linux sends a corked socket's data by then).
        # Not a coroutine: Tornado's get() runs for the connection's whole
        # life, and a coroutine around it would keep one more frame alive.
        if TCP_CORK is not None:
            with contextlib.suppress(OSError, AttributeError):
                stream = self.request.connection.stream  # type: ignore[union-attr]
                sock = stream.socket
                # Nagle's algorithm off for good, now. Tornado switches it on
                # and off around each response, a system call each time, and
                # switching it on sends what a corked socket holds: the 101
                # would leave alone after all.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream.set_nodelay = nagle_stays_off  # type: ignore[method-assign]
                sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 1)
                ChatSocket.corked[id(self)] = sock  # not an attribute: it would stay in every connection's dict
        return super().get(*args, **kwargs)

    def on_finish(self) -> None:
        if self.get_status() != 101:  # a refused handshake: its answer goes now
            self._uncork()

    def _uncork(self) -> None:
        """Write what the connect sequence queued, then let it all go."""
        sock = ChatSocket.corked.pop(id(self), None)
        if sock is None:
            return
        outbox = getattr(self, "outbox", None)
        if outbox is not None and outbox.stream is not None and not outbox.closed:
            outbox.flush()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 0)

    def prepare(self) -> None:
        check_host(self)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's error log line names the request; ours blots out the token."""
        if isinstance(value, tornado.web.HTTPError):
            access_log.warning("%d %s: %s", value.status_code, redact(self.request.uri or ""), value.log_message)
        else:
            log.error("error in %s", redact(self.request.uri or ""), exc_info=(typ, value, tb))

    def check_origin(self, origin: str) -> bool:
        """Same origin (Tornado's check), or one listed with --origins."""
        return super().check_origin(origin) or origin.rstrip("/").lower() in Hub.conf.origins
################ The page, health, and who may ask


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_allowed(host: str, port: int, conf: Config) -> bool:
    """Whether a request's Host header names this server, listening on port.

    A browser sends the Host it resolved, so a page on rebind.attacker.example
    that made that name point at 127.0.0.1 (DNS rebinding) still says
    rebind.attacker.example, and is refused. Allowed: a loopback name or the
    --host address on our port; when listening on every address, any IP
    address on our port (an address cannot be rebound); a name listed with
    --hosts (NAME matches any port, NAME:PORT that one) or in --origins.
    """
    host = host.lower()
    name, given = tornado.httputil.split_host_and_port(host)
    if host in conf.hosts or name in conf.hosts:
        return True
    if given != port:
        return False
    if name in LOOPBACK_NAMES or name.strip("[]") == conf.host.lower():
        return True
    if conf.host in ("0.0.0.0", "::", ""):
        try:
            ipaddress.ip_address(name.strip("[]"))
            return True
        except ValueError:
            return False
    return False


def by_address(host: str) -> bool:
    """Whether a Host header names this machine by address (an IP address,
    or localhost), on any port. No page on another name can make a browser
    send that (DNS rebinding), nor does a proxy that passes its public name
    on."""
    name = tornado.httputil.split_host_and_port(host.lower())[0].strip("[]")
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def check_host(handler: tornado.web.RequestHandler) -> None:
    """403 unless the request's Host is this server's (see host_allowed)."""
    try:
        port = handler.request.connection.stream.socket.getsockname()[1]  # type: ignore[union-attr]
    except (AttributeError, OSError):
        port = Hub.conf.port
    if not host_allowed(handler.request.host, port, Hub.conf):
        raise tornado.web.HTTPError(403, "Host %r is not this server's (see --hosts)", handler.request.host[:100])


class PageHandler(tornado.web.RequestHandler):
    """GET /: the whole page, with headers that keep it to itself."""

    page: ClassVar[bytes] = b""
    policy: ClassVar[str] = ""

    @classmethod
    def load(cls, path: str) -> None:
        """Read index.html and allow exactly its inline scripts, by hash."""
        try:
            with open(path, "rb") as f:
                cls.page = f.read()
        except OSError:
            cls.page = b"<!doctype html><title>chat</title><p>index.html is missing next to chat.py."
        scripts = re.findall(rb"<script\b[^>]*>(.*?)</script>", cls.page, re.DOTALL)
        hashes = " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s).digest()).decode() for s in scripts)
        cls.policy = (f"default-src 'none'; script-src {hashes or chr(39) + 'none' + chr(39)}; "
                      "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                      "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

    def prepare(self) -> None:
        check_host(self)

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", self.policy)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(self.page)


class HealthHandler(tornado.web.RequestHandler):
    """GET /healthz: is it up, and how busy. Open to any Host: it tells
    nothing private, and load balancers probe it by address."""

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        status = Hub.backplane.health()
        if status != "ok":
            self.set_status(503)  # a load balancer sends nobody here until it is back
        health = {
            "status": status,
            "connections": sum(len(tabs) for tabs in Hub.online.values()),
            "users_online": len(Hub.present),
            "rooms": len(Hub.rooms),
        }
        if Hub.backplane.waits:
            health["node"] = Hub.backplane.node
        self.write(health)


class MetricsHandler(tornado.web.RequestHandler):
    """GET /metrics: Prometheus text format, for loopback and --metrics_from
    only, asked for by address (by_address)."""

    def get(self) -> None:
        if not by_address(self.request.host):  # a proxy on this machine would look like loopback
            raise tornado.web.HTTPError(403, "ask for /metrics by address, not by name (Host %r)", self.request.host[:100])
        ip = self.request.remote_ip or ""
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(ip).is_loopback and ip not in Hub.conf.metrics_from:
                raise tornado.web.HTTPError(403, "metrics are not open to %s (see --metrics_from)", ip)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(Metrics.render())


def redact(uri: str) -> str:
    """The URI with every token and link code blotted out, however their
    names are spelled (%74oken= is token= to Tornado too)."""
    path, _, query = uri.partition("?")
    if not query:
        return uri
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}=***" if urllib.parse.unquote_plus(name) in ("token", "link") else part)
    return path + "?" + "&".join(parts)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with tokens blotted out of the URL. An
    accepted WebSocket (101) is a debug line: a storm would log thousands.
    A /healthz that says "degraded" (503) is a warning: the backplane has
    logged why, and a load balancer asks every few seconds."""
    status = handler.get_status()
    if status == 101 and not access_log.isEnabledFor(logging.DEBUG):
        return  # nothing to format: arrivals in a storm each skip it
    degraded = status == 503 and isinstance(handler, HealthHandler)
    write = (access_log.debug if status == 101 else access_log.info if status < 400
             else access_log.warning if status < 500 or degraded else access_log.error)
    write("%d %s %s (%s) %.2fms", status, handler.request.method, redact(handler.request.uri or ""),
          handler.request.remote_ip, 1000.0 * handler.request.request_time())


################ Connections: the TCP side


class Listener(tornado.httpserver.HTTPServer):
    """The HTTP server, with the limits that apply before any request is read.

    - Every open connection counts against --max_conns: HTTP ones (still
      sending headers, or idle between requests) and WebSockets alike. Past
      it a connection gets a bare 503 and is closed.
    - A request's headers must arrive within --header_timeout seconds.
    - Running out of file descriptors (EMFILE) pauses accepting for
      ACCEPT_PAUSE instead of failing on every turn of the event loop, logs
      at most one line a second, and resumes by itself. Tornado's own accept
      loop (netutil.add_accept_handler) raises there, and the listening
      socket stays readable, so the server would spin and log a traceback
      for every try.
    """

    ACCEPT_PAUSE = 0.1  # seconds
    REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    max_conns = 0
    http_open = 0  # HTTP connections open; a WebSocket leaves this count when it upgrades
    starved = 0  # accepts that failed since the last log line
    starved_logged = -1.0

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple) -> None:
        if self.max_conns and self.http_open + ChatSocket.sockets >= self.max_conns:
            with contextlib.suppress(OSError):
                stream.socket.send(self.REFUSED)
            stream.close()
            return
        self.http_open += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self.http_open -= 1
        super().on_close(server_conn)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_from(sock)

    def _accept_from(self, sock: socket.socket) -> Callable[[], None]:
        """Accept connections on sock as the event loop reports them; returns
        the function that stops it (as add_accept_handler does)."""
        loop = tornado.ioloop.IOLoop.current()
        state: dict[str, Any] = {"stopped": False, "paused": None}

        def accept(fd: Any, events: int) -> None:
            for _ in range(128):  # then let other work run
                if state["stopped"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for some to free up
                    self._starving(e)
                    loop.remove_handler(sock)
                    state["paused"] = loop.call_later(self.ACCEPT_PAUSE, resume)
                    return
                self._handle_connection(connection, address)

        def resume() -> None:
            state["paused"] = None
            if not state["stopped"]:
                loop.add_handler(sock, accept, loop.READ)

        def stop() -> None:
            state["stopped"] = True
            if state["paused"] is not None:
                loop.remove_timeout(state["paused"])
            else:
                loop.remove_handler(sock)

        loop.add_handler(sock, accept, loop.READ)
        return stop

    def _starving(self, error: OSError) -> None:
        self.starved += 1
        now = time.monotonic()
        if now - self.starved_logged >= 1.0:
            log.warning("cannot accept connections (%s), %d times; pausing", error.strerror or error, self.starved)
            self.starved, self.starved_logged = 0, now


################ Start-up


def make_app(**overrides: Any) -> tornado.web.Application:
    """A fresh application: settings from the options and overrides, state
    loaded from the database. Tests call it once per test."""
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    values = {name: overrides.get(name, options[name]) for name in SETTINGS}
    values["origins"] = [o.rstrip("/").lower() for o in values["origins"]]
    # A host named in --origins is ours too; --hosts entries are NAME or NAME:PORT.
    values["hosts"] = ({h.strip().lower() for h in values["hosts"] if h.strip()}
                       | {urllib.parse.urlsplit(o).netloc for o in values["origins"]} - {""})
    values["ping_timeout"] = min(values["ping_timeout"], values["ping_interval"])
    conf = Config(**values)
    check_name(conf.default_room, "bad_room")

    if getattr(Hub, "store", None) is not None:
        Hub.store.close()  # a new app on the same file is a restart
        Hub.store = None  # type: ignore[assignment]
    if conf.redis:
        import chat_redis  # only with --redis: chat.py runs with Tornado alone
        backplane: Backplane = chat_redis.RedisBackplane(sys.modules[__name__], conf)
        Hub.load(conf, Store(backplane.projection), backplane)  # empty: start() fills it from Redis
    else:
        Hub.load(conf, Store(conf.db))
    ChatSocket.sockets, Outbox.dirty = 0, []
    Metrics.reset()

    PageHandler.load(os.path.join(HERE, "index.html"))
    return tornado.web.Application(
        [(r"/", PageHandler), (r"/ws", ChatSocket), (r"/healthz", HealthHandler), (r"/metrics", MetricsHandler)],
        websocket_max_message_size=MAX_FRAME,
        log_function=log_request,
        autoreload=conf.debug,
        serve_traceback=conf.debug,
    )


FLAGS = {"debug", "help", "log_to_stderr"}  # options that take no value


class UsageError(Exception):
    """A mistake on the command line or in --config: one line, exit 2."""


def normalize_argv(argv: list) -> list:
    """Accept "--port 5000" as well as Tornado's own "--port=5000"; refuse
    an unknown option here, before Tornado prints its whole help."""
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0].replace("-", "_")
        if not arg.startswith("--") or (name not in options and arg != "--"):
            raise UsageError(f"unknown option {arg!r}")
        if ("=" not in arg and name in options and name not in FLAGS
                and i + 1 < len(argv) and not argv[i + 1].startswith("--")):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def parse_args(argv: list) -> None:
    """Command line over config file over defaults; UsageError for a mistake."""
    argv = normalize_argv(argv)
    try:
        parse_command_line(argv, final=False)
    except (tornado.options.Error, ValueError) as e:
        raise UsageError(str(e)) from None
    if options.config:
        try:
            parse_config_file(options.config, final=False)
        except Exception as e:  # a missing file, a syntax error, a bad value: the file is the user's to fix
            raise UsageError(f"cannot use --config {options.config}: {e}") from None
    try:
        parse_command_line(argv)
    except (tornado.options.Error, ValueError) as e:
        raise UsageError(str(e)) from None
    if options.debug:
        logging.getLogger().setLevel(logging.DEBUG)


def release(name: str, db: str) -> int:
    """python chat.py --release NAME: free a name whose devices are all lost.
    Run it with the server stopped: a running server keeps the name in RAM."""
    try:
        store = Store(db)
    except StoreError as e:
        log.error("%s", e)
        return 1
    try:
        found = store.release(key(name))
    finally:
        store.close()
    print(f"released {name}: its devices and rooms are gone, its messages stay" if found
          else f"nobody called {name} in {db}", file=sys.stderr)
    return 0 if found else 1


def device_label(agent: str) -> str:
    """What a device list calls a browser: its family, from the User-Agent."""
    for needle, label in (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
                          ("Chromium/", "Chromium"), ("Safari/", "Safari"), ("curl/", "curl"),
                          ("Python", "Python"), ("websockets", "Python")):
        if needle in agent:
            return label
    return "Browser" if "Mozilla" in agent else "Other"


def raise_file_limit() -> None:
    """Each connection is a file descriptor: allow as many as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run() -> int:
    """The command line: options, then one process, or with --processes a
    parent that starts the workers, passes a stop on to them and waits."""
    try:
        parse_args(sys.argv)
        if options.processes != 1 and not options.redis:
            raise UsageError("--processes needs --redis: processes share their state through it")
        if options.processes < 0:
            raise UsageError("--processes must be 0 (one per core) or more")
    except UsageError as e:
        print(f"chat.py: {e} (see python chat.py --help)", file=sys.stderr)
        return 2
    if options.release:
        if options.redis:
            print("chat.py: --release works on a --db file, not with --redis", file=sys.stderr)
            return 2
        return release(options.release, options.db)
    count = options.processes or os.cpu_count() or 1
    if count == 1:
        return asyncio.run(main())
    workers = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # a worker: it binds the port itself (SO_REUSEPORT) and dies with its parent
            with contextlib.suppress(OSError, AttributeError):
                import ctypes
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            os._exit(asyncio.run(main(reuse_port=True)))
        workers.append(pid)
    def stop(signum: int, _: Any) -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    for _ in workers:
        _, code = os.wait()
        status = status or os.waitstatus_to_exitcode(code)
    return status


async def main(reuse_port: bool = False) -> int:
    raise_file_limit()
    # The cyclic collector's defaults (700, 10, 10) suit small scripts: here
    # tens of thousands of long-lived connection objects make every full
    # collection a pause of a tenth of a second or more, and arrivals spent
    # about a fifth of their CPU in it. Refcounting frees almost everything;
    # the collector still runs, every 50,000 allocations. The middle
    # generation is collected every second time, while it holds about
    # 100,000 objects: at 20 it held a million, and 10,000 arrivals met
    # one pause of 0.36-0.39 s; at 2, pauses of 0.10-0.13 s, about the same
    # CPU in all.
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        app = make_app()
        await Hub.backplane.start()
        server = Listener(app, idle_connection_timeout=options.header_timeout, body_timeout=options.header_timeout)
        server.max_conns = options.max_conns
        # A reconnect storm is thousands of connects at once: Tornado's default
        # backlog of 128 overflows, and the kernel drops the rest for seconds.
        server.add_sockets(tornado.netutil.bind_sockets(options.port, options.host, backlog=LISTEN_BACKLOG,
                                                        reuse_port=reuse_port))
    except (StoreError, OSError) as e:
        log.error("%s", e)
        return 1
    where = Hub.backplane.describe() if options.redis else f"database {options.db}"
    log.info("listening on http://%s:%d/ (%s)", options.host, options.port, where)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down")
    server.stop()  # no new connections
    ChatSocket.close_all(1001, "server shutting down")
    deadline = time.monotonic() + 3
    while Hub.online and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # let close handshakes finish
    await Hub.backplane.stop()
    Hub.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(run())
