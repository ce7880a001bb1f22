-- In-progress klines as of the aggregator's last clock tick, versioned by the per-key snapshot sequence:
-- under FINAL each (symbol, interval, open_time) shows its latest snapshot.
CREATE TABLE IF NOT EXISTS {database}.{snapshots_table}
(
    symbol                 LowCardinality(String),
    interval               LowCardinality(String),
    open_time              Int64 COMMENT 'Binance t, ms since the epoch (UTC)',
    close_time             Int64,
    first_trade_id         Int64,
    last_trade_id          Int64,
    open                   Decimal(38, 18),
    high                   Decimal(38, 18),
    low                    Decimal(38, 18),
    close                  Decimal(38, 18),
    volume                 Decimal(38, 18),
    quote_volume           Decimal(38, 18),
    trade_count            UInt64,
    taker_buy_volume       Decimal(38, 18),
    taker_buy_quote_volume Decimal(38, 18),
    version                UInt64 COMMENT 'snapshot sequence, increasing per key',
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
