"""The C device model of the end-to-end baseline (benchmarks/c/blk_dm.c) in place of
xvf: the same IOREQ server on the simulated Xen, the same ioreq page and event
channel, the same qemu-storage-daemon. This side does what is not per request: the
Xen-side set-up (through the simulator's platform, as xvf does it), the vhost-user
handshake, and QSD's vring at DRIVER_OK, while the C program's guest vCPU waits."""

from __future__ import annotations

import os
import subprocess
import threading

from benchmarks.common import BenchError, build_c
from xvf.hotpath import _layout as L
from xvf.platform.sim import control as C
from xvf.platform.sim.guest import backend_state_path
from xvf.platform.sim.hypervisor import Domain
from xvf.platform.sim.platform import SimPlatform
from xvf.protocols import virtio as R
from xvf.protocols.vhost_user import VhostUserFrontend, VhostUserRegion
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF
from xvf.protocols.xenbus import XENBUS_STATE_CONNECTED
from xvf.protocols.xenstore import XenStore

FAKE_UVA = 0x2000_0000_0000
BLK_CONFIG_SIZE = 60  # struct virtio_blk_config, as xvf asks QSD for it
# What xvf offers a blk guest of QSD's features: the device's own (bits 0-23) and the
# ring's (INDIRECT_DESC, EVENT_IDX, VERSION_1); never vhost-user's PROTOCOL_FEATURES.
OFFERED = ((1 << 24) - 1) | (1 << R.F_INDIRECT_DESC) | (1 << R.F_EVENT_IDX) | (1 << R.F_VERSION_1)


class CDeviceModel:
    def __init__(self, dom: Domain, socket_path: str) -> None:
        hv = dom.hv
        spec = dom.virtio[0]
        self.dom = dom
        self.fe = VhostUserFrontend(socket_path, timeout=20)
        self.offered = self.fe.get_features()
        if self.offered & F_PROTOCOL_FEATURES:
            wanted = PF.MQ | PF.REPLY_ACK | PF.CONFIG
            self.fe.set_protocol_features(self.fe.get_protocol_features() & wanted)
        self.fe.set_owner()
        config = self.fe.get_config(0, BLK_CONFIG_SIZE)
        self.plat = SimPlatform(hv.run_dir)
        self.evtchn = self.plat.open_event_channel()
        self.server = self.plat.create_ioreq_server(dom.domid)
        # Xen's order: enable (the ports are written now), bind, then claim the window.
        self.server.set_enabled(True)
        vp_eport = int.from_bytes(
            self.server.page[L.IOREQ_VP_EPORT : L.IOREQ_VP_EPORT + 4], "little"
        )
        port = self.evtchn.bind_interdomain(dom.domid, vp_eport)
        self.server.map_mmio_range(spec.base, spec.base + L.VIRTIO_MMIO_DEV_SIZE - 1)
        # Only its connection is used (kept open while the line lives): the C program
        # sends the dm_ops itself.
        self._irq_line = self.plat.irq_line(dom.domid, spec.irq)
        prefix = C.HEADER.pack(C.OP_DM_OP, C.DM_OP_PREFIX.size + C.DM_OP_SIZE)
        prefix += C.DM_OP_PREFIX.pack(dom.domid, 0, 0)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        req_r, req_w = os.pipe()
        ack_r, ack_w = os.pipe()
        self._ack = ack_w
        page_fd = dom.servers[self.server.id].fd
        irq_fd = self._irq_line.fd
        args = {
            "page_fd": page_fd,
            "page_off": L.IOREQ_SERVER_FRAME_IOREQ * L.PAGE_SIZE,
            "evt_fd": self.evtchn.channel.fd,
            "port": port,
            "base": spec.base,
            "irq_fd": irq_fd,
            "irq": spec.irq,
            "irq_prefix": prefix.hex(),
            "kick_fd": self.kick,
            "call_fd": self.call,
            "features": self.offered & OFFERED,
            "config": config.hex(),
            "qmax": 256,
            "req_fd": req_w,
            "ack_fd": ack_r,
        }
        exe = build_c("blk_dm")
        fds = [page_fd, self.evtchn.channel.fd, irq_fd, self.kick, self.call, req_w, ack_r]
        self.proc = subprocess.Popen(
            [exe, *(f"{k}={v}" for k, v in args.items())],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(req_w)
        os.close(ack_r)
        if self.proc.stdout is None or self.proc.stdout.readline() != b"ready\n":
            raise BenchError(f"blk_dm did not start: {self.proc.communicate()}")
        self._req = os.fdopen(req_r, "r")
        self._thread = threading.Thread(target=self._on_driver_ok, daemon=True)
        self._thread.start()
        with XenStore(hv.xenstore_path) as xs:  # what xvf publishes: served
            xs.write(backend_state_path(dom, 0), str(XENBUS_STATE_CONNECTED))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _uva(self, gpa: int) -> int:
        for r in self.dom.ram.regions:
            if r.gpa <= gpa < r.end:
                return FAKE_UVA + r.fd_offset + gpa - r.gpa
        raise BenchError(f"{gpa:#x} is not guest RAM")

    def _on_driver_ok(self) -> None:
        """QSD's vring, when the C program reports DRIVER_OK (its vCPU waits meanwhile)."""
        line = self._req.readline().split()
        if not line or line[0] != "vring":
            return
        num, desc, avail, used, driver_features = (int(x, 0) for x in line[1:])
        fe = self.fe
        acked = driver_features & self.offered
        fe.set_features(acked | (self.offered & F_PROTOCOL_FEATURES))
        ram = self.dom.ram
        fe.set_mem_table(
            [
                VhostUserRegion(r.gpa, r.size, FAKE_UVA + r.fd_offset, ram.fd, r.fd_offset)
                for r in ram.regions
            ]
        )
        fe.set_vring_num(0, num)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, self._uva(desc), self._uva(avail), self._uva(used))
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_call(0, self.call)
        fe.set_vring_enable(0, True)
        os.write(self._ack, b"k")

    def close(self) -> None:
        # It holds its own copy of the event-channel handle, so it is told to go.
        self.proc.terminate()
        self.evtchn.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.fe.close()
        try:
            self.server.destroy()
        except Exception:  # the guest may be gone already
            pass
        self.plat.close()
        for fd in (self.kick, self.call, self._ack):
            os.close(fd)
        self._req.close()
