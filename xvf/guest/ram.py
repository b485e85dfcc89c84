"""A guest's RAM, foreign-mapped once for all of its devices.

Mapping a guest's whole RAM takes seconds on a slow host (2.5 s for 256 MiB under
TCG on the rig), so it is done by the first device that needs it, on that device's
backend worker, never on the service loop; the others wait for it or reuse it.
It is unmapped when the last device lets go: Xen cannot tear a domain down while
Dom0 still maps its pages, so every device gives it back before it answers Closed.
"""

from __future__ import annotations

import threading

from xvf.errors import XvfError
from xvf.platform.interface import GuestMemory, Platform


class GuestRam:
    """Reference-counted foreign mapping of one guest's RAM (any thread)."""

    def __init__(self, platform: Platform, domid: int) -> None:
        self.platform = platform
        self.domid = domid
        self._lock = threading.Lock()
        self._memory: GuestMemory | None = None
        self.users = 0

    def acquire(self) -> GuestMemory:
        """The mapping, made now if no device holds it; blocks while another maps it."""
        with self._lock:
            if self._memory is None:
                self._memory = self.platform.map_guest_memory(self.domid)
            self.users += 1
            return self._memory

    def release(self) -> None:
        """One user lets go; the last one unmaps."""
        with self._lock:
            if self.users == 0:
                return
            self.users -= 1
            memory = self._memory if self.users == 0 else None
            if memory is not None:
                self._memory = None
        if memory is not None:
            memory.close()

    @property
    def mapped(self) -> bool:
        return self._memory is not None

    @property
    def memory(self) -> GuestMemory:
        memory = self._memory
        if memory is None:
            raise XvfError(f"dom{self.domid}: guest RAM is not mapped")
        return memory
