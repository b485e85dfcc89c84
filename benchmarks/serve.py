"""A responder process around xvf's service loop (`--impl cython`: xvf.hotpath._ioreq,
`--impl python`: xvf.hotpath.ioreq_reference), on pages and fds inherited from the benchmark.

Ports follow benchmarks/c/requester.c: port t+1 is vCPU t % vpd of device t // vpd.
Prints "ready" once serving; runs until killed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys

from xvf.hotpath import _ioreq
from xvf.hotpath import ioreq_reference as _ioreq_py
from xvf.hotpath._layout import PAGE_SIZE
from xvf.platform.sim import hotpath_reference as _sim_py
from xvf.platform.sim._hotpath import SimEventChannel, SimIrqLine

BASE = 0x2000000
WINDOW = 0x200
DRIVER_OK = 4


class NoRegisters:
    """The slow registers: the benchmarks only touch hot ones."""

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["cython", "python"], required=True)
    p.add_argument("--page-fd", type=int, required=True)
    p.add_argument("--evtchn-fd", type=int, required=True)
    p.add_argument("--ndev", type=int, default=1)
    p.add_argument("--vpd", type=int, default=1)
    p.add_argument("--kick-fd", type=int, default=-1)
    p.add_argument("--call-fd", type=int, default=-1)
    p.add_argument("--irq-fd", type=int, default=-1)
    p.add_argument("--poll-us", type=float, default=0.0, help="as xvf's --poll-us")
    a = p.parse_args(argv)
    mod = _ioreq if a.impl == "cython" else _ioreq_py
    irq_line = SimIrqLine if a.impl == "cython" else _sim_py.SimIrqLine
    os.set_blocking(a.evtchn_fd, False)
    chan = SimEventChannel(a.evtchn_fd)
    loop = mod.ServiceLoop(chan)
    loop.set_polling(a.poll_us)
    maps = []
    for dev in range(a.ndev):
        page = mmap.mmap(a.page_fd, PAGE_SIZE, offset=dev * PAGE_SIZE)
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
        for v in range(a.vpd):
            loop.add_route(dev * a.vpd + v + 1, server, v)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        loop.run_once(-1)


if __name__ == "__main__":
    sys.exit(main())
