"""End to end: 4 KiB random reads and writes (50/50) from a guest's virtio-blk driver
through xvf to qemu-storage-daemon, foreign (with and without the Dom0 kernel's
ioeventfd/irqfd) and grant mode, against the same driver and ring talking vhost-user
to QSD directly.

The simulator's Python driver brings the device up; the I/O is then run by a C guest
(benchmarks/c/blk_guest.c) that behaves like Linux's virtio_mmio + virtio_blk (EVENT_IDX,
batched kicks, InterruptStatus read and InterruptACK write per interrupt, no polling of
the used ring) and plays the simulated Xen's side of the ioreq page and event channel
itself (xvf.platform.sim.lend). What stays in the simulator is what the C guest
cannot do alone: set_irq_level dm_ops without irqfd (Python), and the grant copies of
the relay (GNTTABOP_copy, its loop in C: xvf.platform.sim._grant_copy). CPU per I/O
is reported for each party: the C guest, the simulated Xen (this process), xvf, QSD."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time

from benchmarks.c_dm import CDeviceModel
from benchmarks.c_guest import CGuest, cpu_by_party
from benchmarks.common import REPO, BenchError, ratio, summarize
from xvf.errors import SimulatorError
from xvf.platform.sim.backends import make_disk_image, start_qsd, xvf_command
from xvf.platform.sim.dma import DirectDma
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.hypervisor import Domain
from xvf.platform.sim.lend import lend_device
from xvf.platform.sim.memory import GuestRam
from xvf.platform.sim.virtqueue import SplitVirtqueue
from xvf.protocols import virtio as R
from xvf.protocols.vhost_user import VhostUserFrontend, VhostUserRegion
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF

MIB = 1 << 20
POLL_US = 50  # foreign+poll: xvf --poll-us
BLOCK = 4096
FAKE_UVA = 0x1000_0000_0000


class DirectVhostDevice:
    """What VirtioBlk needs of a device, served by vhost-user with no Xen layer:
    the guest's memfd RAM goes to the backend as the mem table, kicks and calls
    are eventfds the driver uses itself."""

    def __init__(self, socket_path: str, ram: GuestRam, timeout: float = 20.0) -> None:
        self.ram = ram
        self.dma = DirectDma(ram)
        self.fe = VhostUserFrontend(socket_path, timeout=timeout)
        self.name = "direct-vhost-user"
        self.timeout = timeout
        self.device_id = 2
        self.features = 0
        self.queues: dict[int, SplitVirtqueue] = {}
        self._fds: list[int] = []
        self._kick: dict[int, int] = {}
        self._call: dict[int, int] = {}

    def probe(self) -> int:
        return self.device_id

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def _uva(self, gpa: int) -> int:
        for r in self.ram.regions:
            if r.gpa <= gpa < r.end:
                return FAKE_UVA + r.fd_offset + gpa - r.gpa
        raise BenchError(f"{gpa:#x} is not guest RAM")

    def initialize(self, wanted: int, queue_sizes: list[int]) -> int:
        fe = self.fe
        # The handshake in QEMU's order; of QSD's protocol features: MQ, REPLY_ACK, CONFIG.
        offered = fe.get_features()
        acked = offered & (wanted | (1 << R.F_VERSION_1))
        if offered & F_PROTOCOL_FEATURES:
            wanted_protocol = PF.MQ | PF.REPLY_ACK | PF.CONFIG
            fe.set_protocol_features(fe.get_protocol_features() & wanted_protocol)
            if fe.protocol_features & PF.MQ:
                fe.get_queue_num()
            acked |= F_PROTOCOL_FEATURES
        fe.set_owner()
        fe.set_features(acked)
        self.features = fe.acked_features & ~F_PROTOCOL_FEATURES
        regions = [
            VhostUserRegion(r.gpa, r.size, FAKE_UVA + r.fd_offset, self.ram.fd, r.fd_offset)
            for r in self.ram.regions
        ]
        fe.set_mem_table(regions)
        for i, size in enumerate(queue_sizes):
            vq = SplitVirtqueue(
                self.ram,
                self.dma,
                size,
                index=i,
                event_idx=self.has_feature(R.F_EVENT_IDX),
                indirect=self.has_feature(R.F_INDIRECT_DESC),
            )
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds += [kick, call]
            self._kick[i], self._call[i] = kick, call
            fe.set_vring_num(i, size)
            fe.set_vring_base(i, 0)
            fe.set_vring_addr(
                i, self._uva(vq.desc_dma), self._uva(vq.avail_dma), self._uva(vq.used_dma)
            )
            fe.set_vring_kick(i, kick)
            fe.set_vring_call(i, call)
            fe.set_vring_enable(i, True)
            self.queues[i] = vq
        return self.features

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.fe.get_config(offset, size), "little")

    def kick(self, queue: int) -> bool:
        if self.queues[queue].kick_needed():
            os.eventfd_write(self._kick[queue], 1)
            return True
        return False

    def wait_used(self, queue: int, what: str, timeout: float | None = None) -> list:
        vq = self.queues[queue]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            done = vq.get_used()
            if done:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimulatorError(f"{self.name}: no completion for {what}")
            ready, _, _ = select.select([self._call[queue]], [], [], left)
            if ready:
                try:
                    os.eventfd_read(self._call[queue])
                except BlockingIOError:
                    pass

    def shutdown(self) -> None:
        self.fe.close()
        for vq in self.queues.values():
            vq.close()
        self.queues.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


class Setup:
    """A software Xen, QSD, and (unless direct) xvf as its own process."""

    def __init__(self, image_mib: int = 64) -> None:
        self.dir = tempfile.mkdtemp(prefix="xvfb-", dir="/tmp")
        self.sockets = os.path.join(self.dir, "s")
        os.makedirs(self.sockets)
        self.image = os.path.join(self.dir, "disk.img")
        self.image_mib = image_mib
        make_disk_image(self.image, image_mib * MIB)
        self.hv = None
        self.xvf: subprocess.Popen | None = None
        self.qsd = []

    def start_qsd(self, name: str = "blk.sock0"):
        image = os.path.join(self.dir, name + ".img")
        make_disk_image(image, self.image_mib * MIB)
        proc = start_qsd(image, os.path.join(self.sockets, name))
        self.qsd.append(proc)
        return proc

    def start_hv(self, kernel_eventfds: bool = False) -> None:
        from xvf.platform.sim.hypervisor import Hypervisor

        # kernel_eventfds: the simulated Dom0 kernel has privcmd ioeventfd/irqfd
        # (Linux 6.7+), so QueueNotify and interrupts bypass xvf.
        self.hv = Hypervisor(os.path.join(self.dir, "xen"), kernel_eventfds=kernel_eventfds).start()

    def start_xvf(
        self, foreign: bool, kernel_eventfds: bool = False, extra: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        self.start_hv(kernel_eventfds)
        self.log = os.path.join(self.dir, "xvf.log")
        argv = xvf_command(self.hv.run_dir, self.sockets, foreign, extra=extra)
        with open(self.log, "wb") as log:
            self.xvf = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self.xvf

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, errors="replace") as f:
                if f.read().count(text) >= count:
                    return
            if self.xvf is not None and self.xvf.poll() is not None:
                raise BenchError(f"xvf exited; see {self.log}")
            if time.monotonic() > deadline:
                raise BenchError(f"xvf never logged {text!r} {count} times")
            time.sleep(0.02)

    def create_guest(self, foreign: bool, name: str = "bench", memory_mib: int = 64) -> Domain:
        usage = "0" if foreign else "1"
        line = f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]'
        self.dom = self.hv.create_domain(name, memory_mib=memory_mib, vcpus=1, virtio=line)
        return self.dom

    def guest_blk(self, foreign: bool, name: str = "bench", memory_mib: int = 64) -> VirtioBlk:
        from xvf.platform.sim.guest import attach

        return VirtioBlk(attach(self.create_guest(foreign, name, memory_mib), 0))

    def close(self) -> None:
        if self.xvf is not None and self.xvf.poll() is None:
            self.xvf.terminate()
            try:
                self.xvf.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.xvf.kill()
                self.xvf.wait()
        for p in self.qsd:
            p.stop()
        if self.hv is not None:
            self.hv.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(mode: str, qds: list[int], counts: dict[int, int]) -> dict[int, dict]:
    """One set-up per mode (QSD, and xvf on a software Xen unless direct): the Python
    driver brings the device up, then the C guest runs each queue depth."""
    setup = Setup()
    loan = None
    dm: CDeviceModel | None = None
    dm_pid = None
    try:
        qsd = setup.start_qsd()
        if mode == "direct":
            ram = GuestRam(64 * MIB)
            dev = DirectVhostDevice(os.path.join(setup.sockets, "blk.sock0"), ram)
            blk = VirtioBlk(dev)
            blk.start()
            signals = {"kick_fd": dev._kick[0], "call_fd": dev._call[0]}
            fds, guest_mode = list(signals.values()), "direct"
        elif mode.startswith("c-dm"):
            from xvf.platform.sim.guest import attach

            setup.start_hv()
            guest_dom = setup.create_guest(foreign=mode == "c-dm")
            dm = CDeviceModel(guest_dom, os.path.join(setup.sockets, "blk.sock0"))
            blk = VirtioBlk(attach(setup.dom, 0))
            blk.start()
            loan = lend_device(setup.dom, 0)
            signals, fds, guest_mode = loan.args, loan.pass_fds, "xen"
            dm_pid = dm.pid
        else:
            foreign = mode.startswith("foreign")
            extra = ("--poll-us", str(POLL_US)) if mode.endswith("+poll") else ()
            setup.start_xvf(foreign, kernel_eventfds=mode.endswith("+offload"), extra=extra)
            blk = setup.guest_blk(foreign=foreign)
            setup.wait_log("serving virtio blk")
            blk.start()
            loan = lend_device(setup.dom, 0)
            signals, fds, guest_mode = loan.args, loan.pass_fds, "xen"
        guest = CGuest(blk, max(qds), signals, fds)
        dm_pid = setup.xvf.pid if setup.xvf is not None else dm_pid
        out = {}
        for qd in qds:
            guest.run(guest_mode, qd, max(qd * 4, counts[qd] // 10), seed=1)  # warm-up
            before = cpu_by_party(dm_pid, qsd.pid)
            r = guest.run(guest_mode, qd, counts[qd], seed=2)
            after = cpu_by_party(dm_pid, qsd.pid)
            stats = r["stats"]
            n = stats["requests"]
            per_io = {k: (after[k] - before[k]) / n / 1e3 for k in before}
            out[qd] = {
                **summarize(r["lat"]),
                "iops": n / (stats["wall_ns"] / 1e9),
                **{f"cpu_{k}_us": v for k, v in per_io.items()},
                "cpu_total_us": sum(per_io.values()),
                "exits_per_io": stats["exits"] / n,
                "kicks_per_io": stats["kicks"] / n,
                "irqs_per_io": stats["interrupts"] / n,
            }
        guest.close()
        if loan is not None:
            loan.close()
            loan = None
        blk.close()
        if mode == "direct":
            ram.close()
        return out
    finally:
        if loan is not None:
            loan.close()
        if dm is not None:
            dm.close()
        setup.close()


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median IOPS, with the spread of all rounds' IOPS."""
    ordered = sorted(rounds, key=lambda r: r["iops"])
    return {
        **ordered[len(ordered) // 2],
        "iops_min": ordered[0]["iops"],
        "iops_max": ordered[-1]["iops"],
    }


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    del pin_cpus  # the guest, xvf and QSD are scheduled freely
    if shutil.which("qemu-storage-daemon") is None:
        return {"name": "e2e_blk", "skipped": "qemu-storage-daemon not installed", "rows": []}
    qds = [1, 32]
    modes = (
        "direct", "c-dm", "c-dm-grant", "foreign", "foreign+poll", "foreign+offload", "grant",
        "grant+offload",
    )  # fmt: skip
    counts = {m: {1: 40, 32: 256} if quick else {1: 2000, 32: 20000} for m in modes}
    # Round robin over the modes, each round with a share of the requests, so that the
    # machine's noise (other sessions' load) hits every mode alike; each figure is the
    # round with the median IOPS.
    rounds = 1 if quick else 3
    share = {m: {qd: max(8, n // rounds) for qd, n in c.items()} for m, c in counts.items()}
    runs: dict[str, list[dict[int, dict]]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            runs[mode].append(measure(mode, qds, share[mode]))
    res = {mode: {qd: _median_round([r[qd] for r in runs[mode]]) for qd in qds} for mode in modes}
    rows = [{"qd": qd, "path": mode, **res[mode][qd]} for qd in qds for mode in modes]
    ratios: dict[str, float] = {}
    for qd in qds:
        for mode in modes[1:]:
            ratios[f"{mode}/direct QD{qd} IOPS"] = ratio(
                res[mode][qd]["iops"], res["direct"][qd]["iops"]
            )
        ratios[f"grant/foreign QD{qd} IOPS"] = ratio(
            res["grant"][qd]["iops"], res["foreign"][qd]["iops"]
        )
        ratios[f"grant+offload/foreign+offload QD{qd} IOPS"] = ratio(
            res["grant+offload"][qd]["iops"], res["foreign+offload"][qd]["iops"]
        )
        for mode in modes[1:]:
            ratios[f"{mode}/direct QD{qd} latency median"] = ratio(
                res[mode][qd]["median_us"], res["direct"][qd]["median_us"]
            )
        ratios[f"foreign+poll/foreign QD{qd} latency median"] = ratio(
            res["foreign+poll"][qd]["median_us"], res["foreign"][qd]["median_us"]
        )
        ratios[f"foreign+poll/foreign QD{qd} device-model CPU per I/O"] = ratio(
            res["foreign+poll"][qd]["cpu_dm_us"], res["foreign"][qd]["cpu_dm_us"]
        )
        ratios[f"foreign/c-dm QD{qd} IOPS"] = ratio(
            res["foreign"][qd]["iops"], res["c-dm"][qd]["iops"]
        )
        ratios[f"foreign/c-dm QD{qd} device-model CPU per I/O"] = ratio(
            res["foreign"][qd]["cpu_dm_us"], res["c-dm"][qd]["cpu_dm_us"]
        )
        ratios[f"grant/c-dm-grant QD{qd} IOPS"] = ratio(
            res["grant"][qd]["iops"], res["c-dm-grant"][qd]["iops"]
        )
        ratios[f"grant/c-dm-grant QD{qd} device-model CPU per I/O"] = ratio(
            res["grant"][qd]["cpu_dm_us"], res["c-dm-grant"][qd]["cpu_dm_us"]
        )
        for mode in modes[1:]:
            ratios[f"{mode} QD{qd}: device-model CPU / guest CPU"] = ratio(
                res[mode][qd]["cpu_dm_us"], res[mode][qd]["cpu_guest_us"]
            )
    return {
        "name": "e2e_blk",
        "title": "4 KiB random read/write (50/50): C guest (Linux-like) -> simulated Xen -> "
        "xvf -> QSD, against the same guest -> QSD over vhost-user directly (direct) and "
        "through the smallest C device model (c-dm: foreign; c-dm-grant: its grant relay; no "
        "offload); CPU µs per I/O by "
        "party (dm: xvf or the C device model)",
        "params": {"counts": counts, "rounds": rounds, "image_mib": 64, "queue_size": 128},
        "columns": [
            "qd",
            "path",
            "n",
            "median_us",
            "p99_us",
            "iops",
            "cpu_guest_us",
            "cpu_sim_xen_us",
            "cpu_dm_us",
            "cpu_backend_us",
            "exits_per_io",
            "irqs_per_io",
        ],
        "rows": rows,
        "ratios": ratios,
        "goal": "QD32: foreign+offload/direct >= 0.9, foreign/direct >= 0.5, grant/foreign >= 0.7",
    }
