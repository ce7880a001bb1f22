-- Finalized (closed) klines, one row per (symbol, interval, open_time) under FINAL.
-- A corrected kline (late trade after a gap repair) carries a higher version and replaces the old row.
-- Provenance: the Kafka partition/offset of the record and the insert's deduplication token, so that an
-- audit can prove that no offset was committed before its rows were stored.
CREATE TABLE IF NOT EXISTS {database}.{finalized_table}
(
    symbol                 LowCardinality(String),
    interval               LowCardinality(String),
    open_time              Int64 COMMENT 'Binance t, ms since the epoch (UTC)',
    close_time             Int64 COMMENT 'Binance T = next open - 1 ms',
    first_trade_id         Int64 COMMENT 'Binance f; -1 for an empty kline',
    last_trade_id          Int64 COMMENT 'Binance L; -1 for an empty kline',
    open                   Decimal(38, 18),
    high                   Decimal(38, 18),
    low                    Decimal(38, 18),
    close                  Decimal(38, 18),
    volume                 Decimal(38, 18),
    quote_volume           Decimal(38, 18),
    trade_count            UInt64,
    taker_buy_volume       Decimal(38, 18),
    taker_buy_quote_volume Decimal(38, 18),
    version                UInt64,
    source                 LowCardinality(String),
    kafka_partition        Int32,
    kafka_offset           Int64,
    batch_token            String,
    inserted_at            DateTime64(3, 'UTC') DEFAULT now64(3),
    open_dt                DateTime64(3, 'UTC') ALIAS fromUnixTimestamp64Milli(open_time, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (symbol, interval, open_time)
SETTINGS non_replicated_deduplication_window = {dedup_window};
