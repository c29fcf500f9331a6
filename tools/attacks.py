#!/usr/bin/env python3
"""Memory attacks against mwdlogd at its default configuration: peak RSS of the server
(VmHWM) under each attack against `server.memory_limit`, and the p99/max latency of a
good HTTPS client posting alongside.

Each attack gets a fresh server subprocess (own dev PKI, loopback, ports 0; everything
else at its default unless --config gives an operator's file), so each VmHWM is that
attack's alone. Prints a Markdown table on stdout (for BENCHMARKS.md), progress on stderr.

    python tools/attacks.py
    python tools/attacks.py --only forward_compressed_bomb --config /etc/mwdlogd/config.toml
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import tomllib
from functools import partial
from pathlib import Path
from typing import Any

import tomli_w
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from memory_attacks import ATTACKS, MIB, Attack, Outcome, Target, forward_unfinished, run_attack  # noqa: E402

from mwdlogd.certs import init_certs  # noqa: E402
from mwdlogd.config import structure_config  # noqa: E402

from helpers import TOKEN  # noqa: E402
from server_process import ServerProcess  # noqa: E402


async def no_attack(target: Target) -> str:
    """The noise floor: the good client alone for a second."""
    await trio.sleep(1.0)
    return "-"


ALL: dict[str, Attack] = {
    "none (baseline)": no_attack,
    **ATTACKS,
    "forward_unfinished_100x8mb": partial(forward_unfinished, connections=100),
}


def server_config(work: Path, pki: Path, operator: dict[str, Any]) -> dict[str, Any]:
    """The operator's config (or the defaults) with our PKI, token, ports and paths."""
    raw = json.loads(json.dumps(operator))  # a deep copy
    raw.setdefault("tls", {}).update(cert=str(pki / "server.crt"), key=str(pki / "server.key"),
                                     ca=str(pki / "ca.crt"))
    for section in ("http", "forward", "health", "monitor", "metrics"):
        raw.setdefault(section, {}).update(bind="127.0.0.1", port=0)
    raw.setdefault("auth", {})["tokens"] = [{"name": "engine-01", "token": TOKEN}]
    raw.setdefault("storage", {})["root"] = str(work / "logs")
    raw.setdefault("buffer", {})["path"] = str(work / "buffer")
    return raw


def run_one(name: str, attack: Attack, work: Path, pki: Path,
            operator: dict[str, Any]) -> Outcome:
    work.mkdir()
    config = work / "config.toml"
    config.write_text(tomli_w.dumps(server_config(work, pki, operator)))
    server = ServerProcess(config)
    try:
        target = Target(server.addresses["http"], server.addresses["forward"], pki,
                        server.process.pid)
        outcome, _ = trio.run(run_attack, name, attack, target)
        server.signal(signal.SIGTERM)
        server.wait()
        return outcome
    finally:
        server.stop()


def table(outcomes: list[Outcome], limit: int) -> str:
    rows = ["| attack | attacker saw | peak RSS (MiB) | of memory_limit | good requests "
            "| good p99 (ms) | good max (ms) |", "|---|---|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        rows.append(f"| {o.attack} | {o.seen} | {o.peak_rss / MIB:.0f} | "
                    f"{100 * o.peak_rss / limit:.0f}% | {o.good_requests - o.good_failures}/"
                    f"{o.good_requests} | {o.good_p99_s * 1000:.0f} | {o.good_max_s * 1000:.0f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="operator config to measure (ports, "
                        "paths, certs and tokens are replaced); default: the defaults")
    parser.add_argument("--only", action="append", choices=sorted(ALL), metavar="ATTACK",
                        help="run only this attack (repeatable)")
    args = parser.parse_args()
    operator = tomllib.loads(args.config.read_text()) if args.config else {}
    limit = structure_config(server_config(Path("/"), Path("/"), operator)).server.memory_limit
    names = args.only or list(ALL)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mwdlogd-attacks-") as tmp:
        pki = Path(tmp) / "pki"
        init_certs(pki, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=2)
        for n, name in enumerate(names, start=1):
            print(f"[{n}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            outcome = run_one(name, ALL[name], Path(tmp) / name, pki, operator)
            print(f"    {json.dumps(outcome.summary())}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    print(f"server.memory_limit = {limit / MIB:.0f} MiB\n")
    print(table(outcomes, limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
