"""A small plain-HTTP GET server for /health and /metrics (keep-alive, timeouts)."""

import logging
from collections.abc import Awaitable, Callable

import h11
import trio

from mwdlogd import log
from mwdlogd.servers.acceptor import serve_streams
from mwdlogd.servers.http_io import (
    Response,
    json_response,
    new_connection,
    read_event,
    reusable,
    send_response,
)
from mwdlogd.servers.listen import StreamListener, listen_address
from mwdlogd.servers.tls import peer_of
from mwdlogd.telemetry import Telemetry

Handler = Callable[[h11.Request], Awaitable[Response]]
# Scrapers and probes send small requests quickly; anything slower is not one of them.
IDLE_TIMEOUT_S = 30.0


async def run_plain_http(listener: StreamListener, handler: Handler, *, telemetry: Telemetry,
                         protocol: str,
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves `handler` on `listener` until cancelled (then closes it); reports `host:port`.
    `protocol` names the port in logs and metrics (accept failures, handler errors)."""

    async def serve(stream: trio.abc.Stream) -> None:
        try:
            await _serve_connection(stream, handler)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception:
            telemetry.handler_failed(protocol, peer_of(stream))

    task_status.started(listen_address(listener))
    await serve_streams([listener], serve, protocol=protocol, telemetry=telemetry)


async def _serve_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    conn = new_connection()
    while True:
        event = None
        with trio.move_on_after(IDLE_TIMEOUT_S):
            event = await read_event(conn, stream)
        if not isinstance(event, h11.Request):
            return
        if event.method not in (b"GET", b"HEAD"):
            response = json_response(405, {"error": "method_not_allowed",
                                           "detail": "only GET is served here"})
        else:
            response = await handler(event)
        while not isinstance(await read_event(conn, stream), h11.EndOfMessage):
            pass
        await send_response(conn, stream, response, head=event.method == b"HEAD")
        if not reusable(conn):
            return
        conn.start_next_cycle()


def not_found(request: h11.Request, known: str) -> Response:
    target = log.capped(request.target.decode("latin-1"))
    log.event(logging.DEBUG, "not_found", target=target)
    return json_response(404, {"error": "not_found",
                               "detail": f"{target} is not served; try {known}"})
