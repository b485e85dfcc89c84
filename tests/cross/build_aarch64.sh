#!/usr/bin/env bash
# Cross-build xvf's Cython extensions for an aarch64 Dom0 and show what came out.
#
# Needs (Debian 12):  dpkg --add-architecture arm64 && apt-get update &&
#   apt-get install --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
#       libpython3.11-dev:arm64
# plus Cython on the build machine (pip install cython). Output: OUT_DIR (default
# build/aarch64) holds xvf/hotpath/<ext>.cpython-311-aarch64-linux-gnu.so (and
# xvf/platform/sim/<ext>...so); `file` is printed for each.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$HERE/build/aarch64}"
CC="${CROSS_CC:-aarch64-linux-gnu-gcc}"
PYVER="${CROSS_PYVER:-3.11}"
TRIPLET=aarch64-linux-gnu
PYINC="/usr/include/python$PYVER"
PYCONF="/usr/include/$TRIPLET/python$PYVER/pyconfig.h"

command -v "$CC" >/dev/null || { echo "no $CC: apt-get install gcc-aarch64-linux-gnu" >&2; exit 2; }
[ -f "$PYCONF" ] || { echo "no $PYCONF: apt-get install libpython$PYVER-dev:arm64" >&2; exit 2; }
command -v cython >/dev/null || { echo "no cython: pip install cython" >&2; exit 2; }

mkdir -p "$OUT/c" "$OUT/inc"
# Debian's Python.h pulls pyconfig.h in as <aarch64-linux-gnu/python3.11/pyconfig.h>;
# give the cross compiler just that directory, never the host's /usr/include.
ln -sfn "/usr/include/$TRIPLET" "$OUT/inc/$TRIPLET"

cd "$HERE"
# every one is an extension, as in setup.py
for pyx in xvf/hotpath/*.pyx xvf/platform/sim/*.pyx; do
    ext=$(basename "$pyx" .pyx)
    dir=$(dirname "$pyx")
    mkdir -p "$OUT/$dir" "$OUT/c/$dir"
    cython -3 -I "$HERE" \
        -X boundscheck=False -X wraparound=False -X cdivision=True \
        "$pyx" -o "$OUT/c/$dir/$ext.c"
    "$CC" -shared -fPIC -O2 -Wall -Wno-unused-function \
        -I "$HERE/include" -I "$PYINC" -idirafter "$OUT/inc" \
        "$OUT/c/$dir/$ext.c" -o "$OUT/$dir/$ext.cpython-${PYVER/./}-$TRIPLET.so"
done
for so in "$OUT"/xvf/hotpath/*.so "$OUT"/xvf/platform/sim/*.so; do
    file "$so"
done
