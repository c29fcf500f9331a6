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
