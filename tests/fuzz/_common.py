"""Shared plumbing for the fuzz targets: a byte-stream reader and the atheris entry point."""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable


class Bytes:
    """Consumes fuzzer bytes as typed fields; past the end every field reads as zero.

    The harnesses decode their structured inputs with this, so a libFuzzer
    mutation of any byte maps onto one field and every input is valid.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


def tmp_root() -> str:
    """Where harnesses put sockets: short paths (108-byte limit). libFuzzer exits
    without running cleanups, so the smoke test points this at a dir it removes."""
    return os.environ.get("XVF_FUZZ_TMPDIR", "/tmp")


def run_atheris(one_input: Callable[[bytes], None]) -> None:
    """`python -m tests.fuzz.fuzz_x [libFuzzer flags] [corpus dirs]` from the repo root."""
    import atheris  # only the command line needs it; the unit tests run without

    # Coverage feedback for the pure-Python code already imported (xvf.*); the
    # Cython modules are compiled and stay opaque to atheris. Instrumenting
    # takes ~10 s, so the unit test's smoke run turns it off.
    if os.environ.get("XVF_FUZZ_INSTRUMENT", "1") != "0":
        atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
