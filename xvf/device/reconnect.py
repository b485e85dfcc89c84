"""When to try a lost backend again.

The guest was told DEVICE_NEEDS_RESET when its backend left; once the backend's
socket is back, the device reconnects and the guest's reset and re-initialisation
run against the new connection. A socket that is there but refuses us is retried
with a growing delay, so a backend stuck in a crash loop costs little.
"""

from __future__ import annotations

import os
import time

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0


class Reconnect:
    """The retry schedule of one device's backend connection."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.connecting = False  # a handshake is on the worker
        self.delay = 0.0
        self._next = 0.0

    def due(self, now: float) -> bool:
        """Whether to start a handshake now (and mark it started)."""
        if self.connecting or now < self._next or not os.path.exists(self.socket_path):
            return False
        self.connecting = True
        return True

    def failed(self) -> float:
        """The handshake failed: the delay before the next try."""
        self.connecting = False
        self.delay = min(MAX_DELAY_S, max(FIRST_DELAY_S, 2 * self.delay))
        self._next = time.monotonic() + self.delay
        return self.delay

    def succeeded(self) -> None:
        self.connecting = False
        self.delay = 0.0

    def abandoned(self) -> None:
        """The device stopped while a handshake was out."""
        self.connecting = False
