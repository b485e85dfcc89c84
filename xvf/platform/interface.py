"""The platform seam: what the frontend needs from Xen, real (xvf.platform.xen) or
simulated (xvf.platform.sim).

`frontend`, `mmio` and `vhost_user` only ever see these interfaces. Both
implementations hand out the same Cython objects for the hot path
(`EventChannel`, `IrqLine`, an ioreq page with Xen's layout), so the code that
serves guests is the same on both.
"""

from __future__ import annotations

from typing import Protocol

from xvf.hotpath._evtchn import EventChannel
from xvf.hotpath._gnttab import GrantMapping
from xvf.hotpath._ioreq import IrqLine
from xvf.protocols.vhost_user_wire import VhostUserRegion

# One region of guest RAM as the frontend maps it and hands it to a backend:
# exactly what SET_MEM_TABLE describes (xvf.protocols.vhost_user_wire.VhostUserRegion).
MemoryRegion = VhostUserRegion


class EventChannelHandle(Protocol):
    """An open /dev/xen/evtchn (or the simulator's): binds ports, hands out the hot-path object."""

    channel: EventChannel

    def bind_interdomain(self, domid: int, remote_port: int) -> int: ...
    def unbind(self, local_port: int) -> None: ...
    def close(self) -> None: ...


class IoreqServerHandle(Protocol):
    """An IOREQ server created for one device of one guest."""

    id: int
    domid: int
    nr_vcpus: int
    page: memoryview  # the synchronous ioreq page, writable, Xen's layout

    def map_mmio_range(self, start: int, end_inclusive: int) -> None: ...
    def unmap_mmio_range(self, start: int, end_inclusive: int) -> None: ...
    def set_enabled(self, enabled: bool) -> None: ...
    def destroy(self) -> None: ...


class GuestMemory(Protocol):
    """Foreign mapping of a guest's whole RAM."""

    regions: list[MemoryRegion]

    def view(self, gpa: int, length: int) -> memoryview: ...
    def translate(self, gpa: int, length: int) -> tuple[int, int] | None: ...
    def xen_regions(self) -> list[MemoryRegion]: ...
    def after_mem_table(self, regions: list[MemoryRegion]) -> None: ...
    def close(self) -> None: ...


class GrantMapper(Protocol):
    """gntdev: maps pages a guest granted to us."""

    def map(self, refs: list[int], writable: bool) -> GrantMapping: ...
    def fileno(self) -> int: ...
    def after_mem_table(self, regions: list[MemoryRegion]) -> None: ...
    def close(self) -> None: ...


class Platform(Protocol):
    name: str
    simulated: bool
    # Linux 6.7+ privcmd can take QueueNotify (ioeventfd) and interrupt
    # injection (irqfd) off the device model's hands; probed at start.
    supports_ioeventfd: bool
    supports_irqfd: bool
    # Whether guest memory is offered with the vhost-user Xen mmap extension.
    xen_mmap: bool
    # Whether guest RAM can be handed to a backend as a plain shared fd (only the
    # simulator's memfd); on Xen a backend must map the guest itself (XEN_MMAP).
    guest_ram_shareable: bool

    def xenstore_path(self) -> str: ...
    def own_domid(self) -> int: ...
    def open_event_channel(self) -> EventChannelHandle: ...
    def create_ioreq_server(self, domid: int) -> IoreqServerHandle: ...
    def open_ioreq_server(self, domid: int, server_id: int) -> IoreqServerHandle: ...
    def irq_line(self, domid: int, irq: int) -> IrqLine: ...
    def guest_memory_bytes(self, domid: int) -> int: ...
    def map_guest_memory(self, domid: int) -> GuestMemory: ...
    def open_grant_mapper(self, domid: int) -> GrantMapper: ...
    def assign_irqfd(self, domid: int, irq: int, eventfd: int, deassign: bool = False) -> None: ...
    def assign_ioeventfd(
        self,
        server: IoreqServerHandle,
        ports: list[int],
        addr: int,
        eventfd: int,
        vq: int,
        addr_len: int = 4,
        deassign: bool = False,
    ) -> None: ...
    def close(self) -> None: ...
