"""One guest's virtio device served by a vhost-user backend.

Ties together the device's MMIO window on its guest's IOREQ server
(xvf.guest), its register file (xvf.mmio), the vhost-user connection and the
guest memory the backend is given. It is the `DeviceModel` behind the
registers: the guest's status transitions drive the vhost-user handshake.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from xvf import virtio_consts as V
from xvf._ioreq import MmioState, ServiceLoop
from xvf.device_config import DEFAULT_FS_TAG, local_config
from xvf.devices import DeviceType
from xvf.errors import ConfigError, VhostUserError, XvfError
from xvf.grant_layout import grant_regions, ring_spans
from xvf.grant_relay import GrantRelayQueue, ShadowMemory, relay_guest_features
from xvf.guest import Guest
from xvf.mmio import QueueRegisters, VirtioMmioRegisters
from xvf.platform import Platform
from xvf.vhost_user import VhostUserFrontend
from xvf.vhost_user_wire import ProtocolFeature as PF

log = logging.getLogger("xvf.device")

MMIO_WINDOW = 0x200  # libxl gives every virtio-mmio device 0x200 bytes
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
# What xvf uses when a backend offers it. XEN_MMAP when the platform can describe
# guest memory that way (always on Xen, where backends must map guests themselves).
WANTED_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG
# How the backend reaches guest memory (VhostDevice._memory_strategy), as logged.
MEMORY_STRATEGIES = {
    "grant regions": "grant regions (Xen mmap), mapped by the backend",
    "relay": "shadow rings relayed by xvf (backend cannot map grants)",
    "foreign regions": "foreign regions (Xen mmap), mapped by the backend",
    "shared fd": "guest RAM as a shared fd",
}


@dataclass(frozen=True)
class DeviceParams:
    domid: int
    devid: int
    dev_type: DeviceType
    base: int
    irq: int
    grant_usage: bool
    socket_path: str
    fs_tag: str = DEFAULT_FS_TAG  # the tag xvf answers for fs when the backend has no CONFIG

    @property
    def label(self) -> str:
        return f"dom{self.domid}/{self.dev_type.name}{self.devid}"


@dataclass
class _LiveQueue:
    kick_fd: int
    call_fd: int
    relay: GrantRelayQueue | None = None  # grant mode: the shadow-virtqueue relay
    ioeventfd: bool = False  # QueueNotify completed by the Dom0 kernel


class VhostDevice:
    """Lifecycle: `start()` -> guest I/O -> `stop()`; `backend_lost()` on hangup."""

    def __init__(
        self,
        params: DeviceParams,
        platform: Platform,
        loop: ServiceLoop,
        guest: Guest,
        foreign_mapping: bool,
        on_backend_lost: Callable[[VhostDevice], None] | None = None,
        offload: bool = True,
    ) -> None:
        self.params = params
        self.platform = platform
        self.loop = loop
        self.guest = guest
        self.foreign_mapping = foreign_mapping
        self.on_backend_lost = on_backend_lost
        self.label = params.label
        self.vhost: VhostUserFrontend | None = None
        self.attached = False  # the MMIO window is on the guest's IOREQ server
        self.memory = None
        self.shadow: ShadowMemory | None = None  # grant mode: the backend's only memory
        # Kernel offload of notifications (privcmd ioeventfd) and interrupts
        # (privcmd irqfd), where the platform has them; relayed queues need xvf.
        offload = offload and foreign_mapping
        self.use_ioeventfd = offload and getattr(platform, "supports_ioeventfd", False)
        self.use_irqfd = offload and getattr(platform, "supports_irqfd", False)
        self.irqfd = -1  # the device's one call eventfd while irqfd is assigned
        self.grant_mapper = None
        self.state = MmioState()
        self.regs: VirtioMmioRegisters | None = None
        self.live: dict[int, _LiveQueue] = {}
        self.mem_table_sent = False
        self.grant_rings: set[tuple[int, int]] = set()  # ring spans the grant table names
        self.backend_features = 0
        self.config_supported = False
        self.ignored_config_writes = 0
        self._reconnect_delay = 0.0
        self._next_reconnect = 0.0
        self.memory_strategy = "none"
        # counters for `xvf status` (the hot-path ones live in self.state)
        self.device_resets = 0
        self.backend_losses = 0
        self.reconnects = 0
        self._relay_totals = [0, 0, 0]  # requests, bytes, bad requests of stopped relays

    # -- bring-up --------------------------------------------------------------
    def start(self) -> None:
        p = self.params
        # The guest's DMA addresses must be what the mapping mode can translate.
        if self.foreign_mapping and p.grant_usage:
            raise ConfigError(
                f"{self.label}: the guest uses grants (grant_usage=1), so its descriptors "
                "carry grant addresses that foreign mapping cannot resolve; run without "
                "--foreign-mapping or set grant_usage=0 in the guest's virtio line"
            )
        if not self.foreign_mapping and not p.grant_usage:
            raise ConfigError(
                f"{self.label}: the guest does not use grants (grant_usage=0), so its "
                "descriptors carry guest-physical addresses; run with --foreign-mapping "
                "or set grant_usage=1 in the guest's virtio line"
            )
        self._connect_backend()
        try:
            self._attach()
        except Exception:
            self.stop()
            raise
        log.info(
            "%s: serving virtio %s at %#x irq %d via %s (%s mapping)",
            self.label,
            p.dev_type.name,
            p.base,
            p.irq,
            p.socket_path,
            "foreign" if self.foreign_mapping else "grant",
        )
        log.info(
            "%s: QueueNotify handled by %s, interrupts injected by %s",
            self.label,
            "the kernel (privcmd ioeventfd)" if self.use_ioeventfd else "xvf (ioreq service loop)",
            "the kernel (privcmd irqfd)" if self.use_irqfd else "xvf (dm_op set_irq_level)",
        )

    def _connect_backend(self) -> None:
        p = self.params
        vhost = VhostUserFrontend(p.socket_path, label=self.label)
        try:
            vhost.set_owner()
            features = vhost.get_features()
            if features & F_PROTOCOL_FEATURES:
                wanted = WANTED_PROTOCOL
                if self.platform.xen_mmap:
                    wanted |= PF.XEN_MMAP
                acked = vhost.get_protocol_features() & wanted
                vhost.set_protocol_features(acked)
                self.config_supported = bool(acked & PF.CONFIG)
                if acked & PF.MQ:
                    self._check_queue_count(vhost.get_queue_num())
            if (
                self.foreign_mapping
                and not self.platform.guest_ram_shareable
                and not vhost.protocol_features & PF.XEN_MMAP
            ):
                # Refused now, before the guest can start a driver that would hang.
                raise ConfigError(
                    f"{self.label}: foreign mapping needs a backend that maps the guest "
                    f"itself (vhost-user XEN_MMAP), and {p.socket_path} does not offer it; "
                    "run xvf without --foreign-mapping (grant mapping relays for such "
                    "backends) and give the guest grant_usage=1"
                )
            self.backend_features = features
        except Exception:
            vhost.close()
            raise
        self.vhost = vhost
        self.memory_strategy = self._memory_strategy()  # kept while reconnecting
        self.loop.add_reader(vhost.fileno(), self._on_backend_readable)
        guest_features = features & (V.DEVICE_SPECIFIC_MASK | V.TRANSPORT_BITS_FROM_BACKEND)
        guest_features &= ~p.dev_type.withheld_features
        guest_features |= 1 << V.F_VERSION_1
        if not self.foreign_mapping:
            guest_features |= 1 << V.F_ACCESS_PLATFORM
            if not self.backend_maps_grants:
                # The shadow relay completes in the backend's order: no IN_ORDER.
                guest_features = relay_guest_features(guest_features)
        if self.regs is None:
            self.regs = VirtioMmioRegisters(
                self.label,
                p.dev_type.virtio_id,
                guest_features,
                [p.dev_type.queue_size] * p.dev_type.num_queues,
                self,
                self.state,
            )
        else:
            self.regs.device_features = guest_features

    def _check_queue_count(self, offered: int) -> None:
        """Before the guest sees QueueNumMax: the backend must serve every queue the
        device type has (net and fs backends may offer more; the extra are unused)."""
        needed = self.params.dev_type.num_queues
        if offered < needed:
            raise ConfigError(
                f"{self.label}: backend {self.params.socket_path} serves {offered} "
                f"queue(s) (GET_QUEUE_NUM) but virtio {self.params.dev_type.name} needs "
                f"{needed}; start it with at least {needed} queues"
            )
        if offered > needed:
            log.debug("%s: backend offers %d queues, %d used", self.label, offered, needed)

    def _attach(self) -> None:
        p = self.params
        self.state.irq = self.platform.irq_line(p.domid, p.irq)
        self.guest.attach(p.base, MMIO_WINDOW, self.state)
        self.attached = True

    # -- DeviceModel -------------------------------------------------------------
    def features_ok(self, driver_features: int) -> bool:
        if not self.foreign_mapping and not driver_features >> V.F_ACCESS_PLATFORM & 1:
            log.warning(
                "%s: driver refused VIRTIO_F_ACCESS_PLATFORM, which grant mapping needs", self.label
            )
            return False
        return self.vhost is not None

    def driver_ok(self, queues: list[QueueRegisters], driver_features: int) -> None:
        vhost = self._backend()
        backend_bits = driver_features & self.backend_features
        if self.backend_features & F_PROTOCOL_FEATURES:
            backend_bits |= F_PROTOCOL_FEATURES
        vhost.set_features(backend_bits)
        self._send_mem_table(queues)
        for index, q in enumerate(queues):
            if q.ready:
                self.queue_ready(index, q)

    @property
    def backend_maps_grants(self) -> bool:
        """Grant mode with a Xen-aware backend: it maps the guest's grants itself."""
        return (
            not self.foreign_mapping
            and self.vhost is not None
            and bool(self.vhost.protocol_features & PF.XEN_MMAP)
        )

    def _send_mem_table(self, queues: list[QueueRegisters]) -> None:
        if self.mem_table_sent:
            return
        self._backend()
        log.info(
            "%s: guest memory for the backend: %s",
            self.label,
            MEMORY_STRATEGIES[self._memory_strategy()],
        )
        if self.backend_maps_grants:
            self._send_grant_mem_table(queues)
        elif not self.foreign_mapping:
            self._send_shadow_mem_table()
        else:
            regions = self._foreign_regions()
            try:
                self._backend().set_mem_table(regions)
            finally:
                self.memory.after_mem_table()
        self.mem_table_sent = True

    def _foreign_regions(self) -> list:
        if self.memory is None:
            self.memory = self.platform.map_guest_memory(self.params.domid)
        vhost = self._backend()
        if vhost.protocol_features & PF.XEN_MMAP:
            return self.memory.xen_regions()
        if any(r.xen_mmap_flags for r in self.memory.regions):
            raise ConfigError(
                f"{self.label}: backend {self.params.socket_path} does not offer the vhost-user "
                "Xen mmap extension (XEN_MMAP), which it needs to map a Xen guest's memory"
            )
        return list(self.memory.regions)  # plain shareable fds (the simulator's memfd)

    def _send_grant_mem_table(self, queues: list[QueueRegisters]) -> None:
        rings = [
            span
            for q in queues
            if q.ready
            for span in ring_spans(q.desc, q.driver, q.device, q.num)
        ]
        if self.grant_mapper is None:
            self.grant_mapper = self.platform.open_grant_mapper(self.params.domid)
        regions = grant_regions(
            rings,
            self.platform.guest_memory_bytes(self.params.domid),
            self.params.domid,
            self.grant_mapper.fileno(),
        )
        try:
            self._backend().set_mem_table(regions)
        finally:
            self.grant_mapper.after_mem_table()
        self.grant_rings = set(rings)

    def _send_shadow_mem_table(self) -> None:
        # Grant mode, backend without Xen mmap: it sees only xvf's shadow memory;
        # rings and buffers are relayed there (xvf.grant_relay).
        self.shadow = ShadowMemory()
        self.grant_mapper = self.platform.open_grant_mapper(self.params.domid)
        self._backend().set_mem_table([self.shadow.region()])

    def _relay_queue_ready(self, index: int, q: QueueRegisters) -> None:
        vhost = self._backend()
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            relay = GrantRelayQueue(
                index, q.num, q.desc, q.driver, q.device,
                self.grant_mapper, self.shadow, self.state, kick, call, self.label,
            )  # fmt: skip
        except Exception:
            os.close(kick)
            os.close(call)
            raise
        self.live[index] = _LiveQueue(kick, call, relay)
        vhost.set_vring_num(index, q.num)
        vhost.set_vring_base(index, 0)
        vhost.set_vring_addr(index, *relay.vring_addrs)
        vhost.set_vring_kick(index, kick)
        vhost.set_vring_call(index, call)
        vhost.set_vring_enable(index, True)
        self.loop.add_reader(call, relay.on_backend_call)
        self.loop.add_reader(relay.guest_kick_fd, relay.on_guest_kick)
        self.state.set_kick_fd(index, relay.guest_kick_fd)

    def _uva(self, gpa: int, length: int) -> int:
        if self.backend_maps_grants:
            return gpa  # grant regions are described with userspace_addr == address
        t = self.memory.translate(gpa, length)
        if t is None:
            raise XvfError(f"{self.label}: ring at {gpa:#x} is not in guest RAM")
        return t[1]

    def queue_ready(self, index: int, q: QueueRegisters) -> None:
        if index in self.live:
            return
        if not self.foreign_mapping and not self.backend_maps_grants:
            self._relay_queue_ready(index, q)
            return
        vhost = self._backend()
        if (
            self.backend_maps_grants
            and not set(ring_spans(q.desc, q.driver, q.device, q.num)) <= self.grant_rings
        ):
            # Rings are mapped in advance: a ring the table does not name yet (a
            # queue enabled after DRIVER_OK) needs a new table first.
            self._send_grant_mem_table([*self.regs.queues])
        desc = self._uva(q.desc, 16 * q.num)
        avail = self._uva(q.driver, 6 + 2 * q.num)
        used = self._uva(q.device, 6 + 8 * q.num)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = self._call_eventfd()
        live = self.live[index] = _LiveQueue(kick, call)
        vhost.set_vring_num(index, q.num)
        vhost.set_vring_base(index, 0)
        vhost.set_vring_addr(index, desc, avail, used)
        vhost.set_vring_kick(index, kick)
        vhost.set_vring_call(index, call)
        vhost.set_vring_enable(index, True)
        if not self.use_irqfd:
            self.loop.add_call_fd(call, self.state)
        self.state.set_kick_fd(index, kick)
        if self.use_ioeventfd:
            try:
                self.platform.assign_ioeventfd(
                    self.guest.server,
                    self.guest.ports,
                    self.params.base + V.QUEUE_NOTIFY,
                    kick,
                    index,
                )
                live.ioeventfd = True
            except XvfError as exc:
                log.warning(
                    "%s: privcmd ioeventfd refused (%s); QueueNotify stays with xvf",
                    self.label,
                    exc,
                )
                self.use_ioeventfd = False

    def _call_eventfd(self) -> int:
        if self.use_irqfd:
            try:
                return os.dup(self._irqfd())
            except XvfError as exc:
                log.warning(
                    "%s: privcmd irqfd refused (%s); interrupts stay with xvf", self.label, exc
                )
                self.use_irqfd = False
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def _irqfd(self) -> int:
        """The call eventfd every queue shares once the kernel injects the interrupt."""
        if self.irqfd < 0:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.platform.assign_irqfd(self.params.domid, self.params.irq, efd)
            except Exception:
                os.close(efd)
                raise
            self.irqfd = efd
            self.state.vring_sticky = True
        return self.irqfd

    def _release_irqfd(self) -> None:
        if self.irqfd < 0:
            return
        try:
            self.platform.assign_irqfd(
                self.params.domid, self.params.irq, self.irqfd, deassign=True
            )
        except XvfError as exc:  # the guest may be gone already
            log.debug("%s: deassigning irqfd: %s", self.label, exc)
        os.close(self.irqfd)
        self.irqfd = -1
        self.state.vring_sticky = False

    def _close_live(self, index: int, live: _LiveQueue) -> None:
        """Forget a queue on xvf's side (the backend is stopped or gone)."""
        self.state.set_kick_fd(index, -1)
        self.loop.remove_fd(live.call_fd)
        if live.relay is not None:
            self.loop.remove_fd(live.relay.guest_kick_fd)
            live.relay.stop()
            for i, n in enumerate(live.relay.counters):
                self._relay_totals[i] += n
        if live.ioeventfd:
            try:
                self.platform.assign_ioeventfd(
                    self.guest.server,
                    self.guest.ports,
                    self.params.base + V.QUEUE_NOTIFY,
                    live.kick_fd,
                    index,
                    deassign=True,
                )
            except XvfError as exc:
                log.debug("%s: deassigning ioeventfd of queue %d: %s", self.label, index, exc)
        os.close(live.kick_fd)
        os.close(live.call_fd)
        if not self.live:
            self._release_irqfd()

    def queue_reset(self, index: int) -> None:
        live = self.live.pop(index, None)
        if live is None:
            return
        self.state.set_kick_fd(index, -1)
        if self.vhost is not None:
            try:
                self.vhost.set_vring_enable(index, False)
                self.vhost.get_vring_base(index)
            except VhostUserError as exc:
                log.warning("%s: stopping queue %d: %s", self.label, index, exc)
        # only now does the backend no longer touch the rings (and a relay's shadow)
        self._close_live(index, live)

    def device_reset(self) -> None:
        self.device_resets += 1
        for index in list(self.live):
            self.queue_reset(index)
        if self.backend_maps_grants:
            # The table names the rings, which a re-initialised driver allocates anew.
            self.mem_table_sent = False

    def config_read(self, offset: int, size: int) -> int:
        cfg_size = self.params.dev_type.config_size
        if offset + size > cfg_size:
            return 0
        if not self.config_supported:
            # No GET_CONFIG: answer what xvf knows itself (virtiofsd leaves the fs tag to us).
            data = local_config(self.params.dev_type, {"fs_tag": self.params.fs_tag}) or b""
        elif self.vhost is None:
            return 0
        else:
            data = self.vhost.get_config(0, cfg_size)
        return int.from_bytes(data[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self.params.dev_type.config_writable(offset, size):
            # Read-only fields (blk capacity...): forwarded, qemu-storage-daemon drops
            # the session and the in-flight I/O with it. Said once, then counted.
            self.ignored_config_writes += 1
            if self.ignored_config_writes == 1:
                log.warning(
                    "%s: guest wrote %d byte(s) at read-only config offset %#x: ignored "
                    "(further ones are counted, not logged)",
                    self.label,
                    size,
                    offset,
                )
            else:
                log.debug(
                    "%s: read-only config write #%d (offset %#x) ignored",
                    self.label,
                    self.ignored_config_writes,
                    offset,
                )
            return
        if not self.config_supported or self.vhost is None:
            return
        self.vhost.set_config(offset, value.to_bytes(size, "little"))

    # -- failures and teardown ---------------------------------------------------
    def _backend(self) -> VhostUserFrontend:
        if self.vhost is None:
            raise VhostUserError(f"{self.label}: no backend connected")
        return self.vhost

    def _on_backend_readable(self) -> None:
        # vhost-user backends speak only when asked; readable means EOF or garbage.
        log.error("%s: backend %s closed the connection", self.label, self.params.socket_path)
        self.backend_losses += 1
        self._drop_backend()
        if self.regs is not None:
            self.regs.needs_reset()
        if self.on_backend_lost is not None:
            self.on_backend_lost(self)

    def _drop_backend(self) -> None:
        for index in list(self.live):
            self._close_live(index, self.live.pop(index))
        if self.vhost is not None:
            self.loop.remove_fd(self.vhost.fileno())
            self.vhost.close()
            self.vhost = None
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None
        if self.grant_mapper is not None:
            self.grant_mapper.close()
            self.grant_mapper = None
        self.mem_table_sent = False

    @property
    def backend_connected(self) -> bool:
        return self.vhost is not None

    def try_reconnect(self) -> bool:
        """Reconnect to a backend that went away, once its socket is back.

        The guest was told DEVICE_NEEDS_RESET when the backend left; its reset
        and re-initialisation then run against the new connection. A socket
        that is there but refuses us is retried with a growing delay (to 5 s).
        """
        if self.vhost is not None:
            return True
        now = time.monotonic()
        if now < self._next_reconnect or not os.path.exists(self.params.socket_path):
            return False
        try:
            self._connect_backend()
        except (XvfError, OSError) as exc:
            self._reconnect_delay = min(5.0, max(0.2, 2 * self._reconnect_delay))
            self._next_reconnect = now + self._reconnect_delay
            log.warning(
                "%s: reconnect to %s failed (next try in %.1fs): %s",
                self.label,
                self.params.socket_path,
                self._reconnect_delay,
                exc,
            )
            return False
        self._reconnect_delay = 0.0
        self.reconnects += 1
        log.info("%s: reconnected to backend %s", self.label, self.params.socket_path)
        return True

    # -- status ------------------------------------------------------------------
    def _memory_strategy(self) -> str:
        """How the connected backend reaches guest memory (see _send_mem_table)."""
        if not self.foreign_mapping:
            return "grant regions" if self.backend_maps_grants else "relay"
        xen = self.vhost is not None and self.vhost.protocol_features & PF.XEN_MMAP
        return "foreign regions" if xen else "shared fd"

    def relay_counters(self) -> tuple[int, int, int]:
        """(requests, bytes, bad requests) through the grant relay, live queues included."""
        totals = list(self._relay_totals)
        for live in self.live.values():
            if live.relay is not None:
                for i, n in enumerate(live.relay.counters):
                    totals[i] += n
        return totals[0], totals[1], totals[2]

    def status(self) -> dict:
        """What `xvf status` shows of this device: in-memory state only, never the backend."""
        p = self.params
        relayed, copied, bad = self.relay_counters()
        return {
            "label": self.label,
            "type": p.dev_type.name,
            "devid": p.devid,
            "base": p.base,
            "irq": p.irq,
            "mapping": "foreign" if self.foreign_mapping else "grant",
            "memory": self.memory_strategy,
            "queue_notify": "kernel ioeventfd" if self.use_ioeventfd else "xvf",
            "interrupts": "kernel irqfd" if self.use_irqfd else "xvf",
            "backend_socket": p.socket_path,
            "backend": "connected" if self.vhost is not None else "reconnecting",
            "driver_status": self.state.status,
            "live_queues": len(self.live),
            "counters": {
                "exits": self.state.hot_accesses + self.state.slow_accesses,
                "notifies": self.state.notifies,
                "interrupts": self.state.interrupts,
                "bad_requests": bad,
                "device_resets": self.device_resets,
                "backend_losses": self.backend_losses,
                "reconnects": self.reconnects,
                "relay_requests": relayed,
                "relay_bytes": copied,
            },
        }

    def stop(self) -> None:
        """Take the window off the guest's IOREQ server, stop the rings, unmap everything."""
        if self.attached:
            # Xen stops sending this window first; a vCPU already waiting is answered.
            self.guest.detach(self.params.base, MMIO_WINDOW)
            self.attached = False
        if self.vhost is not None:
            for index in list(self.live):
                self.queue_reset(index)
        self._drop_backend()
        if self.state.irq is not None and self.state.irq.level:
            try:
                self.state.irq.set(0)
            except XvfError:
                pass
        if self.memory is not None:
            self.memory.close()
            self.memory = None
