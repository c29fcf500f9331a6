"""The traffic replay sends: generated Engine records (seeded, reproducible) or records read
back from archives, in batches tagged with a `replay_id` so a verifier can count them."""

import gzip
import itertools
import json
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]

USER_AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "curl/8.5.0",
               "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1"]
ATTACKS = [("SQL Injection", "high"), ("Cross Site Scripting", "medium"),
           ("Path Traversal", "high"), ("Remote Code Execution", "critical"),
           ("Bot Protection", "low")]


def generate(seed: int, *, customers: int, fqdns: int, appsec_share: float,
             now: float | None = None) -> Iterator[Record]:
    """Endless, reproducible Engine traffic: nginx access logs and open-appsec detections."""
    rng = random.Random(seed)
    start = time.time() if now is None else now
    for n in itertools.count():
        customer = f"customer-{rng.randrange(customers):03d}"
        fqdn = f"site-{rng.randrange(fqdns)}.{customer}.example"
        common = {"customer_name": customer, "fqdn": fqdn, "time": round(start + n / 1e4, 3),
                  "remote_addr": f"198.51.{rng.randrange(256)}.{rng.randrange(256)}"}
        if rng.random() < appsec_share:
            attack, severity = rng.choice(ATTACKS)
            yield {**common, "log_type": "openappsec", "eventName": attack,
                   "severity": severity, "securityAction": rng.choice(["Prevent", "Detect"]),
                   "httpUriPath": f"/login?user={rng.randrange(10**6)}",
                   "matchedParameter": "user", "assetName": fqdn}
        else:
            yield {**common, "log_type": "nginx", "method": rng.choice(["GET", "GET", "POST"]),
                   "path": f"/api/v1/items/{rng.randrange(10**6)}?page={rng.randrange(20)}",
                   "status": rng.choice([200, 200, 200, 304, 404, 500]),
                   "body_bytes_sent": rng.randrange(10**5),
                   "request_time": round(rng.random(), 3),
                   "http_user_agent": rng.choice(USER_AGENTS)}


def read_archive(paths: Iterable[Path]) -> Iterator[Record]:
    """Records from `.log.gz` files, JSON-lines files, or directories holding them."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                       (".gz", ".jsonl", ".ndjson", ".log")) if path.is_dir() else [path]
        for file in files:
            opener = gzip.open if file.suffix == ".gz" else open
            with opener(file, "rt", encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield dict(json.loads(line))


def batches(records: Iterator[Record], *, size: int, run: str, count: int | None
            ) -> Iterator[list[Record]]:
    """Batches of `size`, each record tagged `replay_id`; stops after `count` records."""
    limited = records if count is None else itertools.islice(records, count)
    numbered = zip(itertools.count(), limited, strict=False)
    while batch := [{**r, "replay_id": f"{run}-{n}"} for n, r in itertools.islice(numbered, size)]:
        yield batch


