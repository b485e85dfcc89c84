"""vhost-user message codecs: numbers, layouts and pure encode/decode functions.

Facts from QEMU docs/interop/vhost-user.rst ("Message Specification", "Protocol
features", "Front-end message types"). Everything is native byte order, which
on every platform xvf runs on (x86-64, aarch64) is little endian.
No I/O here: `xvf.protocols.vhost_user` owns the socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xvf.errors import VhostUserError

# -- header -----------------------------------------------------------------------
HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# -- virtio feature bit that gates the protocol-feature messages -------------------
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES

# Vring fd messages (SET_VRING_KICK/CALL/ERR): bits 0-7 index, bit 8 "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x100

MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE in QEMU and rust-vmm
CONFIG_HDR = struct.Struct("<III")  # offset, size, flags
CONFIG_FLAG_FRONTEND = 0  # QEMU VHOST_SET_CONFIG_TYPE_FRONTEND: a guest write


class Request(enum.IntEnum):
    """Front-end request numbers (the `:id:` of each message type in the spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks (bit numbers from the spec's list)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# -- Xen mmap description (follows each region when XEN_MMAP is negotiated) ------
XEN_MMAP_FOREIGN = 0x1  # map with privcmd (foreign mapping of guest frames)
XEN_MMAP_GRANT = 0x2  # map with gntdev (guest granted the pages)
# "Map on demand, never the whole region at once". QEMU's vhost-user.rst says
# bit 8 (0x100), but rust-vmm vm-memory (src/mmap/xen.rs, MmapXenFlags::
# NO_ADVANCE_MAP) and so the vhost crate's region validation use 0x8 and reject
# unknown bits. The rust-vmm backends are the only real consumers, so 0x8 it is.
XEN_MMAP_MAP_ON_DEMAND = 0x8
XEN_MMAP_KNOWN = XEN_MMAP_FOREIGN | XEN_MMAP_GRANT | XEN_MMAP_MAP_ON_DEMAND

MEM_HDR = struct.Struct("<II")  # nregions, padding
REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
REGION_XEN = struct.Struct("<QQQQII")  # ... + xen mmap flags, domid

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log


@dataclass
class VhostUserRegion:
    """One guest RAM region for SET_MEM_TABLE.

    `uva` is the front-end's address for it (the space of SET_VRING_ADDR),
    `fd` the file the backend maps and `fd_offset` where `gpa` starts in it
    (sent as mmap_offset; the backend maps fd_offset + size bytes from 0).
    """

    gpa: int
    size: int
    uva: int
    fd: int
    fd_offset: int
    xen_mmap_flags: int = 0
    domid: int = 0


def encode_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def decode_header(data: bytes) -> tuple[int, int, int]:
    return HEADER.unpack(data)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(data: bytes) -> int:
    return U64.unpack(data)[0]


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_state(data: bytes) -> tuple[int, int]:
    return VRING_STATE.unpack(data)


def encode_vring_addr(
    index: int, flags: int, desc: int, used: int, avail: int, log: int = 0
) -> bytes:
    # Field order on the wire is descriptor, used, available (not desc/avail/used).
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def decode_vring_addr(data: bytes) -> tuple[int, int, int, int, int, int]:
    return VRING_ADDR.unpack(data)


def encode_vring_fd(index: int, has_fd: bool) -> bytes:
    return U64.pack(index | (0 if has_fd else VRING_NOFD))


def _encode_region(r: VhostUserRegion, xen: bool) -> bytes:
    """One region description; with `xen`, followed by its Xen mmap description."""
    if r.size <= 0:
        raise VhostUserError(f"memory region at {r.gpa:#x} has size {r.size}")
    if r.xen_mmap_flags & ~XEN_MMAP_KNOWN:
        raise VhostUserError(
            f"memory region at {r.gpa:#x}: unknown Xen mmap flags {r.xen_mmap_flags:#x}"
        )
    if xen:
        return REGION_XEN.pack(r.gpa, r.size, r.uva, r.fd_offset, r.xen_mmap_flags, r.domid)
    if r.xen_mmap_flags:
        raise VhostUserError(
            f"memory region at {r.gpa:#x} needs Xen mmap flags "
            f"{r.xen_mmap_flags:#x} but the backend did not negotiate XEN_MMAP"
        )
    return REGION.pack(r.gpa, r.size, r.uva, r.fd_offset)


def encode_mem_table(regions: list[VhostUserRegion], xen: bool) -> bytes:
    """SET_MEM_TABLE payload; with `xen`, every region carries its Xen mmap description.

    Like QEMU, only the regions in use are sent (size = 8 + n * region size);
    rust-vmm backends require exactly that size.
    """
    if not regions:
        raise VhostUserError("SET_MEM_TABLE needs at least one region")
    if len(regions) > MAX_MEM_REGIONS:
        raise VhostUserError(
            f"SET_MEM_TABLE takes at most {MAX_MEM_REGIONS} regions, got {len(regions)}"
        )
    return MEM_HDR.pack(len(regions), 0) + b"".join(_encode_region(r, xen) for r in regions)


def encode_single_region(region: VhostUserRegion, xen: bool) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG payload: u64 padding, then one region description."""
    return U64.pack(0) + _encode_region(region, xen)


def decode_mem_table(data: bytes, xen: bool) -> list[VhostUserRegion]:
    """Inverse of `encode_mem_table` (fds are carried separately, so fd is -1)."""
    if len(data) < MEM_HDR.size:
        raise VhostUserError(f"SET_MEM_TABLE payload of {len(data)} bytes is too short")
    n, _ = MEM_HDR.unpack_from(data)
    layout = REGION_XEN if xen else REGION
    if n > MAX_MEM_REGIONS or len(data) != MEM_HDR.size + n * layout.size:
        raise VhostUserError(f"SET_MEM_TABLE payload of {len(data)} bytes for {n} regions")
    out = []
    for i in range(n):
        fields = layout.unpack_from(data, MEM_HDR.size + i * layout.size)
        gpa, size, uva, off = fields[:4]
        flags, domid = fields[4:] if xen else (0, 0)
        out.append(VhostUserRegion(gpa, size, uva, -1, off, flags, domid))
    return out


def encode_config(
    offset: int, size: int, data: bytes | None = None, flags: int = CONFIG_FLAG_FRONTEND
) -> bytes:
    """GET_CONFIG (data None: `size` zero bytes) or SET_CONFIG payload."""
    if data is not None and len(data) != size:
        raise VhostUserError(f"config payload of {len(data)} bytes for size {size}")
    check_config_range(offset, size)
    return CONFIG_HDR.pack(offset, size, flags) + (data if data is not None else bytes(size))


def decode_config(data: bytes) -> tuple[int, int, int, bytes]:
    """-> (offset, size, flags, payload); the payload length must match `size`."""
    if len(data) < CONFIG_HDR.size:
        raise VhostUserError(f"config payload of {len(data)} bytes is too short")
    offset, size, flags = CONFIG_HDR.unpack_from(data)
    body = data[CONFIG_HDR.size :]
    if len(body) != size:
        raise VhostUserError(f"config payload says {size} bytes but carries {len(body)}")
    return offset, size, flags, bytes(body)


def check_config_range(offset: int, size: int) -> None:
    if size <= 0 or offset < 0 or offset + size > MAX_CONFIG_SIZE:
        raise VhostUserError(
            f"config access at {offset} of {size} bytes is outside the "
            f"{MAX_CONFIG_SIZE}-byte config space"
        )
