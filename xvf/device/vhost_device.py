"""One guest's virtio device served by a vhost-user backend.

Ties together the device's MMIO window on its guest's IOREQ server
(xvf.daemon.guest), its register file (xvf.protocols.virtio_mmio), the vhost-user connection and the
guest memory the backend is given. It is the `DeviceModel` behind the
registers: the guest's status transitions drive the vhost-user handshake.

Threads: everything here runs on the service-loop thread except the vhost-user
exchanges, which run on the device's `BackendWorker` (xvf.device.backend_worker) so that
no backend can hold up another guest's ioreqs. An access whose answer depends on
the backend (DRIVER_OK, a queue enabled or reset, a device reset) is deferred: that
one vCPU waits in its ioreq slot until the worker is done, at most
BACKEND_ANSWER_LIMIT_S; then the device is given up (DEVICE_NEEDS_RESET, the
connection dropped and re-made) and the vCPU answered. Config space is answered
from a cache filled at each (re)connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xvf.daemon.guest import Guest
from xvf.device.backend_worker import BackendWorker, Mailbox
from xvf.device.config_space import DEFAULT_FS_TAG, config_space
from xvf.device.types import DeviceType
from xvf.errors import ConfigError, VhostUserError, XvfError
from xvf.hotpath._ioreq import MmioState, ServiceLoop
from xvf.platform.interface import Platform
from xvf.protocols import virtio as V
from xvf.protocols.grant_layout import grant_regions, ring_spans
from xvf.protocols.grant_relay import GrantRelayQueue, ShadowMemory, relay_guest_features
from xvf.protocols.vhost_user import VhostUserFrontend
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF
from xvf.protocols.virtio_mmio import QueueRegisters, VirtioMmioRegisters
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.device")

MMIO_WINDOW = 0x200  # libxl gives every virtio-mmio device 0x200 bytes
# How long the worker may spend on what a waiting vCPU needs before the device is given
# up. Linux's virtio-mmio driver cannot be told "later", so the bound is what protects
# its guest; it is above the 5 s after which a single vhost-user message times out
# (xvf.protocols.vhost_user), because a backend mapping a big guest's memory (SET_MEM_TABLE)
# legitimately takes seconds: 2-3 s for 256 MiB under TCG on the rig.
BACKEND_ANSWER_LIMIT_S = 8.0
# After a ring is stopped, how long its requests still in the backend may take to
# complete before the reset goes ahead without them (their late completions would
# land in rings the guest re-allocates).
DRAIN_LIMIT_S = 1.5
# How long the service loop lets a worker finish once its backend's socket is shut
# down (what is left is local: no backend is waited for).
WORKER_LET_GO_S = 0.2
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
# What xvf uses when a backend offers it. XEN_MMAP when the platform can describe
# guest memory that way (always on Xen, where backends must map guests themselves).
WANTED_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS
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


@dataclass(eq=False)
class _LiveQueue:
    index: int
    kick_fd: int
    call_fd: int
    avail_gpa: int = 0  # the driver's ring (foreign mapping: xvf can read its indices)
    used_gpa: int = 0
    relay: GrantRelayQueue | None = None  # grant mode: the shadow-virtqueue relay
    ioeventfd: bool = False  # QueueNotify completed by the Dom0 kernel
    closed: bool = False


@dataclass
class _RingWatch:
    """How a reset reads a ring's indices while it drains (see VhostDevice._ring_watch)."""

    avail: Callable[[], int]
    used: Callable[[], int]
    views: list[memoryview] = field(default_factory=list)  # of guest RAM: released after

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views.clear()


@dataclass
class _Connection:
    """What a handshake (on the worker) learnt about the backend."""

    vhost: VhostUserFrontend
    features: int
    config: bytes | None  # None: the backend has no CONFIG protocol feature
    memory: object = None  # foreign mapping: the guest's RAM, mapped on the worker


Step = Callable[[VhostUserFrontend], object]


class VhostDevice:
    """Lifecycle: `start()` -> guest I/O -> `stop()`; `check()` on every tick."""

    def __init__(
        self,
        params: DeviceParams,
        platform: Platform,
        loop: ServiceLoop,
        guest: Guest,
        foreign_mapping: bool,
        mailbox: Mailbox,
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
        self.worker = BackendWorker(self.label, mailbox)
        self.vhost: VhostUserFrontend | None = None
        self.attached = False  # the MMIO window is on the guest's IOREQ server
        self.stopped = False
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
        self.retiring: set[_LiveQueue] = set()  # stopped by a reset, not yet freed
        self.mem_table_sent = False
        self.grant_rings: set[tuple[int, int]] = set()  # ring spans the grant table names
        self.backend_features = 0
        self.config_supported = False
        self.config_cache = b""  # what config reads answer
        self.ignored_config_writes = 0
        self._config_writes = 0
        self._guest_breaks = RateLimitedLog(log)
        self._waiting: dict[int, tuple[float, str]] = {}  # deferred access -> since, what
        self._connecting = False
        self._reconnect_delay = 0.0
        self._next_reconnect = 0.0
        self.memory_strategy = "none"
        # counters for `xvf status` (the hot-path ones live in self.state)
        self.device_resets = 0
        self.backend_losses = 0
        self.backend_stalls = 0
        self.reconnects = 0
        self.worst_wait_s = 0.0  # longest a vCPU waited for this device's backend
        self._relay_totals = [0, 0, 0]  # requests, bytes, bad requests of stopped relays

    # -- bring-up --------------------------------------------------------------
    def start(self, on_started: Callable[[VhostDevice, BaseException | None], None]) -> None:
        """Connect to the backend (on the worker), then claim the window; `on_started`
        reports the outcome on the loop thread. Never blocks on the backend."""
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

        def connected(conn: _Connection | None, error: BaseException | None) -> None:
            if error is None and conn is not None:
                if self.stopped:
                    self._discard(conn)
                    return
                try:
                    self._install(conn)
                    self._attach()
                except Exception as exc:
                    error = exc
                else:
                    self._log_serving()
            on_started(self, error)

        self.worker.submit(self._handshake, connected)

    def _log_serving(self) -> None:
        p = self.params
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

    def _handshake(self) -> _Connection:
        """On the worker: connect and learn what the backend offers."""
        p = self.params
        vhost = VhostUserFrontend(p.socket_path, label=self.label)
        try:
            vhost.set_owner()
            features = vhost.get_features()
            config = None
            if features & F_PROTOCOL_FEATURES:
                wanted = WANTED_PROTOCOL
                if self.platform.xen_mmap:
                    wanted |= PF.XEN_MMAP
                acked = vhost.get_protocol_features() & wanted
                vhost.set_protocol_features(acked)
                if acked & PF.MQ:
                    self._check_queue_count(vhost.get_queue_num())
                if acked & PF.CONFIG:
                    config = vhost.get_config(0, p.dev_type.config_size)
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
        except BaseException:
            vhost.close()
            raise
        memory = None
        if self.foreign_mapping and self.memory is None:
            # Off the service loop: mapping a guest's RAM takes seconds on a slow host,
            # and no other guest may wait for it.
            try:
                memory = self.platform.map_guest_memory(p.domid)
            except BaseException:
                vhost.close()
                raise
        self.worker.watch(vhost.fileno(), lambda: self._on_hangup(vhost))
        return _Connection(vhost, features, config, memory)

    def _install(self, conn: _Connection) -> None:
        """On the loop thread: adopt a connection the worker made."""
        p = self.params
        if conn.memory is not None:
            if self.memory is None:
                self.memory = conn.memory
            else:
                conn.memory.close()  # type: ignore[attr-defined]
        self.vhost = conn.vhost
        self.backend_features = features = conn.features
        self.config_supported = conn.config is not None
        # Without GET_CONFIG xvf answers what it knows itself (virtiofsd leaves the fs
        # tag to us). Refreshed at every reconnection and after each config write.
        self.config_cache = config_space(p.dev_type, conn.config, p.fs_tag)
        self.memory_strategy = self._memory_strategy()  # kept while reconnecting
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

    # -- talking to the backend ------------------------------------------------
    def _defer(self, what: str) -> int:
        """Keep the current access's vCPU waiting until `_answer` (0: nobody waits)."""
        token = self.state.defer_access()
        if token:
            self._waiting[token] = (time.monotonic(), what)
        return token

    def _answer(self, token: int) -> None:
        if token:
            since = self._waiting.pop(token, (time.monotonic(), ""))[0]
            self.worst_wait_s = max(self.worst_wait_s, time.monotonic() - since)
            self.state.answer(token)

    def _exchange(
        self,
        what: str,
        steps: list[Step],
        token: int = 0,
        after: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Send `steps` to the backend on the worker; then, on the loop thread, run
        `after(error)` and answer the waiting vCPU. A failure marks the device
        DEVICE_NEEDS_RESET; a connection that broke or timed out is re-made."""
        vhost = self.vhost
        if vhost is None:
            if after is not None:
                after(VhostUserError(f"{self.label}: no backend connected"))
            self._answer(token)
            return

        def run() -> None:
            for step in steps:
                step(vhost)

        def done(_result: object, error: BaseException | None) -> None:
            # The vCPU first, whatever happens below; stop() already released what
            # `after` would (and answered every waiting vCPU).
            self._answer(token)
            if self.stopped:
                return
            if after is not None:
                after(error)
            if error is not None and vhost is self.vhost:
                log.error("%s: %s failed: %s", self.label, what, error)
                if isinstance(error, (VhostUserError, OSError)):
                    self._lose_backend()
                elif self.regs is not None:
                    self.regs.needs_reset()

        self.worker.submit(run, done)

    def _discard(self, conn: _Connection) -> None:
        """A handshake that finished after stop(): close what it made."""
        self._close_now(conn.vhost)
        if conn.memory is not None:
            conn.memory.close()  # type: ignore[attr-defined]

    def _close_now(self, vhost: VhostUserFrontend) -> None:
        """Close a connection no job uses any more (its handshake has finished)."""
        if self.worker.idle:
            self.worker.unwatch()
        vhost.close()

    def _close_on_worker(self, vhost: VhostUserFrontend) -> None:
        vhost.shutdown()  # a job blocked on it fails now instead of at its timeout

        def close() -> None:
            self.worker.unwatch()
            vhost.close()

        self.worker.submit(close)

    # -- DeviceModel -------------------------------------------------------------
    def features_ok(self, driver_features: int) -> bool:
        if not self.foreign_mapping and not driver_features >> V.F_ACCESS_PLATFORM & 1:
            log.warning(
                "%s: driver refused VIRTIO_F_ACCESS_PLATFORM, which grant mapping needs", self.label
            )
            return False
        return self.vhost is not None

    def driver_ok(self, queues: list[QueueRegisters], driver_features: int) -> None:
        self._backend()
        backend_bits = driver_features & self.backend_features
        if self.backend_features & F_PROTOCOL_FEATURES:
            backend_bits |= F_PROTOCOL_FEATURES
        steps: list[Step] = [lambda v: v.set_features(backend_bits)]
        after: list[Callable[[BaseException | None], None] | None] = [None]

        def prepare() -> None:
            after[0] = self._mem_table_steps(queues, steps)
            for index, q in enumerate(queues):
                if q.ready:
                    self._queue_steps(index, q, steps)

        self._prepare(prepare)
        self._exchange("starting the device", steps, self._defer("DRIVER_OK"), after[0])

    def _prepare(self, build: Callable[[], None]) -> None:
        """Run loop-side preparation; if it fails (a ring outside the guest's memory...),
        undo what it set up, so that nothing half-made outlives it."""
        live_before = set(self.live)
        sent, shadow, mapper = self.mem_table_sent, self.shadow, self.grant_mapper
        try:
            build()
        except BaseException:
            for index in [i for i in self.live if i not in live_before]:
                live = self.live.pop(index)
                self._quiesce(index, live)
                self._close_live(index, live)
            if not sent:  # the table it prepared was never sent
                self.mem_table_sent = False
                if self.shadow is not shadow and self.shadow is not None:
                    self.shadow.close()
                if self.grant_mapper is not mapper and self.grant_mapper is not None:
                    self.grant_mapper.close()
                self.shadow, self.grant_mapper = shadow, mapper
            raise

    @property
    def backend_maps_grants(self) -> bool:
        """Grant mode with a Xen-aware backend: it maps the guest's grants itself."""
        return (
            not self.foreign_mapping
            and self.vhost is not None
            and bool(self.vhost.protocol_features & PF.XEN_MMAP)
        )

    def _mem_table_steps(
        self, queues: list[QueueRegisters], steps: list[Step]
    ) -> Callable[[BaseException | None], None] | None:
        """Prepare the memory table (loop thread: mappings are made here) and add its
        message to `steps`; returns what to run once it is sent."""
        if self.mem_table_sent:
            return None
        self._backend()
        log.info(
            "%s: guest memory for the backend: %s",
            self.label,
            MEMORY_STRATEGIES[self._memory_strategy()],
        )
        if self.backend_maps_grants:
            regions, handles = self._grant_mem_table(queues), self.grant_mapper
        elif not self.foreign_mapping:
            # Grant mode, backend without Xen mmap: it sees only xvf's shadow memory;
            # rings and buffers are relayed there (xvf.protocols.grant_relay).
            self.shadow = ShadowMemory()
            self.grant_mapper = self.platform.open_grant_mapper(self.params.domid)
            regions, handles = [self.shadow.region()], None
        else:
            regions, handles = self._foreign_regions(), self.memory
        steps.append(lambda v: v.set_memory(regions))
        self.mem_table_sent = True

        def sent(_error: BaseException | None) -> None:
            if handles is not None:
                handles.after_mem_table()

        return sent

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

    def _grant_mem_table(self, queues: list[QueueRegisters]) -> list:
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
        self.grant_rings = set(rings)
        return regions

    def _relay_queue_steps(self, index: int, q: QueueRegisters, steps: list[Step]) -> None:
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            relay = GrantRelayQueue(
                index, q.num, q.desc, q.driver, q.device,
                self.grant_mapper, self.shadow, self.state, kick, call, self.label,
                on_broken=self._guest_broke_ring,
            )  # fmt: skip
        except Exception:
            os.close(kick)
            os.close(call)
            raise
        self.live[index] = _LiveQueue(index, kick, call, relay=relay)
        self.loop.add_reader(call, relay.on_backend_call)
        self.loop.add_reader(relay.guest_kick_fd, relay.on_guest_kick)
        self.state.set_kick_fd(index, relay.guest_kick_fd)
        addrs, num = relay.vring_addrs, q.num  # read now: the worker runs later
        steps.append(lambda v: self._start_ring(v, index, num, addrs, kick, call))

    @staticmethod
    def _start_ring(
        v: VhostUserFrontend,
        index: int,
        num: int,
        addrs: tuple[int, int, int],
        kick: int,
        call: int,
    ) -> None:
        v.set_vring_num(index, num)
        v.set_vring_base(index, 0)
        v.set_vring_addr(index, *addrs)
        v.set_vring_kick(index, kick)
        v.set_vring_call(index, call)
        v.set_vring_enable(index, True)

    def _uva(self, gpa: int, length: int) -> int:
        if self.backend_maps_grants:
            return gpa  # grant regions are described with userspace_addr == address
        t = self.memory.translate(gpa, length)
        if t is None:
            raise XvfError(f"{self.label}: ring at {gpa:#x} is not in guest RAM")
        return t[1]

    def queue_ready(self, index: int, q: QueueRegisters) -> None:
        """A queue enabled after DRIVER_OK."""
        if index in self.live:
            return
        steps: list[Step] = []
        after: list[Callable[[BaseException | None], None] | None] = [None]

        def prepare() -> None:
            if (
                self.backend_maps_grants
                and not set(ring_spans(q.desc, q.driver, q.device, q.num)) <= self.grant_rings
            ):
                # Rings are mapped in advance: a ring the table does not name yet needs
                # a new table first.
                self.mem_table_sent = False
                after[0] = self._mem_table_steps([*self.regs.queues], steps)
            self._queue_steps(index, q, steps)

        self._prepare(prepare)
        self._exchange(f"starting queue {index}", steps, self._defer("QueueReady"), after[0])

    def _queue_steps(self, index: int, q: QueueRegisters, steps: list[Step]) -> None:
        """Loop-side set-up of a live queue (fds, relay, offload); its messages go to
        `steps`. Kicks written before the backend has the ring wait in the eventfd."""
        if index in self.live:
            return
        self._backend()
        if not self.foreign_mapping and not self.backend_maps_grants:
            self._relay_queue_steps(index, q, steps)
            return
        addrs = (
            self._uva(q.desc, 16 * q.num),
            self._uva(q.driver, 6 + 2 * q.num),
            self._uva(q.device, 6 + 8 * q.num),
        )
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = self._call_eventfd()
        live = self.live[index] = _LiveQueue(
            index, kick, call, avail_gpa=q.driver, used_gpa=q.device
        )
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
        num = q.num  # read now: a reset may clear the register before the worker runs
        steps.append(lambda v: self._start_ring(v, index, num, addrs, kick, call))

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

    def _quiesce(self, index: int, live: _LiveQueue) -> None:
        """Stop xvf's side of a queue at once: no kick reaches the backend through
        xvf, no completion of it reaches the guest."""
        self.state.set_kick_fd(index, -1)
        self.loop.remove_fd(live.call_fd)
        if live.relay is not None:
            self.loop.remove_fd(live.relay.guest_kick_fd)
            live.relay.quiesce()

    def _close_live(self, index: int, live: _LiveQueue) -> None:
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
        if not self.live and not self.retiring:
            self._release_irqfd()

    def _stop_rings(self, stopping: dict[int, _LiveQueue], what: str, token: int) -> None:
        """Let the backend complete what it holds, stop its rings (GET_VRING_BASE), then
        free xvf's side and answer the vCPU: no completion from before reaches rings
        the guest sets up afterwards."""
        held = self.params.dev_type.held_queues
        watches: dict[int, _RingWatch | None] = {}
        for index, live in stopping.items():
            self._quiesce(index, live)
            self.retiring.add(live)
            # Receive and event queues keep their buffers: nothing to wait for there.
            watches[index] = None if index in held else self._ring_watch(live)
        if self.vhost is None:
            for index, live in stopping.items():
                self._close_live(index, live)
            self._release_watches(watches)
            self._answer(token)
            return
        vhost = self.vhost
        deadline: list[float] = []  # one for the whole reset, set when it starts

        def stop_ring(v: VhostUserFrontend, index: int) -> None:
            if not deadline:
                deadline.append(time.monotonic() + DRAIN_LIMIT_S)
            self._stop_ring(v, index, watches[index], deadline[0], vhost)

        def stop_all(v: VhostUserFrontend) -> None:
            try:
                for index in stopping:
                    stop_ring(v, index)
            finally:  # on the worker, before anything may unmap what they view
                self._release_watches(watches)

        def freed(_error: BaseException | None) -> None:
            for index, live in stopping.items():
                self._close_live(index, live)

        self._exchange(what, [stop_all], token, freed)

    def _stop_ring(
        self,
        v: VhostUserFrontend,
        index: int,
        watch: _RingWatch | None,
        deadline: float,
        vhost: VhostUserFrontend,
    ) -> None:
        """On the worker: let the backend complete what it was given, then stop the ring.

        Drained first, because GET_VRING_BASE does not wait for requests in flight
        in every backend: qemu-storage-daemon answers at once, closes its call fd,
        and a late completion then breaks its session ("Error writing eventfd")."""
        if watch is not None:
            target = watch.avail()  # the guest is resetting: nothing new is published
            while watch.used() != target and time.monotonic() < deadline:
                if self.stopped or vhost is not self.vhost:
                    break  # the connection is gone: nothing left to wait for
                time.sleep(0.001)
        v.set_vring_enable(index, False)
        base = v.get_vring_base(index)
        if watch is not None and watch.used() != base:
            raise VhostUserError(
                f"{self.label}: queue {index}: {(base - watch.used()) & 0xFFFF} request(s) "
                f"still in the backend {DRAIN_LIMIT_S}s after the reset began"
            )

    def _ring_watch(self, live: _LiveQueue) -> _RingWatch | None:
        """Readers of the avail and used index of the ring the backend works on, where
        xvf can see it: the shadow ring, or guest RAM when foreign-mapped. Made on the
        loop thread; read by the worker; released by it when the reset is done."""
        if live.relay is not None:
            relay = live.relay
            return _RingWatch(relay.shadow_avail_idx, relay.backend_used_idx)
        if self.foreign_mapping and self.memory is not None and live.used_gpa:
            try:
                avail = self.memory.view(live.avail_gpa + 2, 2).cast("H")
                used = self.memory.view(live.used_gpa + 2, 2).cast("H")
            except XvfError:
                return None
            return _RingWatch(lambda: avail[0], lambda: used[0], [avail, used])
        return None  # grant regions: only the backend maps those rings

    @staticmethod
    def _release_watches(watches: dict[int, _RingWatch | None]) -> None:
        for watch in watches.values():
            if watch is not None:
                watch.release()

    def queue_reset(self, index: int) -> None:
        live = self.live.pop(index, None)
        if live is not None:
            self._stop_rings({index: live}, f"stopping queue {index}", self._defer("QueueReset"))

    def device_reset(self) -> None:
        self.device_resets += 1
        stopping = dict(self.live)
        self.live.clear()
        if stopping:
            self._stop_rings(stopping, "resetting the device", self._defer("reset"))
        if self.backend_maps_grants:
            # The table names the rings, which a re-initialised driver allocates anew.
            self.mem_table_sent = False

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > self.params.dev_type.config_size:
            return 0
        return int.from_bytes(self.config_cache[offset : offset + size], "little")

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
        data = value.to_bytes(size, "little")
        cache = bytearray(self.config_cache)
        cache[offset : offset + size] = data
        self.config_cache = bytes(cache)  # the guest reads back what it wrote at once
        size_all = self.params.dev_type.config_size
        self._config_writes += 1
        seq = self._config_writes
        fresh: list[bytes] = []
        steps: list[Step] = [
            lambda v: v.set_config(offset, data),
            lambda v: fresh.append(v.get_config(0, size_all)),
        ]

        def refreshed(error: BaseException | None) -> None:
            # Only the latest write's refresh: an earlier one read before it landed.
            if error is None and fresh and seq == self._config_writes:
                self.config_cache = bytes(fresh[0])

        self._exchange("writing config space", steps, after=refreshed)

    # -- failures and teardown ---------------------------------------------------
    def _backend(self) -> VhostUserFrontend:
        if self.vhost is None:
            raise VhostUserError(f"{self.label}: no backend connected")
        return self.vhost

    def _guest_broke_ring(self, why: str) -> None:
        """The guest corrupted a ring the relay reads: stop and say so, once."""
        self._guest_breaks(logging.ERROR, "%s: guest broke its ring (%s): device marked "
                           "DEVICE_NEEDS_RESET", self.label, why)  # fmt: skip
        if self.regs is not None:
            self.regs.needs_reset()

    def _on_hangup(self, vhost: VhostUserFrontend) -> None:
        """The worker saw the idle connection readable: EOF or garbage."""
        if vhost is not self.vhost:
            return
        log.error("%s: backend %s closed the connection", self.label, self.params.socket_path)
        self._lose_backend()

    def _lose_backend(self) -> None:
        self.backend_losses += 1
        self._drop_backend()
        if self.regs is not None:
            self.regs.needs_reset()
        if self.on_backend_lost is not None:
            self.on_backend_lost(self)

    def _drop_backend(self) -> None:
        """Forget the connection and what the backend was given.

        The socket is shut down first: a job blocked on it fails at once and a drain
        sees its connection gone, so the worker is idle within moments; released then,
        synchronously (stop() returns with Dom0 holding none of the guest's pages, and
        no fd is closed that a job could still send). Only if the worker is not idle
        by WORKER_LET_GO_S is the release left to run after it."""
        vhost, self.vhost = self.vhost, None
        if vhost is not None:
            vhost.shutdown()
        idle = self.worker.idle or self.worker.wait_idle(WORKER_LET_GO_S)
        lives = [*self.live.items(), *((live.index, live) for live in self.retiring)]
        self.live.clear()
        for index, live in lives:
            self._quiesce(index, live)
        shadow, self.shadow = self.shadow, None
        mapper, self.grant_mapper = self.grant_mapper, None
        self.mem_table_sent = False

        def release(_result: object = None, _error: BaseException | None = None) -> None:
            for index, live in lives:
                self._close_live(index, live)
            if shadow is not None:
                shadow.close()
            if mapper is not None:
                mapper.close()

        if idle:
            if vhost is not None:
                self._close_now(vhost)
            release()
            return
        log.warning("%s: backend worker still busy; releasing after it", self.label)
        if vhost is not None:
            self._close_on_worker(vhost)
        self.worker.submit(lambda: None, release)

    @property
    def backend_connected(self) -> bool:
        return self.vhost is not None

    def check(self, now: float) -> None:
        """Every tick: give up on a backend that keeps a vCPU waiting too long; try
        to reconnect a lost one."""
        stuck = self.worker.stuck_for
        for _since, what in self._waiting.values():
            # The worker's own time on it: not how long its answer waited for this
            # loop (a slow loop is not the backend's fault).
            if stuck >= BACKEND_ANSWER_LIMIT_S:
                self.backend_stalls += 1
                log.error(
                    "%s: backend %s has not answered (%s) for %.1fs: device marked "
                    "DEVICE_NEEDS_RESET, connection dropped and re-made",
                    self.label,
                    self.params.socket_path,
                    what,
                    stuck,
                )
                if self.vhost is not None:
                    self._lose_backend()
                for token in list(self._waiting):
                    self._answer(token)
                break
        if self.vhost is None and not self.stopped:
            self._try_reconnect(now)

    def _try_reconnect(self, now: float) -> None:
        """Reconnect to a backend that went away, once its socket is back.

        The guest was told DEVICE_NEEDS_RESET when the backend left; its reset
        and re-initialisation then run against the new connection. A socket
        that is there but refuses us is retried with a growing delay (to 5 s).
        """
        if self._connecting or now < self._next_reconnect:
            return
        if not os.path.exists(self.params.socket_path):
            return
        self._connecting = True

        def reconnected(conn: _Connection | None, error: BaseException | None) -> None:
            self._connecting = False
            if self.stopped:
                if conn is not None:
                    self._discard(conn)
                return
            if error is not None or conn is None:
                self._reconnect_delay = min(5.0, max(0.2, 2 * self._reconnect_delay))
                self._next_reconnect = time.monotonic() + self._reconnect_delay
                log.warning(
                    "%s: reconnect to %s failed (next try in %.1fs): %s",
                    self.label,
                    self.params.socket_path,
                    self._reconnect_delay,
                    error,
                )
                return
            self._install(conn)
            self._reconnect_delay = 0.0
            self.reconnects += 1
            log.info("%s: reconnected to backend %s", self.label, self.params.socket_path)

        self.worker.submit(self._handshake, reconnected)

    # -- status ------------------------------------------------------------------
    def _memory_strategy(self) -> str:
        """How the connected backend reaches guest memory (see _mem_table_steps)."""
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
                "backend_stalls": self.backend_stalls,
                "reconnects": self.reconnects,
                "relay_requests": relayed,
                "relay_bytes": copied,
                "worst_backend_wait_ms": round(self.worst_wait_s * 1000, 1),
            },
        }

    def stop(self) -> None:
        """Take the window off the guest's IOREQ server, release the rings, the kernel
        offload and the guest's memory, before returning: the caller destroys the IOREQ
        server and tells the toolstack Closed next, and Xen cannot tear a domain down
        while Dom0 still holds its pages. Never waits for the backend: it sees the
        connection close and stops its rings itself."""
        if self.stopped:
            return
        self.stopped = True
        if self.attached:
            # Xen stops sending this window first; a vCPU already waiting is answered.
            self.guest.detach(self.params.base, MMIO_WINDOW)
            self.attached = False
        self._waiting.clear()
        self.state.answer_all()
        self._drop_backend()
        if self.state.irq is not None and self.state.irq.level:
            try:
                self.state.irq.set(0)
            except XvfError:
                pass
        memory, self.memory = self.memory, None
        if memory is not None:
            if self.worker.idle:
                memory.close()
            else:  # after the job that still reads guest RAM
                self.worker.submit(lambda: None, lambda _r, _e: memory.close())
        self.worker.stop()
