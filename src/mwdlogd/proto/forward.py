"""Server side of the Fluentd Forward Protocol v1, sans-IO (bytes in, events out).

Handles all four modes (Message, Forward, PackedForward, CompressedPackedForward with
several gzip members), EventTime, the `size`/`chunk`/`compressed` options and the
shared_key handshake (HELO/PING/PONG, optional username/password). Strings are decoded
with surrogateescape, so the entries blob (str32 holding msgpack or gzip bytes, as
Fluentd sends it) and the `chunk` id survive byte for byte. In records, str and bin are
both text, and text that is not UTF-8 is kept by the rule of `proto.text`.
"""

import hashlib
import hmac
import os
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import msgpack

from mwdlogd.errors import ForwardProtocolError, GzipMalformed, GzipTooLarge
from mwdlogd.proto.gzipped import gunzip_bounded
from mwdlogd.proto.text import BinSeen, may_hold_bin, repair_all, strings_as_text

EVENT_TIME_EXT = 0
NEED_DATA: Final = object()
# Longest tag taken: it is kept in every record, journal batch and metric label. Fluentd
# tags are short.
MAX_TAG_CHARS = 1024

# Enough of a message's start to read its tag (Fluentd tags are short) and the length its
# entries field declares, so an oversized declaration is refused before any body arrives.
HEAD_BYTES = 512
_LENGTH_PREFIX = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}
# What a client may make the server remember for the dedupe window: Fluentd's chunk ids
# are 24 characters (16 bytes, base64) and PING names are host or user names.
MAX_CHUNK_ID_BYTES = 64
MAX_PING_NAME_BYTES = 255


@attrs.frozen
class Entries:
    tag: str
    entries: list[tuple[float, dict[str, Any]]]
    chunk: str | None  # echo in the ack exactly as received
    invalid_utf8: int = 0  # records kept with text that was not UTF-8 (proto.text)


@attrs.frozen
class Pong:
    """The handshake answer to send; when not `ok`, close after sending it."""

    ok: bool
    data: bytes
    reason: str
    client_hostname: str
    username: str


_EVENT_TIME = struct.Struct(">II")  # seconds, nanoseconds


def event_time_hook(code: int, data: bytes) -> object:
    """msgpack ext hook: Fluentd's EventTime (ext 0) as float epoch seconds."""
    if code == EVENT_TIME_EXT and len(data) == 8:
        seconds, nanos = _EVENT_TIME.unpack(data)
        return seconds + nanos / 1e9
    return msgpack.ExtType(code, data)


def _time(value: object, where: str) -> float:
    if isinstance(value, msgpack.Timestamp):
        return float(value.to_unix())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ForwardProtocolError("wrong_shape", f"{where}: time is {type(value).__name__}")


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise TypeError(type(value).__name__)


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")


def sha512_hex(*parts: bytes) -> str:
    return hashlib.sha512(b"".join(parts)).hexdigest()


class ForwardConnection:
    """One connection's protocol state. The caller sends `helo()` first when a shared key
    is set, feeds bytes with `receive_data`, and acts on each `next_event()`."""

    def __init__(self, *, max_message_bytes: int, shared_key: bytes | None = None,
                 self_hostname: str = "logserver", users: Mapping[str, bytes] | None = None,
                 nonce: bytes | None = None, auth_salt: bytes | None = None,
                 max_records: int = sys.maxsize) -> None:
        self._limit = max_message_bytes
        self._max_records = max_records
        self._shared_key = shared_key
        self._self_hostname = self_hostname
        self._users = dict(users or {})
        self._nonce = nonce or os.urandom(16)
        self._auth_salt = auth_salt or os.urandom(16)
        self.established = shared_key is None
        # raw: PackedForward's entries come as str32 holding binary (reference notes), so
        # text is decoded only where it is text (`_text`), never the entries blob.
        # Messages are framed with skip(), which builds no objects: an unfinished message
        # costs its bytes (here and in `_pending`), not 67x that in half-built maps.
        self._unpacker = msgpack.Unpacker(max_buffer_size=max_message_bytes)
        self._pending = bytearray()
        self.last_message_bytes = 0  # wire size of the message the last event came from
        self._fed = 0
        self._recent, self._recent_at = b"", 0  # the last bytes fed, and their offset
        self._head, self._head_at = bytearray(), 0  # the start of the message being read
        self._framed = False  # skip() has found the end of the next message

    def helo(self) -> bytes:
        return bytes(_packer().pack(["HELO", {"nonce": self._nonce, "auth": self._auth_salt,
                                              "keepalive": True}]))

    def receive_data(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise ForwardProtocolError(
                "too_large", f"message over forward.message_size_limit={self._limit} bytes"
            ) from None
        self._pending += data
        self._recent, self._recent_at = data, self._fed
        self._fed += len(data)
        room = HEAD_BYTES - len(self._head)
        if room > 0:
            skip = max(self._head_at + len(self._head) - self._recent_at, 0)
            self._head += data[skip:skip + room]

    @property
    def buffered(self) -> int:
        """Bytes received and not yet made into events (held twice: here and in msgpack)."""
        return len(self._pending)

    def ready(self) -> bool:
        """Whether a whole message is buffered. Framing only (skip() builds no objects and
        resumes where it stopped), so it is cheap enough for the event loop; decoding the
        message is `next_event`'s. Raises ForwardProtocolError."""
        if self._framed:
            return True
        try:
            self._unpacker.skip()
        except msgpack.OutOfData:
            self._refuse_oversized()
            return False
        except msgpack.StackError:
            raise ForwardProtocolError("too_deep", "message nests deeper than msgpack's "
                                                   "1024 levels") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ForwardProtocolError("malformed_msgpack", str(exc)) from None
        self._framed = True
        return True

    def next_event(self) -> Entries | Pong | object:
        """Entries, a Pong to send, or NEED_DATA; raises ForwardProtocolError."""
        if not self.ready():
            return NEED_DATA
        self._framed = False
        size = self._unpacker.tell() - self._head_at  # where this message started
        data = bytes(self._pending[:size])
        del self._pending[:size]
        self.last_message_bytes = size
        message = self._read_message(data)
        self._head_at = self._unpacker.tell()  # the next message starts in the recent bytes
        self._head = bytearray(self._recent[self._head_at - self._recent_at:][:HEAD_BYTES])
        if not self.established:
            return self._ping(_text(message))
        body = message[1] if isinstance(message, list) and len(message) > 1 else None
        if isinstance(body, bytes):  # PackedForward: [tag, blob, option]
            return self._entries([_text(message[0]), body, *_text(message[2:])])
        decoded, clean = _records_text(message)
        return self._entries(decoded, clean)

    def _read_message(self, data: bytes) -> Any:
        """One whole message, read raw; a Forward-mode entries array longer than the
        record cap is refused from its header, before any entry is built."""
        declared = _declared_entries(data)
        if declared > self._max_records:
            raise self._too_many(declared)
        try:
            return msgpack.unpackb(data, raw=True, ext_hook=event_time_hook,
                                   strict_map_key=False)
        except (ValueError, TypeError) as exc:  # format errors, limits, bad UTF-8, list keys
            reason = "too_large" if "exceeds max" in str(exc) else "malformed_msgpack"
            raise ForwardProtocolError(reason, str(exc)) from None
        except msgpack.UnpackException as exc:
            raise ForwardProtocolError("malformed_msgpack", str(exc)) from None

    def _too_many(self, count: int) -> ForwardProtocolError:
        return _too_many(count, self._max_records)

    def _refuse_oversized(self) -> None:
        """The unfinished message may not grow past the limit. msgpack's own buffer limit
        does not bound it: the unpacker keeps what it has parsed of an unfinished array
        (not its bytes) across feeds, so an endless one would grow without end."""
        unfinished = self._fed - self._head_at
        if unfinished > self._limit:
            raise ForwardProtocolError(
                "too_large", f"message over forward.message_size_limit={self._limit} bytes "
                f"({unfinished} bytes and not finished)")
        self._refuse_oversized_declaration()

    def _refuse_oversized_declaration(self) -> None:
        """Read `[tag, <str/bin header>` from the message start; refuse a length over the
        limit now instead of buffering towards it."""
        head = self._head
        if len(head) < 2 or not (0x92 <= head[0] <= 0x94):
            return
        tag_at, tag_len = 2, head[1] - 0xA0
        if head[1] == 0xD9 and len(head) > 2:
            tag_at, tag_len = 3, head[2]
        elif not 0 <= tag_len < 32:
            return
        at = tag_at + tag_len
        width = _LENGTH_PREFIX.get(head[at]) if at < len(head) else None
        if width is None or at + 1 + width > len(head):
            return
        declared = int.from_bytes(head[at + 1:at + 1 + width], "big")
        if declared > self._limit:
            raise ForwardProtocolError(
                "too_large", f"entries declare {declared} bytes > "
                f"forward.message_size_limit={self._limit}")

    def ack(self, chunk: str) -> bytes:
        """`{"ack": chunk}` with the chunk exactly as it came."""
        return bytes(_packer().pack({"ack": chunk}))

    def _ping(self, message: Any) -> Pong:
        if not (isinstance(message, list) and len(message) == 6 and message[0] == "PING"):
            return self._pong_failure("invalid ping message", "", "")
        _, hostname, salt, digest, username, password_digest = message
        try:
            key, nonce, salt_b = _bytes(self._shared_key), self._nonce, _bytes(salt)
            hostname_s, username_s = str(hostname), str(username)
            expected = sha512_hex(salt_b, _bytes(hostname), nonce, key)
            for what, name in (("hostname", hostname_s), ("username", username_s)):
                if len(_bytes(name)) > MAX_PING_NAME_BYTES:
                    return self._pong_failure(f"{what} over {MAX_PING_NAME_BYTES} bytes",
                                              name[:64], "")
            if hostname_s == self._self_hostname:
                return self._pong_failure(
                    "same hostname between input and output: invalid configuration",
                    hostname_s, username_s)
            if not hmac.compare_digest(expected.encode(), _bytes(digest)):
                return self._pong_failure("shared_key mismatch", hostname_s, username_s)
            if self._users and not self._user_ok(username_s, _bytes(password_digest)):
                return self._pong_failure("username/password mismatch", hostname_s, username_s)
        except TypeError:
            return self._pong_failure("invalid ping message", "", "")
        self.established = True
        pong = ["PONG", True, "", self._self_hostname,
                sha512_hex(salt_b, self._self_hostname.encode(), nonce, key)]
        return Pong(True, bytes(_packer().pack(pong)), "", hostname_s, username_s)

    def _user_ok(self, username: str, password_digest: bytes) -> bool:
        password = self._users.get(username)
        expected = sha512_hex(self._auth_salt, username.encode(), password or b"")
        return hmac.compare_digest(expected.encode(), password_digest) and password is not None

    def _pong_failure(self, reason: str, hostname: str, username: str) -> Pong:
        data = bytes(_packer().pack(["PONG", False, reason, "", ""]))
        return Pong(False, data, reason, hostname, username)

    def _entries(self, message: Any, clean: bool = True) -> Entries:
        if not (isinstance(message, list) and 2 <= len(message) <= 4
                and isinstance(message[0], str)):
            raise ForwardProtocolError("wrong_shape", f"expected [tag, ...], got "
                                       f"{_describe(message)}")
        tag, body = message[0], message[1]
        if len(tag) > MAX_TAG_CHARS:
            raise ForwardProtocolError("too_long", f"tag of {len(tag)} characters > "
                                                   f"{MAX_TAG_CHARS}")
        if isinstance(body, list):  # Forward
            entries = [self._entry(e, n) for n, e in enumerate(body)]
            option = message[2] if len(message) > 2 else None
        elif isinstance(body, bytes):  # PackedForward, maybe compressed (kept raw above)
            option = message[2] if len(message) > 2 else None
            entries, clean = self._packed(body, option)
        else:  # Message: [tag, time, record(, option)]
            if len(message) < 3 or not isinstance(message[2], dict):
                raise ForwardProtocolError("wrong_shape", f"message mode needs "
                                           f"[tag, time, record], got {_describe(message)}")
            entries = [(_time(body, "message"), message[2])]
            option = message[3] if len(message) > 3 else None
        chunk = self._options(option, len(entries))
        invalid = 0
        if not clean:
            records = [record for _, record in entries]
            invalid = repair_all(records)
            entries = [(at, record) for (at, _), record in zip(entries, records, strict=True)]
        return Entries(tag, entries, chunk, invalid)

    def _entry(self, entry: Any, index: int) -> tuple[float, dict[str, Any]]:
        if type(entry) is list and len(entry) == 2 and type(entry[0]) is float \
                and type(entry[1]) is dict:  # out_forward's shape: checked first, fast
            return entry[0], entry[1]
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ForwardProtocolError("wrong_shape", f"entry {index}: expected [time, record], "
                                       f"got {_describe(entry)}")
        return _time(entry[0], f"entry {index}"), entry[1]

    def _packed(self, blob: bytes, option: object
                ) -> tuple[list[tuple[float, dict[str, Any]]], bool]:
        """The entries of a PackedForward blob, and whether all their text was UTF-8."""
        compressed = option.get("compressed") if isinstance(option, dict) else None
        if compressed == "gzip":
            try:
                blob = gunzip_bounded(blob, self._limit)
            except GzipTooLarge as exc:
                raise ForwardProtocolError("too_large", f"entries {exc} "
                                           f"(forward.message_size_limit)") from None
            except GzipMalformed as exc:
                raise ForwardProtocolError("bad_gzip", str(exc)) from None
        elif compressed not in (None, "text"):
            raise ForwardProtocolError("wrong_shape", f"unknown compressed={compressed!r}")
        clean, cap = True, self._max_records
        seen = None if not may_hold_bin(blob) else BinSeen()
        try:
            values = _unpack_all(blob, raw=False, max_records=cap, object_hook=seen)
        except UnicodeDecodeError:
            values = None
        if values is None or (seen is not None and seen.seen):
            # bin, or text that is not UTF-8: the slower way
            values, clean = _records_text(_unpack_all(blob, raw=True, max_records=cap))
        return [self._entry(entry, index) for index, entry in enumerate(values)], clean

    def _options(self, option: object, count: int) -> str | None:
        if option is None:
            return None
        if not isinstance(option, dict):
            raise ForwardProtocolError("wrong_shape", f"option is {_describe(option)}")
        size = option.get("size")
        if size is not None and size != count:
            raise ForwardProtocolError("size_mismatch", f"option size={size} but {count} entries")
        chunk = option.get("chunk")
        if chunk is not None and not isinstance(chunk, str):
            raise ForwardProtocolError("wrong_shape", f"chunk is {_describe(chunk)}")
        if chunk is not None and len(_bytes(chunk)) > MAX_CHUNK_ID_BYTES:
            raise ForwardProtocolError("chunk_id_too_long", f"chunk id of {len(_bytes(chunk))} "
                                       f"bytes; at most {MAX_CHUNK_ID_BYTES} (Fluentd's are 24)")
        return chunk


def _too_many(count: int, max_records: int) -> ForwardProtocolError:
    return ForwardProtocolError("too_many_records", f"message holds {count} entries, over "
                                f"forward.max_records_per_message={max_records}")


def _unpack_all(blob: bytes, *, raw: bool, max_records: int,
                object_hook: Callable[[dict[Any, Any]], Any] | None = None) -> list[Any]:
    """Every entry of a blob, refused as soon as there are more than `max_records`;
    UnicodeDecodeError passes through (only when not `raw`)."""
    hooks = {"object_hook": object_hook} if object_hook is not None else {}
    unpacker = msgpack.Unpacker(raw=raw, ext_hook=event_time_hook, strict_map_key=False,
                                max_buffer_size=max(len(blob), 1), **hooks)
    unpacker.feed(blob)
    values: list[Any] = []
    try:
        for value in unpacker:  # stops before a truncated last entry
            if len(values) == max_records:
                raise _too_many(max_records + 1, max_records)
            values.append(value)
    except UnicodeDecodeError:
        raise
    except msgpack.StackError:
        raise ForwardProtocolError("too_deep", "entries nest deeper than msgpack's "
                                               "1024 levels") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ForwardProtocolError("malformed_msgpack", f"entries: {exc}") from None
    consumed = unpacker.tell()
    if consumed != len(blob):
        raise ForwardProtocolError("malformed_msgpack",
                                   f"entries blob truncated after {consumed} of {len(blob)}")
    return values


def _records_text(value: Any) -> tuple[Any, bool]:
    """`strings_as_text` for a message or blob read raw; protocol errors as ours."""
    try:
        return strings_as_text(value, event_time_hook)
    except (ValueError, TypeError) as exc:
        raise ForwardProtocolError("malformed_msgpack", str(exc)) from None


def _text(value: Any) -> Any:
    """A value read raw, with its strings decoded (bytes that are not UTF-8 kept as
    surrogates): packed again as str and read back by msgpack itself, in C."""
    try:
        data = msgpack.packb(value, use_bin_type=False)
        return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape",
                               ext_hook=event_time_hook, strict_map_key=False)
    except (ValueError, TypeError) as exc:  # what the first read let through, if anything
        raise ForwardProtocolError("malformed_msgpack", str(exc)) from None


_ARRAY_HEADS = {0xDC: 2, 0xDD: 4}


def _declared_entries(data: bytes) -> int:
    """The length a `[tag, [entries...], ...]` message declares for its entries (0 for
    other shapes, and for malformed data, which unpacking reports)."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() < 2:
            return 0
        unpacker.skip()
        at = unpacker.tell()
        if at < len(data) and (0x90 <= data[at] <= 0x9F or data[at] in _ARRAY_HEADS):
            return int(unpacker.read_array_header())
    except (ValueError, msgpack.UnpackException):
        pass
    return 0


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
