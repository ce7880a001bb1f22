-- access: server
-- Least privilege: a writer login for the writers and a read-only reader login for the gateway and `klines sql`.
-- Applied by `klines schema apply` on a ClickHouse server, as an admin with access management, once both
-- clickhouse.reader_password and clickhouse.writer_password are set (until then it is skipped and not recorded).
-- The passwords are never in this file: apply renders their SHA-256 from the settings. An embedded chDB
-- directory has no access storage (CREATE USER fails there), so the file is skipped there.
CREATE SETTINGS PROFILE IF NOT EXISTS {reader_profile}
    SETTINGS readonly = 2,
             max_execution_time = {reader_max_execution_time} CONST,
             max_result_rows = {reader_max_result_rows} CONST,
             result_overflow_mode = 'throw' CONST;
CREATE USER IF NOT EXISTS {reader_username}
    IDENTIFIED WITH sha256_hash BY '{reader_password_sha256}'
    SETTINGS PROFILE '{reader_profile}';
ALTER USER {reader_username}
    IDENTIFIED WITH sha256_hash BY '{reader_password_sha256}'
    SETTINGS PROFILE '{reader_profile}';
CREATE USER IF NOT EXISTS {writer_username}
    IDENTIFIED WITH sha256_hash BY '{writer_password_sha256}';
ALTER USER {writer_username}
    IDENTIFIED WITH sha256_hash BY '{writer_password_sha256}';
GRANT SELECT ON {database}.{finalized_table} TO {reader_username};
GRANT SELECT ON {database}.{snapshots_table} TO {reader_username};
GRANT INSERT, SELECT ON {database}.{finalized_table} TO {writer_username};
GRANT INSERT, SELECT ON {database}.{snapshots_table} TO {writer_username};
