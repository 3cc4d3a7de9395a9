"""The ``Tidings-Signature`` header: HMAC-SHA256 over ``"<t>.<raw body>"``.  Sans-IO.

``Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``

``t`` is when this attempt was signed (a retry is signed again, with a new ``t``), so a
receiver can refuse old deliveries (a replay) by comparing ``t`` with its clock, and
must verify over the raw bytes it received, before parsing them.  :func:`verify` is what
a Python receiver does (docs/deploy.md shows it in Python and Node without Tidings).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["SIGNATURE_HEADER", "sign", "verify"]

SIGNATURE_HEADER = "Tidings-Signature"


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The header value for ``body`` signed at unix time ``t``."""
    mac = hmac.new(secret, b"%d." % t + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance_s: float = 300.0) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` at a ``t`` within
    ``tolerance_s`` of ``now``.  A malformed header is False, never an exception."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    try:
        (t,) = (int(v) for v in fields.get("t", []))
    except ValueError:
        return False
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))
