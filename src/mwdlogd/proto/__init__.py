"""Sans-IO protocol cores: bytes and h11 events in, values and errors out. No I/O here."""
