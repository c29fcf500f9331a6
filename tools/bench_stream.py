#!/usr/bin/env python3
"""Streamed out_http bodies: peak memory and records/s of one large ndjson request (a
Fluentd file-buffer chunk, 256m by default) against the same records in 1 MiB requests.

Each mode runs on a fresh mwdlogd subprocess (temporary config, own dev PKI, ports 0):
the server's VmHWM is read when it is idle and after the last answer, the records are
counted in the hourly files after SIGTERM (each must be there exactly once).

    python tools/bench_stream.py --mib 256
    python tools/bench_stream.py --mib 256 --gzip
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from mwdlogd.certs import init_certs  # noqa: E402

from server_process import ServerProcess  # noqa: E402

TOKEN = "bench-token-0123456789"
MIB = 1024 * 1024
HOUR = 1732500000


def records(mib: int) -> list[bytes]:
    """ndjson lines of about 350 B (an nginx access record) over 4 sites, one hour."""
    lines, size, n = [], 0, 0
    while size < mib * MIB:
        line = json.dumps({
            "id": f"r{n}", "customer_name": "acme", "fqdn": f"site{n % 4}.acme.test",
            "log_type": "nginx", "time": HOUR + n % 3600, "remote_addr": "203.0.113.7",
            "request": f"GET /shop/item/{n}?ref=campaign HTTP/1.1", "status": 200,
            "body_bytes_sent": 5123, "http_referer": "https://www.acme.test/shop",
            "http_user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                               "(KHTML, like Gecko) Chrome/120.0 Safari/537.36",
            "request_time": 0.012}).encode() + b"\n"
        lines.append(line)
        size += len(line)
        n += 1
    return lines


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def start(directory: Path) -> tuple[ServerProcess, ssl.SSLContext]:
    pki = directory / "pki"
    init_certs(pki, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=3)
    config = {
        "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt")},
        "http": {"bind": "127.0.0.1", "port": 0},
        "forward": {"bind": "127.0.0.1", "port": 0},
        "auth": {"tokens": [{"name": "engine-01", "token": TOKEN}]},
        "storage": {"root": str(directory / "logs")},
        "buffer": {"path": str(directory / "buffer")},
        **{name: {"bind": "127.0.0.1", "port": 0} for name in ("health", "monitor", "metrics")},
    }
    (directory / "config.toml").write_text(tomli_w.dumps(config))
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "engine-01.crt"), str(pki / "engine-01.key"))
    return ServerProcess(directory / "config.toml"), context


def run(mode: str, bodies: list[bytes], expected: int, use_gzip: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        server, context = start(Path(tmp))
        try:
            idle = hwm_kib(server.process.pid)
            port = int(server.addresses["http"].rpartition(":")[2])
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                     timeout=600)
            headers = {"Authorization": f"Bearer {TOKEN}",
                       "Content-Type": "application/x-ndjson",
                       **({"Content-Encoding": "gzip"} if use_gzip else {})}
            acked, started = 0, time.monotonic()
            for index, body in enumerate(bodies):
                connection.request("POST", f"/nginx.access?n={index}", body, headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise SystemExit(f"{mode}: HTTP {response.status} {answer!r}")
                acked += json.loads(answer)["records"]
            seconds = time.monotonic() - started
            peak = hwm_kib(server.process.pid)
            server.signal(signal.SIGTERM)
            if server.wait(600) != 0:
                raise SystemExit(f"{mode}: server exited with an error")
        finally:
            server.stop()
        ids: Counter[str] = Counter()
        for path in (Path(tmp) / "logs").rglob("*.log.gz"):
            with gzip.open(path, "rt") as file:
                ids.update(json.loads(line)["id"] for line in file)
    if acked != expected or len(ids) != expected or max(ids.values()) != 1:
        raise SystemExit(f"{mode}: acked {acked}, stored {sum(ids.values())} "
                         f"({len(ids)} distinct) of {expected}")
    return {"requests": len(bodies), "seconds": seconds, "records_per_s": acked / seconds,
            "idle_mib": idle / 1024, "growth_mib": (peak - idle) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="size of the large body (MiB)")
    parser.add_argument("--gzip", action="store_true", help="send the bodies gzip-compressed")
    args = parser.parse_args()
    lines = records(args.mib)
    large = b"".join(lines)
    small, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= MIB:
            small.append(b"".join(current))
            current, size = [], 0
    if current:
        small.append(b"".join(current))
    if args.gzip:
        large, small = gzip.compress(large, 1), [gzip.compress(b, 1) for b in small]
    print(f"{len(lines)} records, {sum(map(len, lines)) / MIB:.0f} MiB of ndjson; on the wire: "
          f"one request of {len(large) / MIB:.1f} MiB, or {len(small)} requests "
          f"({'gzip' if args.gzip else 'plain'})", flush=True)
    for mode, bodies in (("one large request", [large]), ("1 MiB requests", small)):
        result = run(mode, bodies, len(lines), args.gzip)
        print(f"{mode:>17}: {result['requests']:.0f} requests, {result['seconds']:.1f} s, "
              f"{result['records_per_s']:,.0f} records/s, idle VmHWM "
              f"{result['idle_mib']:.0f} MiB, growth {result['growth_mib']:.1f} MiB; "
              f"every record stored once", flush=True)


if __name__ == "__main__":
    main()
