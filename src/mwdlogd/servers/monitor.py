"""The monitor port: Fluentd's monitor_agent API, the `/api/tail` WebSocket and
`POST /api/flush` (what `mwdlogd flush` calls: answers once the flush is done, with its
counts). Tail and flush need a bearer token of `auth.tokens` (the tail shows only its
customers); the plugins' settings (paths, binds, limits) need one without customer
restriction. Failures count towards the address's lockout (proto/auth.py).

trio-websocket only takes a raw stream, so the request head is read here with h11 and
the bytes already read are replayed to it (`_Replay`). Plain requests get one answer and
the connection closes.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import h11
import trio
import trio_websocket

from mwdlogd import log
from mwdlogd.errors import AuthFailed
from mwdlogd.live import Live
from mwdlogd.proto.auth import Identity
from mwdlogd.runtime.tail import TailFilter, TailHub
from mwdlogd.servers import monitor_agent
from mwdlogd.servers.acceptor import serve_streams
from mwdlogd.servers.http_io import RECEIVE_BYTES, Response, json_response, send_response
from mwdlogd.servers.listen import StreamListener, listen_address
from mwdlogd.servers.plain_http import not_found
from mwdlogd.servers.tls import peer_of
from mwdlogd.telemetry import Telemetry

HEAD_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024


class _Replay(trio.abc.Stream):
    """A stream that first gives back bytes already read from it."""

    def __init__(self, inner: trio.abc.Stream, already: bytes) -> None:
        self._inner = inner
        self._already = already
        self.socket = getattr(inner, "socket", None)  # whose peer it is (tls.peer_of)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._already:
            data, self._already = self._already, b""
            return data
        return bytes(await self._inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


Flush = Callable[[], Awaitable[dict[str, Any]]]


class MonitorServer:
    def __init__(self, *, listener: StreamListener, tail: TailHub, live: Live,
                 plugins: Callable[[], list[monitor_agent.Plugin]], flush: Flush,
                 telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._listener = listener
        self._tail = tail
        self._live = live
        self._plugins = plugins
        self._flush = flush

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled, then closes the listener."""
        task_status.started(listen_address(self._listener))
        await serve_streams([self._listener], self._handle, protocol="monitor",
                            telemetry=self._telemetry)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Never raises: an exception reaching serve_listeners would stop the server."""
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            raw = bytearray()
            event = None
            with trio.move_on_after(HEAD_TIMEOUT_S):
                while (event := conn.next_event()) is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    raw += data
                    conn.receive_data(bytes(data))
            if isinstance(event, h11.Request):
                await self._route(conn, stream, event, bytes(raw))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                trio_websocket.ConnectionClosed):
            pass
        except Exception:
            self._telemetry.handler_failed("monitor", peer_of(stream))
        finally:
            await trio.aclose_forcefully(stream)

    async def _route(self, conn: h11.Connection, stream: trio.abc.Stream,
                     request: h11.Request, raw: bytes) -> None:
        path, _, query = request.target.decode("latin-1").partition("?")
        authorization = _bearer(request, query)
        identity = None
        if path in ("/api/tail", "/api/flush") or (path.startswith("/api/plugins")
                                                   and authorization):
            try:
                identity = self._live.settings.authorizer.token(
                    authorization, protocol="monitor", source=peer_of(stream).host,
                    now=trio.current_time(), subject=None)
            except AuthFailed as exc:
                await send_response(conn, stream, _refusal(exc), close=True)
                return
        if path == "/api/tail":
            assert identity is not None
            await self._serve_tail(conn, stream, raw, query, identity)
            return
        if path == "/api/flush":
            response = await self._serve_flush(request)
        elif path in ("/api/plugins.json", "/api/plugins"):
            found = monitor_agent.select(self._plugins(), query)
            if identity is None or identity.customers is not None:
                found = monitor_agent.without_settings(found)
            response = Response(200, monitor_agent.as_json(found)) if path.endswith(".json") \
                else Response(200, monitor_agent.as_ltsv(found), b"text/plain; charset=utf-8")
        else:
            response = not_found(request, "/api/plugins.json or /api/tail")
        await send_response(conn, stream, response, close=True)

    async def _serve_flush(self, request: h11.Request) -> Response:
        if request.method != b"POST":
            return json_response(405, {"error": "method_not_allowed",
                                       "detail": "POST /api/flush"})
        log.event(logging.INFO, "flush_requested", via="/api/flush")
        return json_response(200, await self._flush())

    async def _serve_tail(self, conn: h11.Connection, stream: trio.abc.Stream, raw: bytes,
                          query: str, identity: Identity) -> None:
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            sample = min(1.0, max(0.0, float(options.get("sample", "1"))))
        except ValueError:
            sample = 1.0
        customer = options.get("customer")
        tail_filter = TailFilter.from_query(customer, options.get("log_type"),
                                            options.get("fqdn"), sample, identity.customers)
        if tail_filter.customer is not None and not identity.allows(tail_filter.customer):
            await send_response(conn, stream, json_response(403, {
                "error": "forbidden_customer",
                "detail": f"{identity.name} may not read customer {customer!r}"}), close=True)
            return
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, _Replay(stream, raw))
            websocket = await request.accept()
            nursery.start_soon(_cancel_when_closed, websocket, nursery.cancel_scope)
            log.event(logging.INFO, "tail_viewer_connected", filter=tail_filter)
            try:
                with self._tail.viewer(tail_filter) as records:
                    async for line in records:
                        await websocket.send_message(line.decode("utf-8", "replace"))
            finally:
                log.event(logging.INFO, "tail_viewer_left")
                nursery.cancel_scope.cancel()


async def _cancel_when_closed(websocket: trio_websocket.WebSocketConnection,
                             scope: trio.CancelScope) -> None:
    """Viewers send nothing; reading only notices when they go away."""
    try:
        while True:
            await websocket.get_message()
    except trio_websocket.ConnectionClosed:
        scope.cancel()


def _bearer(request: h11.Request, query: str) -> bytes | None:
    """The Authorization header, else `?token=` as a bearer token; None without either."""
    for name, value in request.headers:
        if name == b"authorization":
            return bytes(value)
    token = parse_qs(query).get("token")
    return b"Bearer " + token[-1].encode() if token else None


def _refusal(failed: AuthFailed) -> Response:
    headers = ((b"retry-after", str(failed.retry_after_s).encode()),) \
        if failed.retry_after_s else ()
    detail = "send Authorization: Bearer <token> or ?token=<token>" \
        if failed.reason == "missing_token" else failed.detail
    return json_response(failed.status, {"error": failed.error, "detail": detail}, headers)


