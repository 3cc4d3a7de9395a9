#!/usr/bin/env python3
"""What one group commit costs the SQLite engine, alone (a benchmark, not a test).

    PYTHONPATH=daemon python bench/sqlite_append.py --batch 5 --batch 40
    PYTHONPATH=daemon python bench/sqlite_append.py --dir /dev/shm --drop-index messages_ts

Appends ``--messages`` 100-byte messages among ``--users`` users (each message to the
user ``users/2`` further on, as bench/run.py's pairs do) through
``SqliteDatabase.append_many`` in batches of ``--batch`` (one transaction each), with a
PASSIVE checkpoint every 8,000 messages as the engine's maintenance does, and prints
the CPU per message, the commit time (p50, max) and the WAL bytes written per message
(checkpointed frames x 4 KiB pages).  ``--drop-index`` drops an index first (to see what
maintaining it costs).  docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))

from tidings.store.records import NewMessage  # noqa: E402
from tidings.store.sqlite_db import SqliteDatabase  # noqa: E402
from tidings.wire.protocol import MsgIdGenerator  # noqa: E402


def run(batch: int, messages: int, users: int, directory: str | None, drop: list[str]) -> str:
    with tempfile.TemporaryDirectory(dir=directory) as d:
        db = SqliteDatabase.open(os.path.join(d, "t.db"))
        with db._write() as c:
            for index in drop:
                c.execute(f"DROP INDEX {index}")
        ids = MsgIdGenerator()
        names = [f"u{i}" for i in range(users)]
        body = b'"' + b"x" * 98 + b'"'
        commits: list[float] = []
        frames = i = 0
        cpu0 = time.process_time()
        while i < messages:
            msgs = []
            for _ in range(batch):
                msg_id, ts = ids.next()
                msgs.append(NewMessage(msg_id, names[i % users], names[(i + users // 2) % users], body, ts))
                i += 1
            t0 = time.perf_counter()
            db.append_many(msgs)
            commits.append(time.perf_counter() - t0)
            if i % 8000 < batch:
                frames += db.checkpoint()[0]
        cpu = time.process_time() - cpu0
        frames += db.checkpoint()[0]
        db.close()
    return (f"batch {batch:>3}: {1e6 * cpu / messages:6.1f} us CPU/msg, commit p50 "
            f"{1e3 * statistics.median(commits):.2f} ms max {1e3 * max(commits):.2f} ms, "
            f"WAL {frames * 4.096 / messages:.1f} KB/msg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="messages per commit (repeatable; default 1, 5, 40)")
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--dir", default=None, help="where the database goes (default: the temp dir)")
    ap.add_argument("--drop-index", action="append", default=[], metavar="NAME")
    a = ap.parse_args()
    for batch in a.batch or [1, 5, 40]:
        print(run(batch, a.messages, a.users, a.dir, a.drop_index))


if __name__ == "__main__":
    main()
