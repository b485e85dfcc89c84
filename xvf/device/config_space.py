"""Device config space xvf answers itself when the backend serves none.

A backend without the vhost-user CONFIG protocol feature cannot answer
GET_CONFIG, yet some guest drivers need fields from it. QEMU's C virtiofsd is
one: it leaves the tag to the VMM (QEMU's `vhost-user-fs-pci,tag=...`), and
Linux's virtio_fs refuses a device whose tag is empty. Here the same fields are
built from xvf's own settings.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping

from xvf.device.types import DeviceType
from xvf.errors import ConfigError

VIRTIO_ID_FS = 26
FS_TAG_SIZE = 36  # struct virtio_fs_config: u8 tag[36]; le32 num_request_queues
DEFAULT_FS_TAG = "xvf"

log = logging.getLogger("xvf.device")


def fs_tag_bytes(tag: str) -> bytes:
    """The tag as the config space holds it: UTF-8, NUL-padded to 36 bytes.

    Linux's virtio_fs takes the tag up to the first NUL and refuses an empty
    one, so a tag must be non-empty, NUL-free and fit in 36 bytes."""
    raw = tag.encode("utf-8")
    if not raw or b"\0" in raw or len(raw) > FS_TAG_SIZE:
        raise ConfigError(f"fs tag {tag!r} must be 1 to {FS_TAG_SIZE} bytes of UTF-8 without NUL")
    return raw.ljust(FS_TAG_SIZE, b"\0")


def local_config(dev_type: DeviceType, settings: Mapping[str, object]) -> bytes | None:
    """The config space of `dev_type` built from `settings` (key fs_tag for fs);
    None for device types xvf has nothing to say about."""
    if dev_type.virtio_id == VIRTIO_ID_FS:
        tag = settings.get("fs_tag") or DEFAULT_FS_TAG
        # queue 0 is hiprio, the rest are request queues
        space = fs_tag_bytes(str(tag)) + struct.pack("<I", dev_type.num_queues - 1)
        return space.ljust(dev_type.config_size, b"\0")  # notify_buf_size: no NOTIFICATION
    return None


def config_space(dev_type: DeviceType, from_backend: bytes | None, fs_tag: str) -> bytes:
    """What the guest's config reads answer: the backend's GET_CONFIG reply when it
    has one (None: no CONFIG feature), else what xvf knows itself, else zeros."""
    if from_backend is not None:
        return bytes(from_backend)
    return local_config(dev_type, {"fs_tag": fs_tag}) or b""


class ConfigCache:
    """What the guest's config reads answer, and what its writes forward.

    Filled at every (re)connection (`connect`), so no config read ever waits for a
    backend; a forwarded write updates it at once (the guest reads back what it
    wrote) and is followed by a fresh GET_CONFIG (`refreshed`)."""

    def __init__(self, label: str, dev_type: DeviceType, fs_tag: str) -> None:
        self.label = label
        self.dev_type = dev_type
        self.fs_tag = fs_tag
        self.supported = False  # the backend has the CONFIG protocol feature
        self.cache = b""
        self.ignored_writes = 0
        self._writes = 0

    def connect(self, from_backend: bytes | None) -> None:
        """A connection's GET_CONFIG reply (None: the backend has no CONFIG)."""
        self.supported = from_backend is not None
        # Without GET_CONFIG xvf answers what it knows itself (virtiofsd leaves the
        # fs tag to us).
        self.cache = config_space(self.dev_type, from_backend, self.fs_tag)

    def read(self, offset: int, size: int) -> int:
        if offset + size > self.dev_type.config_size:
            return 0
        return int.from_bytes(self.cache[offset : offset + size], "little")

    def write(
        self, offset: int, size: int, value: int, connected: bool
    ) -> tuple[bytes, int] | None:
        """The bytes to forward and the write's sequence number, or None when the write
        goes nowhere (a read-only field, no CONFIG, no backend)."""
        if not self.dev_type.config_writable(offset, size):
            # Read-only fields (blk capacity...): forwarded, qemu-storage-daemon drops
            # the session and the in-flight I/O with it. Said once, then counted.
            self.ignored_writes += 1
            if self.ignored_writes == 1:
                log.warning(
                    "%s: guest wrote %d byte(s) at read-only config offset %#x: ignored "
                    "(further ones are counted, not logged)",
                    self.label,
                    size,
                    offset,
                )
            else:
                log.debug("%s: read-only config write #%d (offset %#x) ignored", self.label,
                          self.ignored_writes, offset)  # fmt: skip
            return None
        if not self.supported or not connected:
            return None
        data = value.to_bytes(size, "little")
        cache = bytearray(self.cache)
        cache[offset : offset + size] = data
        self.cache = bytes(cache)
        self._writes += 1
        return data, self._writes

    def refreshed(self, seq: int, fresh: bytes) -> None:
        """GET_CONFIG after write `seq`; only the latest write's refresh counts (an
        earlier one read before the later write landed)."""
        if seq == self._writes:
            self.cache = bytes(fresh)
