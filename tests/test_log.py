"""log.py: logfmt lines, quoting, levels, and LogOnce's suppression counting (fake clock)."""

from __future__ import annotations

import io
import re

import pytest

from tidings import log

TS = re.compile(r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")


@pytest.fixture
def out(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "_stream", buf)
    monkeypatch.setattr(log, "_threshold", log.LEVELS["info"])
    return buf


def lines(buf: io.StringIO) -> list[str]:
    """The lines written, without their ``ts=...`` prefix (checked here)."""
    result = []
    for line in buf.getvalue().splitlines():
        assert TS.match(line), line
        result.append(TS.sub("", line))
    return result


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_log_line_format(out):
    log.log("info", "listening", url="ws://127.0.0.1:1/ws", host="127.0.0.1", port=8765)
    assert lines(out) == ["level=info event=listening url=ws://127.0.0.1:1/ws host=127.0.0.1 port=8765"]


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("tab\there", '"tab\there"'),
        ("line\nbreak", r'"line\nbreak"'),
        ('back\\slash "q"', r'"back\\slash \"q\""'),
        ("back\\slash", "back\\slash"),  # nothing to quote: left as is
        (42, "42"),
        (1.5, "1.5"),
        (True, "True"),
        ("ünïcode", "ünïcode"),
    ],
)
def test_quoting(out, value, rendered):
    log.log("info", "e", v=value)
    assert lines(out) == [f"level=info event=e v={rendered}"]


def test_none_fields_left_out(out):
    log.log("warning", "e", a=None, b=1, c=None)
    assert lines(out) == ["level=warning event=e b=1"]


def test_levels(out):
    log.log("debug", "hidden")
    log.log("info", "shown")
    log.configure("error", out)
    log.log("warning", "hidden2")
    log.log("error", "shown2")
    assert log.enabled("error") and not log.enabled("warning")
    log.configure("debug")
    log.log("debug", "shown3")
    assert lines(out) == ["level=info event=shown", "level=error event=shown2", "level=debug event=shown3"]


def test_log_once_suppresses_within_interval_and_counts(out):
    clock = FakeClock()
    once = log.LogOnce(interval=60.0, clock=clock)
    assert once.log("info", "client_error", key="bad_request", user="alice") is True
    for _ in range(3):
        clock.t += 10
        assert once.log("info", "client_error", key="bad_request", user="alice") is False
    clock.t += 29.9  # 59.9 s after the first: still suppressed
    assert once.log("info", "client_error", key="bad_request", user="alice") is False
    assert lines(out) == ["level=info event=client_error user=alice"]
    clock.t += 0.1  # 60 s: reported, with the count of what was suppressed
    assert once.log("info", "client_error", key="bad_request", user="bob") is True
    assert lines(out)[1] == "level=info event=client_error suppressed=4 user=bob"
    clock.t += 60  # nothing suppressed in between: no suppressed= field
    assert once.log("info", "client_error", key="bad_request", user="carol") is True
    assert lines(out)[2] == "level=info event=client_error user=carol"


def test_log_once_keys_and_events_are_independent(out):
    clock = FakeClock()
    once = log.LogOnce(interval=60.0, clock=clock)
    assert once.log("info", "e", key="a")
    assert once.log("info", "e", key="b")
    assert once.log("info", "other", key="a")
    assert not once.log("info", "e", key="a")
    assert not once.log("info", "e", key="b")
    assert not once.log("info", "e", key="b")
    clock.t += 60
    assert once.log("info", "e", key="a")
    assert once.log("info", "e", key="b")
    assert lines(out) == [
        "level=info event=e", "level=info event=e", "level=info event=other",
        "level=info event=e suppressed=1", "level=info event=e suppressed=2",
    ]


def test_log_once_quotes_fields(out):
    once = log.LogOnce(interval=60.0, clock=FakeClock())
    once.log("info", "handshake_refused", key="401", status=401, reason="token expired")
    assert lines(out) == ['level=info event=handshake_refused status=401 reason="token expired"']


def test_log_once_below_threshold_still_rate_limits(out):
    clock = FakeClock()
    once = log.LogOnce(interval=1.0, clock=clock)
    assert once.log("debug", "e") is True  # decided, though not written at level info
    assert once.log("debug", "e") is False
    assert lines(out) == []
