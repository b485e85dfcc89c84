"""The virtio device types xvf serves: virtio id, socket name, queues.

Queue counts and sizes follow the rust-vmm vhost-device backends (and QEMU's
vhost-user device models where rust-vmm has none); QueueNumMax advertised to
the guest is the size below. Sources are cited per entry in
tests/unit/test_devices.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from xvf.errors import ConfigError
from xvf.protocols.xenbus import parse_compatible


@dataclass(frozen=True)
class DeviceType:
    name: str  # socket name prefix: <socket-path>/<name>.sock<N>
    virtio_id: int
    num_queues: int
    queue_size: int
    config_size: int  # bytes of device config space (GET_CONFIG asks for exactly this)
    description: str
    # Why xvf does not serve this type (refused with this reason), or "" when it does.
    refusal: str = ""
    # Feature bits never offered to the guest although a backend may: they need queues
    # this device does not have (virtio-net's control queue is QEMU's, not the backend's).
    withheld_features: int = 0
    # (offset, size) of the config fields the virtio spec lets the driver write; every
    # other config write is ignored (forwarded, qemu-storage-daemon drops the session).
    writable_config: tuple[tuple[int, int], ...] = ()
    # Queues whose buffers the device keeps until it has something to give (receive
    # and event queues, spec 5.x): a reset does not wait for them to come back.
    held_queues: tuple[int, ...] = ()

    def config_writable(self, offset: int, size: int) -> bool:
        return any(o <= offset and offset + size <= o + n for o, n in self.writable_config)

    @property
    def compatible(self) -> str:
        return f"virtio,device{self.virtio_id:x}"


DEVICE_TYPES: tuple[DeviceType, ...] = (
    # QueueNumMax follows the rust-vmm vhost-device backend's QUEUE_SIZE where one
    # exists (a larger ring is refused by it), else QEMU's vhost-user device model
    # or the seed's frontend crate. config_size is the backend's config struct,
    # so GET_CONFIG is never larger than what it answers. Sources: test_devices.py.
    DeviceType(
        "net",
        1,
        2,
        256,
        12,
        "network card (rx, tx)",
        # CTRL_VQ and what needs it (virtio spec 5.1.3.1): CTRL_RX 18, CTRL_VLAN 19,
        # CTRL_RX_EXTRA 20, GUEST_ANNOUNCE 21, MQ 22, CTRL_MAC_ADDR 23, VQ_NOTF_COAL 52,
        # NOTF_COAL 53, HASH_REPORT 57, RSS 60. A Linux guest that accepts CTRL_VQ
        # looks for queue 2 and fails its probe.
        withheld_features=sum(1 << b for b in (17, 18, 19, 20, 21, 22, 23, 52, 53, 57, 60)),
        held_queues=(0,),
    ),
    # blk: writeback (u8 @32, with CONFIG_WCE), spec 5.2.4
    DeviceType("blk", 2, 1, 128, 60, "block device", writable_config=((32, 1),)),
    # console: emerg_wr (u32 @8), spec 5.3.4
    DeviceType(
        "console",
        3,
        4,
        128,
        12,
        "console with multiport (rx, tx, control rx/tx)",
        writable_config=((8, 4),),
        held_queues=(0, 2),
    ),
    DeviceType("rng", 4, 1, 1024, 0, "entropy source"),
    # scsi: sense_size (u32 @20) and cdb_size (u32 @24), spec 5.6.4
    DeviceType(
        "scsi",
        8,
        3,
        128,
        36,
        "SCSI host (control, event, request)",
        writable_config=((20, 4), (24, 4)),
        held_queues=(1,),
    ),
    DeviceType(
        "gpu",
        16,
        2,
        1024,
        16,
        "GPU (control, cursor)",
        # QEMU's vhost-user-gpu answers GET_DISPLAY_INFO only over a display channel the
        # frontend provides (VHOST_USER_GPU_SET_SOCKET) and renders to; without it a
        # guest's virtio-gpu probe waits forever. A headless device model has no display.
        refusal="virtio-gpu is not served: vhost-user-gpu needs a display channel "
        "(VHOST_USER_GPU_SET_SOCKET) that a headless Xen device model cannot provide",
    ),
    # input: select (u8 @0) and subsel (u8 @1), spec 5.8.4
    DeviceType(
        "input",
        18,
        2,
        1024,
        136,
        "input device (event, status)",
        writable_config=((0, 1), (1, 1)),
        held_queues=(0,),
    ),
    DeviceType("vsock", 19, 3, 256, 8, "socket device (rx, tx, event)", held_queues=(0, 2)),
    DeviceType("sound", 25, 4, 64, 12, "sound card (control, event, tx, rx)", held_queues=(1, 3)),
    DeviceType("fs", 26, 2, 1024, 40, "file system (hiprio, request)"),
    DeviceType("scmi", 32, 2, 1024, 0, "SCMI (command, event)", held_queues=(1,)),
    DeviceType("i2c", 34, 1, 1024, 0, "I2C adapter"),
    DeviceType("can", 36, 3, 64, 2, "CAN controller (tx, rx, control)", held_queues=(1,)),
    DeviceType("gpio", 41, 2, 256, 8, "GPIO controller (request, event)", held_queues=(1,)),
    DeviceType("spi", 45, 1, 1024, 32, "SPI controller"),
)

BY_ID = {d.virtio_id: d for d in DEVICE_TYPES}
BY_NAME = {d.name: d for d in DEVICE_TYPES}


# The DT binding's compatible is "virtio,device%x" of the virtio id: lower-case
# hex, no 0x, at most 32 bits. xl, libxl and Linux all use exactly this string.
def device_type(compatible_or_id: str | int) -> DeviceType:
    virtio_id = (
        compatible_or_id
        if isinstance(compatible_or_id, int)
        else parse_compatible(compatible_or_id)
    )
    dev = BY_ID.get(virtio_id)
    if dev is None:
        known = ", ".join(f"{d.name} ({d.compatible})" for d in DEVICE_TYPES if not d.refusal)
        raise ConfigError(f"virtio device id {virtio_id} is not supported; known: {known}")
    if dev.refusal:
        raise ConfigError(dev.refusal)
    return dev


def socket_name(dev: DeviceType, instance: int) -> str:
    return f"{dev.name}.sock{instance}"
