"""The daemon: watches xenstore for virtio devices and serves each one.

One `ServiceLoop` thread (Cython, epoll) carries the ioreqs, the backends'
interrupts, xenstore watch events and signals. Nothing on it waits for a
backend: each device's vhost-user traffic runs on its own worker thread
(xvf.device.backend_worker), whose results come back through the loop's mailbox.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import dataclass

from xvf import __version__
from xvf.daemon.discovery import (
    VirtioDeviceNode,
    publish_state,
    read_virtio_devices,
    watch_paths,
)
from xvf.daemon.systemd import Notifier
from xvf.daemon.takeover import ServerRecord
from xvf.device.backend_worker import Mailbox
from xvf.device.config_space import DEFAULT_FS_TAG, fs_tag_bytes
from xvf.device.types import device_type, socket_name
from xvf.device.vhost_device import MMIO_WINDOW, DeviceParams, VhostDevice
from xvf.errors import ConfigError, XenStoreError, XvfError
from xvf.guest.guest import Guest
from xvf.hotpath._ioreq import MmioState, ServiceLoop
from xvf.platform.interface import Platform
from xvf.protocols.virtio_mmio import PlaceholderRegisters
from xvf.protocols.xenbus import (
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CONNECTED,
    XENBUS_STATE_INITIALISING,
)
from xvf.protocols.xenstore import XenStore, XenStoreRequestError

log = logging.getLogger("xvf.daemon.frontend")

TICK_MS = 200  # how often pending work (sockets to wait for) is looked at


@dataclass
class _Pending:
    node: VirtioDeviceNode
    params: DeviceParams
    deadline: float
    announced: bool = False
    next_try: float = 0.0  # a socket that refused us is tried again from then on
    delay: float = 0.0


def _refused_connection(exc: BaseException) -> bool:
    """The backend socket exists but nobody accepts on it (yet)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(cause, OSError) and cause.errno in (errno.ECONNREFUSED, errno.ENOENT)


def _type_name(node: VirtioDeviceNode) -> str | None:
    try:
        return device_type(node.device_id).name
    except ConfigError:
        return None


def _thread_status(loop: ServiceLoop) -> dict:
    """How a guest's service thread waits: a read of its event channel while that is all
    it watches, epoll_wait otherwise; and how often it woke each way."""
    return {
        "waits_in": "read" if loop.waits_on_channel else "epoll_wait",
        "wakeups": loop.wakeups,
        "channel_reads": loop.direct_waits,
    }


def node_label(node: VirtioDeviceNode) -> str:
    """domN/<type>M as VhostDevice labels it; "device" for a type xvf does not know."""
    return f"dom{node.domid}/{_type_name(node) or 'device'}{node.devid}"


class Frontend:
    def __init__(
        self,
        platform: Platform,
        socket_dir: str,
        foreign_mapping: bool = False,
        socket_timeout: float = 30.0,
        offload: bool = True,
        mapping: str | None = None,
        fs_tag: str = DEFAULT_FS_TAG,
        poll_us: float = 0.0,
        guest_threads: bool = True,
    ) -> None:
        """`mapping`: grant, foreign or per-device (each device's grant_usage decides);
        without it, `foreign_mapping` picks foreign or grant."""
        self.platform = platform
        self.offload = offload
        self.socket_dir = socket_dir
        self.mapping = mapping or ("foreign" if foreign_mapping else "grant")
        self.socket_timeout = socket_timeout
        fs_tag_bytes(fs_tag)  # a bad tag stops the daemon at start, not each fs device later
        self.fs_tag = fs_tag
        self.own_domid = platform.own_domid()
        self.evtchn = platform.open_event_channel()
        self.loop = ServiceLoop(self.evtchn.channel)
        self.loop.set_polling(poll_us)
        self.poll_us = poll_us
        self.guest_threads = guest_threads  # each guest on a service thread of its own
        self.mailbox = Mailbox(self.loop)
        self.xs = XenStore(platform.xenstore_path())
        # IOREQ servers created by this daemon, and those a killed one left (xvf.daemon.takeover)
        self.record = ServerRecord(self.xs, self.own_domid)
        self.predecessors: dict[int, list[int]] = self.record.recorded()
        self.devices: dict[tuple[int, int], VhostDevice] = {}
        self.guests: dict[int, Guest] = {}  # domid -> its one IOREQ server
        self.pending: dict[tuple[int, int], _Pending] = {}
        # Devices whose backend handshake runs on their worker now.
        self.starting: dict[tuple[int, int], tuple[_Pending, VhostDevice]] = {}
        self.failed: set[tuple[int, int]] = set()
        self.nodes: dict[tuple[int, int], VirtioDeviceNode] = {}  # as last read
        # Refused devices whose window answers "no device here"
        # (xvf.protocols.virtio_mmio.PlaceholderRegisters).
        self.placeholders: dict[tuple[int, int], VirtioDeviceNode] = {}
        self.instances: dict[tuple[int, int], int] = {}
        self.published: dict[tuple[int, int], int] = {}  # xenstore state xvf last wrote
        self.reported: set[str] = set()  # xenstore entry errors said (once each)
        self.notifier = Notifier()  # systemd, when started with Type=notify
        self.started = time.monotonic()
        self.running = False
        self.failure: str | None = None  # why the daemon stopped on its own

    # -- discovery ------------------------------------------------------------
    def _instance(self, key: tuple[int, int], name: str) -> int:
        """N of <name>.sock<N>: the smallest number no live device of that name holds."""
        if key in self.instances:
            return self.instances[key]
        taken = {n for k, n in self.instances.items() if self._name_of(k) == name}
        n = 0
        while n in taken:
            n += 1
        self.instances[key] = n
        return n

    def _name_of(self, key: tuple[int, int]) -> str | None:
        item = self.devices.get(key) or self.pending.get(key)
        if item is None and key in self.starting:
            item = self.starting[key][1]
        return item.params.dev_type.name if item is not None else None

    def rescan(self) -> None:
        nodes, errors = read_virtio_devices(self.xs, self.own_domid)
        messages = {str(err) for err in errors}
        for msg in sorted(messages - self.reported):  # every rescan sees them again
            log.error("ignoring xenstore entry: %s", msg)
        self.reported = messages
        present = {(n.domid, n.devid): n for n in nodes if not n.closing}
        for key, node in present.items():
            if (
                node.state == XENBUS_STATE_INITIALISING
                and self.published.get(key) in (XENBUS_STATE_CONNECTED, XENBUS_STATE_CLOSED)
                and (key in self.devices or key in self.placeholders or key in self.failed)
            ):
                # Written anew by the toolstack after xvf answered it: a guest destroyed
                # and re-created with the same domain id between two rescans.
                self._forget(key, "the toolstack wrote it anew (a new guest, same domain id)")
        closing = {(n.domid, n.devid): n for n in nodes if n.closing}
        self.nodes = {**present, **closing}
        self.published = {k: v for k, v in self.published.items() if k in self.nodes}
        for key in list(self.devices):
            if key in closing:
                self._remove(key, "the toolstack closes it (xenstore state Closing)")
            elif key not in present:
                self._remove(key, "its xenstore entry went away")
        for key in list(self.pending):
            if key not in present:
                del self.pending[key]
                self.instances.pop(key, None)
                self._release_guest(key[0])
        for key in list(self.starting):
            if key not in present:
                self.starting.pop(key)[1].stop()
                self.instances.pop(key, None)
                self._release_guest(key[0])
        for key in list(self.placeholders):
            if key not in present:
                self._drop_placeholder(key)
        for key, node in closing.items():
            # libxl waits for Closed before it removes the device (xl destroy); every
            # rescan until then sees the node again, and one answer is enough.
            if self.published.get(key) != XENBUS_STATE_CLOSED:
                self._publish(node, XENBUS_STATE_CLOSED)
        self.failed &= set(present)
        for key, node in sorted(present.items()):
            if key in self.devices or key in self.pending or key in self.failed:
                continue
            if key in self.starting:
                continue
            try:
                dev_type = device_type(node.device_id)
            except ConfigError as exc:
                log.error("%s: %s", node_label(node), exc)
                self._refuse(key, node)
                continue
            n = self._instance(key, dev_type.name)
            params = DeviceParams(
                domid=node.domid,
                devid=node.devid,
                dev_type=dev_type,
                base=node.base,
                irq=node.irq,
                grant_usage=node.grant_usage,
                socket_path=os.path.join(self.socket_dir, socket_name(dev_type, n)),
                fs_tag=self.fs_tag,
            )
            self.pending[key] = _Pending(node, params, time.monotonic() + self.socket_timeout)
        self._start_pending()

    def _start_pending(self) -> None:
        now = time.monotonic()
        for key, item in list(self.pending.items()):
            path = item.params.socket_path
            if now < item.next_try:
                continue
            if not os.path.exists(path):
                if not item.announced:
                    log.info(
                        "%s: waiting up to %.0fs for backend socket %s",
                        item.params.label,
                        self.socket_timeout,
                        path,
                    )
                    item.announced = True
                if now >= item.deadline:
                    log.error(
                        "%s: no backend socket %s after %.0fs; device not served",
                        item.params.label,
                        path,
                        self.socket_timeout,
                    )
                    del self.pending[key]
                    self._refuse(key, item.node)
                continue
            del self.pending[key]
            try:
                guest = self._guest(item.params.domid)
                device = VhostDevice(
                    item.params,
                    self.platform,
                    self.loop,
                    guest,
                    self._foreign_for(item.node),
                    self.mailbox,
                    on_backend_lost=self._backend_lost,
                    offload=self.offload,
                )
            except (XvfError, OSError) as exc:
                log.error("%s: cannot start: %s", item.params.label, exc)
                self._refuse(key, item.node)
                continue
            self.starting[key] = (item, device)
            try:
                device.start(functools.partial(self._started, key))
            except (XvfError, OSError) as exc:
                self._started(key, device, exc)

    def _started(
        self, key: tuple[int, int], device: VhostDevice, error: BaseException | None
    ) -> None:
        """A device's handshake (on its worker) finished: serve it, retry or refuse."""
        entry = self.starting.get(key)
        if entry is None or entry[1] is not device:
            device.stop()  # its xenstore entry went away meanwhile
            return
        item = self.starting.pop(key)[0]
        if error is None:
            self.devices[key] = device
            # Scripts (and the rig) wait for this before unpausing a guest.
            self._publish(item.node, XENBUS_STATE_CONNECTED)
            self._retire_predecessors(key[0])
            return
        device.stop()
        if not isinstance(error, (XvfError, OSError)):
            log.error("%s: cannot start: %r", item.params.label, error)
        elif _refused_connection(error) and time.monotonic() < item.deadline:
            # A stale socket file, or a backend still starting: not an answer yet.
            self._retry_later(key, item, time.monotonic(), error)
            return
        else:
            log.error("%s: cannot start: %s", item.params.label, error)
        self._refuse(key, item.node)

    def _refuse(self, key: tuple[int, int], node: VirtioDeviceNode) -> None:
        """A device xvf will not serve: the guest finds "no device" there, not a data
        abort, and xenstore says Closed."""
        self.failed.add(key)
        try:
            guest = self._guest(node.domid)
            state = MmioState()
            state.handler = PlaceholderRegisters(node_label(node))
            guest.attach(node.base, MMIO_WINDOW, state)
            self.placeholders[key] = node
            log.info(
                "%s: its window %#x now reads as 'no device' (DeviceID 0)",
                node_label(node),
                node.base,
            )
        except (XvfError, OSError) as exc:
            log.error("%s: cannot claim its window: %s", node_label(node), exc)
            self._release_guest(node.domid)
        self._publish(node, XENBUS_STATE_CLOSED)
        self._retire_predecessors(node.domid)

    def _drop_placeholder(self, key: tuple[int, int]) -> None:
        node = self.placeholders.pop(key, None)
        guest = self.guests.get(key[0])
        if node is not None and guest is not None:
            guest.detach(node.base, MMIO_WINDOW)
            self._release_guest(key[0])

    def _publish(self, node: VirtioDeviceNode, state: int) -> None:
        try:
            publish_state(self.xs, node, state)
            self.published[(node.domid, node.devid)] = state
        except XvfError as exc:
            log.warning(
                "%s: cannot publish state %d in %s: %s",
                node_label(node),
                state,
                node.backend_path,
                exc,
            )

    def _retry_later(
        self, key: tuple[int, int], item: _Pending, now: float, exc: BaseException
    ) -> None:
        """Keep a device whose backend refused the connection pending, backing off to 2 s."""
        first = item.delay == 0.0
        item.delay = min(2.0, max(0.2, 2 * item.delay))
        item.next_try = now + item.delay
        if first:
            log.warning(
                "%s: %s; trying again until %.0fs have passed",
                item.params.label,
                exc,
                self.socket_timeout,
            )
        self.pending[key] = item

    def _foreign_for(self, node: VirtioDeviceNode) -> bool:
        """Whether this device is foreign-mapped: the daemon's mode, or in per-device
        mode the device's own grant_usage (0: foreign)."""
        if self.mapping == "per-device":
            return not node.grant_usage
        return self.mapping == "foreign"

    def _guest(self, domid: int) -> Guest:
        """The guest's IOREQ server, created (and enabled) with its first device."""
        guest = self.guests.get(domid)
        if guest is None:
            guest = Guest(
                domid,
                self.platform,
                self.loop,
                self.evtchn,
                own_thread=self.guest_threads,
                poll_us=self.poll_us,
            )
            guest.start()
            self.guests[domid] = guest
            if guest.server is not None:
                self.record.add(domid, guest.server.id)
        return guest

    def _release_guest(self, domid: int) -> None:
        """Destroy the guest's IOREQ server once no device of it is served."""
        guest = self.guests.get(domid)
        starting = any(key[0] == domid for key in self.starting)
        if guest is not None and guest.device_count == 0 and not starting:
            del self.guests[domid]
            self._stop_guest(guest)

    def _stop_guest(self, guest: Guest) -> None:
        server_id = guest.server.id if guest.server is not None else None
        guest.stop()
        if server_id is not None:
            self.record.remove(guest.domid, server_id)

    def _retire_predecessors(self, domid: int) -> None:
        """Once every device of the guest is settled (served or refused) on our own
        server, take over and destroy the servers a killed xvf left for it."""
        if domid not in self.predecessors:
            return
        if any(k[0] == domid for k in (*self.pending, *self.starting)):
            return
        guest = self.guests.get(domid)
        if guest is None or guest.server is None:
            return
        for server_id in self.predecessors.pop(domid):
            if server_id == guest.server.id:
                continue  # the slot was free again and we were given it
            try:
                answered = guest.retire(server_id)
            except (XvfError, OSError) as exc:
                log.warning("dom%d: IOREQ server %d left by an earlier xvf: %s", domid,
                            server_id, exc)  # fmt: skip
            else:
                log.info(
                    "dom%d: replaced IOREQ server %d left by an earlier xvf "
                    "(%d waiting vCPU(s) answered)",
                    domid,
                    server_id,
                    answered,
                )
            self.record.remove(domid, server_id)

    def _backend_lost(self, device: VhostDevice) -> None:
        log.warning(
            "%s: marked DEVICE_NEEDS_RESET; reconnecting when %s is back",
            device.label,
            device.params.socket_path,
        )

    def _forget(self, key: tuple[int, int], why: str) -> None:
        """Drop whatever xvf holds for a device, so the next pass serves it afresh."""
        self._remove(key, why)
        if key in self.placeholders:
            self._drop_placeholder(key)
        self.failed.discard(key)
        self.published.pop(key, None)
        guest = self.guests.get(key[0])
        if guest is not None and not any(k[0] == key[0] for k in self.devices):
            # Its IOREQ server belongs to the dead domain: the new one needs its own.
            for k in [k for k in self.placeholders if k[0] == key[0]]:
                self._drop_placeholder(k)
            self._stop_guest(self.guests.pop(key[0]))

    def _remove(self, key: tuple[int, int], why: str) -> None:
        device = self.devices.pop(key, None)
        self.instances.pop(key, None)
        if device is not None:
            log.info("%s: stopping (%s)", device.label, why)
            device.stop()
            self._release_guest(device.params.domid)

    def _on_xenstore(self) -> None:
        try:
            events = self.xs.pending_events()
            while events:
                self.rescan()
                # Events that came in while rescan() waited for replies were buffered
                # by the client and no longer make its fd readable.
                events = self.xs.pending_events() if self.xs.has_pending_events() else []
        except XenStoreRequestError as exc:  # xenstored refused one request: next event
            log.error("rescanning xenstore: %s", exc)
        except XenStoreError as exc:  # the connection itself
            self._fail(f"the xenstore connection failed: {exc}")

    # -- main loop ------------------------------------------------------------
    def run(self) -> None:
        for i, path in enumerate(watch_paths(self.own_domid)):
            self.xs.watch(path, f"xvf-{i}")
        self.loop.add_reader(self.xs.fileno(), self._on_xenstore)
        self.running = True
        self.rescan()
        log.info(
            "xvf serving (%s platform, %s mapping, sockets in %s)",
            self.platform.name,
            self.mapping,
            self.socket_dir,
        )
        if self.poll_us:
            log.info(
                "polling: spinning up to %g µs on the ioreq slots after each event "
                "before sleeping on the event channel",
                self.poll_us,
            )
        self._notify_served()
        next_tick = 0.0
        while self.running:
            self.loop.run_once(TICK_MS)
            if self.loop.evtchn_lost:
                self._fail(
                    "the event channel is gone (its device broke, or the simulator "
                    "exited): no guest can be served"
                )
                break
            if self.pending:
                self._start_pending()
            # The rest is per tick, not per event: a relayed queue wakes this loop for
            # every batch of requests and of completions.
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + TICK_MS / 1000
            lost = next((g for g in self.guests.values() if g.failure), None)
            if lost is not None:
                # Like the daemon's own handle: it breaks for every guest alike.
                self._fail(f"{lost.label}'s service thread stopped: {lost.failure}")
                break
            for device in list(self.devices.values()):
                try:
                    device.check(now)
                except Exception:  # xvf's own bug: this device only, never the daemon
                    log.exception("%s: checking the device failed", device.label)
            self._notify_served()

    def _fail(self, why: str) -> None:
        """The platform connection died: say so and stop, with a failing exit status
        (a service manager restarts the daemon), never serve nothing quietly."""
        log.error("%s; stopping", why)
        if self.failure is None:  # the first cause, not its consequences
            self.failure = why
        self.running = False

    def _notify_served(self) -> None:
        # Guests with a served device: one still connecting to its backend is not yet.
        self.notifier.served(len({domid for domid, _ in self.devices}), len(self.devices))

    def stop(self) -> None:
        self.running = False
        self.notifier.stop()

    # -- status ---------------------------------------------------------------
    def status(self) -> dict:
        """What `xvf status` shows: assembled from memory, never from a backend or xenstore."""
        guests: dict[int, dict] = {}
        for domid, guest in sorted(self.guests.items()):
            server, ioreq = guest.server, guest.ioreq
            guests[domid] = {
                "domid": domid,
                "ioreq_server": server.id if server is not None else None,
                "vcpus": len(guest.ports),
                "requests": ioreq.requests if ioreq is not None else 0,
                "bad_requests": ioreq.bad_requests if ioreq is not None else 0,
                "invalidates": ioreq.invalidates if ioreq is not None else 0,
                "service_thread": _thread_status(guest.loop) if guest.thread else None,
                "devices": [],
            }
        for node in [*self.placeholders.values(), *(p.node for p in self.pending.values())]:
            guests.setdefault(node.domid, self._absent_guest(node.domid))
        for key, device in sorted(self.devices.items()):
            entry = device.status()
            entry["xenstore_state"] = self.published.get(key)
            guests.setdefault(key[0], self._absent_guest(key[0]))["devices"].append(entry)
        for key, node in sorted(self.placeholders.items()):
            guests[key[0]]["devices"].append(self._node_status(key, node, "refused"))
        for key, (item, _) in sorted(self.starting.items()):
            guests.setdefault(key[0], self._absent_guest(key[0]))
            entry = self._node_status(key, item.node, "connecting")
            entry["backend_socket"] = item.params.socket_path
            guests[key[0]]["devices"].append(entry)
        for key, item in sorted(self.pending.items()):
            entry = self._node_status(key, item.node, "waiting")
            entry["backend_socket"] = item.params.socket_path
            guests[key[0]]["devices"].append(entry)
        for g in guests.values():
            g["devices"].sort(key=lambda d: d["devid"])
        loops = [self.loop, *(g.loop for g in self.guests.values() if g.thread is not None)]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "platform": self.platform.name,
            "mapping": self.mapping,
            "socket_dir": self.socket_dir,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "poll_us": self.poll_us,
            "service_threads": "per-guest" if self.guest_threads else "one",
            "polled_requests": sum(loop.polled for loop in loops),
            "idle_spins": sum(loop.idle_spins for loop in loops),
            "guests": list(guests.values()),
        }

    @staticmethod
    def _absent_guest(domid: int) -> dict:
        # devices waiting for a socket have no IOREQ server yet
        return {"domid": domid, "ioreq_server": None, "vcpus": 0, "requests": 0,
                "bad_requests": 0, "invalidates": 0, "service_thread": None,
                "devices": []}  # fmt: skip

    def _node_status(self, key: tuple[int, int], node: VirtioDeviceNode, backend: str) -> dict:
        return {
            "label": node_label(node),
            "type": _type_name(node),
            "devid": node.devid,
            "base": node.base,
            "irq": node.irq,
            "mapping": None,
            "memory": None,
            "queue_notify": None,
            "interrupts": None,
            "backend_socket": None,
            "backend": backend,
            "xenstore_state": self.published.get(key),
            "counters": None,
        }

    def close(self) -> None:
        for key in list(self.devices):
            self._remove(key, "shutting down")
            node = self.nodes.get(key)
            if node is not None:
                self._publish(node, XENBUS_STATE_CLOSED)
        for key in list(self.starting):
            self.starting.pop(key)[1].stop()
        for key in list(self.placeholders):
            self._drop_placeholder(key)
        for domid in list(self.guests):
            self._stop_guest(self.guests.pop(domid))
        try:
            self.xs.close()
        finally:
            self.mailbox.close()
            self.evtchn.close()
