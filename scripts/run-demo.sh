#!/usr/bin/env bash
# The main job on the built-in software Xen: a guest writes and reads back data
# through xvf to qemu-storage-daemon's vhost-user-blk export.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
dir=$(mktemp -d /tmp/xvf-demo.XXXXXX)
exec .venv/bin/xvf sim --socket-path "$dir" --start-backends --foreign-mapping \
    --virtio 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=disabled" ]' "$@"
