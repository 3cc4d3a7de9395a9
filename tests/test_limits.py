"""limits.py: the per-connection token bucket, driven by a fake clock (times passed in)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.wire.limits import TokenBucket


def test_starts_full_then_refuses():
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [True, True, True]
    assert b.strikes == 0
    assert b.take(0.0) is False
    assert b.strikes == 1
    assert b.take(0.0) is False
    assert b.strikes == 2


def test_refill_at_rate():
    # binary fractions keep the arithmetic exact
    b = TokenBucket(rate=8.0, burst=3, now=100.0)
    for _ in range(3):
        assert b.take(100.0)
    assert not b.take(100.0625)  # half a token
    assert b.take(100.125)  # one token accumulated (0.5 + 0.5)
    assert not b.take(100.125)
    assert b.take(100.25)


def test_refill_capped_at_burst():
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    for _ in range(3):
        b.take(0.0)
    assert [b.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_strikes_reset_by_an_accepted_frame():
    b = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert b.take(0.0)
    for n in range(1, 6):
        assert not b.take(0.0)
        assert b.strikes == n
    assert b.take(1.0)
    assert b.strikes == 0
    assert not b.take(1.0)
    assert b.strikes == 1


def test_fractional_rate():
    b = TokenBucket(rate=0.5, burst=1, now=0.0)
    assert b.take(0.0)
    assert not b.take(1.0)
    assert b.take(2.0)


def test_burst_from_config_values():
    # the defaults: 100 frames/s, burst 200
    b = TokenBucket(rate=100.0, burst=200, now=5.0)
    assert sum(b.take(5.0) for _ in range(250)) == 200
    assert sum(b.take(6.0) for _ in range(250)) == 100


@pytest.mark.parametrize("burst", [1, 2, 50])
def test_sustained_rate(burst):
    # 1024 frames/s offered for 10 s at 16/s: exact binary arithmetic, so an exact count
    b = TokenBucket(rate=16.0, burst=burst, now=0.0)
    accepted = sum(b.take(i / 1024) for i in range(10 * 1024))
    assert accepted == burst + 159  # floor(16 * 10239 / 1024)


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=0.1, max_value=1000),
    st.integers(min_value=1, max_value=100),
    st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate, burst, gaps):
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    accepted = refused_run = 0
    for gap in gaps:
        now += gap
        ok = b.take(now)
        accepted += ok
        refused_run = 0 if ok else refused_run + 1
        assert b.strikes == refused_run
        assert accepted <= burst + rate * now + 1e-6
