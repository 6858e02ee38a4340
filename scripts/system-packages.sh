#!/usr/bin/env bash
# Installs the Debian packages the tests drive for real (sshd and its client, nss_wrapper for
# test users; podman, buildah, runc, podman-compose and debootstrap to build and run the
# image; Prometheus to run the cost dashboard's queries; headless Chromium and pdftoppm to
# print and draw an invoice; Redis and HAProxy for replicas sharing rate limits behind a load
# balancer) when some are missing and we may (root + apt-get). Never fails the caller: tests
# that need a missing one skip, naming it.
set -uo pipefail
want=(openssh-server openssh-client libnss-wrapper debootstrap podman buildah runc podman-compose
      prometheus chromium poppler-utils redis-server haproxy)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: missing Debian packages ${missing[*]} (need root + apt-get); their tests will skip" >&2
  exit 0
fi
echo ">> installing Debian packages: ${missing[*]}" >&2
{ DEBIAN_FRONTEND=noninteractive apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
  >/dev/null 2>&1 || echo "warning: apt-get could not install ${missing[*]}; their tests will skip" >&2
exit 0
