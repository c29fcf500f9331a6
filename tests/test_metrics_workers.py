"""`server.workers = 2`: `metrics.port` serves the sum of the workers' series, and a real
Prometheus scraping that one endpoint with the shipped alert rules sees the whole server."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import trio

from mwdlogd.metrics_sum import WorkerTotals, sum_expositions, sum_families

from forward_client import packed, send_one
from helpers import client_context, engine_records, http_get
from test_observability import DEPLOY, needs_prometheus, prometheus_query, running_prometheus
from test_workers import drain, only, start, worker_pids, workers_config

OUT = '{plugin_id="hourly_files",type="file"}'
BUFFER = f"fluentd_output_status_buffer_total_bytes{OUT}"
RATIO = f"fluentd_output_status_buffer_available_space_ratio{OUT}"
INPUT = 'fluentd_input_status_num_records_total{hostname="testhost",tag="nginx.access"}'
# README: Fluentd's `*_count` gauges keep their names on purpose (promtool lints them).
KEPT_COUNT_GAUGE = re.compile(r'fluentd_output_status_\w+_count non-histogram and '
                              r'non-summary metrics should not have "_count" suffix')
NEVER = {"flush_interval": "1h", "timekey_wait": "1h", "total_limit": "1MiB"}


def samples(exposition: bytes) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", exposition.decode(), re.M)}


def test_sum_of_expositions() -> None:
    one = ("# HELP c_total c\n# TYPE c_total counter\nc_total{a=\"x\"} 2.0\n"
           f"# HELP g g\n# TYPE g gauge\ng 5.0\n# TYPE {RATIO.split('{')[0]} gauge\n{RATIO} 90.0\n"
           "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1.0\nh_bucket{le=\"+Inf\"} 2.0\n"
           "h_count 2.0\nh_sum 1.5\n")
    two = one.replace(" 2.0\n", " 3.0\n").replace("g 5.0", "g 7.0").replace(" 90.0", " 40.0")
    two += "# TYPE only_two gauge\nonly_two 1.0\n"
    total = samples(sum_expositions([one, two]))
    assert total == {'c_total{a="x"}': 5.0, "g": 12.0, RATIO: 40.0, 'h_bucket{le="1.0"}': 2.0,
                     'h_bucket{le="+Inf"}': 5.0, "h_count": 5.0, "h_sum": 3.0,
                     "only_two": 1.0}


def test_summed_counters_survive_a_restart_and_a_missed_scrape() -> None:
    def text(counter: float, bucket: float, gauge: float) -> str:
        return ("# TYPE c_total counter\nc_total 0\n".replace(" 0", f" {counter}")
                + f'# TYPE h histogram\nh_bucket{{le="+Inf"}} {bucket}\nh_count {bucket}\n'
                + f"h_sum {bucket}\n# TYPE g gauge\ng {gauge}\n")

    totals = WorkerTotals()

    def total(*workers: tuple[int, int, str | None]) -> dict[str, float]:
        parts = [totals.update(*worker) for worker in workers]
        return samples(sum_families([p for p in parts if p is not None]))

    assert total((0, 1, text(5, 2, 9)), (1, 1, text(7, 3, 1))) == {
        "c_total": 12, 'h_bucket{le="+Inf"}': 5, "h_count": 5, "h_sum": 5, "g": 10}
    assert total((0, 1, None), (1, 1, text(8, 3, 1)))["c_total"] == 13  # missed: last one
    assert total((0, 2, text(1, 0, 4)), (1, 1, text(8, 3, 1))) == {  # 0 restarted
        "c_total": 14, 'h_bucket{le="+Inf"}': 5, "h_count": 5, "h_sum": 5, "g": 5}
    assert total((0, 2, text(3, 1, 4)), (1, 1, text(8, 3, 1)))["c_total"] == 16
    # lower again without a new start: restarted too (its previous 3 stays counted)
    assert total((0, 2, text(0.5, 0, 4)), (1, 1, text(8, 3, 1)))["c_total"] == 16.5


async def test_summed_counters_do_not_go_down_when_a_worker_is_killed(tmp_path: Path,
                                                                     pki: Path) -> None:
    """Prometheus would take a lower sum for a reset, and increase() would then count the
    other workers' whole totals again: the shipped alerts would fire."""
    server, pids = start(workers_config(tmp_path, pki, buffer=NEVER))
    try:
        await send_to(pids, server.addresses["forward"], pki, 0, 0, 3)
        await send_to(pids, server.addresses["forward"], pki, 1, 3, 40)
        only(pids, None)
        _, body = await http_get(server.addresses["metrics"], "/metrics")
        before = samples(body)
        cumulative = re.findall(r"^# TYPE (\S+) (?:counter|histogram)$", body.decode(), re.M)
        assert before[INPUT] == 43
        seen = len(server.lines)
        os.kill(pids[1], signal.SIGKILL)
        server.wait_for(r" worker_died index=1 exit_code=-9 ", start=seen)
        missed = samples((await http_get(server.addresses["metrics"], "/metrics"))[1])
        server.wait_for(r" worker_listening .* worker=1$", start=seen)
        after = await scrape_once_worker_is_up(server.addresses["metrics"], 1)
        pids = {**pids, **worker_pids(server, seen)}
    finally:
        drain(server)
    for name, value in before.items():
        if name.startswith(tuple(cumulative)):
            assert missed[name] >= value, name
            assert after[name] >= value, name
    assert after[INPUT] == 43


async def scrape_once_worker_is_up(metrics: str, index: int) -> dict[str, float]:
    """The summed samples once the supervisor scrapes worker `index` again: a restarted
    worker logs worker_listening just before it tells the supervisor its new metrics
    port, and a scrape in between still asks the dead worker's port (up 0)."""
    up = f'mwdlogd_worker_up{{worker="{index}"}}'
    with trio.fail_after(10):
        while (found := samples((await http_get(metrics, "/metrics"))[1]))[up] != 1:  # noqa: ASYNC110 - another process
            await trio.sleep(0.05)
    return found


async def send_to(pids: dict[int, int], forward: str, pki: Path, serving: int, first: int,
                  count: int) -> None:
    only(pids, serving)
    reply = await send_one(forward, client_context(pki), packed(
        "nginx.access", engine_records(count, start=first, time=1732500000.5),
        chunk=f"c{first}"))
    assert reply == {"ack": f"c{first}"}


@needs_prometheus
async def test_prometheus_sees_every_worker_on_one_endpoint(tmp_path: Path, pki: Path) -> None:
    server, pids = start(workers_config(tmp_path, pki, buffer=NEVER))
    try:
        await send_to(pids, server.addresses["forward"], pki, 0, 0, 3)
        await send_to(pids, server.addresses["forward"], pki, 1, 3, 40)
        only(pids, None)
        workers = [samples((await http_get(server.addresses["metrics"], f"/metrics?worker={n}"))[1])
                   for n in (0, 1)]
        status, body = await http_get(server.addresses["metrics"], "/metrics")
        assert status == 200
        total = samples(body)
        assert 0 < workers[0][BUFFER] < workers[1][BUFFER]  # each holds its own records
        assert total[BUFFER] == workers[0][BUFFER] + workers[1][BUFFER]
        assert (workers[0][INPUT], workers[1][INPUT], total[INPUT]) == (3, 40, 43)
        assert total[RATIO] == min(workers[0][RATIO], workers[1][RATIO]) < 100
        assert total['mwdlogd_worker_up{worker="0"}'] == total['mwdlogd_worker_up{worker="1"}'] \
            == 1
        assert (await http_get(server.addresses["metrics"], "/metrics?worker=2"))[0] == 404
        lint = await trio.run_process(["promtool", "check", "metrics"], stdin=body,
                                      capture_stdout=True, capture_stderr=True, check=False)
        problems = [line for line in (lint.stdout + lint.stderr).decode().splitlines()
                    if line and not KEPT_COUNT_GAUGE.fullmatch(line)]
        assert (lint.returncode, problems) in ((0, []), (3, []))  # 3: lint findings only
        found = await scrape_with_prometheus(tmp_path, server.addresses["metrics"])
    finally:
        drain(server)
    assert found["buffer"] == total[BUFFER]
    assert found["alert_expr"] == total[BUFFER]
    assert found["input"] == 43
    assert found["rules"] == {"ok"}


async def scrape_with_prometheus(tmp_path: Path, target: str) -> dict[str, Any]:
    """Prometheus with the shipped alerts.yml scraping `target`: what it sees."""
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    buffer_alert = re.search(r"alert: LogServerBufferOver1GiB\n\s+expr: (.+)\n", alerts)
    assert buffer_alert is not None
    async with running_prometheus(tmp_path, target) as web:
        with trio.fail_after(60):
            buffer = await first_value(web, "fluentd_output_status_buffer_total_bytes")
            # the shipped alert's expression, its threshold lowered to what the test holds
            expr = buffer_alert[1].replace("> 1073741824", "> 0")
            alert_expr = await first_value(web, expr)
            input_records = await first_value(web, "sum(fluentd_input_status_num_records_total)")
            health = await rules_health(web)
    return {"buffer": buffer, "alert_expr": alert_expr, "input": input_records, "rules": health}


def read_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


async def rules_health(web: str) -> set[str]:
    """Health of every loaded rule, once each has been evaluated."""
    while True:
        body = await trio.to_thread.run_sync(read_url, f"http://{web}/api/v1/rules")
        health = {rule["health"] for group in json.loads(body)["data"]["groups"]
                  for rule in group["rules"]}
        if health and "unknown" not in health:
            return health
        await trio.sleep(0.5)


async def first_value(web: str, query: str) -> float:
    """The query's single value once Prometheus has it (it needs a scrape first)."""
    while True:
        try:
            result = (await prometheus_query(web, query))["data"]["result"]
        except OSError:
            result = []
        if result:
            assert len(result) == 1, result
            return float(result[0]["value"][1])
        await trio.sleep(0.5)
