"""Operator commands that work on a stopped or running server's files: archive to S3,
backup and restore. Blocking, single-threaded; no Trio."""
