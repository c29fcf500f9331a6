"""Destination paths under the storage root; no input can name a place outside it."""

import hashlib
import re
import time
from functools import lru_cache

INVALID_DIR = "_invalid"
UNMATCHED_DIR = "_unmatched"
# DESIGN §2: longer names are cut; a hash suffix keeps distinct long names distinct.
MAX_NAME_BYTES = 200
_UNSAFE_CUSTOMER = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_FQDN = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED = {INVALID_DIR, UNMATCHED_DIR}


# Engines send few distinct (customer, type, site, hour) files; caching the path skips the
# regexes for nearly every record.
FILE_CACHE = 16384
# Only names this short are cached: a cache bounded by count holds its keys, and 200
# customer names of 1 MB kept 464 MB. Real names are far shorter.
CACHED_CHARS = 512


def safe_customer(name: str) -> str:
    """Directory name for a customer: `[A-Za-z0-9_-]` only, never a reserved stream name."""
    safe = _bounded(_UNSAFE_CUSTOMER.sub("_", name), name)
    return "_" + safe if safe in _RESERVED else safe


def safe_fqdn(name: str) -> str:
    """Directory name for a site: `[A-Za-z0-9._-]` only, never empty, `.`-led or too long."""
    safe = _UNSAFE_FQDN.sub("_", name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return _bounded(safe, name)


def _bounded(safe: str, original: str) -> str:
    if not safe:
        return "_"
    if len(safe) > MAX_NAME_BYTES:  # safe names are ASCII: characters == bytes
        digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{safe[: MAX_NAME_BYTES - 17]}_{digest}"
    return safe


@lru_cache(maxsize=4096)
def hour_path(hour_start: int) -> str:
    """`YYYY/MM/DD/HH.log.gz` for the UTC hour that starts at epoch second `hour_start`."""
    return time.strftime("%Y/%m/%d/%H.log.gz", time.gmtime(hour_start))


def customer_file(customer: str, log_type: str, fqdn: str, hour_start: int) -> str:
    """`{customer}/{log_type}/{fqdn}/YYYY/MM/DD/HH.log.gz`, made safe; cached unless a name
    is longer than CACHED_CHARS."""
    if len(customer) + len(fqdn) > CACHED_CHARS:
        return _customer_file(customer, log_type, fqdn, hour_start)
    return _cached_customer_file(customer, log_type, fqdn, hour_start)


def _customer_file(customer: str, log_type: str, fqdn: str, hour_start: int) -> str:
    return f"{safe_customer(customer)}/{log_type}/{safe_fqdn(fqdn)}/{hour_path(hour_start)}"


_cached_customer_file = lru_cache(maxsize=FILE_CACHE)(_customer_file)


def stream_file(stream_dir: str, hour_start: int) -> str:
    return f"{stream_dir}/{hour_path(hour_start)}"
