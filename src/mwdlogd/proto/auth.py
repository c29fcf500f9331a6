"""Bearer-token authentication with constant-time comparison."""

import hmac

import attrs


@attrs.frozen
class Credential:
    """A configured token: who it is, and the customers it may write (empty = any)."""

    name: str
    secret: bytes = attrs.field(repr=False)
    customers: frozenset[str] = frozenset()

    def allows(self, customer: object) -> bool:
        return not self.customers or customer in self.customers


class TokenTable:
    """Finds the credential for an `Authorization` header value, or None.

    Every configured token is compared, with hmac.compare_digest, whatever matched
    first: the time taken does not tell how much of a guess was right.
    """

    def __init__(self, credentials: list[Credential]) -> None:
        self._credentials = credentials

    def authenticate(self, authorization: bytes) -> Credential | None:
        scheme, _, presented = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        presented = presented.strip()
        found = None
        for credential in self._credentials:
            if hmac.compare_digest(credential.secret, presented):
                found = credential
        return found
