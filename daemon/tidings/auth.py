"""Authentication: JWTs verified by PyJWT, or the insecure ``?user=``.  Sans-IO.

``Authenticator.verify(token)`` returns an ``Identity`` or raises ``AuthError`` whose
message is the one-line reason the handshake answers with (HTTP 401).  What verifies:

* **HS256** (when ``auth.algorithms`` has it): our own secrets, newest first.  The secret
  comes from ``auth.secret``, ``auth.secret_file``, or on the embedded default a random
  secret created once at ``<state_dir>/secret`` (mode 0600) and reused, so ``tidings
  token`` and ``tidings serve`` agree.
* **RS256, ES256, EdDSA**: an identity provider's public keys, an immutable ``KeySet``
  built by ``load_pem_key`` (``auth.public_key_file``: one key, ``kid`` not consulted)
  or ``parse_jwks`` (a JWK Set from ``auth.jwks_file`` / ``auth.jwks_url``: keys chosen
  by ``kid``).  ``set_keys`` swaps the whole set.  Fetching a JWKS over the network is
  tidings.service.jwks's job, never this module's.

Algorithm confusion is impossible by construction: the token's ``alg`` must be listed
in ``auth.algorithms`` (so ``none`` never is); an HS256 token is checked against the
secrets only, any other against a public key of exactly that algorithm only (PyJWT is
also told ``algorithms=[alg]``), so "HS256 signed with the public key as the secret"
meets no key that could verify it.

A token whose key is not in the set raises ``UnknownKey`` (an ``AuthError``) at once,
after calling ``on_unknown_key(kid)`` - a synchronous hook that must not block (the JWKS
refresher uses it to schedule a refetch).  Apart from reading key and secret files,
this module does no I/O and never imports trio.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tidings.config import ASYMMETRIC_ALGORITHMS, MIN_SECRET_BYTES, AuthConfig, Config
from tidings.wire.protocol import MAX_DEVICE_LEN, valid_device, valid_user_id

__all__ = [
    "AuthError", "Authenticator", "Identity", "KeyMaterialError", "KeySet", "PublicKey",
    "UnknownKey", "load_keys", "load_pem_key", "load_secret", "parse_jwks", "state_secret",
]

ALGORITHM = "HS256"  # what mint() signs with and the secrets verify
MIN_RSA_BITS = 2048


class AuthError(Exception):
    """A credential was refused: the client's fault, answered with 401 / ``forbidden``."""


class UnknownKey(AuthError):
    """The token names a signing key (``kid``) the current key set does not hold."""

    def __init__(self, reason: str, kid: str | None) -> None:
        super().__init__(reason)
        self.kid = kid


class KeyMaterialError(ValueError):
    """A public key file or JWK Set is unusable: the operator's (or the IdP's) fault."""


@attrs.frozen
class Identity:
    user: str
    exp: int | None  # epoch seconds; None = never expires (insecure mode)
    #: The token's ``rooms`` claim (names or glob patterns); None = config default.
    rooms: tuple[str, ...] | None = None
    #: The token's ``device`` claim (the connection's device name); None = not named.
    device: str | None = None


# -- HS256 secrets ----------------------------------------------------------------------


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


# -- public keys ------------------------------------------------------------------------


@attrs.frozen
class PublicKey:
    kid: str | None
    algorithm: str  # RS256, ES256 or EdDSA: the only algorithm this key verifies
    key: Any = attrs.field(eq=False, repr=False)  # a cryptography public key object
    #: DER SubjectPublicKeyInfo: what equality compares (rotation detection on reload).
    der: bytes = attrs.field(repr=False)


@attrs.frozen
class KeySet:
    """Immutable public keys.  ``by_kid``: a JWK Set (choose by ``kid``); else one PEM key.

    ``skipped`` says which members of a JWK Set were left out and why (for the log).
    """

    keys: tuple[PublicKey, ...] = ()
    by_kid: bool = True
    source: str = ""
    skipped: tuple[str, ...] = ()

    def find(self, kid: str | None, algorithm: str) -> PublicKey:
        """The key that must verify a token with this header; raise AuthError if none."""
        fitting = [k for k in self.keys if k.algorithm == algorithm]
        if not self.by_kid:
            if not fitting:
                raise AuthError(f"no {algorithm} key is configured")
            return fitting[0]
        if kid is None:
            if len(fitting) == 1:
                return fitting[0]
            if not fitting:
                raise UnknownKey(f"token has no 'kid' and no {algorithm} key is known", None)
            raise AuthError(f"token has no 'kid' and {len(fitting)} {algorithm} keys are known")
        for key in self.keys:
            if key.kid == kid:
                if key.algorithm != algorithm:
                    raise AuthError(f"signing key {_short(kid)} is not an {algorithm} key")
                return key
        raise UnknownKey(f"unknown signing key (kid {_short(kid)})", kid)

    def kids(self) -> list[str]:
        return [k.kid if k.kid is not None else "-" for k in self.keys]


EMPTY_KEYS = KeySet()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 66 else text[:63] + "..."


def _public_key(key: Any, algorithms: Iterable[str]) -> tuple[str, Any]:
    """(algorithm, key) for a usable public key; raise KeyMaterialError otherwise."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyMaterialError(f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} needed)")
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ES256"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = "EdDSA"
    elif isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyMaterialError("a private key: give the public key only")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"an EC key on curve {key.curve.name} (ES256 needs P-256)")
    else:
        raise KeyMaterialError(f"unsupported key type {type(key).__name__} "
                               "(RSA, EC P-256 or Ed25519 are)")
    allowed = [a for a in algorithms if a in ASYMMETRIC_ALGORITHMS]
    if algorithm not in allowed:
        raise KeyMaterialError(f"an {algorithm} key, but auth.algorithms has "
                               f"{allowed or 'no asymmetric algorithm'}")
    return algorithm, key


def _der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_pem_key(data: bytes, algorithms: Iterable[str], source: str) -> KeySet:
    """One PEM public key (or the key of a PEM certificate) as a KeySet without ``kid``s."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyMaterialError(f"{source}: not a PEM public key or certificate") from None
    try:
        algorithm, key = _public_key(key, algorithms)
    except KeyMaterialError as exc:
        raise KeyMaterialError(f"{source}: {exc}") from None
    return KeySet((PublicKey(None, algorithm, key, _der(key)),), by_kid=False, source=source)


def parse_jwks(data: bytes | str, algorithms: Iterable[str], source: str) -> KeySet:
    """A JWK Set (RFC 7517) as a KeySet of its usable signing keys.

    Members that cannot be used (``use`` other than ``sig``, an algorithm not in
    ``algorithms``, a symmetric or private or weak key, a duplicate ``kid``) are left
    out and listed in ``skipped``.  Raises KeyMaterialError when the document is not a
    JWK Set or holds no usable key: the caller keeps the keys it had.
    """
    algorithms = list(algorithms)
    try:
        doc = json.loads(data)
    except ValueError:
        raise KeyMaterialError(f"{source}: not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyMaterialError(f"{source}: not a JWK Set (no \"keys\" list)")
    keys: list[PublicKey] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"#{i}: not an object")
            continue
        kid = jwk.get("kid")
        label = f"kid {_short(kid)}" if kid is not None else f"#{i}"
        reason = _unusable(jwk, kid, keys)
        if reason is None:
            try:
                pyjwk = jwt.PyJWK(jwk)
                algorithm, key = _public_key(pyjwk.key, algorithms)
                if pyjwk.algorithm_name != algorithm:  # e.g. "alg": "RS512" on an RSA key
                    raise KeyMaterialError(f"alg {pyjwk.algorithm_name} is not accepted")
            except (jwt.PyJWTError, KeyMaterialError) as exc:
                reason = str(exc)
            else:
                keys.append(PublicKey(kid, algorithm, key, _der(key)))
                continue
        skipped.append(f"{label}: {reason}")
    if not keys:
        detail = "; ".join(skipped) if skipped else "the set is empty"
        raise KeyMaterialError(f"{source}: no usable signing key ({detail})")
    return KeySet(tuple(keys), by_kid=True, source=source, skipped=tuple(skipped))


def _unusable(jwk: dict, kid: Any, keys: list[PublicKey]) -> str | None:
    if kid is not None and not isinstance(kid, str):
        return "kid is not a string"
    if jwk.get("use", "sig") != "sig":
        return f"use {_short(jwk.get('use'))} is not 'sig'"
    if "d" in jwk:
        return "a private key: publish the public key only"
    if jwk.get("kty") == "oct":
        return "a symmetric key (HS256 verifies with auth.secret only)"
    if kid is not None and any(k.kid == kid for k in keys):
        return "duplicate kid"
    return None


def load_keys(config: Config) -> KeySet:
    """The key set of the file sources (``public_key_file``, ``jwks_file``); EMPTY_KEYS
    when there is none or the keys come from ``jwks_url`` (the refresher fetches those).
    Raises KeyMaterialError naming the key and the file."""
    auth = config.auth
    for name, parse in (("public_key_file", load_pem_key), ("jwks_file", parse_jwks)):
        path = getattr(auth, name)
        if not path:
            continue
        source = f"auth.{name} {path}"
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise KeyMaterialError(f"{source}: {exc.strerror or exc}") from None
        return parse(data, auth.algorithms, source)
    return EMPTY_KEYS


# -- the verifier -------------------------------------------------------------------------


class Authenticator:
    """Verifies tokens (any accepted algorithm) and mints HS256 ones.

    ``secrets`` lists accepted HS256 keys, newest first (the first signs); ``keys`` the
    identity provider's public keys.  Each setter swaps one immutable value, so a reload
    never leaves a half-updated verifier.
    """

    def __init__(
        self, mode: str, secrets_: list[bytes], leeway_s: float = 0.0, *,
        algorithms: Iterable[str] = (ALGORITHM,), keys: KeySet = EMPTY_KEYS,
        issuer: str = "", audience: str = "",
    ) -> None:
        self.mode = mode
        self._secrets = list(secrets_)
        self._keys = keys
        self._algorithms = tuple(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        #: Called with the ``kid`` of a token whose key is unknown, before the refusal.
        self.on_unknown_key: Callable[[str | None], None] | None = None

    @classmethod
    def from_config(
        cls, auth: AuthConfig, secrets_: list[bytes], keys: KeySet = EMPTY_KEYS
    ) -> Authenticator:
        new = cls(auth.mode, secrets_, keys=keys)
        new.set_policy(auth)
        return new

    @property
    def keys(self) -> KeySet:
        return self._keys

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self._algorithms

    def set_policy(self, auth: AuthConfig) -> None:
        """Take the accepted algorithms, issuer, audience and leeway from ``auth``."""
        self._algorithms = tuple(auth.algorithms)
        self._issuer = auth.issuer
        self._audience = auth.audience
        self._leeway = auth.leeway_s

    def set_secrets(self, secrets_: list[bytes]) -> None:
        """Replace the accepted HS256 keys (newest first, the first signs): secret rotation.
        Empty when HS256 is not accepted."""
        self._secrets = list(secrets_)

    def set_keys(self, keys: KeySet) -> None:
        """Replace the identity provider's public keys (a new JWKS, a new PEM file)."""
        self._keys = keys

    def mint(self, user: str, ttl_s: float, *, now: float | None = None,
             device: str | None = None) -> str:
        """An HS256 token for ``user`` (with a ``device`` claim when given)."""
        if not valid_user_id(user):
            raise ValueError(f"not a valid user id: {user!r}")
        if device is not None and not valid_device(device):
            raise ValueError(f"not a valid device name: {device!r}")
        if not self._secrets:
            raise ValueError("no HS256 secret: tokens come from the identity provider")
        iat = int(now if now is not None else time.time())
        claims: dict[str, Any] = {"sub": user, "iat": iat, "exp": iat + int(ttl_s)}
        if device is not None:
            claims["device"] = device
        return jwt.encode(claims, self._secrets[0], algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        """Check algorithm, signature, ``exp``, ``sub`` (and for public-key tokens ``iss``
        / ``aud`` when configured); raise AuthError with a one-line reason."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError(f"token algorithm {_short(alg)} is not accepted")
        if alg == ALGORITHM:
            for secret in self._secrets:
                claims = self._decode(token, secret, alg)
                if claims is not None:
                    return _identity(claims)
            raise AuthError("bad token signature")
        try:
            key = self._keys.find(header.get("kid"), alg)
        except UnknownKey as exc:
            if self.on_unknown_key is not None:
                self.on_unknown_key(exc.kid)
            raise
        claims = self._decode(token, key.key, alg)
        if claims is None:
            raise AuthError("bad token signature")
        return _identity(claims)

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any] | None:
        """The verified claims, None for a bad signature; AuthError for anything else."""
        # iss / aud are the identity provider's claims: HS256 tokens (ours) carry neither.
        issuer, audience = ("", "") if alg == ALGORITHM else (self._issuer, self._audience)
        required = ["sub", "exp"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
        try:
            return jwt.decode(
                token, key, algorithms=[alg],
                options={"require": required, "verify_aud": bool(audience)},
                issuer=issuer or None, audience=audience or None, leeway=self._leeway,
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None

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


def _identity(claims: dict[str, Any]) -> Identity:
    user = claims["sub"]
    if not valid_user_id(user):
        raise AuthError("token 'sub' is not a valid user id")
    rooms = claims.get("rooms")
    if rooms is not None and (not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)):
        raise AuthError("token 'rooms' claim must be a list of strings")
    device = claims.get("device")
    if device is not None and not valid_device(device):
        raise AuthError(f"token 'device' claim must be 1-{MAX_DEVICE_LEN} characters of A-Z a-z 0-9 _ . -")
    return Identity(user, int(claims["exp"]), tuple(rooms) if rooms is not None else None, device)
