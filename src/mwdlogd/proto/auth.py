"""Who a client is and which customers it may write and read: one model for every door.

An `Identity` is what HTTPS ingest, forward ingest and the live tail each work out from
their credentials (certificate subject, bearer token, forward user); `Identity.allows`
is the only customer check. `Authorizer` turns credentials into identities, compares
secrets in constant time and throttles addresses that keep failing. Sans-IO: callers
pass the peer's address, certificate subject and the current time.
"""

import hmac
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from mwdlogd.errors import AuthFailed

Customers = frozenset[str] | None  # None: any customer
# A refusal quotes at most this much of the customer name it refuses (it comes from the peer).
SHOWN_CHARS = 80
# Addresses whose recent failures are remembered; the oldest is forgotten past this, so
# an attacker with many addresses costs bounded memory (about 200 bytes each).
MAX_TRACKED_SOURCES = 4096


def _narrow(a: Customers, b: Customers) -> Customers:
    """Both restrictions apply: the customers allowed by each."""
    if a is None:
        return b
    return a if b is None else a & b


@attrs.frozen
class Identity:
    """A client as authenticated: `name` for messages, `customers` it may use."""

    name: str
    customers: Customers = None

    def allows(self, customer: object) -> bool:
        """A restricted identity matches `customer_name` exactly (a missing one never)."""
        return self.customers is None or (isinstance(customer, str)
                                          and customer in self.customers)

    def first_forbidden(self, records: Iterable[Mapping[str, Any]]) -> tuple[int, object] | None:
        """(index, customer_name) of the first record this identity may not write."""
        if self.customers is None:
            return None
        for index, record in enumerate(records):
            customer = record.get("customer_name")
            if not self.allows(customer):
                return index, customer
        return None

    def refusal(self, where: str, customer: object) -> str:
        """The message for a record this identity may not write: `where` it is, who."""
        shown = repr(customer)
        if len(shown) > SHOWN_CHARS:
            shown = shown[:SHOWN_CHARS - 3] + "..."
        return f"{where}: {self.name} may not write customer_name {shown}"

    def narrowed(self, customers: Customers, also: str) -> "Identity":
        name = f"{self.name} {also}" if self.name else also
        return Identity(name, _narrow(self.customers, customers))


ANONYMOUS = Identity("")  # no credential at all: plain TCP forward without a shared key


@attrs.frozen
class Credential:
    """A configured token: its name, the customers it may use (empty = any) and the
    certificate subjects it is valid with (empty = any, or none)."""

    name: str
    secret: bytes = attrs.field(repr=False)
    customers: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()


@attrs.frozen
class ThrottleSettings:
    failures: int = 5  # 0 = never throttle
    window_s: float = 10.0
    lockout_s: float = 60.0


class FailureThrottle:
    """Counts failed authentications per source address; `failures` within `window_s`
    lock that address out for `lockout_s`, whatever it presents meanwhile (so a right
    guess during the lockout tells nothing). Outlives reloads: the settings come with
    each failure."""

    def __init__(self, *, max_sources: int = MAX_TRACKED_SOURCES) -> None:
        self._max_sources = max_sources
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: OrderedDict[str, float] = OrderedDict()  # source -> locked until

    def locked_for(self, source: str, now: float) -> float:
        """Seconds this source stays locked out (0 when it is not)."""
        until = self._locked.get(source)
        if until is None:
            return 0.0
        if until <= now:
            del self._locked[source]
            return 0.0
        return until - now

    def failed(self, source: str, now: float, settings: ThrottleSettings) -> bool:
        """Record a failure; True when it locks the source out."""
        limit = settings.failures
        if limit <= 0:
            return False
        times = deque(self._recent.pop(source, ()), maxlen=limit)
        times.append(now)
        if len(times) == limit and now - times[0] <= settings.window_s:
            _bounded_put(self._locked, source, now + settings.lockout_s, self._max_sources)
            return True
        _bounded_put(self._recent, source, times, self._max_sources)
        return False


def _bounded_put(table: "OrderedDict[str, Any]", key: str, value: Any, limit: int) -> None:
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


# (protocol, source, reason, detail): counted and logged by the caller's telemetry.
Report = Callable[[str, str, str, str], None]


def _ignore(protocol: str, source: str, reason: str, detail: str) -> None:
    pass


class Authorizer:
    """Credentials -> Identity for every door, with throttling of failed attempts.

    `clients` restricts certificate subjects, `users` forward usernames; a subject or
    user not listed is not restricted. Restrictions combine: a token limited to acme used
    with a certificate limited to acme and beta may write acme only.
    """

    def __init__(self, tokens: Iterable[Credential], *,
                 clients: Mapping[str, frozenset[str]] | None = None,
                 users: Mapping[str, frozenset[str]] | None = None,
                 throttle: ThrottleSettings | None = None,
                 failures: FailureThrottle | None = None, report: Report = _ignore) -> None:
        """`failures` is the lockout state, passed on from the Authorizer a reload
        replaces so that a reload does not lift lockouts."""
        self._tokens = list(tokens)
        self._clients = dict(clients or {})
        self._users = dict(users or {})
        self._settings = throttle or ThrottleSettings()
        self.failures = failures or FailureThrottle()
        self._report = report

    def certificate(self, subject: str | None) -> Identity:
        """The identity a client certificate alone gives (no certificate: anonymous)."""
        if subject is None:
            return ANONYMOUS
        return Identity(f"certificate {subject!r}", self._restriction(self._clients, subject))

    def forward_user(self, identity: Identity, username: str) -> Identity:
        """After a successful PING: narrowed by the user's customers."""
        if not username:
            return identity
        return identity.narrowed(self._restriction(self._users, username),
                                 f"user {username!r}")

    def admit(self, protocol: str, source: str, now: float) -> None:
        """Raises AuthFailed (429) while `source` is locked out."""
        locked = self.failures.locked_for(source, now)
        if locked:
            wait = int(locked) + 1
            self._report(protocol, source, "throttled", f"locked out for {wait} more s")
            raise AuthFailed("throttled", "too_many_auth_failures", 429,
                             f"too many failed authentications from {source}; retry in "
                             f"{wait} s", retry_after_s=wait)

    def failed(self, protocol: str, source: str, reason: str, detail: str, now: float) -> None:
        """Count a failure (`token` calls it; forward's adapter for a PONG false); the
        one that reaches the limit locks `source` out."""
        self._report(protocol, source, reason, detail)
        if self.failures.failed(source, now, self._settings):
            self._report(protocol, source, "locked_out",
                         "failure limit reached (auth.failure_limit within "
                         "auth.failure_window); locked out for auth.lockout")

    def token(self, authorization: bytes | None, *, protocol: str, source: str, now: float,
              subject: str | None) -> Identity:
        """The identity of a bearer token presented with certificate `subject` (None: no
        certificate, as on the monitor port: subject-bound tokens are refused there).
        Raises AuthFailed."""
        self.admit(protocol, source, now)
        try:
            credential = self._credential(authorization)
            if credential.subjects and subject not in credential.subjects:
                shown = "no client certificate" if subject is None else \
                    f"certificate subject {subject!r}"
                raise AuthFailed("subject_mismatch", "subject_mismatch", 403,
                                 f"token {credential.name!r} is not valid with {shown}")
        except AuthFailed as exc:
            self.failed(protocol, source, exc.reason, exc.detail, now)
            raise
        identity = Identity(f"token {credential.name!r}", credential.customers or None)
        if subject is None:
            return identity
        return identity.narrowed(self._restriction(self._clients, subject),
                                 f"with certificate {subject!r}")

    def _credential(self, authorization: bytes | None) -> Credential:
        """Every configured token is compared, with hmac.compare_digest, whatever matched
        first: the time taken does not tell how much of a guess was right."""
        if authorization is None:
            raise AuthFailed("missing_token", "unauthorized", 401,
                             "no Authorization: Bearer header")
        scheme, _, presented = authorization.strip().partition(b" ")
        presented = presented.strip()
        found = None
        for credential in self._tokens:
            if hmac.compare_digest(credential.secret, presented):
                found = credential
        if found is None or scheme.lower() != b"bearer":
            raise AuthFailed("unknown_token", "unauthorized", 401, "bearer token is not known")
        return found

    @staticmethod
    def _restriction(table: Mapping[str, frozenset[str]], key: str) -> Customers:
        return table.get(key) or None
