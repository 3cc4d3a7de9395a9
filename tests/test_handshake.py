"""handshake.py: check_upgrade over a table of requests, allowed origins, accept_response,
http_response."""

from __future__ import annotations

import base64
import hashlib

import attrs
import h11
import pytest

from tidings.wire.handshake import (HttpError, Upgrade, accept_response, check_upgrade, http_response,
                                   origin_allowed)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
GOOD_HEADERS = {
    "host": "example.com",
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": KEY,
}


def request(target: str = "/ws", method: str = "GET", drop: tuple[str, ...] = (), **headers: str) -> h11.Request:
    merged = {**GOOD_HEADERS, **{k.replace("_", "-"): v for k, v in headers.items()}}
    hdrs = [(k, v) for k, v in merged.items() if k not in drop]
    return h11.Request(method=method, target=target, headers=hdrs)


def up(token=None, user=None, since=None, **more) -> dict:
    """The expected Upgrade, as a dict of its fields (defaults for the optional ones)."""
    expected = {"key": KEY.encode(), "token": token, "user": user, "since": since}
    defaults = {"binary": False, "extensions": []}
    for name in attrs.fields_dict(Upgrade):
        if name not in expected:
            expected[name] = more.pop(name, defaults.get(name))
    assert not more, f"Upgrade has no field(s) {sorted(more)}"
    return expected


def fields(upgrade: Upgrade) -> dict:
    return attrs.asdict(upgrade, recurse=False)


# -- accepted ------------------------------------------------------------------------------

ACCEPTED = [
    ("plain", request(), up()),
    ("token_query", request("/ws?token=abc.def.ghi"), up(token="abc.def.ghi")),
    ("token_bearer", request(authorization="Bearer abc.def"), up(token="abc.def")),
    ("token_bearer_case", request(authorization="bearer   abc"), up(token="abc")),
    ("token_query_wins", request("/ws?token=q", authorization="Bearer h"), up(token="q")),
    ("token_query_wins_bad_header", request("/ws?token=q", authorization="Basic xyz"), up(token="q")),
    ("token_percent_encoded", request("/ws?token=a%2Bb%3D"), up(token="a+b=")),
    ("token_empty_is_none", request("/ws?token="), up()),
    ("user", request("/ws?user=alice"), up(user="alice")),
    ("user_blank", request("/ws?user="), up(user="")),
    ("user_and_token", request("/ws?user=alice&token=t"), up(token="t", user="alice")),
    ("since_zero", request("/ws?since=0"), up(since=0)),
    ("since", request("/ws?since=42"), up(since=42)),
    ("since_15_digits", request("/ws?since=999999999999999"), up(since=999999999999999)),
    ("all", request("/ws?token=t&since=7"), up(token="t", since=7)),
    ("other_params_ignored", request("/ws?v=1&x=&since=3"), up(since=3)),
    ("connection_list", request(connection="keep-alive, Upgrade"), up()),
    ("header_values_any_case", request(upgrade="WebSocket", connection="UPGRADE"), up()),
    ("head_method_path_query", request("/ws?"), up()),
    ("device", request("/ws?device=phone"), up(device="phone")),
    ("device_64", request("/ws?device=" + "d" * 64), up(device="d" * 64)),
    ("device_charset", request("/ws?device=A-z_0.9"), up(device="A-z_0.9")),
]


@pytest.mark.parametrize(("req", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted(req, expected):
    assert fields(check_upgrade(req, "/ws")) == expected


def test_custom_path():
    assert fields(check_upgrade(request("/chat/v1?since=1"), "/chat/v1")) == up(since=1)


@pytest.mark.skipif("binary" not in attrs.fields_dict(Upgrade), reason="no ?encoding= support")
@pytest.mark.parametrize(
    ("target", "binary"), [("/ws?encoding=json", False), ("/ws?encoding=msgpack", True), ("/ws?encoding=", False)]
)
def test_encoding(target, binary):
    assert check_upgrade(request(target), "/ws").binary is binary


@pytest.mark.skipif("binary" not in attrs.fields_dict(Upgrade), reason="no ?encoding= support")
@pytest.mark.parametrize(
    ("target", "reason"),
    [("/ws?encoding=xml", "?encoding= must be json or msgpack"),
     ("/ws?encoding=MSGPACK", "?encoding= must be json or msgpack"),
     ("/ws?encoding=json&encoding=json", "?encoding= given more than once")],
)
def test_encoding_refused(target, reason):
    with pytest.raises(HttpError) as info:
        check_upgrade(request(target), "/ws")
    assert (info.value.status, info.value.reason) == (400, reason)


@pytest.mark.skipif("extensions" not in attrs.fields_dict(Upgrade), reason="no extension support")
def test_extension_offers_collected():
    req = request(sec_websocket_extensions="permessage-deflate; client_max_window_bits, x-foo")
    assert check_upgrade(req, "/ws").extensions == ["permessage-deflate; client_max_window_bits", "x-foo"]


# -- refused --------------------------------------------------------------------------------

SINCE_400 = "?since= must be a non-negative integer"
DEVICE_400 = "?device= must be 1-64 characters of A-Z a-z 0-9 _ . -"
NOT_WS = "this endpoint speaks WebSocket only"
REFUSED = [
    # (id, request, status, reason, headers)
    ("wrong_path", request("/other"), 404, "no WebSocket endpoint at /other; use /ws", []),
    ("root_path", request("/"), 404, "no WebSocket endpoint at /; use /ws", []),
    ("trailing_slash", request("/ws/"), 404, "no WebSocket endpoint at /ws/; use /ws", []),
    ("prefix_path", request("/wsx?token=a"), 404, "no WebSocket endpoint at /wsx; use /ws", []),
    ("long_path_truncated", request("/" + "p" * 300), 404, f"no WebSocket endpoint at /{'p' * 99}; use /ws", []),
    ("wrong_path_and_method", request("/other", method="POST"), 404, "no WebSocket endpoint at /other; use /ws", []),
    ("post", request(method="POST"), 405, "the WebSocket endpoint takes GET", [(b"allow", b"GET")]),
    ("head", request(method="HEAD"), 405, "the WebSocket endpoint takes GET", [(b"allow", b"GET")]),
    ("put", request(method="PUT"), 405, "the WebSocket endpoint takes GET", [(b"allow", b"GET")]),
    ("no_upgrade", request(drop=("upgrade",)), 426, NOT_WS, [(b"upgrade", b"websocket")]),
    ("no_connection", request(drop=("connection",)), 426, NOT_WS, [(b"upgrade", b"websocket")]),
    ("plain_get", request(drop=("upgrade", "connection", "sec-websocket-version", "sec-websocket-key")),
     426, NOT_WS, [(b"upgrade", b"websocket")]),
    ("upgrade_h2c", request(upgrade="h2c"), 426, NOT_WS, [(b"upgrade", b"websocket")]),
    ("connection_keepalive", request(connection="keep-alive"), 426, NOT_WS, [(b"upgrade", b"websocket")]),
    ("no_version", request(drop=("sec-websocket-version",)), 426, "WebSocket version 13 required",
     [(b"sec-websocket-version", b"13")]),
    ("version_8", request(sec_websocket_version="8"), 426, "WebSocket version 13 required",
     [(b"sec-websocket-version", b"13")]),
    ("version_14", request(sec_websocket_version="14"), 426, "WebSocket version 13 required",
     [(b"sec-websocket-version", b"13")]),
    ("no_key", request(drop=("sec-websocket-key",)), 400, "missing Sec-WebSocket-Key", []),
    ("empty_key", request(sec_websocket_key=""), 400, "missing Sec-WebSocket-Key", []),
    ("bad_scheme", request(authorization="Basic YWxpY2U6cHc="), 401,
     "Authorization header must be 'Bearer <token>'", []),
    ("bearer_no_token", request(authorization="Bearer"), 401, "Authorization header must be 'Bearer <token>'", []),
    ("bearer_tab", request(authorization="Bearer\tabc"), 401, "Authorization header must be 'Bearer <token>'", []),
    ("token_only_header", request(authorization="abc.def.ghi"), 401,
     "Authorization header must be 'Bearer <token>'", []),
    ("since_negative", request("/ws?since=-1"), 400, SINCE_400, []),
    ("since_word", request("/ws?since=abc"), 400, SINCE_400, []),
    ("since_empty", request("/ws?since="), 400, SINCE_400, []),
    ("since_float", request("/ws?since=1.5"), 400, SINCE_400, []),
    ("since_plus", request("/ws?since=%2B5"), 400, SINCE_400, []),
    ("since_space", request("/ws?since=+5"), 400, SINCE_400, []),
    ("since_16_digits", request("/ws?since=1000000000000000"), 400, SINCE_400, []),
    ("since_hex", request("/ws?since=0x10"), 400, SINCE_400, []),
    ("dup_token", request("/ws?token=a&token=b"), 400, "?token= given more than once", []),
    ("dup_token_same", request("/ws?token=a&token=a"), 400, "?token= given more than once", []),
    ("dup_user", request("/ws?user=a&user=b"), 400, "?user= given more than once", []),
    ("dup_since", request("/ws?since=1&since=2"), 400, "?since= given more than once", []),
    ("since_superscript", request("/ws?since=%C2%B2"), 400, SINCE_400, []),
    ("since_fullwidth", request("/ws?since=%EF%BC%95"), 400, SINCE_400, []),
    ("device_65", request("/ws?device=" + "d" * 65), 400, DEVICE_400, []),
    ("device_empty", request("/ws?device="), 400, DEVICE_400, []),
    ("device_space", request("/ws?device=my+phone"), 400, DEVICE_400, []),
    ("device_slash", request("/ws?device=a%2Fb"), 400, DEVICE_400, []),
    ("device_unicode", request("/ws?device=%C3%A9"), 400, DEVICE_400, []),
    ("dup_device", request("/ws?device=a&device=b"), 400, "?device= given more than once", []),
    ("too_many_query_fields", request("/ws?" + "&".join(f"p{i}=1" for i in range(21))), 400,
     "too many query parameters", []),
]
REFUSED = [r if hasattr(r, "marks") else pytest.param(*r, id=r[0]) for r in REFUSED]


@pytest.mark.parametrize(("name", "req", "status", "reason", "headers"), REFUSED)
def test_refused(name, req, status, reason, headers):
    with pytest.raises(HttpError) as info:
        check_upgrade(req, "/ws")
    err = info.value
    assert (err.status, err.reason, err.headers) == (status, reason, headers)
    assert str(err) == reason


def test_twenty_query_fields_are_fine():
    req = request("/ws?" + "&".join(f"p{i}=1" for i in range(19)) + "&since=4")
    assert fields(check_upgrade(req, "/ws")) == up(since=4)


# -- allowed origins --------------------------------------------------------------------------

APP = ["https://app.example.com", "https://*.example.org", "http://localhost:*", "null"]
ORIGINS = [
    # (pattern list, Origin, allowed)
    ([], "https://evil.example", True),  # [] = any
    (APP, "https://app.example.com", True),
    (APP, "HTTPS://APP.Example.COM", True),  # host names are case-insensitive
    (APP, "https://app.example.com:443", False),  # an explicit port is another origin
    (APP, "http://app.example.com", False),  # and so is another scheme
    (APP, "https://app.example.com.evil.net", False),
    (APP, "https://evilapp.example.com", False),
    (APP, "https://a.example.org", True),
    (APP, "https://a.b.example.org", True),  # * spans dots, like a shell glob
    (APP, "https://example.org", False),  # *. needs a subdomain
    (APP, "https://evil-example.org", False),
    (APP, "http://localhost:5173", True),
    (APP, "http://localhost", False),
    (APP, "null", True),
    (APP, "", False),
    (["*"], "anything at all", True),
    (["https://[ab].example.com"], "https://b.example.com", True),  # glob classes
    (["https://[ab].example.com"], "https://c.example.com", False),
]


@pytest.mark.parametrize(("patterns", "origin", "allowed"), ORIGINS)
def test_origin_allowed(patterns, origin, allowed):
    assert origin_allowed(origin, patterns) is allowed
    req = request("/ws?token=t", origin=origin)
    if allowed:
        assert check_upgrade(req, "/ws", patterns).token == "t"
    else:
        with pytest.raises(HttpError) as info:
            check_upgrade(req, "/ws", patterns)
        assert (info.value.status, info.value.reason, info.value.headers) == (403, f"origin not allowed: {origin}", [])


def test_no_origin_header_is_never_refused():
    assert check_upgrade(request("/ws?token=t"), "/ws", ["https://app.example.com"]).token == "t"


def test_every_origin_header_must_match():
    headers = [(k, v) for k, v in GOOD_HEADERS.items()]
    for origins in (["https://app.example.com", "https://evil.example"], ["https://evil.example", "https://app.example.com"]):
        req = h11.Request(method="GET", target="/ws", headers=headers + [("origin", o) for o in origins])
        with pytest.raises(HttpError) as info:
            check_upgrade(req, "/ws", APP)
        assert (info.value.status, info.value.reason) == (403, "origin not allowed: https://evil.example")


def test_origin_is_checked_after_the_path_and_before_the_credentials():
    evil = {"origin": "https://evil.example"}
    with pytest.raises(HttpError) as info:  # another path: 404, the demo page still answers
        check_upgrade(request("/", **evil), "/ws", APP)
    assert info.value.status == 404
    with pytest.raises(HttpError) as info:  # a bad Authorization header would be 401
        check_upgrade(request("/ws?since=x", authorization="Basic x", **evil), "/ws", APP)
    assert info.value.status == 403


def test_long_origin_is_cut_in_the_reason():
    origin = "https://" + "a" * 300 + ".example"
    with pytest.raises(HttpError) as info:
        check_upgrade(request(origin=origin), "/ws", APP)
    assert info.value.reason == "origin not allowed: " + origin[:100]


# -- responses -------------------------------------------------------------------------------


def test_accept_response_rfc6455_example():
    out = accept_response(KEY.encode())
    assert out == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


@pytest.mark.parametrize("key", [b"x3JJHMbDL1EzLkh9GBhXDw==", b"AQIDBAUGBwgJCgsMDQ4PEC==", b"abc"])
def test_accept_response_matches_rfc_formula(key):
    expected = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert b"\r\nSec-WebSocket-Accept: " + expected + b"\r\n\r\n" in accept_response(key)


def test_accept_response_parses_as_http_101():
    client = h11.Connection(h11.CLIENT)
    client.send(request())
    client.receive_data(accept_response(KEY.encode()))
    event = client.next_event()
    assert isinstance(event, h11.InformationalResponse)
    assert event.status_code == 101
    assert dict(event.headers)[b"sec-websocket-accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("status", "reason_phrase"),
    [(400, b"Bad Request"), (401, b"Unauthorized"), (404, b"Not Found"), (405, b"Method Not Allowed"),
     (408, b"Request Timeout"), (426, b"Upgrade Required"), (429, b"Too Many Requests"),
     (503, b"Service Unavailable"), (599, b"Status")],
)
def test_http_response(status, reason_phrase):
    body = b"token expired\n"
    out = http_response(status, body, headers=[(b"allow", b"GET")])
    assert out == (
        b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase)
        + b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 14\r\n"
        b"Connection: close\r\n"
        b"allow: GET\r\n\r\n"
        + body
    )
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/ws", headers=[("host", "x")]))
    client.receive_data(out)
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == status
    data = client.next_event()
    assert isinstance(data, h11.Data) and data.data == body
