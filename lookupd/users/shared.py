"""User block state shared through Redis ([cluster]): one sliding window and one set of blocks
for every host. The keys are `lookupd.cluster.Keys`; each host's sqlite stays its journal.

Counting is one Lua script (atomic in Redis): add the event (its member is "HOST:ID", so
pushing it again after an outage adds nothing), trim the window, count, and block at the
limit, publishing the block to the other hosts in the same step.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from lookupd.cluster import Cluster, decode, finite
from lookupd.config import Config, UsersConfig
from lookupd.errors import BadRequest
from lookupd.users.decide import MAX_REASON_CHARS, Block, check_name, clean_text, window_text

# KEYS: events of the user, the blocks hash. ARGV: user, now, window, limit, by, host, window
# text, channel, then (score, member) pairs. Returns {count} or {count, block JSON, new}:
# count -1 when the user was blocked already (the events are then not kept).
FAIL_SCRIPT = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then return {-1, existing, 0} end
local now = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
-- One event at a time, stopping at the limit: a merge that pushes several events at once
-- blocks at the limit-th, and the events after it are not kept (as for a blocked user).
for i = 9, #ARGV, 2 do
  if n >= limit then break end
  if tonumber(ARGV[i]) > now - window then
    redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
    n = redis.call('ZCARD', KEYS[1])
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
if n < limit then return {n} end
local noun = 'recipients'
if n == 1 then noun = 'recipient' end
local block = cjson.encode({op = 'block', user = ARGV[1], since = now,
    reason = n .. ' invalid ' .. noun .. ' in ' .. ARGV[7], count = n, by = ARGV[5],
    host = ARGV[6]})
redis.call('HSET', KEYS[2], ARGV[1], block)
redis.call('PUBLISH', ARGV[8], block)
return {n, block, 1}
"""

# Set a block unless one exists; the block that holds comes back. KEYS: blocks hash.
BLOCK_SCRIPT = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return ARGV[2]
"""

# Unblock unless the block is newer than the unblock. KEYS: blocks, unblocked, events of user.
UNBLOCK_SCRIPT = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  local ok, block = pcall(cjson.decode, existing)
  if ok and type(block) == 'table' and tonumber(block.since) and
      tonumber(block.since) > tonumber(ARGV[2]) then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if not last or last < tonumber(ARGV[2]) then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

# How long reading every block may take (a merge, not a request).
SNAPSHOT_TIMEOUT = 10.0
# How long `lookupd users block|unblock` waits for Redis. An admin's command is not on Exim's
# path, so cluster.timeout (a request's bound, often a few hundred ms) would only make it give
# up on a busy Redis or a cold start (its first script is sent in full) and share later.
ADMIN_TIMEOUT = 5.0

T = TypeVar("T")


async def share_now(config: Config, change: Callable[[SharedUsers], Awaitable[T]]) -> T:
    """For `lookupd users`: connect to Redis, make `change` (published to every host at once),
    disconnect. ClusterDown when Redis does not answer within ADMIN_TIMEOUT (or cluster.timeout
    if longer)."""
    cluster = Cluster(replace(config.cluster, timeout=max(config.cluster.timeout, ADMIN_TIMEOUT)))
    try:
        await cluster.connect_once()
        return await change(SharedUsers(cluster, config.users))
    finally:
        await cluster.close()


class SharedUsers:
    """The Redis side of UserState."""

    def __init__(self, cluster: Cluster, config: UsersConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.keys = cluster.keys
        self.by = f"lookupd@{cluster.host}"

    def new_eid(self) -> str:
        return f"{self.cluster.host}:{uuid.uuid4().hex[:16]}"

    async def fail(self, user: str, events: list[tuple[float, str]],
                   now: float) -> tuple[int, Block | None, bool]:
        """Add `events` (at, eid) to the user's window: (count, block, whether it is new)."""
        args: list[Any] = [user, repr(now), repr(self.config.window), self.config.limit,
                           self.by, self.cluster.host, window_text(self.config.window),
                           self.keys.channel]
        for at, eid in events:
            args += [repr(at), eid]
        keys = [self.keys.user_events(user), self.keys.user_blocks]
        reply = await self.cluster.run(
            lambda r: r.register_script(FAIL_SCRIPT)(keys=keys, args=args),
            timeout=None if len(events) <= 1 else SNAPSHOT_TIMEOUT)
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
            self.cluster.bad_value("a reply of the user-fail script")
            return 0, None, False
        if len(reply) < 2:
            return reply[0], None, False
        block = self.decode_block(reply[1])
        if block is None:
            return 0, None, False
        return (block.count if reply[0] < 0 else reply[0]), block, reply[2] == 1

    async def block(self, block: Block) -> Block | None:
        """Share a block made here; the block that holds in Redis (an older one wins)."""
        text = self.encode_block(block)
        reply = await self.cluster.run(lambda r: r.register_script(BLOCK_SCRIPT)(
            keys=[self.keys.user_blocks], args=[block.user, text, self.keys.channel]))
        return self.decode_block(reply)

    async def unblock(self, user: str, at: float, by: str) -> None:
        message = json.dumps({"op": "unblock", "user": user, "at": at, "by": by,
                              "host": self.cluster.host}, separators=(",", ":"))
        await self.cluster.run(lambda r: r.register_script(UNBLOCK_SCRIPT)(
            keys=[self.keys.user_blocks, self.keys.user_unblocked, self.keys.user_events(user)],
            args=[user, repr(at), message, self.keys.channel]))

    async def snapshot(self) -> tuple[dict[str, Block], dict[str, float]]:
        """Every block and every unblock time in Redis (malformed entries left out)."""
        async def read(r: Any) -> tuple[Any, Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.user_blocks)
                pipe.hgetall(self.keys.user_unblocked)
                raw_blocks, raw_unblocked = await pipe.execute()
            return raw_blocks, raw_unblocked

        raw_blocks, raw_unblocked = await self.cluster.run(read, timeout=SNAPSHOT_TIMEOUT)
        blocks: dict[str, Block] = {}
        for user, value in dict(raw_blocks).items():
            block = self.decode_block(value)
            if block is not None and block.user == user:
                blocks[user] = block
        unblocked: dict[str, float] = {}
        for user, value in dict(raw_unblocked).items():
            try:
                at = finite(float(value))
            except (TypeError, ValueError):
                at = None
            if at is None or self.checked_user(user) is None:
                self.cluster.bad_value("an unblock time")
                continue
            unblocked[user] = at
        return blocks, unblocked

    # --- values ----------------------------------------------------------------------------

    def encode_block(self, block: Block) -> str:
        return json.dumps({"op": "block", "user": block.user, "since": block.since,
                           "reason": block.reason, "count": block.count, "by": block.by,
                           "host": self.cluster.host}, separators=(",", ":"))

    def checked_user(self, user: object) -> str | None:
        if not isinstance(user, str):
            return None
        try:
            name = check_name(user, case_insensitive=self.config.case_insensitive)
        except BadRequest:
            return None
        return name if name == user else None

    def decode_block(self, raw: object) -> Block | None:
        """A block from Redis, or None (logged once) for anything malformed or hostile."""
        value = raw if isinstance(raw, dict) else decode(raw)
        block = None
        if value is not None:
            user = self.checked_user(value.get("user"))
            since = finite(value.get("since"))
            reason, by, count = value.get("reason"), value.get("by"), value.get("count")
            if user is not None and since is not None and isinstance(reason, str) \
                    and isinstance(by, str) and isinstance(count, int) \
                    and not isinstance(count, bool) and count >= 0:
                block = Block(user, since, clean_text(reason, MAX_REASON_CHARS) or "blocked",
                              count, clean_text(by, 200) or "lookupd")
        if block is None:
            self.cluster.bad_value("a user block")
        return block

    def decode_unblock(self, value: dict[str, Any]) -> tuple[str, float, str] | None:
        user = self.checked_user(value.get("user"))
        at = finite(value.get("at"))
        by = value.get("by")
        if user is None or at is None or not isinstance(by, str):
            self.cluster.bad_value("an unblock message")
            return None
        return user, at, clean_text(by, 200) or "admin"
