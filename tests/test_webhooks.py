"""Webhook signing, event bodies and the retry schedule (tidings.webhooks.signing,
tidings.webhooks.events): pure functions, table-driven."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from tidings.store.records import WebhookEvent
from tidings.webhooks.events import RETRY_MAX_S, event_body, retry_delay_s
from tidings.webhooks.signing import sign, verify

SECRET = b"whsec-0123456789abcdef0123456789abcdef"
BODY = b'{"id":"e1","type":"online","ts":1700000000000,"user":"alice"}'


# -- signing ---------------------------------------------------------------------------

# Known vectors, computed with `printf '<t>.<body>' | openssl dgst -sha256 -hmac <secret>`.
@pytest.mark.parametrize("secret, body, t, header", [
    (SECRET, BODY, 1700000000,
     "t=1700000000,v1=fccbd861c74e1e3eb26befae8f5057f48f500efb25391edd13f26d78fbddf23f"),
    (b"k", b"", 0, "t=0,v1=6b4a4b8b3c40f1e8f53a3d36682e5f99f7ad2ac1df1c93dfe336f329167641e7"),
])
def test_signature_known_vectors(secret, body, t, header):
    assert sign(secret, body, t) == header
    assert verify(secret, body, header, now=t)


def test_signature_is_hmac_sha256_of_t_dot_body():
    mac = hmac.new(SECRET, b"42." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, 42) == f"t=42,v1={mac}"


GOOD = sign(SECRET, BODY, 1000)


@pytest.mark.parametrize("secret, body, header, now, ok", [
    (SECRET, BODY, GOOD, 1000, True),
    (SECRET, BODY, GOOD, 1300, True),               # tolerance 300 s: the edge...
    (SECRET, BODY, GOOD, 1301, False),              # ...and one past it
    (SECRET, BODY, GOOD, 700, True),
    (SECRET, BODY, GOOD, 699, False),               # from the future, too far
    (b"another secret", BODY, GOOD, 1000, False),
    (SECRET, BODY + b" ", GOOD, 1000, False),       # body changed by one byte
    (SECRET, BODY, GOOD.replace("t=1000", "t=1001"), 1000, False),
    (SECRET, BODY, GOOD.replace(",", ", ") + ",v1=00", 1000, True),  # spaces; a second v1
    (SECRET, BODY, "", 1000, False),
    (SECRET, BODY, "t=1000", 1000, False),
    (SECRET, BODY, "v1=" + GOOD.rpartition("=")[2], 1000, False),
    (SECRET, BODY, "t=abc," + GOOD.partition(",")[2], 1000, False),
    (SECRET, BODY, "t=1000,t=1000," + GOOD.partition(",")[2], 1000, False),
])
def test_verify(secret, body, header, now, ok):
    assert verify(secret, body, header, now) is ok


# -- bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("event, expect", [
    (WebhookEvent("e1", "online", 1700000000000, "alice"), BODY),
    (WebhookEvent("e2", "offline", 5, "bob"), b'{"id":"e2","type":"offline","ts":5,"user":"bob"}'),
    (WebhookEvent("e3", "undelivered", 6, "bob", "m1", "alice", 9),
     b'{"id":"e3","type":"undelivered","ts":6,"user":"bob","msg_id":"m1","from":"alice",'
     b'"to":"bob","seq":9}'),
])
def test_event_bodies(event, expect):
    assert event_body(event) == expect
    assert list(orjson.loads(expect)) == list(orjson.loads(event_body(event)))  # key order


# -- retries -----------------------------------------------------------------------------

@pytest.mark.parametrize("failures, delay", [
    (1, 1.0), (2, 2.0), (3, 4.0), (8, 128.0), (9, 256.0),
    (10, RETRY_MAX_S),   # 512 would exceed the cap
    (11, RETRY_MAX_S), (1000, RETRY_MAX_S),
])
def test_retry_delay_doubles_up_to_the_cap(failures, delay):
    assert retry_delay_s(failures) == delay


def test_retry_delay_needs_a_failure():
    with pytest.raises(ValueError):
        retry_delay_s(0)
