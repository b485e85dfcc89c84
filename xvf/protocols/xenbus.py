"""What the toolstack and a device model tell each other in a virtio device's
xenstore nodes: the XenbusState values (Xen's public/io/xenbus.h; these are
strings in xenstore, never shared memory) and libxl's "compatible" type string."""

from __future__ import annotations

import re

from xvf.errors import ConfigError

XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_CONNECTED = 4
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6

COMPATIBLE_PREFIX = "virtio,device"
_COMPATIBLE = re.compile(r"virtio,device([0-9a-f]{1,8})\Z")


def parse_compatible(compatible: str) -> int:
    """'virtio,device22' -> 34; ConfigError for anything else."""
    m = _COMPATIBLE.match(compatible)
    if not m:
        raise ConfigError(
            f"{compatible!r} is not 'virtio,device<id>' with the id in lower-case hex "
            "without 0x (e.g. virtio,device22 for I2C)"
        )
    return int(m.group(1), 16)
