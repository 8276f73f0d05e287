#!/usr/bin/env bash
# Everything kata-ci needs on a fresh Debian 12 machine, as root: Debian packages, a virtualenv
# with kata-ci and its dev tools, and the guest images (kernel ~6 min, rootfs ~2 min the first
# time; reused from ~/.cache/kata-ci afterwards, keyed by a hash of their inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86                                       # QEMU with microvm
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev  # kernel, init.c
  debootstrap e2fsprogs xz-utils                        # guest rootfs
  redis-server                                          # the queue broker (tests start their own)
  nftables                                              # each VM's network policy
  git                                                   # GitLab jobs' sources; git-http-backend in tests
  skopeo zstd                                           # OCI images: pulls, zstd layers (images/oci/)
  docker-registry busybox-static                        # OCI tests: a loopback registry, busybox images
  chromium chromium-driver                              # status page tests (headless)
  systemd-container                                     # ansible test: a booted Debian target
  python3 python3-venv python3-dev ca-certificates
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "kata-ci setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The OCI tests start their own registries on loopback (tests/oci_registry.py); Debian's package
# also enables one on :5000 for every address, which a CI host has no use for.
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry
fi

# Snapshot start needs QEMU >= 9.0 (README, "Fast start"); Debian 12 ships 7.2, its
# bookworm-backports 10.0. Backports have priority 100: only what is named comes from there.
. /etc/os-release
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if [ "${VERSION_CODENAME:-}" = bookworm ] && ! dpkg --compare-versions "$qemu_version" ge 1:9; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat >/etc/apt/sources.list.d/kata-ci-bookworm-backports.sources <<'EOF'
# Added by kata-ci (scripts/setup.sh) for QEMU >= 9.0. Nothing else is taken from here
# unless named: backports have apt priority 100.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  echo "kata-ci setup: installing QEMU from bookworm-backports" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi

# VMs never run as root: QEMU runs as this system user (README, "Security model").
if ! id -u kata-ci >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin kata-ci
fi
getent group kvm >/dev/null && usermod -aG kvm kata-ci

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/kata-ci images build
