"""Secrets in, hashes out: login passwords, SIP digests, API keys.

Nothing here keeps or logs a secret; callers show a generated secret once and
store only what these functions return.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "HashesAhead",
    "SipDigests",
    "generate_apikey",
    "generate_sip_secret",
    "hash_apikey",
    "hash_password",
    "needs_rehash",
    "same_digest",
    "sip_digests",
    "spend_verification",
    "verify_password",
]

_hasher = PasswordHasher()


def spend_verification(password: str) -> None:
    """Verify ``password`` against a decoy hash and ignore the result: a login refused
    for an unknown user takes as long as one refused for a wrong password, so timing
    does not tell which usernames exist."""
    # A mismatch is the expected outcome: the decoy's password is random and never kept.
    with contextlib.suppress(VerificationError, InvalidHashError):
        _hasher.verify(_decoy(), _given(password))


def _given(password: str) -> bytes:
    """The bytes a password given at login is verified as: its UTF-8, and for a password
    holding surrogates (bytes that were not UTF-8, as a Latin-1 terminal sends ``ö``),
    which UTF-8 cannot encode, their own encoding.  No password set holds one (the rule
    refuses them), so such a password is wrong, after a verification as long as any."""
    return password.encode("utf-8", "surrogatepass")


def hash_password(password: str) -> str:
    """An argon2id hash with a random salt."""
    return _hasher.hash(password)


@dataclass(frozen=True)
class HashesAhead:
    """Argon2 hashes of the passwords a change will store, made before its transaction.

    A hash takes 0.1-0.3 s here; made inside the transaction it would keep every writer
    of the rows the change has locked waiting (on SQLite every writer: a write holds the
    whole file), for minutes in a CSV import of a thousand passwords.  Each run of the
    change (a rerun after a clash too) hands them out afresh with :meth:`taker`.
    """

    #: Each password's hashes, one per time it was given, each with its own salt.
    made: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, passwords: Iterable[str]) -> HashesAhead:
        """Hash each of ``passwords`` now (a password given twice, twice)."""
        made: dict[str, list[str]] = {}
        for password in passwords:
            made.setdefault(password, []).append(hash_password(password))
        return cls({password: tuple(hashes) for password, hashes in made.items()})

    def taker(self) -> Callable[[str], str]:
        """A function giving a hash of its password: the next one made ahead for it
        (never one twice, so two users with one password do not share a salt), or one
        made then when none is left."""
        given: Counter[str] = Counter()

        def take(password: str) -> str:
            made = self.made.get(password, ())
            index = given[password]
            given[password] += 1
            return made[index] if index < len(made) else hash_password(password)

        return take


def needs_rehash(password_hash: str) -> bool:
    """True when ``password_hash`` was made with other costs than :func:`hash_password`
    uses now (an older argon2-cffi's defaults, say): its verification then takes another
    time than the decoy's, and may be weaker."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:  # not argon2 at all: it verifies nothing, so nothing to redo
        return False


#: A hash of a random password per set of cost parameters, made when first needed.
_decoys: dict[tuple[int, int, int, int, int], str] = {}


def _decoy() -> str:
    # Keyed by what the verification costs (not by the hasher object, whose id may be
    # reused by another with other costs).
    h = _hasher
    key = (h.time_cost, h.memory_cost, h.parallelism, h.hash_len, h.salt_len)
    if key not in _decoys:
        _decoys[key] = _hasher.hash(secrets.token_urlsafe(16))
    return _decoys[key]


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; False for a wrong password or no password set.  No
    password set costs a verification all the same (of a decoy hash), so the time a
    refusal takes does not tell a user without a password from one with another."""
    if not password_hash:
        spend_verification(password)
        return False
    try:
        return _hasher.verify(password_hash, _given(password))
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
    """SHA-256 of the key: a 256-bit random token needs no slow hash.  A key holding
    surrogate escapes (bytes that were not UTF-8 where it was read) is hashed as their own
    encoding, as a login password is (:func:`_given`): a wrong key, refused as any other,
    not an encoding error (every key made here is ASCII)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def same_digest(a: str, b: str) -> bool:
    """True when two digests are equal, compared in constant time."""
    return hmac.compare_digest(a, b)
