"""What several services share: settings, Kafka clients, the ClickHouse path, logging, shutdown."""
