"""The C device model of the end-to-end baseline (benchmarks/c/blk_dm.c) in place of
xvf: the same IOREQ server on the simulated Xen, the same ioreq page and event
channel, the same qemu-storage-daemon. This side does what is not per request: the
Xen-side set-up (through the simulator's platform, as xvf does it), the vhost-user
handshake, and QSD's vring at DRIVER_OK, while the C program's guest vCPU waits.
For a guest that grants, the C program relays (benchmarks/c/blk_relay.h): QSD maps
a shadow memory of this side's making, and the C program copies in and out of it
with the software Xen's grant copy, as xvf's relay does."""

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
from xvf.protocols.xenbus import XENBUS_STATE_CLOSED, XENBUS_STATE_CONNECTED
from xvf.protocols.xenstore import XenStore

FAKE_UVA = 0x2000_0000_0000
SHADOW_SIZE = 0x10000 + 256 * (64 << 10)  # blk_relay.h: RELAY_BOUNCE + qmax slots
BLK_CONFIG_SIZE = 60  # struct virtio_blk_config, as xvf asks QSD for it
# What xvf offers a blk guest of QSD's features: the device's own (bits 0-23) and the
# ring's (INDIRECT_DESC, EVENT_IDX, VERSION_1); never vhost-user's PROTOCOL_FEATURES.
OFFERED = ((1 << 24) - 1) | (1 << R.F_INDIRECT_DESC) | (1 << R.F_EVENT_IDX) | (1 << R.F_VERSION_1)


class CDeviceModel:
    def __init__(self, dom: Domain, socket_path: str) -> None:
        hv = dom.hv
        spec = dom.virtio[0]
        self.dom = dom
        self.stderr: bytes | None = None  # the C program's, once it is stopped
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
        self.grant = spec.grants
        grant_args, grant_fds = self._grant_args(dom) if self.grant else ({}, [])
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
            "features": self._features(),
            "config": config.hex(),
            "qmax": 256,
            "req_fd": req_w,
            "ack_fd": ack_r,
            **grant_args,
        }
        exe = build_c("blk_dm")
        fds = [page_fd, self.evtchn.channel.fd, irq_fd, self.kick, self.call, req_w, ack_r]
        fds += grant_fds
        self.proc = subprocess.Popen(
            [exe, *(f"{k}={v}" for k, v in args.items())],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(req_w)
        os.close(ack_r)
        for fd in grant_fds[:-1]:  # the shadow's stays: QSD gets it at DRIVER_OK
            os.close(fd)
        if self.proc.stdout is None or self.proc.stdout.readline() != b"ready\n":
            raise BenchError(f"blk_dm did not start: {self.proc.communicate()}")
        self._req = os.fdopen(req_r, "r")
        self._thread = threading.Thread(target=self._on_driver_ok, daemon=True)
        self._thread.start()
        with XenStore(hv.xenstore_path) as xs:  # what xvf publishes: served
            xs.write(backend_state_path(dom, 0), str(XENBUS_STATE_CONNECTED))

    def _features(self) -> int:
        features = self.offered & OFFERED
        if self.grant:
            # A guest that grants needs ACCESS_PLATFORM, which QSD does not offer (xvf
            # adds it for such a guest; QSD never sees it acked). The C relay takes no
            # indirect chains, so it does not offer them (the C guest uses none).
            features |= 1 << R.F_ACCESS_PLATFORM
            features &= ~(1 << R.F_INDIRECT_DESC)
        return features

    def _grant_args(self, dom: Domain) -> tuple[dict, list[int]]:
        """What the software Xen shows a copier of the guest (as xvf's copier asks for
        it: xvf.platform.sim._grant_copy), and the shadow memory QSD will map."""
        ctl = C.ControlClient(dom.hv.control_path)
        try:
            reply, fds = ctl.call(C.OP_GNT_COPY_DOMAIN, C.COPY_DOMAIN.pack(dom.domid))
        finally:
            ctl.close()
        caller, nr_entries, count = C.COPY_DOMAIN_REPLY.unpack_from(reply)
        banks = [
            C.RAM_REGION.unpack_from(reply, C.COPY_DOMAIN_REPLY.size + k * C.RAM_REGION.size)
            for k in range(count)
        ]
        self.shadow = os.memfd_create("c-dm-shadow", os.MFD_CLOEXEC)
        os.ftruncate(self.shadow, SHADOW_SIZE)
        ram_fd, gnt_fd, lock_fd = fds
        args = {
            "grant": 1,
            "domid": dom.domid,
            "caller": caller,
            "ram_fd": ram_fd,
            "ram": ",".join(f"{gpa:#x}:{size:#x}:{off:#x}" for gpa, size, off in banks),
            "gnt_fd": gnt_fd,
            "gnt_entries": nr_entries,
            "lock_fd": lock_fd,
            "shadow_fd": self.shadow,
            "shadow_size": SHADOW_SIZE,
        }
        return args, [ram_fd, gnt_fd, lock_fd, self.shadow]

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
        if self.grant:  # the shadow rings, at offsets in the shadow memory (gpa 0..)
            fe.set_mem_table([VhostUserRegion(0, SHADOW_SIZE, FAKE_UVA, self.shadow, 0)])
            uva = [FAKE_UVA + a for a in (desc, avail, used)]
        else:
            ram = self.dom.ram
            fe.set_mem_table(
                [
                    VhostUserRegion(r.gpa, r.size, FAKE_UVA + r.fd_offset, ram.fd, r.fd_offset)
                    for r in ram.regions
                ]
            )
            uva = [self._uva(a) for a in (desc, avail, used)]
        fe.set_vring_num(0, num)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, *uva)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_call(0, self.call)
        fe.set_vring_enable(0, True)
        os.write(self._ack, b"k")

    def close(self) -> None:
        """Stop the C program (its counters land in `stderr`) and undo the set-up."""
        if self.stderr is not None:
            return
        # It holds its own copy of the event-channel handle, so it is told to go.
        self.proc.terminate()
        self.evtchn.close()
        try:
            _, self.stderr = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        self.fe.close()
        try:
            self.server.destroy()
        except Exception:  # the guest may be gone already
            pass
        self.plat.close()
        with XenStore(self.dom.hv.xenstore_path) as xs:  # what xvf publishes: gone
            xs.write(backend_state_path(self.dom, 0), str(XENBUS_STATE_CLOSED))
        for fd in (self.kick, self.call, self._ack):
            os.close(fd)
        if self.grant:
            os.close(self.shadow)
        self._req.close()
