"""Settings: TOML + environment, frozen, and one actionable line for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.shared.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the file and the variables they set themselves."""
    import os

    for name in list(os.environ):
        if name.startswith("KLINES_") or name in ("KAFKA_BOOTSTRAP", "CLICKHOUSE_DSN"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "klines.toml"
    path.write_text(text)
    return path


def test_repo_config_loads_with_the_seed_persistence_section() -> None:
    s = load_settings(REPO / "config" / "klines.toml")
    assert s.persistence.queue_size == 5000
    assert s.persistence.finalized_buffer_size == 20_000
    assert s.persistence.finalized_flush_interval_ms == 250
    assert s.kafka.topics.snapshots == "klines.snapshots"
    assert s.market.intervals == ("1m", "5m", "30m", "1h", "4h", "1d", "1w")


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "[persistence]\nqueue_size = 7\n"))
    assert s.persistence.queue_size == 7
    with pytest.raises(ValueError, match="frozen"):
        s.persistence.queue_size = 8  # type: ignore[misc]


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[persistence]\nqueue_size = 7\n[kafka]\nbootstrap = "a:1"\n')
    monkeypatch.setenv("KLINES_PERSISTENCE__QUEUE_SIZE", "11")
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "broker:9093")
    s = load_settings(path)
    assert s.persistence.queue_size == 11
    assert s.kafka.bootstrap == "broker:9093"


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[persistence]\nqueue_sise = 7\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    assert "persistence.queue_sise" in message
    assert str(path) in message
    assert "unknown key" in message


def test_negative_buffer_size_names_key_file_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "[persistence]\nfinalized_buffer_size = -5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    assert "persistence.finalized_buffer_size = -5" in message
    assert str(path) in message
    assert "greater than 0" in message


def test_bad_value_from_the_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLINES_PERSISTENCE__FINALIZED_FLUSH_INTERVAL_MS", "soon")
    with pytest.raises(ConfigError, match="KLINES_PERSISTENCE__FINALIZED_FLUSH_INTERVAL_MS"):
        load_settings(write(tmp_path, ""))


def test_bad_bootstrap_and_interval_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap.*host:port"):
        load_settings(write(tmp_path, '[kafka]\nbootstrap = "localhost"\n'))
    with pytest.raises(ConfigError, match=r"market\.intervals.*unknown interval '2m'"):
        load_settings(write(tmp_path, '[market]\nintervals = ["1m", "2m"]\n'))


def test_missing_explicit_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"klines\.toml"):
        load_settings(write(tmp_path, "[persistence\n"))


def test_overrides_win_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), persistence={"queue_size": 3})
    assert isinstance(s, Settings)
    assert s.persistence.queue_size == 3
    assert s.persistence.finalized_buffer_size == 20_000


def test_relative_chdb_path_resolves_against_the_working_directory(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, '[clickhouse]\ndsn = "chdb:data/ch"\n'))
    assert s.clickhouse.dsn == f"chdb://{Path.cwd() / 'data' / 'ch'}"
    assert s.clickhouse.embedded
    with pytest.raises(ConfigError, match=r"clickhouse\.dsn.*expected chdb"):
        load_settings(write(tmp_path, '[clickhouse]\ndsn = "tcp://x:9000"\n'))
