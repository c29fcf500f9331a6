#!/usr/bin/env python3
"""Backlog delivery time with a real forwarder: how long an Engine's backlog takes to
reach mwdlogd when it does not fit the server's buffer at once.

Starts mwdlogd as a subprocess with a small `buffer.total_limit`, writes N Engine records
to a file, starts the forwarder (Fluent Bit 4.2.8 tail -> http output, or Fluentd 1.18
in_tail -> out_http as docs/forwarders.md configures it; mTLS and a bearer token, as an
Engine runs them) and measures the time until the server has acked all N records (its
input counter), how many 503s it answered on the way, and then that every record was
stored exactly once. `--full-wait 0s` is the server answering 503 at once (as before
`http.full_wait` existed); the default holds requests while the buffer is full.

    python tools/backlog.py --records 100000
    python tools/backlog.py --records 100000 --full-wait 0s
    python tools/backlog.py --forwarder fluentd --records 100000

The forwarders come from shared/peers (tests/peers/real.py says where it is looked for;
REAL_PEERS_DIR overrides); `--fluent-bit PATH` runs another Fluent Bit binary.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from peers.real import PEERS_DIR, fluent_bit_binary, fluentd_command  # noqa: E402

from mwdlogd.certs import init_certs  # noqa: E402

from server_process import ServerProcess  # noqa: E402

TOKEN = "backlog-token-0123456789"
TIMEOUT_S = 900.0


def write_records(path: Path, count: int) -> None:
    now = time.time()
    with open(path, "w") as file:
        for n in range(count):
            file.write(json.dumps({
                "id": f"b{n}", "customer_name": f"customer-{n % 5}",
                "fqdn": f"site-{n % 4}.example", "log_type": "nginx", "time": now,
                "remote_addr": f"203.0.113.{n % 256}", "method": "GET", "status": 200,
                "path": f"/api/v1/items/{n}", "body_bytes_sent": n % 100000,
                "http_user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"}) + "\n")


def server_config(work: Path, pki: Path, args: argparse.Namespace) -> Path:
    loopback = {"bind": "127.0.0.1", "port": 0}
    raw: dict[str, Any] = {
        "server": {"hostname": "backlog"},
        "tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt")},
        "http": {**loopback, "full_wait": args.full_wait},
        "forward": loopback, "health": loopback, "metrics": loopback, "monitor": loopback,
        "auth": {"tokens": [{"name": "engine-01", "token": TOKEN}]},
        "storage": {"root": str(work / "logs")},
        "buffer": {"path": str(work / "buffer"), "total_limit": args.total_limit,
                   "flush_interval": args.flush_interval},
    }
    path = work / "mwdlogd.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def fluent_bit_config(work: Path, pki: Path, port: str) -> Path:
    path = work / "fluent-bit.conf"
    path.write_text(f"""\
[SERVICE]
    Flush 1
    Log_Level info
    Parsers_File {PEERS_DIR / "fluent-bit" / "parsers.conf"}

[INPUT]
    Name tail
    Path {work / "input.log"}
    Read_from_Head true
    Parser json

[OUTPUT]
    Name http
    Match *
    Host localhost
    Port {port}
    URI /nginx.access
    Format json_lines
    Header Authorization Bearer {TOKEN}
    tls on
    tls.verify on
    tls.ca_file {pki / "ca.crt"}
    tls.crt_file {pki / "engine-01.crt"}
    tls.key_file {pki / "engine-01.key"}
    Retry_Limit no_limits
""")
    return path


def fluentd_config(work: Path, pki: Path, port: str) -> Path:
    """docs/forwarders.md's out_http block (file buffer, 8m chunks, retry up to 30 s)."""
    path = work / "fluent.conf"
    path.write_text(f"""\
<system>
  root_dir {work}/fluent-root
</system>
<source>
  @type tail
  path {work / "input.log"}
  pos_file {work / "input.log.pos"}
  read_from_head true
  tag nginx.access
  <parse>
    @type json
  </parse>
</source>
<match nginx.**>
  @type http
  endpoint https://localhost:{port}/${{tag}}
  tls_ca_cert_path {pki / "ca.crt"}
  tls_client_cert_path {pki / "engine-01.crt"}
  tls_private_key_path {pki / "engine-01.key"}
  headers {{"Authorization":"Bearer {TOKEN}"}}
  content_type application/x-ndjson
  retryable_response_codes [408, 503]
  <format>
    @type json
  </format>
  <buffer tag>
    @type file
    path {work}/fluent-buffer
    flush_interval 1s
    chunk_limit_size 8m
    retry_forever true
    retry_max_interval 30s
  </buffer>
</match>
""")
    return path


def start_forwarder(args: argparse.Namespace, work: Path, pki: Path,
                    port: str) -> subprocess.Popen[bytes]:
    if args.forwarder == "fluentd":
        argv, env = fluentd_command(work)
        argv = [*argv, "-c", str(fluentd_config(work, pki, port))]
    else:
        binary = args.fluent_bit or fluent_bit_binary(work)
        argv, env = [str(binary), "-c", str(fluent_bit_config(work, pki, port))], {}
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def metric_sum(address: str, prefix: str, contains: str = "") -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


def stored_ids(root: Path) -> list[str]:
    ids = []
    for path in root.rglob("*.log.gz"):
        with gzip.open(path, "rt") as file:
            ids += [json.loads(line)["id"] for line in file]
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--total-limit", default="4MiB", help="the server's buffer.total_limit")
    parser.add_argument("--flush-interval", default="2s",
                        help="the server's buffer.flush_interval (how often room comes back)")
    parser.add_argument("--full-wait", default="20s", help="the server's http.full_wait")
    parser.add_argument("--forwarder", choices=["fluent-bit", "fluentd"], default="fluent-bit",
                        help="which real forwarder sends the backlog")
    parser.add_argument("--fluent-bit", type=Path, help="Fluent Bit binary (default: the peer)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mwdlogd-backlog-") as tmp:
        work = Path(tmp)
        pki = work / "pki"
        init_certs(pki, hosts=["localhost"], clients=["engine-01"], days=2)
        write_records(work / "input.log", args.records)
        server = ServerProcess(server_config(work, pki, args))
        forwarder = None
        try:
            port = server.addresses["http"].rpartition(":")[2]
            metrics = server.addresses["metrics"]
            started = time.monotonic()
            forwarder = start_forwarder(args, work, pki, port)
            acked = 0.0
            while acked < args.records and time.monotonic() - started < TIMEOUT_S:
                time.sleep(0.2)  # polling another process's counter
                acked = metric_sum(metrics, "fluentd_input_status_num_records_total")
                print(f"\r{time.monotonic() - started:6.1f} s  {acked:,.0f} acked",
                      end="", file=sys.stderr, flush=True)
            elapsed = time.monotonic() - started
            refused = metric_sum(metrics, "mwdlogd_http_requests_total", 'status="503"')
            accepted = metric_sum(metrics, "mwdlogd_http_requests_total", 'status="200"')
        finally:
            if forwarder is not None:
                forwarder.send_signal(signal.SIGTERM)
                forwarder.wait(60)
            server.signal(signal.SIGTERM)
            server.wait()
        ids = stored_ids(work / "logs")
        result = {"forwarder": args.forwarder, "records": args.records,
                  "total_limit": args.total_limit,
                  "flush_interval": args.flush_interval, "full_wait": args.full_wait,
                  "delivered_all": acked >= args.records, "delivery_s": round(elapsed, 1),
                  "requests_200": int(accepted), "requests_503": int(refused),
                  "stored": len(ids), "distinct_stored": len(set(ids))}
        print("\n" + json.dumps(result), flush=True)
        complete = set(ids) == {f"b{n}" for n in range(args.records)} and len(ids) == len(set(ids))
        return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
