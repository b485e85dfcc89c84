#!/usr/bin/env bash
# Installs what xvf needs on a Debian machine (run as root): the C toolchain,
# the real backends the tests drive, Xen/Linux headers for the ABI conformance
# tests, then xvf itself into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
# qemu-storage-daemon (the vhost-user-blk backend) moved from qemu-system-common
# (Debian 12) to qemu-utils (Debian 13).
. /etc/os-release
if [ "${VERSION_ID%%.*}" -ge 13 ] 2>/dev/null; then qsd_package=qemu-utils; else qsd_package=qemu-system-common; fi
apt_packages=(
    gcc libc6-dev python3-dev python3-venv  # building the Cython extensions
    "$qsd_package"                          # qemu-storage-daemon
    libxen-dev linux-libc-dev               # Xen and Linux headers checked by the conformance tests
    xenstore-utils                          # xenstore-read/-write/-ls interop with the simulated xenstored
    strace                                  # the hot path's syscalls per access, counted by a test
    # dpdk-testpmd (only dpdk-dev ships it) and its vhost PMD, the virtio-net backend;
    # it pulls all of DPDK's libraries, about 220 packages
    dpdk-dev
)
scripts/apt-install-missing.sh "${apt_packages[@]}"

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Editable: the compiled extensions land in ./xvf, so tests and `python -m tests.backends.*` see one tree.
# bench: the smoke test of benchmarks/run.py checks the PNG plot too.
.venv/bin/pip install -q -e ".[test,fuzz,bench]" "$@"
