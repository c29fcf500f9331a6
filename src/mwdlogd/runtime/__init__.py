"""Trio tasks that own state: the router and the per-destination writers."""
