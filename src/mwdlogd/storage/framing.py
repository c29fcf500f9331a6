"""Checksummed, length-prefixed records: the on-disk unit of the journal, the side logs
and the append ledger.

    magic (4 B) | payload length (u32 BE) | crc32 of id+payload (u32 BE) | id (u64 BE) | payload

A torn tail (crash mid-write) fails the length or checksum test, so a scan stops at the
last whole record and says where that is.
"""

import struct
import zlib
from collections.abc import Iterator

HEADER = struct.Struct(">4sIIQ")
# A single record larger than this is corruption, not data (HTTP bodies are far smaller).
MAX_PAYLOAD = 1 << 30


def frame(magic: bytes, record_id: int, payload: bytes) -> bytes:
    id_bytes = record_id.to_bytes(8, "big")
    crc = zlib.crc32(payload, zlib.crc32(id_bytes))
    return HEADER.pack(magic, len(payload), crc, record_id) + payload


def scan(magic: bytes, data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """All whole records from the start, and the offset where the valid prefix ends."""
    records = []
    offset = 0
    for record_id, payload, end in _records(magic, data):
        records.append((record_id, payload))
        offset = end
    return records, offset


def iterate(magic: bytes, data: bytes) -> Iterator[tuple[int, bytes]]:
    """The whole records from the start, one at a time (no list of them all)."""
    for record_id, payload, _ in _records(magic, data):
        yield record_id, payload


def _records(magic: bytes, data: bytes) -> Iterator[tuple[int, bytes, int]]:
    offset = 0
    view = memoryview(data)
    while offset + HEADER.size <= len(data):
        got_magic, length, crc, record_id = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if got_magic != magic or length > MAX_PAYLOAD or start + length > len(data):
            return
        payload = bytes(view[start:start + length])
        if zlib.crc32(payload, zlib.crc32(record_id.to_bytes(8, "big"))) != crc:
            return
        offset = start + length
        yield record_id, payload, offset
