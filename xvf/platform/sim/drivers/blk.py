"""virtio-blk guest driver (virtio 1.2 section 5.2), device id 2.

A request is three parts in one descriptor chain: the header
`{le32 type, le32 reserved, le64 sector}` (device-readable), the data
(readable for writes, writable for reads), and one status byte (writable).
Several requests may be in flight: `submit` then `complete`, or the blocking
helpers `read`, `write`, `flush`, `get_id`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from xvf.errors import SimulatorError
from xvf.platform.sim.drivers import DeviceError, SlotPool
from xvf.platform.sim.virtio_driver import VirtioMmioDevice
from xvf.protocols import virtio as R

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_ID_BYTES = 20

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# struct virtio_blk_config offsets
CFG_CAPACITY = 0
CFG_SIZE_MAX = 8
CFG_SEG_MAX = 12
CFG_BLK_SIZE = 20

BLK_OUTHDR = struct.Struct("<IIQ")
_SLOT = 32  # header (16 bytes) + status byte at 16
_STATUS_OFF = 16
_STATUS_UNSET = 0xFF

_TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get-id",
}


@dataclass
class BlkRequest:
    type: int
    sector: int
    data_gpa: int | None
    data_len: int
    slot: int = 0
    status: int | None = None  # set on completion
    written: int = 0  # bytes the device reports having written

    @property
    def done(self) -> bool:
        return self.status is not None

    def describe(self) -> str:
        kind = _TYPE_NAMES.get(self.type, self.type)
        return f"{kind} of {self.data_len} bytes at sector {self.sector}"


class VirtioBlk:
    """Driver of one virtio-blk device with a single request queue."""

    def __init__(
        self,
        dev: VirtioMmioDevice,
        *,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = False,
    ) -> None:
        self.dev = dev
        self.ram = dev.ram
        self.queue_size = queue_size
        self._want = (
            (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_RO)
            | ((1 << R.F_EVENT_IDX) if event_idx else 0)
            | ((1 << R.F_INDIRECT_DESC) if indirect else 0)
        )
        self.capacity = 0  # in 512-byte sectors
        self.blk_size = SECTOR_SIZE
        self.size_max = 0
        self.read_only = False
        self._slots: SlotPool | None = None
        self._done: deque[BlkRequest] = deque()

    def start(self) -> None:
        if self.dev.probe() != VIRTIO_ID_BLOCK:
            raise SimulatorError(f"{self.dev.name}: device id {self.dev.device_id} is not blk")
        self.dev.initialize(self._want, [self.queue_size])
        self.queue_size = self.dev.queues[0].size
        self._slots = SlotPool(self.ram, self.queue_size, _SLOT)
        self.capacity = self.dev.read_config(CFG_CAPACITY, 8)
        if self.dev.has_feature(VIRTIO_BLK_F_BLK_SIZE):
            self.blk_size = self.dev.read_config(CFG_BLK_SIZE, 4)
        if self.dev.has_feature(VIRTIO_BLK_F_SIZE_MAX):
            self.size_max = self.dev.read_config(CFG_SIZE_MAX, 4)
        self.read_only = self.dev.has_feature(VIRTIO_BLK_F_RO)

    def close(self) -> None:
        self.dev.shutdown()
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    # -- asynchronous interface --------------------------------------------------
    def submit(
        self, type_: int, sector: int, data_gpa: int | None = None, data_len: int = 0
    ) -> BlkRequest:
        """Queue one request and notify the device if it asks for it."""
        if self._slots is None:
            raise SimulatorError(f"{self.dev.name}: driver not started")
        if type_ == VIRTIO_BLK_T_OUT and self.read_only:
            raise DeviceError(f"{self.dev.name}: device is read-only")
        if type_ == VIRTIO_BLK_T_FLUSH and not self.dev.has_feature(VIRTIO_BLK_F_FLUSH):
            raise DeviceError(f"{self.dev.name}: device has no flush (no VIRTIO_BLK_F_FLUSH)")
        req = BlkRequest(type_, sector, data_gpa, data_len)
        req.slot = self._slots.take()
        hdr = self.ram.view(req.slot, _SLOT)
        BLK_OUTHDR.pack_into(hdr, 0, type_, 0, sector)
        hdr[_STATUS_OFF] = _STATUS_UNSET
        data = self._segments(data_gpa, data_len)
        device_writes = type_ in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)
        out = [(req.slot, BLK_OUTHDR.size)] + ([] if device_writes else data)
        ins = (data if device_writes else []) + [(req.slot + _STATUS_OFF, 1)]
        try:
            self.dev.queues[0].add(out, ins, req)
        except Exception:
            self._slots.give(req.slot)
            raise
        self.dev.kick(0)
        return req

    def _segments(self, gpa: int | None, length: int) -> list[tuple[int, int]]:
        if gpa is None or length == 0:
            return []
        step = self.size_max or length
        return [(gpa + off, min(step, length - off)) for off in range(0, length, step)]

    def complete(self, timeout: float | None = None) -> list[BlkRequest]:
        """Wait until at least one request finished; returns every finished one."""
        if not self._done:
            self._reap(timeout, "any request")
        out = list(self._done)
        self._done.clear()
        return out

    def wait(self, req: BlkRequest, timeout: float | None = None) -> BlkRequest:
        """Wait for `req` (other completions are kept for `complete`)."""
        while not req.done:
            self._reap(timeout, req.describe())
        if req in self._done:
            self._done.remove(req)
        return req

    def _reap(self, timeout: float | None, what: str) -> None:
        for token, written in self.dev.wait_used(0, what, timeout):
            if not isinstance(token, BlkRequest):
                raise SimulatorError(f"{self.dev.name}: foreign token {token!r} on the queue")
            req = token
            req.status = self.ram.view(req.slot + _STATUS_OFF, 1)[0]
            req.written = written
            self._slots.give(req.slot)  # type: ignore[union-attr]
            self._done.append(req)

    # -- blocking helpers -----------------------------------------------------------
    def _run(self, type_: int, sector: int, gpa: int | None, length: int) -> BlkRequest:
        req = self.wait(self.submit(type_, sector, gpa, length))
        if req.status != VIRTIO_BLK_S_OK:
            raise DeviceError(f"{self.dev.name}: {req.describe()} failed with status {req.status}")
        return req

    def _run_with_buffer(self, type_: int, sector: int, gpa: int, length: int) -> None:
        try:
            self._run(type_, sector, gpa, length)
        except DeviceError:
            self.ram.free(gpa)
            raise
        # On a timeout the buffer stays allocated: the device still owns it.

    def read(self, sector: int, count: int) -> bytes:
        length = count * SECTOR_SIZE
        gpa = self.ram.alloc(length)
        self._run_with_buffer(VIRTIO_BLK_T_IN, sector, gpa, length)
        data = self.ram.read(gpa, length)
        self.ram.free(gpa)
        return data

    def write(self, sector: int, data: bytes) -> None:
        if not data or len(data) % SECTOR_SIZE:
            raise SimulatorError(f"write of {len(data)} bytes is not whole sectors")
        gpa = self.ram.alloc(len(data))
        self.ram.write(gpa, data)
        self._run_with_buffer(VIRTIO_BLK_T_OUT, sector, gpa, len(data))
        self.ram.free(gpa)

    def flush(self) -> None:
        self._run(VIRTIO_BLK_T_FLUSH, 0, None, 0)

    def get_id(self) -> bytes:
        """The device's serial (up to 20 bytes, NUL padding removed)."""
        gpa = self.ram.alloc(VIRTIO_BLK_ID_BYTES)
        self._run_with_buffer(VIRTIO_BLK_T_GET_ID, 0, gpa, VIRTIO_BLK_ID_BYTES)
        data = self.ram.read(gpa, VIRTIO_BLK_ID_BYTES)
        self.ram.free(gpa)
        return data.split(b"\0", 1)[0]
