"""Tests for Redis mode: several chat.py processes on one --redis are one server.

Run them with ``python -m pytest -q test_redis.py``. They need redis-server
(``apt install redis-server``); without it they are skipped.

Each test starts its own redis-server on a free 127.0.0.1 port, with its files
(an append-only file, fsynced on every write) in a temporary directory, and
two or three ``chat.py --redis`` processes, each on a port of its own. It
talks to them as pages would, in test_chat.py's helpers (``connect``, ``say``,
``ack``, ``sync``, ``presence``, ``member``, ``refused``), and awaits frames
instead of sleeping; only /healthz and Redis's PING are polled, in short
bounded loops. tearDown kills every process it started and removes the
directory. A failing test prints the tail of each log (pytest shows it).

Covered: what crosses processes (a room message, a private message, presence,
name ownership, joins and leaves, typing, each process's ``node``); one
order for 1,000 pipelined messages from two processes; a private message
queued on one process and delivered on another; ``kill -9`` of a chat.py
process (the janitor, a user with a tab on another process, resuming with
``since``); Redis stopped (SIGTERM) or killed (SIGKILL) during traffic;
``--processes 2`` on one port; ``--processes`` without ``--redis``; every
feature (edits, deletes, reactions, search, scroll-back, read markers,
devices, link codes) across processes and in a process that loads later,
with a deleted text gone from every Redis key; a flushed Redis starting a
new epoch.
"""

import asyncio
import collections
import datetime
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import types
import unittest

from tornado import gen
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port, gen_test

import test_chat

REDIS_SERVER = shutil.which("redis-server")
NODE_TTL = 2  # --node_ttl: seconds before a silent process counts as dead
JANITOR_SLACK = 5  # a dead process's users are offline within NODE_TTL + this
RECOVERY = 5  # seconds after Redis is back within which messages flow again


def redis_test(method):
    """A test of at most 30 s that prints the logs' tails when it fails."""
    @functools.wraps(method)
    async def test(self):
        try:
            await method(self)
        except BaseException:  # a failure, or gen_test's timeout cancelling it
            self.print_logs()
            raise
    return gen_test(timeout=30)(test)


Node = collections.namedtuple("Node", "proc port log")  # one chat.py process


def free_port():
    sock, port = bind_unused_port()
    sock.close()
    return port


@unittest.skipIf(REDIS_SERVER is None, "redis-server is not installed (apt install redis-server)")
class RedisCase(test_chat.ProcessCase):
    """A fresh redis-server per test; chat.py processes on it with cluster()."""

    patience = test_chat.READ_TIMEOUT  # seconds to wait for one frame

    def setUp(self):
        super().setUp()
        self.nodes = []
        self.redis = None
        self.redis_dir = os.path.join(self.tmp, "redis")
        os.mkdir(self.redis_dir)
        self.redis_port = free_port()
        self.redis_url = "redis://127.0.0.1:%d/0" % self.redis_port
        self.addCleanup(self.kill_redis)  # runs even if setUp fails below
        self.start_redis()
        self.io_loop.run_sync(self.redis_ready)

    def tearDown(self):
        for proc in self.procs:  # each chat.py leads a process group: its workers too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.io_loop.run_sync(lambda: asyncio.wait_for(proc.wait(), 10))
        self.kill_redis()
        super().tearDown()

    def print_logs(self):
        for node in self.nodes:
            print("---- chat.py on port %d (exit %s), last lines:" % (node.port, node.proc.returncode))
            print(b"".join(node.log[-25:]).decode("utf-8", "replace"))
        path = os.path.join(self.redis_dir, "redis.log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                print("---- redis.log, last lines:\n" + "".join(f.readlines()[-15:]))

    # ---- redis-server

    def start_redis(self):
        """redis-server on self.redis_port, its files in self.redis_dir (the
        same files again after a stop: that is a restart)."""
        self.redis = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", self.redis_dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", os.path.join(self.redis_dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    async def redis_ready(self, seconds=10):
        """Poll with PING until redis-server answers +PONG (not -LOADING)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if self.redis.poll() is not None:
                self.print_logs()
                self.fail("redis-server exited with %d" % self.redis.returncode)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
                try:
                    writer.write(b"PING\r\n")
                    if await asyncio.wait_for(reader.readline(), 1) == b"+PONG\r\n":
                        return
                finally:
                    writer.close()
            except (OSError, asyncio.TimeoutError):
                pass
            if loop.time() > deadline:
                self.fail("redis-server did not answer PING within %ss" % seconds)
            await asyncio.sleep(0.02)

    async def stop_redis(self, sig):
        """Send redis-server `sig` and wait (bounded) until it has exited."""
        self.redis.send_signal(sig)
        for _ in range(500):
            if self.redis.poll() is not None:
                return self.redis.returncode
            await asyncio.sleep(0.02)
        self.fail("redis-server did not exit on signal %d" % sig)

    def kill_redis(self):
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(10)

    # ---- chat.py processes

    def chat_argv(self):
        return ["--port", "PORT", "--redis", self.redis_url, "--rate", "0", "--names_per_hour", "0",
                "--connects_per_minute", "0", "--offline_grace", "0", "--presence_window", "0",
                "--node_ttl", str(NODE_TTL)]

    async def cluster(self, n=2, *args):
        """n chat.py processes on this Redis, each on its own port and ready."""
        for _ in range(n):
            proc, port, log = await self.start(*args, argv=self.chat_argv(), preexec_fn=os.setsid)
            self.nodes.append(Node(proc, port, log))
        return self.nodes[-n:]

    async def raw_read(self, ws, what):
        try:
            return await gen.with_timeout(datetime.timedelta(seconds=self.patience), ws.read_message())
        except gen.TimeoutError:
            self.fail("nothing arrived within %ss while waiting for %s" % (self.patience, what))

    async def healthz(self, port):
        """(HTTP status, JSON body) of /healthz; (599, None) if nothing answers."""
        response = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/healthz" % port,
                                                 raise_error=False, request_timeout=5)
        return response.code, (json.loads(response.body) if response.code != 599 else None)

    async def until_health(self, port, code, status, seconds):
        """Poll /healthz until it answers `code` with this "status"; return the body."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            got = await self.healthz(port)
            if got[0] == code and got[1]["status"] == status:
                return got[1]
            if loop.time() > deadline:
                self.fail("/healthz of port %d never answered %d %r within %ss (last %r)"
                          % (port, code, status, seconds, got))
            await asyncio.sleep(0.1)

    async def seen(self, ws, status, *names):
        """Read until presence frames have listed every one of `names` as
        `status`; return every frame read."""
        frames, left = [], set(names)
        while left:
            frame = await self.read(ws, "presence of %s as %s" % (sorted(left), status))
            frames.append(frame)
            if frame["type"] == "presence":
                left -= set(frame[status])
        return frames

    async def b_left(self, *args):
        """Two processes (chat.py args): UserA on the first, and UserB, who
        came on the second and left again. Returns (p1, p2, a)."""
        p1, p2 = await self.cluster(2, *args)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.presence(a, "UserB", "online")  # or arriving and leaving could cancel out
        b.close()
        await self.presence(a, "UserB", "offline")
        return p1, p2, a

    async def redis_client(self):
        import redis.asyncio
        return redis.asyncio.Redis(port=self.redis_port, decode_responses=True)

    async def kept_anywhere(self, text):
        """The Redis keys (streams and hashes) that hold `text`."""
        redis = await self.redis_client()
        found = []
        for key in await redis.keys("chat:*"):
            kind = await redis.type(key)
            if kind == "stream":
                bodies = [f["e"] for _, f in await redis.xrange(key)]
            elif kind == "hash":
                bodies = list((await redis.hgetall(key)).values())
            else:
                continue
            if any(text in body for body in bodies):
                found.append(key)
        await redis.aclose()
        return found

    async def room_history(self, ws, room="general"):
        """{id: text} of every message of `room`, paged back with history."""
        found, before = {}, None
        for _ in range(100):
            frame = dict(type="history", room=room, limit=200)
            if before is not None:
                frame["before"] = before
            page = await self.reply(ws, "history", **frame)
            found.update((m["id"], m.get("text")) for m in page["messages"])
            if not page["more"] or not page["messages"]:
                return found
            before = page["messages"][0]["id"]
        self.fail("history of %s did not end within 100 pages" % room)


class AcrossProcessesTest(RedisCase):
    """What one process's client does, the other process's clients see."""

    @redis_test
    async def test_each_process_names_itself_in_welcome_and_healthz(self):
        p1, p2 = await self.cluster(2)
        _, a = await self.connect("UserA", port=p1.port)
        _, b = await self.connect("UserB", port=p2.port)
        self.assertIsInstance(a["node"], str)
        self.assertNotEqual(a["node"], b["node"])
        self.assertEqual(((await self.healthz(p1.port))[1]["node"], (await self.healthz(p2.port))[1]["node"]),
                         (a["node"], b["node"]))

    @redis_test
    async def test_room_message_reaches_the_other_process_with_the_acked_id(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        ack = await self.say(a, "hello from p1")
        got = await self.expect(b, "message", id=ack["id"])
        self.assert_message(got, "hello from p1", "UserA")
        back = await self.say(b, "hello from p2")
        self.assertGreater(back["id"], ack["id"])
        self.assert_message(await self.expect(a, "message", id=back["id"]), "hello from p2", "UserB")

    @redis_test
    async def test_private_message_crosses_processes(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.seen(a, "online", "UserB")  # p1 knows UserB is online: not queued
        ack = await self.say(a, "@UserB just for you")
        self.assertNotIn("queued", ack)
        self.assert_direct(await self.expect(b, "direct", id=ack["id"]), "just for you", "UserA", "UserB")

    @redis_test
    async def test_presence_of_a_user_on_the_other_process(self):
        p1, p2 = await self.cluster(2)
        b, _ = await self.connect("UserB", port=p2.port)
        a, welcome = await self.connect("UserA", port=p1.port)
        if "UserB" not in welcome["online"]:  # p1 may not have read UserB's arrival yet
            await self.seen(a, "online", "UserB")
        await self.presence(b, "UserA", "online")
        a.close()
        self.assertEqual(await self.presence(b, "UserA", "offline"),
                         {"type": "presence", "online": [], "offline": ["UserA"]})

    @redis_test
    async def test_name_owned_on_one_process_is_taken_on_the_other(self):
        p1, p2 = await self.cluster(2)
        await self.connect("UserA", port=p1.port)
        await self.refused("name_taken", 4409, username="UserA", port=p2.port)
        await self.refused("name_taken", 4409, username="usera", port=p2.port)
        await self.refused("name_taken", 4409, username="UserA", token="not-the-token", port=p2.port)
        _, welcome = await self.connect("UserA", self.tokens["UserA"], port=p2.port)
        self.assertEqual(welcome["user"], "UserA")

    @redis_test
    async def test_join_and_leave_are_told_on_the_other_process(self):
        p1, p2 = await self.cluster(2)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.reply(b, "joined", type="join", room="python")
        a, _ = await self.connect("UserA", port=p1.port)
        joined = await self.reply(a, "joined", type="join", room="python")
        self.assertEqual(joined["members"], ["UserA", "UserB"])
        await self.member(b, "python", "UserA", "join")
        await self.reply(a, "left", type="leave", room="python")
        frame = await self.member(b, "python", "UserA", "leave")
        self.assertEqual(frame, {"type": "member", "room": "python", "joined": [], "left": ["UserA"]})

    @redis_test
    async def test_typing_crosses_processes(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.seen(a, "online", "UserB")
        await self.ack(a, type="typing", room="general")
        self.assertEqual(await self.expect(b, "typing"), {"type": "typing", "user": "UserA", "room": "general"})
        await self.ack(a, type="typing", to="userb")
        self.assertEqual(await self.expect(b, "typing"), {"type": "typing", "user": "UserA", "to": "UserB"})


class OrderTest(RedisCase):
    """One order for everyone, whichever process a message came in on."""
    EACH = 500

    async def send_all(self, ws, name):
        """Send EACH messages pipelined, with refs; read until all are acked
        and all 2 * EACH messages have arrived. Returns ({id: text} acked,
        the messages received)."""
        refs = {}
        for i in range(self.EACH):
            refs[self.ref()] = "%s %d" % (name, i)
        for ref, text in refs.items():
            self.send(ws, type="message", text=text, ref=ref)
        acked, got, ids = {}, [], set()
        while refs or len(got) < 2 * self.EACH:
            frame = await self.read(ws, "acks (%d left) and messages (%d so far)" % (len(refs), len(got)))
            if frame["type"] == "message":
                got.append(frame)
                ids.add(frame["id"])
            elif frame.get("ref") in refs:
                self.assertEqual(frame["type"], "ack", frame)
                self.assertTrue(frame["id"] in ids, "the ack of %d came before the message" % frame["id"])
                acked[frame["id"]] = refs.pop(frame["ref"])
        return acked, got

    async def receive(self, ws):
        got = []
        while len(got) < 2 * self.EACH:
            frame = await self.read(ws, "message %d of %d" % (len(got) + 1, 2 * self.EACH))
            if frame["type"] == "message":
                got.append(frame)
        return got

    @redis_test
    async def test_pipelined_frames_are_answered_in_order_and_see_each_others_effects(self):
        """A message's handler waits for Redis while the next frame is read;
        answers still come in frame order, and a frame after a join sees it."""
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.ack(b, type="join", room="pipes")
        frames = [dict(type="message", text="one"), dict(type="message", text=""),
                  dict(type="join", room="pipes"), dict(type="message", room="pipes", text="two"),
                  dict(type="message", text="three"), dict(type="rooms")]
        refs = [self.ref() for _ in frames]
        for ref, frame in zip(refs, frames):
            self.send(a, ref=ref, **frame)
        answers = []
        while len(answers) < len(refs):
            frame = await self.read(a, "the answers")
            if frame.get("ref") in refs:
                answers.append(frame)
        self.assertEqual([f["ref"] for f in answers], refs)
        self.assertEqual([f["type"] for f in answers], ["ack", "error", "ack", "ack", "ack", "ack"])
        ids = [answers[i]["id"] for i in (0, 3, 4)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual((await self.expect(b, "message", id=ids[1]))["text"], "two")

    @redis_test
    async def test_two_senders_on_two_processes_one_order_everywhere(self):
        p1, p2, p3 = await self.cluster(3)
        s1, _ = await self.connect("Sender1", port=p1.port)
        s2, _ = await self.connect("Sender2", port=p2.port)
        readers = [(await self.connect("Reader%d" % i, port=p.port))[0] for i, p in enumerate((p1, p2, p3))]
        (acked1, got1), (acked2, got2), *got = await asyncio.gather(
            self.send_all(s1, "Sender1"), self.send_all(s2, "Sender2"), *map(self.receive, readers))
        sent = {**acked1, **acked2}
        self.assertEqual(len(sent), 2 * self.EACH, "two messages were acked with one id")
        author = {i: "Sender1" for i in acked1} | {i: "Sender2" for i in acked2}
        for who, messages in zip(["Sender1", "Sender2", "Reader0", "Reader1", "Reader2"], [got1, got2, *got]):
            with self.subTest(receiver=who):
                self.assertEqual([m["id"] for m in messages], sorted(sent), "not all, once each, in id order")
                self.assertEqual([(m["from"], m["text"]) for m in messages],
                                 [(author[m["id"]], sent[m["id"]]) for m in messages])


class OfflineDirectTest(RedisCase):

    @redis_test
    async def test_queued_on_one_process_delivered_once_on_the_other(self):
        p1, p2, a = await self.b_left()
        ack = await self.say(a, "@UserB while you were away")
        self.assertIs(ack.get("queued"), True, ack)

        b, _ = await self.connect("UserB", self.tokens["UserB"], port=p2.port)
        direct = await self.expect(b, "direct")
        self.assert_direct(direct, "while you were away", "UserA", "UserB", buffered=True)
        self.assertEqual(direct["id"], ack["id"])
        self.assertNotIn(ack["id"], [f.get("id") for f in await self.sync(b)], "delivered twice")
        receipt, before = await self.until(a, "delivered")
        self.assertEqual(receipt, {"type": "delivered", "id": ack["id"], "to": "UserB"})

        if not any(f["type"] == "presence" and "UserB" in f["online"] for f in before):
            await self.presence(a, "UserB", "online")
        b.close()
        await self.presence(a, "UserB", "offline")
        b, _ = await self.connect("UserB", self.tokens["UserB"], port=p1.port)
        self.assertEqual([f for f in await self.sync(b) if f["type"] == "direct"], [], "delivered again")
        self.assertEqual([f for f in await self.sync(a) if f["type"] == "delivered"], [], "a second receipt")


class KillProcessTest(RedisCase):
    """kill -9 of one chat.py: the others show its users offline (the janitor)."""

    @redis_test
    async def test_users_of_a_killed_process_go_offline_and_resume_elsewhere(self):
        p1, p2 = await self.cluster(2)
        b, _ = await self.connect("UserB", port=p2.port)
        a, _ = await self.connect("UserA", port=p1.port)
        await self.connect("UserC", port=p1.port)
        c, _ = await self.connect("UserC", self.tokens["UserC"], port=p2.port)  # a second tab, on p2
        await self.seen(b, "online", "UserA", "UserC")
        first = await self.say(b, "before the kill")
        await self.expect(a, "message", id=first["id"])
        since = (await self.say(a, "me too"))["id"]  # the highest id UserA has seen
        watched = []  # every frame UserB gets from the kill on

        p1.proc.kill()
        self.assertEqual(await p1.proc.wait(), -signal.SIGKILL)
        self.patience = NODE_TTL + JANITOR_SLACK
        try:
            watched += await asyncio.wait_for(self.seen(b, "offline", "UserA"), NODE_TTL + JANITOR_SLACK)
        except asyncio.TimeoutError:
            self.fail("UserA was not shown offline within %ss of the kill" % (NODE_TTL + JANITOR_SLACK))
        self.patience = test_chat.READ_TIMEOUT

        missed = []
        for ws, text in ((b, "missed 0"), (b, "missed 1"), (c, "missed 2")):
            ack, before = await self.ack(ws, type="message", text=text)
            missed.append(ack["id"])
            if ws is b:
                watched += before
        a, _ = await self.connect("UserA", self.tokens["UserA"], since=since, port=p2.port)
        history = a.joined["general"]["history"]
        self.assertEqual([(m["id"], m["text"]) for m in history],
                         list(zip(missed, ["missed 0", "missed 1", "missed 2"])), "not exactly what UserA missed")
        self.assertFalse(a.joined["general"].get("truncated", False))
        watched += await self.seen(b, "online", "UserA")
        watched += await self.sync(b)
        self.assertEqual([f for f in watched if f["type"] == "presence" and "UserC" in f["offline"]], [],
                         "UserC kept a tab on p2 but was shown offline")


class RedisOutageTest(RedisCase):
    """Redis goes away during traffic and comes back on its append-only file:
    nothing acked is lost, and the processes resume by themselves."""
    patience = 8  # an answer during the outage may wait for one reconnect attempt

    async def traffic(self, ws, acked, errors, stop, flowing):
        """Send "t0", "t1", ... in pipelined tens with refs until `stop` is
        set; record {id: text} of the acked and the codes of errors; set
        `flowing` after each ten that were all acked."""
        for n in itertools.count(step=10):
            if stop.is_set():
                return
            refs = {self.ref(): "t%d" % i for i in range(n, n + 10)}
            for ref, text in refs.items():
                self.send(ws, type="message", text=text, ref=ref)
            failed = len(errors)
            while refs:
                frame = await self.read(ws, "the answers to %d messages" % len(refs))
                if frame["type"] in ("ack", "error") and frame.get("ref") in refs:
                    text = refs.pop(frame["ref"])
                    if frame["type"] == "ack":
                        acked[frame["id"]] = text
                    else:
                        errors.append(frame["code"])
            if len(errors) == failed:
                flowing.set()
            await asyncio.sleep(0.05)  # pacing: a few hundred a second is traffic enough

    async def flows_again(self, sender, receiver):
        """Send from `sender` until one is acked; it then reaches `receiver`."""
        for attempt in itertools.count():
            answer, _ = await self.request(sender, type="message", text="back %d" % attempt)
            if answer["type"] == "ack":
                got = await self.expect(receiver, "message", id=answer["id"])
                self.assertEqual(got["text"], "back %d" % attempt)
                return
            self.assertEqual(answer["code"], "server_error", answer)
            await asyncio.sleep(0.1)

    async def outage(self, sig):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("Sender", port=p1.port)
        d, _ = await self.connect("UserD", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        acked, errors, stop, flowing = {}, [], asyncio.Event(), asyncio.Event()
        sender = asyncio.ensure_future(self.traffic(a, acked, errors, stop, flowing))
        try:
            await asyncio.wait_for(flowing.wait(), 10)  # ten acked: traffic flows
            self.assertEqual(await self.stop_redis(sig), 0 if sig == signal.SIGTERM else -signal.SIGKILL)
            for node in (p1, p2):
                await self.until_health(node.port, 503, "degraded", NODE_TTL + 5)
            await self.refused("server_error", 1013, username="Latecomer", port=p2.port)
            answer, _ = await self.request(b, type="message", text="while Redis is away")
            self.assertEqual((answer["type"], answer.get("code")), ("error", "server_error"), answer)

            self.start_redis()
            await self.redis_ready()
            try:
                await asyncio.wait_for(self.flows_again(d, b), RECOVERY)
            except asyncio.TimeoutError:
                self.fail("no message from p1 reached p2 within %ss after Redis came back" % RECOVERY)
            flowing.clear()
            await asyncio.wait_for(flowing.wait(), 10)  # and the sender's traffic flows again
            stop.set()
            await sender
        finally:
            if not sender.done():
                sender.cancel()
            elif not sender.cancelled() and sender.exception() is not None:
                raise sender.exception()  # the sender's failure is the one to see
        for node in (p1, p2):
            await self.until_health(node.port, 200, "ok", RECOVERY)
        self.assertLessEqual(set(errors), {"server_error"})

        # Both processes' keys expired while Redis was away. Once it is back,
        # each renews its own before any janitor judges (they wait --node_ttl):
        # nobody connected is shown offline, and both keys are there again.
        redis = await self.redis_client()
        for _ in range(200):
            if await redis.exists("chat:janitor"):
                break  # a janitor has looked
            await asyncio.sleep(0.05)
        else:
            self.fail("no janitor ran within 10 s of Redis coming back")
        self.assertEqual(len(await redis.keys("chat:node:*")), 2)
        await redis.aclose()
        self.assertEqual([f for f in await self.sync(b) if f["type"] == "presence" and f["offline"]], [],
                         "a user still connected was shown offline after Redis came back")

        for port in (p2.port, p1.port):
            auditor, _ = await self.connect("Auditor", self.tokens.get("Auditor"), port=port)
            history = await self.room_history(auditor)
            lost = sorted(i for i, text in acked.items() if history.get(i) != text)
            self.assertEqual(lost, [], "%d of %d acked messages are missing from the history on port %d"
                             % (len(lost), len(acked), port))

    @redis_test
    async def test_redis_restarted_during_traffic_loses_nothing_acked(self):
        """SIGTERM: Redis writes its file and exits; started again on it."""
        await self.outage(signal.SIGTERM)

    @redis_test
    async def test_redis_killed_during_traffic_loses_nothing_acked(self):
        """SIGKILL: with appendfsync always, what Redis answered is on disk."""
        await self.outage(signal.SIGKILL)


class WorkersTest(RedisCase):
    """--processes 2: two workers share one port (SO_REUSEPORT) and one Redis."""

    @redis_test
    async def test_two_workers_on_one_port_are_one_server(self):
        proc, port, log = await self.start("--processes", "2", argv=self.chat_argv(), preexec_fn=os.setsid)
        self.nodes.append(Node(proc, port, log))
        loop = asyncio.get_running_loop()
        deadline, answered = loop.time() + 10, set()
        while len(answered) < 2 and loop.time() < deadline:  # each fetch is a new connection
            code, body = await self.healthz(port)
            if code == 200:
                answered.add(body["node"])
            await asyncio.sleep(0.02)
        self.assertEqual(len(answered), 2, "one worker only answered /healthz: %r" % answered)

        first = {}  # node -> (ws, user) of the first connection it served
        for i in range(40):
            ws, welcome = await self.connect("User%d" % i, port=port)
            first.setdefault(welcome["node"], (ws, welcome["user"]))
            if len(first) == 2:
                break
        self.assertEqual(len(first), 2, "40 connections, all served by %r" % list(first))
        (x, xname), (y, yname) = first.values()
        ack = await self.say(x, "from one worker")
        self.assert_message(await self.expect(y, "message", id=ack["id"]), "from one worker", xname)
        ack = await self.say(y, "and from the other")
        self.assert_message(await self.expect(x, "message", id=ack["id"]), "and from the other", yname)


class ProcessesNeedRedisTest(test_chat.ProcessCase):

    @gen_test(timeout=30)
    async def test_processes_without_redis_is_one_line_and_exit_2(self):
        proc, _, _ = await self.start(ready=False, argv=["--port", "PORT", "--db", self.db, "--processes", "2"])
        code = await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode()
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("--processes", err)
        self.assertIn("--redis", err)
        self.assertNotIn("Traceback", err)


class EveryFeatureTest(RedisCase):
    """Scroll-back, search, read markers, devices, edits, deletes and
    reactions work across processes, and a process started later (which
    loads everything from Redis) answers exactly as the others do."""

    @redis_test
    async def test_changes_cross_processes_and_a_new_process_has_them(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.presence(a, "UserB", "online")
        first = (await self.say(a, "deploy logs are in"))["id"]
        reply = (await self.ack(a, type="message", text="see above", reply_to=first))[0]["id"]
        secret = (await self.say(b, "@UserA the vault code is 4471"))["id"]
        await self.expect(a, "direct", id=secret)

        edited = await self.reply(a, "edited", type="edit", id=first, text="deploy logs moved")
        self.assertEqual(await self.expect(b, "edited", id=edited["id"]), edited)
        reaction = await self.reply(b, "reaction", type="react", id=first, emoji="👍")
        self.assertEqual(await self.expect(a, "reaction", id=reaction["id"]), reaction)
        deleted = await self.reply(b, "deleted", type="delete", id=secret)
        self.assertEqual(await self.expect(a, "deleted", id=deleted["id"]), deleted)
        await self.ack(b, type="read", room="general", id=reply)
        link = await self.reply(a, "link", type="link")

        p3, = await self.cluster(1)  # loads from Redis alone
        for port in (p2.port, p3.port):
            b2, welcome = await self.connect("UserB", self.tokens["UserB"], port=port)
            general = b2.joined["general"]
            self.assertEqual(general["read"], reply, "the read marker moved on p2")
            history = {m["id"]: m for m in general["history"]}
            self.assertEqual(history[first]["text"], "deploy logs moved")
            self.assertEqual(history[first]["reactions"], {"👍": ["UserB"]})
            self.assertEqual(history[reply]["quote"], "deploy logs moved")
            results = await self.reply(b2, "results", type="search", q="deploy moved")
            self.assertEqual([m["id"] for m in results["messages"]], [first])
            self.assertEqual((await self.reply(b2, "results", type="search", q="vault"))["messages"], [])
            directs = await self.reply(b2, "history", type="history", directs=True)
            self.assertEqual(directs["messages"], [{"type": "direct", "id": secret, "from": "UserB",
                                                    "to": "UserA", "ts": directs["messages"][0]["ts"],
                                                    "time": directs["messages"][0]["time"], "deleted": True}])
            devices = await self.reply(b2, "devices", type="devices")
            self.assertEqual([d["current"] for d in devices["devices"]], [True])

        # A link code made on p1 signs a new device in on p3.
        ws = await test_chat.websocket_connect(self.url(p3.port, username="UserA", link=link["code"]))
        self.sockets.append(ws)
        self.assertEqual((await self.read(ws, "the welcome of the new device"))["type"], "welcome")

        # The deleted text is gone from Redis: no key holds it.
        self.assertEqual(await self.kept_anywhere("vault"), [])

    @redis_test
    async def test_a_read_marker_never_goes_back_in_what_redis_keeps(self):
        p1, p2 = await self.cluster(2)
        b, _ = await self.connect("UserB", port=p1.port)
        low = (await self.say(b, "one"))["id"]
        high = (await self.say(b, "two"))["id"]
        await self.ack(b, type="read", room="general", id=high)
        b2, _ = await self.connect("UserB", self.tokens["UserB"], port=p2.port)
        await self.ack(b2, type="read", room="general", id=low)  # an older one: changes nothing
        p3, = await self.cluster(1)
        b3, _ = await self.connect("UserB", self.tokens["UserB"], port=p3.port)
        self.assertEqual(b3.joined["general"]["read"], high)

    @redis_test
    async def test_a_join_on_one_process_marks_the_room_read_on_every_process(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        await self.ack(a, type="join", room="python")
        before = (await self.say(a, "said before UserB came", room="python"))["id"]
        joined = await self.reply(b, "joined", type="join", room="python")
        after = (await self.say(a, "said after", room="python"))["id"]
        self.assertTrue(before <= joined["read"] < after, (before, joined["read"], after))
        # Out of the default room and back: what was said meanwhile is not unread.
        await self.reply(b, "left", type="leave", room="general")
        meanwhile = (await self.say(a, "said while UserB was out"))["id"]
        back = await self.reply(b, "joined", type="join", room="general")
        self.assertGreaterEqual(back["read"], meanwhile)
        p3, = await self.cluster(1)  # loads from Redis alone, which keeps B's first join and its rejoin
        for port in (p1.port, p3.port):
            b2, _ = await self.connect("UserB", self.tokens["UserB"], port=port)
            self.assertEqual(b2.joined["python"]["read"], joined["read"])
            self.assertEqual(b2.joined["general"]["read"], back["read"], "the same marker on every process")

    @redis_test
    async def test_an_edit_racing_a_delete_leaves_no_text_in_redis(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        a2, _ = await self.connect("UserA", self.tokens["UserA"], port=p2.port)
        target = (await self.say(a, "soon gone"))["id"]
        await self.expect(a2, "message", id=target)
        delete, edit = self.ref(), self.ref()
        self.send(a, type="delete", id=target, ref=delete)
        self.send(a2, type="edit", id=target, text="RACING EDIT TEXT", ref=edit)
        await self.until(a, "ack", ref=delete)
        while True:  # the edit is acked (it came first, and the delete erased it too) or refused
            frame = await self.read(a2, "the answer to the edit")
            if frame.get("ref") == edit:
                self.assertIn(frame["type"], ("ack", "error"))
                if frame["type"] == "error":
                    self.assertEqual(frame["code"], "not_found")
                break
        self.assertEqual(await self.kept_anywhere("RACING EDIT TEXT"), [])
        self.assertEqual(await self.kept_anywhere("soon gone"), [])

    @redis_test
    async def test_a_private_message_refused_for_a_full_mailbox_is_not_kept(self):
        p1, p2, a = await self.b_left("--mailbox", "2")
        for n in range(2):
            self.assertTrue((await self.say(a, "@UserB kept %d" % n))["queued"])
        await self.error(a, "mailbox_full", type="message", text="@UserB ONE TOO MANY")
        self.assertEqual(await self.kept_anywhere("ONE TOO MANY"), [])


class PipelineEdgesTest(RedisCase):
    """What a client that sends fast may meet, and what Redis keeps for it."""

    @redis_test
    async def test_a_repeated_cid_in_flight_is_one_message_and_one_waiting(self):
        p1, p2, a = await self.b_left()
        refs = [self.ref(), self.ref()]
        for ref in refs:  # a page re-sending before the first answer came
            self.send(a, type="message", text="@UserB hello", cid="c1", ref=ref)
        acks = [await self.expect(a, "ack", ref=ref) for ref in refs]
        self.assertEqual(acks[0]["id"], acks[1]["id"])
        self.assertTrue(acks[0]["queued"] and acks[1]["queued"])
        redis = await self.redis_client()
        self.assertEqual(await redis.smembers("chat:waiting:userb"), {str(acks[0]["id"])})
        b, _ = await self.connect("UserB", self.tokens["UserB"], port=p2.port)
        kept = [m for m in await self.sync(b) if m["type"] == "direct"]
        self.assertEqual([m["id"] for m in kept], [acks[0]["id"]])
        await self.expect(a, "delivered", id=acks[0]["id"])
        self.assertEqual(await redis.smembers("chat:waiting:userb"), set())
        await redis.aclose()

    @redis_test
    async def test_a_deleted_waiting_message_frees_its_mailbox_place(self):
        p1, p2, a = await self.b_left("--mailbox", "1")
        first = await self.say(a, "@UserB oops")
        await self.reply(a, "deleted", type="delete", id=first["id"])
        second = await self.say(a, "@UserB this one")  # the mailbox of one has room again
        self.assertTrue(second["queued"])
        p3, = await self.cluster(1, "--mailbox", "1")  # a process that loads it all later agrees
        b, _ = await self.connect("UserB", self.tokens["UserB"], port=p3.port)
        self.assertEqual([m["id"] for m in await self.sync(b) if m["type"] == "direct"], [second["id"]])

    @redis_test
    async def test_an_old_message_beyond_what_redis_keeps_can_still_be_deleted(self):
        p1, _ = await self.cluster(2, "--redis_history", "5")
        a, _ = await self.connect("UserA", port=p1.port)
        old = await self.say(a, "my old message")
        for n in range(40):
            await self.say(a, "later %d" % n)
        await self.reply(a, "reaction", type="react", id=old["id"], emoji="👍")
        await self.reply(a, "deleted", type="delete", id=old["id"])
        self.assertEqual(await self.kept_anywhere("my old message"), [])

    @redis_test
    async def test_logout_is_acked_before_the_close(self):
        p1, _ = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        await self.ack(a, type="logout")
        self.assertEqual((await self.read(a))["code"], "revoked")
        self.assertIsNone(await self.raw_read(a, "the close"))
        self.assertEqual(a.close_code, 4401)

    @redis_test
    async def test_messages_keep_their_order_when_redis_forgets_the_script(self):
        p1, p2 = await self.cluster(2)
        a, _ = await self.connect("UserA", port=p1.port)
        redis = await self.redis_client()
        refs = {}
        for n in range(300):
            ref = self.ref()
            refs[ref] = n
            self.send(a, type="message", text="n%d" % n, ref=ref)
            if n % 10 == 5:
                await redis.script_flush()
        stored = {}
        while refs:
            frame = await self.read(a, "the answers")
            if frame.get("ref") in refs:
                n = refs.pop(frame["ref"])
                if frame["type"] == "ack":
                    stored[frame["id"]] = n
                else:
                    self.assertEqual(frame["code"], "server_error", frame)
        self.assertGreater(len(stored), 30)
        in_id_order = [stored[id] for id in sorted(stored)]
        self.assertEqual(in_id_order, sorted(in_id_order), "stored out of the order they were sent in")
        await redis.aclose()


class RedisLostItsDataTest(RedisCase):
    """Redis flushed (or started without its files): the processes start
    over under a new epoch, nobody goes deaf, and clients start over."""

    @redis_test
    async def test_a_flushed_redis_is_a_new_data_set(self):
        p1, p2 = await self.cluster(2)
        a, welcome = await self.connect("UserA", port=p1.port)
        b, _ = await self.connect("UserB", port=p2.port)
        for n in range(5):
            await self.say(a, "before the flush %d" % n)
        redis = await self.redis_client()
        await redis.flushall()
        # A message sent before the processes notice is refused, not written
        # into the new data set (the script checks the epoch).
        self.send(a, type="message", text="IN THE WINDOW", ref=self.ref())
        await redis.aclose()
        # Each process notices within a beat, closes its connections and loads the empty data set.
        for ws in (a, b):
            while (await ws.read_message()) is not None:
                pass
        for node in (p1, p2):
            await self.until_health(node.port, 200, "ok", 10)
        a, again = await self.connect("UserA", port=p1.port)
        self.assertNotEqual(again["epoch"], welcome["epoch"])
        b, _ = await self.connect("UserB", port=p2.port)
        await self.presence(a, "UserB", "online")
        ack = await self.say(a, "after the flush")
        self.assertEqual((await self.expect(b, "message", id=ack["id"]))["text"], "after the flush")
        self.assertEqual(a.joined["general"]["history"], [])
        self.assertEqual(await self.kept_anywhere("IN THE WINDOW"), [])


class ProcessLifeTest(RedisCase):
    """A process stopped cleanly, paused past its TTL, or left far behind."""

    @redis_test
    async def test_sigterm_marks_its_users_offline_at_once(self):
        # A TTL far longer than the test: only the stopping process itself can say it.
        p1, p2 = await self.cluster(2, "--node_ttl", "60")
        b, _ = await self.connect("UserB", port=p2.port)
        await self.connect("UserA", port=p1.port)
        await self.connect("UserC", port=p1.port)
        c, _ = await self.connect("UserC", self.tokens["UserC"], port=p2.port)
        await self.seen(b, "online", "UserA", "UserC")
        p1.proc.terminate()
        self.assertEqual(await p1.proc.wait(), 0)
        frames = await self.seen(b, "offline", "UserA")
        frames += await self.sync(b)
        self.assertFalse([f for f in frames if f["type"] == "presence" and "UserC" in f["offline"]],
                         "UserC still has a tab on p2")

    @redis_test
    async def test_a_private_message_to_a_user_whose_process_just_died_comes_back_with_since(self):
        p1, p2 = await self.cluster(2, "--node_ttl", "60")  # UserA stays "online" for the whole test
        b, _ = await self.connect("UserB", port=p2.port)
        a, _ = await self.connect("UserA", port=p1.port)
        await self.presence(b, "UserA", "online")
        since = (await self.say(a, "last words"))["id"]
        p1.proc.kill()
        await p1.proc.wait()
        sent = await self.say(b, "@UserA did you get this?")  # not queued: UserA is online as far as Redis knows
        self.assertFalse(sent.get("queued", False))
        a, _ = await self.connect("UserA", self.tokens["UserA"], since=since, port=p2.port)
        got = await self.expect(a, "direct", id=sent["id"])
        self.assertEqual(got["text"], "did you get this?")

    @redis_test
    async def test_a_paused_process_judged_dead_puts_its_users_back(self):
        p1, p2 = await self.cluster(2)
        b, _ = await self.connect("UserB", port=p2.port)
        a, _ = await self.connect("UserA", port=p1.port)
        await self.presence(b, "UserA", "online")
        os.kill(p1.proc.pid, signal.SIGSTOP)  # alive, but its key expires: the janitor takes it for dead
        try:
            self.patience = NODE_TTL + JANITOR_SLACK
            await self.presence(b, "UserA", "offline")
        finally:
            os.kill(p1.proc.pid, signal.SIGCONT)
        await self.presence(b, "UserA", "online")  # p1 woke, saw its user marked off, and said otherwise
        self.patience = test_chat.READ_TIMEOUT
        ack = await self.say(a, "still here")
        await self.expect(b, "message", id=ack["id"])

    @redis_test
    async def test_a_process_left_behind_the_log_loads_again_and_its_clients_resume(self):
        p1, p2 = await self.cluster(2, "--redis_log", "20")
        redis = await self.redis_client()
        await redis.config_set("stream-node-max-entries", 5)  # so that trimming "~ 20" trims this small log
        await redis.aclose()
        b, _ = await self.connect("UserB", port=p2.port)
        a, _ = await self.connect("UserA", port=p1.port)
        since = (await self.say(a, "before the pause"))["id"]
        os.kill(p2.proc.pid, signal.SIGSTOP)
        try:
            sent = [(await self.say(a, "while p2 sleeps %d" % n))["id"] for n in range(60)]
        finally:
            os.kill(p2.proc.pid, signal.SIGCONT)
        await self.logged(p2.proc, p2.log, b"loads its state from Redis again")
        while (await b.read_message()) is not None:  # p2 closed its connections: they resume
            pass
        await self.until_health(p2.port, 200, "ok", 10)  # loaded again (connects were refused meanwhile)
        b, _ = await self.connect("UserB", self.tokens["UserB"], since=since, port=p2.port)
        got = [m["id"] for m in b.joined["general"]["history"]]
        self.assertEqual(got, sent[-len(got):])
        self.assertEqual(len(got), min(len(sent), 100))  # --history 100: all 60


class ErasedBeforeReadTest(unittest.IsolatedAsyncioTestCase):
    """A delete erases a message and its edits from the log (XDEL). A process
    that had not read them yet finds a hole in the ids, and its own commits
    waiting for one of them are answered all the same: an edit racing a
    delete on another process used to wait for ever. Redis is faked here
    (only the append's reply): the race is too narrow to force on a real one."""

    async def test_a_commit_whose_event_was_erased_unread_is_answered_not_found(self):
        import chat_redis
        conf = types.SimpleNamespace(redis="redis://127.0.0.1:9/0", node_ttl=10, redis_log=1000,
                                     redis_history=1000, max_users=0, names_per_hour=0, mailbox=10)
        backplane = chat_redis.RedisBackplane(test_chat.chat, conf)
        self.addCleanup(shutil.rmtree, backplane.dir, True)
        backplane.healthy, backplane.last, backplane.epoch = True, 10, "e"
        replies, appended = iter([[b"ok", b"11"], [b"ok", b"12"]]), asyncio.Event()

        async def append(args):
            appended.set()
            return next(replies)
        backplane._append = append
        edit = asyncio.ensure_future(backplane.commit({"kind": "device", "user": "ann", "hash": "h", "label": "x"}))
        await appended.wait()  # the commit has its id, 11, and waits to read it from the log
        self.assertFalse(edit.done())
        # The log goes on at 14: 11-13 were erased before this process read them.
        backplane._apply({"id": 14, "kind": "presence", "user": "nobody", "node": "elsewhere", "on": True})
        with self.assertRaises(test_chat.chat.ChatError) as raised:
            await asyncio.wait_for(edit, 5)
        self.assertEqual(raised.exception.code, "not_found")
        # An append whose reply comes back only after the hole was passed: the same answer.
        with self.assertRaises(test_chat.chat.ChatError) as raised:
            await backplane.commit({"kind": "device", "user": "ann", "hash": "h", "label": "x"})
        self.assertEqual(raised.exception.code, "not_found")
