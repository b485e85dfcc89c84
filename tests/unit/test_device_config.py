"""Config space xvf answers itself for backends without CONFIG (virtio-fs tag)."""

from __future__ import annotations

import struct

import pytest

from xvf.app.argparser import build_parser
from xvf.app.config import load_config
from xvf.device.config_space import ConfigCache, fs_tag_bytes, local_config
from xvf.device.types import BY_NAME
from xvf.errors import ConfigError

FS = BY_NAME["fs"]


def test_fs_config_is_tag_then_request_queue_count():
    space = local_config(FS, {"fs_tag": "share0"})
    assert space is not None and len(space) == FS.config_size == 40
    assert space[:36] == b"share0".ljust(36, b"\0")
    assert struct.unpack_from("<I", space, 36) == (1,)  # hiprio + one request queue
    assert space[40:] == b""


def test_fs_tag_defaults_to_xvf():
    assert local_config(FS, {})[:4] == b"xvf\0"  # type: ignore[index]


@pytest.mark.parametrize("tag", ["", "a\0b", "x" * 37, "é" * 19])
def test_tags_linux_would_refuse_or_truncate_are_rejected(tag):
    with pytest.raises(ConfigError, match="fs tag"):
        fs_tag_bytes(tag)


def test_a_36_byte_tag_fills_the_field_without_nul():
    assert local_config(FS, {"fs_tag": "t" * 36})[:36] == b"t" * 36  # type: ignore[index]


def test_other_devices_get_nothing_local():
    assert local_config(BY_NAME["blk"], {"fs_tag": "x"}) is None


def _config(dev_type, supported: bool, tag: str = "xvf") -> ConfigCache:
    """The cache config reads answer, as a connection fills it."""
    cache = ConfigCache("dom1/test0", dev_type, tag)
    cache.connect(bytes(range(dev_type.config_size)) if supported else None)
    return cache


def test_config_read_answers_the_local_tag_when_the_backend_lacks_config():
    fs = _config(FS, supported=False, tag="docs")
    assert fs.read(0, 4) == int.from_bytes(b"docs", "little")
    assert fs.read(36, 4) == 1
    assert fs.read(40, 4) == 0  # beyond the space
    blk = _config(BY_NAME["blk"], supported=False)
    assert blk.read(0, 8) == 0


def test_fs_tag_option_and_config_key(tmp_path):
    assert build_parser().parse_args(["--socket-path", "/x"]).fs_tag == "xvf"
    assert build_parser().parse_args(["--fs-tag", "data", "--socket-path", "/x"]).fs_tag == "data"
    cfg = tmp_path / "xvf.toml"
    cfg.write_text('fs_tag = "share"\n')
    assert load_config(str(cfg)) == {"fs_tag": "share"}
    cfg.write_text("fs_tag = 3\n")
    with pytest.raises(ConfigError, match="fs_tag"):
        load_config(str(cfg))


def test_config_read_answers_the_backends_space_when_it_has_one():
    blk = _config(BY_NAME["blk"], supported=True)
    assert blk.read(0, 4) == int.from_bytes(bytes(range(4)), "little")
    assert blk.read(8, 2) == int.from_bytes(bytes([8, 9]), "little")


def test_config_writes_forward_only_writable_fields_and_keep_the_latest_refresh(caplog):
    blk = _config(BY_NAME["blk"], supported=True)
    before = blk.cache
    assert blk.write(0, 8, 1 << 40, connected=True) is None  # capacity: read-only
    assert blk.write(0, 8, 1 << 40, connected=True) is None
    assert blk.cache == before and blk.ignored_writes == 2
    assert caplog.text.count("read-only config offset") == 1  # said once, then counted
    assert blk.write(32, 1, 1, connected=False) is None  # no backend: nowhere to go
    first = blk.write(32, 1, 1, connected=True)  # writeback (writable)
    second = blk.write(32, 1, 0, connected=True)
    assert first == (b"\x01", 1) and second == (b"\x00", 2)
    assert blk.read(32, 1) == 0  # the guest reads back what it wrote last, at once
    blk.refreshed(1, bytes([7]) * 60)  # the first write's refresh came late: dropped
    assert blk.read(32, 1) == 0
    blk.refreshed(2, bytes([9]) * 60)
    assert blk.read(32, 1) == 9


def test_config_writes_go_nowhere_without_the_config_feature():
    fs = _config(FS, supported=False)
    assert fs.write(0, 4, 0, connected=True) is None or not FS.config_writable(0, 4)
    assert fs.read(0, 4) == int.from_bytes(b"xvf\0", "little")
