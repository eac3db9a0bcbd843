"""The cryptographic pieces of secure aggregation, on the `cryptography` package's primitives.

- Key agreement: X25519. Every owner makes fresh key pairs for every run: one to encrypt the secret shares it sends
  to each peer, and one per masked round for the pairwise masks (so that recovering a dropped owner's mask key for
  one round reveals nothing about another round).
- Key derivation: HKDF-SHA256, with the run's session id and the purpose in ``info`` (domain separation).
- Masks: the ChaCha20 keystream of a derived key, read as uint64.
- Shares in transit through the server: ChaCha20-Poly1305, the sender and recipient bound as associated data.
- Shamir secret sharing over the prime field of 2^521 - 1. Written here because `cryptography` has none, and
  PyCryptodome's splits only 16-byte secrets and would add a second crypto library for twenty lines of arithmetic.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fusion.errors import GramfuseError

KEY_BYTES = 32
PRIME = 2**521 - 1  # a Mersenne prime: every 32-byte secret is a field element
SHARE_BYTES = 66  # ceil(521 / 8)
NONCE_BYTES = 12
MASK_CHUNK = 1 << 24  # values per keystream call: bounds the zero buffer, not the result


class SecureProtocolError(GramfuseError):
    """A secure-aggregation message is inconsistent (wrong keys, tampered shares, contradictory requests)."""


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_key(private: bytes, peer_public: bytes, purpose: str, session: str) -> bytes:
    """The 32-byte key two owners share for ``purpose`` in this session, from X25519 and HKDF-SHA256."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise SecureProtocolError(f"key agreement failed: {error}") from error
    return expand(shared, purpose, session)


def expand(secret: bytes, purpose: str, session: str) -> bytes:
    info = f"gramfuse/{purpose}/{session}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def keystream(key: bytes, count: int) -> np.ndarray:
    """``count`` pseudo-random uint64 from ChaCha20 under ``key`` (each key is used for one stream only)."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    out = np.empty(count, dtype=np.uint64)
    for start in range(0, count, MASK_CHUNK):
        stop = min(count, start + MASK_CHUNK)
        out[start:stop] = np.frombuffer(encryptor.update(bytes(8 * (stop - start))), dtype="<u8")
    return out


def seal(key: bytes, plaintext: bytes, context: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context.encode())


def unseal(key: bytes, sealed: bytes, context: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
    except (InvalidTag, ValueError) as error:
        raise SecureProtocolError(f"{context}: share does not decrypt (tampered, or sent under other keys)") from error


def split_secret(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shamir shares of ``secret`` for x = each of ``holders`` (non-zero, distinct); any ``threshold`` recover it."""
    if not 1 <= threshold <= len(holders):
        raise SecureProtocolError(f"threshold {threshold} does not fit {len(holders)} share holders")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine_shares(shares: dict[int, bytes], threshold: int, size: int = KEY_BYTES) -> bytes:
    """The secret from ``threshold`` of its shares (Lagrange interpolation at zero)."""
    if len(shares) < threshold:
        raise SecureProtocolError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + int.from_bytes(y_i, "big") * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise SecureProtocolError("shares do not combine into a secret (inconsistent shares)")
    return secret.to_bytes(size, "big")
