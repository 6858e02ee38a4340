"""API keys: generation (high-entropy, shown once), hashing (only the sha256 is stored) and
turning an Authorization header into a key record. Never logs or stores a plaintext key.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional, Tuple

from serving.ledger import KeyRecord, Ledger, now_iso

KEY_PREFIX = "tm_"


class AuthError(Exception):
    """401: the message is safe to show (it never echoes the key)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def hash_key(plaintext: str) -> str:
    # sha256 without a salt is enough for 256-bit random keys: there is nothing to brute-force.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(ledger: Ledger, user_id: str, name: str = "", is_admin: bool = False,
               rpm: int = 0, tpm: int = 0, budget_micro_usd: Optional[int] = None,
               budget_tokens: Optional[int] = None) -> Tuple[KeyRecord, str]:
    """Store a new key for `user_id`; return its record and the plaintext (shown once)."""
    if not user_id.strip():
        raise ValueError("user must not be empty")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(id="key_" + secrets.token_hex(8), user_id=user_id,
                       prefix=plaintext[:10], name=name, is_admin=is_admin, rpm=rpm, tpm=tpm,
                       budget_micro_usd=budget_micro_usd, budget_tokens=budget_tokens,
                       created_at=now_iso(), revoked_at=None)
    ledger.add_key(record, hash_key(plaintext))
    return record, plaintext


def bearer_token(authorization: Optional[str]) -> str:
    if not authorization:
        raise AuthError("missing_api_key",
                        "send your API key as `Authorization: Bearer <key>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing_api_key",
                        "send your API key as `Authorization: Bearer <key>`")
    return token.strip()


def authenticate(ledger: Ledger, authorization: Optional[str]) -> KeyRecord:
    return check_record(ledger.key_by_hash(hash_key(bearer_token(authorization))))


def check_record(record: Optional[KeyRecord]) -> KeyRecord:
    """The record of a key that may be used, or the AuthError saying why not."""
    if record is None:
        raise AuthError("invalid_api_key", "the API key is not valid")
    if record.revoked_at is not None:
        raise AuthError("revoked_api_key", "the API key has been revoked")
    return record
