"""Reference virtio-console vhost-user backend with MULTIPORT: four queues.

Queues: 0 port 0 receive, 1 port 0 transmit, 2 control receive, 3 control transmit
(virtio spec 5.3.2). What the guest transmits on port 0 comes back on its receive queue,
like a tty in loopback, so bytes can be checked end to end; control messages from the
driver are taken and completed, none are sent. It exists so that a device with four queues
is proved end to end: in grant mode a Xen-aware backend is given each ring in advance,
which for four queues takes more regions than SET_MEM_TABLE carries (CONFIGURE_MEM_SLOTS).

Run: python -m tests.backends.console --socket-path PATH
"""

from __future__ import annotations

import argparse
import struct
from collections import deque

from . import protocol as p
from .vhost_user_backend import Device, Server, add_common_args, run
from .virtqueue import BadChain, Chain, Virtqueue

VIRTIO_ID_CONSOLE = 3
F_MULTIPORT = 1
QUEUE_SIZE = 128  # what xvf's device table gives console (QEMU's vhost-user model)
PORT0_RX, PORT0_TX, CONTROL_RX, CONTROL_TX = range(4)
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr


class ConsoleDevice(Device):
    name = "console"
    virtio_id = VIRTIO_ID_CONSOLE
    num_queues = 4
    queue_size = QUEUE_SIZE
    device_features = 1 << F_MULTIPORT
    # CONFIGURE_MEM_SLOTS as libvhost-user and rust-vmm's virtiofsd offer it: more regions
    # than SET_MEM_TABLE's 8, added and removed one by one.
    protocol_features = (
        p.bit(p.PF_MQ)
        | p.bit(p.PF_CONFIG)
        | p.bit(p.PF_REPLY_ACK)
        | p.bit(p.PF_CONFIGURE_MEM_SLOTS)
    )

    def __init__(self) -> None:
        self.rx: deque[Chain] = deque()  # port 0 receive buffers the guest gave
        self.control_rx: deque[Chain] = deque()  # kept: this device sends no events
        self.echo = bytearray()  # transmitted, not yet received back

    def config(self) -> bytes:
        return CONFIG.pack(80, 25, 1, 0)

    def set_config(self, offset: int, data: bytes) -> None:
        # emerg_wr: an emergency character to write; nothing to write it to here.
        if (offset, len(data)) != (8, 4):
            super().set_config(offset, data)

    def connection_reset(self, server: Server) -> None:
        self.rx.clear()
        self.control_rx.clear()
        self.echo.clear()

    def process(self, server: Server, vq: Virtqueue, chains: list[Chain | BadChain]) -> None:
        for c in chains:
            if isinstance(c, BadChain):
                server.reject(vq, c)
            elif vq.index in (PORT0_RX, CONTROL_RX):
                if c.readable or not c.writable:
                    server.reject(vq, BadChain(c.head, "receive buffer must be device-writable"))
                else:
                    (self.rx if vq.index == PORT0_RX else self.control_rx).append(c)
            elif vq.index == PORT0_TX:
                for view in c.readable:
                    self.echo += view
                server.complete(vq, c.head, 0)
            else:  # CONTROL_TX: DEVICE_READY, PORT_READY, PORT_OPEN...
                server.complete(vq, c.head, 0)
        self._deliver(server)

    def _deliver(self, server: Server) -> None:
        rxq = server.queues[PORT0_RX]
        delivered = False
        while self.echo and self.rx:
            chain = self.rx.popleft()
            n = 0
            for view in chain.writable:
                k = min(len(view), len(self.echo))
                view[:k] = self.echo[:k]
                del self.echo[:k]
                n += k
            server.complete(rxq, chain.head, n)
            delivered = True
        if delivered:
            server.notify(rxq)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.backends.console", description=__doc__)
    add_common_args(parser)
    return run(ConsoleDevice(), parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
