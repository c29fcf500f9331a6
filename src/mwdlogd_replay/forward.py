"""The forward client, as Fluentd's out_forward sends: Message, Forward, PackedForward or
CompressedPackedForward, optional shared-key handshake, and acks by chunk id. A batch's
chunk ids are fixed when it is encoded, so a resend after a lost ack carries the same id
and the server stores it once."""

import gzip
import hashlib
import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import trio

from mwdlogd_replay.connection import Connection, Failure, Frame, Target
from mwdlogd_replay.records import Record

HELO_TIMEOUT_S = 5.0


class HandshakeRefused(ConnectionError):
    """The forward server answered PONG false (its reason: `shared_key mismatch`, ...)."""


def forward_message(target: Target, records: list[Record], chunk: str | None) -> bytes:
    """The message as out_forward frames it (entries as str32, EventTime, option map)."""
    def event_time(record: Record) -> msgpack.ExtType:
        at = float(record.get("time", time.time()))
        return msgpack.ExtType(0, int(at).to_bytes(4, "big") +
                               int(at % 1 * 1e9).to_bytes(4, "big"))

    option: dict[str, Any] = {"size": len(records)}
    if chunk is not None:
        option["chunk"] = chunk
    if target.mode == "Message":
        (record,) = records
        return bytes(msgpack.packb([target.tag, event_time(record), record, option]))
    if target.mode == "Forward":
        return bytes(msgpack.packb([target.tag, [[event_time(r), r] for r in records], option]))
    blob = b"".join(msgpack.packb([event_time(r), r]) for r in records)
    option["compressed"] = "text"
    if target.mode == "CompressedPackedForward":
        blob, option["compressed"] = gzip.compress(blob, 1), "gzip"
    head = b"\x93" + bytes(msgpack.packb(target.tag)) + b"\xdb" + len(blob).to_bytes(4, "big")
    return head + blob + bytes(msgpack.packb(option))


def ping_message(helo: list[Any], *, hostname: str, shared_key: str, username: str = "",
                 password: str = "", salt: str | None = None) -> bytes:
    """The client's PING for a server's HELO, as out_forward builds it."""
    salt = salt or os.urandom(16).hex()
    digest = hashlib.sha512(salt.encode() + hostname.encode() + helo[1]["nonce"] +
                            shared_key.encode()).hexdigest()
    user_digest = hashlib.sha512((helo[1]["auth"] or b"") + username.encode() +
                                 password.encode()).hexdigest() if username else ""
    return bytes(msgpack.packb(["PING", hostname, salt, digest, username, user_digest]))


class ForwardClient(Connection):
    """Sends each batch as one message (or one per record in Message mode) and awaits the
    ack of each when acks are on."""

    def __init__(self, target: Target, name: str) -> None:
        super().__init__(target, name)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.sequence = itertools.count()
        # unique per client instance: a later run (same pid, same index) is no resend
        self.chunk_prefix = f"{name}-{os.urandom(4).hex()}"

    def _chunk(self) -> str | None:
        return f"{self.chunk_prefix}-{next(self.sequence)}\n" if self.target.ack else None

    def encode(self, records: list[Record]) -> Sequence[Frame]:
        if self.target.mode == "Message":
            return [Frame(forward_message(self.target, [r], chunk), chunk)
                    for r in records for chunk in [self._chunk()]]
        chunk = self._chunk()
        return [Frame(forward_message(self.target, records, chunk), chunk)]

    async def opened(self, stream: trio.abc.Stream) -> None:
        self.unpacker = msgpack.Unpacker(raw=False)
        if self.target.shared_key:
            await self._handshake(stream)

    async def _next_msgpack(self) -> Any:
        while True:
            for obj in self.unpacker:
                return obj
            self.unpacker.feed(await self.more())

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        helo = None
        with trio.move_on_after(HELO_TIMEOUT_S):
            helo = await self._next_msgpack()
        if helo is None:
            raise HandshakeRefused(f"no HELO within {HELO_TIMEOUT_S:g} s: the server has no "
                                   "shared_key; drop --shared-key")
        await stream.send_all(ping_message(helo, hostname=self.name,
                                           shared_key=self.target.shared_key))
        pong = await self._next_msgpack()
        if pong[1] is not True:
            raise HandshakeRefused(str(pong[2]))

    async def send(self, frames: Sequence[Frame]) -> Failure | None:
        stream = await self.connect()
        for frame in frames:
            await stream.send_all(frame.data)
            if frame.chunk is not None and (answer := await self._next_msgpack()
                                            ) != {"ack": frame.chunk}:
                if isinstance(answer, list) and answer[:1] == ["HELO"]:
                    raise HandshakeRefused("the server asks for a shared key (sent HELO): "
                                           "give --shared-key or --config")
                return Failure(f"unexpected answer instead of the ack: {answer!r:.100}")
        return None
