#!/usr/bin/env python3
"""What full-text indexing costs the SQLite engine per row, alone (a benchmark, not a test).

    PYTHONPATH=daemon python bench/sqlite_index.py
    PYTHONPATH=daemon python bench/sqlite_index.py --fts-option columnsize=0

Appends ``--messages`` ~90-byte messages among 100 users (50 per commit), then times
(CPU) ``index_pending`` in chunks of ``--chunk`` rows (``conversations``, ``retention``:
the loop thread's part) and the full-text index's ``index_step`` in chunks of
``--fts-chunk`` rows (its own file, FTS5's automerge included: the worker thread's part),
and prints the CPU per indexed row of each.  ``--fts-option`` recreates the full-text
table with an extra FTS5 option first (to see what it saves).  docs/performance.md
quotes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))

from tidings.store.records import NewMessage  # noqa: E402
from tidings.store.sqlite_db import SqliteDatabase  # noqa: E402
from tidings.wire.protocol import MsgIdGenerator  # noqa: E402

BODY = b'"hello world this is a message of about one hundred bytes with some words in it ok"'


def run(messages: int, chunk: int, fts_chunk: int, fts_options: list[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        db = SqliteDatabase.open(os.path.join(d, "t.db"))
        if fts_options:
            with db.fts._tx as c:
                c.execute("DROP TABLE messages_fts")
                c.execute("CREATE VIRTUAL TABLE messages_fts USING fts5 (text, owners, "
                          f"tokenize='unicode61 remove_diacritics 2', {', '.join(fts_options)})")
        ids = MsgIdGenerator()
        names = [f"user-{i}" for i in range(100)]
        for start in range(0, messages, 50):
            batch = []
            for i in range(start, start + 50):
                msg_id, ts = ids.next()
                batch.append(NewMessage(msg_id, names[i % 100], names[(i + 50) % 100], BODY, ts))
            db.append_many(batch)
        cpu0 = time.process_time()
        done = 0
        while n := db.index_pending(chunk):
            done += n
        cpu1 = time.process_time()
        fts_done = 0
        while n := db.fts.index_step(fts_chunk):
            fts_done += n
        cpu2 = time.process_time()
        db.close()
    return (f"{' '.join(fts_options) or 'default'}: {1e6 * (cpu1 - cpu0) / done:.1f} us CPU "
            f"per row for history and retention (loop thread, chunk {chunk}), "
            f"{1e6 * (cpu2 - cpu1) / fts_done:.1f} us for the full-text index (worker, "
            f"chunk {fts_chunk}); {done} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--fts-chunk", type=int, default=10_000)
    ap.add_argument("--fts-option", action="append", default=[], metavar="OPTION=VALUE")
    a = ap.parse_args()
    print(run(a.messages, a.chunk, a.fts_chunk, a.fts_option))


if __name__ == "__main__":
    main()
