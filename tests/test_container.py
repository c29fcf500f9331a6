"""The operations manual's container procedures against the real image, with real podman and
podman-compose 1.0.3: up (healthy), records over TLS from the host (curl with a client
certificate and token; npm @fluent-org/logger over forward) land in the logs volume,
`podman exec NAME kill -USR1 1` flushes, `stop` drains, `kill` then `up` recovers,
`restart`, `down` and `up` keep the volumes, `logs` shows start-up.

The module shares one compose project (unique name, free host ports) and removes its
containers, volumes and network at the end, also on failure. The records sent so far are
kept in `SENT`: after every procedure the logs volume must hold each of them exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mwdlogd.certs import init_certs

from conftest import config_raw
from forward_client import needs_node, node_send
from helpers import TOKEN as HOST_TOKEN
from helpers import client_context, engine_records, free_port, ids_by_file, ndjson, post
from server_process import ServerProcess, write_config

REPO = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = REPO / "deploy" / "container" / "containers.conf"
# One tag per checkout: test runs of different worktrees on one machine keep their own image.
IMAGE = f"localhost/mwdlogd:test-{hashlib.sha1(str(REPO).encode()).hexdigest()[:8]}"
IMAGE_UID = 10001  # the image's mwdlogd user (Containerfile)
TOKEN = "container-test-token-0123456789"
DEADLINE_S = 60.0

SENT: list[str] = []


def containers_conf(directory: Path) -> Path:
    """deploy/container/containers.conf, or a copy with the open-files limit lowered to this
    machine's hard limit when that is lower (podman refuses limits above it)."""
    text = CONTAINERS_CONF.read_text()
    shipped = int(re.search(r'"nofile=(\d+):', text).group(1))  # type: ignore[union-attr]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= shipped:
        return CONTAINERS_CONF
    adjusted = directory / "containers.conf"
    adjusted.write_text(text.replace(f"nofile={shipped}:{shipped}", f"nofile={hard}:{hard}"))
    return adjusted


def podman_unusable() -> str | None:
    """Why podman cannot run containers on this machine, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (tools/test.sh installs it)"
    probe = subprocess.run(["podman", "info"], env={**os.environ,
                           "CONTAINERS_CONF": str(CONTAINERS_CONF)},
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-500:]}"
    return None


class Stack:
    """One compose project: podman-compose and podman commands with its names and ports."""

    def __init__(self, tmp: Path) -> None:
        self.project = f"mwdlogdtest{uuid.uuid4().hex[:8]}"
        self.name = f"{self.project}-server"
        self.ports = {key: free_port() for key in ("https", "forward", "health", "metrics",
                                                   "monitor")}
        self.certs = tmp / "certs"
        init_certs(self.certs, hosts=["localhost", "127.0.0.1"], clients=["engine-01"], days=30)
        for path in [self.certs, *self.certs.iterdir()]:
            os.chown(path, IMAGE_UID, IMAGE_UID)
        # The shipped container config with a test token and no timed flush (nor an hour
        # closing): records reach their files only through SIGUSR1, shutdown or recovery,
        # which is what is tested.
        config = (REPO / "deploy/container/config.toml").read_text()
        for old, new in {'token = "dev-token-CHANGE-ME"': f'token = "{TOKEN}"',
                         'flush_interval = "10s"': 'flush_interval = "1h"',
                         'timekey_wait = "10s"': 'timekey_wait = "1h"'}.items():
            assert old in config, old
            config = config.replace(old, new)
        self.config = tmp / "config.toml"
        self.config.write_text(config)
        self.env = {
            **os.environ, "CONTAINERS_CONF": str(containers_conf(tmp)),
            "LOGSERVER_IMAGE": IMAGE, "LOGSERVER_CONTAINER_NAME": self.name,
            "LOGSERVER_CERTS_DIR": str(self.certs), "LOGSERVER_CONFIG": str(self.config),
            "LOGSERVER_WORKERS": "2", "LOGSERVER_CPUS": "1",
            **{f"LOGSERVER_{key.upper()}_PORT": str(port) for key, port in self.ports.items()},
        }

    def run(self, *argv: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("podman-compose", "-p", self.project, *args)

    def volume(self, which: str) -> Path:
        mountpoint = self.run("podman", "volume", "inspect", "--format", "{{.Mountpoint}}",
                              f"{self.project}_mwdlogd-{which}").stdout.strip()
        return Path(mountpoint)

    def logs(self) -> list[str]:
        result = self.run("podman", "logs", self.name)
        return (result.stdout + result.stderr).splitlines()

    def wait_log(self, pattern: str, *, start: int = 0, count: int = 1,
                 after: str = "") -> list[str]:
        """The first `count` log lines from index `start` (and stamped later than `after`,
        an ISO time) matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            lines = self.logs()
            found = [line for line in lines[start:] if regex.search(line) and line > after]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} log lines matching {pattern!r}; log:\n" +
                                     "\n".join(lines))
            time.sleep(0.2)

    def state(self) -> str:
        return self.run("podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                        self.name).stdout.strip()

    def wait_exited(self) -> int:
        """The exit code once podman has finished with the container ("stopped" first)."""
        deadline = time.monotonic() + DEADLINE_S
        while not (state := self.state()).startswith("exited"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        return int(state.split()[1])

    def wait_healthy(self) -> None:
        """Runs the image's health check as podman's timer would (no systemd on these
        machines: podman 4.3 schedules health checks with systemd timers)."""
        deadline = time.monotonic() + DEADLINE_S
        while self.run("podman", "healthcheck", "run", self.name, check=False).returncode:
            if time.monotonic() > deadline:
                raise AssertionError("never healthy; log:\n" + "\n".join(self.logs()))
            time.sleep(0.5)
        health = self.run("podman", "inspect", "--format", "{{.State.Health.Status}}",
                          self.name).stdout.strip()
        assert health == "healthy"

    def up(self) -> int:
        """`podman-compose up -d`, healthy; returns the log index where this start began
        (a running server is left as it is)."""
        if self.exists() and self.state().startswith("running"):
            return len(self.logs())
        start = len(self.logs()) if self.exists() else 0
        self.compose("up", "-d")
        self.wait_log(r" listening ", start=start, count=1)
        self.wait_healthy()
        return start

    def exists(self) -> bool:
        return self.run("podman", "container", "exists", self.name, check=False).returncode == 0

    def remove(self) -> None:
        """Everything the project made, whatever state a failed test left it in."""
        self.run("podman-compose", "-p", self.project, "down", "-v", check=False)
        self.run("podman", "rm", "--force", "--time", "0", self.name, check=False)
        for which in ("logs", "buffer"):
            self.run("podman", "volume", "rm", "--force", f"{self.project}_mwdlogd-{which}",
                     check=False)
        self.run("podman", "network", "rm", "--force", f"{self.project}_default", check=False)

    def curl(self, ids: list[str], *, token: str = TOKEN) -> None:
        """POST ids as Engine records over HTTPS with a client certificate and a token."""
        records = [{"id": i, "customer_name": "acme", "fqdn": "www.acme.test",
                    "log_type": "nginx", "status": 200} for i in ids]
        result = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "--cacert", str(self.certs / "ca.crt"),
             "--cert", str(self.certs / "engine-01.crt"), "--key",
             str(self.certs / "engine-01.key"), "-H", f"Authorization: Bearer {token}",
             "-H", "Content-Type: application/x-ndjson", "--data-binary", "@-",
             f"https://localhost:{self.ports['https']}/nginx.access"],
            input=ndjson(records).decode(), capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == f'{{"records": {len(ids)}}}', result
        SENT.extend(ids)

    def forward(self, start: int, count: int) -> None:
        """Send with the npm Fluentd client over TLS forward, acked (ids node-N)."""
        result = node_send({"host": "127.0.0.1", "port": self.ports["forward"],
                            "tag": "nginx.access", "mode": "PackedForward", "ack": True,
                            "start": start, "count": count, "ca": str(self.certs / "ca.crt"),
                            "cert": str(self.certs / "engine-01.crt"),
                            "key": str(self.certs / "engine-01.key")})
        assert result.returncode == 0, result.stderr
        SENT.extend(f"node-{n}" for n in range(start, start + count))

    def stored(self) -> Counter[str]:
        """How often each id is stored in the logs volume."""
        return Counter(i for ids in ids_by_file(self.volume("logs")).values() for i in ids)

    def flush(self) -> None:
        """The manual's flush: SIGUSR1 to PID 1 (tini), passed on to mwdlogd run."""
        start = len(self.logs())
        workers = int(self.env["LOGSERVER_WORKERS"])
        self.run("podman", "exec", self.name, "kill", "-USR1", "1")
        self.wait_log(r"flush_done", start=start, count=workers)


def assert_all_sent_stored_once(stack: Stack) -> None:
    stored = stack.stored()
    assert set(stored) == set(SENT), (f"missing {sorted(set(SENT) - set(stored))}, "
                                      f"unexpected {sorted(set(stored) - set(SENT))}")
    assert [i for i, n in stored.items() if n > 1] == []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = podman_unusable()
    if reason:
        print(f"container tests skipped: {reason}")
        pytest.skip(reason)
    stack = Stack(tmp_path_factory.mktemp("container"))
    build = stack.run("bash", str(REPO / "deploy/container/build-base-image.sh"), timeout=600)
    print(build.stdout)
    stack.run("podman", "build", "--pull=never", "--format", "docker", "-t", IMAGE, ".",
              timeout=600)
    try:
        yield stack
    finally:
        stack.remove()


def test_up_is_healthy_and_logs_show_startup(stack: Stack) -> None:
    stack.up()
    shown = stack.compose("logs")  # the server logs to stderr; podman keeps the stream
    logs = shown.stdout + shown.stderr
    assert re.search(r" starting version=\S+ config=/etc/mwdlogd/config\.toml ", logs), logs
    assert re.search(r"recovered files_checked=0 .*records_replayed=0", logs), logs
    assert re.search(r" listening http=0\.0\.0\.0:8888 forward=0\.0\.0\.0:24224 "
                     r"health=0\.0\.0\.0:8889 ", logs), logs
    assert re.search(r"worker_started index=1 ", logs), logs
    # The published health port answers the host's `mwdlogd health` too.
    assert stack.run(sys.executable, "-m", "mwdlogd", "health", "--server",
                     f"127.0.0.1:{stack.ports['health']}").returncode == 0
    top = stack.run("podman", "exec", stack.name, "ps", "-o", "pid=,user=,args=", "-p", "1")
    assert top.stdout.split()[:3] == ["1", "mwdlogd", "/usr/bin/tini"], top.stdout


@needs_node
def test_records_over_https_and_forward_land_in_the_volume_on_usr1(stack: Stack) -> None:
    stack.up()
    stack.curl([f"https-{n}" for n in range(50)])
    stack.forward(0, 40)
    assert stack.stored() == Counter()  # acked, journalled, not yet in files (flush 1h)
    stack.flush()
    assert_all_sent_stored_once(stack)
    gz = stack.run("podman", "exec", stack.name, "sh", "-c",
                   "zcat /var/lib/mwdlogd/logs/acme/nginx/www.acme.test/*/*/*/*.log.gz")
    assert sorted(json.loads(line)["id"] for line in gz.stdout.splitlines()) == sorted(SENT), \
        (gz.stdout[-2000:], gz.stderr)


def test_mwdlogd_flush_inside_the_container(stack: Stack) -> None:
    """`mwdlogd flush` (monitor port, every worker) waits for the flush and counts it."""
    stack.up()
    stack.curl([f"flush-{n}" for n in range(10)])
    done = json.loads(stack.run("podman", "exec", stack.name, "mwdlogd", "flush").stdout)
    assert done["records"] == 10 and done["workers"] == 2 and done["failed_files"] == 0, done
    assert_all_sent_stored_once(stack)


def test_sighup_reloads_the_mounted_config(stack: Stack) -> None:
    """The manual's reload: edit the mounted config.toml in place, `kill -HUP 1`: a new
    token works without a restart."""
    stack.up()
    start = len(stack.logs())
    text = stack.config.read_text()
    new_token = '{ name = "engine-02", token = "engine-02-token-0123456789", customers = [] }'
    stack.config.write_text(text.replace("customers = [] }", f"customers = [] }}, {new_token}"))
    try:
        stack.run("podman", "exec", stack.name, "kill", "-HUP", "1")
        stack.wait_log(r"reloaded changed=auth\.tokens", start=start, count=2)
        stack.curl(["reload-0"], token="engine-02-token-0123456789")
    finally:
        stack.config.write_text(text)  # the same inode: the bind mount sees the edit
    stack.flush()
    assert_all_sent_stored_once(stack)


def test_stop_drains_every_acked_record(stack: Stack) -> None:
    stack.up()
    stack.curl([f"stop-{n}" for n in range(30)])
    start = len(stack.logs())
    stack.compose("stop")
    assert stack.wait_exited() == 0
    stack.wait_log(r"shutdown_complete", start=start, count=2)
    assert_all_sent_stored_once(stack)
    begin = stack.up()  # the journal was empty: nothing to replay
    replayed = stack.wait_log(r"recovered ", start=begin, count=2)
    assert all(" batches_replayed=0 " in line for line in replayed), replayed


def test_kill_then_up_recovers_without_loss_or_doubles(stack: Stack) -> None:
    stack.up()
    stack.curl([f"kill-{n}" for n in range(30)])
    stack.run("podman", "kill", stack.name)  # SIGKILL: no drain at all
    assert stack.wait_exited() == 137
    begin = stack.up()
    recovered = stack.wait_log(r"recovered ", start=begin, count=2)
    assert sum(int(re.search(r"records_replayed=(\d+)", line).group(1))  # type: ignore[union-attr]
               for line in recovered) == 30, recovered
    stack.flush()
    assert_all_sent_stored_once(stack)


def test_a_crashed_server_is_restarted_by_podman(stack: Stack) -> None:
    """restart: unless-stopped: `mwdlogd run` (tini's child) dies by SIGKILL, podman starts
    the container again, and nothing acked is lost or doubled."""
    stack.up()
    stack.curl([f"crash-{n}" for n in range(20)])
    killed_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    restarts = int(stack.run("podman", "inspect", "--format", "{{.RestartCount}}",
                             stack.name).stdout)
    tini = stack.run("podman", "inspect", "--format", "{{.State.Pid}}", stack.name).stdout
    children = Path(f"/proc/{tini.strip()}/task/{tini.strip()}/children").read_text().split()
    assert len(children) == 1, children  # tini runs exactly `mwdlogd run`
    os.kill(int(children[0]), signal.SIGKILL)
    stack.wait_log(r" listening ", after=killed_at)
    stack.wait_healthy()
    assert int(stack.run("podman", "inspect", "--format", "{{.RestartCount}}",
                         stack.name).stdout) == restarts + 1
    stack.flush()
    assert_all_sent_stored_once(stack)


def test_restart(stack: Stack) -> None:
    stack.up()
    stack.curl([f"restart-{n}" for n in range(20)])
    start = len(stack.logs())
    stack.compose("restart")
    stack.wait_log(r"shutdown_complete", start=start, count=2)
    stack.wait_log(r" listening ", start=start)
    stack.wait_healthy()
    stack.curl([f"after-restart-{n}" for n in range(20)])
    stack.flush()
    assert_all_sent_stored_once(stack)


def test_down_and_up_keep_the_volumes(stack: Stack) -> None:
    stack.up()
    stack.curl([f"down-{n}" for n in range(20)])
    stack.compose("down")
    assert not stack.exists()
    stack.up()  # a new container on the same named volumes
    stack.curl([f"after-down-{n}" for n in range(20)])
    stack.flush()
    assert_all_sent_stored_once(stack)
    assert len(SENT) == len(set(SENT))


def test_bad_settings_are_named_in_the_log(stack: Stack, tmp_path: Path) -> None:
    """A start that cannot work says why in `podman logs` and exits 2, naming the key."""
    def run(*options: str) -> str:
        result = stack.run("podman", "run", "--rm", "--pull=never", *options, IMAGE,
                           check=False, timeout=120)
        assert result.returncode == 2, result
        return result.stderr

    assert "mwdlogd: http.port: expected an integer, got 'x'" in run(
        "-v", f"{stack.certs}:/etc/mwdlogd/certs:ro", "-e", "MWDLOGD_HTTP_PORT=x")
    empty = tmp_path / "no-certs"
    empty.mkdir()
    assert "mwdlogd: tls.cert: no TLS files in /etc/mwdlogd/certs, and development " \
        "certificates cannot be made there: Read-only file system" in run(
            "-v", f"{empty}:/etc/mwdlogd/certs:ro")


async def test_usr1_flushes_although_the_server_inherited_it_blocked(
        tmp_path: Path, pki: Path) -> None:
    """podman's restart policy starts containers with SIGUSR1 blocked (seen with podman 4.3:
    SigBlk 0x200 in /proc/PID/status); `mwdlogd run` must still flush on it. No podman here:
    the server is started with the signal blocked, as the restarted container starts it."""
    raw = config_raw(tmp_path, pki, buffer={"flush_interval": "1h", "timekey_wait": "1h"})
    config = write_config(tmp_path / "config.toml", raw)
    blocked_exec = ("import os, signal, sys; "
                    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    server = await trio.to_thread.run_sync(lambda: ServerProcess(None, argv=[
        sys.executable, "-c", blocked_exec, "-m", "mwdlogd", "run", "--config", str(config)]))
    try:
        records = engine_records(5)
        reply = await post(server.addresses["http"], client_context(pki), "/nginx.access",
                           ndjson(records), token=HOST_TOKEN)
        assert reply.status == 200
        server.signal(signal.SIGUSR1)
        await trio.to_thread.run_sync(server.wait_for, "flush_done")
        assert list(ids_by_file(tmp_path / "logs").values()) == [[r["id"] for r in records]]
    finally:
        server.stop()
