"""Device config space xvf answers itself when the backend serves none.

A backend without the vhost-user CONFIG protocol feature cannot answer
GET_CONFIG, yet some guest drivers need fields from it. QEMU's C virtiofsd is
one: it leaves the tag to the VMM (QEMU's `vhost-user-fs-pci,tag=...`), and
Linux's virtio_fs refuses a device whose tag is empty. Here the same fields are
built from xvf's own settings.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from xvf.device.types import DeviceType
from xvf.errors import ConfigError

VIRTIO_ID_FS = 26
FS_TAG_SIZE = 36  # struct virtio_fs_config: u8 tag[36]; le32 num_request_queues
DEFAULT_FS_TAG = "xvf"


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
