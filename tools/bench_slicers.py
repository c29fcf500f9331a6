#!/usr/bin/env python3
"""How fast the streamed-body slicers cut a body (proto/streamed.py), in-process, against
`json.loads` of the same body (the decoding every slice gets afterwards anyway).

Builds N Engine-like records of three shapes (flat; nesting 4 levels; nesting 6 levels,
past what the JSON slicer matches in one regex run), as a compact and an indented JSON
array and as a msgpack stream, feeds each to its slicer in 64 KiB reads and checks that
the slices hold every record.

    python tools/bench_slicers.py --records 120000
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import msgpack

from mwdlogd.proto.streamed import JsonArraySlicer, MsgpackSlicer, Slicer

READ = 64 * 1024
SETTINGS = {"limit": 2**40, "line_limit": 10 * 2**20}  # plain bodies
SHAPES: dict[str, dict[str, Any]] = {
    "flat": {},
    "4 levels": {"nested": {"a": [1, {"b": "}"}]}},
    "6 levels": {"nested": {"a": [1, {"b": [{"c": "}"}]}]}},
}


def records(count: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": f"r{n}", "customer_name": "acme", "fqdn": "www.acme.test",
             "log_type": "nginx", "time": 1732500000.5, "uri": f'/api/v1/items/{n}?q="x"',
             "http_user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0",
             "status": 200, "remote_addr": "203.0.113.9", "pad": "x" * 150, **extra}
            for n in range(count)]


def cut(slicer: Slicer, body: bytes) -> tuple[list[bytes], float]:
    started = time.perf_counter()
    out = []
    for at in range(0, len(body), READ):
        out += slicer.feed(body[at:at + READ])
    out += slicer.end()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=120_000)
    args = parser.parse_args()
    for shape, extra in SHAPES.items():
        values = records(args.records, extra)
        for form, body in (("compact", json.dumps(values).encode()),
                           ("indented", json.dumps(values, indent=2).encode())):
            slices, spent = cut(JsonArraySlicer(gzip=False, **SETTINGS), body)
            assert sum(len(json.loads(piece)) for piece in slices) == len(values)
            started = time.perf_counter()
            json.loads(body)
            loads = time.perf_counter() - started
            mib = len(body) / 2**20
            print(f"JSON array, {shape}, {form}: {mib:.0f} MiB cut at {mib / spent:.0f} MiB/s "
                  f"into {len(slices)} slices (json.loads: {mib / loads:.0f} MiB/s)")
        body = b"".join(msgpack.packb(value) for value in values)
        slices, spent = cut(MsgpackSlicer(gzip=False, **SETTINGS), body)
        assert b"".join(slices) == body
        mib = len(body) / 2**20
        print(f"msgpack, {shape}: {mib:.0f} MiB cut at {mib / spent:.0f} MiB/s")


if __name__ == "__main__":
    main()
