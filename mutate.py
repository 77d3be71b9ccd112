"""mutate.py: would test_chat.py notice if chat.py broke one of its promises?

Each mutant below is one small change to chat.py (an exact ``old`` snippet
replaced by a ``new`` one) that breaks a promise README makes. For each, the
script copies the project into a temporary directory, makes the change there
(chat.py itself is never touched) and runs the suite. A mutant the suite
fails on is *killed*; one it passes *survived*: a promise no test guards.

    python mutate.py                    # every mutant, one after another
    python mutate.py --jobs 2           # two at once
    python mutate.py -k dm_to_everyone  # one mutant (-k matches part of a name; repeatable)
    python mutate.py --list             # the mutants and whether each still applies

A mutant whose ``old`` snippet is not found exactly once in chat.py is
*stale*: chat.py changed under it. It is reported, not counted, and should be
rewritten for the new code. A mutant marked ``equivalent`` (with the reason)
is listed but not run: no test could tell it from chat.py. A mutant whose
change does not compile is *invalid*: a mistake in this list.

A run that times out (--timeout) counts as killed: a mutant that hangs
the suite is noticed. The baseline run has the same timeout, so a timeout
too short for the suite stops everything before any mutant is tried.

The score is killed / (killed + survived). The exit code is 1 when the score
is below --min (95 %) or a mutant is invalid, and 2 when the suite fails on
chat.py as it is (then every mutant would look killed). Stale mutants are
listed at the end but do not change the exit code.

It is slow, so it is not part of CI: the suite takes 15-30 s, -x stops it at
the first failure, and the whole list takes about 12 minutes with --jobs 2 on
a 2-core machine. Timing tests (pings) may fail under load and count a
mutant killed by chance: rerun a surprising result alone with -k.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = "chat.py"
# What a copy of the project needs to run test_chat.py (missing ones are skipped).
PROJECT_FILES = ["chat.py", "test_chat.py", "index.html", "requirements.txt", "requirements-test.txt",
                 "conftest.py", "pytest.ini", "pyproject.toml", "setup.cfg"]
PYTEST = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_chat.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    promise: str  # what README promises, which this change breaks
    old: str  # exact text in chat.py, found exactly once
    new: str
    equivalent: str = ""  # why no test can tell it from chat.py (then it is not run)


M = Mutant
MUTANTS = [
    # ---- owned names and tokens
    M("owned_name_without_token", "Owned names: a later connection must present the token (4409)",
      "if user is not None and not user.owns(token):", "if user is not None and token is None:"),
    M("any_token_owns", "Owned names: a wrong token is name_taken",
      "return token is not None and hmac.compare_digest(token_hash(token), self.token_hash)",
      "return token is not None"),
    M("names_case_sensitive", "Names are matched case-insensitively",
      "return name.lower()", "return name"),
    M("name_33_chars", "User and room names are 1-32 characters",
      'NAME = re.compile(r"[A-Za-z0-9_.\\-]{1,32}")', 'NAME = re.compile(r"[A-Za-z0-9_.\\-]{1,33}")'),
    M("name_prefix_match", "Names use only A-Z a-z 0-9 _ - .",
      "not NAME.fullmatch(value)", "not NAME.match(value)"),
    M("token_stored_in_clear", "Only a hash of each token is stored",
      "self.store.add_user(key(name), name, user.token_hash)", "self.store.add_user(key(name), name, token)"),
    M("short_token", "The token is unguessable",
      "token = secrets.token_urlsafe(24)", "token = secrets.token_urlsafe(4)"),
    M("new_user_not_in_default_room", "A new user is put in the default room",
      "self._set_member(room, key(name), True)", "self._set_member(room, key(name), False)"),
    M("token_for_unowned_name_kept", "A token for a name nobody owns is ignored and a new one issued",
      "            if user is None:\n                token = secrets.token_urlsafe(24)",
      "            if user is None:\n                token = token or secrets.token_urlsafe(24)"),

    # ---- private messages stay private
    M("dm_to_everyone", "A private message goes to the two users' connections only",
      "self.send_to(self.online.get(self.user, set()) | self.online.get(recipient, set()), message, payload)",
      "self.send_to(self._everyone_but(''), message, payload)"),
    M("dm_not_to_sender_tabs", "Both users' connections get the direct frame",
      "self.send_to(self.online.get(self.user, set()) | self.online.get(recipient, set()), message, payload)",
      "self.send_to(self.online.get(recipient, set()), message, payload)"),
    M("typing_echoed_to_typist", "typing goes to the other members",
      "others = [c for u in room.members if u != self.user for c in self.online.get(u, ())]",
      "others = [c for u in room.members for c in self.online.get(u, ())]"),
    M("dm_any_white_space", "Only ASCII white space after @name makes a message private",
      r'[ \t\n\r\f\v]+(.*)", re.DOTALL)', r'\s+(.*)", re.DOTALL)'),
    M("dm_first_line_only", "Text is relayed exactly as sent (a private one too)",
      r'[ \t\n\r\f\v]+(.*)", re.DOTALL)', r'[ \t\n\r\f\v]+(.*)", 0)'),

    # ---- offline buffering and receipts
    M("mailbox_one_more", "mailbox_full past --mailbox waiting messages",
      "if waiting and len(mailbox) >= self.conf.mailbox:", "if waiting and len(mailbox) > self.conf.mailbox:"),
    M("dm_not_kept_for_offline", "A private message to someone offline is kept",
      'self.mailboxes.setdefault(recipient, {})[message["id"]] = message', "pass"),
    M("kept_dm_stored_as_delivered", "Kept private messages survive a restart or kill -9",
      "self.store.add_message(message[\"id\"], None, self.user, recipient, not waiting, payload)",
      "self.store.add_message(message[\"id\"], None, self.user, recipient, True, payload)"),
    M("delivery_not_stored", "A kept message is delivered once, also across restarts",
      "self.store.mark_delivered(list(mail))", "pass"),
    M("receipt_to_recipient", "The sender gets delivered",
      'self.send_to(self.online.get(key(message["from"]), ()), delivered_frame(',
      'self.send_to(self.online.get(key(message["to"]), ()), delivered_frame('),
    M("no_buffered_flag", 'A kept message arrives with "buffered": true',
      'self.send({**mail[id], "buffered": True}, bulk=True)', "self.send(mail[id], bulk=True)"),
    M("no_queued_in_ack", 'The ack of a kept message says "queued": true',
      'self._ack(ref, id=message["id"], queued=queued)', 'self._ack(ref, id=message["id"])'),
    M("always_online", "A private message to someone with no connection is kept",
      "waiting = recipient not in self.online", "waiting = False"),
    M("mailboxes_not_reloaded", "Kept private messages are reloaded at start",
      "WHERE room IS NULL AND delivered = 0 ORDER BY id", "WHERE room IS NULL AND delivered = 1 ORDER BY id"),
    M("mail_never_delivered", "Kept messages are delivered when the user returns",
      "if mail and not self._dead:", "if mail and self._dead:"),

    # ---- history and resume
    M("history_reload_oldest", "At start each room gets its last --history messages",
      "WHERE room = ? ORDER BY id DESC LIMIT ?", "WHERE room = ? ORDER BY id LIMIT ?"),
    M("history_reload_newest_first", "History is oldest first, also after a restart",
      "[(json.loads(f), len(f.encode())) for (f,) in reversed(q(",
      "[(json.loads(f), len(f.encode())) for (f,) in list(q("),
    M("history_one_more", "--history messages kept per room",
      "collections.deque(maxlen=history)", "collections.deque(maxlen=history + 1)"),
    M("budget_keeps_oldest", "A room cut short keeps its newest messages",
      "kept = [m for m, _ in history[len(history) - fits:]]", "kept = [m for m, _ in history[:fits]]"),
    M("budget_not_spent", "The room histories of one connect share --max_queue bytes",
      "            budget -= size\n", "            budget -= 0\n"),
    M("budget_ignores_private", "Room histories share what is left after private messages",
      "budget = max(0, self.conf.max_queue - sum(size for _, size in replayed))",
      "budget = self.conf.max_queue"),
    M("since_includes_seen", "since=ID: only messages with a larger id",
      'history = [(m, size) for m, size in history if m["id"] > since]',
      'history = [(m, size) for m, size in history if m["id"] >= since]'),
    M("truncated_when_exact", '"truncated" only when more were missed than kept',
      "truncated = self.store.count_since(key(room.name), since) > len(history)",
      "truncated = self.store.count_since(key(room.name), since) >= len(history)"),
    M("never_truncated", '"truncated": true when more were missed than --history keeps',
      "truncated = truncated or fits < len(history)", "truncated = fits < len(history)"),
    M("epoch_ignored", "A since from another database counts as 0",
      'if since is not None and self._query("epoch") not in (None, self.store.epoch):',
      "if False:"),
    M("since_too_big", "A since that is not a message id is ignored",
      "or len(value) > 18:", "or len(value) > 30:"),
    M("replay_includes_seen", "since=ID replays private messages with a larger id",
      "AND (sender = ? OR recipient = ?) AND id > ?", "AND (sender = ? OR recipient = ?) AND id >= ?"),
    M("replay_without_queued", 'A replayed message still waiting carries "queued": true',
      'self.send({**directs[id], "queued": True}, bulk=True)', "self.send(directs[id], bulk=True)"),
    M("ids_restart_from_zero", "Ids go on increasing after a restart",
      '"last_id": q("SELECT coalesce(max(id), 0) FROM messages")', '"last_id": q("SELECT 0")'),
    M("new_epoch_each_start", "The epoch names the database and survives a restart",
      "INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", "INSERT OR REPLACE INTO meta VALUES ('epoch', ?)"),

    # ---- rate limits and caps
    M("burst_uncapped", "An idle connection can still send only --burst frames at once",
      "self._tokens = min(float(self.conf.burst), self._tokens + (now - self._refill) * rate)",
      "self._tokens = self._tokens + (now - self._refill) * rate"),
    M("bucket_overdraft", "More than --burst frames at once is rate_limited",
      "if self._tokens < 1:", "if self._tokens < 0:"),
    M("rate_limit_ignored", "More than --rate/--burst: rate_limited",
      "if not allowed:", "if False:"),
    M("rate_zero_limits", "--rate 0 turns limiting off",
      "if rate <= 0:", "if rate < 0:"),
    M("names_eleven_at_once", "One address may claim 10 new names at once",
      "NAMES_AT_ONCE = 10", "NAMES_AT_ONCE = 11"),
    M("name_claims_free", "--names_per_hour bounds new names per address",
      "self.claims[ip] = (tokens - 1 if allowed else tokens, now)", "self.claims[ip] = (tokens, now)"),
    M("tabs_one_more", "--max_tabs connections per user",
      "len(self.online.get(key(name), ())) >= conf.max_tabs", "len(self.online.get(key(name), ())) > conf.max_tabs"),
    M("per_ip_one_more", "--max_conns_per_ip connections per address",
      "self.per_ip.get(ip, 0) >= conf.max_conns_per_ip", "self.per_ip.get(ip, 0) > conf.max_conns_per_ip"),
    M("per_ip_never_freed", "A closed connection frees its place under --max_conns_per_ip",
      "self.per_ip[ip] -= 1", "self.per_ip[ip] -= 0"),
    M("users_one_more", "--max_users owned names",
      "len(self.users) >= conf.max_users", "len(self.users) > conf.max_users"),
    M("rooms_one_more", "--max_rooms rooms",
      "len(self.rooms) >= self.conf.max_rooms", "len(self.rooms) > self.conf.max_rooms"),

    # ---- size limits and validation
    M("text_one_less", "--max_text code points per message",
      "if len(value) > limit:", "if len(value) >= limit:"),
    M("text_counts_bytes", "--max_text counts code points, not bytes",
      "if len(value) > limit:", "if len(value.encode()) > limit:"),
    M("frame_128_kib", "A frame over 64 KiB closes with 1009",
      "MAX_FRAME = 64 * 1024", "MAX_FRAME = 128 * 1024"),
    M("ref_99_chars", "A ref is a string of at most 100 characters",
      "isinstance(value, str) and len(value) <= MAX_REF", "isinstance(value, str) and len(value) < MAX_REF"),
    M("ref_may_be_bool", "A ref is a string or an integer (not true/false)",
      "isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53",
      "isinstance(value, int) and abs(value) < 2**53"),
    M("not_object_is_bad_json", "bad_request for JSON that is not an object",
      'raise ChatError("bad_request", "a frame must be a JSON object")',
      'raise ChatError("bad_json", "a frame must be a JSON object")'),
    M("invalid_json_is_bad_request", "bad_json for text that is not JSON",
      'raise ChatError("bad_json", "the frame is not valid JSON") from None',
      'raise ChatError("bad_request", "the frame is not valid JSON") from None'),
    M("binary_is_bad_request", "bad_json for binary frames",
      'raise ChatError("bad_json", "frames must be text, not binary")',
      'raise ChatError("bad_request", "frames must be text, not binary")'),
    M("nan_accepted", "bad_json for text that is not JSON (NaN, Infinity)",
      "json.loads(data, parse_constant=reject_constant)", "json.loads(data)"),
    M("blank_is_text", "Blank text (white space, zero-width characters) is bad_request",
      "if BLANK.fullmatch(value):", "if not value.strip():"),
    M("surrogates_accepted", "Text that is not valid Unicode is bad_request",
      "    if not is_unicode(value):\n", "    if False:\n"),
    M("blank_dm_accepted", "A private message's text must not be blank",
      "if BLANK.fullmatch(direct[2]):", "if not direct[2]:"),
    M("unknown_user_code", "unknown_user for a name that never connected",
      'raise ChatError("unknown_user",', 'raise ChatError("bad_request",'),
    M("post_without_membership", "not_in_room for a room you are not in",
      "if room is None or self.user not in room.members:", "if room is None:"),
    M("ill_typed_room_is_bad_room", "A missing or ill-typed field is bad_request",
      "raise ChatError(\"bad_request\", \"'room' must be a room name\")",
      "raise ChatError(\"bad_room\", \"'room' must be a room name\")"),
    M("error_without_ref", "An error carries the frame's ref",
      "self.send(error_frame(e.code, e.message, ref))", "self.send(error_frame(e.code, e.message))"),
    M("ack_without_ref", "Only a frame with a ref is answered",
      "        if ref is not None:\n            self.send(ack_frame(ref, **fields))",
      "        if True:\n            self.send(ack_frame(ref, **fields))"),
    M("type_case_insensitive", "An unknown type (MESSAGE) is bad_request",
      'handler = getattr(self, "do_" + kind, None)', 'handler = getattr(self, "do_" + kind.lower(), None)'),
    M("bug_kills_connection", "A failing frame gets server_error; the connection stays open",
      '            self.send(error_frame("server_error", "the server failed on that frame", ref))',
      "            raise"),

    # ---- origin check
    M("any_origin", "Upgrades from a foreign Origin get 403",
      'return super().check_origin(origin) or origin.rstrip("/").lower() in self.conf.origins',
      "return True"),
    M("same_origin_refused", "Same-origin is always allowed",
      'return super().check_origin(origin) or origin.rstrip("/").lower() in self.conf.origins',
      'return origin.rstrip("/").lower() in self.conf.origins',
      equivalent="with Tornado >= 6.6 (6.6.1 here) check_origin is not called when Origin matches Host, and "
                 "the inherited check_origin only consults the trusted_origins setting, which chat.py does not "
                 "set: super() always says False. With Tornado 6.4-6.5, test_same_origin_is_allowed kills it."),
    M("origins_not_normalised", "--origins https://Chat.example.org/ allows the site however written",
      'values["origins"] = [o.rstrip("/").lower() for o in values["origins"]]',
      'values["origins"] = list(values["origins"])'),

    # ---- persistence: written before acked or relayed
    M("room_message_not_stored", "Every message is written to SQLite before it is acked",
      'self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)', "pass"),
    M("room_relayed_before_stored", "Nothing is relayed before it is stored",
      '        self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)\n'
      "        room.history.append((message, len(payload)))\n"
      "        self.send_to([c for u in room.members for c in self.online.get(u, ())], message, payload)\n",
      "        self.send_to([c for u in room.members for c in self.online.get(u, ())], message, payload)\n"
      '        self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)\n'
      "        room.history.append((message, len(payload)))\n"),
    M("history_before_stored", "A message the database refused is not in the history",
      '        self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)\n'
      "        room.history.append((message, len(payload)))\n",
      "        room.history.append((message, len(payload)))\n"
      '        self.store.add_message(message["id"], key(room.name), self.user, None, True, payload)\n'),
    M("dm_relayed_before_stored", "Nothing is relayed before it is stored (private messages too)",
      "        self.store.add_message(message[\"id\"], None, self.user, recipient, not waiting, payload)\n"
      "        if waiting:\n"
      "            self.mailboxes.setdefault(recipient, {})[message[\"id\"]] = message\n"
      "        self.send_to(self.online.get(self.user, set()) | self.online.get(recipient, set()), message, payload)\n",
      "        self.send_to(self.online.get(self.user, set()) | self.online.get(recipient, set()), message, payload)\n"
      "        self.store.add_message(message[\"id\"], None, self.user, recipient, not waiting, payload)\n"
      "        if waiting:\n"
      "            self.mailboxes.setdefault(recipient, {})[message[\"id\"]] = message\n"),
    M("mailbox_before_stored", "A private message the database refused is not kept",
      "        self.store.add_message(message[\"id\"], None, self.user, recipient, not waiting, payload)\n"
      "        if waiting:\n"
      "            self.mailboxes.setdefault(recipient, {})[message[\"id\"]] = message\n",
      "        if waiting:\n"
      "            self.mailboxes.setdefault(recipient, {})[message[\"id\"]] = message\n"
      "        self.store.add_message(message[\"id\"], None, self.user, recipient, not waiting, payload)\n"),
    M("join_not_stored", "Memberships are kept across restarts",
      'self.db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (room, user))', "pass"),
    M("leave_not_stored", "A room left stays left after a restart",
      'self.db.execute("DELETE FROM members WHERE room = ? AND user = ?", (room, user))', "pass"),
    M("db_world_readable", "The database is created with mode 0600",
      "os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600", "os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644"),

    # ---- shutdown
    M("no_final_checkpoint", "SIGTERM checkpoints the database and exits 0",
      '            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")', "            pass"),
    M("store_not_closed_at_exit", "SIGTERM checkpoints the database and exits 0",
      "    ChatSocket.store.close()\n    return 0", "    return 0"),
    M("shutdown_code_1000", "Server shutdown closes with 1001",
      'ChatSocket.close_all(1001, "server shutting down")', 'ChatSocket.close_all(1000, "server shutting down")'),
    M("sigterm_not_handled", "SIGTERM: the server closes cleanly and exits 0",
      "for sig in (signal.SIGTERM, signal.SIGINT):", "for sig in (signal.SIGINT,):"),

    # ---- presence and rooms
    M("presence_every_tab", "presence when a user's first connection opens, not for later tabs",
      "        if len(tabs) == 1:\n", "        if len(tabs) >= 1:\n"),
    M("presence_to_self", "presence goes to everybody else",
      "return [c for u, tabs in self.online.items() if u != user for c in tabs]",
      "return [c for u, tabs in self.online.items() for c in tabs]"),
    M("left_to_one_tab", "leave: the user's connections get left",
      "self.send_to(self.online[self.user], left_frame(room.name))", "self.send(left_frame(room.name))"),
    M("joined_to_one_tab", "join: the user's connections get joined",
      "self.send_to(self.online[self.user], self._joined(room, None, self.conf.max_queue)[0], bulk=True)",
      "self.send(self._joined(room, None, self.conf.max_queue)[0], bulk=True)"),
    M("member_frame_to_self", "The other members get the member frame",
      "others = [c for u in room.members if u != user for c in self.online.get(u, ())]",
      "others = [c for u in room.members for c in self.online.get(u, ())]"),

    # ---- logging redaction
    M("exception_log_raw_uri", "Tokens never reach the log (a failure in open())",
      'log.error("error in %s", redact(self.request.uri or ""), exc_info=(typ, value, tb))',
      'log.error("error in %s", self.request.uri, exc_info=(typ, value, tb))'),
    M("http_error_log_raw_uri", "Tokens never reach the log (an HTTP error)",
      'access_log.warning("%d %s: %s", value.status_code, redact(self.request.uri or ""), value.log_message)',
      'access_log.warning("%d %s: %s", value.status_code, self.request.uri, value.log_message)'),
    M("access_log_raw_uri", "Tokens are blotted out of the access log",
      'write("%d %s %s (%s) %.2fms", status, handler.request.method, redact(handler.request.uri or ""),',
      'write("%d %s %s (%s) %.2fms", status, handler.request.method, handler.request.uri,'),
    M("redact_literal_name_only", "Tokens are blotted out however the name is spelled (%74oken=)",
      'urllib.parse.unquote_plus(name) == "token"', 'name == "token"'),

    # ---- the page's headers
    M("csp_img_anywhere", "The page fetches nothing from the internet (CSP img-src)",
      "img-src 'self' data:;", "img-src *;"),
    M("csp_framing_allowed", "The page cannot be framed by another site (frame-ancestors)",
      "frame-ancestors 'none'", "frame-ancestors *"),
    M("csp_default_self", "CSP allows nothing from anywhere by default",
      "default-src 'none';", "default-src 'self';"),
    M("csp_unsafe_inline_script", "CSP allows only the page's own inline script",
      "script-src {hashes or", "script-src 'unsafe-inline' {hashes or"),
    M("no_nosniff", "The page is sent with X-Content-Type-Options: nosniff",
      'self.set_header("X-Content-Type-Options", "nosniff")', "pass"),
    M("no_referrer_policy", "The page sends no Referer with its links",
      'self.set_header("Referrer-Policy", "no-referrer")', "pass"),

    # ---- slow consumers and pings
    M("max_queue_ignored", "A reader that stalls is closed with 1013",
      "self._owed - self._bulk_owed() > self.conf.max_queue:", "self._owed - self._bulk_owed() > 100 * self.conf.max_queue:"),
    M("stalled_close_code", "A connection that stopped reading is closed with 1013",
      'self._close(1013, "too slow; reconnect with since")', 'self._close(1011, "too slow; reconnect with since")'),
    M("answers_owed_unbounded", "After the connect sequence, answers count only up to --max_queue",
      "self._bulk_cap = self.conf.max_queue", 'self._bulk_cap = float("inf")'),
    M("bulk_uncapped", "Answers a client asked for go at its pace, up to --max_queue at a time",
      "if bulk and self._bulk_owed() + len(wire) <= self._bulk_cap:", "if bulk:"),
    M("any_pong_counts", "A pong counts only if it echoes the latest ping",
      "if data == ChatSocket.ping_payload:", "if True:"),
    M("silent_never_dropped", "A client that stops answering pings is dropped",
      "if connection._heard < sent and not connection._dead:", "if False:"),
    M("no_pings", "A client that stops answering pings is dropped",
      "if ChatSocket.pinger is None and self.conf.ping_interval > 0:", "if False:"),
    M("ping_timeout_unbounded", "A silent client is dropped within 2 x --ping_interval",
      'values["ping_timeout"] = min(values["ping_timeout"], values["ping_interval"])', "pass"),
    M("slow_writes_not_alive", "A slow reader still taking a big answer counts as alive",
      "        self._writing = False\n        # A write that had to wait is done: the peer is reading, so it is\n"
      "        # alive even if its pong is still queued behind a big answer.\n"
      "        self._heard = time.monotonic()\n",
      "        self._writing = False\n"),
]


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str  # killed, survived, stale, invalid, equivalent
    seconds: float = 0.0
    detail: str = ""  # the first failing test, or why it was not run


def mutated(source: str, mutant: Mutant) -> str | None:
    """chat.py with the mutant's change, or None when its old snippet is not there exactly once."""
    if source.count(mutant.old) != 1:
        return None
    return source.replace(mutant.old, mutant.new)


def run_suite(source: str, python: str, timeout: float) -> tuple[bool, float, str]:
    """Run test_chat.py against this chat.py in a fresh copy of the project:
    (passed, seconds, the first failing test or what went wrong)."""
    work = tempfile.mkdtemp(prefix="mutant-")
    try:
        for name in PROJECT_FILES:
            if os.path.exists(os.path.join(HERE, name)):
                shutil.copy(os.path.join(HERE, name), work)
        with open(os.path.join(work, TARGET), "w") as f:
            f.write(source)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        start = time.monotonic()
        # A session of its own, so that a timeout can end the chat.py processes the tests start too.
        proc = subprocess.Popen([python, *PYTEST], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, time.monotonic() - start, "timed out after %d s" % timeout
        seconds = time.monotonic() - start
        if proc.returncode == 0:
            return True, seconds, ""
        failed = re.findall(r"^(?:FAILED|ERROR|SUBFAILED.*?) test_chat\.py::(\S+)", output, re.MULTILINE)
        return False, seconds, failed[0] if failed else output.strip().splitlines()[-1:][0] if output.strip() else ""
    finally:
        shutil.rmtree(work, ignore_errors=True)


def try_mutant(mutant: Mutant, source: str, python: str, timeout: float) -> Result:
    if mutant.equivalent:
        return Result(mutant, "equivalent", detail=mutant.equivalent)
    changed = mutated(source, mutant)
    if changed is None:
        return Result(mutant, "stale", detail="old snippet found %d times in %s" % (source.count(mutant.old), TARGET))
    try:
        compile(changed, TARGET, "exec")
    except SyntaxError as e:
        return Result(mutant, "invalid", detail="does not compile: %s" % e)
    passed, seconds, detail = run_suite(changed, python, timeout)
    return Result(mutant, "survived" if passed else "killed", seconds, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", action="append", default=[], metavar="PART",
                        help="run only mutants whose name contains PART (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--min", type=float, default=95.0, help="lowest passing score, in %% (default 95)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one run of the suite")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the tests")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip checking the suite passes on chat.py")
    args = parser.parse_args()

    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), "two mutants share a name"
    with open(os.path.join(HERE, TARGET)) as f:
        source = f.read()
    chosen = [m for m in MUTANTS if not args.k or any(part in m.name for part in args.k)]
    if not chosen:
        print("no mutant matches %s" % " ".join(args.k))
        return 1

    if args.list:
        for m in chosen:
            state = "equivalent" if m.equivalent else "ok" if source.count(m.old) == 1 else "STALE"
            print("%-10s %-30s %s" % (state, m.name, m.promise))
        return 0

    if not args.no_baseline:
        passed, seconds, detail = run_suite(source, args.python, args.timeout)
        if not passed:
            print("the suite fails on %s as it is (%s); fix that first" % (TARGET, detail))
            return 2
        print("baseline: the suite passes on %s as it is (%.1f s)" % (TARGET, seconds))

    results, started = {}, time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(try_mutant, m, source, args.python, args.timeout): m for m in chosen}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            r = future.result()
            results[r.mutant.name] = r
            label = "SURVIVED" if r.status == "survived" else r.status
            print("[%2d/%d] %-10s %-30s %5.1f s  %s" % (done, len(chosen), label, r.mutant.name, r.seconds, r.detail),
                  flush=True)

    ordered = [results[m.name] for m in chosen]
    by = {status: [r for r in ordered if r.status == status]
          for status in ("killed", "survived", "stale", "invalid", "equivalent")}
    counted = len(by["killed"]) + len(by["survived"])
    score = 100.0 * len(by["killed"]) / counted if counted else 100.0
    print()
    print("score: %d of %d mutants killed = %.1f %% (min %g %%) in %.0f s"
          % (len(by["killed"]), counted, score, args.min, time.monotonic() - started))
    for status, why in (("survived", "a promise no test guards"), ("stale", "update them for the new chat.py"),
                        ("invalid", "mistakes in this list"), ("equivalent", "not run")):
        if by[status]:
            print("%s (%s):" % (status, why))
            for r in by[status]:
                print("  %-30s %s%s" % (r.mutant.name, r.mutant.promise,
                                        "" if status == "survived" else " -- " + r.detail))
    return 1 if score < args.min or by["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
