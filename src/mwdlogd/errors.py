"""One exception per layer, all under MwdlogdError, so callers can catch a layer at once."""


class MwdlogdError(Exception):
    """Root of every error mwdlogd raises on purpose."""


class ConfigError(MwdlogdError):
    """A configuration key has a bad value; `key` is dotted as in config.toml (`tls.cert`)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class IngestError(MwdlogdError):
    """An HTTP ingest request is refused; carries what the server renders (like h11's hint).

    `error` is a short fixed code (it doubles as the metric's reason label), `detail`
    names the offending input and limit; `retry_after_s` overrides Retry-After.
    """

    def __init__(self, status: int, error: str, detail: str, *,
                 retry_after_s: int | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s


class StorageError(MwdlogdError):
    """A file operation under the storage root failed."""

    def __init__(self, path: str, op: str, reason: str) -> None:
        super().__init__(f"{op} {path}: {reason}")
        self.path = path
        self.op = op
        self.reason = reason


# --- decoding (codec, proto): plain ValueErrors, as the parsers they wrap raise -------


class TooDeep(ValueError):
    """A value nests arrays/objects deeper than `limit` (codec.MAX_DEPTH)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"nested deeper than {limit} levels")


class GzipTooLarge(ValueError):
    """The data inflates past the limit (a gzip bomb, or simply too much)."""


class GzipMalformed(ValueError):
    """The data is not whole, valid gzip."""


class ForwardProtocolError(MwdlogdError):
    """The peer broke the protocol; `reason` is a fixed code (the metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AuthFailed(MwdlogdError):
    """Authentication refused. `reason` is the metric label, `error` the client's code,
    `status` the HTTP status to answer with."""

    def __init__(self, reason: str, error: str, status: int, detail: str,
                 retry_after_s: int | None = None) -> None:
        super().__init__(f"{error}: {detail}")
        self.reason = reason
        self.error = error
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


# --- admission and commit (runtime) ----------------------------------------------------


class BudgetExceeded(MwdlogdError):
    """A charge larger than the whole budget: waiting would never help."""

    def __init__(self, needed: int, limit: int, what: str) -> None:
        super().__init__(f"{what} needs {needed} bytes of memory, over "
                         f"server.memory_limit={limit}")
        self.needed = needed
        self.limit = limit


class Refused(MwdlogdError):
    """The batch was not kept; the client may retry later (HTTP 503)."""

    reason = "refused"


class ShuttingDown(Refused):
    reason = "shutting_down"


class Overloaded(Refused):
    reason = "buffer_full"


class JournalFailed(Refused):
    reason = "journal_failed"


# --- start-up (servers) ----------------------------------------------------------------


class ListenFailed(MwdlogdError):
    """A port could not be bound; nothing was started."""


# --- commands (doctor, backup, archive) -----------------------------------------------


class ClientRefused(Exception):
    """The server refused our client certificate (an alert, or a close right after the
    handshake)."""


class BackupError(MwdlogdError):
    """A backup or restore refused or failed; the message names the file or member."""


class ArchiveBusy(MwdlogdError):
    """Another archive run holds the manifest."""


class StoreError(MwdlogdError):
    """An S3 call failed; `unreachable` when no further call can succeed this run."""

    def __init__(self, message: str, *, unreachable: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.code = code
