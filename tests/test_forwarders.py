"""The Engines' real forwarders against a real mwdlogd: Fluentd 1.18 and Fluent Bit 4.2.8
tail files and send them with the configuration blocks of docs/forwarders.md (read from
the doc, paths and ports filled in), over forward and HTTPS, with TLS, client
certificates, shared key, acks and tokens. Every test checks the exact set of records
that landed, in which tree, with which fields; the kill tests `kill -9` mwdlogd while
the forwarder sends and restart it.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import signal
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from peers.real import Peer, start_fluent_bit, start_fluentd

from conftest import config_raw
from helpers import TOKEN, free_port
from server_process import ServerProcess, write_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "forwarders.md"
SHARED_KEY = "test-shared-key-7"
DELIVERY_TIMEOUT_S = 90.0
PARSERS = """[PARSER]
    Name   json
    Format json
"""


def doc_block(name: str) -> str:
    """The fenced block after `<!-- block: name -->` in docs/forwarders.md."""
    match = re.search(rf"<!-- block: {re.escape(name)} -->\n```[a-z]*\n(.*?)```",
                      DOC.read_text(), re.S)
    assert match is not None, f"docs/forwarders.md has no block {name!r}"
    return match.group(1)


def edit(text: str, old: str, new: str) -> str:
    """Replace a line the doc must hold (so a doc change cannot make a test vacuous)."""
    assert old in text, f"{old!r} not in block:\n{text}"
    return text.replace(old, new)


@attrs.define
class Site:
    """One mwdlogd subprocess on fixed ports, so it can be killed and started again."""

    config: Path
    root: Path
    http_port: int
    forward_port: int
    pki: Path
    server: ServerProcess | None = None

    def start(self) -> None:
        self.server = ServerProcess(self.config)

    def kill(self) -> None:
        assert self.server is not None
        self.server.signal(signal.SIGKILL)
        try:
            assert self.server.wait() == -signal.SIGKILL
        finally:
            self._keep_log()

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            self.server.signal(signal.SIGTERM)
            try:
                assert self.server.wait() == 0
            finally:
                self._keep_log()

    def _keep_log(self) -> None:
        """Append this run's log to mwdlogd.log beside the config (for a failure)."""
        assert self.server is not None
        with (self.config.parent / "mwdlogd.log").open("a") as file:
            file.write("\n".join(self.server.lines) + "\n")

    def fill(self, block: str, workdir: Path, port: int | None = None) -> str:
        """A doc block with this test's host, ports (or `port`, a relay's, for both),
        certificates, key, token and dirs."""
        for old, new in (("logserver.example.net", "localhost"),
                         ("24224", str(port or self.forward_port)),
                         ("8888", str(port or self.http_port)),
                         ("/etc/engine/certs/", f"{self.pki}/"),
                         ("CHANGE-ME-SHARED-KEY", SHARED_KEY), ("CHANGE-ME-TOKEN", TOKEN),
                         ("/var/lib/fluent/", f"{workdir}/")):
            block = block.replace(old, new)
        return block


def open_site(tmp_path: Path, pki: Path, **sections: dict[str, Any]) -> Site:
    """A started mwdlogd with the tests' forwarder settings, `sections` merged in."""
    http_port, forward_port = free_port(), free_port()
    settings: dict[str, dict[str, Any]] = {
        "http": {"port": http_port},
        "forward": {"port": forward_port, "shared_key": SHARED_KEY},
        "buffer": {"flush_interval": "200ms"}}
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    site = Site(write_config(tmp_path / "config.toml", config_raw(tmp_path, pki, **settings)),
                tmp_path / "logs", http_port, forward_port, pki)
    site.start()
    return site


@pytest.fixture
def site(tmp_path: Path, pki: Path) -> Iterator[Site]:
    with open_site(tmp_path, pki) as running:
        yield running


# ---- what the Engines write, and what must land -------------------------------------

@attrs.frozen
class Expected:
    """A record that must land once: its tree (customer/log type/fqdn) and fields."""

    tree: str
    fields: dict[str, Any]


# (file name -> its bytes, id -> what must land, id -> raw bytes of a uri not UTF-8)
Inputs = tuple[dict[str, bytes], dict[str, Expected], dict[str, bytes]]


def json_lines(scenario: str, count: int) -> tuple[bytes, dict[str, Expected]]:
    """Engine JSON lines of one scenario: customer = scenario, site = scenario.example."""
    lines, expected = [], {}
    for n in range(count):
        record = {"id": f"{scenario}-{n}", "customer_name": scenario,
                  "fqdn": f"{scenario}.example", "log_type": "nginx", "uri": f"/p/{n}",
                  "status": 200}
        lines.append(json.dumps(record).encode())
        expected[record["id"]] = Expected(f"{scenario}/nginx/{scenario}.example", record)
    return b"".join(line + b"\n" for line in lines), expected


def bad_utf8_lines(scenario: str, count: int
                   ) -> tuple[bytes, dict[str, Expected], dict[str, bytes]]:
    """Lines whose `uri` holds raw bytes that are not UTF-8 (as WAF logs do), between
    valid ones; returns the raw uri bytes by id too."""
    body, expected = json_lines(scenario, count)
    lines, raw = [], {}
    for line in body.splitlines():
        record = json.loads(line)
        if int(record["id"].rsplit("-", 1)[1]) % 2:
            bad = f"/x{record['id']}".encode() + b"\xc0\xaf\xff"
            raw[record["id"]] = bad
            line = line.replace(json.dumps(record["uri"]).encode(), b'"' + bad + b'"')
        lines.append(line + b"\n")
    return b"".join(lines), expected, raw


def stored_now(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(tree, record) of everything readable now; a member being appended is skipped."""
    out = []
    for path in sorted(root.rglob("*.log.gz")):
        try:
            data = gzip.decompress(path.read_bytes())
        except (EOFError, OSError, zlib.error):
            continue  # an append in progress: read again on the next poll
        tree = str(path.relative_to(root).parents[3])
        out += [(tree, json.loads(line)) for line in data.splitlines()]
    return out


def wait_stored(root: Path, ids: set[str], timeout: float = DELIVERY_TIMEOUT_S,
                peer: Peer | None = None) -> None:
    """Poll the files (written by another process) until every id is there."""
    deadline = time.monotonic() + timeout
    while True:
        have = {record.get("id") for _, record in stored_now(root)}
        if ids <= have:
            return
        if time.monotonic() > deadline:
            missing = sorted(ids - have)
            detail = "\n".join(peer.lines[-40:]) if peer is not None else ""
            raise AssertionError(f"{len(missing)} records never landed, e.g. {missing[:5]}\n"
                                 f"{detail}")
        time.sleep(0.2)  # polling files another process writes, with a deadline


def check_landed(root: Path, expected: dict[str, Expected],
                 fields: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> None:
    """Every expected record landed once, in its tree, with its fields as sent (`fields`
    maps the expected fields to what is stored); nothing else landed."""
    stored = stored_now(root)
    count = Counter(record["id"] for _, record in stored)
    assert sorted(set(count) - set(expected)) == []
    assert sorted(set(expected) - set(count)) == []
    assert [i for i, n in count.items() if n > 1] == []
    for tree, record in stored:
        want = expected[record["id"]]
        assert tree == want.tree, record
        assert {k: record.get(k) for k in fields(want.fields)} == fields(want.fields), record
        assert "invalid_reason" not in record


# ---- Fluentd ------------------------------------------------------------------------

def fluentd_sources(work: Path, files: dict[str, bytes]) -> str:
    """in_tail sources: `oj.log` (json, Oj: str), `yajl.log` (json_parser yajl: bin),
    `re.log` (regexp: bin, customer and fqdn added by record_transformer), `bad.log`
    (json lines with invalid UTF-8)."""
    parse = {"oj": "@type json", "bad": "@type json",
             "yajl": "@type json\n    json_parser yajl",
             "re": "@type regexp\n    expression /^(?<host>\\S+) (?<id>\\S+) (?<uri>\\S+)$/"}
    out = [f"<system>\n  root_dir {work}/fluent-root\n</system>"]
    for name, data in files.items():
        (work / f"{name}.log").write_bytes(data)
        out.append(f"""<source>
  @type tail
  @id in_{name}
  path {work}/{name}.log
  pos_file {work}/{name}.log.pos
  read_from_head true
  tag nginx.{name}
  <parse>
    {parse[name]}
  </parse>
</source>""")
    if "re" in files:
        out.append("""<filter nginx.re>
  @type record_transformer
  <record>
    customer_name fd-re
    log_type nginx
    fqdn ${record["host"]}
  </record>
</filter>""")
    return "\n".join(out) + "\n"


def regexp_lines(count: int) -> tuple[bytes, dict[str, Expected]]:
    lines, expected = [], {}
    for n in range(count):
        host, id_ = f"site{n % 3}.example", f"fd-re-{n}"
        lines.append(f"{host} {id_} /r/{n}\n".encode())
        expected[id_] = Expected(f"fd-re/nginx/{host}",
                                 {"id": id_, "customer_name": "fd-re", "fqdn": host,
                                  "uri": f"/r/{n}"})
    return b"".join(lines), expected


def fluentd_inputs(prefix: str) -> Inputs:
    """Each kind of source Fluentd has, 40 records each, in one config."""
    oj, expected = json_lines(f"{prefix}-oj", 40)
    yajl, more = json_lines(f"{prefix}-yajl", 40)
    expected.update(more)
    regexp, more = regexp_lines(40)
    expected.update(more)
    bad, more, raw = bad_utf8_lines(f"{prefix}-bad", 40)
    expected.update(more)
    return {"oj": oj, "yajl": yajl, "re": regexp, "bad": bad}, expected, raw


def invalid_utf8_fields(raw: dict[str, bytes]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Expected stored fields of a record whose uri had raw bytes: U+FFFD shown, the
    original bytes in utf8_invalid."""
    def fields(sent: dict[str, Any]) -> dict[str, Any]:
        bad = raw.get(sent["id"])
        if bad is None:
            return sent
        return {**sent, "uri": f"/x{sent['id']}\ufffd\ufffd\ufffd",
                "utf8_invalid": {"/uri": base64.b64encode(bad).decode()}}
    return fields


def assert_bytes_recoverable(root: Path, raw: dict[str, bytes]) -> None:
    for _, record in stored_now(root):
        if record["id"] in raw:
            assert base64.b64decode(record["utf8_invalid"]["/uri"]) == raw[record["id"]]
            assert record["uri"].count("\ufffd") == 3


@pytest.mark.parametrize("compress", ["gzip", "plain"])
def test_fluentd_out_forward_block(site: Site, peers_cache: Path, tmp_path: Path, compress: str
                                   ) -> None:
    """The doc's out_forward block (TLS, client certificate, shared key, acks) with Oj
    (str), Yajl (bin) and regexp (bin) sources and lines that are not UTF-8: exact sets
    in their customer/fqdn trees, none in _invalid, the raw bytes recoverable."""
    files, expected, raw = fluentd_inputs("fd")
    fluentd = deliver_doc_block(
        site, tmp_path, "fluentd-forward",
        [("  compress gzip\n", "")] if compress == "plain" else [], expected,
        lambda block: start_fluentd(peers_cache, fluentd_sources(tmp_path, files) + block,
                                    tmp_path))
    check_landed(site.root, expected, fields=invalid_utf8_fields(raw))
    assert_bytes_recoverable(site.root, raw)
    assert fluentd.matching(r"\[(error|warn)\]") == []  # no retry, no parse failure


HTTP_VARIANTS = {
    "ndjson": [],
    "json_array-gzip": [("  content_type application/x-ndjson\n",
                         "  content_type application/json\n  json_array true\n"
                         "  compress gzip\n")],
}


@pytest.mark.parametrize("variant", sorted(HTTP_VARIANTS))
def test_fluentd_out_http_block(site: Site, peers_cache: Path, tmp_path: Path,
                                variant: str) -> None:
    """The doc's out_http block (client certificate, bearer token, the event time added
    as `time`): every record of every source lands once in its tree; lines that are not
    UTF-8 cost nothing (200, the bytes kept)."""
    files, expected, raw = fluentd_inputs("fh")
    fluentd = deliver_doc_block(
        site, tmp_path, "fluentd-http", HTTP_VARIANTS[variant], expected,
        lambda block: start_fluentd(peers_cache, fluentd_sources(tmp_path, files) + block,
                                    tmp_path))
    check_landed(site.root, expected, fields=invalid_utf8_fields(raw))
    assert_bytes_recoverable(site.root, raw)
    for _, record in stored_now(site.root):  # the event time travelled in the record
        assert record["timestamp"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(record["time"]))))
    assert fluentd.matching(r"\[(error|warn)\]") == []  # no retry, no backup


# ---- Fluent Bit ---------------------------------------------------------------------

def fluent_bit_config(work: Path, files: dict[str, bytes], block: str, *, yaml: bool) -> str:
    """tail (json parser) of each file, tag nginx.<name>, then the doc's output block."""
    (work / "parsers.conf").write_text(PARSERS)
    for name, data in files.items():
        (work / f"{name}.log").write_bytes(data)
    if yaml:
        inputs = "".join(f"""    - name: tail
      path: {work}/{name}.log
      tag: nginx.{name}
      read_from_head: true
      parser: json
""" for name in files)
        outputs = "".join(f"      {line}\n" if line else "\n" for line in block.splitlines())
        return f"""service:
  flush: 1
  grace: 1
  scheduler.base: 1
  scheduler.cap: 2
  log_level: info
  parsers_file: {work}/parsers.conf
pipeline:
  inputs:
{inputs}  outputs:
{outputs}"""
    inputs = "".join(f"""[INPUT]
    Name tail
    Path {work}/{name}.log
    Tag nginx.{name}
    Read_from_Head true
    Parser json
""" for name in files)
    return f"""[SERVICE]
    Flush 1
    Grace 1
    scheduler.base 1
    scheduler.cap 2
    Log_Level info
    Parsers_File {work}/parsers.conf
{inputs}{block}"""


def fluent_bit_inputs(prefix: str) -> Inputs:
    good, expected = json_lines(f"{prefix}-good", 60)
    bad, more, raw = bad_utf8_lines(f"{prefix}-bad", 40)
    expected.update(more)
    return {"good": good, "bad": bad}, expected, raw


# Any warning or error but the one every stop logs.
FLUENT_BIT_TROUBLE = r"\[ *(warn|error)\] (?!\[engine\] service will shutdown)"


def deliver_doc_block(site: Site, tmp_path: Path, name: str, edits: Iterable[tuple[str, str]],
                      expected: dict[str, Expected], start: Callable[[str], Peer]) -> Peer:
    """Start a forwarder (`start`) on the doc's block `name` with `edits`, wait until every
    expected record is stored, then stop it and the server; the stopped forwarder (for
    its log)."""
    block = site.fill(doc_block(name), tmp_path)
    for old, new in edits:
        block = edit(block, old, new)
    peer = start(block)
    try:
        wait_stored(site.root, set(expected), peer=peer)
    finally:
        peer.stop()
    site.stop()
    return peer


def deliver_fluent_bit_block(site: Site, peers_cache: Path, tmp_path: Path, name: str,
                             edits: list[tuple[str, str]], *, prefix: str
                             ) -> tuple[dict[str, Expected], dict[str, bytes], Peer]:
    """deliver_doc_block for Fluent Bit over fluent_bit_inputs: what was sent, its raw
    lines and the stopped Fluent Bit."""
    files, expected, raw = fluent_bit_inputs(prefix)
    yaml = name.endswith("yaml")
    peer = deliver_doc_block(site, tmp_path, name, edits, expected, lambda block: (
        start_fluent_bit(peers_cache, fluent_bit_config(tmp_path, files, block, yaml=yaml),
                         tmp_path, yaml=yaml)))
    return expected, raw, peer
FORWARD_VARIANTS = {"ini-gzip": ("fluentbit-forward-ini", []),
                    "yaml-plain": ("fluentbit-forward-yaml", [("  compress: gzip\n", "")])}


@pytest.mark.parametrize("variant", sorted(FORWARD_VARIANTS))
def test_fluent_bit_forward_block(site: Site, peers_cache: Path, tmp_path: Path,
                                  variant: str) -> None:
    """The doc's forward [OUTPUT] (INI and YAML; gzip and plain): exact set, once, in its
    trees; bytes that are not UTF-8 kept and recoverable."""
    expected, raw, peer = deliver_fluent_bit_block(site, peers_cache, tmp_path,
                                                   *FORWARD_VARIANTS[variant], prefix="fb")
    check_landed(site.root, expected, fields=invalid_utf8_fields(raw))
    assert_bytes_recoverable(site.root, raw)
    assert peer.matching(FLUENT_BIT_TROUBLE) == []


HTTP_BIT_VARIANTS = {"ini-json_lines-gzip": ("fluentbit-http-ini", []),
                     "ini-msgpack": ("fluentbit-http-ini", [("json_lines", "msgpack")]),
                     "yaml-json": ("fluentbit-http-yaml", [("format: json_lines\n",
                                                            "format: json\n")])}


@pytest.mark.parametrize("variant", sorted(HTTP_BIT_VARIANTS))
def test_fluent_bit_http_block(site: Site, peers_cache: Path, tmp_path: Path, variant: str) -> None:
    """The doc's http [OUTPUT] (INI json_lines + gzip, YAML json, INI msgpack): every
    record lands once with its event time. Fluent Bit's JSON encoder rewrites bytes that
    are not UTF-8 before sending (the doc says so): `\xc0\xaf\xff` leaves as `/`;
    with `Format msgpack` they arrive unchanged and are kept."""
    expected, raw, peer = deliver_fluent_bit_block(site, peers_cache, tmp_path,
                                                   *HTTP_BIT_VARIANTS[variant], prefix="fbh")

    def without_bad_bytes(sent: dict[str, Any]) -> dict[str, Any]:
        return {**sent, "uri": f"/x{sent['id']}/"} if sent["id"] in raw else sent

    if variant.endswith("msgpack"):  # bytes sent unchanged, the event time in the event
        check_landed(site.root, expected, fields=invalid_utf8_fields(raw))
        assert_bytes_recoverable(site.root, raw)
    else:
        check_landed(site.root, expected, fields=without_bad_bytes)
        for _, record in stored_now(site.root):
            assert record["timestamp"].startswith(
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["time"])))
    assert peer.matching(FLUENT_BIT_TROUBLE) == []


# ---- kill -9 of mwdlogd while a forwarder sends -------------------------------------

KILL_RECORDS, KILL_STEPS = 12000, 120  # 100 lines a step, a step every 0.1 s: 12 s


class Writer:
    """Appends an Engine's lines to a tailed file a step at a time, as nginx would."""

    def __init__(self, path: Path, data: bytes, steps: int = KILL_STEPS) -> None:
        lines = data.splitlines(keepends=True)
        step = len(lines) // steps
        self._steps = [b"".join(lines[i:i + step]) for i in range(0, len(lines), step)]
        self._path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        path.write_bytes(b"")
        self.started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        with self._path.open("ab") as file:
            for chunk in self._steps:
                file.write(chunk)
                file.flush()
                if self._stop.wait(0.1):  # the pace of the log, not a wait for state
                    return

    @property
    def writing(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ids_stored(root: Path) -> int:
    return len({record["id"] for _, record in stored_now(root)})


def wait_more_stored(root: Path, than: int) -> int:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while (count := ids_stored(root)) <= than:
        assert time.monotonic() < deadline, f"no progress past {than} records"
        time.sleep(0.1)  # polling files another process writes, with a deadline
    return count


KILL_CASES = {
    "fluentd-forward": ("fluentd-forward", r"\[warn\].*(failed to flush|SSL_read|retry)"),
    "fluentd-http": ("fluentd-http", r"\[warn\].*(failed to flush|retry)"),
    "fluent-bit-forward": ("fluentbit-forward-ini", r"\[ *(warn|error)\]"),
    "fluent-bit-http": ("fluentbit-http-ini", r"\[ *(warn|error)\]"),
}


def start_engine(case: str, site: Site, peers_cache: Path, work: Path, *,
                 edits: tuple[tuple[str, str], ...] = (), port: int | None = None) -> Peer:
    """One KILL_CASES forwarder tailing `work/engine.log` (empty at first) with its doc
    block (`edits` applied, sent to `port` when given), retrying within a second or two."""
    block = site.fill(doc_block(KILL_CASES[case][0]), work, port)
    for old, new in edits:
        block = edit(block, old, new)
    if case.startswith("fluentd"):
        block = edit(block, "retry_max_interval 30s", "retry_max_interval 1s")
        config = f"<system>\n  root_dir {work}/fluent-root\n</system>\n" + f"""<source>
  @type tail
  @id in_engine
  path {work}/engine.log
  pos_file {work}/engine.log.pos
  read_from_head true
  tag nginx.access
  <parse>
    @type json
  </parse>
</source>
""" + block
        (work / "engine.log").write_bytes(b"")
        return start_fluentd(peers_cache, config, work)
    config = fluent_bit_config(work, {"engine": b""}, block, yaml=False)
    return start_fluent_bit(peers_cache, config, work)


@pytest.mark.parametrize("case", sorted(KILL_CASES))
def test_kill_9_mid_stream(site: Site, peers_cache: Path, tmp_path: Path, case: str) -> None:
    """Twice while the forwarder sends, mwdlogd is `kill -9`ed (the forwarder sees it:
    a retry line) and started again: every record lands once, on both protocols.
    (test_forwarder_faults.py makes the kill land between the fsync and the answer.)"""
    retry_line = KILL_CASES[case][1]
    data, expected = json_lines(case.replace("-", ""), KILL_RECORDS)
    peer = start_engine(case, site, peers_cache, tmp_path)
    writer = Writer(tmp_path / "engine.log", data)
    try:
        stored = 0
        for _ in range(2):
            stored = wait_more_stored(site.root, stored)
            seen = len(peer.matching(retry_line))
            assert writer.writing, "the kill must come while the Engine still logs"
            print(f"kill at {time.monotonic() - writer.started:.1f} s, {stored} stored")
            site.kill()
            peer.wait_for_more(retry_line, seen)
            site.start()
        writer.join()
        wait_stored(site.root, set(expected), peer=peer)
    finally:
        writer.stop()
        peer.stop()
    site.stop()
    check_landed(site.root, expected)


BIG_CHUNK_RECORDS = 120_000
BIG_CHUNK_VARIANTS = {
    "ndjson": [],
    "json_array": [("  content_type application/x-ndjson\n",
                    "  content_type application/json\n  json_array true\n")],
    "msgpack": [("  content_type application/x-ndjson\n",
                 "  content_type application/msgpack\n"),
                ("    @type json\n  </format>", "    @type msgpack\n  </format>")],
}


@pytest.mark.parametrize("variant", sorted(BIG_CHUNK_VARIANTS))
def test_fluentd_out_http_chunk_over_the_body_limit(site: Site, peers_cache: Path,
                                                    tmp_path: Path, variant: str) -> None:
    """Fluentd's file buffer makes chunks up to 256m: one chunk of 120,000 records (over
    http.body_size_limit as ndjson, a JSON array and msgpack) is streamed, answered 200
    and every record lands once."""
    block = site.fill(doc_block("fluentd-http"), tmp_path)
    for old, new in [("    flush_interval 1s\n    chunk_limit_size 8m\n",
                      f"    flush_interval 60s\n    chunk_limit_size 64m\n"
                      f"    chunk_limit_records {BIG_CHUNK_RECORDS}\n"
                      f"    chunk_full_threshold 1.0\n"),  # sent once all are in
                     *BIG_CHUNK_VARIANTS[variant]]:
        block = edit(block, old, new)
    data, expected = json_lines("fbig", BIG_CHUNK_RECORDS)
    assert len(data) > 12 * 1024 * 1024
    fluentd = start_fluentd(peers_cache, fluentd_sources(tmp_path, {"oj": data}) + block,
                            tmp_path)
    try:
        wait_stored(site.root, set(expected), peer=fluentd)
        requests = fluentd_requests(site)
    finally:
        fluentd.stop()
    site.stop()
    check_landed(site.root, expected)
    assert fluentd.matching(r"\[(error|warn)\]") == []  # no 413, no retry, no backup
    assert requests == 1, "the records came in more than one request: no chunk was large"


def fluentd_requests(site: Site) -> float:
    """HTTP requests the server answered 200."""
    assert site.server is not None
    address = site.server.addresses["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return sum(float(line.rsplit(" ", 1)[1]) for line in reply.read().decode().splitlines()
                   if line.startswith("mwdlogd_http_requests_total") and 'status="200"' in line)
