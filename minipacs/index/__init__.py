"""The SQL index: models, ingest and queries."""
