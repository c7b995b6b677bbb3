"""
Password hashing: argon2id (RFC 9106) through argon2-cffi.

Hashes are stored in their PHC string form (C{$argon2id$v=19$m=...}), so
the parameters travel with each hash and can be raised later: L{needsRehash}
says when a stored hash is weaker than today's parameters.
"""

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()


def hashPassword(password: str) -> str:
    """Return the argon2id hash of C{password} (PHC string)."""
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty string")
    return _hasher.hash(password)


def verifyPassword(stored: str, password: str) -> bool:
    """Whether C{password} matches the C{stored} hash.  Never raises for a mismatch."""
    if not stored:
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needsRehash(stored: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored)
    except InvalidHashError:
        return True
