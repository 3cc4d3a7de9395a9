#!/usr/bin/env python3
"""What full-text indexing costs the SQLite engine per row, alone (a benchmark, not a test).

    PYTHONPATH=daemon python bench/sqlite_index.py
    PYTHONPATH=daemon python bench/sqlite_index.py --fts-option columnsize=0

Appends ``--messages`` ~90-byte messages among 100 users (50 per commit), then times
(CPU) ``index_pending`` in chunks of ``--chunk`` rows (full-text index, ``conversations``,
``retention``) and ``merge_index`` as the engine's maintenance runs them, and prints the
CPU per indexed row.  ``--fts-option`` recreates the full-text table with an extra FTS5
option first (to see what it saves).  docs/performance.md quotes it.
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


def run(messages: int, chunk: int, fts_options: list[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        db = SqliteDatabase.open(os.path.join(d, "t.db"))
        if fts_options:
            with db._write() as c:
                c.execute("DROP TABLE messages_fts")
                c.execute("CREATE VIRTUAL TABLE messages_fts USING fts5 (text, owners, "
                          "content='messages', content_rowid='id', "
                          f"tokenize='unicode61 remove_diacritics 2', {', '.join(fts_options)})")
                c.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('automerge', 0)")
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
            if done % 5120 < chunk:  # about once a second at 5,000 msgs/s, as the engine
                while db.merge_index(16):
                    pass
        while db.merge_index(16):
            pass
        cpu = time.process_time() - cpu0
        db.close()
    return f"{' '.join(fts_options) or 'default'}: {1e6 * cpu / done:.1f} us CPU per indexed row ({done} rows, chunk {chunk})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--fts-option", action="append", default=[], metavar="OPTION=VALUE")
    a = ap.parse_args()
    print(run(a.messages, a.chunk, a.fts_option))


if __name__ == "__main__":
    main()
