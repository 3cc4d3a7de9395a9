"""The redis engine's write lane: many script calls (and a few plain commands) in ONE
round trip, ``EVALSHA`` straight out, no ``SCRIPT EXISTS`` first.

Why: coredis' ``pipeline()`` sends ``SCRIPT EXISTS`` for its registered scripts before
every batch (a second round trip) and builds a command object, a telemetry span and a
callback per command.  On the hot path (the hub's writer: one append and one progress
save per batch) that was most of the Redis cost in the daemon (docs/cluster.md,
"Measured").

Contract:

* :meth:`Lane.load` loads every script (``SCRIPT LOAD``; on Redis Cluster on every
  primary) -- done once at open.
* :meth:`Lane.run` sends ``calls`` (each a :class:`Call`: a script with its keys and
  args, or a plain ``HSET``/``PEXPIREAT``) and returns one reply per call, in order: the
  reply, or the exception that call raised (a connection failure is the exception of
  every call still unanswered).  It never raises for a call's own failure.
* ``NOSCRIPT`` (Redis restarted, ``SCRIPT FLUSH``, a failover): a script that was not
  found did not run, so the lane loads the scripts again and resends exactly those
  calls, once.  Nothing is ever resent after it may have run.
* Standalone Redis over plain TCP or a Unix socket: the calls go out on the lane's own
  connection (:mod:`tidings.store.redis_wire`: packed and written with one ``send`` by
  the caller, replies parsed by whoever waits, no coredis request or task per call),
  opened at :meth:`Lane.load` and again after it failed.  :meth:`Lane.submit` returns
  once the calls are on the socket, so a caller may submit the next batch before this
  one's replies are in (the hub's writer keeps two appends in flight): Redis runs them
  in submit order (one connection, batches written whole in submit order).  Over TLS:
  the calls are queued on one multiplexed coredis connection instead (pinned while it
  is usable; it stays in coredis' pool, multiplexed with other commands), with the same
  contract.  Redis Cluster (``cluster=True``): a coredis cluster pipeline of ``EVALSHA``
  commands (routed by their keys; a script touches one slot), also without
  ``SCRIPT EXISTS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
import coredis.exceptions
import trio

from tidings.store.redis_wire import Batch, WireConnection, wire_target

__all__ = ["Call", "Lane", "Pending", "Script"]


@attrs.frozen
class Script:
    """A Lua script known by its SHA1 (computed here, as Redis does)."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


@attrs.frozen
class Call:
    """One command of a lane round trip: ``what`` is a :class:`Script` (run with
    ``keys``/``args``) or ``"HSET"`` (``keys[0]``, ``args`` = field, value, ...) or
    ``"PEXPIREAT"`` (``keys[0]``, ``args[0]``)."""

    what: Script | str
    keys: Sequence[str]
    args: Sequence[Any]

    def command(self) -> tuple[Any, ...]:
        """The command as sent on a standalone connection: ``EVALSHA`` for a script."""
        if isinstance(self.what, Script):
            return (b"EVALSHA", self.what.sha, len(self.keys), *self.keys, *self.args)
        return (self.what.encode(), *self.keys, *self.args)


class Lane:
    """See the module docstring."""

    def __init__(self, client: Any, *, cluster: bool, connect_timeout: float = 2.0,
                 command_timeout: float = 5.0) -> None:
        self._r = client
        self._cluster = cluster
        self._scripts: dict[str, Script] = {}
        self._conn: Any = None  # the connection every submit goes to while it lives
        # standalone, no TLS: the lane's own connection (redis_wire), opened on demand
        self._target = None if cluster else wire_target(client)
        self._wire: WireConnection | None = None
        self._opening: trio.Lock | None = None
        self._timeouts = (connect_timeout, command_timeout)
        self._closed = False  # aclose ran: no connection of its own is opened again
        #: NOSCRIPT recoveries (for tests and statistics).
        self.reloads = 0

    def script(self, source: str) -> Script:
        """Register ``source`` (loaded by :meth:`load`); returns its Script."""
        s = Script(source)
        self._scripts[s.sha] = s
        return s

    async def load(self) -> None:
        """Load every script (and open the lane's own connection when it has one)."""
        for s in self._scripts.values():
            await self._r.script_load(s.source)
        if self._target is not None:
            await self._wire_connection()

    async def aclose(self) -> None:
        """Close the lane's own connection (its unanswered calls fail); later calls on
        it fail with ``coredis.exceptions.ConnectionError`` instead of opening a new one
        (or keeping one that was being opened)."""
        self._closed = True
        if self._wire is not None:
            self._wire.close(coredis.exceptions.ConnectionError("lane: closed"))

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` and wait for their replies (see the module docstring)."""
        return await (await self.submit(calls)).replies()

    async def submit(self, calls: Sequence[Call]) -> Pending:
        """Send ``calls`` without waiting for their replies; ``await pending.replies()``
        later.  Standalone: when this returns they are on the lane's own socket (over
        TLS: on coredis' connection's write queue), in call order, and Redis runs
        submitted batches in that order; it waits only to (re)open the connection or for
        a batch bigger than the socket buffer.  Redis Cluster: waits for the replies here
        (a cluster pipeline runs as a whole).  Never raises for a failure to send: the
        calls' replies are that exception."""
        if self._cluster:
            return Pending(self, calls, None, await self._send_cluster(calls))
        if self._target is not None:
            try:
                wire = await self._wire_connection()
                batch = await wire.send([c.command() for c in calls])
            except _ERRORS as exc:  # nothing was sent, or its outcome is unknown
                return Pending(self, calls, None, [exc] * len(calls))
            return Pending(self, calls, batch, None)
        requests: list[Any] = []
        try:
            conn = await self._connection()
            for c in calls:
                requests.append(conn.create_request(*c.command(), decode=False))
        except _ERRORS as exc:
            # those queued still get their replies (or their failure); the rest failed
            requests += [exc] * (len(calls) - len(requests))
        return Pending(self, calls, requests, None)

    async def _connection(self) -> Any:
        """The pinned connection (see the module docstring); a new one when it died.
        Two tasks replacing it at once agree on the first one that finished."""
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._r.connection_pool.acquire() as fresh:
            pass  # released at once: it stays shared (multiplexed) in coredis' pool
        conn = self._conn
        if conn is None or not conn.usable:
            conn = self._conn = fresh
        return conn

    async def _wire_connection(self) -> WireConnection:
        """The lane's own connection; a new one when it failed (one task opens it, the
        others wait for that one)."""
        wire = self._wire
        if wire is not None and wire.usable:
            return wire
        if self._opening is None:
            self._opening = trio.Lock()
        async with self._opening:
            wire = self._wire
            if wire is None or not wire.usable:
                if self._closed:
                    raise coredis.exceptions.ConnectionError("lane: closed")
                connect, command = self._timeouts
                wire = await WireConnection.open(
                    self._target, connect_timeout=connect, command_timeout=command)  # type: ignore[arg-type]
                if self._closed:  # aclose ran while it was being opened
                    wire.close(coredis.exceptions.ConnectionError("lane: closed"))
                    raise wire.error  # type: ignore[misc]
                self._wire = wire
        return wire

    async def _send_cluster(self, calls: Sequence[Call]) -> list[Any]:
        try:
            async with self._r.pipeline(transaction=False, raise_on_error=False) as pipe:
                requests = []
                for c in calls:
                    if isinstance(c.what, Script):
                        requests.append(pipe.evalsha(c.what.sha, list(c.keys), list(c.args)))
                    elif c.what == "HSET":
                        a = list(c.args)
                        requests.append(pipe.hset(c.keys[0], dict(zip(a[::2], a[1::2]))))
                    elif c.what == "PEXPIREAT":
                        requests.append(pipe.pexpireat(c.keys[0], int(c.args[0])))
                    else:
                        raise ValueError(f"lane: unsupported command {c.what!r} (our bug)")
        except _ERRORS as exc:
            return [exc] * len(calls)
        out: list[Any] = []
        for request in requests:
            try:
                out.append(await request)
            except (*_ERRORS, RuntimeError) as exc:  # RuntimeError: never executed
                out.append(exc)
        return out


_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)


class Pending:
    """Submitted calls; :meth:`replies` waits for them (once)."""

    def __init__(self, lane: Lane, calls: Sequence[Call], requests: list[Any] | Batch | None,
                 replies: list[Any] | None) -> None:
        self._lane, self._calls, self._requests, self._replies = lane, calls, requests, replies

    async def replies(self) -> list[Any]:
        """One reply (or exception) per call, in order; a ``NOSCRIPT`` is recovered by
        loading the scripts and resending exactly the calls that were not run, once."""
        replies = self._replies if self._replies is not None else await self._wait()
        missing = [i for i, r in enumerate(replies)
                   if isinstance(r, coredis.exceptions.NoScriptError)]
        if missing:
            lane = self._lane
            lane.reloads += 1
            try:
                await lane.load()
            except _ERRORS as exc:
                for i in missing:
                    replies[i] = exc
                return replies
            again = await (await lane.submit([self._calls[i] for i in missing]))._wait_any()
            for i, r in zip(missing, again):
                replies[i] = r
        return replies

    async def _wait_any(self) -> list[Any]:
        return self._replies if self._replies is not None else await self._wait()

    async def _wait(self) -> list[Any]:
        if type(self._requests) is Batch:
            return await self._requests.replies()
        out: list[Any] = []
        for request in self._requests or ():
            if isinstance(request, BaseException):
                out.append(request)
                continue
            try:
                out.append(await request)
            except _ERRORS as exc:
                out.append(exc)
        return out
