"""Config space xvf answers itself for backends without CONFIG (virtio-fs tag)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from xvf.app.argparser import build_parser
from xvf.app.config import load_config
from xvf.device.config_space import config_space, fs_tag_bytes, local_config
from xvf.device.types import BY_NAME
from xvf.device.vhost_device import DeviceParams, VhostDevice
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


def _device(dev_type, supported: bool, tag: str = "xvf") -> SimpleNamespace:
    """What config_read looks at: the cache made at connection from `config_space`."""
    params = DeviceParams(1, 0, dev_type, 0x2000000, 33, True, "/nonexistent", fs_tag=tag)
    from_backend = bytes(range(dev_type.config_size)) if supported else None
    cache = config_space(dev_type, from_backend, tag)
    return SimpleNamespace(params=params, config_cache=cache)


def test_config_read_answers_the_local_tag_when_the_backend_lacks_config():
    dev = _device(FS, supported=False, tag="docs")
    assert VhostDevice.config_read(dev, 0, 4) == int.from_bytes(b"docs", "little")  # type: ignore[arg-type]
    assert VhostDevice.config_read(dev, 36, 4) == 1  # type: ignore[arg-type]
    assert VhostDevice.config_read(dev, 40, 4) == 0  # type: ignore[arg-type]  # beyond the space
    blk = _device(BY_NAME["blk"], supported=False)
    assert VhostDevice.config_read(blk, 0, 8) == 0  # type: ignore[arg-type]


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
    blk = _device(BY_NAME["blk"], supported=True)
    assert VhostDevice.config_read(blk, 0, 4) == int.from_bytes(bytes(range(4)), "little")  # type: ignore[arg-type]
    assert VhostDevice.config_read(blk, 8, 2) == int.from_bytes(bytes([8, 9]), "little")  # type: ignore[arg-type]
