"""Guests served on threads of their own (`--service-threads per-guest`, the default):
each guest's hot registers and backend calls are answered on its own thread without
the GIL, every other register on the daemon's thread. Driven on the software Xen."""

from __future__ import annotations

import os
import select
import threading

import pytest

from xvf.errors import XvfError
from xvf.guest.guest import Guest
from xvf.hotpath._ioreq import IoreqServer, MmioState, ServiceLoop
from xvf.platform.sim.platform import SimPlatform
from xvf.protocols import virtio as R

BASE = 0x2000000
SIZE = 0x200


class Scratch:
    """Registers that need Python; `hold` (if set) is waited on before each read."""

    def __init__(self) -> None:
        self.mem = bytearray(SIZE)
        self.hold: threading.Event | None = None
        self.held_until_set: list[bool] = []
        self.threads: set[str] = set()

    def mmio_read(self, off: int, size: int) -> int:
        self.threads.add(threading.current_thread().name)
        if self.hold is not None:
            self.held_until_set.append(self.hold.wait(20))
        return int.from_bytes(self.mem[off : off + size], "little")

    def mmio_write(self, off: int, size: int, value: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.mem[off : off + size] = value.to_bytes(size, "little")


class Daemon:
    """The daemon's side: its loop on a thread (as Frontend.run), guests on their own."""

    def __init__(self, hypervisor) -> None:
        self.plat = SimPlatform(hypervisor.run_dir)
        self.evtchn = self.plat.open_event_channel()
        self.loop = ServiceLoop(self.evtchn.channel)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=lambda: [self.loop.run_once(50) for _ in iter(self.stop.is_set, True)],
            name="daemon",
        )
        self.guests: list[Guest] = []

    def guest(
        self, dom, own_thread: bool = True, poll_us: float = 0.0
    ) -> tuple[Guest, MmioState, Scratch]:
        guest = Guest(
            dom.domid, self.plat, self.loop, self.evtchn, own_thread=own_thread, poll_us=poll_us
        )
        guest.start()
        self.guests.append(guest)
        state = MmioState()
        state.handler = scratch = Scratch()
        state.status = R.STATUS_DRIVER_OK
        guest.attach(BASE, SIZE, state)
        return guest, state, scratch

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        for guest in self.guests:
            guest.stop()
        self.evtchn.close()
        self.plat.close()


@pytest.fixture
def daemon(hypervisor):
    d = Daemon(hypervisor)
    yield d
    d.close()


def test_hot_registers_on_the_guests_thread_the_rest_on_the_daemons(hypervisor, daemon):
    dom = hypervisor.create_domain("own", memory_mib=4, vcpus=2)
    guest, state, scratch = daemon.guest(dom)
    daemon.thread.start()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        state.set_kick_fd(0, kick)
        for i in range(20):
            dom.mmio(i % 2, BASE + 0x100, 4, True, i)  # a register that needs Python
            assert dom.mmio(i % 2, BASE + 0x100, 4, False) == i
            dom.mmio(i % 2, BASE + R.QUEUE_NOTIFY, 4, True, 0)
        assert os.eventfd_read(kick) == 20  # every notify reached the backend's fd
        state.raise_interrupt(R.INT_VRING)
        assert dom.mmio(0, BASE + R.INTERRUPT_STATUS, 4, False) == R.INT_VRING
        dom.mmio(1, BASE + R.INTERRUPT_ACK, 4, True, R.INT_VRING)
        assert state.int_status == 0  # acknowledged on the guest's thread
    finally:
        state.set_kick_fd(0, -1)
        os.close(kick)
    assert scratch.threads == {"daemon"}  # all Python ran on the daemon's thread
    assert (state.notifies, state.slow_accesses, state.hot_accesses) == (20, 40, 22)
    assert guest.ioreq is not None and guest.ioreq.requests == 62
    assert guest.loop is not daemon.loop and guest.loop.own_thread
    assert guest.failure is None


def test_a_spin_of_a_guests_thread_counts_the_accesses_it_hands_to_the_daemon(hypervisor, daemon):
    """`polled` counts what the spins found, also the registers that the daemon's thread
    then answers (as the single loop counts its slow ones): a 200 ms spin after each
    access finds the next of 20 back-to-back accesses to a Python register."""
    dom = hypervisor.create_domain("spin", memory_mib=4, vcpus=1)
    guest, _, scratch = daemon.guest(dom, poll_us=200_000)
    daemon.thread.start()
    for i in range(20):
        dom.mmio(0, BASE + 0x100, 4, True, i)
    assert scratch.threads == {"daemon"}
    assert guest.loop.polled > 0


def test_a_guest_is_served_while_the_daemons_thread_is_stuck_in_another_guests_register(
    hypervisor, daemon
):
    """Guest A's register handler blocks the daemon's thread until guest B has made
    100 hot accesses; with both guests on the daemon's thread B would wait for A."""
    dom_a = hypervisor.create_domain("stuck", memory_mib=4, vcpus=1)
    dom_b = hypervisor.create_domain("runs", memory_mib=4, vcpus=1)
    _, _, scratch_a = daemon.guest(dom_a)
    _, state_b, _ = daemon.guest(dom_b)
    daemon.thread.start()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    state_b.set_kick_fd(0, kick)
    released = threading.Event()
    scratch_a.hold = released
    a = threading.Thread(target=lambda: dom_a.mmio(0, BASE + 0x100, 4, False))
    a.start()
    try:
        while not scratch_a.held_until_set and a.is_alive() and not scratch_a.threads:
            threading.Event().wait(0.01)  # until A's read is in its handler
        for _ in range(100):
            dom_b.mmio(0, BASE + R.QUEUE_NOTIFY, 4, True, 0)
            dom_b.mmio(0, BASE + R.INTERRUPT_STATUS, 4, False)
        released.set()
    finally:
        released.set()
        a.join()
        state_b.set_kick_fd(0, -1)
    assert os.eventfd_read(kick) == 100
    os.close(kick)
    # A's handler was released by B's progress, not by its 20 s timeout.
    assert scratch_a.held_until_set == [True]


def test_a_replaced_kick_fd_is_never_written_once_set_kick_fd_returned(hypervisor, daemon):
    """The guest's thread notifies while the daemon's replaces the fd and closes the old
    one: a write into a closed fd's number, reused meanwhile, would corrupt that file."""
    dom = hypervisor.create_domain("kicks", memory_mib=4, vcpus=1)
    _, state, _ = daemon.guest(dom)
    daemon.thread.start()
    stop = threading.Event()
    notifies = threading.Thread(
        target=lambda: [
            dom.mmio(0, BASE + R.QUEUE_NOTIFY, 4, True, 0) for _ in iter(stop.is_set, True)
        ]
    )
    notifies.start()
    strays = 0
    try:
        for _ in range(200):
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            state.set_kick_fd(0, kick)
            select.select([kick], [], [], 5)  # notifies reach it: one may be in flight now
            state.set_kick_fd(0, -1)
            os.close(kick)
            r, w = os.pipe()  # likely the closed eventfd's number
            os.set_blocking(r, False)
            try:
                strays += len(os.read(r, 64))
            except BlockingIOError:
                pass
            os.close(r)
            os.close(w)
    finally:
        stop.set()
        notifies.join()
    assert strays == 0
    assert state.notifies >= 200  # each fd was notified before it was replaced


def test_stopping_answers_an_access_posted_to_the_daemon_and_not_yet_served(hypervisor):
    """A register posted by the guest's thread is answered when the guest stops, even
    if the daemon's loop never ran to serve it: no vCPU is left waiting."""
    dom = hypervisor.create_domain("posted", memory_mib=4, vcpus=1)
    d = Daemon(hypervisor)
    try:
        guest, _, scratch = d.guest(dom)
        scratch.mem[0x100:0x104] = (7).to_bytes(4, "little")
        result: list[int] = []
        reader = threading.Thread(target=lambda: result.append(dom.mmio(0, BASE + 0x100, 4, False)))
        reader.start()
        while guest.ioreq is not None and guest.ioreq.requests == 0:
            threading.Event().wait(0.01)  # claimed and posted by the guest's thread
        guest.stop()  # the daemon's loop never ran: stop serves what was posted
        reader.join(10)
        assert not reader.is_alive()
        assert result == [7]
    finally:
        d.close()


def test_a_loop_on_its_own_thread_refuses_python_callbacks_and_unposted_servers(hypervisor):
    plat = SimPlatform(hypervisor.run_dir)
    evtchn = plat.open_event_channel()
    try:
        loop = ServiceLoop(evtchn.channel)
        loop.prepare_thread()
        r, w = os.pipe()
        with pytest.raises(XvfError, match="no Python callbacks"):
            loop.add_reader(r, lambda: None)
        os.close(r)
        os.close(w)
        page = bytearray(4096)
        with pytest.raises(XvfError, match="servers that post"):
            loop.add_route(5, IoreqServer(page, 1), 0)
        with pytest.raises(XvfError, match="own thread"):
            loop.run_once(0)
    finally:
        evtchn.close()
        plat.close()


def test_a_guest_thread_with_nothing_else_to_watch_waits_in_a_read_of_its_channel(
    hypervisor, daemon
):
    """With no backend call fd to watch (the kernel's irqfd carries the interrupts) the
    guest's thread waits by reading its event channel, as a plain C device model does:
    one syscall per access fewer than epoll_wait and then read. A call fd added while it
    is blocked there wakes it (its loopback channel), and it then waits in epoll_wait
    and serves the call; without the fd it reads again, and it stops from the read."""
    dom = hypervisor.create_domain("reads", memory_mib=4, vcpus=1)
    guest, state, _ = daemon.guest(dom)
    daemon.thread.start()
    loop = guest.loop
    assert loop.waits_on_channel
    for _ in range(50):
        dom.mmio(0, BASE + R.QUEUE_NOTIFY, 4, True, 0)
    assert loop.direct_waits >= 50
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        loop.add_call_fd(call, state)
        assert not loop.waits_on_channel
        waits = loop.direct_waits
        os.eventfd_write(call, 1)  # no guest access meanwhile: only the poke woke it
        deadline = threading.Event()
        for _ in range(500):
            if state.int_status & R.INT_VRING:
                break
            deadline.wait(0.01)
        assert state.int_status & R.INT_VRING
        assert dom.mmio(0, BASE + R.INTERRUPT_STATUS, 4, False) == R.INT_VRING
        dom.mmio(0, BASE + R.INTERRUPT_ACK, 4, True, R.INT_VRING)
        assert loop.direct_waits == waits + 1  # the poke's read; then epoll_wait
    finally:
        loop.remove_fd(call)
        os.close(call)
    assert loop.waits_on_channel
    dom.mmio(0, BASE + R.QUEUE_NOTIFY, 4, True, 0)  # wakes it from epoll_wait
    waits = loop.direct_waits
    for _ in range(10):
        dom.mmio(0, BASE + R.QUEUE_NOTIFY, 4, True, 0)
    assert loop.direct_waits >= waits + 10
    guest.stop()  # raises if the thread, blocked in its read, is not woken
    assert guest.failure is None
