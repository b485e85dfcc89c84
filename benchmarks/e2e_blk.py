"""End to end: 4 KiB random reads and writes (50/50) from the simulated guest's
virtio-blk driver through xvf to qemu-storage-daemon, foreign and grant mode,
against the same driver and split ring talking vhost-user to QSD directly.

Everything on the guest side (driver, rings, the software Xen delivering ioreqs
and interrupts) is Python, so absolute figures are those of the simulator; the
xvf/direct ratio is the cost of the Xen layer as the simulator models it."""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import tempfile
import time

import numpy as np

from benchmarks.common import REPO, BenchError, ratio, summarize
from xvf.errors import SimulatorError
from xvf.platform.sim.backends import make_disk_image, start_qsd, xvf_command
from xvf.platform.sim.dma import DirectDma
from xvf.platform.sim.drivers.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk
from xvf.platform.sim.memory import GuestRam
from xvf.platform.sim.virtqueue import SplitVirtqueue
from xvf.protocols import virtio as R
from xvf.protocols.vhost_user import VhostUserFrontend, VhostUserRegion
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF

MIB = 1 << 20
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


def workload(blk: VirtioBlk, qd: int, count: int, seed: int, disk_blocks: int) -> dict:
    """`count` random 4 KiB requests, half reads, `qd` in flight; latency per request."""
    rng = random.Random(seed)
    ram = blk.ram
    bufs = [ram.alloc(BLOCK) for _ in range(qd)]
    free = list(bufs)
    started: dict[int, tuple[int, float]] = {}
    keep = []
    lat = np.empty(count)
    done = submitted = 0
    t_start = time.perf_counter()
    while done < count:
        while submitted < count and free:
            gpa = free.pop()
            kind = VIRTIO_BLK_T_IN if rng.random() < 0.5 else VIRTIO_BLK_T_OUT
            sector = rng.randrange(disk_blocks) * (BLOCK // 512)
            t0 = time.perf_counter()
            req = blk.submit(kind, sector, gpa, BLOCK)
            started[id(req)] = (gpa, t0)
            keep.append(req)
            submitted += 1
        for req in blk.complete(timeout=20):
            if req.status != 0:
                raise BenchError(f"{req.describe()} failed with status {req.status}")
            gpa, t0 = started.pop(id(req))
            lat[done] = (time.perf_counter() - t0) * 1e9
            done += 1
            free.append(gpa)
    wall = time.perf_counter() - t_start
    for gpa in bufs:
        ram.free(gpa)
    return {**summarize(lat), "iops": count / wall}


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

    def start_xvf(self, foreign: bool, kernel_eventfds: bool = False) -> subprocess.Popen:
        from xvf.platform.sim.hypervisor import Hypervisor

        # kernel_eventfds: the simulated Dom0 kernel has privcmd ioeventfd/irqfd
        # (Linux 6.7+), so QueueNotify and interrupts bypass xvf.
        self.hv = Hypervisor(os.path.join(self.dir, "xen"), kernel_eventfds=kernel_eventfds).start()
        self.log = os.path.join(self.dir, "xvf.log")
        argv = xvf_command(self.hv.run_dir, self.sockets, foreign)
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

    def guest_blk(self, foreign: bool, name: str = "bench", memory_mib: int = 64) -> VirtioBlk:
        from xvf.platform.sim.guest import attach

        usage = "0" if foreign else "1"
        line = f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]'
        dom = self.hv.create_domain(name, memory_mib=memory_mib, vcpus=1, virtio=line)
        return VirtioBlk(attach(dom, 0))

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
    setup = Setup()
    try:
        setup.start_qsd()
        if mode == "direct":
            ram = GuestRam(64 * MIB)
            blk = VirtioBlk(DirectVhostDevice(os.path.join(setup.sockets, "blk.sock0"), ram))
        else:
            foreign = mode.startswith("foreign")
            setup.start_xvf(foreign=foreign, kernel_eventfds=mode.endswith("+offload"))
            blk = setup.guest_blk(foreign=foreign)
            setup.wait_log("serving virtio blk")
        blk.start()
        disk_blocks = blk.capacity * 512 // BLOCK
        out = {}
        for qd in qds:
            workload(blk, qd, max(qd * 2, counts[qd] // 10), 1, disk_blocks)  # warm-up
            out[qd] = workload(blk, qd, counts[qd], 2, disk_blocks)
        blk.close()
        if mode == "direct":
            ram.close()
        return out
    finally:
        setup.close()


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    del pin_cpus  # the guest, xvf and QSD are scheduled freely
    if shutil.which("qemu-storage-daemon") is None:
        return {"name": "e2e_blk", "skipped": "qemu-storage-daemon not installed", "rows": []}
    qds = [1, 32]
    counts = {1: 40, 32: 128} if quick else {1: 1500, 32: 6000}
    rows = []
    modes = ("direct", "foreign", "foreign+offload", "grant")
    res = {mode: measure(mode, qds, counts) for mode in modes}
    for qd in qds:
        for mode in modes:
            rows.append({"qd": qd, "path": mode, **res[mode][qd]})
    ratios = {}
    for mode in modes[1:]:
        for qd in qds:
            ratios[f"{mode}/direct QD{qd} IOPS"] = ratio(
                res[mode][qd]["iops"], res["direct"][qd]["iops"]
            )
            ratios[f"{mode}/direct QD{qd} latency median"] = ratio(
                res[mode][qd]["median_us"], res["direct"][qd]["median_us"]
            )
    return {
        "name": "e2e_blk",
        "title": "4 KiB random read/write (50/50): sim guest -> xvf -> QSD vs guest -> QSD",
        "params": {"counts": counts, "image_mib": 64},
        "columns": ["qd", "path", "n", "median_us", "p99_us", "iops"],
        "rows": rows,
        "ratios": ratios,
    }
