"""docs/operations.md stays true: its commands exist, its alert rules load in Prometheus'
promtool and name only metrics a running server exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Running
from helpers import client_context, engine_records, http_get, ndjson, post

DOCS = Path(__file__).resolve().parents[1] / "docs"
RULES = DOCS / "mwdlogd-alerts.yml"
PROMQL_FUNCTIONS = {"increase", "rate", "sum", "by", "up"}


def documented_commands() -> set[tuple[str, ...]]:
    """`mwdlogd certs renew` from every `$ mwdlogd ...` line: the subcommand words."""
    found = set()
    for line in (DOCS / "operations.md").read_text().splitlines():
        if match := re.match(r"\$ mwdlogd ((?:--config \S+ )?)(.*)", line):
            words = [w for w in match[2].split() if re.fullmatch(r"[a-z][a-z-]*", w)]
            found.add(tuple(words[:2] if words[0] == "certs" else words[:1]))
    return found


def test_every_documented_command_exists() -> None:
    commands = documented_commands()
    assert {("health",), ("doctor",), ("check-config",), ("certs", "check"),
            ("certs", "renew"), ("replay",)} <= commands
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "mwdlogd", *command, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_alert_rules_load_in_promtool() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


async def test_alert_rules_name_only_exported_metrics(server: Running, pki: Path) -> None:
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       ndjson(engine_records(3)))
    assert reply.status == 200
    await server.app.flush("test")
    status, body = await http_get(server.addresses.metrics, "/metrics")
    assert status == 200
    exported = set(re.findall(r"^# TYPE (\S+) ", body.decode(), re.M))
    exported |= {f"{name}_total" for name in exported}
    named = {name for expr in re.findall(r"expr: (.*)", RULES.read_text())
             for name in re.findall(r"\b([a-z_]+)(?=[{\[(])", expr)} - PROMQL_FUNCTIONS
    assert named and named <= exported, named - exported
