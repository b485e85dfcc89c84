"""The atheris fuzz targets in tests/fuzz/: their one-input functions over a fixed
corpus (always), and a short libFuzzer run of each (when atheris is installed).

A target's `one_input` raises AssertionError when its oracle sees a violation,
so the corpus run is a regression test of the targets themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# target -> libFuzzer runs in the smoke test (the grant relay target is ~100x slower)
TARGETS = {
    "fuzz_ioreq": 2000,
    "fuzz_registers": 2000,
    "fuzz_vhost_reply": 2000,
    "fuzz_xenstore": 1000,
    "fuzz_grant_descriptors": 200,
}


def corpus(name: str) -> list[bytes]:
    """Edge cases plus a seeded pseudo-random set; the same inputs every run."""
    rng = random.Random(name)
    inputs = [b"", b"\0", b"\xff" * 64, bytes(range(256)), b"\x01" * 300]
    inputs += [rng.randbytes(rng.randrange(1, 400)) for _ in range(40)]
    if name == "fuzz_ioreq":
        # a READY read and a READY write of the window, tiled over the page
        slot_r = struct.pack("<QQIIIHBB", 0x2000070, 0, 1, 4, 0, 0, 0x21, 1)
        slot_w = struct.pack("<QQIIIHBB", 0x2000050, 1, 1, 4, 0, 0, 0x01, 1)
        inputs += [b"\0" + slot_r, b"\0" + slot_w + slot_r, b"\x02\x00\xff" + slot_r]
    if name == "fuzz_vhost_reply":
        reply = struct.pack("<IIIQ", 1, 5, 8, 1 << 32)
        inputs += [bytes(8) + reply, b"\x03" + bytes(7) + reply * 3]
    if name == "fuzz_xenstore":
        inputs += [b"\x02virtio,device22\xffmmio\xff0x2000000\xff33\xff1"]
    return inputs


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_one_input_over_the_corpus(name):
    mod = importlib.import_module(f"tests.fuzz.{name}")
    try:
        for data in corpus(name):
            mod.one_input(data)
    finally:
        for attr in ("_harness", "_daemon", "_client"):
            h = getattr(mod, attr, None)
            if h is not None:
                h.close()
                setattr(mod, attr, None)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris): libFuzzer runs skipped",
)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_libfuzzer_smoke_run(name, tmp_path):
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for i, data in enumerate(corpus(name)):  # mutated from these, not from nothing
        (seeds / f"seed{i}").write_bytes(data)
    # libFuzzer exits without cleanups: the harnesses' sockets go where we remove them
    sock_dir = tempfile.mkdtemp(prefix="xvf-fzs-", dir="/tmp")
    env = dict(os.environ, XVF_FUZZ_INSTRUMENT="0", PYTHONPATH=REPO, XVF_FUZZ_TMPDIR=sock_dir)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"tests.fuzz.{name}", f"-runs={TARGETS[name]}",
             f"-artifact_prefix={tmp_path}/", "-max_len=4200", "-seed=1", str(seeds)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert f"Done {TARGETS[name]} runs" in proc.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail
