"""Guest drivers for the virtio devices xvf serves (blk, i2c, gpio), on VirtioMmioDevice."""

from __future__ import annotations

import threading

from xvf.errors import SimulatorError
from xvf.platform.sim.memory import GuestRam


class DeviceError(SimulatorError):
    """The device completed a request with an error status."""


class SlotPool:
    """Fixed-size slots for request headers and status bytes, carved from one
    guest allocation (what a kernel driver keeps in its per-request data)."""

    def __init__(self, ram: GuestRam, count: int, slot_size: int) -> None:
        self.ram = ram
        self.slot_size = slot_size
        self.base = ram.alloc(count * slot_size)
        self._free = list(range(count - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise SimulatorError("no free request slot: too many requests in flight")
            return self.base + self._free.pop() * self.slot_size

    def give(self, gpa: int) -> None:
        with self._lock:
            self._free.append((gpa - self.base) // self.slot_size)

    def close(self) -> None:
        self.ram.free(self.base)
