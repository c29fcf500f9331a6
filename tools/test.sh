#!/usr/bin/env bash
# Installs the test dependencies (Debian: curl, gzip, nodejs/npm, prometheus for promtool
# and a real Prometheus, podman + podman-compose + runc + mmdebstrap for the container
# tests, haproxy, Ruby and its gems for Fluentd and Fluent Bit's libraries for the real
# forwarder tests; then a venv and the npm test peer) and runs lint, types and the
# whole test suite. `.ci/run` calls exactly this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v zcat >/dev/null || need+=(gzip)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v promtool >/dev/null || need+=(prometheus)
# Container tests (tests/test_container.py) and scale-out test (tests/test_haproxy.py).
for tool in podman podman-compose runc mmdebstrap haproxy; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
# Real Engine forwarders (tests/peers/real.py): Fluentd 1.18 runs on Debian's Ruby and gems;
# Fluent Bit 4.2.8 needs these libraries.
for pkg in ruby ruby-msgpack ruby-yajl ruby-oj ruby-cool.io ruby-http-parser.rb ruby-sigdump \
    ruby-tzinfo ruby-strptime ruby-webrick libssl3 libyaml-0-2 libsqlite3-0; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian packages)"
  apt-get -o DPkg::Lock::Timeout=900 update -qq && apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# Real forward-protocol peer for the tests: npm @fluent-org/logger, pinned by the lock file.
npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error

echo "== ruff"; .venv/bin/ruff check src tests tools
echo "== mypy --strict src"; .venv/bin/mypy src
echo "== lint-imports (layers)"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/pytest "$@"
