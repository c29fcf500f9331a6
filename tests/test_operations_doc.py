"""docs/operations.md stays true: its commands exist, and the alert rules it points to
(deploy/prometheus/alerts.yml) name only metrics a running server exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mwdlogd.cli import main

from conftest import Running
from helpers import client_context, engine_records, http_get, ndjson, post

DOCS = Path(__file__).resolve().parents[1] / "docs"
RULES = DOCS.parent / "deploy" / "prometheus" / "alerts.yml"


def documented_commands() -> set[tuple[str, ...]]:
    """`mwdlogd certs renew` from every `$ mwdlogd ...` line: the subcommand words."""
    found = set()
    for line in (DOCS / "operations.md").read_text().splitlines():
        if match := re.match(r"\$ mwdlogd ((?:--config \S+ )?)(.*)", line):
            words = re.match(r"([a-z][a-z-]*)(?: ([a-z][a-z-]*)\b)?", match[2])
            assert words, line
            found.add((words[1], words[2]) if words[1] == "certs" else (words[1],))
    return found


def test_every_documented_command_exists(capsys: pytest.CaptureFixture[str]) -> None:
    commands = documented_commands()
    assert {("health",), ("doctor",), ("check-config",), ("certs", "check"),
            ("certs", "renew"), ("flush",), ("replay",)} <= commands
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0, command
        assert capsys.readouterr().out.startswith(f"usage: mwdlogd {' '.join(command)}")


async def test_alert_rules_name_only_exported_metrics(server: Running, pki: Path) -> None:
    reply = await post(server.addresses.http, client_context(pki), "/nginx.access",
                       ndjson(engine_records(3)))
    assert reply.status == 200
    await server.app.flush("test")
    status, body = await http_get(server.addresses.metrics, "/metrics")
    assert status == 200
    exported = set(re.findall(r"^# TYPE (\S+) ", body.decode(), re.M))
    exported |= {f"{name}_total" for name in exported}
    exprs = re.findall(r"expr: >-\n((?:\s{10}.*\n)+)|expr: (.*)", RULES.read_text())
    named = {name for block, line in exprs for name in
             re.findall(r"\b((?:fluentd|mwdlogd)_[a-z_]+)", block + line)}
    assert len(named) >= 6 and named <= exported, named - exported
