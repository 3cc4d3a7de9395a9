"""Structured, journald-friendly logging: one logfmt line per event on stderr.

``log(level, event, **fields)`` writes ``ts=... level=info event=listening port=8765``.
Tokens and secrets are never passed here; values are quoted when they contain spaces.
``LogOnce`` keeps a noisy event (a flood of bad frames, a slow consumer storm) to one line
per key and interval, counting what it suppressed, so a hostile client cannot fill the disk.
``recent_warnings()`` returns the last ``RECENT_WARNINGS`` warning and error lines that were
written (for the operator's page); only writing such a line touches that ring buffer.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

__all__ = ["LEVELS", "RECENT_WARNINGS", "LogOnce", "configure", "log", "recent_warnings"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: How many warning/error lines ``recent_warnings`` keeps (the oldest is dropped first).
RECENT_WARNINGS = 50
_threshold = LEVELS["info"]
_stream: TextIO = sys.stderr
_recent: deque[dict[str, Any]] = deque(maxlen=RECENT_WARNINGS)


def configure(level: str, stream: TextIO | None = None) -> None:
    global _threshold, _stream
    _threshold = LEVELS[level]
    if stream is not None:
        _stream = stream


def enabled(level: str) -> bool:
    return LEVELS[level] >= _threshold


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log(level: str, event: str, **fields: Any) -> None:
    if LEVELS[level] < _threshold:
        return
    parts = [f"ts={time.strftime('%Y-%m-%dT%H:%M:%S')}", f"level={level}", f"event={event}"]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
    line = " ".join(parts)
    _stream.write(line + "\n")
    _stream.flush()
    if LEVELS[level] >= LEVELS["warning"]:
        _recent.append({"ts": int(time.time() * 1000), "level": level, "event": event, "line": line})


def recent_warnings() -> list[dict[str, Any]]:
    """The last warning and error lines written, oldest first: ``{"ts": unix ms,
    "level", "event", "line": the logfmt line}``.  Lines below the configured level were
    never written and are not here."""
    return list(_recent)


class LogOnce:
    """Log an event at most once per ``interval`` seconds per key; count the rest."""

    def __init__(self, interval: float = 60.0, clock: Any = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def log(self, level: str, event: str, key: str = "", **fields: Any) -> bool:
        now = self._clock()
        last = self._last.get((event, key))
        if last is not None and now - last[0] < self._interval:
            self._last[(event, key)] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        if len(self._last) > 10_000:  # bounded: forget old keys rather than grow
            self._last.clear()
        self._last[(event, key)] = (now, 0)
        log(level, event, suppressed=suppressed or None, **fields)
        return True
