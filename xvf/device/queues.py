"""xvf's side of one device's live queues: their kick and call eventfds, the relay
of a relayed queue, the kernel offload of a direct one.

A queue is live from the moment xvf has set it up for the backend (QueueReady or
DRIVER_OK) until its ring is stopped (reset) or the backend is gone. Stopping is
two steps: `quiesce` at once (nothing of it reaches the backend through xvf, nor
the guest), `close` when the backend has let go of it (fds closed, offload undone).
The daemon's thread only (a guest's own service thread reads the call fds, writes
the kick fds and runs the relays' kicks and calls, which the loop and MmioState hand
over under their locks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from xvf.device.offload import KernelOffload, new_eventfd
from xvf.hotpath._ioreq import MmioState, ServiceLoop
from xvf.protocols.grant_relay import GrantRelayQueue
from xvf.protocols.vhost_user import VhostUserFrontend
from xvf.protocols.virtio_mmio import QueueRegisters

Step = Callable[[VhostUserFrontend], object]  # one exchange with the backend, on the worker
# Builds a queue's relay from (backend kick fd, backend call fd, state, on_broken).
RelayFactory = Callable[[int, int, MmioState, Callable[[str], None]], GrantRelayQueue]


@dataclass(eq=False)
class LiveQueue:
    index: int
    kick_fd: int  # the backend's SET_VRING_KICK
    call_fd: int  # the backend's SET_VRING_CALL
    avail_gpa: int = 0  # the driver's ring (foreign mapping: xvf can read its indices)
    used_gpa: int = 0
    relay: GrantRelayQueue | None = None  # grant relay: the shadow-virtqueue relay
    ioeventfd: bool = False  # QueueNotify completed by the Dom0 kernel
    closed: bool = False


def start_ring(index: int, num: int, addrs: tuple[int, int, int], kick: int, call: int) -> Step:
    """The messages that hand a ring to the backend (values read now: the worker runs
    later, and a reset may clear the registers meanwhile). Kicks written before the
    backend has the ring wait in the eventfd."""

    def send(v: VhostUserFrontend) -> None:
        v.set_vring_num(index, num)
        v.set_vring_base(index, 0)
        v.set_vring_addr(index, *addrs)
        v.set_vring_kick(index, kick)
        v.set_vring_call(index, call)
        v.set_vring_enable(index, True)

    return send


class Queues:
    """The live queues of one device (index -> LiveQueue), and those a reset stopped
    that the backend has not let go of yet (`retiring`)."""

    def __init__(
        self,
        loop: ServiceLoop,
        state: MmioState,
        offload: KernelOffload,
        on_broken: Callable[[str], None],
        hot_loop: ServiceLoop | None = None,
    ) -> None:
        self.loop = loop  # the daemon's: what relays post for Python (logs, a broken ring)
        # The guest's (its own thread's, or the daemon's): backends' call fds, relays.
        self.hot_loop = hot_loop if hot_loop is not None else loop
        self.state = state
        self.offload = offload
        self.on_broken = on_broken  # a relayed ring the guest corrupted
        self.live: dict[int, LiveQueue] = {}
        self.retiring: set[LiveQueue] = set()
        self._relay_totals = [0, 0, 0]  # requests, bytes, bad requests of closed relays

    def __contains__(self, index: int) -> bool:
        return index in self.live

    def __len__(self) -> int:
        return len(self.live)

    def add_direct(self, index: int, q: QueueRegisters, addrs: tuple[int, int, int]) -> Step:
        """A queue whose rings the backend reaches itself: the guest's kicks go to it
        through xvf's hot path or the kernel, its calls come back likewise."""
        kick = new_eventfd()
        call = self.offload.call_fd()
        live = self.live[index] = LiveQueue(
            index, kick, call, avail_gpa=q.driver, used_gpa=q.device
        )
        if not self.offload.interrupts:
            self.hot_loop.add_call_fd(call, self.state)
        self.state.set_kick_fd(index, kick)
        live.ioeventfd = self.offload.assign_kick(index, kick)
        return start_ring(index, q.num, addrs, kick, call)

    def add_relayed(self, index: int, q: QueueRegisters, make_relay: RelayFactory) -> Step:
        """A queue relayed by xvf: the backend is kicked and calls on fds only xvf
        sees; the guest's kicks reach the relay, which forwards what it copied."""
        kick, call = new_eventfd(), new_eventfd()
        try:
            relay = make_relay(kick, call, self.state, self.on_broken)
        except Exception:
            os.close(kick)
            os.close(call)
            raise
        self.live[index] = LiveQueue(index, kick, call, relay=relay)
        self.offload.relay_interrupts()
        self.loop.add_reader(relay.notice_fd, relay.drain_notices)
        # Kicks and calls on the guest's thread, without the GIL: a busy relayed queue
        # costs its own guest's thread, never the daemon's.
        self.hot_loop.add_handler(call, relay)
        self.hot_loop.add_handler(relay.guest_kick_fd, relay)
        self.state.set_kick_fd(index, relay.guest_kick_fd)
        return start_ring(index, q.num, relay.vring_addrs, kick, call)

    def take(self, indices: list[int]) -> dict[int, LiveQueue]:
        """Stop these live queues at once and keep them as retiring until `close`."""
        stopping = {i: self.live.pop(i) for i in indices if i in self.live}
        for index, live in stopping.items():
            self.quiesce(index, live)
            self.retiring.add(live)
        return stopping

    def take_all(self) -> list[tuple[int, LiveQueue]]:
        """Every queue, live or retiring, quiesced: the backend is gone."""
        lives = [*self.live.items(), *((live.index, live) for live in self.retiring)]
        self.live.clear()
        for index, live in lives:
            self.quiesce(index, live)
        return lives

    def quiesce(self, index: int, live: LiveQueue) -> None:
        """No kick reaches the backend through xvf, no completion reaches the guest."""
        self.state.set_kick_fd(index, -1)
        if live.relay is not None:
            # Quiesced first: a pass of the guest's thread that took this queue off the
            # shadow's waiters before then holds the loop's lock, so the remove_fd
            # below waits for it; after that the thread never touches the queue.
            live.relay.quiesce()
            self.hot_loop.remove_fd(live.relay.guest_kick_fd)
        self.hot_loop.remove_fd(live.call_fd)
        if live.relay is not None:
            self.loop.remove_fd(live.relay.notice_fd)
            live.relay.drain_notices()  # its last logs

    def discard(self, index: int) -> None:
        """Undo a queue set up by a preparation that failed."""
        live = self.live.pop(index)
        self.quiesce(index, live)
        self.close(index, live)

    def close(self, index: int, live: LiveQueue) -> None:
        """Forget a quiesced queue (the backend has stopped it, or is gone)."""
        if live.closed:
            return
        live.closed = True
        self.retiring.discard(live)
        if live.relay is not None:
            live.relay.stop()
            for i, n in enumerate(live.relay.counters):
                self._relay_totals[i] += n
        if live.ioeventfd:
            self.offload.release_kick(index, live.kick_fd)
        os.close(live.kick_fd)
        os.close(live.call_fd)
        if not self.live and not self.retiring:
            self.offload.release_interrupts()

    def relay_counters(self) -> tuple[int, int, int]:
        """(requests, bytes, bad requests) through the relay, live queues included."""
        totals = list(self._relay_totals)
        for live in self.live.values():
            if live.relay is not None:
                for i, n in enumerate(live.relay.counters):
                    totals[i] += n
        return totals[0], totals[1], totals[2]
