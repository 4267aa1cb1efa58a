"""Continue tokens (mint, derive, verify), the key fingerprint and API tokens."""

from __future__ import annotations

import base64
import hashlib
import re
import string

import pytest

from gateway.tokens import (
    API_TOKEN_PREFIX,
    ContinueTokens,
    key_fingerprint,
    new_api_token,
    token_hash,
)

KEY = "unit-test-secret-key-0123456789abcdef"
OTHER_KEY = "another-secret-key-0123456789abcdef"
JOB = "01JD0000000000000000000000"
NONCE = bytes(range(16))
URL_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@pytest.fixture
def tokens() -> ContinueTokens:
    return ContinueTokens(KEY)


def _material(token: str) -> bytes:
    encoded = token.split(".", 1)[0]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def test_derive_is_deterministic_for_one_job_and_nonce(tokens: ContinueTokens) -> None:
    """The server re-derives the same token from the job id and the stored nonce."""
    assert tokens.derive(JOB, NONCE) == tokens.derive(JOB, NONCE)
    assert ContinueTokens(KEY).derive(JOB, NONCE) == tokens.derive(JOB, NONCE)


def test_derive_differs_per_nonce_job_and_key(tokens: ContinueTokens) -> None:
    """Another attempt (nonce), another job or another secret key gives another token."""
    token = tokens.derive(JOB, NONCE)
    others = {
        tokens.derive(JOB, bytes(16)),
        tokens.derive(JOB, NONCE[:-1] + b"\xff"),
        tokens.derive(JOB[:-1] + "1", NONCE),
        ContinueTokens(OTHER_KEY).derive(JOB, NONCE),
    }
    assert token not in others
    assert len(others) == 4
    materials = {_material(t) for t in [token, *others]}
    assert len(materials) == 5


def test_token_material_carries_at_least_128_bits(tokens: ContinueTokens) -> None:
    """The unguessable part of a token is at least 16 bytes."""
    assert len(_material(tokens.derive(JOB, NONCE))) >= 16
    assert len(_material(tokens.mint(JOB).token)) >= 16


def test_tokens_are_url_safe(tokens: ContinueTokens) -> None:
    """A token goes into a URL path unescaped."""
    for _ in range(50):
        assert URL_SAFE.match(tokens.mint(JOB).token)


def test_mint_uses_a_fresh_nonce_each_time(tokens: ContinueTokens) -> None:
    """Two mints for the same job give different nonces and tokens; each re-derives."""
    minted = [tokens.mint(JOB) for _ in range(20)]
    assert len({m.nonce for m in minted}) == 20
    assert len({m.token for m in minted}) == 20
    for credential in minted:
        assert len(credential.nonce) >= 16
        assert tokens.derive(JOB, credential.nonce) == credential.token


def test_stored_hash_is_sha256_of_the_token(tokens: ContinueTokens) -> None:
    """The database keeps SHA-256(token), never the token."""
    credential = tokens.mint(JOB)
    expected = hashlib.sha256(credential.token.encode()).digest()
    assert credential.token_hash == expected
    assert token_hash(credential.token) == expected
    assert credential.token.encode() not in credential.token_hash


def test_verify_accepts_a_genuine_token_and_returns_its_hash(tokens: ContinueTokens) -> None:
    """A token this key minted verifies to the hash it is stored under."""
    credential = tokens.mint(JOB)
    assert tokens.verify(credential.token) == credential.token_hash


def test_verify_refuses_a_token_signed_with_another_key(tokens: ContinueTokens) -> None:
    """A token from another server (another key) is refused before any lookup."""
    foreign = ContinueTokens(OTHER_KEY).mint(JOB).token
    assert tokens.verify(foreign) is None


def test_verify_refuses_every_one_character_tampering(tokens: ContinueTokens) -> None:
    """Changing any single character of a token makes it a forgery."""
    token = tokens.derive(JOB, NONCE)
    alphabet = string.ascii_letters + string.digits + "-_."
    accepted = [
        (position, replacement)
        for position, original in enumerate(token)
        for replacement in alphabet
        if replacement != original
        and tokens.verify(token[:position] + replacement + token[position + 1 :]) is not None
    ]
    assert accepted == []


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "abc", "abc.", ".abc", "a.b.c", "no-signature-here", "é.é", "\x00.\x00", " " * 10],
)
def test_verify_refuses_garbage(tokens: ContinueTokens, garbage: str) -> None:
    """Malformed tokens are refused, never an exception."""
    assert tokens.verify(garbage) is None


def test_verify_refuses_overlong_input(tokens: ContinueTokens) -> None:
    """A huge token is refused without being hashed or unsigned."""
    token = tokens.derive(JOB, NONCE)
    assert tokens.verify(token + "A" * 1000) is None
    assert tokens.verify("A" * 100_000) is None


def test_verify_refuses_a_token_with_extra_characters(tokens: ContinueTokens) -> None:
    """A genuine token with anything appended or prepended is not that token."""
    token = tokens.derive(JOB, NONCE)
    for variant in (token + "A", "A" + token, token + ".", " " + token, token + "\n"):
        assert tokens.verify(variant) is None, variant


def test_key_fingerprint_is_stable_and_key_specific() -> None:
    """The fingerprint stored in the database never changes for a key and reveals nothing."""
    fingerprint = key_fingerprint(KEY)
    # pinned: a change would make every existing database refuse its own key
    assert fingerprint == "24b122bd855aaa4159044238dca66adb"
    assert fingerprint == key_fingerprint(KEY)
    assert fingerprint != key_fingerprint(OTHER_KEY)
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint)
    assert KEY not in fingerprint
    assert fingerprint not in hashlib.sha256(KEY.encode()).hexdigest()


def test_new_api_token_has_prefix_and_entropy() -> None:
    """API tokens start with gw_ and carry 256 bits of randomness."""
    minted = {new_api_token() for _ in range(50)}
    assert len(minted) == 50
    for token in minted:
        assert token.startswith(API_TOKEN_PREFIX)
        assert API_TOKEN_PREFIX == "gw_"
        body = token.removeprefix(API_TOKEN_PREFIX)
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) >= 32
        assert URL_SAFE.match(token)
