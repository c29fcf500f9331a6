"""The values a record travels in from the socket to its file: the bottom layer.

Imports nothing of mwdlogd but `errors`, so every layer (proto, pipeline, storage, runtime,
servers) can name these types and none has to take apart a string another one built.
"""

import re
import time
from functools import lru_cache

import attrs

from mwdlogd.errors import StorageError

# Characters a customer or site directory may hold (pipeline/paths.py replaces the rest).
CUSTOMER_CHARS = "A-Za-z0-9_-"
FQDN_CHARS = "A-Za-z0-9._-"
LOG_TYPES = frozenset({"nginx", "openappsec"})
# The two streams of records that have no customer file, and their directories.
STREAM_DIRS = {"invalid": "_invalid", "unmatched": "_unmatched"}
_STREAM_NAMES = {directory: name for name, directory in STREAM_DIRS.items()}

_CUSTOMER = re.compile(f"[{CUSTOMER_CHARS}]+")
_FQDN = re.compile(f"[{FQDN_CHARS}]+")


@lru_cache(maxsize=4096)
def hour_path(hour_start: int) -> str:
    """`YYYY/MM/DD/HH.log.gz` for the UTC hour that starts at epoch second `hour_start`."""
    return time.strftime("%Y/%m/%d/%H.log.gz", time.gmtime(hour_start))


def _relative_path(destination: "Destination") -> str:
    hour = hour_path(destination.hour)
    if destination.customer is None:
        return f"{STREAM_DIRS[destination.log_type]}/{hour}"
    return f"{destination.customer}/{destination.log_type}/{destination.fqdn}/{hour}"


@attrs.frozen(cache_hash=True)
class Destination:
    """One hourly file: `{customer}/{log_type}/{fqdn}/YYYY/MM/DD/HH.log.gz`, or for the
    streams `_invalid/...` and `_unmatched/...` (`log_type` is then "invalid" or
    "unmatched", customer and fqdn None): the same words the metrics label and the live
    tail filters on, so neither parses a path.

    Names are directory names already made safe: build them with pipeline/paths.py
    (`customer_destination`, `stream_destination`), which caches them, so a batch's
    records share one Destination per file. `path`, relative to the storage root, is
    derived once, here.
    """

    customer: str | None
    log_type: str
    fqdn: str | None
    hour: int  # epoch second the UTC hour starts at
    path: str = attrs.field(init=False, eq=False, repr=False,
                            default=attrs.Factory(_relative_path, takes_self=True))

    @classmethod
    def from_path(cls, path: str, hour: int) -> "Destination":
        """The Destination a journal or spool record names by its path: the on-disk format
        keeps paths as text, byte-identical across versions.

        Why parse back rather than keep paths beside Destinations after recovery: then one
        type goes from normalising to the file, and router, tail and metrics have no second,
        path-keyed way in. Only a path its Destination gives back exactly is accepted (safe
        names, a known log type or stream, the record's hour), so a damaged record cannot
        name a file outside the tree. Raises StorageError."""
        parts = path.split("/")
        if len(parts) == 5 and parts[0] in _STREAM_NAMES:
            destination = cls(None, _STREAM_NAMES[parts[0]], None, hour)
        elif len(parts) == 7 and parts[1] in LOG_TYPES and parts[0] not in _STREAM_NAMES \
                and _CUSTOMER.fullmatch(parts[0]) and _FQDN.fullmatch(parts[2]) \
                and not parts[2].startswith("."):
            destination = cls(parts[0], parts[1], parts[2], hour)
        else:
            destination = None
        if destination is None or destination.path != path:
            raise StorageError(path, "read destination",
                               f"not the hourly file of a record of hour {hour}")
        return destination


@attrs.frozen
class Group:
    """A batch's records for one hourly file, as newline-terminated JSON lines: what goes
    from normalising through the journal (or a spool file) to the file's writer."""

    destination: Destination
    data: bytes
    count: int


@attrs.frozen
class Peer:
    """Who is on the other end of a connection, read once from the socket and the TLS
    certificate. `str()` is the `ip:port/CN` text the logs have always shown."""

    host: str  # IP address; "unknown" when the stream has no socket
    port: int | None = None
    common_name: str | None = None  # the client certificate's CN
    subject: str = ""  # its whole subject, `commonName=a,organizationName=b`; "" without one

    @property
    def identity(self) -> str:
        """Whom a forward chunk id belongs to: the certificate's CN, else the address
        (what the `ip:port/CN` text was once parsed back into)."""
        return self.host if self.common_name is None else self.common_name

    def __str__(self) -> str:
        name = self.host if self.port is None else f"{self.host}:{self.port}"
        return name if self.common_name is None else f"{name}/{self.common_name}"
