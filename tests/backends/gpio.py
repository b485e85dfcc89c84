"""Reference virtio-gpio vhost-user backend (stands in for rust-vmm vhost-device-gpio).

The GPIO chip is emulated like vhost-device-gpio's mock device (`--device-list s<N>`): N lines
named dummy0..dummy<N-1>, no direction and no value until the guest sets them, and a value set
on a line reads back (outputs loop back). Interrupts (VIRTIO_GPIO_F_IRQ) fire on value changes
made through SET_VALUE that match the line's irq type.

Run: python -m tests.backends.gpio --socket-path PATH [--lines N] [--names a,b,c]
"""

from __future__ import annotations

import argparse
import logging
import struct
from dataclasses import dataclass

from . import protocol as p
from .vhost_user_backend import Device, Server, add_common_args, run
from .virtqueue import BadChain, Chain, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_GPIO = 41
QUEUE_SIZE = 256  # vhost-device-gpio QUEUE_SIZE
NUM_QUEUES = 2
REQUEST_QUEUE = 0
EVENT_QUEUE = 1
F_IRQ = 0

MSG_GET_LINE_NAMES = 0x0001
MSG_GET_DIRECTION = 0x0002
MSG_SET_DIRECTION = 0x0003
MSG_GET_VALUE = 0x0004
MSG_SET_VALUE = 0x0005
MSG_IRQ_TYPE = 0x0006

STATUS_OK = 0
STATUS_ERR = 1

DIRECTION_NONE = 0
DIRECTION_OUT = 1
DIRECTION_IN = 2

IRQ_TYPE_NONE = 0x00
IRQ_TYPE_EDGE_RISING = 0x01
IRQ_TYPE_EDGE_FALLING = 0x02
IRQ_TYPE_EDGE_BOTH = 0x03
IRQ_TYPE_LEVEL_HIGH = 0x04
IRQ_TYPE_LEVEL_LOW = 0x08
IRQ_TYPE_ALL = 0x0F

IRQ_STATUS_INVALID = 0
IRQ_STATUS_VALID = 1

REQUEST = struct.Struct("<HHI")  # type, gpio, value
IRQ_REQUEST = struct.Struct("<H")  # gpio
CONFIG = struct.Struct("<HHI")  # ngpio, padding, gpio_names_size


class GpioError(Exception):
    """The request is answered with VIRTIO_GPIO_STATUS_ERR."""


@dataclass
class Line:
    name: str
    direction: int = DIRECTION_NONE
    value: int | None = None
    irq_type: int = IRQ_TYPE_NONE


@dataclass
class PendingIrq:
    head: int
    status: memoryview


class GpioChip:
    def __init__(self, names: list[str]) -> None:
        self.lines = [Line(n) for n in names]
        self.names_blob = b"".join(n.encode() + b"\0" for n in names)

    def config(self) -> bytes:
        return CONFIG.pack(len(self.lines), 0, len(self.names_blob))

    def line(self, gpio: int) -> Line:
        if gpio >= len(self.lines):
            raise GpioError(f"line {gpio} does not exist (chip has {len(self.lines)})")
        return self.lines[gpio]

    def operation(self, rtype: int, gpio: int, value: int) -> tuple[bytes, int | None]:
        """Result bytes after the status byte, and the old value when SET_VALUE changed it."""
        if rtype == MSG_GET_LINE_NAMES:
            return self.names_blob, None
        if rtype not in range(MSG_GET_DIRECTION, MSG_IRQ_TYPE + 1):
            raise GpioError(f"unknown request type {rtype}")
        line = self.line(gpio)
        if rtype == MSG_GET_DIRECTION:
            return bytes([line.direction]), None
        if rtype == MSG_SET_DIRECTION:
            if value == DIRECTION_NONE:
                line.value = None
            elif value == DIRECTION_OUT:
                if line.value is None:
                    raise GpioError(f"{line.name}: output direction before any value was set")
            elif value != DIRECTION_IN:
                raise GpioError(f"{line.name}: invalid direction {value}")
            line.direction = value
            return b"\0", None
        if rtype == MSG_GET_VALUE:
            if line.value is None:
                raise GpioError(f"{line.name}: no value yet")
            return bytes([line.value]), None
        if rtype == MSG_SET_VALUE:
            if value > 1:
                raise GpioError(f"{line.name}: invalid value {value}")
            old, line.value = line.value, value
            return b"\0", old
        # MSG_IRQ_TYPE
        if value & ~IRQ_TYPE_ALL:
            raise GpioError(f"{line.name}: invalid irq type {value:#x}")
        if value == line.irq_type:
            raise GpioError(f"{line.name}: irq type {value:#x} is already set")
        if line.irq_type != IRQ_TYPE_NONE and value != IRQ_TYPE_NONE:
            raise GpioError(f"{line.name}: set irq type NONE before changing it")
        line.irq_type = value
        return b"\0", None


def _fires(line: Line, old: int | None) -> bool:
    """Does the line's current state raise its interrupt (after a change from `old`)?"""
    new, t = line.value, line.irq_type
    if new is None:
        return False
    if (t & IRQ_TYPE_LEVEL_HIGH and new == 1) or (t & IRQ_TYPE_LEVEL_LOW and new == 0):
        return True
    if old is None or old == new:
        return False
    rising = bool(t & IRQ_TYPE_EDGE_RISING) and new == 1
    falling = bool(t & IRQ_TYPE_EDGE_FALLING) and new == 0
    return rising or falling


class GpioDevice(Device):
    name = "gpio"
    virtio_id = VIRTIO_ID_GPIO
    num_queues = NUM_QUEUES
    queue_size = QUEUE_SIZE
    device_features = 1 << F_IRQ
    # vhost-device-gpio: MQ | CONFIG | REPLY_ACK (the server adds XEN_MMAP, as a xen build does).
    protocol_features = p.bit(p.PF_MQ) | p.bit(p.PF_CONFIG) | p.bit(p.PF_REPLY_ACK)

    def __init__(self, chip: GpioChip) -> None:
        self.chip = chip
        self.pending: dict[int, PendingIrq] = {}

    def config(self) -> bytes:
        return self.chip.config()

    def connection_reset(self, server: Server) -> None:
        # Buffers of the old ring are gone with it; line state is the chip's and stays.
        self.pending.clear()

    def process(self, server: Server, vq: Virtqueue, chains: list[Chain | BadChain]) -> None:
        for c in chains:
            if isinstance(c, BadChain):
                server.reject(vq, c)
            elif vq.index == REQUEST_QUEUE:
                self._request(server, vq, c)
            else:
                self._irq_buffer(server, vq, c)

    @staticmethod
    def _shape(chain: Chain, req_size: int, resp_size: int | None) -> str | None:
        if chain.count != 2 or len(chain.readable) != 1 or len(chain.writable) != 1:
            return "expected one device-readable then one device-writable descriptor"
        if len(chain.readable[0]) != req_size:
            return f"request is {len(chain.readable[0])} bytes, expected {req_size}"
        n = len(chain.writable[0])
        if n == 0 or (resp_size is not None and n != resp_size):
            return f"response buffer of {n} bytes"
        return None

    def _request(self, server: Server, vq: Virtqueue, chain: Chain) -> None:
        bad = self._shape(chain, REQUEST.size, None)
        if bad:
            server.reject(vq, BadChain(chain.head, bad))
            return
        rtype, gpio, value = REQUEST.unpack(chain.readable[0])
        resp = chain.writable[0]
        old = None
        try:
            data, old = self.chip.operation(rtype, gpio, value)
            if len(data) != len(resp) - 1:
                raise GpioError(f"response of {len(data)} bytes for a {len(resp)}-byte buffer")
            out = bytes([STATUS_OK]) + data
        except GpioError as e:
            log.info("gpio request %d on line %d failed: %s", rtype, gpio, e)
            out = bytes([STATUS_ERR, 0])[: len(resp)]
        resp[: len(out)] = out
        server.complete(vq, chain.head, len(resp))
        if rtype == MSG_IRQ_TYPE and out[0] == STATUS_OK and value == IRQ_TYPE_NONE:
            self._finish_irq(server, gpio, IRQ_STATUS_INVALID)  # spec: return the buffer
        elif rtype == MSG_SET_VALUE and out[0] == STATUS_OK:
            self._maybe_fire(server, gpio, old)

    def _irq_buffer(self, server: Server, vq: Virtqueue, chain: Chain) -> None:
        bad = self._shape(chain, IRQ_REQUEST.size, 1)
        if bad:
            server.reject(vq, BadChain(chain.head, bad))
            return
        (gpio,) = IRQ_REQUEST.unpack(chain.readable[0])
        status = chain.writable[0]
        if (
            gpio >= len(self.chip.lines)
            or self.chip.lines[gpio].irq_type == IRQ_TYPE_NONE
            or gpio in self.pending
        ):
            status[0] = IRQ_STATUS_INVALID
            server.complete(vq, chain.head, 1)
            return
        self.pending[gpio] = PendingIrq(chain.head, status)
        line = self.chip.lines[gpio]
        if line.irq_type & (IRQ_TYPE_LEVEL_HIGH | IRQ_TYPE_LEVEL_LOW) and _fires(line, line.value):
            self._finish_irq(server, gpio, IRQ_STATUS_VALID, signal=False)

    def _maybe_fire(self, server: Server, gpio: int, old: int | None) -> None:
        if gpio in self.pending and _fires(self.chip.lines[gpio], old):
            self._finish_irq(server, gpio, IRQ_STATUS_VALID)

    def _finish_irq(self, server: Server, gpio: int, status: int, signal: bool = True) -> None:
        irq = self.pending.pop(gpio, None)
        if irq is None:
            return
        vq = server.queues[EVENT_QUEUE]
        irq.status[0] = status
        server.complete(vq, irq.head, 1)
        if signal:
            server.notify(vq)


def line_names(count: int, names: str | None) -> list[str]:
    if names is None:
        return [f"dummy{i}" for i in range(count)]
    out = names.split(",")
    if any("\0" in n for n in out):
        raise SystemExit("line names must not contain NUL")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.backends.gpio", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--lines", type=int, default=8, help="number of lines (default 8)")
    parser.add_argument("--names", help="comma-separated line names (overrides --lines)")
    args = parser.parse_args(argv)
    if not 1 <= args.lines <= 0xFFFF:
        parser.error("--lines must be 1..65535")
    return run(GpioDevice(GpioChip(line_names(args.lines, args.names))), args)


if __name__ == "__main__":
    raise SystemExit(main())
