"""A responder process around xvf's service loop (`--impl cython`: xvf.hotpath._ioreq,
`--impl python`: xvf.hotpath.ioreq_reference), on pages and fds inherited from the benchmark.

Ports follow benchmarks/c/requester.c: port t+1 is vCPU t % vpd of device t // vpd.
With `--threads per-guest` each (--page-fd, --evtchn-fd) pair is a guest of its own,
served on its own GIL-free thread as the daemon's default does (xvf.guest.service_thread);
otherwise one loop on the main thread serves the first pair, as `--service-threads one`.
Prints "ready" once serving; runs until killed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import sys
import threading

from xvf.hotpath import _ioreq
from xvf.hotpath import ioreq_reference as _ioreq_py
from xvf.hotpath._layout import PAGE_SIZE
from xvf.platform.sim import hotpath_reference as _sim_py
from xvf.platform.sim._hotpath import SimEventChannel, SimIrqLine

BASE = 0x2000000
WINDOW = 0x200
DRIVER_OK = 4
WAKE_LISTEN, WAKE_SEND = 0xFFF0, 0xFFF1  # no vCPU's port (those are 1..ndev*vpd)


class NoRegisters:
    """The slow registers: the benchmarks only touch hot ones."""

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["cython", "python"], required=True)
    p.add_argument("--page-fd", type=int, action="append", required=True)
    p.add_argument("--evtchn-fd", type=int, action="append", required=True)
    p.add_argument("--threads", choices=["one", "per-guest"], default="one")
    p.add_argument("--ndev", type=int, default=1)
    p.add_argument("--vpd", type=int, default=1)
    p.add_argument("--kick-fd", type=int, default=-1)
    p.add_argument("--call-fd", type=int, default=-1)
    p.add_argument("--irq-fd", type=int, default=-1)
    p.add_argument("--poll-us", type=float, default=0.0, help="as xvf's --poll-us")
    p.add_argument(
        "--wait",
        choices=["read", "epoll"],
        default="read",
        help="per-guest threads: wait in a read of the channel when it is all there is "
        "to watch (the daemon's default, its loopback wake ports), or always in epoll_wait",
    )
    a = p.parse_args(argv)
    mod = _ioreq if a.impl == "cython" else _ioreq_py
    irq_line = SimIrqLine if a.impl == "cython" else _sim_py.SimIrqLine
    threaded = a.threads == "per-guest"
    if threaded and a.impl != "cython":
        p.error("--threads per-guest needs --impl cython")
    if len(a.page_fd) != len(a.evtchn_fd):
        p.error("one --page-fd per --evtchn-fd")
    loops, servers, maps = [], [], []
    for page_fd, evtchn_fd in zip(a.page_fd, a.evtchn_fd, strict=True):
        os.set_blocking(evtchn_fd, False)
        loop = mod.ServiceLoop(SimEventChannel(evtchn_fd))
        if threaded:
            loop.prepare_thread()
            if a.wait == "read":
                # The requester plays no loopback channel (it ignores notifies of ports
                # it does not serve): nothing changes this loop once it runs, and it is
                # killed, not stopped, so nothing ever needs to wake its read.
                loop.set_wake_ports(WAKE_LISTEN, WAKE_SEND)
        loop.set_polling(a.poll_us)
        for dev in range(a.ndev):
            page = mmap.mmap(page_fd, PAGE_SIZE, offset=dev * PAGE_SIZE)
            maps.append(page)
            state = mod.MmioState()
            state.handler = NoRegisters()
            state.status = DRIVER_OK
            state.int_status = 1  # what the requester expects an InterruptStatus read to return
            if a.kick_fd >= 0:
                state.set_kick_fd(0, a.kick_fd)
            if a.irq_fd >= 0:
                state.int_status = 0
                state.irq = irq_line(a.irq_fd, 1, 40)
            if a.call_fd >= 0:
                loop.add_call_fd(a.call_fd, state)
            server = mod.IoreqServer(page, a.vpd, BASE, WINDOW, state)
            if threaded:
                server.enable_posting()
            servers.append(server)
            for v in range(a.vpd):
                loop.add_route(dev * a.vpd + v + 1, server, v)
        loops.append(loop)
        if not threaded:
            break  # one loop, one event channel: the first guest's
    if threaded:
        for loop in loops:
            threading.Thread(target=loop.serve_forever, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not threaded:
        while True:
            loops[0].run_once(-1)
    # The daemon's thread: what the service threads post (nothing here: every register
    # the requester touches is a hot one, but it is served as the daemon would).
    posted = {s.enable_posting(): s for s in servers}
    while True:
        for fd in select.select(list(posted), [], [])[0]:
            posted[fd].serve_posted()


if __name__ == "__main__":
    sys.exit(main())
