"""`mwdlogd flush` against a running server (one process, then two workers): it returns
once the records are in their files and says how many records and files it wrote; the
drain's `shutdown_complete` says the same for what it wrote."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import config_raw
from forward_client import packed, send_one
from helpers import TOKEN, client_context, engine_records, free_port, ids_by_file, ndjson, post
from server_process import ServerProcess, write_config
from test_workers import drain, only, start, workers_config

HOUR_2024 = 1732500000.5
NGINX = "acme/nginx/www.acme.test/2024/11/25/02.log.gz"
APPSEC = "acme/openappsec/www.acme.test/2024/11/25/02.log.gz"
NEVER = {"flush_interval": "1h", "timekey_wait": "1h"}  # only a flush or the drain writes


def mwdlogd_flush(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", "flush", "--config", str(config),
                           *extra], capture_output=True, text=True, timeout=60)


def test_flush_with_the_server_unreachable_counts_no_worker(tmp_path: Path, pki: Path) -> None:
    """Nothing answered: exit 1 and `"workers": 0`, never a count of workers asked."""
    raw = config_raw(tmp_path, pki, monitor={"port": free_port()})
    result = mwdlogd_flush(write_config(tmp_path / "config.toml", raw))
    assert result.returncode == 1 and "failed" in result.stderr
    assert json.loads(result.stdout) == {"records": 0, "files": 0, "failed_files": 0,
                                         "workers": 0}


async def test_flush_writes_everything_and_counts_it(tmp_path: Path, pki: Path) -> None:
    raw = config_raw(tmp_path, pki, buffer=NEVER, monitor={"port": free_port()})
    config = write_config(tmp_path / "config.toml", raw)
    server = ServerProcess(config)
    try:
        records = engine_records(5, time=HOUR_2024) + engine_records(
            3, start=5, log_type="openappsec", time=HOUR_2024)
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           ndjson(records))
        assert reply.status == 200
        assert ids_by_file(tmp_path / "logs") == {}
        result = mwdlogd_flush(config)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"records": 8, "files": 2, "failed_files": 0,
                                             "workers": 1}
        assert ids_by_file(tmp_path / "logs") == {
            NGINX: [f"r{n}" for n in range(5)], APPSEC: ["r5", "r6", "r7"]}
        assert "flush_done reason=/api/flush records=8 files=2 failed_files=0" in \
            "\n".join(server.lines)
        again = mwdlogd_flush(config)  # nothing left: nothing written
        assert json.loads(again.stdout)["records"] == 0
        refused = mwdlogd_flush(config, "--token", "wrong")
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        assert json.loads(refused.stdout)["workers"] == 0  # nobody flushed
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           ndjson(engine_records(2, start=8, time=HOUR_2024)))
        assert reply.status == 200
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert re.search(r" shutdown_complete records=2 files=1$", "\n".join(server.lines), re.M)
    assert ids_by_file(tmp_path / "logs")[NGINX] == [f"r{n}" for n in range(5)] + ["r8", "r9"]


async def test_flush_asks_every_worker_and_sums(tmp_path: Path, pki: Path) -> None:
    config = workers_config(tmp_path, pki, buffer=NEVER, monitor={"port": free_port(count=2)})
    server, pids = start(config)
    try:
        for serving, first in ((0, 0), (1, 3)):  # three records to each worker
            only(pids, serving)
            reply = await send_one(server.addresses["forward"], client_context(pki), packed(
                "nginx.access", engine_records(3, start=first, time=HOUR_2024), chunk=f"c{first}"))
            assert reply == {"ack": f"c{first}"}
        only(pids, None)
        result = mwdlogd_flush(config, "--token", TOKEN)
        assert result.returncode == 0, result.stderr
        # one file, appended to by each worker: counted once per worker
        assert json.loads(result.stdout) == {"records": 6, "files": 2, "failed_files": 0,
                                             "workers": 2}
        assert sorted(ids_by_file(tmp_path / "logs")[NGINX]) == [f"r{n}" for n in range(6)]
        for index in (0, 1):
            server.wait_for(rf" flush_done reason=/api/flush records=3 files=1 .*worker={index}$")
    finally:
        drain(server)

