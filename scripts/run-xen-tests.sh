#!/usr/bin/env bash
# The real-Xen suite: Xen 4.20 arm64 + a Debian 13 Dom0 + Linux DomUs under
# qemu-system-aarch64 (TCG), built from Debian's packages into a cache outside the
# checkout ($XVF_RIG_CACHE, default /var/tmp/xvf-rig), then booted; the tests in
# tests/xen/cases run inside the Dom0 against real Xen.
#
# One input is not in Debian: an arm64 hypervisor built with CONFIG_IOREQ_SERVER=y
# (Debian's is built without it). Give it as XVF_XEN_IMAGE=/path/to/xen or put it at
# $XVF_RIG_CACHE/inputs/xen (tests/xen/README.md says how to make one).
# Exit status: 0 all passed, 3 no hypervisor image, anything else a failure.
#
#   scripts/run-xen-tests.sh [run] [-k EXPR] [--timeout S]   (or: build | shell | status)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
host_packages=(
    qemu-system-arm                      # qemu-system-aarch64: the machine Xen runs on
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross  # the rig's kernel and xvf's aarch64 build
    flex bison bc make libssl-dev libelf-dev     # building Linux
    cpio xz-utils zstd e2fsprogs                 # initramfs, packages, ext4 images without loop devices
    qemu-user-static                             # listing busybox's applets
)
scripts/apt-install-missing.sh "${host_packages[@]}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import Cython" 2>/dev/null || scripts/install-deps.sh
case "${1:-}" in run | build | shell | status) ;; *) set -- run "$@" ;; esac
exec .venv/bin/python -m tests.xen.rig "$@"
