#!/usr/bin/env bash
# Builds the base image localhost/mwdlogd-base:bookworm without any image registry:
# mmdebstrap makes a minimal Debian bookworm root file system (python3 + venv, tini as
# init, procps for `kill`, CA certificates) from the Debian mirror, `podman import`
# turns it into an image. The Containerfile starts FROM this image.
#
#   bash deploy/container/build-base-image.sh          # skips if the image exists
#   bash deploy/container/build-base-image.sh --force  # rebuilds it
#
# Needs root, podman, runc and mmdebstrap (apt-get install podman runc mmdebstrap).
# Extra CA certificates of the host (/usr/local/share/ca-certificates/*.crt, e.g. of an
# egress proxy) are copied in so pip can reach PyPI from inside the image build.
# MWDLOGD_DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
set -euo pipefail

IMAGE="${MWDLOGD_BASE_IMAGE:-localhost/mwdlogd-base:bookworm}"
MIRROR="${MWDLOGD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${MWDLOGD_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
PACKAGES="python3,python3-venv,ca-certificates,tini,procps,passwd"
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

if [ "${1:-}" != "--force" ] && podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists (--force rebuilds it)"
  exit 0
fi
for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install podman runc mmdebstrap)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
hooks=(--customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED')
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  echo "adding the host's extra CA certificates: $(cd /usr/local/share/ca-certificates && echo *.crt)"
  hooks+=(--customize-hook='mkdir -p "$1"/usr/local/share/ca-certificates'
          --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1"/usr/local/share/ca-certificates/'
          --customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null 2>&1')
fi
# Documentation, man pages, translations and apt lists are not needed to run a server.
trim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
      --dpkgopt='path-exclude=/usr/share/info/*'
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')

echo "building $IMAGE from $MIRROR (bookworm: $PACKAGES)"
start=$SECONDS
mmdebstrap --quiet --variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --include="$PACKAGES" "${trim[@]}" "${hooks[@]}" \
  bookworm "$work/rootfs.tar" \
  "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY bookworm-security main" </dev/null
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$work/rootfs.tar" "$IMAGE" >/dev/null
echo "built $IMAGE in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
