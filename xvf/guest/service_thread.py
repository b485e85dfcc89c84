"""A guest's own service thread: its event-channel handle, its ServiceLoop, the thread.

One guest's ioreqs then never wait for another guest's, nor for the daemon's Python
(xenstore, vhost-user replies, `xvf status`): the thread serves QueueNotify,
InterruptStatus, InterruptACK and the backends' calls without the GIL, and posts
every other register to the daemon's thread (IoreqServer.enable_posting), so all
Python still runs on that one thread and needs no locks of its own.
"""

from __future__ import annotations

import logging
import threading

from xvf.errors import XvfError
from xvf.hotpath._ioreq import ServiceLoop
from xvf.platform.interface import EventChannelHandle, Platform

log = logging.getLogger("xvf.guest.service_thread")

# How long stop() waits for the thread: it only has to finish the batch it is on.
JOIN_TIMEOUT_S = 5.0


class ServiceThread:
    """The loop serving one guest's vCPUs, on a thread of its own once `start()`ed."""

    def __init__(self, platform: Platform, label: str, poll_us: float = 0.0) -> None:
        self.label = label
        # A handle of its own: a notification is read only by the thread it is for.
        self.evtchn: EventChannelHandle = platform.open_event_channel()
        try:
            self.loop = ServiceLoop(self.evtchn.channel)
            self.loop.prepare_thread()
            self.loop.set_polling(poll_us)
            self._bind_wake_ports()
        except BaseException:
            self.evtchn.close()
            raise
        self._thread: threading.Thread | None = None
        self._closed = False

    def _bind_wake_ports(self) -> None:
        """A loopback channel on the thread's handle, so that while the guest's event
        channels are all it watches (the kernel carries the backends' interrupts) the
        thread waits in a read of the handle, as a plain C device model does, and is
        still woken to watch a new fd or to stop. Without one it waits in epoll_wait."""
        try:
            listen, send = self.evtchn.bind_loopback()
        except (OSError, XvfError) as e:
            log.warning("%s: no loopback event channel (%s): the service thread waits "
                        "in epoll_wait", self.label, e)  # fmt: skip
            return
        self.loop.set_wake_ports(listen, send)
        log.debug("%s: loopback event channel %d <- %d wakes the service thread",
                  self.label, listen, send)  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.loop.serve_forever, name=f"xvf {self.label} ioreqs", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the thread stopped serving on its own, or None."""
        if self.loop.evtchn_lost:
            return "its event channel is gone"
        if self.loop.thread_errno:
            return f"its epoll_wait failed (errno {self.loop.thread_errno})"
        if self._thread is not None and not self.alive and not self.loop.stopped:
            return "its thread ended"
        return None

    def stop(self) -> None:
        """Stop the thread: it finishes the batch it is on. Safe to call twice."""
        self.loop.stop_serving()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                raise XvfError(f"{self.label}: the service thread did not stop")
            self._thread = None
            log.info("%s: service thread stopped after %d wake-ups, %d of them reads of "
                     "the event channel", self.label, self.loop.wakeups,
                     self.loop.direct_waits)  # fmt: skip

    def close(self) -> None:
        """Close the event-channel handle (its ports unbound first), once stopped."""
        if self._thread is None and not self._closed:
            self._closed = True
            self.evtchn.close()
