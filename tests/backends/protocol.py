"""vhost-user wire constants and payload layouts, shared by the reference backends and frontend.

Numbers are from QEMU docs/interop/vhost-user.rst and rust-vmm vhost's message.rs.
"""

from __future__ import annotations

import struct

# Header: request u32, flags u32, size u32.
HEADER = struct.Struct("<III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 0x1000  # rust-vmm MAX_MSG_SIZE
MAX_FDS = 32  # rust-vmm MAX_ATTACHED_FD_ENTRIES
MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
CONFIG_SPACE_MAX = 256  # VHOST_USER_CONFIG_SIZE

# Front-end requests.
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
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

# Requests that may carry file descriptors (everything else with fds is malformed).
FD_REQUESTS = frozenset(
    {SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR,
     SET_BACKEND_REQ_FD, ADD_MEM_REG, REM_MEM_REG}
)  # fmt: skip
MAX_MEM_SLOTS = 32  # what GET_MAX_MEM_SLOTS answers (CONFIGURE_MEM_SLOTS)

# Protocol feature bits.
PF_MQ = 0
PF_LOG_SHMFD = 1
PF_REPLY_ACK = 3
PF_BACKEND_REQ = 5
PF_CONFIG = 9
PF_CONFIGURE_MEM_SLOTS = 15
PF_STATUS = 16
PF_XEN_MMAP = 17

# Virtio feature bits used here (virtio 1.2 section 6, vhost-user spec).
F_NOTIFY_ON_EMPTY = 24
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 32

# Payload layouts.
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
VRING_ADDR_F_LOG = 0x1
VRING_FD_INDEX_MASK = 0xFF
VRING_FD_NOFD = 0x100
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_REGION_XEN = struct.Struct("<QQQQII")  # ... + xen_mmap_flags, domid
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
CONFIG_F_WRITABLE = 0x1
CONFIG_F_LIVE_MIGRATION = 0x2

# Split virtqueue layout (virtio 1.2 section 2.7).
# These backends stand in for third-party ones (rust-vmm): they keep their own
# copy of these facts on purpose and never import xvf's (xvf.protocols.virtqueue).
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")  # id, len


def bit(n: int) -> int:
    return 1 << n
