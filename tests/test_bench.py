"""tools/bench.py end to end, briefly: it measures a given config (here two workers and
igzip) and reports what landed. A smoke test of the harness, not a timed test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "tools" / "bench.py"


def test_bench_measures_a_given_config(tmp_path: Path) -> None:
    config = tmp_path / "operator.toml"
    config.write_text('[server]\nworkers = 2\n[storage]\ncompression = "igzip"\n'
                      '[buffer]\nflush_interval = "1s"\n')
    result = subprocess.run(
        [sys.executable, str(BENCH), "--config", str(config), "--duration", "1",
         "--batch", "100", "--connections", "2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["workers"], report["compression"], report["config"]) == (2, "igzip",
                                                                         str(config))
    assert report["acked_records"] > 0 and not report["errors"]
    assert report["stored_records"] == report["acked_records"]
    assert report["bytes_written"] > 0 and report["server_cpu_s"] > 0
    assert "cores" in report["machine"] and "acked records/s" in result.stderr
