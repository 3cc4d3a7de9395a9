"""auth.py: mint/verify, every refusal reason, insecure mode, the secret file, `tidings token`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import jwt
import pytest

from tidings.auth import AuthError, Authenticator, Identity, load_secret
from tidings.config import structure_config

SECRET = b"k" * 32
OTHER = b"o" * 32


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
     "invalid token: The specified alg value is not allowed"),
    ("alg_hs512", lambda: token({"sub": "alice", "exp": future()}, b"k" * 64, "HS512"),
     "invalid token: The specified alg value is not allowed"),
]


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
