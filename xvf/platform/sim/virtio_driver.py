"""The guest's virtio-mmio v2 driver (virtio 1.2 section 4.2.3), over any register transport.

Each `transport.read/write` is one trapped guest access: on the simulator the
hypervisor turns it into an ioreq for the device model. Initialisation follows
the spec's driver sequence (section 3.1.1): reset, ACKNOWLEDGE, DRIVER, feature
negotiation over both 32-bit words, FEATURES_OK and its read-back, queue
setup, DRIVER_OK. Like Linux, the driver refuses a device without
VIRTIO_F_VERSION_1, and, when its DMA goes through grants, one without
VIRTIO_F_ACCESS_PLATFORM.

Completions: wait for the interrupt line, read InterruptStatus, write
InterruptACK, drain the used ring; a timeout names the device and request,
since a backend drops malformed requests without answering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from xvf.errors import SimulatorError
from xvf.platform.sim.dma import DmaOps
from xvf.platform.sim.memory import GuestRam
from xvf.platform.sim.virtqueue import SplitVirtqueue
from xvf.protocols import virtio as R

log = logging.getLogger("xvf.platform.sim.driver")

DEFAULT_TIMEOUT = 5.0
_U32 = 0xFFFFFFFF


class MmioTransport(Protocol):
    """One guest vCPU's view of a device's MMIO window (offsets from its base)."""

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class DomainMmioTransport:
    """Register accesses by vCPU `vcpu` of a simulated domain (anything with
    `mmio(vcpu, addr, size, is_write, value) -> int`) at the window `base`."""

    def __init__(self, domain: object, base: int, vcpu: int = 0) -> None:
        self.domain = domain
        self.base = base
        self.vcpu = vcpu

    def read(self, offset: int, size: int) -> int:
        return self.domain.mmio(self.vcpu, self.base + offset, size, False)  # type: ignore[attr-defined]

    def write(self, offset: int, size: int, value: int) -> None:
        self.domain.mmio(self.vcpu, self.base + offset, size, True, value)  # type: ignore[attr-defined]


class NoDevice(SimulatorError):
    """Nothing virtio answers at this window, or the device refused initialisation."""


class VirtioMmioDevice:
    """A virtio-mmio v2 device as the guest driver sees it."""

    def __init__(
        self,
        transport: MmioTransport,
        ram: GuestRam,
        dma: DmaOps,
        *,
        wait_irq: Callable[[float], bool],
        name: str = "virtio-mmio",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.t = transport
        self.ram = ram
        self.dma = dma
        self.wait_irq = wait_irq
        self.name = name
        self.timeout = timeout
        self.device_id = 0
        self.vendor_id = 0
        self.device_features = 0
        self.features = 0  # negotiated
        self.queues: dict[int, SplitVirtqueue] = {}

    # -- registers -------------------------------------------------------------
    def _r(self, offset: int) -> int:
        return self.t.read(offset, 4) & _U32

    def _w(self, offset: int, value: int) -> None:
        self.t.write(offset, 4, value & _U32)

    def _w64(self, low_offset: int, value: int) -> None:
        self._w(low_offset, value & _U32)
        self._w(low_offset + 4, value >> 32)

    @property
    def status(self) -> int:
        return self._r(R.STATUS)

    def _add_status(self, bits: int) -> None:
        self._w(R.STATUS, self.status | bits)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- discovery and initialisation ---------------------------------------------
    def probe(self) -> int:
        """Identify the device; returns its device id."""
        magic = self._r(R.MAGIC_VALUE)
        if magic != R.MAGIC:
            raise NoDevice(f"{self.name}: bad magic {magic:#x}, not a virtio-mmio device")
        version = self._r(R.VERSION)
        if version != R.MMIO_VERSION_2:
            raise NoDevice(
                f"{self.name}: virtio-mmio version {version}, need 2 (legacy unsupported)"
            )
        self.device_id = self._r(R.DEVICE_ID)
        if self.device_id == 0:
            raise NoDevice(f"{self.name}: no device (DeviceID 0)")
        self.vendor_id = self._r(R.VENDOR_ID)
        return self.device_id

    def reset(self) -> None:
        """Write Status 0 and wait until the device reads back 0 (spec 4.2.3.1.1)."""
        self._w(R.STATUS, 0)
        deadline = time.monotonic() + self.timeout
        while self.status != 0:
            if time.monotonic() > deadline:
                raise SimulatorError(f"{self.name}: device did not complete its reset")
            time.sleep(0.001)
        for vq in self.queues.values():
            vq.close()
        self.queues.clear()
        self.features = 0

    def negotiate(self, wanted: int = 0) -> int:
        """Reset, ACKNOWLEDGE|DRIVER, agree on features, FEATURES_OK; returns the features."""
        self.reset()
        self._add_status(R.STATUS_ACKNOWLEDGE)
        self._add_status(R.STATUS_DRIVER)
        offered = 0
        for word in (0, 1):
            self._w(R.DEVICE_FEATURES_SEL, word)
            offered |= self._r(R.DEVICE_FEATURES) << (32 * word)
        self.device_features = offered
        ours = wanted | (1 << R.F_VERSION_1)
        if self.dma.uses_grants:
            ours |= 1 << R.F_ACCESS_PLATFORM
        accepted = offered & ours
        if not accepted >> R.F_VERSION_1 & 1:
            self._fail(f"device offers no VIRTIO_F_VERSION_1 (features {offered:#x})")
        if self.dma.uses_grants and not accepted >> R.F_ACCESS_PLATFORM & 1:
            # Linux virtio_features_ok(): grant DMA needs the device to honour the platform.
            self._fail(f"device must provide VIRTIO_F_ACCESS_PLATFORM (features {offered:#x})")
        for word in (0, 1):
            self._w(R.DRIVER_FEATURES_SEL, word)
            self._w(R.DRIVER_FEATURES, accepted >> (32 * word))
        self._add_status(R.STATUS_FEATURES_OK)
        if not self.status & R.STATUS_FEATURES_OK:
            self._fail(f"device refused features {accepted:#x}")
        self.features = accepted
        return accepted

    def _fail(self, why: str) -> None:
        self._add_status(R.STATUS_FAILED)
        raise NoDevice(f"{self.name}: {why}")

    def setup_queue(self, index: int, size: int) -> SplitVirtqueue:
        """Allocate and program queue `index` with at most `size` entries."""
        self._w(R.QUEUE_SEL, index)
        if self._r(R.QUEUE_READY):
            raise SimulatorError(f"{self.name}: queue {index} is already live")
        num_max = self._r(R.QUEUE_NUM_MAX)
        if num_max == 0:
            raise NoDevice(f"{self.name}: queue {index} does not exist")
        size = min(size, num_max)
        size = 1 << (size.bit_length() - 1)  # sizes are powers of two
        vq = SplitVirtqueue(
            self.ram,
            self.dma,
            size,
            index=index,
            event_idx=self.has_feature(R.F_EVENT_IDX),
            indirect=self.has_feature(R.F_INDIRECT_DESC),
        )
        self._w(R.QUEUE_NUM, size)
        self._w64(R.QUEUE_DESC_LOW, vq.desc_dma)
        self._w64(R.QUEUE_DRIVER_LOW, vq.avail_dma)
        self._w64(R.QUEUE_DEVICE_LOW, vq.used_dma)
        self._w(R.QUEUE_READY, 1)
        if self._r(R.QUEUE_READY) != 1:
            vq.close()
            raise SimulatorError(f"{self.name}: queue {index} did not become ready")
        self.queues[index] = vq
        return vq

    def driver_ok(self) -> None:
        self._add_status(R.STATUS_DRIVER_OK)
        st = self.status
        if st & R.STATUS_DEVICE_NEEDS_RESET or not st & R.STATUS_DRIVER_OK:
            raise SimulatorError(f"{self.name}: device failed at DRIVER_OK (status {st:#x})")

    def initialize(self, wanted: int, queue_sizes: list[int]) -> int:
        """The whole sequence; returns the negotiated features."""
        features = self.negotiate(wanted)
        try:
            for i, size in enumerate(queue_sizes):
                self.setup_queue(i, size)
            self.driver_ok()
        except Exception:
            self._add_status(R.STATUS_FAILED)
            raise
        return features

    def shutdown(self) -> None:
        """Reset the device and release the rings and anything still in flight."""
        try:
            self.reset()
        finally:
            for vq in self.queues.values():
                vq.close()
            self.queues.clear()

    # -- runtime ----------------------------------------------------------------
    def notify(self, queue: int) -> None:
        self._w(R.QUEUE_NOTIFY, queue)

    def kick(self, queue: int) -> bool:
        """Notify the device if the ring says it wants it; True if notified."""
        if self.queues[queue].kick_needed():
            self.notify(queue)
            return True
        return False

    def handle_interrupt(self) -> int:
        status = self._r(R.INTERRUPT_STATUS)
        if status:
            self._w(R.INTERRUPT_ACK, status)
        return status

    def read_config(self, offset: int, size: int) -> int:
        """A config field, consistent across ConfigGeneration (spec 4.2.3.1.1 / 2.5.1)."""
        if size not in (1, 2, 4, 8):
            raise SimulatorError(f"config read of size {size}")
        for _ in range(1000):
            gen = self._r(R.CONFIG_GENERATION)
            if size == 8:
                value = self.t.read(R.CONFIG + offset, 4) & _U32
                value |= (self.t.read(R.CONFIG + offset + 4, 4) & _U32) << 32
            else:
                value = self.t.read(R.CONFIG + offset, size) & ((1 << (8 * size)) - 1)
            if self._r(R.CONFIG_GENERATION) == gen:
                return value
        raise SimulatorError(f"{self.name}: config generation never settled")

    def read_config_bytes(self, offset: int, length: int) -> bytes:
        """A config byte range with natural-width accesses, one generation throughout."""
        for _ in range(1000):
            gen = self._r(R.CONFIG_GENERATION)
            out = bytearray()
            pos = offset
            while pos < offset + length:
                left = offset + length - pos
                width = 4 if left >= 4 and pos % 4 == 0 else 2 if left >= 2 and pos % 2 == 0 else 1
                out += (self.t.read(R.CONFIG + pos, width) & ((1 << (8 * width)) - 1)).to_bytes(
                    width, "little"
                )
                pos += width
            if self._r(R.CONFIG_GENERATION) == gen:
                return bytes(out)
        raise SimulatorError(f"{self.name}: config generation never settled")

    def wait_used(
        self, queue: int, what: str, timeout: float | None = None
    ) -> list[tuple[object, int]]:
        """Block until queue `queue` returns at least one buffer; [(token, written_len)]."""
        vq = self.queues[queue]
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            done = vq.get_used()
            if done:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimulatorError(
                    f"{self.name}: no completion for {what} on queue {queue} within {limit}s "
                    f"({vq.in_flight()} requests in flight, status {self.status:#x})"
                )
            if self.wait_irq(left):
                self.handle_interrupt()
