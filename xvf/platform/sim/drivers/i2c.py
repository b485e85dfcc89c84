"""virtio-i2c guest driver (virtio 1.2 section 5.19), device id 34 (0x22).

Each I2C message is one request: out_hdr `{le16 addr, le16 padding, le32 flags}`,
the message buffer (device-readable for writes, writable for reads), then
in_hdr `{u8 status}`. A transfer of several messages queues them all at once;
every request but the last carries VIRTIO_I2C_FLAGS_FAIL_NEXT so the device
fails the rest of the group after an error, as Linux i2c-virtio does. The
7-bit address travels shifted left by one (Linux: `addr << 1`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xvf.errors import SimulatorError
from xvf.platform.sim.drivers import DeviceError
from xvf.platform.sim.virtio_driver import VirtioMmioDevice

VIRTIO_ID_I2C_ADAPTER = 34
VIRTIO_I2C_F_ZERO_LENGTH_REQUEST = 0
VIRTIO_I2C_FLAGS_FAIL_NEXT = 1 << 0
VIRTIO_I2C_FLAGS_M_RD = 1 << 1
VIRTIO_I2C_MSG_OK = 0
VIRTIO_I2C_MSG_ERR = 1

I2C_OUT_HDR = struct.Struct("<HHI")
_IN_HDR_OFF = 8  # in_hdr right after out_hdr in the request's scratch area
_UNSET = 0xFF


@dataclass
class I2cMsg:
    """One message: `data` is sent for writes; for reads `length` bytes land in `data`."""

    addr: int
    data: bytes = b""
    read: bool = False
    length: int = 0
    status: int | None = None

    def size(self) -> int:
        return self.length if self.read else len(self.data)


class VirtioI2c:
    """Driver of one virtio-i2c adapter (a single request queue)."""

    def __init__(self, dev: VirtioMmioDevice, *, queue_size: int = 64) -> None:
        self.dev = dev
        self.ram = dev.ram
        self.queue_size = queue_size
        self.zero_length = False
        self._seq = 0

    def start(self) -> None:
        if self.dev.probe() != VIRTIO_ID_I2C_ADAPTER:
            raise SimulatorError(f"{self.dev.name}: device id {self.dev.device_id} is not i2c")
        self.dev.initialize(1 << VIRTIO_I2C_F_ZERO_LENGTH_REQUEST, [self.queue_size])
        self.zero_length = self.dev.has_feature(VIRTIO_I2C_F_ZERO_LENGTH_REQUEST)

    def close(self) -> None:
        self.dev.shutdown()

    def transfer(self, msgs: list[I2cMsg], timeout: float | None = None) -> int:
        """Run the messages as one group; returns how many succeeded in order
        (like i2c_transfer). Read data is stored into each read message's `data`."""
        if not msgs:
            return 0
        for m in msgs:
            if not 0 <= m.addr < 0x80:
                raise SimulatorError(f"I2C address {m.addr:#x} is not 7-bit")
            if m.size() == 0 and not self.zero_length:
                raise SimulatorError(f"{self.dev.name}: zero-length message needs the feature")
        vq = self.dev.queues[0]
        self._seq += 1
        pending: dict[tuple[int, int], tuple[I2cMsg, int, int | None]] = {}
        for i, m in enumerate(msgs):
            scratch = self.ram.alloc(16)
            flags = 0 if i == len(msgs) - 1 else VIRTIO_I2C_FLAGS_FAIL_NEXT
            if m.read and self.zero_length:
                flags |= VIRTIO_I2C_FLAGS_M_RD
            view = self.ram.view(scratch, 16)
            I2C_OUT_HDR.pack_into(view, 0, m.addr << 1, 0, flags)
            view[_IN_HDR_OFF] = _UNSET
            buf = self.ram.alloc(m.size()) if m.size() else None
            if buf is not None and not m.read:
                self.ram.write(buf, m.data)
            out = [(scratch, I2C_OUT_HDR.size)]
            ins = [(scratch + _IN_HDR_OFF, 1)]
            if buf is not None:
                (ins if m.read else out).insert(0 if m.read else 1, (buf, m.size()))
            vq.add(out, ins, (self._seq, i))
            pending[(self._seq, i)] = (m, scratch, buf)
        self.dev.kick(0)
        for m in msgs:
            m.status = None
        what = f"i2c transfer of {len(msgs)} messages to {msgs[0].addr:#x}"
        while any(m.status is None for m, _, _ in pending.values()):
            for token, _written in self.dev.wait_used(0, what, timeout):
                if token not in pending:
                    continue  # a late answer to a transfer that timed out earlier
                m, scratch, buf = pending[token]
                m.status = self.ram.view(scratch + _IN_HDR_OFF, 1)[0]
                if m.read and buf is not None and m.status == VIRTIO_I2C_MSG_OK:
                    m.data = self.ram.read(buf, m.length)
                self.ram.free(scratch)
                if buf is not None:
                    self.ram.free(buf)
        ok = 0
        for m in msgs:
            if m.status != VIRTIO_I2C_MSG_OK:
                break
            ok += 1
        return ok

    # -- SMBus-style register access, as an RTC or sensor driver does ---------------
    def read_reg(self, addr: int, reg: int, length: int = 1) -> bytes:
        """Write the register number, then read `length` bytes (one combined transfer)."""
        msgs = [I2cMsg(addr, bytes([reg])), I2cMsg(addr, read=True, length=length)]
        if self.transfer(msgs) != 2:
            raise DeviceError(f"{self.dev.name}: reading register {reg:#x} of {addr:#x} failed")
        return msgs[1].data

    def write_reg(self, addr: int, reg: int, data: bytes) -> None:
        if self.transfer([I2cMsg(addr, bytes([reg]) + data)]) != 1:
            raise DeviceError(f"{self.dev.name}: writing register {reg:#x} of {addr:#x} failed")
