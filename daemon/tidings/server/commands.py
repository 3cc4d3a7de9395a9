"""Commands off the hot path: refresh, resume, history, search, presence, rooms, watches.

``handle_command(ctx, cmd)`` runs in the connection task, with one reply credit held for
the reply it queues (``ctx.reply`` / ``ctx.error``).  ``ctx`` is a ``CommandContext``:
exactly what a command may use -- who asks, how to answer, the store's reads, the hub's
presence, rooms and watches -- and nothing else of the connection (the connection
implements it).  Client faults (ProtocolError, RoomRefused, WatchRefused) become error
frames; a store failure becomes ``unavailable``.  The hot path (send, ping, ack) stays
in connection.py.  Cancellation: a cancelled command queues no reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from tidings import log
from tidings.auth import AuthError, Identity
from tidings.routing.rooms import RoomRefused
from tidings.routing.router import Endpoint
from tidings.routing.watches import WatchRefused
from tidings.store import BadQuery, StoredMessage, StoreError, UnknownMessage, Unsupported
from tidings.wire.protocol import (
    Command, History, Join, Leave, Presence, ProtocolError, Refresh, Resume, Search, Send,
    Watch, decode_body, message_fields, message_json,
)

__all__ = ["CommandContext", "FrameId", "handle_command", "message_obj"]

#: A client frame's ``id`` as the parser accepted it (a string, an integer, or absent).
FrameId = str | int | None


class TokenVerifier(Protocol):
    def verify(self, token: str) -> Identity: ...


class InboxReads(Protocol):
    """The store reads commands make (every engine has them)."""

    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]: ...

    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]: ...


class HubServices(Protocol):
    """What commands ask of the hub: presence, rooms, watches (``server.hub.Hub``)."""

    async def presence(self, users: tuple[str, ...]) -> dict[str, dict[str, Any]]: ...

    async def join(self, conn: Endpoint, room: str,
                   allowed: tuple[str, ...] | None) -> list[dict[str, Any]]: ...

    def leave(self, conn: Endpoint, room: str) -> None: ...

    async def send_room(self, conn: Endpoint, room: str, body: bytes,
                        key: str | None = None) -> tuple[str, int, bool]: ...

    async def watch(self, conn: Endpoint, users: tuple[str, ...], on: bool) -> dict[str, bool]: ...


class CommandContext(Endpoint, Protocol):
    """Exactly what a command may use.  It is the router endpoint of its connection
    (rooms and watches hold it), and answers the frame being handled."""

    exp: float | None  # the token's expiry: ``refresh`` moves it
    rooms_allowed: tuple[str, ...] | None  # the token's ``rooms`` claim
    reply_binary: bool  # the frame was binary: messages in the reply as MessagePack maps
    auth: TokenVerifier
    hub: HubServices
    store: InboxReads

    @property
    def history_limit(self) -> int: ...

    def reply(self, kind: str, **fields: Any) -> None: ...

    def error(self, fid: FrameId, code: str, message: str) -> None: ...

    def resume(self, since: int, fid: FrameId) -> None: ...


async def handle_command(ctx: CommandContext, cmd: Command) -> None:
    """Handle a command off the hot path; ``ctx`` holds one reply credit for it."""
    fid = cmd.id
    try:
        if type(cmd) is Refresh:
            _refresh(ctx, cmd)
        elif type(cmd) is Resume:
            ctx.resume(cmd.since, fid)  # its `resumed` uses our credit
        elif type(cmd) is History:
            await _history(ctx, cmd)
        elif type(cmd) is Search:
            await _search(ctx, cmd)
        elif type(cmd) is Presence:
            ctx.reply("presence", id=fid, users=await ctx.hub.presence(cmd.users))
        elif type(cmd) is Send:  # to a room
            assert cmd.room is not None  # a send to a user is the hot path's
            msg_id, delivered, duplicate = await ctx.hub.send_room(ctx, cmd.room, cmd.body, cmd.key)
            if duplicate:
                ctx.reply("ack", id=fid, msg_id=msg_id, room=cmd.room, delivered=delivered,
                          duplicate=True)
            else:
                ctx.reply("ack", id=fid, msg_id=msg_id, room=cmd.room, delivered=delivered)
        elif type(cmd) is Join:
            recent = await ctx.hub.join(ctx, cmd.room, ctx.rooms_allowed)
            ctx.reply("joined", id=fid, room=cmd.room, recent=[message_obj(ctx, f) for f in recent])
        elif type(cmd) is Leave:
            ctx.hub.leave(ctx, cmd.room)
            ctx.reply("left", id=fid, room=cmd.room)
        elif type(cmd) is Watch:
            online = await ctx.hub.watch(ctx, cmd.users, cmd.watch)
            ctx.reply("watching" if cmd.watch else "unwatched", id=fid, users=online)
        else:  # pragma: no cover - send to a user, ping and ack are the connection's
            raise AssertionError(f"unhandled command {cmd!r}")
    except (RoomRefused, WatchRefused) as exc:
        ctx.error(fid, exc.code, exc.reason)
    except ProtocolError as exc:
        ctx.error(fid, exc.code, exc.message)
    except Unsupported as exc:
        ctx.error(fid, "unsupported", str(exc))
    except StoreError as exc:
        log.log("error", "store_read_failed", error=str(exc), conn=ctx.conn_id)
        ctx.reply("error", id=fid, code="unavailable", message="store unavailable; retry")


def _refresh(ctx: CommandContext, cmd: Refresh) -> None:
    try:
        identity = ctx.auth.verify(cmd.token)
    except AuthError as exc:
        raise ProtocolError("forbidden", str(exc), cmd.id) from None
    if identity.user != ctx.user:
        raise ProtocolError("forbidden", "token is for another user", cmd.id)
    ctx.exp = identity.exp
    ctx.reply("refreshed", id=cmd.id, exp=identity.exp)


async def _history(ctx: CommandContext, cmd: History) -> None:
    cap = ctx.history_limit
    limit = min(cmd.limit or cap, cap)
    try:
        msgs, more = await ctx.store.history(ctx.user, cmd.peer, cmd.before, limit)
    except UnknownMessage:
        raise ProtocolError("bad_request", "'before' is not a known msg_id", cmd.id) from None
    ctx.reply("history_page", id=cmd.id, messages=_stored_objs(ctx, msgs), more=more,
              **{"with": cmd.peer})


async def _search(ctx: CommandContext, cmd: Search) -> None:
    limit = min(cmd.limit or 20, ctx.history_limit)
    try:
        msgs, more = await ctx.store.search(ctx.user, cmd.q, limit, cmd.offset)
    except BadQuery as exc:
        raise ProtocolError("bad_request", f"bad search query: {exc}", cmd.id) from None
    ctx.reply("search_results", id=cmd.id, q=cmd.q, messages=_stored_objs(ctx, msgs), more=more)


def _stored_objs(ctx: CommandContext, msgs: Sequence[StoredMessage]) -> list[Any]:
    return [message_obj(ctx, message_fields(m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts))
            for m in msgs]


def message_obj(ctx: CommandContext, fields: dict[str, Any]) -> Any:
    """A message inside a reply: a JSON fragment, or a dict for MessagePack."""
    if ctx.reply_binary:
        return dict(fields, body=decode_body(fields["body"]))
    return orjson.Fragment(message_json(fields))
