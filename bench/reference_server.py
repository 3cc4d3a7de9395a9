#!/usr/bin/env python3
"""Reference server for the Tidings benchmark (a benchmark tool, not a test).

The classic "dict of user id -> sockets" router on the asyncio `websockets`
library, speaking the subset of the Tidings protocol the load generator uses:

  GET /ws?user=ID        -> {"type":"hello","user":ID,"conn":"c-N"}
  {"type":"send","to":T,"body":B,"id":I}
      -> {"type":"message","msg_id":M,"from":ID,"to":T,"body":B,"ts":MS} to every socket of T
      -> {"type":"ack","id":I,"msg_id":M,"delivered":n} to the sender
  {"type":"ping","id":I} -> {"type":"pong","id":I}

It does the same per-message work as a hand-rolled server: one json.loads of the
incoming frame, one json.dumps of the outgoing message (encoded once, whatever the
number of recipient sockets), one json.dumps of the ack.  No persistence, no auth,
no limits.  stdlib json on purpose (the "classic" baseline).

    python bench/reference_server.py --port 0 [--host 127.0.0.1] [--path /ws] [--ping-interval 20]

Keepalive is websockets' own: a ping every --ping-interval seconds per connection
(websockets' default 20), the connection closed if no pong comes within 20 s.

Logs `level=info event=listening ... port=N` on stderr (N is the real port when
--port 0 is given).  SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

clients: dict[str, set[ServerConnection]] = {}
_conn_ids = itertools.count(1)
_msg_ids = itertools.count(1)


def _user_of(path: str) -> str | None:
    users = parse_qs(urlsplit(path).query).get("user")
    return users[0] if users and users[0] else None


def make_handler(ws_path: str):
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != ws_path:
            return connection.respond(404, "not found\n")
        if _user_of(request.path) is None:
            return connection.respond(401, "missing user\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        user = _user_of(ws.request.path)
        assert user is not None
        conn = f"c-{next(_conn_ids)}"
        clients.setdefault(user, set()).add(ws)
        try:
            await ws.send(json.dumps({"type": "hello", "user": user, "conn": conn}))
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    kind = msg.get("type")
                except (ValueError, AttributeError):
                    await ws.send(json.dumps({"type": "error", "code": "bad_request", "message": "invalid JSON"}))
                    continue
                if kind == "send":
                    to = msg.get("to")
                    msg_id = f"m-{next(_msg_ids)}"
                    out = json.dumps(
                        {
                            "type": "message",
                            "msg_id": msg_id,
                            "from": user,
                            "to": to,
                            "body": msg.get("body"),
                            "ts": int(time.time() * 1000),
                        }
                    )
                    delivered = 0
                    for target in list(clients.get(to, ())):
                        try:
                            await target.send(out)
                            delivered += 1
                        except ConnectionClosed:
                            pass
                    await ws.send(
                        json.dumps({"type": "ack", "id": msg.get("id"), "msg_id": msg_id, "delivered": delivered})
                    )
                elif kind == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": msg.get("id")}))
                else:
                    await ws.send(
                        json.dumps(
                            {"type": "error", "id": msg.get("id"), "code": "unknown_type", "message": str(kind)}
                        )
                    )
        except ConnectionClosed:
            pass
        finally:
            socks = clients.get(user)
            if socks is not None:
                socks.discard(ws)
                if not socks:
                    del clients[user]

    return handler, process_request


async def main(host: str, port: int, path: str, ping_interval: float) -> None:
    handler, process_request = make_handler(path)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, host, port, process_request=process_request, max_size=1 << 20,
                     ping_interval=ping_interval) as server:
        real_port = next(iter(server.sockets)).getsockname()[1]
        print(
            f"ts={time.time():.3f} level=info event=listening url=ws://{host}:{real_port}{path} "
            f"host={host} port={real_port}",
            file=sys.stderr,
            flush=True,
        )
        await stop


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--path", default="/ws")
    ap.add_argument("--ping-interval", type=float, default=20.0,
                    help="seconds between keepalive pings per connection (websockets' default: 20)")
    a = ap.parse_args()
    asyncio.run(main(a.host, a.port, a.path, a.ping_interval))
