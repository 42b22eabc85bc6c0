"""The Redis (or Valkey) connection shared by several lookupd hosts, and its key layout.

Every shared piece goes through one `Cluster`: it knows whether Redis answers, gives each call
at most `cluster.timeout`, and turns every failure into `ClusterDown`, on which the caller
decides alone (fail open). Going down is logged once, coming back once; on coming back the
registered `on_up` callbacks merge what was recorded meanwhile, then pub/sub messages flow
again. Without a [cluster] section no Cluster exists and nothing here is imported by requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lookupd.config import ClusterConfig
from lookupd.regularfile import read_regular_text

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long the merge after a reconnect may take (it is not a request: nobody waits on it).
MERGE_TIMEOUT = 30.0
# Between attempts to reach Redis while it is down.
RECONNECT_EVERY = 0.5
# The blocks are read whole this often even when pub/sub is quiet (a lost message heals).
RESYNC_EVERY = 30.0
# How long a stop (or a reload) waits for the connection loop to end.
CLOSE_WAIT = 3.0
# Longest JSON value lookupd accepts from Redis; anything longer is treated as missing.
MAX_VALUE = 4096


class ClusterDown(Exception):
    """Redis did not answer in time or refused: decide locally."""


class Keys:
    """The key layout, all under `key_prefix` (default "lookupd:").

    users:events:USER   sorted set, one member per invalid-recipient event ("HOST:ID"),
                        scored by its time; trimmed to the window, expires with it
    users:blocks        hash USER -> JSON block (since, reason, count, by, host)
    users:unblocked     hash USER -> time of the last unblock (a block older loses)
    dns:TYPE:NAME       a DNS answer shared by the hosts (JSON), expiring with its TTL
    strikes:IP          sorted set, one member per strike ("HOST:ID") by time; expires
    events              the pub/sub channel: JSON {"op": "block"|"unblock", ...}
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.user_blocks = prefix + "users:blocks"
        self.user_unblocked = prefix + "users:unblocked"
        self.channel = prefix + "events"

    def user_events(self, user: str) -> str:
        return f"{self.prefix}users:events:{user}"

    def strikes(self, address: str) -> str:
        return f"{self.prefix}strikes:{address}"


def client_problem() -> str | None:
    """Why [cluster] cannot work here (None when it can): the Redis client is an optional
    dependency (Debian: Suggests), imported only when [cluster] is configured."""
    if importlib.util.find_spec("redis") is None:
        return ("[cluster] needs the Redis client for Python, which is not installed: "
                "apt-get install python3-redis (or pip install 'lookupd[cluster]')")
    return None


def host_name(config: ClusterConfig) -> str:
    return config.host_name or socket.getfqdn()


def decode(raw: object) -> dict[str, Any] | None:
    """A JSON object from Redis, or None for anything else (too long, not JSON, not a dict)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str) or len(raw) > MAX_VALUE:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


Handler = Callable[[dict[str, Any]], None]
OnUp = Callable[[bool], Awaitable[None]]


class Cluster:
    """One client for [cluster]: `run()` for requests, `on_up` for merges, `subscribe` for
    messages from the other hosts."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.host = host_name(config)
        self.keys = Keys(config.key_prefix)
        self._client: Any = None
        self._up = False
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._on_up: list[OnUp] = []
        self._handlers: dict[str, Handler] = {}
        self._down_since: float | None = None
        self._bad_values = 0
        self._closed = False
        self._connected_once = False

    @property
    def up(self) -> bool:
        return self._up

    @property
    def where(self) -> str:
        """Where Redis is, for log lines (the URL carries no password: config refuses it)."""
        if self.config.sentinels:
            return (f"sentinel service {self.config.sentinel_service} via "
                    f"{', '.join(str(s) for s in self.config.sentinels)}")
        return self.config.redis

    def on_up(self, callback: OnUp) -> None:
        """Run `callback(True)` (bounded by MERGE_TIMEOUT) each time Redis becomes reachable,
        and `callback(False)` every RESYNC_EVERY while it stays so."""
        self._on_up.append(callback)

    def subscribe(self, op: str, handler: Handler) -> None:
        self._handlers[op] = handler

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Build the client and start connecting in the background: an unreachable Redis
        never stops lookupd from starting."""
        self._client = _client(self.config, await self._password())
        self._task = asyncio.create_task(self._run(), name="lookupd-cluster")

    async def connect_once(self) -> None:
        """For a command such as `lookupd users block`: one connection now, no background
        loop, no pub/sub; ClusterDown when Redis does not answer within the timeout."""
        self._client = _client(self.config, await self._password())
        try:
            await _within(self._client.ping(), self.config.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ClusterDown(_why(exc)) from exc
        self._up = True

    async def _password(self) -> str | None:
        if self.config.password_file is None:
            return None
        try:
            text = await asyncio.to_thread(read_regular_text, self.config.password_file)
        except OSError as exc:
            log.warning("cluster: cannot read cluster.password_file %s (%s); connecting "
                        "without a password", self.config.password_file,
                        exc.strerror or type(exc).__name__)
            return None
        return text.strip("\r\n") or None

    async def close(self) -> None:
        self._closed = True
        self._up = False
        if self._task is not None:
            # Cancelling the loop cancels the listener it awaits. Bounded all the same: a
            # stop must never hang on Redis (the listener also sees _closed within a second).
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_WAIT)
            if not done:
                log.warning("cluster: the connection loop to Redis at %s did not stop within "
                            "%gs; closing the connection under it", self.where, CLOSE_WAIT)
            self._task = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await _within(_aclose(self._client), self.config.timeout)
            self._client = None

    # --- requests --------------------------------------------------------------------------

    async def run(self, fn: Callable[[Any], Awaitable[T]], *,
                  timeout: float | None = None) -> T:
        """`fn(client)` within the timeout, or ClusterDown (at once while Redis is down)."""
        if not self._up or self._client is None:
            raise ClusterDown("Redis is not reachable")
        try:
            return await _within(fn(self._client), timeout or self.config.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RedisError, OSError, TimeoutError: all mean "not now"
            self.went_down(exc)
            raise ClusterDown(str(exc) or type(exc).__name__) from exc

    def went_down(self, exc: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        self._down_since = time.monotonic()
        why = _why(exc)
        log.warning("cluster: Redis at %s does not answer within %gs (%s); every host decides "
                    "alone (fail open) until it is back, then what was recorded meanwhile is "
                    "merged", self.where, self.config.timeout, why)
        if self._listener is not None:
            self._listener.cancel()

    def bad_value(self, what: str) -> None:
        """A corrupt or hostile value from Redis: treated as missing, logged the first time."""
        self._bad_values += 1
        if self._bad_values == 1:
            log.warning("cluster: ignoring a malformed value in Redis (%s); is something else "
                        "writing under key_prefix %r?", what, self.config.key_prefix)

    async def publish(self, message: dict[str, Any]) -> None:
        text = json.dumps({**message, "host": self.host}, separators=(",", ":"))
        await self.run(lambda r: r.publish(self.keys.channel, text))

    # --- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        first = True
        while not self._closed:
            try:
                await self._connect()
            except Exception as exc:
                if first and self._down_since is None:
                    log.warning("cluster: cannot reach Redis at %s (%s); deciding locally "
                                "(fail open) until it answers", self.where, _why(exc))
                    self._down_since = time.monotonic()
                self.went_down(exc)
            first = not self._connected_once
            await asyncio.sleep(RECONNECT_EVERY)

    async def _connect(self) -> None:
        client = self._client
        timeout = self.config.timeout
        await _within(client.ping(), timeout)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await _within(pubsub.subscribe(self.keys.channel), timeout)
            self._up = True  # before the merge: requests recorded from now go to Redis
            for callback in self._on_up:
                async with asyncio.timeout(MERGE_TIMEOUT):
                    await callback(True)
            if self._down_since is not None:
                log.warning("cluster: Redis at %s answers again after %.1fs; merged what was "
                            "recorded meanwhile", self.where,
                            time.monotonic() - self._down_since)
                self._down_since = None
            if not self._connected_once:
                self._connected_once = True
                log.info("cluster: sharing state through Redis at %s as host %s", self.where,
                         self.host)
            if self._closed:  # close(): not task.cancelling(), which redis-py 4.3's
                # async_timeout leaves raised after a timeout it handled itself
                raise asyncio.CancelledError
            self._listener = asyncio.create_task(self._listen(pubsub))
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener  # cancelled by went_down(), or ended by an error
            if self._closed:
                raise asyncio.CancelledError
            raise ClusterDown("pub/sub stopped")
        finally:
            self._listener = None
            with contextlib.suppress(Exception):
                await _within(_aclose(pubsub), timeout)

    async def _listen(self, pubsub: Any) -> None:
        last_sync = time.monotonic()
        while not self._closed:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message.get("type") == "message":
                self._dispatch(message.get("data"))
            if time.monotonic() - last_sync >= RESYNC_EVERY:
                last_sync = time.monotonic()
                for callback in self._on_up:
                    async with asyncio.timeout(MERGE_TIMEOUT):
                        await callback(False)

    def _dispatch(self, data: object) -> None:
        message = decode(data)
        op = message.get("op") if message is not None else None
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if message is None or handler is None:
            self.bad_value("a message on " + self.keys.channel)
            return
        if message.get("host") == self.host:
            return  # our own
        try:
            handler(message)
        except Exception:
            log.exception("cluster: handling a %s message failed", op)


# What a TLS failure most often means, for the admin reading the log.
_TLS_HINTS = (
    ("CERTIFICATE_VERIFY_FAILED", "Redis' certificate is not signed by cluster.ca_file (or "
     "the system's CAs), or does not name the host in cluster.redis"),
    ("CERTIFICATE_REQUIRED", "Redis wants this host's certificate (tls-auth-clients): set "
     "cluster.cert_file and cluster.key_file"),
    ("WRONG_VERSION_NUMBER", "is the port in cluster.redis Redis' tls-port?"),
)


def _why(exc: BaseException) -> str:
    text = _text(exc)
    # redis-py 4.3 (Debian 12) words a failed TLS handshake "Error 1 connecting to HOST:PORT.
    # 1.": the reason is in the SSLError it was raised from.
    inner, depth = exc.__cause__ or exc.__context__, 0
    while inner is not None and depth < 5:
        if isinstance(inner, ssl.SSLError):
            if str(inner) not in text:
                text += f" ({_text(inner)})"
            break
        inner, depth = inner.__cause__ or inner.__context__, depth + 1
    hint = next((h for marker, h in _TLS_HINTS if marker in text.upper()), None)
    return f"{text}; {hint}" if hint else text


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _within(call: Awaitable[T], timeout: float) -> T:
    """`call` (redis-py's) in a task of its own, for at most `timeout`, else TimeoutError.

    Not asyncio.timeout in the caller's task: redis-py 4.3 (Debian 12) bounds its reads with
    async_timeout, which cancels the task it runs in and, when that coincides with another
    cancel, leaves one pending: it would hit the caller's next await (a request's sqlite
    write). Not asyncio.wait_for either: on Python 3.11 it loses a cancel of the caller that
    comes as `call` ends, and a stop then hangs."""
    task = asyncio.ensure_future(call)
    task.add_done_callback(_retrieved)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():  # timed out, or the caller was cancelled
            task.cancel()
    if not done:
        raise TimeoutError
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Nothing is logged for a call given up on: its caller already said why."""
    if not task.cancelled():
        task.exception()


def _aclose(obj: Any) -> Awaitable[None]:
    """redis-py 5 and later call it aclose() (close() is deprecated); Debian 12's 4.3 has
    close() only."""
    close = getattr(obj, "aclose", None) or obj.close
    result: Awaitable[None] = close()
    return result


def _client(config: ClusterConfig, password: str | None) -> Any:
    """A redis.asyncio client: no retries of its own (the caller's timeout is the budget)."""
    from redis.asyncio import Redis  # imported only when [cluster] is configured
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        "username": config.username or None,
        "password": password,
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
    }
    if config.redis.startswith("rediss://"):
        # Verify Redis' certificate and its name, whatever redis-py's defaults (Debian 12's
        # 4.3 does not check the name).
        options |= {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_ca_certs": str(config.ca_file) if config.ca_file else None,
            "ssl_certfile": str(config.cert_file) if config.cert_file else None,
            "ssl_keyfile": str(config.key_file) if config.key_file else None,
        }
    if config.sentinels:
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel([(s.host, s.port) for s in config.sentinels],
                            socket_timeout=config.timeout,
                            socket_connect_timeout=config.timeout)
        return sentinel.master_for(config.sentinel_service, **options)
    return Redis.from_url(config.redis, **options)
