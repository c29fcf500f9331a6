"""A load client for subprocess tests: threads posting batches with unique ids over mTLS,
recording every acked id and every status, following the server across restarts."""

from __future__ import annotations

import http.client
import itertools
import json
import random
import ssl
import threading
from collections import Counter

from helpers import TOKEN

BATCH = 40
CLIENTS = 3


class Load:
    """Client threads that follow the server across restarts."""

    def __init__(self, context: ssl.SSLContext, *, pad: int = 200,
                 customers: tuple[str, ...] = ("c0", "c1", "c2"),
                 requests_per_connection: int = 0) -> None:
        """`requests_per_connection` > 0 reconnects that often (so that connections
        spread over the workers of a multi-process server) and also straight after a
        broken connection (another worker is still there)."""
        self.context = context
        self.requests_per_connection = requests_per_connection
        self.pad = pad
        self.customers = customers
        self.acked: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self._ids = itertools.count()
        self._port: int | None = None
        self._stop = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def serve(self, port: int | None) -> None:
        with self._changed:
            self._port = port
            self._changed.notify_all()

    def wait_for_acks(self, more_than: int, timeout: float = 30) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.acked) > more_than, timeout)

    def wait_for_status(self, status: int, timeout: float = 60) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.statuses[status] > 0, timeout), \
                f"no {status} answer; statuses so far: {dict(self.statuses)}"

    def stop(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(30)

    def _next_port(self) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: self._stop or self._port is not None)
            return None if self._stop else self._port

    def _run(self) -> None:
        while (port := self._next_port()) is not None:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=self.context,
                                                     timeout=30)
            try:
                for sent in itertools.count(1):
                    if self._stop or port != self._port:
                        break
                    self._post(connection)
                    if sent == self.requests_per_connection:
                        break
            except (OSError, http.client.HTTPException):
                if self.requests_per_connection:
                    continue
                with self._changed:  # server gone: wait for the next one
                    self._changed.wait_for(lambda p=port: self._stop or self._port != p)
            finally:
                connection.close()

    def _post(self, connection: http.client.HTTPSConnection) -> None:
        ids = [f"k{next(self._ids)}" for _ in range(BATCH)]
        rng = random.Random(ids[0])
        body = "".join(json.dumps({
            "id": i, "customer_name": rng.choice(self.customers),
            "fqdn": f"s{rng.randrange(3)}.test", "log_type": rng.choice(["nginx", "openappsec"]),
            "time": 1732500000 + rng.randrange(3) * 3600,
            "pad": rng.randbytes(rng.randrange(self.pad) // 2 + 1).hex()})
            + "\n" for i in ids).encode()
        connection.request("POST", "/nginx.access", body, {
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
        response = connection.getresponse()
        response.read()
        with self._changed:
            self.statuses[response.status] += 1
            if response.status == 200:
                self.acked.update(ids)
            self._changed.notify_all()
