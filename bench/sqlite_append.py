#!/usr/bin/env python3
"""What one group commit costs the SQLite engine, alone (a benchmark, not a test).

    PYTHONPATH=daemon python bench/sqlite_append.py --batch 5 --batch 40
    PYTHONPATH=daemon python bench/sqlite_append.py --dir /dev/shm --drop-index messages_inbox
    PYTHONPATH=daemon python bench/sqlite_append.py --batch 1 --page-size 4096 --page-size 1024 --reps 3 --pages

Appends ``--messages`` 100-byte messages among ``--users`` users (each message to the
user ``users/2`` further on, as bench/run.py's pairs do) through
``SqliteDatabase.append_many`` in batches of ``--batch`` (one transaction each), with a
PASSIVE checkpoint every 8,000 messages as the engine's maintenance does, and prints
the CPU per message of the appends alone (what the loop thread pays) and of the
checkpoints, the commit time (p50, max), the WAL frames (pages) per commit and the WAL
bytes per message (checkpointed frames x (page size + 24)).  ``--page-size`` creates
the file with that page size first (repeatable: each is a configuration); ``--reps``
runs every configuration that many times, alternated, for paired figures;
``--pages`` says which B-trees the frames of one-transaction-per-batch commits are
pages of (read from the WAL's frame headers and mapped with the ``dbstat`` table).
``--drop-index`` drops an index first (to see what maintaining it costs).
docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import collections
import os
import sqlite3
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))

from tidings.store.records import NewMessage  # noqa: E402
from tidings.store.sqlite_db import SqliteDatabase  # noqa: E402
from tidings.wire.protocol import MsgIdGenerator  # noqa: E402


def wal_pages(path: str, page_size: int) -> list[list[int]]:
    """The page numbers of each committed transaction in the WAL at ``path``."""
    with open(path + "-wal", "rb") as f:
        wal = f.read()
    commits: list[list[int]] = []
    frames: list[int] = []
    # (a restarted WAL keeps old frames past the new ones; its salt tells them apart)
    salt = wal[16:24]
    for off in range(32, len(wal) - 24, 24 + page_size):
        page, size = struct.unpack(">II", wal[off:off + 8])
        if wal[off + 8:off + 16] != salt:
            break
        frames.append(page)
        if size:  # a commit frame carries the database size
            commits.append(frames)
            frames = []
    return commits


def page_owners(path: str, commits: list[list[int]]) -> str:
    """Frames per commit by B-tree (``dbstat``) and page type."""
    with sqlite3.connect(path) as c:
        owner = {p: f"{n} {t}" for n, p, t in c.execute("SELECT name, pageno, pagetype FROM dbstat")}
    owner[1] = "page 1 (header: database size)"
    count = collections.Counter(owner.get(p, "other") for frames in commits for p in frames)
    return "\n".join(f"      {n / len(commits):5.2f} {name}" for name, n in count.most_common())


def run(batch: int, messages: int, users: int, directory: str | None, drop: list[str],
        page_size: int | None, pages: bool) -> str:
    with tempfile.TemporaryDirectory(dir=directory) as d:
        path = os.path.join(d, "t.db")
        if page_size:
            with sqlite3.connect(path) as c:
                c.execute(f"PRAGMA page_size = {page_size}")
                c.execute("VACUUM")  # writes the header: the size is the file's from now on
        db = SqliteDatabase.open(path)
        with db._write() as c:
            for index in drop:
                c.execute(f"DROP INDEX {index}")
            (size,) = c.execute("PRAGMA page_size").fetchone()
        ids = MsgIdGenerator()
        names = [f"u{i}" for i in range(users)]
        body = b'"' + b"x" * 98 + b'"'
        commits: list[float] = []
        frames = i = 0
        cpu = cpu_checkpoint = 0.0
        while i < messages:
            msgs = []
            for _ in range(batch):
                msg_id, ts = ids.next()
                msgs.append(NewMessage(msg_id, names[i % users], names[(i + users // 2) % users], body, ts))
                i += 1
            c0 = time.process_time()
            t0 = time.perf_counter()
            db.append_many(msgs)
            commits.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
            if i % 8000 < batch and i < messages:
                c0 = time.process_time()
                frames += db.checkpoint()[0]
                cpu_checkpoint += time.process_time() - c0
        breakdown = page_owners(path, wal_pages(path, size)) if pages else ""
        c0 = time.process_time()
        frames += db.checkpoint()[0]
        cpu_checkpoint += time.process_time() - c0
        db.close()
    return (f"page {size:>5} batch {batch:>3}: appends {1e6 * cpu / messages:5.1f} us CPU/msg "
            f"(+ checkpoints {1e6 * cpu_checkpoint / messages:4.1f}), commit p50 "
            f"{1e3 * statistics.median(commits):.3f} ms max {1e3 * max(commits):.2f} ms, "
            f"{frames / len(commits):.2f} pages/commit, "
            f"WAL {frames * (size + 24) / 1000 / messages:.1f} KB/msg"
            + ("\n" + breakdown if breakdown else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="messages per commit (repeatable; default 1, 5, 40)")
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--dir", default=None, help="where the database goes (default: the temp dir)")
    ap.add_argument("--drop-index", action="append", default=[], metavar="NAME")
    ap.add_argument("--page-size", type=int, action="append", metavar="BYTES",
                    help="create the file with this page size (repeatable; default: the engine's)")
    ap.add_argument("--reps", type=int, default=1, help="run every configuration this many times, alternated")
    ap.add_argument("--pages", action="store_true", help="which B-trees a commit's pages belong to")
    a = ap.parse_args()
    for _ in range(a.reps):
        for batch in a.batch or [1, 5, 40]:
            for size in a.page_size or [None]:
                print(run(batch, a.messages, a.users, a.dir, a.drop_index, size, a.pages), flush=True)


if __name__ == "__main__":
    main()
