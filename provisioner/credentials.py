"""Secrets in, hashes out: login passwords, SIP digests, API keys.

Nothing here keeps or logs a secret; callers show a generated secret once and
store only what these functions return.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "SipDigests",
    "generate_apikey",
    "generate_sip_secret",
    "hash_apikey",
    "hash_password",
    "sip_digests",
    "verify_password",
]

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash with a random salt."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; False for a wrong password or no password set."""
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class SipDigests:
    """What Asterisk verifies a SIP secret with: ``H(username:realm:secret)``."""

    realm: str
    md5: str
    sha256: str


def sip_digests(username: str, realm: str, secret: str) -> SipDigests:
    """The MD5 and SHA-256 digests of ``username:realm:secret`` (RFC 7616 HA1)."""
    ha1 = f"{username}:{realm}:{secret}".encode()
    return SipDigests(
        realm=realm,
        md5=hashlib.md5(ha1, usedforsecurity=False).hexdigest(),
        sha256=hashlib.sha256(ha1).hexdigest(),
    )


def generate_sip_secret() -> str:
    """A 24-character secret of letters and digits (about 143 bits), easy to type into a phone."""
    alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(24))


def generate_apikey() -> str:
    """A 256-bit random API key."""
    return "pk_" + secrets.token_urlsafe(32)


def hash_apikey(key: str) -> str:
    """SHA-256 of the key: a 256-bit random token needs no slow hash."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)
