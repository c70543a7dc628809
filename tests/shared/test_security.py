"""Signatures, delivery ids and token hashing."""

from __future__ import annotations

import hashlib
import hmac

from shared.events import delivery_id
from shared.security import hash_token, new_api_token, sign, signature_matches


def test_signature_is_sentrys_hmac_over_exact_bytes() -> None:
    body = b'{"action":"created","data":{}}'
    expected = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert sign("secret", body) == expected
    assert signature_matches(expected, body, ["secret"])
    assert signature_matches(expected.upper(), body, ["secret"])  # hex case is not significant
    assert not signature_matches(expected, body + b" ", ["secret"])  # re-serialised bytes do not verify
    assert not signature_matches(None, body, ["secret"])
    assert not signature_matches("", body, ["secret"])
    assert not signature_matches(expected, body, [])


def test_previous_secret_still_verifies_during_rotation() -> None:
    body = b"{}"
    assert signature_matches(sign("old", body), body, ["new", "old"])
    assert not signature_matches(sign("older", body), body, ["new", "old"])


def test_delivery_id_is_content_based() -> None:
    body = b'{"a":1}'
    assert delivery_id("acme", "issue", body) == hashlib.sha256(b"acme\nissue\n" + body).hexdigest()
    assert delivery_id("acme", "issue", body) != delivery_id("acme", "error", body)
    assert delivery_id("acme", "issue", body) != delivery_id("other", "issue", body)


def test_tokens_are_random_and_stored_hashed() -> None:
    a, b = new_api_token(), new_api_token()
    assert a != b and a.startswith("btk_")
    assert hash_token(a) == hashlib.sha256(a.encode()).digest() != hash_token(b)
