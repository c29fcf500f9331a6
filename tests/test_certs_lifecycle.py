"""`mwdlogd certs check|renew|init|show` as the runbook uses them, on real files."""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from mwdlogd.certs import init_certs, server_names
from mwdlogd.cli import main

from helpers import reissue


def mwdlogd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mwdlogd", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={**os.environ})


def fresh(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_certs(directory, hosts=["logs.example.com", "10.1.2.3"], clients=["engine-01"],
               days=400)
    return directory


def lines_by_role(stdout: str) -> dict[str, str]:
    return {line.split()[1]: line for line in stdout.splitlines()}


def test_check_passes_with_enough_days_and_fails_under_the_threshold(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    good = mwdlogd("certs", "check", "--dir", str(certs))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines() == [
        f"ok      tls.cert {certs / 'server.crt'}: 399 days left",
        f"ok      tls.ca   {certs / 'ca.crt'}: 399 days left",
        f"ok      client   {certs / 'engine-01.crt'}: 399 days left"]
    reissue(certs, "engine-01", days=30.5)
    reissue(certs, "server", days=-3, hosts=["logs.example.com"])
    bad = mwdlogd("certs", "check", "--dir", str(certs))
    assert bad.returncode == 1
    roles = lines_by_role(bad.stdout)
    assert roles["tls.cert"].startswith(f"EXPIRED tls.cert {certs / 'server.crt'}: expired ")
    assert "run `mwdlogd certs renew`" in roles["tls.cert"]
    assert roles["client"] == (f"RENEW   client   {certs / 'engine-01.crt'}: 30 days left, "
                               "under 90 — run `mwdlogd certs renew --client engine-01` and "
                               "install it on that Engine")
    assert roles["tls.ca"].startswith("ok")
    assert mwdlogd("certs", "check", "--dir", str(certs), "--days-left", "400").returncode == 1


def test_check_reads_the_configured_paths_and_names_a_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "mwdlogd.toml"
    assert mwdlogd("init-config", "-o", str(config)).returncode == 0
    missing = mwdlogd("--config", str(config), "certs", "check")
    assert missing.returncode == 1
    assert (f"MISSING tls.cert {tmp_path / 'etc' / 'certs' / 'server.crt'}: file not found — "
            "create it with `mwdlogd certs init`") in missing.stdout
    assert mwdlogd("--config", str(config), "certs", "init", "--client", "e1").returncode == 0
    found = mwdlogd("certs", "check", "--config", str(config))  # after the action too
    assert found.returncode == 0 and found.stdout.count("824 days left") == 3


def test_renew_keeps_the_names_and_the_ca(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    ca_before = (certs / "ca.crt").read_bytes()
    reissue(certs, "server", days=10, hosts=["logs.example.com", "logs2.example.com"])
    result = mwdlogd("certs", "renew", "--dir", str(certs), "--days", "200")
    assert result.returncode == 0, result.stderr
    assert (f"renewed {certs / 'server.crt'} for logs.example.com,logs2.example.com "
            "(kept from the previous certificate)") in result.stdout
    assert server_names(certs / "server.crt") == ["logs.example.com", "logs2.example.com"]
    assert (certs / "ca.crt").read_bytes() == ca_before
    assert mwdlogd("certs", "check", "--dir", str(certs)).returncode == 0
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.load_cert_chain(str(certs / "server.crt"), str(certs / "server.key"))  # key matches
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate(ca_before)
    cert.verify_directly_issued_by(ca)
    renamed = mwdlogd("certs", "renew", "--dir", str(certs), "--hosts", "new.example.com")
    assert "for new.example.com (from --hosts)" in renamed.stdout
    assert server_names(certs / "server.crt") == ["new.example.com"]


def test_renew_a_client_only(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    server_before = (certs / "server.crt").read_bytes()
    reissue(certs, "engine-01", days=5)
    result = mwdlogd("certs", "renew", "--dir", str(certs), "--client", "engine-01")
    assert result.returncode == 0, result.stderr
    assert f"renewed {certs / 'engine-01.crt'}" in result.stdout
    assert (certs / "server.crt").read_bytes() == server_before
    assert mwdlogd("certs", "check", "--dir", str(certs)).returncode == 0


def test_renew_without_a_ca_says_so(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    (certs / "ca.key").unlink()
    result = mwdlogd("certs", "renew", "--dir", str(certs))
    assert result.returncode == 1
    assert f"CA file not found: {certs / 'ca.key'}" in result.stderr


def test_init_with_other_hosts_on_an_existing_directory_says_what_it_kept(
        tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    before = (certs / "server.crt").read_bytes()
    result = mwdlogd("certs", "init", "--dir", str(certs), "--hosts", "other.example.com")
    assert result.returncode == 0
    assert (certs / "server.crt").read_bytes() == before
    assert ("note: kept the existing server certificate for logs.example.com,10.1.2.3; --hosts "
            "other.example.com was not applied. To change its names: mwdlogd certs renew "
            "--hosts other.example.com") in result.stdout
    same = mwdlogd("certs", "init", "--dir", str(certs), "--hosts", "logs.example.com,10.1.2.3")
    assert "note:" not in same.stdout


def test_show_exits_non_zero_for_an_expired_certificate(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    assert mwdlogd("certs", "show", "--dir", str(certs)).returncode == 0
    reissue(certs, "engine-01", days=-1)
    shown = mwdlogd("certs", "show", "--dir", str(certs))
    assert shown.returncode == 1
    assert "engine-01.crt: subject CN=engine-01" in shown.stdout and "EXPIRED" in shown.stdout


def test_days_must_be_positive(tmp_path: Path) -> None:
    for days in ("0", "-5", "ten"):
        result = mwdlogd("certs", "init", "--dir", str(tmp_path / "c"), "--days", days)
        assert result.returncode == 2 and "argument --days:" in result.stderr
    assert not (tmp_path / "c").exists()


@pytest.fixture
def own_logging() -> Iterator[None]:
    """cli.main() points mwdlogd's logger at this test's stderr; later tests get it back."""
    logger = logging.getLogger("mwdlogd")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.mark.usefixtures("own_logging")
def test_a_client_name_cannot_leave_the_directory(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    certs = fresh(tmp_path)
    for bad in ("../evil", "sub/engine", "/tmp/evil", "..", ".hidden", "ca", "server"):
        for action in ("init", "renew"):
            assert main(["certs", action, "--dir", str(certs), "--client", bad]) == 2, bad
            assert f"--client {bad!r}:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "engine-01.crt", "engine-01.key"])


def test_bad_arguments_exit_2_like_argparse_errors(tmp_path: Path) -> None:
    """A usage error exits 2 whichever check finds it; a failing action exits 1."""
    certs = fresh(tmp_path)
    for args in (["renew", "--days", "0"], ["init", "--client", "../x"], ["init", "--hosts", ","],
                 ["renew", "--client", "ca"]):
        result = mwdlogd("certs", *args, "--dir", str(certs))
        assert result.returncode == 2, (args, result.stderr)
    assert "Exit 2 on a bad argument" in " ".join(mwdlogd("certs", "--help").stdout.split())


def test_init_honours_the_config_paths(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "x.toml"
    config.parent.mkdir()
    config.write_text(f'[tls]\ncert = "{tmp_path}/pki/mwd.pem"\nkey = "pki/private/mwd.key"\n'
                      'ca = "pki/trust.pem"\n')
    result = mwdlogd("--config", str(config), "certs", "init", "--client", "e1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"created {tmp_path / 'conf' / 'pki' / 'trust.pem'}",
        f"created {tmp_path / 'pki' / 'mwd.pem'}",
        f"created {tmp_path / 'pki' / 'e1.crt'}"]
    assert (tmp_path / "conf" / "pki" / "private" / "mwd.key").is_file()
    assert (tmp_path / "conf" / "pki" / "trust.key").is_file()
    check = mwdlogd("check-config", "--config", str(config))
    assert check.returncode == 0, check.stderr


def test_check_needs_no_ca_without_client_auth(tmp_path: Path) -> None:
    certs = fresh(tmp_path)
    (certs / "ca.crt").unlink()
    (certs / "engine-01.crt").unlink()
    config = tmp_path / "c.toml"
    config.write_text("[tls]\nclient_auth = false\n")
    result = mwdlogd("--config", str(config), "certs", "check")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        f"ok      tls.cert {certs / 'server.crt'}: 399 days left"]
    config.write_text("[tls]\nclient_auth = true\n")
    assert mwdlogd("--config", str(config), "certs", "check").returncode == 1
