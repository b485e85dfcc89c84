#!/usr/bin/env bash
# apt-install-missing.sh PACKAGE...: install (as root) those of the Debian packages that
# are not installed yet; nothing, not even `apt-get update`, when all are there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
