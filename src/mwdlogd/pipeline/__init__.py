"""Pure record handling: normalisation and destination paths (DESIGN §2, §3)."""
