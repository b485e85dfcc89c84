"""The virtio-mmio v2 register file (virtio 1.2 section 4.2.2), slow registers.

The hot registers (QueueNotify, InterruptStatus, InterruptACK) are answered by
`xvf.hotpath._ioreq.MmioState` without entering Python; every other access lands in
`VirtioMmioRegisters.mmio_read/mmio_write`, which shares that state object.
What the register file cannot decide alone (features accepted, driver ready,
reset, config space) it asks its `DeviceModel`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from xvf.hotpath._ioreq import MmioState
from xvf.protocols import virtio as R
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.protocols.virtio_mmio")

U32 = 0xFFFFFFFF
# Each 64-bit ring address is two registers; bit 2 of the offset picks the half.
_QUEUE_ADDR_FIELDS = {
    R.QUEUE_DESC_LOW: "desc",
    R.QUEUE_DESC_HIGH: "desc",
    R.QUEUE_DRIVER_LOW: "driver",
    R.QUEUE_DRIVER_HIGH: "driver",
    R.QUEUE_DEVICE_LOW: "device",
    R.QUEUE_DEVICE_HIGH: "device",
}


@dataclass
class QueueRegisters:
    """What the driver programmed for one virtqueue."""

    num_max: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def clear(self) -> None:
        self.num = self.num_max
        self.ready = False
        self.desc = self.driver = self.device = 0


class DeviceModel(Protocol):
    """The device behind the registers (a vhost-user backend, in xvf)."""

    def features_ok(self, driver_features: int) -> bool: ...
    def driver_ok(self, queues: list[QueueRegisters], driver_features: int) -> None: ...
    def queue_ready(self, index: int, queue: QueueRegisters) -> None: ...
    def queue_reset(self, index: int) -> None: ...
    def device_reset(self) -> None: ...
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...


def _set_half(value: int, half: int, word: int) -> int:
    shift = 32 * half
    return (value & ~(U32 << shift)) | ((word & U32) << shift)


def _queue_addr_writer(offset: int) -> Callable[[VirtioMmioRegisters, int], None]:
    """The write handler of one half of a ring address register."""

    def write(regs: VirtioMmioRegisters, value: int) -> None:
        regs._w_queue_addr(offset, value)

    return write


class VirtioMmioRegisters:
    """Register semantics of one virtio-mmio device as the guest sees them."""

    def __init__(
        self,
        name: str,
        device_id: int,
        device_features: int,
        queue_sizes: list[int],
        model: DeviceModel,
        state: MmioState | None = None,
        vendor_id: int = R.VENDOR_XVF,
    ) -> None:
        if len(queue_sizes) > (state or MmioState()).max_queues:
            raise ValueError(f"{name}: {len(queue_sizes)} queues exceed the supported maximum")
        self.name = name
        self.device_id = device_id
        self.vendor_id = vendor_id
        self.device_features = device_features
        self.model = model
        self.state = state if state is not None else MmioState()
        self.state.handler = self
        self.state.num_queues = len(queue_sizes)
        self.queues = [QueueRegisters(num_max=n, num=n) for n in queue_sizes]
        self.config_generation = 0
        self.guest_errors = 0
        self._guest_log = RateLimitedLog(log, first=10)
        # a guest that retries a start that cannot work (rings outside its RAM) would
        # otherwise write a line per attempt
        self._start_failures = RateLimitedLog(log)
        self._reset_registers()

    # -- state helpers -------------------------------------------------
    def _reset_registers(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        for q in self.queues:
            q.clear()
        for i in range(len(self.queues)):
            self.state.set_kick_fd(i, -1)
        self.state.status = 0
        self.state.ack_interrupt(U32)

    @property
    def status(self) -> int:
        return self.state.status

    def _selected(self) -> QueueRegisters | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _guest_error(self, what: str, *args: object) -> None:
        # A guest doing nonsense is answered per spec and logged, never fatal.
        self.guest_errors += 1
        self._guest_log(logging.WARNING, "%s: guest " + what, self.name, *args)

    def needs_reset(self) -> None:
        """The device can no longer work (backend gone): tell the driver. A device
        just reset (status 0) must read 0; its next initialisation fails instead."""
        if self.state.status == 0:
            return
        self.state.status = self.state.status | R.STATUS_DEVICE_NEEDS_RESET
        self.config_changed()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & U32
        self.state.raise_interrupt(R.INT_CONFIG)

    # -- reads ---------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= R.CONFIG:
            if size not in (1, 2, 4, 8):
                self._guest_error("read config space with size %d", size)
                return 0
            return self.model.config_read(offset - R.CONFIG, size)
        if size != 4 or offset & 3:
            self._guest_error(
                "read register %#x with size %d (only aligned 32-bit allowed)", offset, size
            )
            return 0
        q = self._selected()
        if offset == R.MAGIC_VALUE:
            return R.MAGIC
        if offset == R.VERSION:
            return R.MMIO_VERSION_2
        if offset == R.DEVICE_ID:
            return self.device_id
        if offset == R.VENDOR_ID:
            return self.vendor_id
        if offset == R.DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.device_features >> (32 * sel)) & U32 if sel < 2 else 0
        if offset == R.QUEUE_NUM_MAX:
            return q.num_max if q else 0
        if offset == R.QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == R.INTERRUPT_STATUS:
            return self.state.int_status
        if offset == R.STATUS:
            return self.state.status
        if offset == R.CONFIG_GENERATION:
            return self.config_generation
        if offset in (R.SHM_LEN_LOW, R.SHM_LEN_HIGH, R.SHM_BASE_LOW, R.SHM_BASE_HIGH):
            return U32  # no shared memory regions: length and base read as -1
        if offset == R.QUEUE_RESET:
            return 0  # resets complete synchronously
        if offset in _QUEUE_ADDR_FIELDS or offset == R.QUEUE_NUM:
            if q is None:
                return 0
            return self._queue_field_read(q, offset)
        # Write-only registers and holes read as zero.
        if offset not in (
            R.DEVICE_FEATURES_SEL,
            R.DRIVER_FEATURES,
            R.DRIVER_FEATURES_SEL,
            R.QUEUE_SEL,
            R.QUEUE_NOTIFY,
            R.INTERRUPT_ACK,
            R.SHM_SEL,
        ):
            self._guest_error("read unknown register %#x", offset)
        return 0

    @staticmethod
    def _queue_field_read(q: QueueRegisters, offset: int) -> int:
        if offset == R.QUEUE_NUM:
            return q.num
        field = _QUEUE_ADDR_FIELDS[offset]
        value = getattr(q, field)
        return (value >> 32) & U32 if offset & 4 else value & U32

    # -- writes --------------------------------------------------------
    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset >= R.CONFIG:
            if size not in (1, 2, 4, 8):
                self._guest_error("wrote config space with size %d", size)
                return
            self.model.config_write(offset - R.CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            self._guest_error(
                "wrote register %#x with size %d (only aligned 32-bit allowed)", offset, size
            )
            return
        value &= U32
        handler = self._WRITES.get(offset)
        if handler is None:
            self._guest_error("wrote read-only or unknown register %#x", offset)
            return
        handler(self, value)

    def _w_device_features_sel(self, value: int) -> None:
        self.device_features_sel = value

    def _w_driver_features_sel(self, value: int) -> None:
        self.driver_features_sel = value

    def _w_driver_features(self, value: int) -> None:
        status = self.state.status
        if not status & R.STATUS_DRIVER or status & R.STATUS_FEATURES_OK:
            self._guest_error("wrote DriverFeatures in status %#x", status)
            return
        if self.driver_features_sel > 1:
            if value:
                self._guest_error("set features in word %d", self.driver_features_sel)
            return
        self.driver_features = _set_half(self.driver_features, self.driver_features_sel, value)

    def _w_queue_sel(self, value: int) -> None:
        self.queue_sel = value

    def _queue_for_setup(self, what: str) -> QueueRegisters | None:
        q = self._selected()
        if q is None:
            self._guest_error("wrote %s of non-existent queue %d", what, self.queue_sel)
            return None
        if q.ready:
            self._guest_error("wrote %s of live queue %d", what, self.queue_sel)
            return None
        return q

    def _w_queue_num(self, value: int) -> None:
        q = self._queue_for_setup("QueueNum")
        if q is not None:
            q.num = value

    def _w_queue_addr(self, offset: int, value: int) -> None:
        q = self._queue_for_setup(f"queue address register {offset:#x}")
        if q is None:
            return
        field = _QUEUE_ADDR_FIELDS[offset]
        setattr(q, field, _set_half(getattr(q, field), 1 if offset & 4 else 0, value))

    def _w_queue_ready(self, value: int) -> None:
        q = self._selected()
        if q is None:
            self._guest_error("wrote QueueReady of non-existent queue %d", self.queue_sel)
            return
        if value == 0:
            if q.ready:
                q.ready = False
                self.state.set_kick_fd(self.queue_sel, -1)
                self.model.queue_reset(self.queue_sel)
            return
        if q.ready:
            return
        if q.num == 0 or q.num > q.num_max or q.num & (q.num - 1):
            self._guest_error(
                "enabled queue %d with size %d (max %d, power of 2)",
                self.queue_sel,
                q.num,
                q.num_max,
            )
            return
        if not (q.desc and q.driver and q.device):
            self._guest_error("enabled queue %d without ring addresses", self.queue_sel)
            return
        q.ready = True
        if self.state.status & R.STATUS_DRIVER_OK:
            try:
                self.model.queue_ready(self.queue_sel, q)
            except Exception as exc:  # never a queue that reads ready and never works
                self._start_failures(
                    logging.ERROR,
                    "%s: starting queue %d failed: %s",
                    self.name,
                    self.queue_sel,
                    exc,
                )
                self.needs_reset()

    def _w_status(self, value: int) -> None:
        old = self.state.status
        if value == 0:
            self.model.device_reset()
            self._reset_registers()
            return
        if old & ~value & ~R.STATUS_DEVICE_NEEDS_RESET:
            self._guest_error("cleared status bits (%#x -> %#x) without a reset", old, value)
            return
        new_bits = value & ~old
        if new_bits & R.STATUS_FEATURES_OK:
            if not self._accept_features():
                value &= ~R.STATUS_FEATURES_OK
        if new_bits & R.STATUS_DRIVER_OK:
            if not value & R.STATUS_FEATURES_OK:
                self._guest_error("set DRIVER_OK before FEATURES_OK")
                return
            self.state.status = value | (old & R.STATUS_DEVICE_NEEDS_RESET)
            try:
                self.model.driver_ok(self.queues, self.driver_features)
            except Exception as exc:  # the backend failed to start: tell the driver
                self._start_failures(
                    logging.ERROR, "%s: starting the device failed: %s", self.name, exc
                )
                self.needs_reset()
            return
        if new_bits & R.STATUS_FAILED:
            log.info("%s: guest driver gave up on the device (FAILED)", self.name)
        self.state.status = value | (old & R.STATUS_DEVICE_NEEDS_RESET)

    def _accept_features(self) -> bool:
        extra = self.driver_features & ~self.device_features
        if extra:
            self._guest_error("accepted features %#x the device does not offer", extra)
            return False
        if not self.driver_features >> R.F_VERSION_1 & 1:
            self._guest_error("did not accept VIRTIO_F_VERSION_1 (required by virtio-mmio v2)")
            return False
        return self.model.features_ok(self.driver_features)

    def _w_shm_sel(self, value: int) -> None:
        self.shm_sel = value

    def _w_queue_reset(self, value: int) -> None:
        if value != 1:
            return
        if not self.driver_features >> R.F_RING_RESET & 1:
            self._guest_error("wrote QueueReset without VIRTIO_F_RING_RESET")
            return
        q = self._selected()
        if q is None:
            self._guest_error("reset non-existent queue %d", self.queue_sel)
            return
        self.state.set_kick_fd(self.queue_sel, -1)
        self.model.queue_reset(self.queue_sel)
        q.clear()

    _WRITES: dict[int, Callable[[VirtioMmioRegisters, int], None]] = {
        R.DEVICE_FEATURES_SEL: _w_device_features_sel,
        R.DRIVER_FEATURES: _w_driver_features,
        R.DRIVER_FEATURES_SEL: _w_driver_features_sel,
        R.QUEUE_SEL: _w_queue_sel,
        R.QUEUE_NUM: _w_queue_num,
        R.QUEUE_READY: _w_queue_ready,
        R.STATUS: _w_status,
        R.SHM_SEL: _w_shm_sel,
        R.QUEUE_RESET: _w_queue_reset,
        **{off: _queue_addr_writer(off) for off in _QUEUE_ADDR_FIELDS},
    }


class PlaceholderRegisters:
    """The window of a device xvf refused: a virtio-mmio device with DeviceID 0.

    virtio-mmio (spec 4.2.2) reserves DeviceID 0 for "no device here"; Linux's
    virtio_mmio_probe then skips the device (-ENODEV). Without any server claiming
    the window, the guest's probe would take a data abort (and Linux panics).
    """

    def __init__(self, label: str) -> None:
        self.label = label

    def mmio_read(self, offset: int, size: int) -> int:
        if offset == R.MAGIC_VALUE:
            return R.MAGIC
        if offset == R.VERSION:
            return R.MMIO_VERSION_2
        if offset == R.VENDOR_ID:
            return R.VENDOR_XVF
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Nothing to drive: a guest that writes here learns nothing and breaks nothing."""
