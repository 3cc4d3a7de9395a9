"""A token bucket for inbound frames per connection.  Sans-IO: the caller passes the time."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full.

    ``take(now)`` spends one token and returns True, or returns False when empty.
    ``strikes`` counts consecutive refusals (reset by an accepted frame), so the caller
    can close a connection that keeps flooding after being told.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate", "strikes")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now
        self.strikes = 0

    def take(self, now: float) -> bool:
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.strikes = 0
            return True
        self._tokens = tokens
        self.strikes += 1
        return False
