"""Salted scrypt password hashes for User Identity passcodes: never stored or logged plain.

A hash is one string, ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>``, so that the
cost parameters travel with it and can be raised later without breaking old hashes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

_SCHEME: Final = "scrypt"
# RFC 7914's interactive-login parameters: ~16 MiB and ~50 ms per check.
_N: Final = 16384
_R: Final = 8
_P: Final = 1
_KEY_LENGTH: Final = 32
# The largest cost accepted from a stored hash, so a bad config cannot stall every login.
_MAX_N: Final = 1 << 20


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=_KEY_LENGTH, maxmem=256 * n * r + (1 << 20)
    )


def hash_password(password: str) -> str:
    """A new salted scrypt hash of password, in the stored format."""
    salt = secrets.token_bytes(16)
    key = _derive(password.encode("utf-8"), salt, _N, _R, _P)
    encoded = [base64.b64encode(part).decode("ascii") for part in (salt, key)]
    return "$".join((_SCHEME, str(_N), str(_R), str(_P), *encoded))


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """The parameters, salt and key of a stored hash; raise ValueError if malformed."""
    scheme, n, r, p, salt, key = stored.split("$")
    if scheme != _SCHEME:
        raise ValueError(scheme)
    cost = int(n), int(r), int(p)
    if not (1 < cost[0] <= _MAX_N and cost[0] & (cost[0] - 1) == 0 and 0 < cost[1] <= 32):
        raise ValueError(n)
    if not 0 < cost[2] <= 16:
        raise ValueError(p)
    try:
        raw = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
    if len(raw[0]) < 8 or len(raw[1]) != _KEY_LENGTH:
        raise ValueError("salt or key length")
    return (*cost, *raw)


def password_hash_problem(stored: str) -> str | None:
    """Why stored is not a password hash minipacs can check, or None."""
    try:
        _parse(stored)
    except ValueError:
        return "must be a hash from `minipacs hash-password` (scrypt$N$r$p$salt$key)"
    return None


def verify_password(password: bytes, stored: str) -> bool:
    """True if password matches the stored hash (constant-time compare)."""
    n, r, p, salt, key = _parse(stored)
    return hmac.compare_digest(_derive(password, salt, n, r, p), key)
