"""Metrics with exact values, promtool on a live scrape and on the alert rules, a real
Prometheus scraping the server, the monitor_agent API and the live tail."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from mwdlogd.tail_client import follow, pretty, tail_url

from conftest import Running, make_config, start_app
from forward_client import RawForward, packed
from helpers import TOKEN, client_context, engine_records, free_port, http_get, ndjson, post

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
HOUR_2024 = 1732500000.5
needs_prometheus = pytest.mark.skipif(
    not os.environ.get("CI") and shutil.which("promtool") is None,
    reason="Debian package prometheus (tools/test.sh installs it; in CI these never skip)")


def samples(exposition: bytes) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", exposition.decode(), re.M)}


OUT = '{plugin_id="hourly_files",type="file"}'
FLUENTD_COUNT_GAUGES = {f"fluentd_output_status_{name}_count" for name in (
    "retry", "emit", "write", "rollback", "flush_time", "slow_flush")}


async def known_traffic(running: Running, pki: Path) -> None:
    context = client_context(pki)
    records = engine_records(4, time=HOUR_2024) + engine_records(
        2, start=4, log_type="openappsec", time=HOUR_2024) + [{"id": "x", "fqdn": "f"}]
    assert (await post(running.addresses.http, context, "/nginx.access", ndjson(records))
            ).status == 200
    assert (await post(running.addresses.http, context, "/nginx.access", b"{",)).status == 400
    assert (await post(running.addresses.http, context, "/nginx.access", b"{}", token="nope")
            ).status == 401
    client = await RawForward.connect(running.addresses.forward, context)
    try:
        await client.send(packed("waf.events", engine_records(5, start=10), chunk="c1\n"))
        assert await client.receive() == {"ack": "c1\n"}
        await client.send(packed("waf.events", engine_records(5, start=10), chunk="c1\n"))
        assert await client.receive() == {"ack": "c1\n"}  # a resend: not stored again
    finally:
        await client.aclose()
    await running.app.flush("test")


async def test_metric_values_after_known_traffic(server: Running, pki: Path) -> None:
    await known_traffic(server, pki)
    status, body = await http_get(server.addresses.metrics, "/metrics")
    assert status == 200
    m = samples(body)
    host = 'hostname="testhost"'
    assert m[f'fluentd_input_status_num_records_total{{{host},tag="nginx.access"}}'] == 7
    assert m[f'fluentd_input_status_num_records_total{{{host},tag="waf.events"}}'] == 5
    assert m[f'fluentd_output_status_num_records_total{{{host},tag="nginx.access"}}'] == 7
    assert m[f'fluentd_output_status_num_records_total{{{host},tag="waf.events"}}'] == 5
    assert m[f"fluentd_output_status_buffer_total_bytes{OUT}"] == 0
    assert m[f"fluentd_output_status_buffer_queue_length{OUT}"] == 0
    assert m[f"fluentd_output_status_buffer_stage_byte_size{OUT}"] == 0
    assert m[f"fluentd_output_status_buffer_available_space_ratio{OUT}"] == 100
    assert m[f"fluentd_output_status_emit_count{OUT}"] == 4  # 3 groups over HTTP, 1 forward
    assert m[f"fluentd_output_status_write_count{OUT}"] == 3  # three files
    assert m[f"fluentd_output_status_retry_count{OUT}"] == 0
    assert m[f"fluentd_output_status_num_errors{OUT}"] == 0
    assert m[f"fluentd_output_status_rollback_count{OUT}"] == 0
    assert m[f"fluentd_output_status_slow_flush_count{OUT}"] == 0
    assert m[f"fluentd_output_status_flush_time_count{OUT}"] > 0
    assert m['mwdlogd_records_total{log_type="nginx"}'] == 9  # forward ones say nginx
    assert m['mwdlogd_records_total{log_type="openappsec"}'] == 2
    assert m['mwdlogd_records_total{log_type="invalid"}'] == 1
    assert m['mwdlogd_rejected_requests_total{protocol="http",reason="malformed_body"}'] == 1
    assert m['mwdlogd_rejected_requests_total{protocol="http",reason="unauthorized"}'] == 1
    assert m['mwdlogd_http_requests_total{status="200"}'] == 1
    assert m["mwdlogd_forward_duplicate_chunks_total"] == 1
    assert m['mwdlogd_ack_latency_seconds_count{protocol="http"}'] == 1
    assert m['mwdlogd_ack_latency_seconds_count{protocol="forward"}'] == 2
    assert m["mwdlogd_journal_fsync_seconds_count"] == 2
    assert m['mwdlogd_connections_total{protocol="forward"}'] == 1


@needs_prometheus
async def test_promtool_accepts_a_live_scrape(server: Running, pki: Path) -> None:
    await known_traffic(server, pki)
    _, body = await http_get(server.addresses.metrics, "/metrics")
    result = await trio.run_process(["promtool", "check", "metrics"], stdin=body,
                                    capture_stdout=True, capture_stderr=True, check=False)
    # Exit 3 is lint only. Its one complaint allowed: Fluentd's own `*_count` gauge names,
    # which operators' alerts use and which therefore keep their names.
    findings = (result.stdout + result.stderr).decode().splitlines()
    assert result.returncode in (0, 3), findings
    assert {line.split()[0] for line in findings} <= FLUENTD_COUNT_GAUGES, findings
    assert all('should not have "_count" suffix' in line for line in findings), findings


@needs_prometheus
@pytest.mark.parametrize("command", [
    ["promtool", "check", "rules", "alerts.yml"],
    ["promtool", "test", "rules", "alerts_test.yml"],
    ["promtool", "check", "config", "prometheus.yml"],
])
def test_shipped_prometheus_files(command: list[str]) -> None:
    result = subprocess.run(command, cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def prometheus_query(address: str, query: str) -> dict[str, Any]:
    from urllib.parse import quote
    status, body = await http_get(address, f"/api/v1/query?query={quote(query)}")
    assert status in (200, 400, 422), body
    return dict(json.loads(body))


@contextlib.asynccontextmanager
async def running_prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """A real Prometheus with the shipped alerts.yml scraping `target` every second; yields
    its web address."""
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n  - job_name: mwdlogd\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    web = f"127.0.0.1:{free_port()}"
    process = await trio.lowlevel.open_process(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield web
    finally:
        process.terminate()
        await process.wait()


@needs_prometheus
async def test_a_real_prometheus_scrapes_the_server(server: Running, pki: Path,
                                                    tmp_path: Path) -> None:
    await known_traffic(server, pki)
    async with running_prometheus(tmp_path, server.addresses.metrics) as web:
        query = 'fluentd_input_status_num_records_total{tag="nginx.access"}'
        result: list[Any] = []
        with trio.fail_after(60):
            while not result:
                await trio.sleep(0.5)
                try:
                    result = (await prometheus_query(web, query))["data"]["result"]
                except OSError:
                    continue
        assert result[0]["metric"]["job"] == "mwdlogd"
        assert float(result[0]["value"][1]) == 7
        dashboard = json.loads((DEPLOY / "grafana" / "mwdlogd.json").read_text())
        for panel in dashboard["panels"]:  # every dashboard query is valid PromQL
            for target in panel["targets"]:
                answer = await prometheus_query(web, target["expr"])
                assert answer["status"] == "success", (target["expr"], answer)


async def test_monitor_agent_plugins(server: Running, pki: Path) -> None:
    await known_traffic(server, pki)
    status, body = await http_get(server.addresses.monitor, "/api/plugins.json")
    assert status == 200
    plugins = {p["plugin_id"]: p for p in json.loads(body)["plugins"]}
    assert set(plugins) == {"in_http", "in_forward", "hourly_files"}
    assert plugins["in_http"]["emit_records"] == 7 and plugins["in_http"]["type"] == "http"
    assert plugins["in_forward"]["emit_records"] == 5
    output = plugins["hourly_files"]
    assert output["output_plugin"] is True and output["plugin_category"] == "output"
    assert (output["emit_records"], output["write_count"], output["retry_count"]) == (12, 3, 0)
    assert output["buffer_total_queued_size"] == 0 and output["config"]["@type"] == "file"
    _, body = await http_get(server.addresses.monitor,
                             "/api/plugins.json?type=forward&with_config=false")
    (only,) = json.loads(body)["plugins"]
    assert only["plugin_id"] == "in_forward" and "config" not in only
    _, body = await http_get(server.addresses.monitor, "/api/plugins.json?@id=hourly_files"
                                                       "&with_retry=false")
    (only,) = json.loads(body)["plugins"]
    assert only["plugin_id"] == "hourly_files" and "retry" not in only
    status, body = await http_get(server.addresses.monitor, "/api/plugins?with_config=false")
    lines = body.decode().splitlines()
    assert status == 200 and len(lines) == 3
    fields = dict(f.split(":", 1) for f in lines[0].split("\t"))
    assert fields["plugin_id"] == "in_http" and fields["emit_records"] == "7"
    assert (await http_get(server.addresses.monitor, "/nope"))[0] == 404


def ws_url(running: Running, **query: str) -> str:
    return tail_url(running.addresses.monitor, token=query.pop("token", TOKEN),
                    customer=query.get("customer"), log_type=query.get("log_type"),
                    fqdn=query.get("fqdn"), sample=float(query.get("sample", 1)))


async def test_live_tail_streams_filtered_records(server: Running, pki: Path) -> None:
    context = client_context(pki)
    received: dict[str, list[str]] = {"all": [], "acme-waf": [], "other": []}

    async def watch(name: str, url: str, count: int) -> None:
        async with trio_websocket.open_websocket_url(url) as websocket:
            for _ in range(count):
                received[name].append(json.loads(await websocket.get_message())["id"])

    with trio.fail_after(20):
        await watch_all(watch, server, context)
    assert received == {"all": ["r0", "r1", "r2", "r3", "r4", "r5"], "acme-waf": ["r3", "r4"],
                        "other": ["r5"]}


async def watch_all(watch: Any, server: Running, context: Any) -> None:
    async with trio.open_nursery() as viewers:
        viewers.start_soon(watch, "all", ws_url(server), 6)
        viewers.start_soon(watch, "acme-waf", ws_url(server, customer="acme",
                                                      log_type="openappsec"), 2)
        viewers.start_soon(watch, "other", ws_url(server, customer="other"), 1)
        while server.app.telemetry.tail_viewers < 3:
            await trio.testing.wait_all_tasks_blocked()
        await post(server.addresses.http, context, "/nginx.access",
                   ndjson(engine_records(3, time=HOUR_2024)))
        await post(server.addresses.http, context, "/waf.events",
                   ndjson(engine_records(2, start=3, log_type="openappsec", time=HOUR_2024)))
        await post(server.addresses.http, context, "/nginx.access",
                   ndjson(engine_records(1, start=5, customer="other", time=HOUR_2024)))


async def test_tail_needs_a_token(server: Running) -> None:
    with pytest.raises(trio_websocket.HandshakeError):
        async with trio_websocket.open_websocket_url(ws_url(server, token="wrong")):
            pass


async def test_a_stalled_viewer_loses_records_not_ingest_speed(
        nursery: trio.Nursery, tmp_path: Path, pki: Path) -> None:
    running = await start_app(nursery, make_config(tmp_path, pki))
    context = client_context(pki)
    async with trio_websocket.open_websocket_url(ws_url(running)):  # connects, never reads
        while running.app.telemetry.tail_viewers < 1:
            await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        with trio.fail_after(30):  # were ingest to wait for the viewer, this would expire
            for batch in range(30):
                reply = await post(running.addresses.http, context, "/nginx.access",
                                   ndjson(engine_records(100, start=batch * 100,
                                                         time=HOUR_2024)))
                assert reply.status == 200
        with_viewer = trio.current_time() - started
        dropped = running.app.telemetry.registry.get_sample_value(
            "mwdlogd_tail_dropped_messages_total") or 0
    # The viewer's queue holds 1000 and its socket some more; the rest was dropped.
    assert 0 < dropped <= 3000 - 1000
    print(f"30 batches of 100 with a stalled viewer: {with_viewer:.3f} s, {dropped:.0f} dropped")


async def test_tail_cli_prints_records(server: Running, pki: Path) -> None:
    async def send_when_watched() -> None:
        while server.app.telemetry.tail_viewers < 1:  # noqa: ASYNC110 - another process
            await trio.sleep(0.02)
        await post(server.addresses.http, client_context(pki), "/nginx.access",
                   ndjson(engine_records(3, time=HOUR_2024)))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_when_watched)
            result = await trio.run_process(
                [sys.executable, "-m", "mwdlogd", "tail", "--server", server.addresses.monitor,
                 "--token", TOKEN, "--count", "3"], capture_stdout=True, capture_stderr=True,
                check=False)
            nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.decode().splitlines()] == [
        "r0", "r1", "r2"]


def test_pretty_line() -> None:
    line = pretty({"timestamp": "2024-11-25T02:00:00.500Z", "customer_name": "acme",
                   "fqdn": "a.test", "log_type": "nginx", "status": 200, "tag": "t"})
    assert "acme/nginx/a.test" in line and '"status": 200' in line and '"tag"' not in line


async def test_follow_reports_an_unreachable_server() -> None:
    from mwdlogd.errors import MwdlogdError
    with pytest.raises(MwdlogdError, match="cannot reach"):
        await follow([f"ws://127.0.0.1:{free_port()}/api/tail"], sys.stdout)
