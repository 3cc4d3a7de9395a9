"""auth.py: mint/verify, every refusal reason, insecure mode, the secret file, `tidings token`,
and identity providers: RS256/ES256/EdDSA with PEM keys and JWK Sets, algorithm confusion."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from functools import cache

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tidings.auth import (AuthError, Authenticator, Identity, KeyMaterialError, KeySet, UnknownKey,
                          load_keys, load_pem_key, load_secret, parse_jwks)
from tidings.config import structure_config

SECRET = b"k" * 32
OTHER = b"o" * 32


DEVICE_CLAIM = "token 'device' claim must be 1-64 characters of A-Z a-z 0-9 _ . -"


def auth(mode: str = "jwt", *secrets: bytes) -> Authenticator:
    return Authenticator(mode, list(secrets) or [SECRET])


def token(claims: dict, key: bytes = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def future(s: int = 600) -> int:
    return int(time.time()) + s


# -- mint / verify ------------------------------------------------------------------------


def test_mint_verify_round_trip():
    a = auth()
    now = int(time.time())
    t = a.mint("alice", 600, now=now)
    assert a.verify(t) == Identity("alice", now + 600)
    claims = jwt.decode(t, SECRET, algorithms=["HS256"])
    assert claims == {"sub": "alice", "iat": now, "exp": now + 600}
    assert jwt.get_unverified_header(t)["alg"] == "HS256"


def test_the_device_claim_names_the_connection_device():
    a = auth()
    exp = future()
    assert a.verify(token({"sub": "alice", "exp": exp, "device": "d" * 64})) == Identity(
        "alice", exp, None, "d" * 64)
    assert a.verify(token({"sub": "alice", "exp": exp, "device": "A-z_0.9"})).device == "A-z_0.9"
    assert a.verify(token({"sub": "alice", "exp": exp})).device is None


def test_mint_refuses_bad_user():
    with pytest.raises(ValueError, match="not a valid user id: ''"):
        auth().mint("", 60)
    with pytest.raises(ValueError):
        auth().mint("a\nb", 60)


def test_mint_truncates_float_ttl():
    t = auth().mint("alice", 90.9, now=1000.7)
    claims = jwt.decode(t, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (claims["iat"], claims["exp"]) == (1000, 1090)


def test_verify_any_listed_secret():
    # rotation: the newest key signs, the older one still verifies
    t_old = auth("jwt", OTHER).mint("alice", 60)
    t_new = auth("jwt", SECRET).mint("bob", 60)
    a = Authenticator("jwt", [SECRET, OTHER])
    assert a.verify(t_old).user == "alice"
    assert a.verify(t_new).user == "bob"
    assert jwt.decode(a.mint("carol", 60), SECRET, algorithms=["HS256"])["sub"] == "carol"


REFUSALS = [
    ("expired", lambda: token({"sub": "alice", "exp": int(time.time()) - 10}), "token expired"),
    ("expired_minted", lambda: auth().mint("alice", 60, now=time.time() - 3600), "token expired"),
    ("bad_signature", lambda: token({"sub": "alice", "exp": future()}, OTHER), "bad token signature"),
    ("tampered", lambda: _tamper(auth().mint("alice", 60)), "bad token signature"),
    ("malformed_empty", lambda: "", "malformed token"),
    ("malformed_word", lambda: "abc", "malformed token"),
    ("malformed_dots", lambda: "a.b.c", "malformed token"),
    ("malformed_two_parts", lambda: "a.b", "malformed token"),
    ("exp_not_number", lambda: token({"sub": "alice", "exp": "soon"}), "malformed token"),
    ("missing_sub", lambda: token({"exp": future()}), "token lacks the 'sub' claim"),
    ("missing_exp", lambda: token({"sub": "alice"}), "token lacks the 'exp' claim"),
    ("missing_both", lambda: token({"iat": 1}), "token lacks the 'sub' claim"),
    ("sub_int", lambda: token({"sub": 5, "exp": future()}), "invalid token: Subject must be a string"),
    ("sub_list", lambda: token({"sub": ["a"], "exp": future()}), "invalid token: Subject must be a string"),
    ("sub_empty", lambda: token({"sub": "", "exp": future()}), "token 'sub' is not a valid user id"),
    ("sub_newline", lambda: token({"sub": "a\nb", "exp": future()}), "token 'sub' is not a valid user id"),
    ("sub_too_long", lambda: token({"sub": "a" * 129, "exp": future()}), "token 'sub' is not a valid user id"),
    ("not_yet_valid", lambda: token({"sub": "alice", "exp": future(), "nbf": future(300)}),
     "invalid token: The token is not yet valid (nbf)"),
    ("alg_none", lambda: jwt.encode({"sub": "alice", "exp": future()}, None, algorithm="none"),
     "token algorithm 'none' is not accepted"),
    ("alg_hs512", lambda: token({"sub": "alice", "exp": future()}, b"k" * 64, "HS512"),
     "token algorithm 'HS512' is not accepted"),
    ("alg_missing", lambda: _with_header(token({"sub": "alice", "exp": future()}), {"typ": "JWT"}),
     "token algorithm None is not accepted"),
    ("alg_not_a_string", lambda: _with_header(token({"sub": "alice", "exp": future()}), {"alg": ["HS256"]}),
     "token algorithm ['HS256'] is not accepted"),
    ("header_not_json", lambda: "bm90IGpzb24." + token({"sub": "a", "exp": future()}).split(".", 1)[1],
     "malformed token"),
    ("kid_not_a_string", lambda: _with_header(token({"sub": "alice", "exp": future()}), {"alg": "HS256", "kid": 7}),
     "invalid token: Key ID header parameter must be a string"),
    ("device_65", lambda: token({"sub": "alice", "exp": future(), "device": "d" * 65}), DEVICE_CLAIM),
    ("device_empty", lambda: token({"sub": "alice", "exp": future(), "device": ""}), DEVICE_CLAIM),
    ("device_slash", lambda: token({"sub": "alice", "exp": future(), "device": "a/b"}), DEVICE_CLAIM),
    ("device_number", lambda: token({"sub": "alice", "exp": future(), "device": 7}), DEVICE_CLAIM),
]


def _with_header(t: str, header: dict) -> str:
    _, payload, sig = t.split(".")
    return f"{jwt.utils.base64url_encode(json.dumps(header).encode()).decode()}.{payload}.{sig}"


def _tamper(t: str) -> str:
    head, payload, sig = t.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"mallory","iat":1,"exp":9999999999}').decode()
    return f"{head}.{forged}.{sig}"


@pytest.mark.parametrize(("make", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_verify_refusals(make, reason):
    with pytest.raises(AuthError) as info:
        auth().verify(make())
    assert str(info.value) == reason
    with pytest.raises(AuthError) as info:  # the handshake's entry point says the same
        auth().authenticate(make() or "x", None)
    assert str(info.value) == (reason if make() else "malformed token")


# -- authenticate: jwt vs insecure ----------------------------------------------------------


def test_jwt_mode_rejects_user_param():
    with pytest.raises(AuthError) as info:
        auth("jwt").authenticate(None, "alice")
    assert str(info.value) == "missing token (use ?token= or Authorization: Bearer)"
    with pytest.raises(AuthError) as info:
        auth("jwt").authenticate(None, None)
    assert str(info.value) == "missing token (use ?token= or Authorization: Bearer)"
    with pytest.raises(AuthError):
        auth("jwt").authenticate("", "alice")


def test_jwt_mode_token_wins_over_user():
    a = auth("jwt")
    assert a.authenticate(a.mint("bob", 60), "alice").user == "bob"


def test_insecure_mode_with_user():
    assert auth("insecure").authenticate(None, "alice") == Identity("alice", None)
    assert auth("insecure").authenticate("", "alice") == Identity("alice", None)


@pytest.mark.parametrize(
    ("user", "reason"),
    [(None, "missing token or ?user= (insecure mode)"),
     ("", "?user= is not a valid user id"),
     ("a" * 129, "?user= is not a valid user id"),
     ("a\x00", "?user= is not a valid user id")],
)
def test_insecure_mode_without_valid_user(user, reason):
    with pytest.raises(AuthError) as info:
        auth("insecure").authenticate(None, user)
    assert str(info.value) == reason


def test_insecure_mode_still_verifies_tokens():
    a = auth("insecure")
    assert a.authenticate(a.mint("bob", 60), "alice").user == "bob"
    with pytest.raises(AuthError, match="^bad token signature$"):
        a.authenticate(auth("jwt", OTHER).mint("bob", 60), "alice")


# -- load_secret --------------------------------------------------------------------------


def config_for(tmp_path, **auth_keys):
    return structure_config({"server": {"state_dir": str(tmp_path / "state")}, "auth": auth_keys})


def test_load_secret_creates_0600_once_and_reuses(tmp_path):
    cfg = config_for(tmp_path)
    path = tmp_path / "state" / "secret"
    with pytest.raises(FileNotFoundError):
        load_secret(cfg, create=False)
    assert not path.exists()
    first = load_secret(cfg, create=True)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert path.read_bytes() == first + b"\n"
    mtime = path.stat().st_mtime_ns
    assert load_secret(cfg, create=True) == first
    assert load_secret(cfg, create=False) == first
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    # and two state dirs get two different secrets
    assert load_secret(config_for(tmp_path / "other"), create=True) != first


def test_load_secret_from_config(tmp_path):
    cfg = config_for(tmp_path, secret="z" * 40)
    assert load_secret(cfg, create=True) == b"z" * 40
    assert not (tmp_path / "state").exists()  # nothing created


def test_load_secret_file(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_bytes(b"  " + b"f" * 32 + b"\n\n")
    assert load_secret(config_for(tmp_path, secret_file=str(f)), create=True) == b"f" * 32
    assert not (tmp_path / "state").exists()


def test_load_secret_file_too_short(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_bytes(b"f" * 31 + b"\n")  # 32 bytes with the newline, 31 after strip
    with pytest.raises(OSError) as info:
        load_secret(config_for(tmp_path, secret_file=str(f)), create=True)
    assert str(info.value) == f"{f}: secret is shorter than 32 bytes"


def test_load_secret_file_missing(tmp_path):
    f = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        load_secret(config_for(tmp_path, secret_file=str(f)), create=True)
    assert info.value.filename == str(f)


def test_load_secret_refuses_empty_state_secret(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "secret").write_bytes(b"")
    with pytest.raises(OSError, match="shorter than 32 bytes"):
        load_secret(config_for(tmp_path), create=True)


# -- tidings token --------------------------------------------------------------------------


def run_token(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tidings", "token", *args], capture_output=True, text=True, timeout=60
    )


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "tidings.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n{extra}')
    return str(path)


def test_token_command_with_generated_secret(tmp_path):
    cfg_path = write_config(tmp_path)
    r = run_token("alice", "--config", cfg_path, "--ttl", "5")
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert r.stdout == tok + "\n"
    secret_path = tmp_path / "state" / "secret"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    secret = load_secret(config_for(tmp_path), create=False)
    claims = jwt.decode(tok, secret, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 5
    assert abs(claims["iat"] - time.time()) < 30
    assert Authenticator("jwt", [secret]).verify(tok) == Identity("alice", claims["exp"])
    # a second run reuses the same secret
    r2 = run_token("bob", "--config", cfg_path)
    assert r2.returncode == 0, r2.stderr
    assert Authenticator("jwt", [secret]).verify(r2.stdout.strip()).user == "bob"


def test_token_command_with_a_device(tmp_path):
    cfg_path = write_config(tmp_path, f'[auth]\nsecret = "{"q" * 32}"\n')
    r = run_token("alice", "--config", cfg_path, "--device", "phone")
    assert r.returncode == 0, r.stderr
    assert Authenticator("jwt", [b"q" * 32]).verify(r.stdout.strip()).device == "phone"
    r = run_token("alice", "--config", cfg_path, "--device", "my phone")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "tidings: --device must be 1-64 characters of A-Z a-z 0-9 _ . -\n"


def test_token_command_default_ttl_from_config(tmp_path):
    cfg_path = write_config(tmp_path, f'[auth]\nsecret = "{"q" * 32}"\ntoken_ttl_s = 120\n')
    r = run_token("alice", "--config", cfg_path)
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), b"q" * 32, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 120
    assert not (tmp_path / "state" / "secret").exists()  # the configured secret was used


def test_token_command_bad_user(tmp_path):
    r = run_token("a\tb", "--config", write_config(tmp_path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == "tidings: not a valid user id: 'a\\tb'\n"


def test_token_command_bad_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[auth]\ntoken_ttl_s = true\n")
    r = run_token("alice", "--config", str(path))
    assert r.returncode == 2
    assert r.stderr == "tidings: expected int, got bool True @ config.auth.token_ttl_s\n"


def test_token_command_short_secret_file(tmp_path):
    f = tmp_path / "s"
    f.write_bytes(b"short\n")
    r = run_token("alice", "--config", write_config(tmp_path, f'[auth]\nsecret_file = "{f}"\n'))
    assert r.returncode == 1
    assert r.stderr == f"tidings: cannot load the token secret: {f}: secret is shorter than 32 bytes\n"


def test_secret_file_is_private_even_with_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        load_secret(config_for(tmp_path), create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state" / "secret").stat().st_mode) == 0o600


# -- identity providers: RS256 / ES256 / EdDSA with public keys --------------------------
# Keys are made once per module; tokens are built per case (lambdas), so every row of a
# table is independent.

ISS, AUD = "https://idp.example", "tidings"
ALL = ["RS256", "ES256", "EdDSA"]


@cache
def private(name: str):
    """Named test keys: rsa-a, rsa-b, rsa-other (2048 bits), rsa-2047, ec-a, ec-384, ed-a."""
    if name.startswith("rsa"):
        bits = int(name.split("-")[1]) if name[4:].isdigit() else 2048
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if name == "ec-384":
        return ec.generate_private_key(ec.SECP384R1())
    if name.startswith("ec"):
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def jwk(name: str, kid: str | None = None, **extra) -> dict:
    pub = private(name).public_key()
    algo = {"rsa": jwt.algorithms.RSAAlgorithm, "ec-": jwt.algorithms.ECAlgorithm,
            "ed-": jwt.algorithms.OKPAlgorithm}[name[:3]]
    out = algo.to_jwk(pub, as_dict=True)
    if kid is not None:
        out["kid"] = kid
    return {**out, **extra}


def jwks_doc(*members: dict) -> bytes:
    return json.dumps({"keys": list(members)}).encode()


def pem(name: str) -> bytes:
    return private(name).public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def signed(name: str, alg: str, kid: str | None = "<same>", **claims) -> str:
    """A token signed by key ``name``; ``kid`` defaults to the key's name."""
    body = {"sub": "alice", "exp": future(), "iss": ISS, "aud": AUD, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": name if kid == "<same>" else kid} if kid is not None else None
    return jwt.encode(body, private(name), algorithm=alg, headers=headers)


def hs256_with(secret: bytes, **claims) -> str:
    """HS256 by hand (PyJWT refuses to use a PEM as an HMAC secret): the confusion attack."""
    b64 = lambda b: jwt.utils.base64url_encode(b).decode()  # noqa: E731
    body = {"sub": "alice", "exp": future(), "iss": ISS, "aud": AUD, **claims}
    head = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(body).encode())}"
    return f"{head}.{b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


def idp_jwks() -> KeySet:
    return parse_jwks(jwks_doc(jwk("rsa-a", "rsa-a"), jwk("rsa-b", "rsa-b"), jwk("ec-a", "ec-a"),
                               jwk("ed-a", "ed-a")), ALL, "test")


def idp(algorithms=tuple(ALL), keys=None, issuer=ISS, audience=AUD, secrets_=(), leeway_s=0.0) -> Authenticator:
    a = Authenticator("jwt", list(secrets_), leeway_s, algorithms=algorithms,
                      keys=idp_jwks() if keys is None else keys, issuer=issuer, audience=audience)
    a.unknown = []  # what on_unknown_key was told
    a.on_unknown_key = a.unknown.append
    return a


GOOD = [
    ("rs256", lambda: signed("rsa-a", "RS256"), {}),
    ("rs256_second_key", lambda: signed("rsa-b", "RS256"), {}),
    ("es256", lambda: signed("ec-a", "ES256"), {}),
    ("eddsa", lambda: signed("ed-a", "EdDSA"), {}),
    ("aud_list_with_ours", lambda: signed("rsa-a", "RS256", aud=["other", AUD]), {}),
    ("no_kid_one_key_of_the_alg", lambda: signed("ec-a", "ES256", kid=None), {}),
    ("aud_unchecked_when_unset", lambda: signed("rsa-a", "RS256", aud="whoever"), {"audience": ""}),
    ("iss_unchecked_when_unset", lambda: signed("rsa-a", "RS256", iss=None), {"issuer": ""}),
    ("expired_within_leeway", lambda: signed("rsa-a", "RS256", exp=int(time.time()) - 30), {"leeway_s": 120}),
    ("hs256_alongside", lambda: token({"sub": "alice", "exp": future()}),
     {"algorithms": ("HS256", "RS256"), "secrets_": (SECRET,)}),
]


@pytest.mark.parametrize(("make", "policy"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_idp_tokens_accepted(make, policy):
    a = idp(**policy)
    identity = a.verify(make())
    assert identity.user == "alice" and identity.exp > time.time() - 60
    assert a.unknown == []


IDP_REFUSALS = [
    # (id, token, policy, reason, kids told to on_unknown_key)
    ("unknown_kid", lambda: signed("rsa-other", "RS256", kid="nope"), {}, "unknown signing key (kid 'nope')", ["nope"]),
    ("long_kid_is_shortened", lambda: signed("rsa-other", "RS256", kid="k" * 200), {},
     "unknown signing key (kid '" + "k" * 62 + "...)", ["k" * 200]),
    ("known_kid_other_key", lambda: signed("rsa-other", "RS256", kid="rsa-a"), {}, "bad token signature", []),
    ("kid_of_another_alg", lambda: signed("ec-a", "ES256", kid="rsa-a"), {}, "signing key 'rsa-a' is not an ES256 key", []),
    ("no_kid_two_keys", lambda: signed("rsa-a", "RS256", kid=None), {}, "token has no 'kid' and 2 RS256 keys are known", []),
    ("no_kid_no_key", lambda: signed("ec-a", "ES256", kid=None), {"keys": parse_jwks(jwks_doc(jwk("rsa-a", "a")), ALL, "t")},
     "token has no 'kid' and no ES256 key is known", [None]),
    ("empty_key_set", lambda: signed("rsa-a", "RS256"), {"keys": KeySet()}, "unknown signing key (kid 'rsa-a')", ["rsa-a"]),
    ("wrong_issuer", lambda: signed("rsa-a", "RS256", iss="https://evil.example"), {}, "token issuer is not accepted", []),
    ("missing_issuer", lambda: signed("rsa-a", "RS256", iss=None), {}, "token lacks the 'iss' claim", []),
    ("wrong_audience", lambda: signed("rsa-a", "RS256", aud="other"), {}, "token audience is not accepted", []),
    ("missing_audience", lambda: signed("rsa-a", "RS256", aud=None), {}, "token lacks the 'aud' claim", []),
    ("expired", lambda: signed("ec-a", "ES256", exp=int(time.time()) - 30), {}, "token expired", []),
    ("expired_beyond_leeway", lambda: signed("rsa-a", "RS256", exp=int(time.time()) - 300), {"leeway_s": 120},
     "token expired", []),
    ("missing_exp", lambda: signed("ed-a", "EdDSA", exp=None), {}, "token lacks the 'exp' claim", []),
    ("bad_sub", lambda: signed("ed-a", "EdDSA", sub="a\nb"), {}, "token 'sub' is not a valid user id", []),
    ("alg_none", lambda: jwt.encode({"sub": "alice", "exp": future(), "iss": ISS, "aud": AUD}, None, algorithm="none",
                                    headers={"kid": "rsa-a"}), {}, "token algorithm 'none' is not accepted", []),
    ("hs256_with_public_pem_idp_only", lambda: hs256_with(pem("rsa-a")), {}, "token algorithm 'HS256' is not accepted", []),
    ("hs256_with_public_pem_and_secret", lambda: hs256_with(pem("rsa-a")),
     {"algorithms": ("HS256", "RS256"), "secrets_": (SECRET,)}, "bad token signature", []),
    ("hs256_with_public_jwk_n", lambda: hs256_with(json.dumps(jwk("rsa-a")).encode()),
     {"algorithms": ("HS256", "RS256"), "secrets_": (SECRET,)}, "bad token signature", []),
    ("alg_not_configured", lambda: signed("rsa-a", "RS256"), {"algorithms": ("ES256",)},
     "token algorithm 'RS256' is not accepted", []),
    ("rs512_never", lambda: signed("rsa-a", "RS512"), {}, "token algorithm 'RS512' is not accepted", []),
    ("ps256_never", lambda: signed("rsa-a", "PS256"), {}, "token algorithm 'PS256' is not accepted", []),
    ("es384_never", lambda: signed("ec-384", "ES384", kid="ec-a"), {}, "token algorithm 'ES384' is not accepted", []),
    ("tampered_payload", lambda: _tamper(signed("rsa-a", "RS256")), {}, "bad token signature", []),
]


@pytest.mark.parametrize(("make", "policy", "reason", "told"), [r[1:] for r in IDP_REFUSALS],
                         ids=[r[0] for r in IDP_REFUSALS])
def test_idp_refusals(make, policy, reason, told):
    a = idp(**policy)
    with pytest.raises(AuthError) as info:
        a.verify(make())
    assert str(info.value) == reason
    assert isinstance(info.value, UnknownKey) == bool(told)
    assert a.unknown == told  # only a missing key asks for a refetch


def test_set_keys_and_policy_swap_what_verifies():
    a = idp(keys=KeySet())
    t = signed("rsa-a", "RS256")
    with pytest.raises(UnknownKey):
        a.verify(t)
    a.set_keys(idp_jwks())
    assert a.verify(t).user == "alice"
    a.set_policy(structure_config({"auth": {"algorithms": ["ES256"], "jwks_url": "https://idp.example/jwks"}}).auth)
    with pytest.raises(AuthError, match="^token algorithm 'RS256' is not accepted$"):
        a.verify(t)
    assert a.verify(signed("ec-a", "ES256", iss="anyone", aud="anything")).user == "alice"  # iss/aud off now


def test_mint_needs_a_secret():
    with pytest.raises(ValueError, match="no HS256 secret"):
        idp().mint("alice", 60)


# -- public key files (PEM) -----------------------------------------------------------------


def certificate(name: str) -> bytes:
    key = private(name)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("name", "alg", "data"), [
    ("rsa-a", "RS256", lambda: pem("rsa-a")),
    ("ec-a", "ES256", lambda: pem("ec-a")),
    ("ed-a", "EdDSA", lambda: pem("ed-a")),
    ("rsa-a", "RS256", lambda: certificate("rsa-a")),
    ("ec-a", "ES256", lambda: certificate("ec-a")),
])
def test_pem_key_verifies_its_algorithm_whatever_the_kid(name, alg, data):
    keys = load_pem_key(data(), ALL, "test.pem")
    assert [k.algorithm for k in keys.keys] == [alg] and not keys.by_kid
    a = idp(keys=keys)
    for kid in (None, "anything"):
        assert a.verify(signed(name, alg, kid=kid)).user == "alice"
    other = next(o for o in ("ec-a", "rsa-a") if o != name)
    with pytest.raises(AuthError) as info:
        a.verify(signed(other, "ES256" if other == "ec-a" else "RS256"))
    assert str(info.value) == f"no {'ES256' if other == 'ec-a' else 'RS256'} key is configured"
    assert a.unknown == []  # a PEM file is not refetched


def _private_pem(name: str) -> bytes:
    return private(name).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())


@pytest.mark.parametrize(("data", "algorithms", "reason"), [
    (lambda: b"junk", ALL, "k.pem: not a PEM public key or certificate"),
    (lambda: b"", ALL, "k.pem: not a PEM public key or certificate"),
    (lambda: _private_pem("rsa-a"), ALL, "k.pem: not a PEM public key or certificate"),
    (lambda: pem("rsa-2047"), ALL, "k.pem: RSA key of 2047 bits (at least 2048 needed)"),
    (lambda: pem("ec-384"), ALL, "k.pem: an EC key on curve secp384r1 (ES256 needs P-256)"),
    (lambda: pem("rsa-a"), ["ES256"], "k.pem: an RS256 key, but auth.algorithms has ['ES256']"),
    (lambda: pem("ed-a"), ["HS256", "RS256"], "k.pem: an EdDSA key, but auth.algorithms has ['RS256']"),
])
def test_pem_key_errors(data, algorithms, reason):
    with pytest.raises(KeyMaterialError) as info:
        load_pem_key(data(), algorithms, "k.pem")
    assert str(info.value) == reason


def test_rsa_2048_bits_is_the_least_accepted():
    assert load_pem_key(pem("rsa-a"), ALL, "k.pem").keys[0].key.key_size == 2048


# -- JWK Sets ----------------------------------------------------------------------------------


def test_jwks_skips_unusable_members_and_says_why():
    doc = jwks_doc(
        jwk("rsa-a", "good", use="sig", alg="RS256"),
        jwk("rsa-b", "enc", use="enc"),
        {**jwk("rsa-a", "priv"), "d": "AQAB"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
        jwk("rsa-b", "good"),
        jwk("rsa-a", "rs512", alg="RS512"),
        jwk("ec-384", "p384"),
        jwk("rsa-2047", "weak"),
        jwk("ed-a", 5),
        "not a key",
        {"kty": "RSA", "kid": "broken"},
        jwk("ed-a", "ed"),
    )
    keys = parse_jwks(doc, ["RS256", "ES256"], "src")
    assert [(k.kid, k.algorithm) for k in keys.keys] == [("good", "RS256")]
    assert keys.by_kid and keys.source == "src"
    reasons = list(keys.skipped)
    assert reasons[:5] == [
        "kid 'enc': use 'enc' is not 'sig'",
        "kid 'priv': a private key: publish the public key only",
        "kid 'sym': a symmetric key (HS256 verifies with auth.secret only)",
        "kid 'good': duplicate kid",
        "kid 'rs512': alg RS512 is not accepted",
    ]
    assert reasons[5] == "kid 'p384': an EC key on curve secp384r1 (ES256 needs P-256)"
    assert reasons[6] == "kid 'weak': RSA key of 2047 bits (at least 2048 needed)"
    assert reasons[7] == "kid 5: kid is not a string"
    assert reasons[8] == "#9: not an object"
    assert reasons[9] == "kid 'broken': Not a public or private key"  # PyJWT's words
    assert reasons[10] == "kid 'ed': an EdDSA key, but auth.algorithms has ['RS256', 'ES256']"
    assert len(reasons) == 11


@pytest.mark.parametrize(("data", "reason"), [
    (b"{", "src: not JSON"),
    (b"\xff\xfe", "src: not JSON"),
    (b"[]", 'src: not a JWK Set (no "keys" list)'),
    (b'{"keys": {}}', 'src: not a JWK Set (no "keys" list)'),
    (b'{"keys": []}', "src: no usable signing key (the set is empty)"),
    (b'{"keys": [{"kty": "oct", "k": "eA", "kid": "s"}]}',
     "src: no usable signing key (kid 's': a symmetric key (HS256 verifies with auth.secret only))"),
])
def test_jwks_errors(data, reason):
    with pytest.raises(KeyMaterialError) as info:
        parse_jwks(data, ALL, "src")
    assert str(info.value) == reason


def test_key_sets_compare_by_key_material():
    one = parse_jwks(jwks_doc(jwk("rsa-a", "a")), ALL, "s")
    assert one == parse_jwks(jwks_doc(jwk("rsa-a", "a")), ALL, "s")
    assert one != parse_jwks(jwks_doc(jwk("rsa-b", "a")), ALL, "s")
    assert one != parse_jwks(jwks_doc(jwk("rsa-a", "b")), ALL, "s")


def test_load_keys_from_config_files(tmp_path):
    (tmp_path / "k.pem").write_bytes(pem("ec-a"))
    (tmp_path / "k.json").write_bytes(jwks_doc(jwk("ed-a", "e1")))
    conf = lambda **a: structure_config({"auth": {"algorithms": ALL, **a}})  # noqa: E731
    assert load_keys(conf(public_key_file=str(tmp_path / "k.pem"))).keys[0].algorithm == "ES256"
    keys = load_keys(conf(jwks_file=str(tmp_path / "k.json")))
    assert keys.kids() == ["e1"] and keys.source == f"auth.jwks_file {tmp_path / 'k.json'}"
    assert load_keys(conf(jwks_url="https://idp.example/jwks")) == KeySet()  # the refresher's job
    assert load_keys(structure_config({})) == KeySet()
    with pytest.raises(KeyMaterialError) as info:
        load_keys(conf(public_key_file=str(tmp_path / "missing.pem")))
    assert str(info.value) == f"auth.public_key_file {tmp_path / 'missing.pem'}: No such file or directory"


# -- tidings token with an identity provider ----------------------------------------------------


def test_token_command_refuses_without_hs256(tmp_path):
    r = run_token("alice", "--config", write_config(
        tmp_path, '[auth]\nalgorithms = ["RS256"]\njwks_url = "https://idp.example/jwks"\n'))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        "tidings: auth.algorithms = ['RS256'] has no \"HS256\": the daemon accepts only tokens from your "
        "identity provider (auth.public_key_file, jwks_file or jwks_url), so `tidings token` cannot mint one\n")
    assert not (tmp_path / "state" / "secret").exists()


def test_token_command_with_hs256_next_to_an_idp(tmp_path):
    r = run_token("alice", "--config", write_config(
        tmp_path, f'[auth]\nsecret = "{"q" * 32}"\nalgorithms = ["HS256", "RS256"]\njwks_url = "https://idp.example/j"\n'))
    assert r.returncode == 0, r.stderr
    assert jwt.decode(r.stdout.strip(), b"q" * 32, algorithms=["HS256"])["sub"] == "alice"
