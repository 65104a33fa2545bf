"""API keys: format, parsing of hostile input, bearer headers, and every authentication outcome."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import pytest

from modelkeep.auth import (
    ROLES,
    TOKEN_PREFIX,
    AuthFailure,
    KeyRecord,
    NewApiKey,
    Principal,
    authenticate,
    bearer_token,
    generate_api_key,
    hash_secret,
    parse_token,
)
from modelkeep.errors import InternalError, Unauthenticated

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TOKEN_RE = re.compile(r"mk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")
VALID_ID = "abcdefgh2345"
VALID_SECRET = "A" * 20 + "_-" + "b" * 21  # 43 chars, with the separators a secret may hold


def make_record(new: NewApiKey, **overrides: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key_id": new.key_id,
        "secret_hash": new.secret_hash,
        "role": "consumer",
        "models": frozenset({"iris"}),
        "description": "ci key",
        "created_at": NOW - timedelta(days=1),
        "expires_at": None,
        "revoked_at": None,
    }
    fields.update(overrides)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def secret_of(token: str) -> str:
    return token[len("mk_") + 12 + 1 :]


# --- generation ---------------------------------------------------------------------------


def test_generated_token_has_the_documented_format() -> None:
    new = generate_api_key()
    assert TOKEN_PREFIX == "mk_"
    assert TOKEN_RE.fullmatch(new.token) is not None
    assert new.token.startswith(f"mk_{new.key_id}_")


def test_generated_token_parses_back_to_its_id_and_a_secret_of_32_bytes() -> None:
    new = generate_api_key()
    key_id, secret = parse_token(new.token)
    assert new.key_id == key_id
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32


def test_generated_secret_hash_is_sha256_hex_of_the_secret() -> None:
    new = generate_api_key()
    secret = secret_of(new.token)
    assert hashlib.sha256(secret.encode()).hexdigest() == new.secret_hash
    assert hash_secret(secret) == new.secret_hash


def test_hash_secret_matches_a_known_answer() -> None:
    # SHA-256("abc") from FIPS 180-2, appendix B.1.
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert expected == hash_secret("abc")


def test_generated_keys_are_unique() -> None:
    keys = [generate_api_key() for _ in range(2000)]
    assert len({k.key_id for k in keys}) == 2000
    assert len({k.token for k in keys}) == 2000


def test_new_key_repr_does_not_show_the_token() -> None:
    new = generate_api_key()
    assert secret_of(new.token) not in repr(new)


# --- parse_token ----------------------------------------------------------------------------


def test_parse_token_splits_by_position_even_when_the_secret_holds_underscores() -> None:
    assert parse_token(f"mk_{VALID_ID}_{VALID_SECRET}") == (VALID_ID, VALID_SECRET)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("mk_", id="prefix-only"),
        pytest.param(f"mk_{VALID_ID}", id="no-secret"),
        pytest.param(f"mk_{VALID_ID}_", id="empty-secret"),
        pytest.param(f"mk__{VALID_SECRET}", id="no-id"),
        pytest.param(f"{VALID_ID}_{VALID_SECRET}", id="no-prefix"),
        pytest.param(f"MK_{VALID_ID}_{VALID_SECRET}", id="uppercase-prefix"),
        pytest.param(f"sk_{VALID_ID}_{VALID_SECRET}", id="wrong-prefix"),
        pytest.param(f"mk-{VALID_ID}_{VALID_SECRET}", id="wrong-prefix-separator"),
        pytest.param(f"mk_{VALID_ID}-{VALID_SECRET}", id="wrong-id-separator"),
        pytest.param(f"mk_abcdef_gh234_{VALID_SECRET}", id="underscore-inside-id"),
        pytest.param(f"mk_abcdefgh234__{VALID_SECRET}", id="underscore-ending-id"),
        pytest.param(f"mk_ABCDEFGH2345_{VALID_SECRET}", id="uppercase-id"),
        pytest.param(f"mk_abcdefgh2301_{VALID_SECRET}", id="id-with-0-and-1"),
        pytest.param(f"mk_abcdefgh234_{VALID_SECRET}a", id="id-too-short"),
        pytest.param(f"mk_abcdefgh23456_{VALID_SECRET[:-1]}", id="id-too-long"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}", id="secret-too-short"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET}A", id="secret-too-long"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}=", id="secret-with-padding"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}+", id="secret-standard-base64"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}\n", id="trailing-newline"),
        pytest.param(f" mk_{VALID_ID}_{VALID_SECRET[1:]}", id="leading-space"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}é", id="unicode-in-secret"),
        pytest.param(f"mk_abcdefgh234é_{VALID_SECRET}", id="unicode-in-id"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}٣", id="unicode-digit"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET[:-1]}\x00", id="nul-byte"),
        pytest.param(f"mk_{VALID_ID}_{VALID_SECRET}" * 10_000, id="very-long"),
        pytest.param("mk_" + "a" * 1_000_000, id="megabyte"),
    ],
)
def test_parse_token_refuses_malformed_tokens(token: str) -> None:
    with pytest.raises(AuthFailure) as caught:
        parse_token(token)
    assert caught.value.reason == "malformed"
    assert caught.value.message == "malformed API key"
    assert isinstance(caught.value, Unauthenticated)


# --- bearer_token ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_token_accepts_the_scheme_in_any_case(scheme: str) -> None:
    assert bearer_token(f"{scheme} tok.en-1_") == "tok.en-1_"


@pytest.mark.parametrize("header", [None, ""])
def test_bearer_token_reports_missing_credentials(header: str | None) -> None:
    with pytest.raises(AuthFailure) as caught:
        bearer_token(header)
    assert (caught.value.reason, caught.value.message) == ("missing", "missing credentials")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(" ", id="space-only"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="scheme-and-space"),
        pytest.param("Bearer  tok", id="two-spaces"),
        pytest.param("Bearer\ttok", id="tab"),
        pytest.param("Bearer tok extra", id="two-tokens"),
        pytest.param("Bearer tok ", id="trailing-space"),
        pytest.param(" Bearer tok", id="leading-space"),
        pytest.param("Bearer tok\u00a0x", id="nbsp-in-token"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("Token tok", id="other-scheme"),
        pytest.param("Bearertok", id="no-separator"),
        pytest.param("B\u0435arer tok", id="cyrillic-e-in-scheme"),
        pytest.param("tok", id="token-without-scheme"),
    ],
)
def test_bearer_token_refuses_malformed_headers(header: str) -> None:
    with pytest.raises(AuthFailure) as caught:
        bearer_token(header)
    assert (
        caught.value.reason,
        caught.value.message,
    ) == ("malformed", "malformed authorization header")


# --- authenticate ---------------------------------------------------------------------------


def test_authenticate_returns_the_principal_of_a_valid_key() -> None:
    new = generate_api_key()
    expires = NOW + timedelta(days=30)
    keys = {new.key_id: make_record(new, role="publisher", expires_at=expires)}
    expected = Principal(
        key_id=new.key_id,
        role="publisher",
        models=frozenset({"iris"}),
        description="ci key",
        expires_at=expires,
    )
    assert expected == authenticate(f"Bearer {new.token}", keys, now=NOW)


def test_authenticate_keeps_an_unscoped_key_unscoped() -> None:
    new = generate_api_key()
    keys = {new.key_id: make_record(new, role="admin", models=None)}
    assert authenticate(f"Bearer {new.token}", keys, now=NOW).models is None


def _failure(header: str | None, keys: dict[str, KeyRecord]) -> AuthFailure:
    with pytest.raises(AuthFailure) as caught:
        authenticate(header, keys, now=NOW)
    return caught.value


def test_authenticate_reports_missing_credentials() -> None:
    failure = _failure(None, {})
    assert (failure.reason, failure.message) == ("missing", "missing credentials")


def test_authenticate_reports_a_malformed_header() -> None:
    new = generate_api_key()
    failure = _failure(f"Basic {new.token}", {new.key_id: make_record(new)})
    assert (failure.reason, failure.message) == ("malformed", "malformed authorization header")


def test_authenticate_reports_a_malformed_key() -> None:
    failure = _failure("Bearer mk_nope", {})
    assert (failure.reason, failure.message) == ("malformed", "malformed API key")


def test_authenticate_refuses_an_unknown_key_id_as_invalid() -> None:
    new = generate_api_key()
    other = generate_api_key()
    failure = _failure(f"Bearer {new.token}", {other.key_id: make_record(other)})
    assert (failure.reason, failure.message) == ("invalid", "invalid API key")


def test_authenticate_refuses_a_wrong_secret_as_invalid() -> None:
    new = generate_api_key()
    forged = f"mk_{new.key_id}_{generate_api_key().token[-43:]}"
    failure = _failure(f"Bearer {forged}", {new.key_id: make_record(new)})
    assert (failure.reason, failure.message) == ("invalid", "invalid API key")


def test_authenticate_refuses_a_revoked_key() -> None:
    new = generate_api_key()
    keys = {new.key_id: make_record(new, revoked_at=NOW - timedelta(seconds=1))}
    failure = _failure(f"Bearer {new.token}", keys)
    assert (failure.reason, failure.message) == ("revoked", "API key revoked")


def test_authenticate_refuses_a_key_that_expires_exactly_now() -> None:
    new = generate_api_key()
    keys = {new.key_id: make_record(new, expires_at=NOW)}
    failure = _failure(f"Bearer {new.token}", keys)
    assert (failure.reason, failure.message) == ("expired", "API key expired")


def test_authenticate_accepts_a_key_one_microsecond_before_expiry() -> None:
    new = generate_api_key()
    keys = {new.key_id: make_record(new, expires_at=NOW + timedelta(microseconds=1))}
    assert new.key_id == authenticate(f"Bearer {new.token}", keys, now=NOW).key_id


def test_authenticate_hides_revocation_and_expiry_from_a_wrong_secret() -> None:
    new = generate_api_key()
    keys = {new.key_id: make_record(new, revoked_at=NOW - timedelta(days=1), expires_at=NOW)}
    forged = f"mk_{new.key_id}_{'x' * 43}"
    assert _failure(f"Bearer {forged}", keys).reason == "invalid"


def test_authenticate_compares_against_a_dummy_hash_when_the_id_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)
    new = generate_api_key()
    _failure(f"Bearer {new.token}", {})
    assert len(compared) == 1
    assert len(compared[0][1]) == 64
    assert hash_secret(secret_of(new.token)).encode() == compared[0][0]


def test_authenticate_error_messages_never_contain_the_token_or_secret() -> None:
    new = generate_api_key()
    secret = secret_of(new.token)
    forged = f"mk_{new.key_id}_{'Z' * 43}"
    cases = [
        (f"Bearer {new.token}", {}),
        (f"Bearer {forged}", {new.key_id: make_record(new)}),
        (f"Bearer {new.token}", {new.key_id: make_record(new, revoked_at=NOW)}),
        (f"Bearer {new.token}", {new.key_id: make_record(new, expires_at=NOW)}),
        (f"Bearer {new.token}x", {new.key_id: make_record(new)}),
        (f"Basic {new.token}", {new.key_id: make_record(new)}),
    ]
    seen_reasons = set()
    for header, keys in cases:
        failure = _failure(header, keys)
        seen_reasons.add(failure.reason)
        for text in (failure.message, str(failure), repr(failure)):
            assert secret not in text
            assert "Z" * 43 not in text
            assert new.token not in text
    assert {"invalid", "revoked", "expired", "malformed"} == seen_reasons


def test_authenticate_refuses_a_naive_clock() -> None:
    new = generate_api_key()
    with pytest.raises(InternalError):
        authenticate(f"Bearer {new.token}", {}, now=NOW.replace(tzinfo=None))


def test_key_record_repr_does_not_show_the_secret_hash() -> None:
    new = generate_api_key()
    assert new.secret_hash not in repr(make_record(new))


def test_roles_are_the_five_built_in_roles() -> None:
    assert ROLES == ("admin", "publisher", "approver", "consumer", "auditor")
