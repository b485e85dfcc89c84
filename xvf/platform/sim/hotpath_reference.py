"""Pure-Python twin of xvf.platform.sim._hotpath for the reference hot path
(xvf.hotpath.ioreq_reference): the simulator's interrupt line, whose dm_op goes
over its control socket."""

from __future__ import annotations

import errno
import os
import socket

from xvf.hotpath.ioreq_reference import IrqLine
from xvf.platform.sim import control as C


class SimIrqLine(IrqLine):
    """`IrqLine` whose set_irq_level dm_op is a control-socket message (`fd`, a
    connection of its own), as `_hotpath.SimIrqLine` sends it."""

    def __init__(self, fd: int, domid: int, irq: int) -> None:
        super().__init__(fd, domid, irq)
        self._sock = socket.socket(fileno=os.dup(fd))
        self._prefix = C.HEADER.pack(
            C.OP_DM_OP, C.DM_OP_PREFIX.size + C.DM_OP_SIZE
        ) + C.DM_OP_PREFIX.pack(domid, 0, 0)

    def c_issue(self, op: bytes) -> int:
        msg = self._prefix + op
        try:
            if self._sock.send(msg) != len(msg):
                return -errno.EIO
            reply = self._sock.recv(C.RC.size + C.DM_OP_SIZE)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        if len(reply) < C.RC.size:
            return -errno.EIO
        (rc,) = C.RC.unpack_from(reply)
        return rc if rc < 0 else 0
