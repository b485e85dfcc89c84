#!/usr/bin/env bash
# The main job on the built-in software Xen: a guest writes, flushes and reads
# back data through xvf to qemu-storage-daemon's vhost-user-blk export, first
# with grant mapping (the default) and then with foreign mapping; the data is
# also checked on the backend's disk image. Extra arguments go to `xvf sim`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
dir=$(mktemp -d /tmp/xvf-demo.XXXXXX)
echo "== grant mapping (default)"
.venv/bin/xvf sim --socket-path "$dir/grant" --start-backends "$@"
echo "== foreign mapping"
.venv/bin/xvf sim --socket-path "$dir/foreign" --start-backends --foreign-mapping \
    --virtio 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]' "$@"
