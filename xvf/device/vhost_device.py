"""One guest's virtio device served by a vhost-user backend.

The `DeviceModel` behind the device's register file (xvf.protocols.virtio_mmio):
the guest's status transitions drive the vhost-user connection. Its pieces:

| piece | module | owns |
|---|---|---|
| register file | xvf.protocols.virtio_mmio, `MmioState` | what the guest reads, writes |
| the backend's thread | xvf.device.backend_worker | every vhost-user exchange, in order |
| memory strategy | xvf.device.memory | how the backend reaches guest memory |
| live queues | xvf.device.queues | kick/call fds, relays |
| kernel offload | xvf.device.offload | privcmd ioeventfd/irqfd |
| config space | xvf.device.config_space | the cache config reads answer |
| reconnection | xvf.device.reconnect | when to try a lost backend again |

What stays here is the life cycle: the handshake, the exchanges a guest's access
waits for, resets, and giving a backend up.

Threads: everything here runs on the daemon's loop thread (a guest's own service
thread, if it has one, touches only the hot registers, xvf.hotpath._ioreq) except
the vhost-user exchanges, which run on the device's `BackendWorker` so that no backend can hold
up another guest's ioreqs. An access whose answer depends on the backend
(DRIVER_OK, a queue enabled or reset, a device reset) is deferred: that one vCPU
waits in its ioreq slot until the worker is done, at most BACKEND_ANSWER_LIMIT_S;
then the device is given up (DEVICE_NEEDS_RESET, the connection dropped and
re-made) and the vCPU answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xvf.device.backend_worker import BackendWorker, Mailbox
from xvf.device.config_space import DEFAULT_FS_TAG, ConfigCache
from xvf.device.memory import BackendMemory, RingWatch, choose
from xvf.device.offload import KernelOffload
from xvf.device.queues import LiveQueue, Queues, Step
from xvf.device.reconnect import Reconnect
from xvf.device.types import DeviceType
from xvf.errors import ConfigError, VhostUserError, XvfError
from xvf.guest.guest import Guest
from xvf.hotpath._ioreq import MmioState, ServiceLoop
from xvf.hotpath._layout import VIRTIO_MMIO_DEV_SIZE
from xvf.platform.interface import Platform
from xvf.protocols import virtio as V
from xvf.protocols.vhost_user import VhostUserFrontend
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF
from xvf.protocols.virtio_mmio import QueueRegisters, VirtioMmioRegisters
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.device")

MMIO_WINDOW = VIRTIO_MMIO_DEV_SIZE  # libxl gives every virtio-mmio device 0x200 bytes
# How long the worker may spend on what a waiting vCPU needs before the device is given
# up. Linux's virtio-mmio driver cannot be told "later", so the bound is what protects
# its guest; it is above the 5 s after which a single vhost-user message times out
# (xvf.protocols.vhost_user), because a backend mapping a big guest's memory
# (SET_MEM_TABLE) legitimately takes seconds: 2-3 s for 256 MiB under TCG on the rig,
# 5.4 s on a loaded host. So the memory-table replies may take all of it.
BACKEND_ANSWER_LIMIT_S = 8.0
# After a ring is stopped, how long its requests still in the backend may take to
# complete before the reset goes ahead without them (their late completions would
# land in rings the guest re-allocates).
DRAIN_LIMIT_S = 1.5
# How long the service loop lets a worker finish once its backend's socket is shut
# down (what is left is local: no backend is waited for).
WORKER_LET_GO_S = 0.2
# What xvf uses when a backend offers it. XEN_MMAP when the platform can describe
# guest memory that way (always on Xen, where backends must map guests themselves).
WANTED_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS


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
class _Connection:
    """What a handshake (on the worker) made and learnt."""

    vhost: VhostUserFrontend
    features: int
    config: bytes | None  # None: the backend has no CONFIG protocol feature
    memory: BackendMemory
    took_ram: bool  # this handshake acquired the guest's RAM mapping for the device


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
        self.state = MmioState()
        self.regs: VirtioMmioRegisters | None = None
        # Allowed per connection by its memory strategy (relayed queues need xvf).
        self.offload = KernelOffload(
            self.label, platform, guest, params.base, params.irq, self.state, wanted=offload
        )
        self.queues = Queues(
            loop, self.state, self.offload, self._relayed_ring_broken, hot_loop=guest.loop
        )
        self.config = ConfigCache(self.label, params.dev_type, params.fs_tag)
        self.reconnect = Reconnect(params.socket_path)
        self.memory: BackendMemory | None = None  # the connected backend's strategy
        self.memory_name = "none"  # kept while reconnecting, for `xvf status`
        self.holds_ram = False  # foreign mapping: a user of the guest's RAM mapping
        self.backend_features = 0
        self._ring_breaks = RateLimitedLog(log)
        self._waiting: dict[int, tuple[float, str]] = {}  # deferred access -> since, what
        # counters for `xvf status` (the hot-path ones live in self.state)
        self.device_resets = 0
        self.backend_losses = 0
        self.backend_stalls = 0
        self.reconnects = 0
        self.worst_wait_s = 0.0  # longest a vCPU waited for this device's backend

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
            "the kernel (privcmd ioeventfd)" if self.offload.notify else "xvf (ioreq service loop)",
            "the kernel (privcmd irqfd)"
            if self.offload.interrupts
            else "xvf (dm_op set_irq_level)",
        )

    def _handshake(self) -> _Connection:
        """On the worker: connect, learn what the backend offers, choose how it will
        reach guest memory."""
        p = self.params
        # A vCPU may wait for the memory table as long as for anything it needs.
        vhost = VhostUserFrontend(
            p.socket_path, mem_timeout=BACKEND_ANSWER_LIMIT_S, label=self.label
        )
        took_ram = False
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
            # Refused now (a foreign-mapped guest with a backend that cannot map it),
            # before the guest can start a driver that would hang.
            memory = choose(
                self.label,
                self.foreign_mapping,
                bool(vhost.protocol_features & PF.XEN_MMAP),
                self.platform,
                p.domid,
                self.guest.ram,
                p.socket_path,
            )
            if self.foreign_mapping and not self.holds_ram:
                # Here, off the service loop: mapping a guest's RAM takes seconds on a
                # slow host, and no other guest may wait for it.
                self.guest.ram.acquire()
                took_ram = True
        except BaseException:
            vhost.close()
            raise
        self.worker.watch(vhost.fileno(), lambda: self._on_hangup(vhost))
        return _Connection(vhost, features, config, memory, took_ram)

    def _install(self, conn: _Connection) -> None:
        """On the loop thread: adopt a connection the worker made."""
        p = self.params
        if conn.took_ram:
            if self.holds_ram:
                self.guest.ram.release()  # two handshakes raced; one use is enough
            self.holds_ram = True
        self.vhost = conn.vhost
        self.memory = conn.memory
        self.memory_name = conn.memory.name
        self.offload.allow(conn.memory.direct_rings)
        self.backend_features = features = conn.features
        self.config.connect(conn.config)  # refreshed at every reconnection
        guest_features = features & (V.DEVICE_SPECIFIC_MASK | V.TRANSPORT_BITS_FROM_BACKEND)
        guest_features &= ~p.dev_type.withheld_features
        guest_features |= 1 << V.F_VERSION_1
        guest_features = conn.memory.guest_features(guest_features)
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
        conn.memory.close()
        if conn.took_ram:
            self.guest.ram.release()

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

    def _connected_memory(self) -> BackendMemory:
        if self.vhost is None or self.memory is None:
            raise VhostUserError(f"{self.label}: no backend connected")
        return self.memory

    # -- DeviceModel -------------------------------------------------------------
    def features_ok(self, driver_features: int) -> bool:
        refusal = self.memory.refuses_driver(driver_features) if self.memory is not None else None
        if refusal is not None:
            log.warning("%s: %s", self.label, refusal)
            return False
        return self.vhost is not None

    def driver_ok(self, queues: list[QueueRegisters], driver_features: int) -> None:
        memory = self._connected_memory()
        backend_bits = driver_features & self.backend_features
        if self.backend_features & F_PROTOCOL_FEATURES:
            backend_bits |= F_PROTOCOL_FEATURES
        steps: list[Step] = [lambda v: v.set_features(backend_bits)]
        starting = [(index, q) for index, q in enumerate(queues) if q.ready]
        self._start(memory, "starting the device", "DRIVER_OK", queues, starting, steps)

    def queue_ready(self, index: int, q: QueueRegisters) -> None:
        """A queue enabled after DRIVER_OK."""
        if index in self.queues or self.regs is None:
            return
        memory = self._connected_memory()
        self._start(memory, f"starting queue {index}", "QueueReady", self.regs.queues,
                    [(index, q)], [])  # fmt: skip

    def _start(
        self,
        memory: BackendMemory,
        what: str,
        access: str,
        queues: Sequence[QueueRegisters],
        starting: list[tuple[int, QueueRegisters]],
        steps: list[Step],
    ) -> None:
        """Prepare on the loop thread what the `starting` queues need: a memory table
        if the backend's does not cover them (grant regions map rings in advance, so a
        new ring needs a new table; the mappings are made here) and xvf's side of each
        queue; then send it all on the worker while the access waits. A preparation
        that fails (a ring outside the guest's memory...) undoes what it set up, so
        that nothing half-made outlives it."""
        live_before = set(self.queues.live)
        table_before = memory.table_current
        try:
            sent = self._table_steps(memory, queues, [q for _, q in starting], steps)
            for index, q in starting:
                if index not in self.queues:
                    steps.append(memory.start_queue(index, q, self.queues))
        except BaseException:
            for index in [i for i in self.queues.live if i not in live_before]:
                self.queues.discard(index)
            memory.table_current = table_before  # the table it prepared was never sent
            raise
        self._exchange(what, steps, self._defer(access), sent)

    def _table_steps(
        self,
        memory: BackendMemory,
        queues: Sequence[QueueRegisters],
        starting: Sequence[QueueRegisters],
        steps: list[Step],
    ) -> Callable[[BaseException | None], None] | None:
        """Add the memory table to `steps` if `starting` queues need one; returns what
        to run once it is sent."""
        if not memory.needs_table(starting):
            return None
        log.info("%s: guest memory for the backend: %s", self.label, memory.description)
        regions = memory.table(queues)
        steps.append(lambda v: v.set_memory(regions))
        memory.table_current = True

        def sent(_error: BaseException | None) -> None:
            if memory is self.memory:
                memory.table_sent(regions)

        return sent

    def queue_reset(self, index: int) -> None:
        stopping = self.queues.take([index])
        if stopping:
            self._stop_rings(stopping, f"stopping queue {index}", self._defer("QueueReset"))

    def device_reset(self) -> None:
        self.device_resets += 1
        stopping = self.queues.take(list(self.queues.live))
        if stopping:
            self._stop_rings(stopping, "resetting the device", self._defer("reset"))
        if self.memory is not None:
            self.memory.device_reset()

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        forward = self.config.write(offset, size, value, connected=self.vhost is not None)
        if forward is None:
            return
        data, seq = forward
        size_all = self.params.dev_type.config_size
        fresh: list[bytes] = []
        steps: list[Step] = [
            lambda v: v.set_config(offset, data),
            lambda v: fresh.append(v.get_config(0, size_all)),
        ]

        def refreshed(error: BaseException | None) -> None:
            if error is None and fresh:
                self.config.refreshed(seq, fresh[0])

        self._exchange("writing config space", steps, after=refreshed)

    # -- resets ------------------------------------------------------------------
    def _stop_rings(self, stopping: dict[int, LiveQueue], what: str, token: int) -> None:
        """Let the backend complete what it holds, stop its rings (GET_VRING_BASE), then
        free xvf's side and answer the vCPU: no completion from before reaches rings
        the guest sets up afterwards. `stopping` is quiesced already."""
        held = self.params.dev_type.held_queues
        watches: dict[int, RingWatch | None] = {}
        for index, live in stopping.items():
            # Receive and event queues keep their buffers: nothing to wait for there.
            watch = None
            if index not in held and self.memory is not None:
                watch = self.memory.ring_watch(live)
            watches[index] = watch
        if self.vhost is None:
            for index, live in stopping.items():
                self.queues.close(index, live)
            self._release_watches(watches)
            self._answer(token)
            return
        vhost = self.vhost
        deadline: list[float] = []  # one for the whole reset, set when it starts

        def stop_all(v: VhostUserFrontend) -> None:
            try:
                for index in stopping:
                    if not deadline:
                        deadline.append(time.monotonic() + DRAIN_LIMIT_S)
                    self._stop_ring(v, index, watches[index], deadline[0], vhost)
            finally:  # on the worker, before anything may unmap what they view
                self._release_watches(watches)

        def freed(_error: BaseException | None) -> None:
            for index, live in stopping.items():
                self.queues.close(index, live)

        self._exchange(what, [stop_all], token, freed)

    def _stop_ring(
        self,
        v: VhostUserFrontend,
        index: int,
        watch: RingWatch | None,
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

    @staticmethod
    def _release_watches(watches: dict[int, RingWatch | None]) -> None:
        for watch in watches.values():
            if watch is not None:
                watch.release()

    # -- failures and teardown ---------------------------------------------------
    def _relayed_ring_broken(self, why: str) -> None:
        """The guest, or the backend, corrupted a ring the relay reads (`why` says which):
        the queue stopped; say so, once, and ask the driver for a reset."""
        self._ring_breaks(logging.ERROR, "%s: %s: device marked DEVICE_NEEDS_RESET",
                          self.label, why)  # fmt: skip
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
        lives = self.queues.take_all()
        memory, self.memory = self.memory, None

        def release(_result: object = None, _error: BaseException | None = None) -> None:
            for index, live in lives:
                self.queues.close(index, live)
            if memory is not None:  # after the queues: a relay unmaps through it
                memory.close()

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
        # The worker's own time on it: not how long its answer waited for this loop
        # (a slow loop is not the backend's fault).
        stuck = self.worker.stuck_for
        if self._waiting and stuck >= BACKEND_ANSWER_LIMIT_S:
            what = next(iter(self._waiting.values()))[1]
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
        if self.vhost is None and not self.stopped and self.reconnect.due(now):
            self.worker.submit(self._handshake, self._reconnected)

    def _reconnected(self, conn: _Connection | None, error: BaseException | None) -> None:
        if self.stopped:
            self.reconnect.abandoned()
            if conn is not None:
                self._discard(conn)
            return
        if error is not None or conn is None:
            delay = self.reconnect.failed()
            log.warning("%s: reconnect to %s failed (next try in %.1fs): %s", self.label,
                        self.params.socket_path, delay, error)  # fmt: skip
            return
        self._install(conn)
        self.reconnect.succeeded()
        self.reconnects += 1
        log.info("%s: reconnected to backend %s", self.label, self.params.socket_path)

    # -- status ------------------------------------------------------------------
    def status(self) -> dict:
        """What `xvf status` shows of this device: in-memory state only, never the backend."""
        p = self.params
        relayed, copied, bad = self.queues.relay_counters()
        return {
            "label": self.label,
            "type": p.dev_type.name,
            "devid": p.devid,
            "base": p.base,
            "irq": p.irq,
            "mapping": "foreign" if self.foreign_mapping else "grant",
            "memory": self.memory_name,
            "queue_notify": "kernel ioeventfd" if self.offload.notify else "xvf",
            "interrupts": "kernel irqfd" if self.offload.interrupts else "xvf",
            "backend_socket": p.socket_path,
            "backend": "connected" if self.vhost is not None else "reconnecting",
            "driver_status": self.state.status,
            "live_queues": len(self.queues),
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
        if self.holds_ram:
            self.holds_ram = False
            if self.worker.idle:
                self.guest.ram.release()
            else:  # after the job that still reads guest RAM
                self.worker.submit(lambda: None, lambda _r, _e: self.guest.ram.release())
        self.worker.stop()
