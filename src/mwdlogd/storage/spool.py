"""Spool files: the normalised records of one streamed HTTP request, piece by piece.

A request too large to hold in memory is decoded as it arrives; each slice's records
(grouped by hourly file) become one framed piece appended to `{dir}/{name}.spool`. The
file is only data: it counts once the journal holds a commit record naming it, which is
written after the file is fsynced (`seal`). A spool file no commit record names is what
a refused, abandoned or crashed request left, and is deleted. Blocking: call from
worker threads.
"""

import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import msgpack

from mwdlogd.errors import StorageError
from mwdlogd.model import Destination, Group
from mwdlogd.storage import framing
from mwdlogd.storage.files import fsync_dir

MAGIC = b"MWS1"
SUFFIX = ".spool"


@attrs.frozen
class PieceMeta:
    """What the journal's commit record says of one piece (the data stays in the file)."""

    groups: int
    size: int
    count: int


def group_fields(group: Group) -> list[object]:
    """A Group as spool pieces and journal records store it: `[path, hour, count, data]`."""
    return [group.destination.path, group.destination.hour, group.count, group.data]


def group_from_fields(fields: list[Any]) -> Group:
    """The Group `group_fields` stored; StorageError if its path is no Destination's."""
    path, hour, count, data = fields
    return Group(Destination.from_path(path, hour), data, count)


def pack_groups(groups: list[Group]) -> bytes:
    return bytes(msgpack.packb([group_fields(g) for g in groups],
                               unicode_errors="surrogateescape"))


def unpack_groups(payload: bytes) -> list[Group]:
    return [group_from_fields(fields)
            for fields in msgpack.unpackb(payload, unicode_errors="surrogateescape")]


class SpoolWriter:
    """Appends pieces to a new spool file; `seal` makes it durable, `discard` removes it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = uuid.uuid4().hex
        self.path = directory / (self.name + SUFFIX)
        self.pieces: list[PieceMeta] = []
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StorageError(str(self.path), "create spool file",
                               exc.strerror or str(exc)) from exc

    def add(self, groups: list[Group]) -> None:
        data = framing.frame(MAGIC, len(self.pieces), pack_groups(groups))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise StorageError(str(self.path), "write spool file",
                               exc.strerror or str(exc)) from exc
        self.pieces.append(PieceMeta(len(groups), sum(len(g.data) for g in groups),
                                     sum(g.count for g in groups)))

    def seal(self, fsync: bool) -> None:
        """Every piece on disk, and the file's name in its directory."""
        try:
            if fsync:
                os.fdatasync(self._fd)
                fsync_dir(self.directory)
        except OSError as exc:
            raise StorageError(str(self.path), "sync spool file",
                               exc.strerror or str(exc)) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def read_pieces(path: Path) -> Iterator[list[Group]]:
    """The pieces of a sealed spool file in order, one read at a time; StorageError when
    the file is missing or damaged (it was fsynced before its commit record)."""
    try:
        with open(path, "rb") as file:
            index = 0
            while header := file.read(framing.HEADER.size):
                magic, length, crc, piece = framing.HEADER.unpack(header)
                payload = file.read(length)
                if magic != MAGIC or piece != index or len(payload) != length or \
                        zlib.crc32(payload, zlib.crc32(piece.to_bytes(8, "big"))) != crc:
                    raise StorageError(str(path), "read spool file", f"piece {index} damaged")
                yield unpack_groups(payload)
                index += 1
    except OSError as exc:
        raise StorageError(str(path), "read spool file", exc.strerror or str(exc)) from exc


def spool_path(directory: Path, name: str) -> Path:
    return directory / (name + SUFFIX)


def remove_unnamed(directory: Path, keep: set[str]) -> int:
    """Delete every spool file not in `keep` (left by requests never committed); how many."""
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.glob("*" + SUFFIX):
        if path.name.removesuffix(SUFFIX) not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class SpoolSet:
    """The committed spool files and the last journal id of each: a file goes once the
    journal segment holding its commit record has gone (its pieces are all written)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.last_ids: dict[str, int] = {}

    def remove_below(self, oldest_id: int) -> None:
        for name, last_id in list(self.last_ids.items()):
            if last_id < oldest_id:
                try:
                    spool_path(self.directory, name).unlink(missing_ok=True)
                except OSError as exc:
                    raise StorageError(str(spool_path(self.directory, name)),
                                       "delete spool file", exc.strerror or str(exc)) from exc
                del self.last_ids[name]
