"""privcmd irqfd of the simulated Dom0 kernel: an eventfd write asserts a guest SPI.

Linux 6.7+ lets a device model hand an eventfd and a set_irq_level dm_op to
privcmd; the kernel issues the dm_op whenever the eventfd is signalled, so a
backend's call reaches the guest without waking the device model.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable


class IrqfdWatcher:
    """One thread watching every registered eventfd."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sim-irqfd", daemon=True)
        self._thread.start()

    def add(self, fd: int, fire: Callable[[], None]) -> None:
        """Watch `fd` (now owned by the watcher) and call `fire` on each signal."""
        with self._lock:
            self._sel.register(fd, selectors.EVENT_READ, fire)
        os.write(self._wake_w, b"x")

    def remove(self, fd: int) -> None:
        with self._lock:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                return
        os.close(fd)

    def lend(self, fd: int) -> Callable[[], None]:
        """Stop watching `fd` without closing it (another process reads it now);
        returns what it fired, for take_back."""
        with self._lock:
            fire = self._sel.unregister(fd).data
        os.write(self._wake_w, b"x")
        return fire

    def take_back(self, fd: int, fire: Callable[[], None]) -> None:
        self.add(fd, fire)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(timeout=0.5):
                if key.data is None:
                    os.read(self._wake_r, 64)
                    continue
                try:
                    os.eventfd_read(key.fd)
                except (BlockingIOError, OSError):
                    continue
                key.data()

    def close(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                os.close(key.fd)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
