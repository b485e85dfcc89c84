"""The dm_ops that run an IOREQ server, shared by both platforms: real Xen sends
them through privcmd, the software Xen through its control socket, and the structs
are built alike by xvf.hotpath._privcmd. Only how a dm_op travels and how the ioreq
page is mapped differ, and stay with each platform."""

from __future__ import annotations

from typing import Protocol

from xvf.hotpath import _privcmd as P


class DmOpSender(Protocol):
    def dm_op(self, domid: int, op: bytes) -> bytes: ...


class DmOpIoreqServer:
    """An IOREQ server of `domid` driven by dm_ops sent through `sender`: a new one,
    or with `existing` the server of that id (left by a process that died: IOREQ
    servers belong to Dom0, not to the process)."""

    def __init__(self, sender: DmOpSender, domid: int, existing: int | None) -> None:
        self._sender = sender
        self.domid = domid
        if existing is None:
            out = sender.dm_op(domid, P.dm_op_create_ioreq_server(P.HVM_IOREQSRV_BUFIOREQ_OFF))
            self.id = P.parse_created_server_id(out)
        else:
            self.id = existing

    def _dm_op(self, op: bytes) -> bytes:
        return self._sender.dm_op(self.domid, op)

    def _query_nr_vcpus(self) -> int:
        return P.parse_nr_vcpus(self._dm_op(P.dm_op_nr_vcpus()))

    def _range(self, map_: bool, start: int, end_inclusive: int) -> None:
        self._dm_op(P.dm_op_io_range(map_, self.id, P.XEN_DMOP_IO_RANGE_MEMORY, start,
                                     end_inclusive))  # fmt: skip

    def map_mmio_range(self, start: int, end_inclusive: int) -> None:
        self._range(True, start, end_inclusive)

    def unmap_mmio_range(self, start: int, end_inclusive: int) -> None:
        self._range(False, start, end_inclusive)

    def set_enabled(self, enabled: bool) -> None:
        self._dm_op(P.dm_op_set_ioreq_server_state(self.id, enabled))

    def _destroy_server(self) -> None:
        self._dm_op(P.dm_op_destroy_ioreq_server(self.id))
