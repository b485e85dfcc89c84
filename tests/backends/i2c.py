"""Reference virtio-i2c vhost-user backend (stands in for rust-vmm vhost-device-i2c).

The host adapter is emulated: a bus with a DS1307-style RTC (default address 0x68) and a
24C02-style 256-byte EEPROM (default 0x50). Any other address has no device, so a transfer to
it fails with VIRTIO_I2C_MSG_ERR, as a NAK on a real adapter does through vhost-device-i2c.

Run: python -m tests.backends.i2c --socket-path PATH [--smbus]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import struct
import time
from dataclasses import dataclass

from . import protocol as p
from .vhost_user_backend import Device, Server, add_common_args, run
from .virtqueue import BadChain, Chain, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_I2C = 34
QUEUE_SIZE = 1024  # vhost-device-i2c QUEUE_SIZE
NUM_QUEUES = 1
F_ZERO_LENGTH_REQUEST = 0
MSG_OK = 0
MSG_ERR = 1
FLAGS_FAIL_NEXT = 1 << 0
FLAGS_M_RD = 1 << 1
OUT_HDR = struct.Struct("<HHI")  # addr (7-bit address << 1), padding, flags

RTC_ADDR = 0x68
EEPROM_ADDR = 0x50


class Nak(Exception):
    """The addressed device (or the adapter) did not acknowledge: the transfer fails."""


class I2cTarget:
    """One device on the bus. A message starts with START + address; write(data) or read(n)."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        raise NotImplementedError


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _from_bcd(b: int) -> int:
    hi, lo = b >> 4, b & 0xF
    if hi > 9 or lo > 9:
        raise ValueError(f"{b:#04x} is not BCD")
    return hi * 10 + lo


class Ds1307(I2cTarget):
    """DS1307-style RTC: registers 0x00-0x06 time in BCD, 0x07 control, 0x08-0x3f NVRAM.

    Register map: 0 seconds (bit 7 CH = clock halt), 1 minutes, 2 hours (bit 6 = 12-hour mode,
    then bit 5 = PM), 3 day of week 1-7, 4 date, 5 month, 6 year 00-99 (20xx). The register
    pointer is set by the first byte of a write and auto-increments, wrapping 0x3f -> 0x00.
    The clock runs from host UTC time plus whatever offset the guest wrote.
    """

    def __init__(self) -> None:
        self.pointer = 0
        self.ram = bytearray(64)
        self.offset = 0.0  # guest time minus host time, seconds
        self.halted_at: float | None = None  # guest time frozen by CH
        self.mode12 = False
        self.dow_shift = 0
        self.raw_time: bytearray | None = None  # registers that do not decode to a time

    def _now(self) -> float:
        return self.halted_at if self.halted_at is not None else time.time() + self.offset

    def time_registers(self) -> bytearray:
        if self.raw_time is not None:
            return bytearray(self.raw_time)
        t = dt.datetime.fromtimestamp(int(self._now()), dt.UTC)
        if self.mode12:
            h12 = t.hour % 12 or 12
            hours = 0x40 | (0x20 if t.hour >= 12 else 0) | _bcd(h12)
        else:
            hours = _bcd(t.hour)
        dow = (t.isoweekday() % 7 + self.dow_shift) % 7 + 1  # Sunday = 1, as Linux writes it
        ch = 0x80 if self.halted_at is not None else 0
        return bytearray(
            [ch | _bcd(t.second), _bcd(t.minute), hours, dow, _bcd(t.day), _bcd(t.month),
             _bcd(t.year % 100)]
        )  # fmt: skip

    def _set_time_registers(self, regs: bytearray) -> None:
        try:
            if regs[2] & 0x40:
                h12 = _from_bcd(regs[2] & 0x1F)
                if not 1 <= h12 <= 12:
                    raise ValueError("12-hour value out of range")
                hour = h12 % 12 + (12 if regs[2] & 0x20 else 0)
            else:
                hour = _from_bcd(regs[2] & 0x3F)
            t = dt.datetime(
                2000 + _from_bcd(regs[6]),
                _from_bcd(regs[5] & 0x1F),
                _from_bcd(regs[4] & 0x3F),
                hour,
                _from_bcd(regs[1] & 0x7F),
                _from_bcd(regs[0] & 0x7F),
                tzinfo=dt.UTC,
            )
            if not 1 <= regs[3] <= 7:
                raise ValueError("day of week out of range")
        except ValueError as e:
            # The chip stores the bits anyway; keep them, frozen, and say so.
            log.warning(
                "rtc: time registers %s do not form a time (%s); kept as written", regs.hex(), e
            )
            self.raw_time = bytearray(regs)
            return
        self.raw_time = None
        self.mode12 = bool(regs[2] & 0x40)
        self.dow_shift = (regs[3] - 1 - t.isoweekday() % 7) % 7
        stamp = t.timestamp()
        if regs[0] & 0x80:
            self.halted_at = stamp
        else:
            self.halted_at = None
            self.offset = stamp - time.time()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0] & 0x3F
        regs = self.time_registers()
        touched = False
        for b in data[1:]:
            if self.pointer < 7:
                regs[self.pointer] = b
                touched = True
            else:
                self.ram[self.pointer] = b
            self.pointer = (self.pointer + 1) & 0x3F
        if touched:
            self._set_time_registers(regs)

    def read(self, n: int) -> bytes:
        regs = self.time_registers()
        out = bytearray()
        for _ in range(n):
            out.append(regs[self.pointer] if self.pointer < 7 else self.ram[self.pointer])
            self.pointer = (self.pointer + 1) & 0x3F
        return bytes(out)


class Eeprom24c02(I2cTarget):
    """256-byte EEPROM: first written byte is the word address, reads continue from it."""

    def __init__(self) -> None:
        self.data = bytearray(b"\xff" * 256)
        self.pointer = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        for b in data[1:]:
            self.data[self.pointer] = b
            self.pointer = (self.pointer + 1) & 0xFF

    def read(self, n: int) -> bytes:
        out = bytearray()
        for _ in range(n):
            out.append(self.data[self.pointer])
            self.pointer = (self.pointer + 1) & 0xFF
        return bytes(out)


@dataclass
class I2cMsg:
    addr: int  # 7-bit
    read: bool
    length: int
    data: bytes = b""  # write payload


class I2cBus:
    """The emulated host adapter; `smbus` mimics an SMBus-only adapter behind vhost-device-i2c."""

    def __init__(self, targets: dict[int, I2cTarget], smbus: bool = False) -> None:
        self.targets = targets
        self.smbus = smbus

    def _target(self, addr: int) -> I2cTarget:
        target = self.targets.get(addr)
        if target is None:
            raise Nak(f"no device at {addr:#04x}")
        return target

    def transfer(self, msgs: list[I2cMsg]) -> list[bytes]:
        """Run one combined transfer; returns read data per message (b"" for writes)."""
        if self.smbus:
            self._check_smbus(msgs)
        else:
            # vhost-device-i2c refuses zero-length messages on a plain-I2C adapter (I2C_RDWR).
            for m in msgs:
                if m.length == 0:
                    raise Nak("zero-length message on an I2C (non-SMBus) adapter")
        out = []
        for m in msgs:
            target = self._target(m.addr)
            if m.length == 0:
                out.append(b"")  # SMBus quick command: the address ACK is all there is
            elif m.read:
                out.append(target.read(m.length))
            else:
                target.write(m.data)
                out.append(b"")
        return out

    @staticmethod
    def _check_smbus(msgs: list[I2cMsg]) -> None:
        # The subset of I2C transfers that vhost-device-i2c can turn into SMBus calls.
        if len(msgs) == 1:
            m = msgs[0]
            if m.length > 3 or (m.read and m.length > 1):
                raise Nak(f"SMBus adapter: {m.length}-byte {'read' if m.read else 'write'}")
        elif len(msgs) == 2:
            a, b = msgs
            if a.read or not b.read or a.length != 1 or not 1 <= b.length <= 2:
                raise Nak("SMBus adapter: only a 1-byte command write then a 1-2 byte read")
        else:
            raise Nak(f"SMBus adapter: {len(msgs)} messages in one transfer")


@dataclass
class _Req:
    head: int
    msg: I2cMsg
    buf: memoryview | None
    status: memoryview


class I2cDevice(Device):
    name = "i2c"
    virtio_id = VIRTIO_ID_I2C
    num_queues = NUM_QUEUES
    queue_size = QUEUE_SIZE
    device_features = 1 << F_ZERO_LENGTH_REQUEST
    protocol_features = p.bit(p.PF_MQ)  # vhost-device-i2c offers only MQ (no REPLY_ACK, CONFIG)

    def __init__(self, bus: I2cBus) -> None:
        self.bus = bus

    @staticmethod
    def _parse(chain: Chain) -> _Req:
        """Check one request the way vhost-device-i2c does; ValueError names what is wrong."""
        if chain.count not in (2, 3):
            raise ValueError(f"{chain.count} descriptors, expected 2 or 3")
        if not chain.readable or len(chain.readable[0]) != OUT_HDR.size:
            raise ValueError("first descriptor is not an 8-byte device-readable header")
        if not chain.writable or len(chain.writable[-1]) != 1:
            raise ValueError("last descriptor is not a 1-byte device-writable status")
        addr, _pad, flags = OUT_HDR.unpack(chain.readable[0])
        read = bool(flags & FLAGS_M_RD)
        buf = None
        if chain.count == 3:
            if read and len(chain.writable) == 2:
                buf = chain.writable[0]
            elif not read and len(chain.readable) == 2:
                buf = chain.readable[1]
            else:
                raise ValueError("buffer direction does not match the M_RD flag")
            if len(buf) == 0:
                raise ValueError("zero-length buffer descriptor")
        msg = I2cMsg(addr >> 1, read, len(buf) if buf is not None else 0)
        if buf is not None and not read:
            msg.data = bytes(buf)
        return _Req(chain.head, msg, buf, chain.writable[-1])

    def process(self, server: Server, vq: Virtqueue, chains: list[Chain | BadChain]) -> None:
        # Everything popped in one pass is one I2C transfer with one status, as in vhost-device.
        reqs = []
        for c in chains:
            if isinstance(c, BadChain):
                server.reject(vq, c)
                continue
            try:
                reqs.append(self._parse(c))
            except ValueError as e:
                server.reject(vq, BadChain(c.head, str(e)))
        if not reqs:
            return
        try:
            results = self.bus.transfer([r.msg for r in reqs])
            status = MSG_OK
        except Nak as e:
            log.info("i2c transfer failed: %s", e)
            results, status = [bytes(r.msg.length) if r.msg.read else b"" for r in reqs], MSG_ERR
        for r, data in zip(reqs, results, strict=True):
            length = 1
            if r.buf is not None:
                if r.msg.read:
                    r.buf[:] = data.ljust(len(r.buf), b"\0")
                if status == MSG_OK:
                    length += len(r.buf)
            r.status[0] = status
            server.complete(vq, r.head, length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.backends.i2c", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--rtc-addr", type=lambda s: int(s, 0), default=RTC_ADDR)
    parser.add_argument("--eeprom-addr", type=lambda s: int(s, 0), default=EEPROM_ADDR)
    parser.add_argument(
        "--smbus", action="store_true", help="behave like an SMBus-only host adapter"
    )
    args = parser.parse_args(argv)
    bus = I2cBus({args.rtc_addr: Ds1307(), args.eeprom_addr: Eeprom24c02()}, smbus=args.smbus)
    return run(I2cDevice(bus), args)


if __name__ == "__main__":
    raise SystemExit(main())
