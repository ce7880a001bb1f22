"""klines: Binance-exact klines from aggTrade streams, on Kafka, into ClickHouse."""
