"""Write a file's dirty pages back to disk in bounded pieces (Linux ``sync_file_range``).

Why (measured, docs/performance.md, eighth session): at 5,000 msgs/s the messages WAL
gets ~50 MB of new frames a second, and the PASSIVE checkpoint's first step, one
``fdatasync`` of the WAL, queued all of it on the disk at once (75-90 ms).  A WAL write on
the event-loop thread that has to read a block first (``ext4_block_write_begin``) then
waited behind that queue: 11-29 ms stalls of a commit, the slowest 1 % of the open
loop.  Written back a piece at a time, the queue never holds more than one piece of this
file, so such a read waits for at most one piece.

This is not a durability barrier (no device cache flush, no metadata): callers still
``fsync``; afterwards that fsync finds little left to write.  Sans-IO (no trio).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["write_back"]

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: the caller's fsync does it all
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


def write_back(path: str, chunk: int) -> int:
    """Write back ``path``'s dirty pages ``chunk`` bytes at a time, from the start to
    its current size: each piece's I/O is submitted and waited for before the next
    (pages that are clean cost a page-cache lookup).  Returns the number of pieces
    (0: no such file, or ``sync_file_range`` unavailable or refused; the caller's fsync
    then writes everything, as without this).  Blocks for the I/O: call it from a
    worker thread."""
    if _sync_file_range is None:
        return 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        pieces = 0
        for offset in range(0, size, chunk):
            if _sync_file_range(fd, offset, chunk, _WAIT_BEFORE | _WRITE | _WAIT_AFTER):
                break  # e.g. a file system that does not support it
            pieces += 1
        return pieces
    finally:
        os.close(fd)
