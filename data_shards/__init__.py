"""data_shards package."""
