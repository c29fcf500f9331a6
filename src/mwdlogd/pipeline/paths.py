"""Destinations under the storage root from what a record says; no input can name a place
outside it."""

import hashlib
import re
from functools import lru_cache

from mwdlogd.model import CUSTOMER_CHARS, FQDN_CHARS, STREAM_DIRS, Destination

# DESIGN §2: longer names are cut; a hash suffix keeps distinct long names distinct.
MAX_NAME_BYTES = 200
_UNSAFE_CUSTOMER = re.compile(f"[^{CUSTOMER_CHARS}]")
_UNSAFE_FQDN = re.compile(f"[^{FQDN_CHARS}]")
_RESERVED = set(STREAM_DIRS.values())


# Engines send few distinct (customer, type, site, hour) files; caching the Destination
# skips the regexes for nearly every record, and a batch's records share one per file.
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


def customer_destination(customer: str, log_type: str, fqdn: str, hour_start: int
                         ) -> Destination:
    """`{customer}/{log_type}/{fqdn}/YYYY/MM/DD/HH.log.gz`, made safe; cached unless a name
    is longer than CACHED_CHARS."""
    if len(customer) + len(fqdn) > CACHED_CHARS:
        return _customer_destination(customer, log_type, fqdn, hour_start)
    return _cached_customer_destination(customer, log_type, fqdn, hour_start)


def _customer_destination(customer: str, log_type: str, fqdn: str, hour_start: int
                          ) -> Destination:
    return Destination(safe_customer(customer), log_type, safe_fqdn(fqdn), hour_start)


_cached_customer_destination = lru_cache(maxsize=FILE_CACHE)(_customer_destination)


@lru_cache(maxsize=FILE_CACHE)
def stream_destination(stream: str, hour_start: int) -> Destination:
    """The `_invalid` or `_unmatched` file of an hour (`stream`: "invalid", "unmatched")."""
    return Destination(None, stream, None, hour_start)
