"""`mwdlogd flush`: ask a running server (every worker of it) to write everything it has
acknowledged to the hourly files, and wait until it has.

POSTs `/api/flush` on each monitor address at once (worker N listens on monitor.port +
N); each answers after its flush with `{"records", "files", "failed_files", "worker"}`.
Prints the sum as one JSON line; `workers` counts the workers that answered. Unlike a
signal sent by process name, it reaches exactly the server the config names.
"""

import concurrent.futures
import json
import sys
import urllib.error
import urllib.request
from typing import Any

COUNTS = ("records", "files", "failed_files")


def flush_one(server: str, token: str, timeout_s: float) -> dict[str, Any]:
    """One worker's answer; raises OSError (urllib's errors are OSErrors) with the reason."""
    request = urllib.request.Request(f"http://{server}/api/flush", data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            answer: dict[str, Any] = json.loads(reply.read())
            return answer
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        raise OSError(f"HTTP {exc.code} {detail}") from None


def run_flush(servers: list[str], token: str, timeout_s: float) -> int:
    """0 when every worker flushed with no failed file; 1 otherwise (reasons on stderr)."""
    total = dict.fromkeys(COUNTS, 0)
    failed = False
    answered = 0
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        futures = {server: pool.submit(flush_one, server, token, timeout_s)
                   for server in servers}
        for server, future in futures.items():
            try:
                answer = future.result()
            except OSError as exc:
                print(f"mwdlogd: flush at {server} failed: {exc}", file=sys.stderr)
                failed = True
                continue
            answered += 1
            for key in COUNTS:
                total[key] += int(answer.get(key, 0))
    print(json.dumps({**total, "workers": answered}))
    if total["failed_files"]:
        print(f"mwdlogd: {total['failed_files']} file(s) could not be written; they are "
              "retried (see write_failed in the server log)", file=sys.stderr)
    return 1 if failed or total["failed_files"] else 0
