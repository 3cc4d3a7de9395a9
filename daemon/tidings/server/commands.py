"""Commands off the hot path: refresh, resume, history, search, presence, rooms, watches.

``handle_command(conn, cmd)`` runs in the connection task, with one reply credit held for
the reply it queues (``conn.reply`` / ``conn.error``).  Client faults (ProtocolError,
RoomRefused) become error frames; a store failure becomes ``unavailable``.  The hot path
(send, ping, ack) stays in connection.py.
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings import log
from tidings.auth import AuthError
from tidings.wire.protocol import (
    History,
    Join,
    Leave,
    Presence,
    ProtocolError,
    Refresh,
    Resume,
    Search,
    Send,
    Watch,
    decode_body,
    message_fields,
    message_json,
)
from tidings.routing.rooms import RoomRefused
from tidings.store import BadQuery, StoreError, UnknownMessage, Unsupported

__all__ = ["handle_command", "message_obj"]


async def handle_command(conn: Any, cmd: Any) -> None:
    """Handle a command off the hot path; ``conn`` holds one reply credit for it."""
    fid = cmd.id
    try:
        if type(cmd) is Refresh:
            _refresh(conn, cmd)
        elif type(cmd) is Resume:
            conn.start_replay(cmd.since, credit=True, fid=fid)  # its `resumed` uses our credit
        elif type(cmd) is History:
            await _history(conn, cmd)
        elif type(cmd) is Search:
            await _search(conn, cmd)
        elif type(cmd) is Presence:
            conn.reply("presence", id=fid, users=await conn.hub.presence(cmd.users))
        elif type(cmd) is Send:  # to a room
            msg_id, delivered = await conn.hub.send_room(conn, cmd.room, cmd.body)
            conn.reply("ack", id=fid, msg_id=msg_id, room=cmd.room, delivered=delivered)
        elif type(cmd) is Join:
            recent = await conn.hub.join(conn, cmd.room, conn.rooms_allowed)
            conn.reply("joined", id=fid, room=cmd.room,
                        recent=[message_obj(conn, f) for f in recent])
        elif type(cmd) is Leave:
            conn.hub.leave(conn, cmd.room)
            conn.reply("left", id=fid, room=cmd.room)
        elif type(cmd) is Watch:
            online = conn.hub.watch(conn, cmd.users, cmd.watch)
            conn.reply("watching" if cmd.watch else "unwatched", id=fid, users=online)
        else:  # pragma: no cover - every parsed command type is handled above
            raise AssertionError(f"unhandled command {cmd!r}")
    except RoomRefused as exc:
        conn.error(fid, exc.code, exc.reason)
    except ProtocolError as exc:
        conn.error(fid, exc.code, exc.message)
    except Unsupported as exc:
        conn.error(fid, "unsupported", str(exc))
    except StoreError as exc:
        log.log("error", "store_read_failed", error=str(exc), conn=conn.conn_id)
        conn.reply("error", id=fid, code="unavailable", message="store unavailable; retry")

def _refresh(conn: Any, cmd: Refresh) -> None:
    try:
        identity = conn.auth.verify(cmd.token)
    except AuthError as exc:
        raise ProtocolError("forbidden", str(exc), cmd.id) from None
    if identity.user != conn.user:
        raise ProtocolError("forbidden", "token is for another user", cmd.id)
    conn.exp = identity.exp
    conn.reply("refreshed", id=cmd.id, exp=identity.exp)

async def _history(conn: Any, cmd: History) -> None:
    cap = conn.hub.config.store.history_limit
    limit = min(cmd.limit or cap, cap)
    try:
        msgs, more = await conn.hub.store.history(conn.user, cmd.peer, cmd.before, limit)
    except UnknownMessage:
        raise ProtocolError("bad_request", "'before' is not a known msg_id", cmd.id) from None
    conn.reply("history_page", id=cmd.id, messages=[_stored_obj(conn, m) for m in msgs], more=more,
                **{"with": cmd.peer})

async def _search(conn: Any, cmd: Search) -> None:
    cap = conn.hub.config.store.history_limit
    limit = min(cmd.limit or 20, cap)
    try:
        msgs, more = await conn.hub.store.search(conn.user, cmd.q, limit, cmd.offset)
    except BadQuery as exc:
        raise ProtocolError("bad_request", f"bad search query: {exc}", cmd.id) from None
    conn.reply("search_results", id=cmd.id, q=cmd.q, messages=[_stored_obj(conn, m) for m in msgs],
                more=more)

def _stored_obj(conn: Any, m: Any) -> Any:
    return message_obj(conn, message_fields(m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts))

def message_obj(conn: Any, fields: dict[str, Any]) -> Any:
    """A message inside a reply: a JSON fragment, or a dict for MessagePack."""
    if conn.reply_binary:
        return dict(fields, body=decode_body(fields["body"]))
    return orjson.Fragment(message_json(fields))
