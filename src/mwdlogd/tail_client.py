"""`mwdlogd tail`: print records live from a server's `/api/tail` WebSocket."""

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlencode

import trio
import trio_websocket

from mwdlogd.errors import MwdlogdError

COLOURS = {"nginx": "\x1b[36m", "openappsec": "\x1b[35m", "invalid": "\x1b[31m"}
RESET, DIM = "\x1b[0m", "\x1b[2m"


def tail_url(monitor: str, *, token: str, customer: str | None, log_type: str | None,
             fqdn: str | None, sample: float) -> str:
    query = {k: v for k, v in (("token", token), ("customer", customer),
                               ("log_type", log_type), ("fqdn", fqdn)) if v}
    if sample < 1.0:
        query["sample"] = str(sample)
    return f"ws://{monitor}/api/tail?{urlencode(query)}"


def pretty(record: dict[str, Any]) -> str:
    """One coloured line: time, where, and the fields an operator looks at first."""
    log_type = record.get("log_type") or ("invalid" if "invalid_reason" in record else "")
    colour = COLOURS.get(str(log_type), "")
    where = f"{record.get('customer_name', '?')}/{log_type or '?'}/{record.get('fqdn', '?')}"
    shown = {k: v for k, v in record.items() if k not in {
        "customer_name", "fqdn", "log_type", "timestamp", "received_at", "logserver_hostname",
        "tag"}}
    return (f"{DIM}{record.get('timestamp', '')}{RESET} {colour}{where}{RESET} "
            f"{json.dumps(shown, ensure_ascii=False)}")


async def follow(urls: list[str], out: TextIO, *, limit: int | None = None,
                 formatter: Callable[[dict[str, Any]], str] | None = None) -> int:
    """Print records from every url (one per worker) until interrupted or `limit` records
    in all; returns how many."""
    shown = 0
    problem = None

    def show(text: str) -> bool:
        nonlocal shown
        out.write((formatter(json.loads(text)) if formatter else text) + "\n")
        out.flush()
        shown += 1
        return limit is not None and shown >= limit

    try:
        async with trio.open_nursery() as nursery:
            for url in urls:
                nursery.start_soon(_follow_one, url, show, nursery.cancel_scope)
    except* MwdlogdError as group:  # the first refusal or unreachable worker says why
        problem = group.exceptions[0]
    if problem is not None:
        raise MwdlogdError(str(problem))
    return shown


async def _follow_one(url: str, show: Callable[[str], bool], done: trio.CancelScope) -> None:
    try:
        async with trio_websocket.open_websocket_url(url) as websocket:
            while True:
                message = await websocket.get_message()
                if show(message if isinstance(message, str) else message.decode()):
                    done.cancel()
    except trio_websocket.ConnectionRejected as exc:
        raise MwdlogdError(f"tail refused by {url.split('?')[0]}: HTTP {exc.status_code} "
                           f"{(exc.body or b'').decode(errors='replace').strip()}") from None
    except (trio_websocket.HandshakeError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise MwdlogdError(f"cannot reach {url.split('?')[0]}: {cause}") from None
    except trio_websocket.ConnectionClosed:
        pass


def run_tail(urls: list[str], *, limit: int | None) -> int:
    formatter = pretty if sys.stdout.isatty() else None
    trio.run(lambda: follow(urls, sys.stdout, limit=limit, formatter=formatter))
    return 0
