"""The ``tidings`` command: serve, token, check-config.

Exit codes: 0 success, 1 runtime failure (cannot start), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from tidings import __version__, log
from tidings.config import Config, ConfigError, load_config

__all__ = ["main"]


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"tidings: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from tidings.server.daemon import StartupError, serve

    config = _load(args.config)
    if config.server.workers > 1 and args.worker is None:
        from tidings.service.workers import supervise

        log.configure(config.server.log_level)
        return supervise(args.config, config.server.workers)
    try:
        trio.run(partial(serve, config, config_path=args.config, worker=args.worker))
    except StartupError as exc:
        log.log("error", "startup_failed", error=str(exc))
        print(f"tidings: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from tidings.auth import Authenticator, load_secret
    from tidings.wire.protocol import MAX_DEVICE_LEN, valid_device, valid_user_id

    config = _load(args.config)
    if not valid_user_id(args.user):
        print(f"tidings: not a valid user id: {args.user!r}", file=sys.stderr)
        return 2
    if args.device is not None and not valid_device(args.device):
        print(f"tidings: --device must be 1-{MAX_DEVICE_LEN} characters of A-Z a-z 0-9 _ . -",
              file=sys.stderr)
        return 2
    if not config.auth.accepts_hs256():
        print(f"tidings: auth.algorithms = {config.auth.algorithms!r} has no \"HS256\": the daemon "
              "accepts only tokens from your identity provider (auth.public_key_file, jwks_file or "
              "jwks_url), so `tidings token` cannot mint one", file=sys.stderr)
        return 2
    try:
        secret = load_secret(config, create=True)
    except OSError as exc:
        print(f"tidings: cannot load the token secret: {exc}", file=sys.stderr)
        return 1
    ttl = args.ttl if args.ttl is not None else config.auth.token_ttl_s
    print(Authenticator("jwt", [secret]).mint(args.user, ttl, device=args.device))
    return 0


def _api_call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> int:
    """Call the daemon's server API (api.listen, key from the same config) and print JSON."""
    import json
    import urllib.error
    import urllib.request

    from tidings.server.api import load_api_key, parse_listen

    config = _load(args.config)
    if not config.api.listen:
        print("tidings: the server API is disabled (api.listen = \"\")", file=sys.stderr)
        return 2
    host, port = parse_listen(config.api.listen)
    try:
        key = load_api_key(config, create=False)
    except OSError as exc:
        print(f"tidings: cannot read the API key: {exc}", file=sys.stderr)
        return 1
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key.decode()}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"tidings: HTTP {exc.code}: {exc.read().decode().strip()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tidings: cannot reach the API at {host}:{port}: {exc}", file=sys.stderr)
        return 1


def cmd_send(args: argparse.Namespace) -> int:
    return _api_call(args, "POST", "/api/send", {"to": args.user, "body": args.text, "from": args.sender})


def cmd_presence(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    return _api_call(args, "GET", "/api/presence?" + urlencode([("user", u) for u in args.users]))


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args.file)
    print(f"{args.file}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="Deliver messages to users over WebSocket.")
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: embedded defaults)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="print an HS256 access token for USER (HS256 in auth.algorithms)")
    p.add_argument("user")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default auth.token_ttl_s)")
    p.add_argument("--device", metavar="NAME", help="the token's device claim (the connection's device)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("send", help="send TEXT to USER through the server API")
    p.add_argument("user")
    p.add_argument("text")
    p.add_argument("--from", dest="sender", default="api", help="sender shown to USER (default: api)")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("presence", help="show whether USERs are online (server API)")
    p.add_argument("users", nargs="+", metavar="USER")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_presence)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
