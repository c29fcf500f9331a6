"""HTTPS ingest (DESIGN §1): TLS + h11 around the sans-IO RequestReader.

Each connection is one task in this server's handler nursery. `stop_accepting()` closes
the listeners and idle keep-alive connections; requests in flight finish and are
answered, then their connections close. `run` returns when the last one has.
"""

import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator

import h11
import trio

from mwdlogd import codec, log
from mwdlogd.config import HttpConfig
from mwdlogd.errors import BudgetExceeded, IngestError, Refused, ShuttingDown, TooDeep
from mwdlogd.live import Live
from mwdlogd.pipeline.normalize import Context, Routed, normalize_batch
from mwdlogd.proto.auth import Authorizer, Identity
from mwdlogd.proto.ingest import Accepted, Authenticate, RequestReader
from mwdlogd.proto.streamed import NdjsonSlicer
from mwdlogd.runtime.admission import Admission
from mwdlogd.runtime.batch import Committed, Submission, group_routed
from mwdlogd.runtime.budget import (
    INLINE_BYTES,
    OBJECT_BYTES,
    Budget,
    Lease,
    decode_off_loop,
    decoded_cost,
)
from mwdlogd.runtime.commit import Committer
from mwdlogd.runtime.dedupe import Dedupe
from mwdlogd.servers.acceptor import Acceptor, ConnectionLimits
from mwdlogd.servers.balance import Balance
from mwdlogd.servers.http_io import (
    RECEIVE_BYTES,
    Response,
    json_response,
    new_connection,
    read_event,
    reusable,
    send_response,
)
from mwdlogd.servers.listen import stream_listeners
from mwdlogd.servers.tls import cert_subject, handshake, peer_host, peer_name, peer_subject
from mwdlogd.storage.chunk_ids import dedupe_key
from mwdlogd.storage.spool import SpoolWriter
from mwdlogd.telemetry import Telemetry

# After refusing a body we did not read, keep reading (and discarding) briefly so the
# client sees our answer instead of a reset.
LINGER_S = 1.0
RETRY_AFTER_S = b"5"


class HttpsIngestServer:
    """Limits, tokens and the TLS context are read from `live` for each connection and
    request, so a reload applies to the next ones."""

    def __init__(self, *, live: Live, sock: socket.socket, committer: Committer,
                 admission: Admission, telemetry: Telemetry, limits: ConnectionLimits,
                 balance: Balance | None = None, budget: Budget | None = None,
                 decoder: trio.CapacityLimiter | None = None) -> None:
        self._live = live
        self._budget = budget or Budget(live.config.server.memory_limit)
        self._decoder = decoder or trio.CapacityLimiter(1)
        self._sock = sock
        self._committer = committer
        self._admission = admission
        self._telemetry = telemetry
        self._acceptor = Acceptor("http", telemetry, limits, balance)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop_accepting()`, then returns once every connection has closed."""
        await self._acceptor.serve(stream_listeners(self._sock, self._ssl_context),
                                   self._handle, task_status)

    def _ssl_context(self) -> ssl.SSLContext:
        context = self._live.settings.ssl_context
        assert context is not None  # HTTPS always has one (App loads it before serving)
        return context

    def stop_accepting(self) -> None:
        self._acceptor.stop()

    @property
    def draining(self) -> bool:
        return self._acceptor.draining

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """Never raises: an exception reaching serve_listeners would stop the server."""
        self._telemetry.connection_opened("http")
        peer = peer_name(stream)
        try:
            if await handshake(stream, protocol="http", peer=peer,
                               timeout_s=self._live.config.http.request_timeout,
                               telemetry=self._telemetry):
                peer = peer_name(stream)
                await self._serve_connection(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.event(logging.DEBUG, "connection_lost", peer=peer)
        except Exception:
            self._telemetry.handler_failed("http", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        conn = new_connection()
        client = cert_subject(stream)
        while not self.draining:
            request = await self._next_request(conn, stream, peer)
            if request is None:
                return
            answered = await self._serve_request(conn, stream, request, peer, client)
            if not answered or not reusable(conn):
                return
            conn.start_next_cycle()

    def _timed_out(self) -> IngestError:
        return IngestError(408, "request_timeout", f"request not received within "
                                                   f"http.request_timeout="
                                                   f"{self._live.config.http.request_timeout}s")

    async def _next_request(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                            peer: str) -> h11.Request | None:
        """The next request head, or None on EOF, idle timeout or drain. The idle timeout
        runs until the head's first byte, http.request_timeout from then on (a head
        dripped byte by byte gets 408)."""
        config = self._live.config.http
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with self._acceptor.idle(config.idle_timeout):
                    conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return None  # idle timeout, drain
                with trio.move_on_after(config.request_timeout):
                    event = await read_event(conn, stream)
                if event is h11.NEED_DATA:
                    await self._refuse(conn, stream, peer, self._timed_out())
                    return None
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, stream, peer, IngestError(
                exc.error_status_hint, "bad_http", str(exc)))
            return None
        return event if isinstance(event, h11.Request) else None

    async def _serve_request(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                             request: h11.Request, peer: str, client: str) -> bool:
        """Read, judge, commit and answer one request; False when the answer could not be
        sent (the connection is done). `http.request_timeout` bounds reading the body and
        sending the answer, never the wait for the journal: a request that has arrived
        whole is answered by its commit's outcome."""
        received_at = time.time()
        settings = self._live.settings
        http = settings.config.http
        room_deadline = trio.current_time() + http.full_wait
        with self._budget.lease() as lease:
            try:
                reader = RequestReader(request, body_limit=http.body_size_limit,
                                       authenticate=self._authenticate(stream,
                                                                       settings.authorizer),
                                       max_records=http.max_records_per_request,
                                       stream_limit=http.stream_body_limit)
                await self._hold_while_full(http, _declared_length(request), room_deadline)
                if reader.streamed:
                    return await self._serve_streamed(
                        conn, stream, reader, peer, client, received_at,
                        self._live_body(http, conn, stream, reader))
                await self._read_body(http, conn, stream, reader, lease)
                try:
                    accepted, routed = await self._decode(reader, lease, received_at,
                                                          room_deadline)
                except IngestError as exc:
                    if exc.error != "body_too_large" or not reader.gzip \
                            or not reader.stream_limit:
                        raise
                    # gzip ndjson inflating past body_size_limit: stream what was read
                    lease.shrink_to(reader.received)
                    return await self._serve_streamed(conn, stream, reader, peer, client,
                                                      received_at, reader.pieces())
                if accepted.invalid_utf8:
                    self._telemetry.invalid_utf8_kept("http", peer, accepted.tag,
                                                      accepted.invalid_utf8)
            except TooDeep:
                return await self._refuse(conn, stream, peer, IngestError(
                    400, "too_deep", f"a record nests deeper than {codec.MAX_DEPTH} levels"))
            except BudgetExceeded as exc:
                return await self._refuse(conn, stream, peer,
                                          IngestError(413, "memory_budget", str(exc)))
            except IngestError as exc:
                return await self._refuse(conn, stream, peer, exc)
            except h11.RemoteProtocolError as exc:
                return await self._refuse(conn, stream, peer, IngestError(
                    exc.error_status_hint, "bad_http", str(exc)))
            commit_started = trio.current_time()
            try:
                committed = await self._committer.commit(
                    accepted.tag, routed,
                    dedupe=_dedupe(http, accepted.identity.name, client, accepted.digest),
                    room_wait_s=max(0.0, room_deadline - commit_started))
            except Refused as exc:
                return await self._refuse(conn, stream, peer,
                                          IngestError(503, exc.reason, str(exc)))
        return await self._answer(conn, stream, accepted.tag, len(routed), committed,
                                  trio.current_time() - commit_started)

    async def _answer(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                      tag: str, records: int, committed: Committed, latency_s: float) -> bool:
        self._telemetry.http_accepted(tag, records, latency_s, committed.duplicate)
        answer = {"records": records,
                  **({"duplicate": True} if committed.duplicate else {})}
        return await self._send(conn, stream, json_response(200, answer), close=self.draining)

    async def _serve_streamed(self, conn: h11.Connection,
                              stream: trio.SSLStream[trio.SocketStream], reader: RequestReader,
                              peer: str, client: str, received_at: float,
                              body: AsyncIterator[bytes]) -> bool:
        """A large ndjson body: each slice is decoded, normalised and spooled as it
        arrives; the spool file is committed (one journal record naming it) once the
        whole body is in it and fsynced. Anything short of that deletes the file, so a
        refused request keeps nothing."""
        http = self._live.config.http
        fsync = self._live.config.buffer.fsync
        spool = await trio.to_thread.run_sync(SpoolWriter, self._committer.spools.directory)
        keep, refusal = False, None
        try:
            invalid = await self._spool_body(http, body, reader, spool, received_at)
            if invalid:
                self._telemetry.invalid_utf8_kept("http", peer, reader.tag, invalid)
            await trio.to_thread.run_sync(spool.seal, fsync)
            commit_started = trio.current_time()
            submission = Submission(reader.tag, [], spool=spool.name, pieces=spool.pieces)
            committed = await self._committer.commit_submission(
                submission, dedupe=_dedupe(http, reader.identity.name, client, reader.digest),
                room_wait_s=http.full_wait)
            keep = not committed.duplicate
        except Refused as exc:
            refusal = IngestError(503, exc.reason, str(exc))
        except TooDeep:
            refusal = IngestError(400, "too_deep",
                                  f"a record nests deeper than {codec.MAX_DEPTH} levels")
        except BudgetExceeded as exc:
            refusal = IngestError(413, "memory_budget", str(exc))
        except IngestError as exc:
            refusal = exc
        except h11.RemoteProtocolError as exc:
            refusal = IngestError(exc.error_status_hint, "bad_http", str(exc))
        finally:  # before any answer: a refused request has left nothing behind
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spool.close if keep else spool.discard)
        if refusal is not None:
            return await self._refuse(conn, stream, peer, refusal)
        return await self._answer(conn, stream, reader.tag, submission.count, committed,
                                  trio.current_time() - commit_started)

    async def _live_body(self, http: HttpConfig, conn: h11.Connection,
                         stream: trio.SSLStream[trio.SocketStream],
                         reader: RequestReader) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (counted and hashed by `reader`).
        `http.request_timeout` bounds each wait for more, not the whole body (256 MiB
        takes a while on a slow link)."""
        while True:
            event = None
            with trio.move_on_after(http.request_timeout):
                event = await read_event(conn, stream)
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise IngestError(408, "request_timeout", f"no body bytes for "
                                  f"http.request_timeout={http.request_timeout}s")
            reader.receive_data(event.data)
            yield event.data

    async def _spool_body(self, http: HttpConfig, body: AsyncIterator[bytes],
                          reader: RequestReader, spool: SpoolWriter,
                          received_at: float) -> int:
        """Spool each slice of the body; the records kept with invalid UTF-8."""
        slicer = NdjsonSlicer(gzip=reader.gzip, limit=http.stream_body_limit,
                              line_limit=http.body_size_limit)
        records = invalid = 0
        with self._budget.lease() as lease:
            async for data in body:
                for piece in slicer.feed(data):
                    count, bad = await self._spool_slice(reader, piece, spool, lease,
                                                         received_at)
                    records, invalid = records + count, invalid + bad
            for piece in slicer.end():
                count, bad = await self._spool_slice(reader, piece, spool, lease, received_at)
                records, invalid = records + count, invalid + bad
        if not records:
            raise IngestError(400, "empty_body", "request body is empty")
        return invalid

    async def _spool_slice(self, reader: RequestReader, piece: bytes, spool: SpoolWriter,
                           lease: Lease, received_at: float) -> tuple[int, int]:
        """Decode, normalise and spool one slice under the memory budget; its records
        and those of them with invalid UTF-8."""
        deadline = trio.current_time() + self._live.config.http.full_wait
        await self._reserve(lease, decoded_cost(reader.records_at_most(piece), len(piece)),
                            "decoded slice", deadline)
        hostname = self._live.config.server.hostname

        def work() -> tuple[int, int]:
            accepted = reader.decode(piece)
            ctx = Context(accepted.tag, received_at, accepted.default_time or received_at,
                          hostname)
            routed = normalize_batch(accepted.with_text(), ctx)
            groups = group_routed(accepted.tag, routed).groups
            spool.add([(g.path, g.hour, g.count, g.data) for g in groups])
            return len(routed), accepted.invalid_utf8

        try:
            return await trio.to_thread.run_sync(work, limiter=self._decoder)
        finally:
            lease.shrink_to(0)

    async def _hold_while_full(self, http: HttpConfig, size: int, deadline: float) -> None:
        """While the buffer has no room for about `size` bytes, leave the body unread (the
        client waits, as TCP backpressure makes forward clients wait) until there is
        room or `deadline`."""
        if not await self._admission.wait_for_room(size, deadline):
            if self._admission.stopping:
                raise IngestError(503, ShuttingDown.reason, "server is shutting down; "
                                  "nothing of this request was kept, retry")
            raise IngestError(503, "buffer_full", f"buffer holds "
                              f"{self._admission.buffered_bytes} bytes, no room for "
                              f"{size} more within buffer.total_limit for "
                              f"http.full_wait={http.full_wait}s; retry later")

    async def _read_body(self, http: HttpConfig, conn: h11.Connection,
                         stream: trio.SSLStream[trio.SocketStream],
                         reader: RequestReader, lease: Lease) -> None:
        with trio.move_on_after(http.request_timeout):
            while isinstance(event := await read_event(conn, stream), h11.Data):
                await lease.grow(len(event.data), "request body")  # waiting stops reading
                reader.receive_data(event.data)
            return
        raise IngestError(408, "request_timeout", f"request not received within "
                          f"http.request_timeout={http.request_timeout}s")

    async def _send(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                    response: Response, *, close: bool) -> bool:
        """Send an answer within http.request_timeout; False when the client did not take it."""
        with trio.move_on_after(self._live.config.http.request_timeout):
            await send_response(conn, stream, response, close=close)
            return True
        return False

    async def _decode(self, reader: RequestReader, lease: Lease, received_at: float,
                      deadline: float) -> tuple[Accepted, list[Routed]]:
        """Gunzip, decode and normalise under the memory budget, off the event loop when
        large; the lease ends up holding the body and the records' estimated size."""
        raw = reader.received
        if reader.gzip:
            await self._reserve(lease, reader.limit, "gunzip output", deadline)
        else:
            await self._reserve(lease, raw, "request body copy", deadline)
        body = await decode_off_loop(reader.inflate, inline=not reader.gzip,
                                     limiter=self._decoder)
        lease.shrink_to(raw + len(body))
        await self._reserve(lease, decoded_cost(reader.records_at_most(body), len(body))
                            + reader.built_at_once(body) * OBJECT_BYTES, "decoded records",
                            deadline)

        def decode() -> tuple[Accepted, list[Routed]]:
            accepted = reader.decode(body)
            ctx = Context(accepted.tag, received_at, accepted.default_time or received_at,
                          self._live.config.server.hostname)
            return accepted, normalize_batch(accepted.with_text(), ctx)

        accepted, routed = await decode_off_loop(decode, inline=len(body) <= INLINE_BYTES,
                                                 limiter=self._decoder)
        lease.shrink_to(raw + decoded_cost(len(routed), len(body)))
        return accepted, routed

    async def _reserve(self, lease: Lease, size: int, what: str, deadline: float) -> None:
        """Take `size` of the budget, waiting for room until `deadline` (http.full_wait
        after the request began), else 503 (retry later); BudgetExceeded (413) when it
        could never fit."""
        with trio.move_on_at(deadline):
            await lease.grow(size, what)
            return
        raise IngestError(503, "memory_budget",
                          f"{what} needs {size} bytes but server.memory_limit="
                          f"{self._budget.limit} is in use by other requests "
                          f"({self._budget.used} bytes); retry later")

    @staticmethod
    def _authenticate(stream: trio.SSLStream[trio.SocketStream],
                      authorizer: Authorizer) -> Authenticate:
        def authenticate(authorization: bytes | None) -> Identity:
            return authorizer.token(authorization, protocol="http", source=peer_host(stream),
                                    now=trio.current_time(), subject=peer_subject(stream))
        return authenticate

    async def _refuse(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                      peer: str, error: IngestError) -> bool:
        """Answer with the error as JSON; close when the body was not read in full."""
        self._telemetry.http_rejected(peer, error.status, error.error, error.detail)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        retry_after = str(error.retry_after_s).encode() if error.retry_after_s else \
            RETRY_AFTER_S if error.status == 503 else None
        headers = ((b"retry-after", retry_after),) if retry_after else ()
        body_unread = conn.their_state is not h11.DONE
        sent = await self._send(conn, stream, json_response(
            error.status, {"error": error.error, "detail": error.detail}, headers),
            close=body_unread or self.draining)
        if body_unread and sent:
            await _linger(stream)
        return sent


def _dedupe(http: HttpConfig, identity: str, client: str, digest: bytes) -> Dedupe | None:
    """Who sent which bytes: a resend of them within http.dedupe_window is not stored
    again. None when the window is 0 (off)."""
    if not http.dedupe_window:
        return None
    key = dedupe_key(b"http", identity.encode(), client.encode(), digest)
    return Dedupe(key, http.dedupe_window)


def _declared_length(request: h11.Request) -> int:
    """The body size the client declared (1 when chunked): the room a request waits for
    before its body is read."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 1


async def _linger(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(LINGER_S):
        try:
            while await stream.receive_some(64 * 1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

