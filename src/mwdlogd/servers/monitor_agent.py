"""Fluentd monitor_agent's `/api/plugins.json` and `/api/plugins` (LTSV), as pure functions,
so scripts written against the Fluentd log server keep working."""

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from mwdlogd.config import Config
from mwdlogd.telemetry import OUTPUT_PLUGIN, Telemetry

Plugin = dict[str, Any]


def plugins(config: Config, telemetry: Telemetry) -> list[Plugin]:
    http, forward = telemetry.inputs["http"], telemetry.inputs["forward"]
    out, buffer = telemetry.output, telemetry.buffer
    inputs = [
        _input("in_http", "http", http.emit_records, http.emit_count, {
            "bind": config.http.bind, "port": str(config.http.port),
            "body_size_limit": str(config.http.body_size_limit)}),
        _input("in_forward", "forward", forward.emit_records, forward.emit_count, {
            "bind": config.forward.bind, "port": str(config.forward.port),
            "transport": config.forward.transport}),
    ]
    plugin_id, plugin_type = OUTPUT_PLUGIN
    output = {
        "plugin_id": plugin_id, "plugin_category": "output", "type": plugin_type,
        "config": {"@type": plugin_type, "@id": plugin_id, "path": config.storage.root,
                   "buffer_path": config.buffer.path,
                   "flush_interval": str(config.buffer.flush_interval),
                   "total_limit_size": str(config.buffer.total_limit),
                   "chunk_limit_size": str(config.buffer.chunk_limit),
                   "timekey": "3600", "timekey_wait": str(config.buffer.timekey_wait)},
        "output_plugin": True,
        "buffer_queue_length": buffer.queue_length(),
        "buffer_timekeys": buffer.timekeys(),
        "buffer_total_queued_size": buffer.total_bytes(),
        "retry_count": out.retry_count,
        "emit_records": out.emit_records, "emit_count": out.emit_count,
        "write_count": out.write_count, "rollback_count": out.rollback_count,
        "slow_flush_count": out.slow_flush_count,
        "flush_time_count": round(out.flush_time_count),
        "retry": {},
    }
    return [*inputs, output]


def _input(plugin_id: str, plugin_type: str, records: int, count: int,
           settings: Mapping[str, str]) -> Plugin:
    return {"plugin_id": plugin_id, "plugin_category": "input", "type": plugin_type,
            "config": {"@type": plugin_type, "@id": plugin_id, **settings},
            "output_plugin": False, "retry_count": None, "emit_records": records,
            "emit_count": count, "emit_size": 0}


def select(found: list[Plugin], query: str) -> list[Plugin]:
    """Fluentd's query options: with_config=false, with_retry=false, type=, @id=."""
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    chosen = [p for p in found
              if ("type" not in options or p["type"] == options["type"])
              and ("@id" not in options or p["plugin_id"] == options["@id"])]
    drop = {key for key, option in (("config", "with_config"), ("retry", "with_retry"))
            if options.get(option, "true").lower() == "false"}
    return [{k: v for k, v in p.items() if k not in drop} for p in chosen]


def without_settings(found: list[Plugin]) -> list[Plugin]:
    """What anyone on the monitor port may see: counters and each plugin's `@type` and
    `@id`; its paths, binds and limits need a token with no customer restriction."""
    return [{**p, "config": {k: v for k, v in p["config"].items() if k in ("@type", "@id")}}
            if "config" in p else p for p in found]


def as_json(found: list[Plugin]) -> bytes:
    return json.dumps({"plugins": found}).encode() + b"\n"


def as_ltsv(found: list[Plugin]) -> bytes:
    """One line per plugin, `key:value` pairs split by tabs; nested values as JSON."""
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        return json.dumps(value) if isinstance(value, dict | list) else str(value)

    return b"".join(("\t".join(f"{k}:{text(v)}" for k, v in p.items()) + "\n").encode()
                    for p in found)
