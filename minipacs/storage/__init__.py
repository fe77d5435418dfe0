"""The filesystem store: layout, atomic durable writes, reads."""
