"""Disk formats and blocking file work, as plain synchronous functions."""
