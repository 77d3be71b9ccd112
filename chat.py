"""chat.py: a small, self-hostable real-time chat server in one Tornado module.

Run it with ``python chat.py --port 5000`` and open
``http://localhost:5000/?username=UserA``. Everything below this docstring
implements the protocol it describes.

Endpoints
---------
``GET /``         the page (index.html: HTML, CSS and JS in one file).
``GET /healthz``  ``{"status":"ok","connections":3,"users_online":2,"rooms":4}``.
``GET /ws?username=NAME[&token=TOKEN][&since=ID]``  the WebSocket.

Names
-----
User and room names are 1-32 characters from ``A-Z a-z 0-9 _ - .``. They are
matched case-insensitively (``@userb`` reaches ``UserB``, ``General`` is
``general``) and shown as first written.

The first connection to a free name owns it and receives a ``token`` in its
``welcome``. Every later connection to that name must present ``token=``;
without it the server answers ``name_taken`` and closes with 4409. One user
may hold many connections (tabs); each receives everything sent to the user.

Frames
------
One JSON object per text frame, always with a ``"type"``. The same key names
are used in both directions. A client frame may carry ``"ref"`` (a string of
at most 100 characters or an integer): such a frame is answered on its
connection by exactly one ``ack`` or one ``error`` carrying that ``ref``.

On connect the server sends, in order:

1. ``{"type":"welcome","user":"UserA","token":"...","online":["UserA"],
   "rooms":["general"],"default_room":"general","max_text":2000,
   "epoch":"9f2c..."}`` (the epoch names the database that ids count in)
2. for each of the user's rooms ``{"type":"joined","room":"general",
   "members":["UserA","UserB"],"history":[message, ...]}`` (oldest first);
3. direct messages, oldest first: every buffered one (``"buffered": true``),
   and with ``since=ID`` also every one to or from the user with a larger id.

With ``since=ID`` (the highest id the client has seen) each ``history``
holds only messages with a larger id, plus ``"truncated": true`` when more
were missed than the history keeps. A ``since`` that is not a number is
ignored, and one sent with another database's ``epoch=`` counts as 0.
Private messages all go; the room histories of one connect sequence share
what is left of ``--max_queue`` bytes, and a room cut short is
``"truncated"`` too: a ``join`` of it returns up to ``--max_queue`` bytes.
The sequence is not in id order, so a client should move its resume point
only after it has all of it: the answer to its first frame comes after it.

Presence goes to everybody else when a user's first connection opens and
when the last one closes:
``{"type":"presence","user":"UserB","status":"online"}`` (or ``"offline"``).

Client to server, and what comes back::

    {"type":"message","room":"general","text":"hello","ref":1}
        -> to every member: {"type":"message","id":101,"room":"general",
           "from":"UserA","text":"hello","ts":"2026-11-24T15:04:05.123Z",
           "time":"15:04:05"}; to the sender also {"type":"ack","ref":1,"id":101}
    {"type":"message","text":"@UserB hi"}   a direct message ("@name" + ASCII
                                            white space starts one)
        -> to both users: {"type":"direct","id":102,"from":"UserA",
           "to":"UserB","text":"hi","ts":...,"time":...}. If UserB has no
           connection it is kept for them, the ack says "queued": true, and
           the sender later gets {"type":"delivered","id":102,"to":"UserB"}.
    {"type":"join","room":"python"}     -> {"type":"joined",...}; others get
                                           {"type":"member","room":"python",
                                            "user":"UserA","action":"join"}
    {"type":"leave","room":"python"}    -> {"type":"left","room":"python"};
                                           others get "action":"leave"
    {"type":"rooms"}                    -> {"type":"rooms","rooms":
                                            [{"name":"general","members":12}]}
    {"type":"typing","room":"general"}  -> others get {"type":"typing",
    {"type":"typing","to":"UserB"}         "user":"UserA","room":...} or "to"

``id`` is an integer that increases over every message of the server; ``ts``
is UTC with milliseconds; ``time`` is local, in ``--timestamp_format``. Text
is stored and relayed exactly as sent: escaping it is the page's job.

Errors
------
``{"type":"error","code":CODE,"message":"a sentence","ref":...}``; the
connection stays open and nothing else changes. Codes: ``bad_json`` (also for
binary frames), ``bad_request``, ``bad_room``, ``not_in_room``, ``too_long``,
``unknown_user``, ``mailbox_full``, ``rate_limited``, ``too_many_rooms``,
``server_error``; at connect ``bad_username`` (close 4400), ``name_taken``
(4409), ``too_many_connections`` (4429), ``server_full`` (4503).

Limits
------
A frame over 64 KiB closes with 1009. A connection that owes more than
``--max_queue`` bytes beyond the answers it asked for (its connect sequence,
then joins, up to ``--max_queue`` bytes of them at a time) has stopped
reading: it is closed with 1013 and may resume with ``since``. Server
shutdown closes with 1001. ``--max_text`` code points per message, ``--rate``/``--burst`` frames
per connection, ``--history`` messages per room, ``--mailbox`` buffered
messages per user, ``--max_tabs`` and ``--max_conns_per_ip`` connections,
``--max_rooms`` rooms, ``--max_users`` owned names, ``--names_per_hour``
new names per address (``rate_limited``, close 4429). A client that stops
answering pings (a pong counts only if it echoes the latest ping, which
waits behind everything the client is owed; a write the kernel had to hold
back and then took counts too) is dropped after ``--ping_interval`` +
``--ping_timeout`` seconds.

Storage
-------
SQLite (``--db``, WAL mode) is written before anything is acked or relayed;
the class-level dicts on ChatSocket are the live state, loaded at start.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
from typing import Any, ClassVar, Iterable, Optional

import tornado.ioloop
import tornado.iostream
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
define("max_tabs", default=10, help="connections per user (0: no cap)")
define("max_conns_per_ip", default=200, help="connections per address (0: no cap)")
define("max_rooms", default=1000, help="rooms on the server (0: no cap)")
define("max_users", default=10000, help="owned names on the server (0: no cap)")
define("names_per_hour", default=30.0, help="new names one address may claim per hour, after 10 at once (0: no cap)")
define("max_queue", default=1 << 20, help="bytes one connection may be owed before it is closed (1013)")
define("ping_interval", default=20.0, help="seconds between pings")
define("ping_timeout", default=20.0, help="seconds to wait for a pong (at most ping_interval)")

MAX_FRAME = 64 * 1024  # bytes in one client frame; larger closes with 1009
MAX_REF = 100  # characters in a string ref
WRITE_CHUNK = 256 * 1024  # frames handed to the kernel at once (a bigger frame goes whole): each done shows the reader is alive
NAMES_AT_ONCE = 10  # new names one address may claim before --names_per_hour applies


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
    max_tabs: int
    max_conns_per_ip: int
    max_rooms: int
    max_users: int
    names_per_hour: float
    max_queue: int
    ping_interval: float
    ping_timeout: float


SETTINGS = [field.name for field in dataclasses.fields(Config)]  # what make_app() may override


################ Names and validation

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
# "@name" + white space at the start of a text makes it a direct message. The
# white space is ASCII only, and the page uses the very same class: a text the
# page shows as private must never be posted to a room.
DIRECT = re.compile(r"@([A-Za-z0-9_.\-]{1,32})[ \t\n\r\f\v]+(.*)", re.DOTALL)
# Text made only of these shows nothing: white space and zero-width characters.
BLANK = re.compile(r"[\s\u180e\u200b-\u200f\u2060-\u2064\ufeff]*")


class ChatError(Exception):
    """A client's mistake: becomes one error frame and changes nothing else."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def key(name: str) -> str:
    """The case-insensitive identity of a user or room name."""
    return name.lower()


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
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    raise ChatError("bad_request", f"'ref' must be an integer or a string of at most {MAX_REF} characters")


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


def parse_since(value: Optional[str]) -> Optional[int]:
    """The resume point from ?since=, or None when absent or not a message id
    (plain digits, within SQLite's integers)."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


################ Outgoing frames: each shape is built here and nowhere else


def stamp(timestamp_format: str) -> tuple[str, str]:
    """(UTC ISO 8601 with milliseconds, local time in timestamp_format) for now."""
    ms = time.time_ns() // 1_000_000
    seconds, millis = divmod(ms, 1000)
    utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{utc}.{millis:03d}Z", time.strftime(timestamp_format, time.localtime(seconds))


def welcome_frame(user: str, token: str, online: list, rooms: list, conf: Config, epoch: str) -> dict:
    return {"type": "welcome", "user": user, "token": token, "online": online, "rooms": rooms,
            "default_room": conf.default_room, "max_text": conf.max_text, "epoch": epoch}


def joined_frame(room: str, members: list, history: list, truncated: bool) -> dict:
    frame = {"type": "joined", "room": room, "members": members, "history": history}
    if truncated:
        frame["truncated"] = True
    return frame


def message_frame(id: int, room: str, sender: str, text: str, ts: str, local: str) -> dict:
    return {"type": "message", "id": id, "room": room, "from": sender, "text": text, "ts": ts, "time": local}


def direct_frame(id: int, sender: str, to: str, text: str, ts: str, local: str) -> dict:
    return {"type": "direct", "id": id, "from": sender, "to": to, "text": text, "ts": ts, "time": local}


def delivered_frame(id: int, to: str) -> dict:
    return {"type": "delivered", "id": id, "to": to}


def presence_frame(user: str, status: str) -> dict:
    return {"type": "presence", "user": user, "status": status}


def member_frame(room: str, user: str, action: str) -> dict:
    return {"type": "member", "room": room, "user": user, "action": action}


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


def encode(frame: dict) -> bytes:
    """A frame's JSON payload; done once per frame however many receive it."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


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

    This is the one place that touches Tornado internals: the protocol object
    keeps its stream as ``.stream``, and a frame we build ourselves is only
    right when no compression was negotiated (we never offer it). When this
    returns None the connection falls back to the public write_message().
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


################ Storage: SQLite, written through before anything is acked


class StoreError(Exception):
    """The database cannot be used; raised at start, with a sentence for people."""


class Store:
    """The durable copy of the state: users, rooms, memberships and messages.

    Each change is its own committed transaction (autocommit) before the
    server acks or relays it. WAL with synchronous=NORMAL survives the process
    being killed at any moment; only a power cut may lose the last commits.
    Checkpoints (copying the WAL into the database file) run in a thread of
    their own, so the event loop never waits for one.
    """

    CHECKPOINT_EVERY = 1.0  # seconds

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS users (key TEXT PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS members (room TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (room, user));
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,      -- the message id clients see
        room TEXT,                   -- room key, NULL for a direct message
        sender TEXT NOT NULL,        -- user key
        recipient TEXT,              -- user key of a direct message
        delivered INTEGER NOT NULL,  -- 0 while a direct message waits in a mailbox
        frame TEXT NOT NULL          -- the message frame as JSON, exactly as relayed
    );
    CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id) WHERE room IS NOT NULL;
    CREATE INDEX IF NOT EXISTS directs_by_sender ON messages (sender, id) WHERE room IS NULL;
    CREATE INDEX IF NOT EXISTS directs_by_recipient ON messages (recipient, id) WHERE room IS NULL;
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            if path != ":memory:" and not os.path.exists(path):
                # Create the file ourselves so that it is private from the first byte;
                # SQLite gives its -wal and -shm files the same mode.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
            self.db.executescript(self.SCHEMA)
            self.db.execute("BEGIN IMMEDIATE")  # proves we can write, now rather than mid-chat
            # The epoch names this database: message ids count within it, so a
            # client that saw ids from another (deleted, or :memory:) must start over.
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
            self.db.execute("COMMIT")
            self.epoch: str = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot use database {path!r}: {e}") from None
        self.stopping = threading.Event()
        self.checkpointer: Optional[threading.Thread] = None
        if path != ":memory:":
            self.checkpointer = threading.Thread(target=self._checkpoints, name="checkpoint", daemon=True)
            self.checkpointer.start()

    def _checkpoints(self) -> None:
        """In its own thread and connection: fold the WAL into the database
        now and then. PASSIVE never blocks the server's writes."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self.stopping.wait(self.CHECKPOINT_EVERY):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            log.warning("checkpoints of %s stopped: %s", self.path, e)
        finally:
            db.close()

    def load(self, history: int) -> dict:
        """Everything the live state starts from."""
        q = self.db.execute
        rooms = {k: n for k, n in q("SELECT key, name FROM rooms")}
        return {
            "users": q("SELECT key, name, token_hash FROM users").fetchall(),
            "rooms": rooms,
            "members": q("SELECT room, user FROM members").fetchall(),
            "history": {
                k: [(json.loads(f), len(f.encode())) for (f,) in reversed(q(
                    "SELECT frame FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?", (k, history)
                ).fetchall())]
                for k in rooms
            },
            "undelivered": [(r, json.loads(f)) for r, f in q(
                "SELECT recipient, frame FROM messages WHERE room IS NULL AND delivered = 0 ORDER BY id")],
            "last_id": q("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0],
        }

    def add_user(self, user: str, name: str, token_hash: str) -> None:
        self.db.execute("INSERT INTO users VALUES (?, ?, ?)", (user, name, token_hash))

    def add_room(self, room: str, name: str) -> None:
        self.db.execute("INSERT INTO rooms VALUES (?, ?)", (room, name))

    def set_member(self, room: str, user: str, member: bool) -> None:
        if member:
            self.db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (room, user))
        else:
            self.db.execute("DELETE FROM members WHERE room = ? AND user = ?", (room, user))

    def add_message(self, id: int, room: Optional[str], sender: str, recipient: Optional[str],
                    delivered: bool, payload: bytes) -> None:
        self.db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                        (id, room, sender, recipient, int(delivered), payload.decode()))

    def mark_delivered(self, ids: list) -> None:
        self.db.execute("BEGIN")  # one commit for a whole mailbox, not one per message
        self.db.executemany("UPDATE messages SET delivered = 1 WHERE id = ?", [(i,) for i in ids])
        self.db.execute("COMMIT")

    def directs_since(self, user: str, since: int, limit: int) -> list:
        """The newest `limit` direct messages to or from user with id > since,
        oldest first, as (frame, its size as JSON bytes)."""
        rows = self.db.execute(
            "SELECT frame FROM messages WHERE room IS NULL AND (sender = ? OR recipient = ?) AND id > ?"
            " ORDER BY id DESC LIMIT ?", (user, user, since, limit)).fetchall()
        return [(json.loads(f), len(f.encode())) for (f,) in reversed(rows)]

    def count_since(self, room: str, since: int) -> int:
        return self.db.execute("SELECT count(*) FROM messages WHERE room = ? AND id > ?", (room, since)).fetchone()[0]

    def close(self) -> None:
        """Fold the WAL back into the database file and close it."""
        self.stopping.set()
        if self.checkpointer is not None:
            self.checkpointer.join()
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("checkpoint of %s failed: %s", self.path, e)
        self.db.close()


def token_hash(token: str) -> str:
    """What is stored instead of a token. Tokens are 192 random bits, so a
    plain SHA-256 cannot be reversed by guessing; no salt or slow hash needed."""
    return hashlib.sha256(token.encode()).hexdigest()


################ Live state


class User:
    """An owned name."""

    __slots__ = ("name", "token_hash", "rooms")

    def __init__(self, name: str, token_hash: str) -> None:
        self.name = name  # as first written
        self.token_hash = token_hash
        self.rooms: set[str] = set()  # room keys; changed only by ChatSocket._set_member

    def owns(self, token: Optional[str]) -> bool:
        return token is not None and hmac.compare_digest(token_hash(token), self.token_hash)


class Room:
    """A room: who belongs to it and its recent messages."""

    __slots__ = ("name", "members", "history")

    def __init__(self, name: str, history: int) -> None:
        self.name = name
        self.members: set[str] = set()  # user keys; changed only by ChatSocket._set_member
        # (message frame, its size as JSON bytes), oldest first; the size is
        # known when it is sent, and connect sequences budget by it
        self.history: collections.deque = collections.deque(maxlen=history)


################ The socket


class ChatSocket(tornado.websocket.WebSocketHandler):
    """One connection of one user. The class holds the server's live state."""

    conf: ClassVar[Config]
    store: ClassVar[Store]
    users: ClassVar[dict[str, User]] = {}  # user key -> owned name; changed by _claim
    rooms: ClassVar[dict[str, Room]] = {}  # room key -> room; changed by _room, _set_member, _post
    online: ClassVar[dict[str, set[ChatSocket]]] = {}  # user key -> open connections; changed by _arrive, _depart
    mailboxes: ClassVar[dict[str, dict[int, dict]]] = {}  # user key -> undelivered DMs by id; changed by _direct, _deliver_mail
    per_ip: ClassVar[dict[str, int]] = {}  # address -> open connections; changed by _arrive, _depart
    claims: ClassVar[dict[str, tuple[float, float]]] = {}  # address -> (names it may claim, when); changed by _may_claim
    last_id: ClassVar[int] = 0  # the highest message id given out; changed by _next_id
    dirty: ClassVar[list[ChatSocket]] = []  # connections with frames to write this loop turn
    pinger: ClassVar[Optional[tornado.ioloop.PeriodicCallback]] = None  # runs _ping_all
    ping_payload: ClassVar[bytes] = b""  # this round's ping; only a pong that echoes it counts

    user: Optional[str] = None  # user key, set once the connection is accepted

    # ---- connection life

    def open(self) -> None:
        """Check the name and limits, then send welcome, joined, and mail."""
        self._out: list[bytes] = []  # whole wire frames waiting to be written (a list: a deque costs 600 bytes more)
        self._owed = 0  # bytes queued or being written; beyond the bulk ones, over max_queue means too slow
        self._writing = False
        self._dead = False  # closing: nothing more is written
        self._departed = False
        self._pushed = 0  # bytes ever queued here; with _owed, where each byte stands in line
        self._bulk: list[list[int]] = []  # [start, end) of answers it asked for, not yet all written
        self._bulk_cap = float("inf")  # bulk bytes it may be owed at once: unbounded only while greeting
        self._tokens = float(self.conf.burst)
        self._refill = self._heard = time.monotonic()
        self._stream = raw_stream(self)
        # Frames are already gathered into one write per loop turn; Nagle's
        # algorithm would only hold that write back for the peer's delayed ACK.
        self.set_nodelay(True)
        try:
            name = check_name(self._query("username"), "bad_username")
        except ChatError as e:
            return self._refuse(e, 4400)
        token, since = self._query("token"), parse_since(self._query("since"))
        if since is not None and self._query("epoch") not in (None, self.store.epoch):
            since = 0  # its ids are from another database: everything is new to it
        conf, ip, user = self.conf, self.request.remote_ip, self.users.get(key(name))
        if conf.max_conns_per_ip and self.per_ip.get(ip, 0) >= conf.max_conns_per_ip:
            return self._refuse(ChatError("too_many_connections", "too many connections from your address"), 4429)
        if user is not None and not user.owns(token):
            return self._refuse(ChatError("name_taken", f"{user.name} is taken; pick another name"), 4409)
        if user is not None and conf.max_tabs and len(self.online.get(key(name), ())) >= conf.max_tabs:
            return self._refuse(ChatError("too_many_connections", f"{user.name} has too many tabs open"), 4429)
        if user is None and conf.max_users and len(self.users) >= conf.max_users:
            return self._refuse(ChatError("server_full", "this server has all the users it allows"), 4503)
        if user is None and not self._may_claim(ip):
            return self._refuse(ChatError("rate_limited", "too many new names from your address; try later"), 4429)
        try:
            if user is None:
                token = secrets.token_urlsafe(24)
                user = self._claim(name, token)
        except sqlite3.Error:
            log.exception("could not store the new user %s", name)
            return self._refuse(ChatError("server_error", "the server could not save your name"), 1011)
        self._arrive(key(name), ip)
        try:
            self._greet(user, token, since)
        except Exception:  # a bug, not the client's doing: never leave a ghost online
            log.exception("could not greet %s", user.name)
            self._close(1011, "server error")

    def _query(self, name: str) -> Optional[str]:
        """A query argument, or None when absent or not valid UTF-8."""
        try:
            return self.get_query_argument(name, None, strip=False)
        except tornado.web.HTTPError:
            return None

    def _refuse(self, error: ChatError, code: int) -> None:
        self.send(error_frame(error.code, error.message))
        self._close(code, error.code)

    def _greet(self, user: User, token: str, since: Optional[int]) -> None:
        """The connect sequence: welcome, one joined per room, then direct messages.

        It is sent whole, at the reader's pace (bulk: not counted against
        --max_queue). Private messages, kept or replayed, all go (--mailbox
        bounds them); room histories share what is left of a budget of
        --max_queue bytes, newest first."""
        online = sorted((self.users[u].name for u in self.online), key=key)
        my_rooms = sorted((self.rooms[r].name for r in user.rooms), key=key)
        self.send(welcome_frame(user.name, token, online, my_rooms, self.conf, self.store.epoch), bulk=True)
        mail = self.mailboxes.get(self.user, {})
        replayed = self.store.directs_since(self.user, since, self.conf.mailbox) if since is not None else []
        directs = {m["id"]: m for m, _ in replayed}
        # Private messages cannot be asked for again, so they all go; room
        # histories share what is left of the budget (a join gets the rest).
        budget = max(0, self.conf.max_queue - sum(size for _, size in replayed))
        for r in sorted(user.rooms):
            joined, budget = self._joined(self.rooms[r], since, budget)
            self.send(joined, bulk=True)
        for id in sorted(directs.keys() | mail.keys()):
            if id in mail:
                self.send({**mail[id], "buffered": True}, bulk=True)
            elif id in self.mailboxes.get(key(directs[id]["to"]), {}):
                self.send({**directs[id], "queued": True}, bulk=True)  # one I sent, still waiting
            else:
                self.send(directs[id], bulk=True)
        if mail and not self._dead:
            self._deliver_mail(self.user)
        # From now on answers it asks for (joins) may be owed up to this much
        # beyond --max_queue; a client that asks and never reads is cut off.
        self._bulk_cap = self.conf.max_queue

    def _joined(self, room: Room, since: Optional[int], budget: int) -> tuple[dict, int]:
        """The joined frame for room, holding only messages after since and
        only the newest that fit in budget bytes; and what is left of it.

        The budget keeps one connect sequence, which is sent whole, from
        growing with every room a user is in: a room cut short says
        "truncated", and a join of it later gets up to --max_queue bytes of
        its history (all of it, unless its messages are very long)."""
        history, truncated = list(room.history), False
        if since is not None:
            history = [(m, size) for m, size in history if m["id"] > since]
            if len(history) == room.history.maxlen and len(history) > 0:
                truncated = self.store.count_since(key(room.name), since) > len(history)
        fits = 0
        for _, size in reversed(history):
            if size > budget:
                break
            budget -= size
            fits += 1
        truncated = truncated or fits < len(history)
        kept = [m for m, _ in history[len(history) - fits:]]
        members = sorted((self.users[u].name for u in room.members), key=key)
        return joined_frame(room.name, members, kept, truncated), budget

    def on_close(self) -> None:
        self._dead = True
        if self.user is not None and not self._departed:
            self._depart()

    def on_pong(self, data: bytes) -> None:
        # A client can only echo this round's payload if it read everything
        # we wrote before the ping: a reader that stalled cannot fake it.
        if data == ChatSocket.ping_payload:
            self._heard = time.monotonic()

    # ---- liveness: a client that vanished sends no close frame, so we ask

    @classmethod
    def _ping_all(cls) -> None:
        """Every --ping_interval: ping each connection, and --ping_timeout later
        drop those that answered neither this ping nor anything else.

        A client that vanishes just after a pong is pinged at most one interval
        later and dropped one timeout after that: within 2 x the interval. The
        ping waits behind whatever the connection is owed, so a client that
        stopped reading is dropped the same way, whatever else it sends.
        We do this rather than use Tornado's own ping timeout, which waits
        five more seconds for a close handshake a vanished client never sends.
        """
        sent = time.monotonic()
        cls.ping_payload = b"%d" % time.time_ns()
        pinged = [c for tabs in cls.online.values() for c in tabs if not c._dead]
        for connection in pinged:
            try:
                connection.ping(cls.ping_payload)
            except tornado.websocket.WebSocketClosedError:
                pass
        tornado.ioloop.IOLoop.current().call_later(cls.conf.ping_timeout, cls._drop_silent, pinged, sent)

    @classmethod
    def _drop_silent(cls, pinged: list, sent: float) -> None:
        for connection in pinged:
            if connection._heard < sent and not connection._dead:
                log.info("%s stopped answering pings", connection.user)
                connection._dead = True
                if connection._stream is not None:
                    connection._stream.close()  # no close handshake with a peer that is gone
                else:
                    connection.close(1001, "ping timed out")

    # ---- shared state: each dict is changed in these few methods only

    @classmethod
    def _next_id(cls) -> int:
        cls.last_id += 1
        return cls.last_id

    def _claim(self, name: str, token: str) -> User:
        """A free name becomes this person's; they start in the default room."""
        user = User(name, token_hash(token))
        self.store.add_user(key(name), name, user.token_hash)
        self.users[key(name)] = user
        room = self._room(self.conf.default_room)
        self._set_member(room, key(name), True)
        return user

    def _may_claim(self, ip: str) -> bool:
        """Names are kept for good, so one address may claim only so many:
        a token bucket of NAMES_AT_ONCE, refilled at --names_per_hour. The
        dict holds only addresses that have claimed a name, so --max_users
        bounds it too."""
        per_hour = self.conf.names_per_hour
        if per_hour <= 0:
            return True
        now = time.monotonic()
        tokens, then = self.claims.get(ip, (float(NAMES_AT_ONCE), now))
        tokens = min(float(NAMES_AT_ONCE), tokens + (now - then) * per_hour / 3600)
        allowed = tokens >= 1
        self.claims[ip] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def _arrive(self, user: str, ip: str) -> None:
        self.user = user
        if ChatSocket.pinger is None and self.conf.ping_interval > 0:
            ChatSocket.pinger = tornado.ioloop.PeriodicCallback(ChatSocket._ping_all, 1000 * self.conf.ping_interval)
            ChatSocket.pinger.start()
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        tabs = self.online.setdefault(user, set())
        tabs.add(self)
        if len(tabs) == 1:
            log.info("%s is online", self.users[user].name)
            self.send_to(self._everyone_but(user), presence_frame(self.users[user].name, "online"))

    def _depart(self) -> None:
        self._departed = True
        ip, user = self.request.remote_ip, self.user
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
        tabs = self.online[user]
        tabs.discard(self)
        if not tabs:
            del self.online[user]
            log.info("%s is offline", self.users[user].name)
            self.send_to(self._everyone_but(user), presence_frame(self.users[user].name, "offline"))

    def _room(self, name: str) -> Room:
        """The room called name, created (and stored) if new."""
        room = self.rooms.get(key(name))
        if room is None:
            if self.conf.max_rooms and len(self.rooms) >= self.conf.max_rooms:
                raise ChatError("too_many_rooms", "the server has as many rooms as it allows")
            self.store.add_room(key(name), name)
            room = self.rooms[key(name)] = Room(name, self.conf.history)
        return room

    def _set_member(self, room: Room, user: str, member: bool) -> None:
        """Membership is the user's, not the connection's; stored, then told."""
        self.store.set_member(key(room.name), user, member)
        if member:
            room.members.add(user)
            self.users[user].rooms.add(key(room.name))
        else:
            room.members.discard(user)
            self.users[user].rooms.discard(key(room.name))
        action = "join" if member else "leave"
        others = [c for u in room.members if u != user for c in self.online.get(u, ())]
        self.send_to(others, member_frame(room.name, self.users[user].name, action))

    def _post(self, room: Room, text: str) -> dict:
        """A new room message: stored, kept in history, sent to every member."""
        ts, local = stamp(self.conf.timestamp_format)
        message = message_frame(self._next_id(), room.name, self.users[self.user].name, text, ts, local)
        payload = encode(message)
        self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)
        room.history.append((message, len(payload)))
        self.send_to([c for u in room.members for c in self.online.get(u, ())], message, payload)
        return message

    def _direct(self, to: User, text: str) -> tuple[dict, bool]:
        """A new direct message: stored, then sent, or kept in the mailbox
        (then the second value is True)."""
        recipient = key(to.name)
        waiting = recipient not in self.online
        mailbox = self.mailboxes.get(recipient, {})
        if waiting and len(mailbox) >= self.conf.mailbox:
            raise ChatError("mailbox_full", f"{to.name} has {len(mailbox)} messages waiting; try later")
        ts, local = stamp(self.conf.timestamp_format)
        message = direct_frame(self._next_id(), self.users[self.user].name, to.name, text, ts, local)
        payload = encode(message)
        self.store.add_message(message["id"], None, self.user, recipient, not waiting, payload)
        if waiting:
            self.mailboxes.setdefault(recipient, {})[message["id"]] = message
        self.send_to(self.online.get(self.user, set()) | self.online.get(recipient, set()), message, payload)
        return message, waiting

    def _deliver_mail(self, user: str) -> None:
        """The user's mailbox has just been sent: mark it so and tell the senders."""
        mail = self.mailboxes.pop(user)
        self.store.mark_delivered(list(mail))
        for message in mail.values():
            self.send_to(self.online.get(key(message["from"]), ()), delivered_frame(message["id"], message["to"]))

    def _everyone_but(self, user: str) -> list:
        return [c for u, tabs in self.online.items() if u != user for c in tabs]

    # ---- client frames: on_message dispatches to do_<type>

    def on_message(self, data: str | bytes) -> None:
        ref = None
        allowed = self._spend()  # every frame costs a token, even a broken one
        try:
            frame = parse_frame(data)
            if "ref" in frame:
                ref = check_ref(frame["ref"])
            if not allowed:
                raise ChatError("rate_limited", f"slow down: at most {self.conf.rate:g} frames a second")
            kind = frame.get("type")
            if not isinstance(kind, str):
                raise ChatError("bad_request", "a frame needs a string 'type'")
            handler = getattr(self, "do_" + kind, None)
            if handler is None:
                raise ChatError("bad_request", f"unknown frame type {kind[:40]!r}")
            handler(frame, ref)
        except ChatError as e:
            self.send(error_frame(e.code, e.message, ref))
        except sqlite3.Error:
            log.exception("storage failed; the frame was refused")
            self.send(error_frame("server_error", "the server could not save that; try again", ref))
        except Exception:  # a bug: log it (without the URL and its token), keep the connection
            log.exception("error handling a frame from %s", self.user)
            self.send(error_frame("server_error", "the server failed on that frame", ref))

    def _spend(self) -> bool:
        """Token bucket: rate per second, up to burst at once."""
        rate = self.conf.rate
        if rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(float(self.conf.burst), self._tokens + (now - self._refill) * rate)
        self._refill = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _ack(self, ref: Any, **fields: Any) -> None:
        if ref is not None:
            self.send(ack_frame(ref, **fields))

    def _my_room(self, name: Any) -> Room:
        """The room a frame names, which the user must be in."""
        room = self.rooms.get(key(check_room(name)))
        if room is None or self.user not in room.members:
            raise ChatError("not_in_room", f"you are not in {name}; join it first")
        return room

    def _known_user(self, name: Any) -> User:
        if not isinstance(name, str):
            raise ChatError("bad_request", "'to' must be a user name")
        user = self.users.get(key(name)) if NAME.fullmatch(name) else None
        if user is None:
            raise ChatError("unknown_user", f"nobody called {name[:40]!r} has ever been here")
        return user

    def do_message(self, frame: dict, ref: Any) -> None:
        # {"type":"message","room":"general","text":"hello"}  or  text "@UserB hello"
        text = check_text(frame.get("text"), self.conf.max_text)
        direct = DIRECT.match(text)
        if direct:
            to = self._known_user(direct[1])
            if BLANK.fullmatch(direct[2]):
                raise ChatError("bad_request", "the message is empty")
            message, queued = self._direct(to, direct[2])
            self._ack(ref, id=message["id"], queued=queued)
        else:
            room = frame.get("room")
            message = self._post(self._my_room(self.conf.default_room if room is None else room), text)
            self._ack(ref, id=message["id"])

    def do_join(self, frame: dict, ref: Any) -> None:
        # {"type":"join","room":"python"}
        room = self._room(check_room(frame.get("room")))
        if self.user in room.members:
            self.send(self._joined(room, None, self.conf.max_queue)[0], bulk=True)  # already in: a fresh copy
        else:
            self._set_member(room, self.user, True)
            self.send_to(self.online[self.user], self._joined(room, None, self.conf.max_queue)[0], bulk=True)
        self._ack(ref)

    def do_leave(self, frame: dict, ref: Any) -> None:
        # {"type":"leave","room":"python"}
        room = self._my_room(frame.get("room"))
        self._set_member(room, self.user, False)
        self.send_to(self.online[self.user], left_frame(room.name))
        self._ack(ref)

    def do_rooms(self, frame: dict, ref: Any) -> None:
        # {"type":"rooms"}
        listing = [{"name": r.name, "members": len(r.members)} for _, r in sorted(self.rooms.items())]
        self.send(rooms_frame(listing))
        self._ack(ref)

    def do_typing(self, frame: dict, ref: Any) -> None:
        # {"type":"typing","room":"general"}  or  {"type":"typing","to":"UserB"}
        me = self.users[self.user].name
        if frame.get("room") is not None:
            room = self._my_room(frame["room"])
            others = [c for u in room.members if u != self.user for c in self.online.get(u, ())]
            self.send_to(others, typing_frame(me, room.name, None))
        elif frame.get("to") is not None:
            to = self._known_user(frame["to"])
            if key(to.name) != self.user:  # your other tabs need not see you typing
                self.send_to(self.online.get(key(to.name), ()), typing_frame(me, None, to.name))
        else:
            raise ChatError("bad_request", "typing needs a 'room' or a 'to'")
        self._ack(ref)

    # ---- sending: every frame leaves through send_to

    def send(self, frame: dict, bulk: bool = False) -> None:
        """One frame to this connection."""
        self.send_to((self,), frame, bulk=bulk)

    @classmethod
    def send_to(cls, connections: Iterable[ChatSocket], frame: dict, payload: Optional[bytes] = None,
                bulk: bool = False) -> None:
        """One frame to many connections: encoded and framed once, queued for
        each, written by _flush_all at the end of this loop turn. A bulk frame
        answers the connection's own request (its connect sequence, a join):
        it goes at the reader's pace and does not count against --max_queue."""
        payload = payload or encode(frame)
        wire = ws_frame(payload)
        # A snapshot: a connection closed on the way (1013) leaves the live sets.
        for connection in tuple(connections):
            connection._push(wire, payload, bulk)

    def _push(self, wire: bytes, payload: bytes, bulk: bool = False) -> None:
        if self._dead:
            return
        start = self._pushed
        self._pushed += len(wire)
        self._owed += len(wire)
        if bulk and self._bulk_owed() + len(wire) <= self._bulk_cap:
            if self._bulk and self._bulk[-1][1] == start:
                self._bulk[-1][1] = self._pushed  # one range for a whole connect sequence
            else:
                self._bulk.append([start, self._pushed])
        if self._stream is None:  # fallback: Tornado frames and writes it
            try:
                future = self.write_message(payload)
            except tornado.websocket.WebSocketClosedError:
                return
            future.add_done_callback(lambda f, n=len(wire): self._written(n))
        else:
            self._out.append(wire)
            if not self._writing and len(self._out) == 1:
                if not ChatSocket.dirty:
                    tornado.ioloop.IOLoop.current().add_callback(ChatSocket._flush_all)
                ChatSocket.dirty.append(self)
        if (self._writing or self._stream is None) and self._owed - self._bulk_owed() > self.conf.max_queue:
            # It stopped reading: the kernel holds all it will and still more
            # is owed. Drop it rather than hold it for ever; it can come back
            # with ?since= and miss nothing.
            log.info("closing a connection of %s: %d bytes unread", self.user, self._owed)
            self._out.clear()
            self._close(1013, "too slow; reconnect with since")

    @classmethod
    def _flush_all(cls) -> None:
        """Each connection owed frames gets them in one write: a burst of
        messages costs one system call per connection, not one per message."""
        dirty, cls.dirty = cls.dirty, []
        for connection in dirty:
            connection._flush()

    def _flush(self) -> None:
        """Write what is queued: straight to the kernel while it takes it, at
        most WRITE_CHUNK bytes at a time, the rest through the stream."""
        while not self._writing and not self._dead and self._out:
            data = self._take(WRITE_CHUNK)
            sent = send_now(self._stream, data)
            self._paid(sent)
            if sent < len(data):
                self._write_rest(data[sent:])

    def _take(self, limit: int) -> bytes:
        """Whole frames from the front of _out, joined: all of them when they
        fit in limit (the usual case), else as many as fit, at least one.
        Never part of a frame: Tornado writes its own control frames (a pong,
        a close) to the same stream, and they must fall between ours."""
        out = self._out
        if self._owed <= limit:  # not writing, so everything owed is in _out
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
            future = self._stream.write(data)
        except tornado.iostream.StreamClosedError:
            self._dead = True
            return
        if not self._stream.writing():
            self._paid(len(data))
            return
        # One write in flight at a time: what piles up meanwhile waits in _out,
        # where it is counted and can be dropped if the reader never catches up.
        self._writing = True
        future.add_done_callback(lambda f, n=len(data): self._written(n))

    def _paid(self, n: int) -> None:
        """n more bytes reached the kernel (they were owed first in, first out)."""
        self._owed -= n
        done = self._pushed - self._owed  # bytes written so far
        while self._bulk and self._bulk[0][1] <= done:
            self._bulk.pop(0)

    def _bulk_owed(self) -> int:
        """Bytes of answers it asked for that are not written yet."""
        done = self._pushed - self._owed
        return sum(end - max(start, done) for start, end in self._bulk)

    def _written(self, n: int) -> None:
        self._paid(n)
        self._writing = False
        # A write that had to wait is done: the peer is reading, so it is
        # alive even if its pong is still queued behind a big answer.
        self._heard = time.monotonic()
        if self._out:
            self._flush()

    def _close(self, code: int, reason: str) -> None:
        """Close after whatever is queued (an error frame explaining why)."""
        if self._out and not self._dead and self._stream is not None:
            try:
                self._stream.write(b"".join(self._out))
            except tornado.iostream.StreamClosedError:
                pass
        self._out.clear()
        self._dead = True
        self.close(code, reason)
        if self.user is not None and not self._departed:
            self._depart()  # gone now for everybody else, not after the close handshake

    @classmethod
    def close_all(cls, code: int, reason: str) -> None:
        """Close every connection (shutdown). Nobody is told about the others
        leaving: they are all leaving, and will be back."""
        everyone = [c for tabs in cls.online.values() for c in tabs]
        for connection in everyone:
            connection._dead = True
            connection._out.clear()
        for connection in everyone:
            connection.close(code, reason)

    # ---- the handshake

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's error log line names the request; ours blots out the token."""
        if isinstance(value, tornado.web.HTTPError):
            access_log.warning("%d %s: %s", value.status_code, redact(self.request.uri or ""), value.log_message)
        else:
            log.error("error in %s", redact(self.request.uri or ""), exc_info=(typ, value, tb))

    def check_origin(self, origin: str) -> bool:
        """Same origin (Tornado's check), or one listed with --origins."""
        return super().check_origin(origin) or origin.rstrip("/").lower() in self.conf.origins


################ The page and health


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

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", self.policy)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(self.page)


class HealthHandler(tornado.web.RequestHandler):
    """GET /healthz: is it up, and how busy."""

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write({
            "status": "ok",
            "connections": sum(len(tabs) for tabs in ChatSocket.online.values()),
            "users_online": len(ChatSocket.online),
            "rooms": len(ChatSocket.rooms),
        })


def redact(uri: str) -> str:
    """The URI with every token value blotted out, however its name is
    spelled (%74oken= is token= to Tornado too)."""
    path, _, query = uri.partition("?")
    if not query:
        return uri
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}=***" if urllib.parse.unquote_plus(name) == "token" else part)
    return path + "?" + "&".join(parts)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with tokens blotted out of the URL."""
    status = handler.get_status()
    write = access_log.info if status < 400 else access_log.warning if status < 500 else access_log.error
    write("%d %s %s (%s) %.2fms", status, handler.request.method, redact(handler.request.uri or ""),
          handler.request.remote_ip, 1000.0 * handler.request.request_time())


################ Start-up


def make_app(**overrides: Any) -> tornado.web.Application:
    """A fresh application: settings from the options and overrides, state
    loaded from the database. Tests call it once per test."""
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    values = {name: overrides.get(name, options[name]) for name in SETTINGS}
    values["origins"] = [o.rstrip("/").lower() for o in values["origins"]]
    values["ping_timeout"] = min(values["ping_timeout"], values["ping_interval"])
    conf = Config(**values)
    check_name(conf.default_room, "bad_room")

    if getattr(ChatSocket, "store", None) is not None:
        ChatSocket.store.close()  # a new app on the same file is a restart
        ChatSocket.store = None  # type: ignore[assignment]
    store = Store(conf.db)
    state = store.load(conf.history)
    ChatSocket.conf, ChatSocket.store = conf, store
    ChatSocket.users = {k: User(name, h) for k, name, h in state["users"]}
    ChatSocket.rooms = {k: Room(name, conf.history) for k, name in state["rooms"].items()}
    for room, user in state["members"]:
        if room in ChatSocket.rooms and user in ChatSocket.users:
            ChatSocket.rooms[room].members.add(user)
            ChatSocket.users[user].rooms.add(room)
    for room, messages in state["history"].items():
        ChatSocket.rooms[room].history.extend(messages)
    ChatSocket.mailboxes = {}
    for recipient, message in state["undelivered"]:
        ChatSocket.mailboxes.setdefault(recipient, {})[message["id"]] = message
    ChatSocket.online, ChatSocket.per_ip, ChatSocket.claims, ChatSocket.dirty = {}, {}, {}, []
    if ChatSocket.pinger is not None:
        ChatSocket.pinger.stop()
        ChatSocket.pinger = None
    ChatSocket.last_id = state["last_id"]

    PageHandler.load(os.path.join(HERE, "index.html"))
    return tornado.web.Application(
        [(r"/", PageHandler), (r"/ws", ChatSocket), (r"/healthz", HealthHandler)],
        websocket_max_message_size=MAX_FRAME,
        log_function=log_request,
        autoreload=conf.debug,
        serve_traceback=conf.debug,
    )


FLAGS = {"debug", "help", "log_to_stderr"}  # options that take no value


def normalize_argv(argv: list) -> list:
    """Accept "--port 5000" as well as Tornado's own "--port=5000"."""
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].replace("-", "_")
        if (arg.startswith("--") and "=" not in arg and name in options and name not in FLAGS
                and i + 1 < len(argv) and not argv[i + 1].startswith("--")):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def parse_args(argv: list) -> None:
    """Command line over config file over defaults."""
    argv = normalize_argv(argv)
    parse_command_line(argv, final=False)
    if options.config:
        parse_config_file(options.config, final=False)
    parse_command_line(argv)
    if options.debug:
        logging.getLogger().setLevel(logging.DEBUG)


async def main() -> int:
    parse_args(sys.argv)
    try:
        app = make_app()
        server = app.listen(options.port, options.host)
    except (StoreError, OSError) as e:
        log.error("%s", e)
        return 1
    log.info("listening on http://%s:%d/ (database %s)", options.host, options.port, options.db)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down")
    server.stop()  # no new connections
    ChatSocket.close_all(1001, "server shutting down")
    deadline = time.monotonic() + 3
    while ChatSocket.online and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # let close handshakes finish
    ChatSocket.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
