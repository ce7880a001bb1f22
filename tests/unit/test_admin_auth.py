"""The admin token check (services/shared/admin.py): bearer header parsing, the constant-time comparison on every
path, loopback detection, reading the token file, and the setting that names it."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.shared import admin
from services.shared.admin import bearer_token_matches, is_loopback, read_token_file
from services.shared.settings import ConfigError, ServiceSettings

pytestmark = pytest.mark.unit

TOKEN = SecretStr("s3cret-token")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer s3cret-token",
        "bearer s3cret-token",
        "BEARER s3cret-token",
        "BeArEr   s3cret-token",
        "  Bearer s3cret-token  ",
        "Bearer\ts3cret-token",
    ],
)
def test_the_right_token_matches_whatever_the_scheme_case_and_spacing(header: str) -> None:
    assert bearer_token_matches(header, TOKEN)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "s3cret-token",
        "Basic s3cret-token",
        "Bearers3cret-token",
        "Bearer s3cret-tokeN",
        "Bearer s3cret-token-and-more",
        "Bearer s3cret",
        "Bearer s3cret token",
        "Bearer s3cret-tökén",
        "Bearer \udcff",
    ],
)
def test_anything_else_does_not(header: str | None) -> None:
    assert not bearer_token_matches(header, TOKEN)


def test_an_empty_expected_token_matches_nothing() -> None:
    assert not bearer_token_matches("Bearer ", SecretStr(""))
    assert not bearer_token_matches(None, SecretStr(""))


def test_the_comparison_is_constant_time_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest decides, and it runs even for a missing or malformed header."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    for header in (None, "Basic x", "Bearer wrong", "Bearer s3cret-token"):
        bearer_token_matches(header, TOKEN)
    assert calls == [
        (b"", b"s3cret-token"),
        (b"", b"s3cret-token"),
        (b"wrong", b"s3cret-token"),
        (b"s3cret-token", b"s3cret-token"),
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "ingest.example.com", "192.168.1.1"])
def test_other_hosts_are_reachable_from_elsewhere(host: str) -> None:
    assert not is_loopback(host)


def test_the_token_file_is_read_without_its_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    token = read_token_file(path)
    assert token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(token) and "s3cret" not in str(token)


def test_an_empty_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_the_setting(tmp_path: Path) -> None:
    assert ServiceSettings().admin_token() is None
    assert ServiceSettings(admin_token_file="").admin_token_file is None  # type: ignore[arg-type]  # as in TOML
    (tmp_path / "token").write_text("abc\n")
    settings = ServiceSettings(admin_token_file=tmp_path / "token")
    token = settings.admin_token()
    assert token is not None and token.get_secret_value() == "abc"
    with pytest.raises(ConfigError, match=r"service\.admin_token_file: cannot read"):
        ServiceSettings(admin_token_file=tmp_path / "missing").admin_token()
