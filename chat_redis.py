"""chat_redis.py: the Redis backplane, so that many chat.py processes, on one
machine or many, serve as one chat server. chat.py imports it only when
``--redis URL`` is given; without it chat.py needs nothing but Tornado.

How the pieces fit
------------------
* **One shared log.** Every change (a message, a private message, a
  delivery, an edit, a delete, a reaction, a membership, a read marker, a
  new name or device, a process gaining or losing a user) is an event. The
  APPEND Lua script gives it the next id (``INCR chat:id``), ``XADD``\\ s it to
  the stream ``chat:log`` with that id, and writes its durable home, all
  atomically. What must hold across processes is checked there, before
  anything is written: the data set's epoch, a free name (and no
  lookalike), --max_users, names per address, a mailbox with room, a
  message still there to edit, react to or delete, a read marker that
  moves forward. The sender is acked only after its own process has
  applied the event, so it sees its message no later than the ack.
* **Every process reads the log.** One ``XREAD BLOCK`` loop per process
  applies each event, in id order, through ``Hub.apply``: the same code the
  single-process server runs. Apply writes a private SQLite file (the
  *projection*: history, search, read markers, devices), then the
  class-level dicts, then sends to this process's connections. A connect
  is answered from the projection, without a round trip to Redis.
* **Durable homes.** The log keeps the last ``--redis_log`` ids. What a
  new process needs outlives it: each room's events in ``chat:room:<room>``
  and each user's private ones in ``chat:dm:<user>`` (the newest
  ``--redis_history`` of each), and the latest event per name, device,
  room, membership and read marker in the hash ``chat:state``. At start a
  process reads all of it in one MULTI, with the log's last id, and applies
  it in id order to a fresh projection; then it reads the log from there.
  A process whose next event was trimmed from the log loads again the same
  way (its connections resume with ``since``), and says so in its log.
* **Presence heals.** A process appends "on" when it gets a user's first
  connection and "off" when it loses its last; ``chat:online`` counts the
  processes a user is on, which decides whether a private message waits
  in a mailbox. Each process renews ``chat:node:<node>`` every beat (TTL
  ``--node_ttl``). A janitor (whoever holds the short ``chat:janitor``
  lock) appends "off" for the users of a process whose key expired; after
  a Redis restart it first waits ``--node_ttl``. A process that finds its
  own users marked off puts them back.
* **Redis goes away.** Appends fail at once (no retries, so a retry cannot
  post twice) and the client gets ``server_error``; new connections are
  refused with 1013. The read loop reconnects with backoff and carries on
  from its last id. A process that cannot read the log for ``--node_ttl``
  logs it and reports ``degraded`` (HTTP 503) on /healthz.
* **Redis loses its data** (FLUSHALL, no AOF): ``chat:epoch`` names the data
  set; a process that sees it change or vanish closes its connections and
  starts over, and clients start over through ``epoch``.

Typing goes over pub/sub (``chat:signal``): it is not kept. The appends and
the read loop use a bare RESP connection each (``Wire``); everything else
uses redis-py. One Redis instance: Cluster and Sentinel are out of scope.
Keys all start with ``chat:``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import urllib.parse
from typing import Any, Optional

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, ResponseError

log = logging.getLogger("chat")

LOG = "chat:log"  # every event, in id order
STATE = "chat:state"  # the latest event per name, device, room, membership and read marker
ROOM = "chat:room:"  # + room key: the room's events
DM = "chat:dm:"  # + user key: the user's private messages and their changes
EPOCH = "chat:epoch"  # names the data set
NODES = "chat:nodes"  # processes that have had users
NODE = "chat:node:"  # + node: renewed each beat, with a TTL
PRESENT = "chat:present:"  # + node: the users it has connections of
ONLINE = "chat:online"  # user key -> on how many processes
LINK = "chat:link:"  # + code: the user a one-time code signs in as (with a TTL)
LINK_OF = "chat:linkof:"  # + user key: its current code
JANITOR = "chat:janitor"  # the lock of the process that marks dead processes' users offline
SIGNAL = "chat:signal"  # pub/sub: typing

# Appends one event: the checks that must hold across processes, the id, the
# log, the durable homes. ARGV: the event as JSON, the log's length in ids,
# each home's length, the name's skeleton (claim), --max_users, names per
# address an hour, the data set's epoch as this process knows it, --mailbox,
# then the homes ("s:<stream>" or "h:<state field>"; a field ending in "#"
# gets the new device id). Answers {'ok', id}, {'skip'} (nothing to record)
# or {'err', code, sentence} (nothing written).
APPEND = r"""
if redis.call('GET', 'chat:epoch') ~= ARGV[7] then
  return {'err', 'epoch', 'the data set changed; try again'}
end
local event = cjson.decode(ARGV[1])
local kind = event['kind']
local cids = nil
if (kind == 'message' or kind == 'direct') and type(event['cid']) == 'string' then
  -- A repeat of a message already stored (its reply was lost): its first id.
  cids = 'chat:cid:' .. event['user']
  local first = redis.call('HGET', cids, event['cid'])
  if first then return {'dup', tonumber(first)} end
end
if kind == 'claim' then
  if redis.call('HEXISTS', 'chat:names', event['user']) == 1 then
    return {'err', 'name_taken', event['name'] .. ' is taken; pick another name'}
  end
  local twin = redis.call('HGET', 'chat:looks', ARGV[4])
  if twin then
    return {'err', 'bad_username', event['name'] .. ' is too close to the name ' ..
            redis.call('HGET', 'chat:names', twin) .. '; pick another'}
  end
  local most = tonumber(ARGV[5])
  if most > 0 and redis.call('HLEN', 'chat:names') >= most then
    return {'err', 'server_full', 'this server has all the users it allows'}
  end
  local per_ip = tonumber(ARGV[6])
  if per_ip > 0 then
    local budget = 'chat:names_ip:' .. event['ip']
    local used = redis.call('INCR', budget)
    if used == 1 then redis.call('EXPIRE', budget, 3600) end
    if used > per_ip then return {'err', 'rate_limited', 'too many new names from your address; try later'} end
  end
  redis.call('HSET', 'chat:names', event['user'], event['name'])
  redis.call('HSET', 'chat:looks', ARGV[4], event['user'])
  event['ip'] = nil  -- counted, never kept
elseif kind == 'direct' then
  event['waiting'] = redis.call('HEXISTS', 'chat:online', event['to']) == 0
  local kept = redis.call('SCARD', 'chat:waiting:' .. event['to'])
  if event['waiting'] and kept >= tonumber(ARGV[8]) then
    return {'err', 'mailbox_full', redis.call('HGET', 'chat:names', event['to']) .. ' has ' .. kept ..
            ' messages waiting; try later'}
  end
elseif kind == 'edit' or kind == 'react' or kind == 'delete' then
  -- Not a message deleted a moment ago (an edit racing that delete must not
  -- bring its text back into Redis). Older deletes are refused before this.
  if redis.call('ZSCORE', 'chat:deleted', event['target']) then
    return {'err', 'not_found', 'there is no such message that you can see'}
  end
elseif kind == 'read' then
  local field = event['user'] .. ':' .. event['conv']
  if tonumber(redis.call('HGET', 'chat:reads', field) or 0) >= event['upto'] then return {'skip'} end
  redis.call('HSET', 'chat:reads', field, event['upto'])
elseif kind == 'presence' then
  local present = 'chat:present:' .. event['node']
  if event['on'] then
    if redis.call('SADD', present, event['user']) == 0 then return {'skip'} end
    redis.call('SADD', 'chat:nodes', event['node'])
    redis.call('HINCRBY', 'chat:online', event['user'], 1)
  else
    if redis.call('SREM', present, event['user']) == 0 then return {'skip'} end
    if redis.call('HINCRBY', 'chat:online', event['user'], -1) <= 0 then redis.call('HDEL', 'chat:online', event['user']) end
  end
end
if kind == 'claim' or kind == 'device' then event['device'] = redis.call('INCR', 'chat:device') end
local id = redis.call('INCR', 'chat:id')
event['id'] = id
local body = cjson.encode(event)
local sid = id .. '-0'
redis.call('XADD', 'chat:log', 'MINID', '~', math.max(id - tonumber(ARGV[2]), 0) .. '-0', sid, 'e', body)
local erased = {}
if cids then
  redis.call('HSET', cids, event['cid'], id)
  redis.call('EXPIRE', cids, 86400)  -- a page re-sends within minutes; a day is plenty
end
if kind == 'direct' and event['waiting'] then
  redis.call('SADD', 'chat:waiting:' .. event['to'], id)
elseif kind == 'delivered' then
  for _, done in ipairs(event['ids']) do redis.call('SREM', 'chat:waiting:' .. event['user'], done) end
elseif kind == 'edit' then
  redis.call('SADD', 'chat:edits:' .. event['target'], id)
elseif kind == 'delete' then
  redis.call('ZADD', 'chat:deleted', id, event['target'])
  redis.call('ZREMRANGEBYRANK', 'chat:deleted', 0, -10001)  -- the newest 10,000 are enough for a race
  local recipient = event['tomb']['recipient']
  if type(recipient) == 'string' then  -- a private message still waiting waits no more
    redis.call('SREM', 'chat:waiting:' .. recipient, event['target'])
  end
  -- The text goes from Redis: the message and its edits leave the log and its homes.
  local edits = 'chat:edits:' .. event['target']
  erased = redis.call('SMEMBERS', edits)
  table.insert(erased, tostring(event['target']))
  redis.call('DEL', edits)
  for _, gone in ipairs(erased) do redis.call('XDEL', 'chat:log', gone .. '-0') end
end
for i = 9, #ARGV do
  local home, where = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 3)
  if home == 's' then
    for _, gone in ipairs(erased) do redis.call('XDEL', where, gone .. '-0') end
    redis.call('XADD', where, 'MAXLEN', '~', ARGV[3], sid, 'e', body)
  else
    if string.sub(where, -1) == '#' then where = string.sub(where, 1, -2) .. event['device'] end
    redis.call('HSET', 'chat:state', where, body)
  end
end
return {'ok', id}
"""


class Wire(asyncio.Protocol):
    """A bare RESP2 connection for the two hot paths, the appends and the
    log's read loop; redis-py serves everything else. Commands are written
    at once and answered in order, so the appends of many connections share
    one socket, pipelined, and a reply costs a fraction of what redis-py's
    general machinery costs (measured: a read-loop wake-up about 130 µs of
    CPU against 330). Errors are redis-py's exception types."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.lost: Optional[Exception] = None

    @classmethod
    async def open(cls, url: str) -> Wire:
        parts = urllib.parse.urlsplit(url)
        loop = asyncio.get_running_loop()
        ssl = parts.scheme == "rediss" or None
        _, wire = await asyncio.wait_for(
            loop.create_connection(cls, parts.hostname or "localhost", parts.port or 6379, ssl=ssl), 2)
        if parts.password:
            credentials = [urllib.parse.unquote(parts.username)] if parts.username else []
            await wire.call("AUTH", *credentials, urllib.parse.unquote(parts.password))
        if parts.path.strip("/") not in ("", "0"):
            await wire.call("SELECT", parts.path.strip("/"))
        return wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(self.lost)

    def close(self, why: Optional[Exception] = None) -> None:
        """Fail what waits with `why` (connection_lost does, in a moment) and take no more."""
        if self.lost is None:
            self.lost = why or RedisConnectionError("connection to Redis closed")
        if self.transport is not None:
            self.transport.close()

    def call(self, *args: Any) -> asyncio.Future:
        """Send one command; the future is its reply (bytes, int, list, None)."""
        if self.lost is not None:
            raise self.lost
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.transport.write(b"".join(out))  # type: ignore[union-attr]
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.buffer.endswith(b"\r\n"):
            return  # a reply ends with CRLF: a big one arriving in pieces is parsed once, when whole
        start = 0
        while self.pending:
            try:
                value, start = self._parse(start)
            except IndexError:  # the rest of the reply has not come yet
                break
            future = self.pending.popleft()
            if future.done():
                continue  # its caller gave up waiting
            if isinstance(value, ResponseError):
                future.set_exception(value)
            else:
                future.set_result(value)
        del self.buffer[:start]

    def _parse(self, at: int) -> tuple[Any, int]:
        buffer = self.buffer
        end = buffer.find(b"\r\n", at)
        if end < 0:
            raise IndexError  # the line has not all come yet
        kind, line = buffer[at], buffer[at + 1:end]
        if kind == 36:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, end + 2
            if len(buffer) < end + 4 + size:
                raise IndexError
            return bytes(buffer[end + 2:end + 2 + size]), end + 4 + size
        if kind == 42:  # * array
            count, items, at = int(line), [], end + 2
            if count < 0:
                return None, at
            for _ in range(count):
                item, at = self._parse(at)
                items.append(item)
            return items, at
        if kind == 58:  # : integer
            return int(line), end + 2
        if kind == 43:  # + simple string
            return bytes(line), end + 2
        if kind == 45:  # - error
            return ResponseError(line.decode(errors="replace")), end + 2
        raise RedisConnectionError(f"Redis sent something that is not RESP: {bytes(buffer[at:at + 20])!r}")


def remove_orphans() -> None:
    """Projections of processes that are gone (killed, so they could not
    clean up) are removed by the next process to start."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        found = re.fullmatch(r"chat-projection-(\d+)-\w+", name)
        path = os.path.join(base, name)
        try:
            if not found or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(found[1]), 0)  # alive: not an orphan
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def describe(url: str) -> str:
    """The Redis URL for a log line: host, port and database, never a password."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


class RedisBackplane:
    """chat.Backplane over Redis (see the module docstring). `chat` is the
    running chat module, passed in: ``python chat.py`` runs as __main__, and
    importing chat here would load a second copy with state of its own."""

    waits = True  # commits wait for Redis and the read loop: handlers run as tasks
    BACKOFF = (0.05, 2.0)  # seconds between tries to reach Redis again: first, most
    CATCH_UP = 2.0  # seconds a connect waits at most for this process to catch up with the log
    REWRITE_AFTER = 5.0  # seconds after a delete that Redis is asked to rewrite its append-only file

    def __init__(self, chat: Any, conf: Any) -> None:
        self.chat, self.conf = chat, conf
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        remove_orphans()
        self.dir = tempfile.mkdtemp(prefix=f"chat-projection-{os.getpid()}-")
        self.projection = os.path.join(self.dir, "projection.db")  # this process's SQLite copy of the state
        # No automatic retries: a retried append whose first reply was lost would post twice.
        options = dict(decode_responses=True, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
        self.redis = aioredis.Redis.from_url(conf.redis, socket_timeout=5, **options)
        self.reader = aioredis.Redis.from_url(conf.redis, socket_timeout=None, **options)  # XREAD BLOCK, pub/sub
        self.append_sha = hashlib.sha1(APPEND.encode()).hexdigest()
        self.appender: Optional[Wire] = None  # appends, pipelined (see Wire)
        self.opening: Optional[asyncio.Future] = None  # the appender being (re)connected
        self.log_reader: Optional[Wire] = None  # the read loop's XREAD BLOCK
        self.epoch: Optional[str] = None
        self.last = 0  # the highest id applied here
        self.waiters: dict[int, list[asyncio.Future]] = {}  # id -> commits of this process waiting for it to be applied
        self.early: dict[int, tuple[Any, Optional[Exception]]] = {}  # applied before the append's reply came back
        self.presence_tail: dict[str, asyncio.Future] = {}  # user key -> its latest presence append (they go in order)
        self.healthy = False  # changes can be appended: false from a failed command until one succeeds
        self.heard = time.monotonic()  # the last time the log could be read
        self.reached = time.monotonic()  # the last time Redis came (back): janitors wait --node_ttl after it
        self.degraded = False
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.rewriting: Optional[asyncio.Future] = None  # a BGREWRITEAOF asked for soon
        self.reloading = False
        self.generation = 0  # how many reloads: an append that spans one is not waited for
        self.beat = max(0.2, min(1.0, conf.node_ttl / 3))  # seconds between beats
        self.catching_up: list[tuple[int, asyncio.Future]] = []  # (id, future) of connects waiting to reach id

    def describe(self) -> str:
        return f"Redis {describe(self.conf.redis)}, node {self.node}"

    # ---- start and stop

    async def start(self) -> None:
        try:
            await self._load()
        except RedisError as e:
            self.chat.Hub.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise self.chat.StoreError(f"cannot use Redis at {describe(self.conf.redis)}: {e}") from None
        self.healthy = True
        self.reached = time.monotonic()
        self.tasks = [asyncio.ensure_future(job()) for job in (self._read_loop, self._beat_loop, self._signals)]

    async def stop(self) -> None:
        """Mark this process's users offline (unless they are connected
        elsewhere), then stop reading and remove the projection."""
        if self.presence_tail:
            await asyncio.wait(list(self.presence_tail.values()), timeout=2)
        with_users = []
        try:
            for user in await self.redis.smembers(PRESENT + self.node):
                with_users.append(asyncio.ensure_future(
                    self._commit({"kind": "presence", "user": user, "node": self.node, "on": False})))
            if with_users:
                await asyncio.wait(with_users, timeout=2)
            await self.redis.delete(NODE + self.node)
            await self.redis.srem(NODES, self.node)
        except RedisError as e:
            log.warning("could not mark this process's users offline: %s (the janitor will)", e)
        self.stopping = True
        for task in self.tasks + [self.rewriting]:
            task and task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for waiting in self.waiters.values():
            for future in waiting:
                if not future.done():
                    future.cancel()
        for wire in (self.appender, self.log_reader):
            if wire is not None:
                wire.close()
        await self.redis.aclose()
        await self.reader.aclose()
        self.chat.Hub.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- loading: a consistent snapshot of the durable homes, applied in id order

    async def _load(self) -> None:
        """Fill the (empty) projection and the Hub from Redis."""
        Hub = self.chat.Hub
        await self.redis.set(EPOCH, secrets.token_hex(8), nx=True)  # a new data set gets a name
        state = await self.redis.hgetall(STATE)
        nodes = await self.redis.smembers(NODES)
        rooms, users = self._homes_in(state)
        while True:
            snapshot = self.redis.pipeline(transaction=True)  # MULTI: one moment
            snapshot.get(EPOCH)
            snapshot.get("chat:id")
            snapshot.hgetall(STATE)
            snapshot.smembers(NODES)
            for node in nodes:
                snapshot.smembers(PRESENT + node)
            for stream in [ROOM + r for r in rooms] + [DM + u for u in users]:
                snapshot.xrange(stream)
            epoch, last, state, now_nodes, *rest = await snapshot.execute()
            now_rooms, now_users = self._homes_in(state)
            if now_rooms <= rooms and now_users <= users and now_nodes == nodes:
                break
            # A room, a user or a process came since we listed them: again, with them too.
            rooms, users, nodes = rooms | now_rooms, users | now_users, now_nodes
        present = rest[:len(nodes)]
        events = {}
        for body in state.values():
            event = json.loads(body)
            events[event["id"]] = event
        for entries in rest[len(nodes):]:
            for _, fields in entries:
                event = json.loads(fields["e"])
                events[event["id"]] = event
        self.epoch = epoch
        Hub.store.adopt_epoch(epoch)
        Hub.store.db.execute("PRAGMA synchronous=OFF")  # a copy: Redis is the durable one
        for id in sorted(events):
            self._replay(events[id])
        Hub.store.index_pending()
        Hub.present = {}
        for node, members in zip(nodes, present):
            for user in members:
                if user in Hub.users:
                    Hub.present[user] = Hub.present.get(user, frozenset()) | {node}
        self.chat.Announcer.set_online(self.chat.sorted_names(Hub.users[u].name for u in Hub.present))
        self.last = Hub.last_id = int(last or 0)
        log.info("node %s loaded %d events from Redis, up to id %d", self.node, len(events), self.last)

    @staticmethod
    def _homes_in(state: dict) -> tuple[set, set]:
        """The rooms and users the state names: whose streams a load reads."""
        rooms = {f.split(":")[1] for f in state if f.startswith(("room:", "member:"))}
        users = {f.split(":")[1] for f in state if f.startswith("user:")}
        return rooms, users

    def _replay(self, event: dict) -> None:
        """Apply a stored event while loading: nobody is connected to tell."""
        try:
            self.chat.Hub.apply(event)
        except self.chat.ChatError:
            pass  # refused when it was first applied too (a full mailbox, a change to a deleted message)
        except Exception:
            log.exception("could not load event %s (%s)", event.get("id"), event.get("kind"))

    async def _reload(self, why: str) -> None:
        """Start over from Redis: close every connection here (they come back
        with since, or through epoch) and load a fresh projection, trying
        again with backoff until a load succeeds. Meanwhile connects are
        refused (1013) and sends answered server_error, and what the read
        loop brings is dropped (the load's snapshot covers it)."""
        if self.reloading:
            return
        self.reloading, self.healthy = True, False
        self.generation += 1  # appends answered from now on belong to the old state
        log.warning("node %s loads its state from Redis again: %s", self.node, why)
        chat = self.chat
        for connection in chat.Hub.everyone_but():
            connection._departed = True  # its presence is put right by the next beat
        chat.ChatSocket.close_all(1012, "the server reloaded; reconnect")
        for waiting in self.waiters.values():
            for future in waiting:
                if not future.done():
                    future.set_result((None, chat.ChatError("server_error", "the server reloaded; try again")))
        self.waiters, self.early = {}, {}
        for _, reached in self.catching_up:
            if not reached.done():
                reached.set_result(None)
        self.catching_up = []
        pause = self.BACKOFF[0]
        try:
            while not self.stopping:
                self._fresh_projection()
                try:
                    await self._load()
                    break
                except (RedisError, OSError, asyncio.TimeoutError) as e:
                    log.warning("node %s could not load from Redis (%s); trying again", self.node, e)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, self.BACKOFF[1])
        finally:
            self.reloading = False
        self._reachable()

    def _fresh_projection(self) -> None:
        """An empty projection and an empty Hub, the old ones gone."""
        Hub, old = self.chat.Hub, self.chat.Hub.store
        self.projection = os.path.join(self.dir, f"projection-{secrets.token_hex(4)}.db")
        Hub.load(self.conf, self.chat.Store(self.projection), self)
        old.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(old.path + suffix)

    # ---- appending

    def commit(self, event: dict) -> Any:
        """An awaitable of the result (a coroutine: a caller that does not
        await it wraps it in a task, as Hub.deliver does)."""
        return self._commit(event)

    async def _commit(self, event: dict) -> Any:
        """Append the event; once this process has applied it, what apply
        returned (or raise the ChatError it raised)."""
        ChatError = self.chat.ChatError
        if not self.healthy:
            raise ChatError("server_error", "the server cannot store that just now; try again")
        event["origin"] = self.node
        generation, conf = self.generation, self.conf
        skeleton = self.chat.skeleton(event["name"]) if event["kind"] == "claim" else ""
        per_ip = int(self.chat.AT_ONCE + conf.names_per_hour) if conf.names_per_hour > 0 else 0
        try:
            reply = await self._append([json.dumps(event, ensure_ascii=False), conf.redis_log, conf.redis_history,
                                        skeleton, conf.max_users, per_ip, self.epoch, conf.mailbox,
                                        *self._homes(event)])
        except ResponseError as e:  # Redis is there and said no (NOSCRIPT after a SCRIPT FLUSH): not stored
            log.info("node %s: an append was refused: %s", self.node, e)
            raise ChatError("server_error", "the server could not store that; try again") from None
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._lost(e)
            raise ChatError("server_error", "the server could not store that; try again") from None
        if reply[0] == b"err":
            if reply[1] == b"epoch":  # Redis holds another data set: nothing was written to it
                asyncio.ensure_future(self._reload("Redis holds another data set (it lost its data, or was flushed)"))
                raise ChatError("server_error", "the server is starting over; try again")
            raise ChatError(reply[1].decode(), reply[2].decode())
        if reply[0] == b"skip":
            return None
        id = int(reply[1])
        if self.reloading or generation != self.generation:
            raise ChatError("server_error", "the server reloaded; try again")
        if reply[0] == b"dup":
            return await self._duplicate(event, id)
        if id <= self.last and id not in self.early:
            # Applied by a load that ran meanwhile, which kept no answer.
            raise ChatError("server_error", "the server reloaded; try again")
        if id in self.early:
            result, error = self.early.pop(id)
        else:
            waiting = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(id, []).append(waiting)
            result, error = await waiting
        if error is not None:
            raise error
        return result

    async def _append(self, args: list) -> list:
        """Run the APPEND script (by its SHA; its text once after Redis
        restarted and forgot it). Never retried: see the module docstring."""
        if self.appender is None or self.appender.lost is not None:
            if self.opening is None:
                self.opening = asyncio.ensure_future(self._open_appender())
            opening = self.opening
            try:
                self.appender = await opening
            finally:
                if self.opening is opening:
                    self.opening = None
        # No timer per append: when Redis stops answering, the beat notices
        # (redis-py times out) and _lost() closes this connection, which
        # fails every append waiting on it.
        appender = self.appender
        try:
            return await appender.call("EVALSHA", self.append_sha, 0, *args)
        except ResponseError as e:
            if str(e).startswith("NOSCRIPT"):
                # Redis forgot the script (SCRIPT FLUSH). The appends behind this
                # one failed alike; re-sending each would store them out of
                # order, so they all fail (server_error: the client re-sends)
                # and a new connection loads the script first.
                appender.close(ResponseError("NOSCRIPT: Redis forgot the script; not stored"))
            raise

    async def _open_appender(self) -> Wire:
        """A connection for appends, the script loaded before the first one."""
        wire = await Wire.open(self.conf.redis)
        try:
            await wire.call("SCRIPT", "LOAD", APPEND)
        except BaseException:
            wire.close()
            raise
        return wire

    async def _duplicate(self, event: dict, id: int) -> Any:
        """A message or private message whose cid was stored before as id:
        once that is applied here, answer as apply did the first time."""
        if id > self.last:
            waiting = asyncio.get_running_loop().create_future()
            self.catching_up.append((id, waiting))
            with contextlib.suppress(asyncio.TimeoutError):  # (a deleted message's id is not in the log)
                await asyncio.wait_for(waiting, self.CATCH_UP)
        row = self.chat.Hub.store.by_cid(event["user"], event["cid"])
        if row is None:  # the first one was refused where it was applied
            raise self.chat.ChatError("server_error", "the server could not store that; try again")
        frame = json.loads(row[1])
        return frame if event["kind"] == "message" else (frame, not row[4])

    def _homes(self, event: dict) -> list[str]:
        """Where an event is kept beyond the log: "s:" streams, "h:" state fields."""
        Hub, key = self.chat.Hub, self.chat.key
        kind, user = event["kind"], event.get("user")
        if kind == "claim":
            homes = ["h:user:" + user]
            if key(event["room"]) not in Hub.rooms:
                homes.append("h:room:" + key(event["room"]))
            return homes
        if kind == "device":
            return ["h:device:#"]
        if kind == "revoke":
            return [f"h:device:{event['device']}"]
        if kind == "member":
            room = key(event["room"])
            return [f"h:member:{room}:{user}"] + ([] if room in Hub.rooms else [f"h:room:{room}"])
        if kind == "read":
            return [f"h:read:{user}:{event['conv']}"]
        if kind == "message":
            return ["s:" + ROOM + key(event["room"])]
        if kind == "direct":
            return ["s:" + DM + u for u in dict.fromkeys((user, event["to"]))]
        if kind == "delivered":
            return ["s:" + DM + user]
        if kind in ("edit", "delete", "react"):
            target = Hub.store.message(event["target"])
            if target is None:
                return []
            if target.room is not None:
                return ["s:" + ROOM + target.room]
            return ["s:" + DM + u for u in dict.fromkeys((target.sender, target.recipient))]
        return []  # presence: kept in chat:present

    # ---- reading the log

    async def _read_loop(self) -> None:
        """Read the log from the last id applied, for ever: nothing that goes
        wrong in here ends it (a failure is logged, and it tries again)."""
        pause = self.BACKOFF[0]
        while not self.stopping:
            try:
                if self.log_reader is None or self.log_reader.lost is not None:
                    self.log_reader = await Wire.open(self.conf.redis)
                reply = await self.log_reader.call("XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", LOG,
                                                   f"{self.last}-0")
                self._read()
                for _, entries in reply or ():
                    if self.last and self._id(entries[0][0]) > self.last + 1 and await self._left_behind():
                        await self._reload(f"the log was trimmed past id {self.last}, the last one applied here")
                        break
                    for _, fields in entries:
                        self._apply(json.loads(fields[1]))  # fields: [b"e", body]
                pause = self.BACKOFF[0]
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if isinstance(e, (RedisError, OSError, asyncio.TimeoutError)):
                    self._lost(e)
                else:
                    log.exception("node %s: the read loop failed; it goes on", self.node)
                if self.log_reader is not None:
                    self.log_reader.close()
                    self.log_reader = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.BACKOFF[1])

    @staticmethod
    def _id(entry: str | bytes) -> int:
        return int(entry.split(b"-" if isinstance(entry, bytes) else "-")[0])

    async def _left_behind(self) -> bool:
        """Whether events after the last one applied here were trimmed away.
        (The log can have holes where a delete erased a message, but trimming
        only ever removes its oldest entries: it is behind us if its oldest
        kept entry is past the next one we need.)"""
        info = await self.reader.xinfo_stream(LOG)
        first = info.get("first-entry")
        return first is not None and self._id(first[0]) > self.last + 1

    def _apply(self, event: dict) -> None:
        """One event from the log, applied once and in order; the commit
        waiting for it (in this process) gets the result."""
        Hub, ChatError = self.chat.Hub, self.chat.ChatError
        id = event["id"]
        if id <= self.last or self.reloading:  # a reload's snapshot covers what it drops
            return
        if self.last and id > self.last + 1:
            self._erased(self.last + 1, id - 1)
        self.last = id
        result, error = None, None
        try:
            result = Hub.apply(event)
        except ChatError as e:
            error = e
        except Exception:
            log.exception("could not apply event %d (%s)", id, event["kind"])
            error = ChatError("server_error", "the server failed on that")
        if event["kind"] == "presence" and event["node"] == self.node and not event["on"] \
                and event["user"] in Hub.online:
            # Judged dead while alive (a janitor, after a pause): put the user back.
            self.presence(event["user"], True, None)
        if self.catching_up:
            for target, reached in [w for w in self.catching_up if w[0] <= id]:
                self.catching_up.remove((target, reached))
                if not reached.done():
                    reached.set_result(None)
        if event.get("origin") != self.node:
            return
        if event["kind"] == "delete" and error is None:
            self._rewrite_soon()
        waiting = self.waiters.pop(id, None)
        if waiting is None:
            self._keep_early(id, (result, error))
            return
        for future in waiting:
            if not future.done():
                future.set_result((result, error))

    def _erased(self, first: int, last: int) -> None:
        """Ids first..last are not in the log: a delete erased them (a
        message, its edits) before this process read them. A commit of this
        process waiting for one of them hears that its message is gone,
        now or when its append's reply comes (early)."""
        gone = (None, self.chat.ChatError("not_found", "that message was deleted"))
        for id in [id for id in self.waiters if first <= id <= last]:
            for future in self.waiters.pop(id):
                if not future.done():
                    future.set_result(gone)
        if last - first < 1000:  # a delete erases a message and its edits: a few ids
            for id in range(first, last + 1):
                self._keep_early(id, gone)

    def _keep_early(self, id: int, outcome: tuple[Any, Optional[Exception]]) -> None:
        """The outcome of an id applied (or erased) before its append's reply
        came back; the oldest go when many were never claimed (their
        appends were cancelled, or another process made them)."""
        self.early[id] = outcome
        while len(self.early) > 10000:
            del self.early[next(iter(self.early))]

    async def caught_up(self) -> None:
        """Wait (at most CATCH_UP seconds) until this process has applied the
        log as far as it reaches now: a name or device just made on another
        process is then known here. Only a connect with a name or token not
        known here pays this round trip."""
        try:
            newest = await self.redis.xrevrange(LOG, count=1)
        except RedisError as e:
            self._lost(e)
            return
        if not newest or int(newest[0][0].split("-")[0]) <= self.last:
            return
        target = int(newest[0][0].split("-")[0])
        reached = asyncio.get_running_loop().create_future()
        self.catching_up.append((target, reached))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reached, self.CATCH_UP)

    def _rewrite_soon(self) -> None:
        """A delete took the text out of Redis's memory, but its append-only
        file still holds the commands that wrote it, until Redis rewrites the
        file: ask for that within REWRITE_AFTER (once for many deletes)."""
        if self.rewriting is not None:
            return

        async def rewrite() -> None:
            await asyncio.sleep(self.REWRITE_AFTER)
            self.rewriting = None
            try:
                await self.redis.bgrewriteaof()
            except RedisError as e:  # one is running already (it is then scheduled), or Redis is away
                log.info("could not ask Redis to rewrite its append-only file: %s", e)

        self.rewriting = asyncio.ensure_future(rewrite())

    # ---- presence, liveness, and the janitor

    def presence(self, user: str, on: bool, device: Optional[int]) -> None:
        """Appended in order per user (a quick reconnect must not overtake its
        own disconnect); nobody waits for it."""
        event = {"kind": "presence", "user": user, "node": self.node, "on": on, "device": device,
                 "at": self.chat.utc_iso(time.time())}
        before = self.presence_tail.get(user)

        async def append() -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                await self._commit(event)
            except self.chat.ChatError as e:  # Redis is away: the next beat puts it right
                log.debug("presence of %s not appended: %s", user, e.message)

        task = asyncio.ensure_future(append())
        self.presence_tail[user] = task
        task.add_done_callback(lambda t: self.presence_tail.get(user) is t and self.presence_tail.pop(user))

    async def _beat_loop(self) -> None:
        while not self.stopping:
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._lost(e)
            except Exception:
                log.exception("node %s: a beat failed; the next one goes on", self.node)
            if not self.degraded and time.monotonic() - self.heard > self.conf.node_ttl:
                self.degraded = True
                log.error("node %s has not read the Redis log for %.0f s: /healthz says degraded",
                          self.node, time.monotonic() - self.heard)
            await asyncio.sleep(self.beat)

    async def _beat(self) -> None:
        """Say this process is alive; notice a new data set or a log that
        moved on without us; put presence right; be the janitor if free."""
        Hub, ttl = self.chat.Hub, int(self.conf.node_ttl * 1000)
        seen = self.last  # the read loop moves on while we wait: compare with this moment
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(NODE + self.node, 1, px=ttl)
        pipe.sadd(NODES, self.node)
        pipe.get(EPOCH)
        pipe.get("chat:id")
        pipe.smembers(PRESENT + self.node)
        _, _, epoch, last, mine = await pipe.execute()
        self._reachable()
        if self.reloading:
            return
        if epoch != self.epoch:
            await self.redis.set(EPOCH, secrets.token_hex(8), nx=True)
            return await self._reload("Redis holds another data set (it lost its data, or was flushed)")
        last = int(last or 0)
        if last < seen:
            return await self._reload(f"Redis lost its newest events (its last id is {last}, we saw {seen})")
        for user in set(mine) - set(Hub.online):
            if user not in self.presence_tail:
                self.presence(user, False, None)
        for user in set(Hub.online) - set(mine):
            if user not in self.presence_tail:
                self.presence(user, True, None)
        if self.healthy and time.monotonic() - self.reached >= self.conf.node_ttl:
            await self._janitor()  # everyone alive has renewed its key since Redis came back

    async def _janitor(self) -> None:
        """Users of processes that stopped renewing their key go offline. The
        lock is short (a few beats) and its holder keeps it by renewing it,
        so a janitor that dies is replaced within a few seconds."""
        lease = int(3 * self.beat * 1000)
        if not await self.redis.set(JANITOR, self.node, nx=True, px=lease):
            if await self.redis.get(JANITOR) != self.node:
                return
            await self.redis.pexpire(JANITOR, lease)
        for node in await self.redis.smembers(NODES):
            if node == self.node or await self.redis.exists(NODE + node):
                continue
            users = await self.redis.smembers(PRESENT + node)
            if users:
                log.info("node %s is gone: %d of its users go offline", node, len(users))
            for user in users:
                with contextlib.suppress(self.chat.ChatError):  # Redis went away again: the next beat goes on
                    await self._commit({"kind": "presence", "user": user, "node": node, "on": False})
            if not await self.redis.scard(PRESENT + node):
                await self.redis.srem(NODES, node)

    def _lost(self, error: Exception) -> None:
        """A command failed: appends and the read loop start over on new connections."""
        if self.healthy:
            log.warning("node %s lost Redis: %s", self.node, error)
        self.healthy = False
        for wire in (self.appender, self.log_reader):
            if wire is not None:
                wire.close()

    def _reachable(self) -> None:
        """A command succeeded: appends and connects may go on (not while a
        reload fills the projection)."""
        if not self.healthy and not self.reloading:
            log.info("node %s reached Redis again", self.node)
            self.reached = time.monotonic()
            self.healthy = True

    def _read(self) -> None:
        """The log was read."""
        self._reachable()
        if self.degraded:
            log.info("node %s reads the Redis log again", self.node)
        self.degraded, self.heard = False, time.monotonic()

    def health(self) -> str:
        stale = time.monotonic() - self.heard > self.conf.node_ttl
        return "degraded" if self.degraded or self.reloading or stale else "ok"

    # ---- signals: typing, not kept

    def signal(self, event: dict) -> None:
        async def publish() -> None:
            try:
                await self.redis.publish(SIGNAL, json.dumps(event, ensure_ascii=False))
            except RedisError as e:
                self._lost(e)
        asyncio.ensure_future(publish())

    async def _signals(self) -> None:
        pause = self.BACKOFF[0]
        while not self.stopping:
            pubsub = self.reader.pubsub()
            try:
                await pubsub.subscribe(SIGNAL)
                pause = self.BACKOFF[0]
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        try:
                            self.chat.Hub.apply(json.loads(message["data"]))
                        except Exception:  # one bad signal must not end the others
                            log.exception("node %s: a signal could not be applied", self.node)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.BACKOFF[1])
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()

    # ---- one-time link codes, shared by every process

    async def put_link(self, code: str, user: str, seconds: float) -> None:
        """Stored before the code is shown, so any process takes it at once."""
        try:
            old = await self.redis.set(LINK_OF + user, code, ex=int(seconds), get=True)
            if old:
                await self.redis.delete(LINK + old)
            await self.redis.set(LINK + code, user, ex=int(seconds))
        except RedisError as e:
            self._lost(e)
            raise self.chat.ChatError("server_error", "the server could not make a code just now; try again") from None

    async def take_link(self, code: str) -> Optional[str]:
        try:
            return await self.redis.getdel(LINK + code)
        except RedisError as e:
            self._lost(e)
            return None

    def drop_link(self, user: str) -> None:
        async def drop() -> None:
            try:
                code = await self.redis.getdel(LINK_OF + user)
                if code:
                    await self.redis.delete(LINK + code)
            except RedisError as e:
                self._lost(e)
        asyncio.ensure_future(drop())

    def sweep_links(self, now: float) -> None:
        """Codes expire in Redis by themselves."""
