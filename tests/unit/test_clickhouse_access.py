"""deploy/clickhouse/003_access.sql: the writer and reader logins, rendered from the settings.

Embedded chDB has no writable access storage (clickhouse-local keeps users in users.xml only), so CREATE USER,
CREATE SETTINGS PROFILE and GRANT are refused there: the test below proves it against the real engine, and
``apply_schema`` skips the file on chDB. That the reader's INSERT fails is a property of the server's access
control, which needs a ClickHouse server; here the statements' shape is checked.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.shared import clickhouse
from services.shared.settings import ClickHouseSettings

pytestmark = pytest.mark.unit

ACCESS_FILE = clickhouse.SCHEMA_DIR / "003_access.sql"


def server_settings() -> ClickHouseSettings:
    return ClickHouseSettings(
        dsn="http://clickhouse:8123",
        reader_password=SecretStr("r'ead\\er"),
        writer_password=SecretStr("wr1ter"),
    )


def statements(settings: ClickHouseSettings) -> list[str]:
    return [" ".join(s.split()) for s in clickhouse._statements(clickhouse.render_ddl(ACCESS_FILE, settings))]


def test_access_file_is_marked_and_skipped_until_it_can_apply() -> None:
    assert clickhouse.is_access_file(ACCESS_FILE)
    assert [p.name for p in clickhouse.schema_files() if clickhouse.is_access_file(p)] == ["003_access.sql"]
    assert clickhouse.access_skip_reason(server_settings()) is None
    assert "chDB" in (clickhouse.access_skip_reason(ClickHouseSettings(dsn="chdb:///tmp/x")) or "")
    no_passwords = ClickHouseSettings(dsn="http://clickhouse:8123")
    assert "reader_password" in (clickhouse.access_skip_reason(no_passwords) or "")


def test_grants_are_least_privilege() -> None:
    grants = [s for s in statements(server_settings()) if s.startswith("GRANT")]
    assert grants == [
        "GRANT SELECT ON klines.klines_finalized TO klines_reader",
        "GRANT SELECT ON klines.klines_snapshots TO klines_reader",
        "GRANT INSERT, SELECT ON klines.klines_finalized TO klines_writer",
        "GRANT INSERT, SELECT ON klines.klines_snapshots TO klines_writer",
    ]
    text = " ".join(statements(server_settings()))
    assert not re.search(r"\bALL\b|\*\.\*|WITH GRANT OPTION", text)


def test_reader_profile_is_read_only_with_limits_it_cannot_change() -> None:
    settings = server_settings().model_copy(update={"reader_max_execution_time_s": 7, "reader_max_result_rows": 99})
    profile, create_reader = statements(settings)[:2]
    assert profile == (
        "CREATE SETTINGS PROFILE IF NOT EXISTS klines_reader_profile SETTINGS readonly = 2, "
        "max_execution_time = 7 CONST, max_result_rows = 99 CONST, result_overflow_mode = 'throw' CONST"
    )
    assert create_reader.endswith("SETTINGS PROFILE 'klines_reader_profile'")


def test_passwords_appear_only_as_their_sha256() -> None:
    settings = server_settings()
    text = clickhouse.render_ddl(ACCESS_FILE, settings)
    for secret in (settings.reader_password, settings.writer_password):
        value = secret.get_secret_value()
        assert value not in text
        assert f"IDENTIFIED WITH sha256_hash BY '{hashlib.sha256(value.encode()).hexdigest()}'" in text
    assert "{" not in text and "}" not in text
    # ALTER USER after CREATE USER IF NOT EXISTS: a second apply with new passwords sets them.
    users = [s.split()[0:2] for s in statements(settings) if " USER " in f" {s} "]
    assert users == [["CREATE", "USER"], ["ALTER", "USER"], ["CREATE", "USER"], ["ALTER", "USER"]]


def test_user_names_must_be_identifiers() -> None:
    bad = server_settings().model_copy(update={"reader_username": "r; DROP TABLE x"})
    with pytest.raises(ValueError, match="plain ClickHouse identifier"):
        clickhouse.render_ddl(ACCESS_FILE, bad)


def test_embedded_chdb_refuses_access_management(tmp_path: Path) -> None:
    """Why the file is skipped on chDB: the embedded engine rejects the statements themselves."""
    pytest.importorskip("chdb")
    from chdb import session

    db = session.Session(str(tmp_path / "chdb"))
    try:
        for statement in statements(server_settings())[:2]:  # the profile, then the user
            with pytest.raises(Exception, match=r"ACCESS_DENIED|Not enough privileges|THERE_IS_NO_PROFILE"):
                db.query(statement)
    finally:
        db.close()


def test_sql_uses_the_reader_login_when_it_is_configured() -> None:
    settings = server_settings()
    reader = settings.as_reader()
    assert (reader.username, reader.password.get_secret_value()) == ("klines_reader", "r'ead\\er")
    single = ClickHouseSettings(dsn="http://clickhouse:8123", username="admin")
    assert single.as_reader() is single  # no reader password: the one login, as before
