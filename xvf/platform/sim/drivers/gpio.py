"""virtio-gpio guest driver (virtio 1.2 section 5.17), device id 41 (0x29).

Config: `{le16 ngpio, u8 padding[2], le32 gpio_names_size}`. The requestq
carries `{le16 type, le16 gpio, le32 value}` and gets back `{u8 status, u8 value}`
(GET_NAMES gets `{u8 status, u8 names[gpio_names_size]}`). With VIRTIO_GPIO_F_IRQ,
queue 1 is the eventq: the driver queues `{le16 gpio}` / `{u8 status}` pairs
that the device returns when the line's interrupt fires.
"""

from __future__ import annotations

import struct

from xvf.errors import SimulatorError
from xvf.platform.sim.drivers import DeviceError
from xvf.platform.sim.virtio_driver import VirtioMmioDevice

VIRTIO_ID_GPIO = 41
VIRTIO_GPIO_F_IRQ = 0

VIRTIO_GPIO_MSG_GET_NAMES = 1
VIRTIO_GPIO_MSG_GET_DIRECTION = 2
VIRTIO_GPIO_MSG_SET_DIRECTION = 3
VIRTIO_GPIO_MSG_GET_VALUE = 4
VIRTIO_GPIO_MSG_SET_VALUE = 5
VIRTIO_GPIO_MSG_IRQ_TYPE = 6

VIRTIO_GPIO_STATUS_OK = 0
VIRTIO_GPIO_STATUS_ERR = 1

VIRTIO_GPIO_DIRECTION_NONE = 0
VIRTIO_GPIO_DIRECTION_OUT = 1
VIRTIO_GPIO_DIRECTION_IN = 2

VIRTIO_GPIO_IRQ_TYPE_NONE = 0
VIRTIO_GPIO_IRQ_TYPE_EDGE_RISING = 1
VIRTIO_GPIO_IRQ_TYPE_EDGE_FALLING = 2
VIRTIO_GPIO_IRQ_TYPE_EDGE_BOTH = 3
VIRTIO_GPIO_IRQ_TYPE_LEVEL_HIGH = 4
VIRTIO_GPIO_IRQ_TYPE_LEVEL_LOW = 8

VIRTIO_GPIO_IRQ_STATUS_INVALID = 0
VIRTIO_GPIO_IRQ_STATUS_VALID = 1

CFG_NGPIO = 0
CFG_NAMES_SIZE = 4
GPIO_REQUEST = struct.Struct("<HHI")
_RESP_OFF = 8
_UNSET = 0xFF
_MSG_NAMES = {1: "GET_NAMES", 2: "GET_DIRECTION", 3: "SET_DIRECTION", 4: "GET_VALUE",
              5: "SET_VALUE", 6: "SET_IRQ_TYPE"}  # fmt: skip


class VirtioGpio:
    """Driver of one virtio-gpio controller."""

    def __init__(self, dev: VirtioMmioDevice, *, queue_size: int = 64, irq: bool = True) -> None:
        self.dev = dev
        self.ram = dev.ram
        self.queue_size = queue_size
        self._want_irq = irq
        self.ngpio = 0
        self.names_size = 0
        self.has_irq = False
        self._seq = 0
        self._irq_bufs: dict[int, int] = {}  # gpio -> scratch gpa of its queued irq request

    def start(self) -> None:
        if self.dev.probe() != VIRTIO_ID_GPIO:
            raise SimulatorError(f"{self.dev.name}: device id {self.dev.device_id} is not gpio")
        self.dev.negotiate((1 << VIRTIO_GPIO_F_IRQ) if self._want_irq else 0)
        self.has_irq = self.dev.has_feature(VIRTIO_GPIO_F_IRQ)
        self.dev.setup_queue(0, self.queue_size)
        if self.has_irq:
            self.dev.setup_queue(1, self.queue_size)
        self.dev.driver_ok()
        self.ngpio = self.dev.read_config(CFG_NGPIO, 2)
        self.names_size = self.dev.read_config(CFG_NAMES_SIZE, 4)

    def close(self) -> None:
        self.dev.shutdown()
        for gpa in self._irq_bufs.values():
            self.ram.free(gpa)
        self._irq_bufs.clear()

    # -- requestq ---------------------------------------------------------------
    def _request(self, type_: int, gpio: int, value: int = 0, resp_len: int = 2) -> bytes:
        if type_ != VIRTIO_GPIO_MSG_GET_NAMES and not 0 <= gpio < self.ngpio:
            raise SimulatorError(f"{self.dev.name}: no GPIO line {gpio} (ngpio {self.ngpio})")
        req = self.ram.alloc(_RESP_OFF + resp_len)
        view = self.ram.view(req, _RESP_OFF + resp_len)
        GPIO_REQUEST.pack_into(view, 0, type_, gpio, value)
        view[_RESP_OFF] = _UNSET
        self._seq += 1
        token = ("gpio", self._seq)
        self.dev.queues[0].add([(req, GPIO_REQUEST.size)], [(req + _RESP_OFF, resp_len)], token)
        self.dev.kick(0)
        what = f"{_MSG_NAMES.get(type_, type_)} of line {gpio}"
        while True:
            done = self.dev.wait_used(0, what)
            if any(t == token for t, _ in done):
                break
        resp = self.ram.read(req + _RESP_OFF, resp_len)
        self.ram.free(req)
        if resp[0] != VIRTIO_GPIO_STATUS_OK:
            raise DeviceError(f"{self.dev.name}: {what} failed with status {resp[0]}")
        return resp[1:]

    def get_names(self) -> list[str]:
        """Line names ("" for unnamed lines); empty when the device has none."""
        if self.names_size == 0:
            return []
        raw = self._request(VIRTIO_GPIO_MSG_GET_NAMES, 0, 0, 1 + self.names_size)
        names = raw.split(b"\0")[: self.ngpio]
        return [n.decode("utf-8", "replace") for n in names]

    def get_direction(self, gpio: int) -> int:
        return self._request(VIRTIO_GPIO_MSG_GET_DIRECTION, gpio)[0]

    def set_direction(self, gpio: int, direction: int, value: int | None = None) -> None:
        """Set direction; for outputs, like Linux, the value is set first."""
        if direction == VIRTIO_GPIO_DIRECTION_OUT and value is not None:
            self.set_value(gpio, value)
        self._request(VIRTIO_GPIO_MSG_SET_DIRECTION, gpio, direction)

    def get_value(self, gpio: int) -> int:
        return self._request(VIRTIO_GPIO_MSG_GET_VALUE, gpio)[0]

    def set_value(self, gpio: int, value: int) -> None:
        self._request(VIRTIO_GPIO_MSG_SET_VALUE, gpio, 1 if value else 0)

    def set_irq_type(self, gpio: int, irq_type: int) -> None:
        if not self.has_irq:
            raise SimulatorError(f"{self.dev.name}: no VIRTIO_GPIO_F_IRQ negotiated")
        self._request(VIRTIO_GPIO_MSG_IRQ_TYPE, gpio, irq_type)

    # -- eventq -------------------------------------------------------------------
    def arm_irq(self, gpio: int) -> None:
        """Queue an interrupt request for `gpio` (after set_irq_type), as Linux unmask does."""
        if not self.has_irq:
            raise SimulatorError(f"{self.dev.name}: no VIRTIO_GPIO_F_IRQ negotiated")
        if gpio in self._irq_bufs:
            return
        buf = self.ram.alloc(4)
        view = self.ram.view(buf, 4)
        view[0:2] = gpio.to_bytes(2, "little")
        view[2] = _UNSET
        self.dev.queues[1].add([(buf, 2)], [(buf + 2, 1)], ("irq", gpio))
        self._irq_bufs[gpio] = buf
        self.dev.kick(1)

    def wait_irq_events(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Block until the device returns interrupt requests: [(gpio, status)];
        VALID means the line fired, INVALID that the request was cancelled."""
        events = []
        for token, _written in self.dev.wait_used(1, "gpio interrupt", timeout):
            gpio = token[1]  # type: ignore[index]
            buf = self._irq_bufs.pop(gpio)
            events.append((gpio, self.ram.view(buf + 2, 1)[0]))
            self.ram.free(buf)
        return events
