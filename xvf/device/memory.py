"""How a backend reaches its guest's memory: one strategy per backend connection.

Chosen once, when a handshake has told what the backend can do (`choose`):

| strategy | mapping | backend | what it is given |
|---|---|---|---|
| `ForeignRegions` | foreign | XEN_MMAP | the guest's RAM as FOREIGN regions, to map |
| `SharedRam` | foreign | no XEN_MMAP (simulator) | the guest's RAM as shareable fds |
| `GrantRegions` | grant | XEN_MMAP | the grant space as GRANT regions, rings ahead |
| `ShadowRelay` | grant | no XEN_MMAP | xvf's shadow memory; xvf relays the rings |

The device asks each the same things: which features the guest may see, the
memory table to send (`table`) and when a new one is due, how to start a queue
(`start_queue`, through the device's `Queues`), and how to watch a ring drain.
Everything here runs on the service-loop thread, except `RingWatch` readers,
which a worker calls during a reset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xvf.device.queues import LiveQueue, Queues, Step
from xvf.errors import ConfigError, XvfError
from xvf.guest.ram import GuestRam
from xvf.hotpath._ioreq import MmioState
from xvf.platform.interface import GrantMapper, MemoryRegion, Platform
from xvf.protocols import virtio as V
from xvf.protocols.grant_layout import grant_regions, ring_spans
from xvf.protocols.grant_relay import GrantRelayQueue, ShadowMemory, relay_guest_features
from xvf.protocols.virtio_mmio import QueueRegisters


@dataclass
class RingWatch:
    """Readers of the avail and used index of a ring the backend works on, where xvf
    can see it; read by the worker while a reset drains, released by it after."""

    avail: Callable[[], int]
    used: Callable[[], int]
    views: list[memoryview] = field(default_factory=list)  # of guest RAM

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views.clear()


class BackendMemory(ABC):
    """One way for a backend to reach guest memory (see the module's table)."""

    name = ""  # in `xvf status` and the log
    description = ""
    # The backend works on the guest's rings itself, so the Dom0 kernel may carry their
    # kicks and calls (privcmd ioeventfd/irqfd); the relay must see every one.
    direct_rings = True

    def __init__(self, label: str) -> None:
        self.label = label
        self.table_current = False  # the backend holds a table that is still right

    def guest_features(self, features: int) -> int:
        """The device features the guest may see, given the backend's."""
        return features

    def refuses_driver(self, driver_features: int) -> str | None:
        """Why the driver's features cannot work with this memory (None: they can)."""
        return None

    def needs_table(self, starting: Sequence[QueueRegisters]) -> bool:
        """Whether a (new) memory table must go out before `starting` queues run."""
        return not self.table_current

    @abstractmethod
    def table(self, queues: Sequence[QueueRegisters]) -> list[MemoryRegion]:
        """The regions for SET_MEM_TABLE / ADD_MEM_REG; mappings are made here."""

    def table_sent(self, regions: list[MemoryRegion]) -> None:  # noqa: B027 (optional hook)
        """The backend has the table (it holds its own copies of the fds now)."""

    def device_reset(self) -> None:  # noqa: B027 (optional hook)
        """The driver reset the device; its rings will be allocated anew."""

    @abstractmethod
    def start_queue(self, index: int, q: QueueRegisters, queues: Queues) -> Step:
        """Set up xvf's side of an enabled queue (in `queues`); returns what tells the
        backend, for the worker to send."""

    def ring_watch(self, live: LiveQueue) -> RingWatch | None:
        """How a reset sees this queue drain (None: xvf cannot see its indices)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what this strategy made (not the guest's RAM: its Guest owns it)."""


class _GuestRamMemory(BackendMemory):
    """The foreign-mapping strategies: rings and buffers are guest-physical addresses
    in the guest's RAM, which xvf has mapped too (it reads the rings' indices)."""

    def __init__(self, label: str, ram: GuestRam) -> None:
        super().__init__(label)
        self.ram = ram

    def _uva(self, gpa: int, length: int) -> int:
        t = self.ram.memory.translate(gpa, length)
        if t is None:
            raise XvfError(f"{self.label}: ring at {gpa:#x} is not in guest RAM")
        return t[1]

    def start_queue(self, index: int, q: QueueRegisters, queues: Queues) -> Step:
        desc, avail, used = (
            self._uva(a, n) for a, n in ring_spans(q.desc, q.driver, q.device, q.num)
        )
        return queues.add_direct(index, q, (desc, avail, used))

    def ring_watch(self, live: LiveQueue) -> RingWatch | None:
        if not live.used_gpa:
            return None
        try:
            avail = self.ram.memory.view(live.avail_gpa + 2, 2).cast("H")
            used = self.ram.memory.view(live.used_gpa + 2, 2).cast("H")
        except XvfError:
            return None
        return RingWatch(lambda: avail[0], lambda: used[0], [avail, used])

    def table_sent(self, regions: list[MemoryRegion]) -> None:
        self.ram.memory.after_mem_table(regions)


class ForeignRegions(_GuestRamMemory):
    name = "foreign regions"
    description = "foreign regions (Xen mmap), mapped by the backend"

    def table(self, queues: Sequence[QueueRegisters]) -> list[MemoryRegion]:
        return self.ram.memory.xen_regions()


class SharedRam(_GuestRamMemory):
    name = "shared fd"
    description = "guest RAM as a shared fd"

    def table(self, queues: Sequence[QueueRegisters]) -> list[MemoryRegion]:
        return list(self.ram.memory.regions)


class _GrantMemory(BackendMemory):
    """The grant strategies: descriptors carry grant addresses; the guest must have
    agreed to VIRTIO_F_ACCESS_PLATFORM, which tells its driver to use them."""

    def __init__(self, label: str, platform: Platform, domid: int) -> None:
        super().__init__(label)
        self.platform = platform
        self.domid = domid
        self.mapper: GrantMapper | None = None

    def _mapper(self) -> GrantMapper:
        if self.mapper is None:
            self.mapper = self.platform.open_grant_mapper(self.domid)
        return self.mapper

    def guest_features(self, features: int) -> int:
        return features | 1 << V.F_ACCESS_PLATFORM

    def refuses_driver(self, driver_features: int) -> str | None:
        if not driver_features >> V.F_ACCESS_PLATFORM & 1:
            return "driver refused VIRTIO_F_ACCESS_PLATFORM, which grant mapping needs"
        return None

    def table_sent(self, regions: list[MemoryRegion]) -> None:
        if self.mapper is not None:
            self.mapper.after_mem_table(regions)

    def close(self) -> None:
        mapper, self.mapper = self.mapper, None
        if mapper is not None:
            mapper.close()


class GrantRegions(_GrantMemory):
    """The backend maps the guest's grants itself; each ring is mapped in advance, so
    the table names the rings, and a ring it does not name needs a new table."""

    name = "grant regions"
    description = "grant regions (Xen mmap), mapped by the backend"

    def __init__(self, label: str, platform: Platform, domid: int) -> None:
        super().__init__(label, platform, domid)
        self.rings: set[tuple[int, int]] = set()  # the ring spans the table names

    def needs_table(self, starting: Sequence[QueueRegisters]) -> bool:
        named = all(set(ring_spans(q.desc, q.driver, q.device, q.num)) <= self.rings
                    for q in starting)  # fmt: skip
        return not self.table_current or not named

    def table(self, queues: Sequence[QueueRegisters]) -> list[MemoryRegion]:
        rings = [
            span
            for q in queues
            if q.ready
            for span in ring_spans(q.desc, q.driver, q.device, q.num)
        ]
        regions = grant_regions(
            rings, self.platform.guest_memory_bytes(self.domid), self.domid, self._mapper().fileno()
        )
        self.rings = set(rings)
        return regions

    def device_reset(self) -> None:
        self.table_current = False

    def start_queue(self, index: int, q: QueueRegisters, queues: Queues) -> Step:
        # grant regions are described with userspace_addr == guest address
        return queues.add_direct(index, q, (q.desc, q.driver, q.device))


class ShadowRelay(_GrantMemory):
    """The backend sees only xvf's shadow memory; xvf relays each queue's rings and
    buffers between it and the guest's grants (xvf.protocols.grant_relay)."""

    name = "relay"
    description = "shadow rings relayed by xvf (backend cannot map grants)"
    direct_rings = False

    def __init__(self, label: str, platform: Platform, domid: int) -> None:
        super().__init__(label, platform, domid)
        self.shadow: ShadowMemory | None = None

    def guest_features(self, features: int) -> int:
        # The relay completes in the backend's order: no IN_ORDER.
        return relay_guest_features(super().guest_features(features))

    def table(self, queues: Sequence[QueueRegisters]) -> list[MemoryRegion]:
        if self.shadow is None:
            self.shadow = ShadowMemory()
        self._mapper()
        return [self.shadow.region()]

    def start_queue(self, index: int, q: QueueRegisters, queues: Queues) -> Step:
        if self.shadow is None or self.mapper is None:
            raise XvfError(f"{self.label}: queue {index} started before the memory table")
        shadow, mapper = self.shadow, self.mapper

        def relay(
            kick: int, call: int, state: MmioState, on_broken: Callable[[str], None]
        ) -> GrantRelayQueue:
            return GrantRelayQueue(
                index, q.num, q.desc, q.driver, q.device,
                mapper, shadow, state, kick, call, self.label, on_broken=on_broken,
            )  # fmt: skip

        return queues.add_relayed(index, q, relay)

    def ring_watch(self, live: LiveQueue) -> RingWatch | None:
        relay = live.relay
        if relay is None:
            return None
        return RingWatch(relay.shadow_avail_idx, relay.backend_used_idx)

    def close(self) -> None:
        shadow, self.shadow = self.shadow, None
        if shadow is not None:
            shadow.close()
        super().close()


def choose(
    label: str,
    foreign_mapping: bool,
    backend_xen_mmap: bool,
    platform: Platform,
    domid: int,
    ram: GuestRam,
    socket_path: str,
) -> BackendMemory:
    """The strategy for a backend that does (not) offer XEN_MMAP; refuses, with the
    fix named, a combination in which the guest's driver would hang. `ram` is the
    guest's (mapped by the device before the guest can use it)."""
    if not foreign_mapping:
        if backend_xen_mmap:
            return GrantRegions(label, platform, domid)
        return ShadowRelay(label, platform, domid)
    if backend_xen_mmap:
        return ForeignRegions(label, ram)
    if platform.guest_ram_shareable:
        return SharedRam(label, ram)
    raise ConfigError(
        f"{label}: foreign mapping needs a backend that maps the guest itself (vhost-user "
        f"XEN_MMAP), and {socket_path} does not offer it; run xvf without --foreign-mapping "
        "(grant mapping relays for such backends) and give the guest grant_usage=1"
    )
