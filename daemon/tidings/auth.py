"""Authentication: HS256 JWTs (PyJWT) with ``sub`` = user id, or the insecure ``?user=``.

``Authenticator.verify(token)`` returns an ``Identity`` or raises ``AuthError`` whose
message is the one-line reason the handshake answers with (HTTP 401).  The secret comes
from ``auth.secret``, ``auth.secret_file``, or on the embedded default a random secret
created once at ``<state_dir>/secret`` (mode 0600) and reused, so ``tidings token`` and
``tidings serve`` agree.  Sans-IO apart from reading/creating that file; never imports trio.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import attrs
import jwt

from tidings.config import MIN_SECRET_BYTES, Config
from tidings.wire.protocol import valid_user_id

__all__ = ["AuthError", "Authenticator", "Identity", "load_secret", "state_secret"]

ALGORITHM = "HS256"


class AuthError(Exception):
    """A credential was refused: the client's fault, answered with 401 / ``forbidden``."""


@attrs.frozen
class Identity:
    user: str
    exp: int | None  # epoch seconds; None = never expires (insecure mode)
    #: The token's ``rooms`` claim (names or glob patterns); None = config default.
    rooms: tuple[str, ...] | None = None


def load_secret(config: Config, *, create: bool) -> bytes:
    """Return the signing secret; with ``create``, make the state-dir secret if missing.

    Raises OSError (with the path) when the secret file cannot be read or created.
    """
    if config.auth.secret:
        return config.auth.secret.encode()
    if config.auth.secret_file:
        secret = Path(config.auth.secret_file).expanduser().read_bytes().strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise OSError(f"{config.auth.secret_file}: secret is shorter than {MIN_SECRET_BYTES} bytes")
        return secret
    return state_secret(config.server.resolved_state_dir() / "secret", create=create)


def state_secret(path: Path, *, create: bool, min_bytes: int = MIN_SECRET_BYTES) -> bytes:
    """Read the random secret kept at ``path`` (the JWT secret, the API key); with
    ``create``, make it once if it is missing: a private temp file linked into place,
    so it appears whole or not at all, and if two processes race, the loser reads the
    winner's.  Raises OSError naming the path (missing, unreadable, too short)."""
    try:
        return _checked(path.read_bytes().strip(), path, min_bytes)
    except FileNotFoundError:
        if not create:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _checked(path.read_bytes().strip(), path, min_bytes)
    finally:
        tmp.unlink()
    return secret


def _checked(secret: bytes, path: Path, min_bytes: int) -> bytes:
    if len(secret) < min_bytes:
        raise OSError(f"{path}: secret is shorter than {min_bytes} bytes")
    return secret


class Authenticator:
    """Verifies and mints tokens.  ``secrets`` lists accepted signing keys, newest first."""

    def __init__(self, mode: str, secrets_: list[bytes], leeway_s: float = 0.0) -> None:
        self.mode = mode
        self._secrets = secrets_
        self._leeway = leeway_s

    def set_secrets(self, secrets_: list[bytes]) -> None:
        """Replace the accepted keys (newest first, the first signs): secret rotation."""
        if not secrets_:
            raise ValueError("at least one secret is required")
        self._secrets = list(secrets_)

    def mint(self, user: str, ttl_s: float, *, now: float | None = None) -> str:
        if not valid_user_id(user):
            raise ValueError(f"not a valid user id: {user!r}")
        iat = int(now if now is not None else time.time())
        claims = {"sub": user, "iat": iat, "exp": iat + int(ttl_s)}
        return jwt.encode(claims, self._secrets[0], algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        """Check signature, ``exp`` and ``sub``; raise AuthError with a one-line reason."""
        last: Exception | None = None
        for key in self._secrets:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    options={"require": ["sub", "exp"]},
                    leeway=self._leeway,
                )
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.InvalidSignatureError as exc:
                last = exc
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(f"token lacks the '{exc.claim}' claim") from None
            except jwt.DecodeError:
                raise AuthError("malformed token") from None
            except jwt.InvalidTokenError as exc:
                raise AuthError(f"invalid token: {exc}") from None
            user = claims["sub"]
            if not valid_user_id(user):
                raise AuthError("token 'sub' is not a valid user id")
            rooms = claims.get("rooms")
            if rooms is not None and (
                not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)
            ):
                raise AuthError("token 'rooms' claim must be a list of strings")
            return Identity(user, int(claims["exp"]), tuple(rooms) if rooms is not None else None)
        assert last is not None
        raise AuthError("bad token signature")

    def authenticate(self, token: str | None, insecure_user: str | None) -> Identity:
        """The handshake's decision: a token when given, else ``?user=`` in insecure mode."""
        if token:
            return self.verify(token)
        if self.mode == "insecure":
            if insecure_user is None:
                raise AuthError("missing token or ?user= (insecure mode)")
            if not valid_user_id(insecure_user):
                raise AuthError("?user= is not a valid user id")
            return Identity(insecure_user, None)
        raise AuthError("missing token (use ?token= or Authorization: Bearer)")
