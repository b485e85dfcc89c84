"""The real-Xen rig's guest protocol, checked on the host: the data pattern the guest's
shell writes is the one the Dom0 side recomputes, the console parser reads what /init
prints, and a plan /init would ignore is refused before a guest is made."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.xen.rig.domu import parse_console, pattern, plan_cmdline, sha256, xl_config

LIB = Path(__file__).resolve().parents[1] / "xen" / "domu" / "lib.sh"


@pytest.mark.skipif(shutil.which("awk") is None, reason="no awk on this host")
@pytest.mark.parametrize("seed,nbytes", [("xvf", 4096), ("a-b_C9", 1000), ("s", 65536 + 17)])
def test_shell_pattern_matches_python(seed, nbytes):
    out = subprocess.run(
        ["sh", "-c", f'. "{LIB}" >/dev/null 2>&1; pattern "$0" "$1"', seed, str(nbytes)],
        capture_output=True,
        check=True,
    ).stdout
    assert len(out) == nbytes
    assert out == pattern(seed, nbytes)


def test_console_parser_reads_results_devices_and_done():
    data = pattern("g", 4096)
    text = "\n".join(
        [
            "[    0.5] random kernel line",
            "XVF-GUEST: boot kernel=6.12.117 machine=aarch64 uptime=0.70 checks=blk,i2c",
            "XVF-GUEST: virtio dev=virtio0 id=2 type=blk driver=virtio_blk grant_dma=1",
            f"XVF-GUEST: blk PASS dev=vda match=1 read_sha256={sha256(data)} secs=1.45",
            "XVF-LOG: i2c: no adapter yet",
            "XVF-GUEST: i2c FAIL reason=timeout timeout_s=30 left=1 secs=30.1",
            "XVF-DMESG: [    0.3] virtio_blk virtio0: [vda]",
            "XVF-GUEST: done pass=1 fail=1 secs=33.0\r",
        ]
    )
    report = parse_console(text)
    assert report.boot["checks"] == "blk,i2c"
    assert report.virtio == [
        {"dev": "virtio0", "id": "2", "type": "blk", "driver": "virtio_blk", "grant_dma": "1"}
    ]
    assert report.results["blk"] == (
        True,
        {"dev": "vda", "match": "1", "read_sha256": sha256(data), "secs": "1.45"},
    )
    assert report.results["i2c"][0] is False and report.results["i2c"][1]["reason"] == "timeout"
    assert report.done == {"pass": "1", "fail": "1", "secs": "33.0"}
    assert report.logs == ["i2c: no adapter yet"] and len(report.dmesg) == 1


@pytest.mark.parametrize("key,value", [("blk seed", "x"), ("blk.seed", "a b"), ("Blk", "1")])
def test_a_plan_init_would_ignore_is_refused(key, value):
    with pytest.raises(ValueError, match="would be ignored"):
        plan_cmdline({key: value})


def test_xl_config_holds_the_virtio_line_and_the_plan(tmp_path):
    cfg = xl_config(
        "g1",
        tmp_path / "Image",
        tmp_path / "initramfs.cpio.gz",
        ["type=virtio,device22, transport=mmio, grant_usage=1"],
        plan_cmdline({"checks": "i2c"}),
        memory_mb=384,
    )
    assert 'name = "g1"' in cfg and "memory = 384" in cfg and "maxmem" not in cfg
    assert '    "type=virtio,device22, transport=mmio, grant_usage=1",' in cfg
    assert 'extra = "console=hvc0 xvf.checks=i2c"' in cfg
    with pytest.raises(ValueError):
        xl_config('bad"name', tmp_path, tmp_path, [], "")
