"""Trio adapters between network streams and the sans-IO cores."""
