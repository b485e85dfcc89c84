"""The guest's virtio-mmio driver and its blk/i2c/gpio drivers.

The driver talks to xvf's real register file
(xvf.protocols.virtio_mmio.VirtioMmioRegisters behind the
Cython MmioState, the same objects the ioreq path drives). Behind the registers sits
a small in-test device that decodes requests as the virtio spec lays them out, so
these tests check the wire layouts and the driver's protocol; real backends are the
e2e tests' business. Scripted transports are used only for answers no correct
device gives (changing config generation, bad magic, missing features).
"""

from __future__ import annotations

import os
import select
import struct
import threading
import types
from collections.abc import Callable

import pytest

from tests.unit.test_sim_virtqueue import DeviceSide
from xvf.errors import SimulatorError
from xvf.hotpath._ioreq import MmioState
from xvf.platform.sim.dma import DirectDma, GrantDma
from xvf.platform.sim.drivers import DeviceError
from xvf.platform.sim.drivers import blk as B
from xvf.platform.sim.drivers import gpio as GP
from xvf.platform.sim.drivers import i2c as I2
from xvf.platform.sim.grant_table import GrantTable
from xvf.platform.sim.memory import GuestRam
from xvf.platform.sim.virtio_driver import NoDevice, VirtioMmioDevice
from xvf.protocols import virtio as R
from xvf.protocols.virtio_mmio import QueueRegisters, VirtioMmioRegisters

MIB = 1 << 20
VERSION_1 = 1 << R.F_VERSION_1
ACCESS_PLATFORM = 1 << R.F_ACCESS_PLATFORM

Handler = Callable[[int, list[tuple[memoryview, bool]]], int | None]


class TestDevice:
    """Device model behind the real register file: serves queues from a thread woken by
    the kick eventfds the register file writes, raises INT_VRING when it used buffers."""

    __test__ = False

    def __init__(self, ram, grants, device_id, features, queue_sizes, config, handler):
        self.ram, self.grants, self.config, self.handler = ram, grants, config, handler
        self.state = MmioState()
        self.regs = VirtioMmioRegisters("test", device_id, features, queue_sizes, self, self.state)
        self.cond = threading.Condition()
        self.sides: dict[int, DeviceSide] = {}
        self.kick_fds: dict[int, int] = {}
        self.stop_r, self.stop_w = os.pipe()
        self.thread: threading.Thread | None = None
        self.driver_features = 0

    # transport for the driver: each call is one register access
    def read(self, offset: int, size: int) -> int:
        return self.state.access(offset, size, False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.state.access(offset, size, True, value)

    def wait_irq(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.state.int_status != 0, timeout)

    # DeviceModel
    def features_ok(self, driver_features: int) -> bool:
        self.driver_features = driver_features
        return True

    def driver_ok(self, queues: list[QueueRegisters], driver_features: int) -> None:
        for i, q in enumerate(queues):
            if q.ready:
                self.queue_ready(i, q)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def queue_ready(self, index: int, q: QueueRegisters) -> None:
        ring = types.SimpleNamespace(desc_dma=q.desc, avail_dma=q.driver, used_dma=q.device,
                                     size=q.num)  # fmt: skip
        self.sides[index] = DeviceSide(self.ram, ring, self.grants)
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_fds[index] = fd
        self.state.set_kick_fd(index, fd)

    def queue_reset(self, index: int) -> None:
        pass

    def device_reset(self) -> None:
        self.stop()

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size].ljust(size, b"\0"), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass

    def _serve(self) -> None:
        while True:
            fds = [self.stop_r, *self.kick_fds.values()]
            ready, _, _ = select.select(fds, [], [], 1.0)
            if self.stop_r in ready:
                return
            for index, fd in list(self.kick_fds.items()):
                if fd in ready:
                    os.eventfd_read(fd)
                    self.process(index)

    def process(self, index: int) -> None:
        side, used = self.sides[index], False
        while (got := side.pop()) is not None:
            head, bufs = got
            written = self.handler(index, bufs)
            if written is None:
                continue  # dropped, as a backend drops a malformed request
            side.push(head, written)
            used = True
        if used:
            with self.cond:
                self.state.raise_interrupt(R.INT_VRING)
                self.cond.notify_all()

    def stop(self) -> None:
        if self.thread is not None:
            os.write(self.stop_w, b"x")
            self.thread.join(timeout=5)
            self.thread = None
            os.read(self.stop_r, 1)
        for i, fd in self.kick_fds.items():
            self.state.set_kick_fd(i, -1)
            os.close(fd)
        self.kick_fds.clear()
        self.sides.clear()

    def close(self) -> None:
        self.stop()
        os.close(self.stop_r)
        os.close(self.stop_w)


@pytest.fixture(params=["direct", "grants"])
def guest(request):
    ram = GuestRam(32 * MIB)
    grants = GrantTable(4096)
    if request.param == "grants":
        dma = GrantDma(ram, grants, backend_domid=0)
    else:
        dma = DirectDma(ram)
    yield types.SimpleNamespace(ram=ram, grants=grants, dma=dma,
                                mode_grants=request.param == "grants")  # fmt: skip
    grants.close()
    ram.close()


def make(guest, device_id, features, queue_sizes, config, handler, timeout=5.0):
    feats = features | VERSION_1 | (ACCESS_PLATFORM if guest.mode_grants else 0)
    dev = TestDevice(guest.ram, guest.grants if guest.mode_grants else None, device_id, feats,
                     queue_sizes, config, handler)  # fmt: skip
    drv = VirtioMmioDevice(dev, guest.ram, guest.dma, wait_irq=dev.wait_irq,
                           name=f"test-dev{device_id}", timeout=timeout)  # fmt: skip
    return dev, drv


# -- transport-level driver behaviour -------------------------------------------------


class ScriptedTransport:
    """Register answers from a table; ConfigGeneration bumps on each of its first reads."""

    def __init__(self, regs: dict[int, int], config: bytes = b"", generation_bumps: int = 0):
        self.regs, self.config, self.bumps = dict(regs), config, generation_bumps
        self.generation = 0
        self.log: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        if offset == R.CONFIG_GENERATION:
            if self.bumps:
                self.bumps -= 1
                self.generation += 1
            return self.generation
        if offset >= R.CONFIG:
            off = offset - R.CONFIG
            return int.from_bytes(self.config[off : off + size], "little")
        return self.regs.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size))
        self.regs[offset] = value


def _scripted_device(transport):
    ram = GuestRam(4 * MIB)
    return ram, VirtioMmioDevice(transport, ram, DirectDma(ram), wait_irq=lambda t: False)


def test_config_read_retries_until_generation_is_stable():
    config = struct.pack("<QI", 0x1122334455667788, 0xAABBCCDD)
    t = ScriptedTransport({}, config, generation_bumps=3)
    ram, dev = _scripted_device(t)
    try:
        assert dev.read_config(0, 8) == 0x1122334455667788
        gen_reads = [e for e in t.log if e[1] == R.CONFIG_GENERATION]
        assert len(gen_reads) >= 4  # the first attempts saw the generation move
        # A 64-bit field is read as two 32-bit accesses; smaller fields at natural width.
        assert [e for e in t.log if e[1] >= R.CONFIG][-2:] == [
            ("r", R.CONFIG, 4),
            ("r", R.CONFIG + 4, 4),
        ]
        t.log.clear()
        assert dev.read_config(8, 2) == 0xCCDD
        assert ("r", R.CONFIG + 8, 2) in t.log
        assert dev.read_config_bytes(8, 3) == b"\xdd\xcc\xbb"
    finally:
        ram.close()


def test_config_generation_that_never_settles_is_an_error():
    t = ScriptedTransport({}, b"\0" * 8, generation_bumps=10**6)
    ram, dev = _scripted_device(t)
    try:
        with pytest.raises(SimulatorError, match="never settled"):
            dev.read_config(0, 4)
    finally:
        ram.close()


@pytest.mark.parametrize(
    "regs,match",
    [
        ({R.MAGIC_VALUE: 0x12345678}, "bad magic"),
        ({R.MAGIC_VALUE: R.MAGIC, R.VERSION: 1}, "version 1"),
        ({R.MAGIC_VALUE: R.MAGIC, R.VERSION: 2, R.DEVICE_ID: 0}, "no device"),
    ],
)
def test_probe_refuses_what_is_not_a_v2_device(regs, match):
    ram, dev = _scripted_device(ScriptedTransport(regs))
    try:
        with pytest.raises(NoDevice, match=match):
            dev.probe()
    finally:
        ram.close()


def test_initialisation_programs_the_register_file(guest):
    dev, drv = make(guest, 2, 0, [64, 64], b"", lambda i, b: 0)
    try:
        assert drv.probe() == 2
        assert drv.vendor_id == R.VENDOR_XVF
        feats = drv.initialize(0, [128, 16])
        assert feats & VERSION_1
        assert bool(feats & ACCESS_PLATFORM) == guest.mode_grants
        assert dev.driver_features == feats
        st = drv.status
        assert (
            st == R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK
        )
        for i, want in ((0, 64), (1, 16)):
            q, vq = dev.regs.queues[i], drv.queues[i]
            assert (q.num, q.ready) == (want, True)  # 128 was capped at QueueNumMax
            assert (q.desc, q.driver, q.device) == (vq.desc_dma, vq.avail_dma, vq.used_dma)
        assert dev.regs.guest_errors == 0
        drv.shutdown()
        assert drv.status == 0
    finally:
        dev.close()


def test_grant_dma_requires_access_platform(guest):
    if not guest.mode_grants:
        pytest.skip("only grant DMA needs VIRTIO_F_ACCESS_PLATFORM")
    dev = TestDevice(guest.ram, guest.grants, 2, VERSION_1, [8], b"", lambda i, b: 0)
    drv = VirtioMmioDevice(dev, guest.ram, guest.dma, wait_irq=dev.wait_irq)
    try:
        drv.probe()
        with pytest.raises(NoDevice, match="ACCESS_PLATFORM"):
            drv.negotiate(0)
        assert drv.status & R.STATUS_FAILED
    finally:
        dev.close()


def test_device_without_version_1_is_refused():
    t = ScriptedTransport({R.MAGIC_VALUE: R.MAGIC, R.VERSION: 2, R.DEVICE_ID: 2})
    ram, dev = _scripted_device(t)
    try:
        with pytest.raises(NoDevice, match="VERSION_1"):
            dev.negotiate(0)
        assert t.regs[R.STATUS] & R.STATUS_FAILED
    finally:
        ram.close()


# -- virtio-blk ------------------------------------------------------------------------


class BlkDisk:
    """virtio-blk request decoding per spec 5.2.6 over an in-memory disk."""

    def __init__(self, sectors: int, drop_type: int | None = None):
        self.data = bytearray(sectors * 512)
        self.sectors = sectors
        self.drop_type = drop_type
        self.flushes = 0

    def config(self) -> bytes:
        cfg = bytearray(24)
        struct.pack_into("<Q", cfg, 0, self.sectors)
        struct.pack_into("<I", cfg, 20, 512)
        return bytes(cfg)

    def __call__(self, queue: int, bufs: list[tuple[memoryview, bool]]) -> int | None:
        hdr, *data, status = bufs
        assert not hdr[1] and len(hdr[0]) == 16 and status[1] and len(status[0]) == 1
        type_, reserved, sector = struct.unpack("<IIQ", hdr[0])
        assert reserved == 0
        if type_ == self.drop_type:
            return None
        payload = b"".join(bytes(v) for v, _ in data)
        end = sector * 512 + len(payload)
        st, written = 0, 0
        if type_ == 0:  # IN
            assert all(w for _, w in data)
            if end > len(self.data):
                st = 1
            else:
                pos = sector * 512
                for v, _ in data:
                    v[:] = self.data[pos : pos + len(v)]
                    pos += len(v)
                    written += len(v)
        elif type_ == 1:  # OUT
            assert not any(w for _, w in data)
            if end > len(self.data):
                st = 1
            else:
                self.data[sector * 512 : end] = payload
        elif type_ == 4:
            self.flushes += 1
        elif type_ == 8:
            data[0][0][:] = b"test-serial".ljust(20, b"\0")
            written = 20
        else:
            st = 2
        status[0][0] = st
        return written + 1


def test_blk_read_write_flush_get_id(guest):
    disk = BlkDisk(256)
    dev, drv = make(guest, 2, 1 << B.VIRTIO_BLK_F_FLUSH | 1 << B.VIRTIO_BLK_F_BLK_SIZE, [64],
                    disk.config(), disk)  # fmt: skip
    try:
        blk = B.VirtioBlk(drv, queue_size=32)
        blk.start()
        assert blk.capacity == 256 and blk.blk_size == 512
        payload = os.urandom(8 * 512)
        blk.write(10, payload)
        assert bytes(disk.data[10 * 512 : 18 * 512]) == payload  # checked on the disk
        disk.data[100 * 512 : 101 * 512] = b"\x5a" * 512
        assert blk.read(100, 1) == b"\x5a" * 512
        blk.flush()
        assert disk.flushes == 1
        assert blk.get_id() == b"test-serial"
        with pytest.raises(DeviceError, match="status 1"):
            blk.read(255, 2)  # past the end
        blk.close()
        if guest.mode_grants:
            assert guest.dma.outstanding() == 0  # every grant was ended
        assert guest.ram.allocated_bytes() == 0
    finally:
        dev.close()


def test_blk_many_requests_in_flight(guest):
    disk = BlkDisk(1024)
    dev, drv = make(guest, 2, 0, [16], disk.config(), disk)
    try:
        blk = B.VirtioBlk(drv, queue_size=16)
        blk.start()
        bufs = {}
        reqs = []
        for i in range(5):  # 5 requests of 3 descriptors in a 16-entry ring
            gpa = guest.ram.alloc(4096)
            guest.ram.write(gpa, bytes([i]) * 4096)
            bufs[i] = gpa
            reqs.append(blk.submit(B.VIRTIO_BLK_T_OUT, i * 8, gpa, 4096))
        done = []
        while len(done) < 5:
            done += blk.complete()
        assert {id(r) for r in done} == {id(r) for r in reqs}
        assert all(r.status == 0 and r.written == 1 for r in done)
        for i in range(5):
            assert bytes(disk.data[i * 4096 : (i + 1) * 4096]) == bytes([i]) * 4096
        blk.close()
    finally:
        dev.close()


def test_blk_dropped_request_times_out_with_a_clear_error(guest):
    disk = BlkDisk(64, drop_type=B.VIRTIO_BLK_T_FLUSH)
    dev, drv = make(guest, 2, 1 << B.VIRTIO_BLK_F_FLUSH, [8], disk.config(), disk, timeout=0.3)
    try:
        blk = B.VirtioBlk(drv, queue_size=8)
        blk.start()
        with pytest.raises(SimulatorError, match=r"test-dev2: no completion for flush"):
            blk.flush()
    finally:
        dev.close()


# -- virtio-i2c -------------------------------------------------------------------------


class I2cBus:
    """virtio-i2c request decoding per spec 5.19.6: one EEPROM-like chip at 0x50."""

    def __init__(self):
        self.regs = bytearray(256)
        self.pointer = 0
        self.seen: list[tuple[int, int]] = []  # (addr field, flags)
        self.failing = False

    def __call__(self, queue, bufs):
        out_hdr, *data, in_hdr = bufs
        addr_field, padding, flags = struct.unpack("<HHI", out_hdr[0])
        assert padding == 0 and in_hdr[1] and len(in_hdr[0]) == 1
        self.seen.append((addr_field, flags))
        addr = addr_field >> 1
        if self.failing or addr != 0x50:
            status = 1
            self.failing = bool(flags & I2.VIRTIO_I2C_FLAGS_FAIL_NEXT)
        else:
            status = 0
            self.failing = False
            buf, writable = data[0]
            assert writable == bool(flags & I2.VIRTIO_I2C_FLAGS_M_RD)
            if writable:
                for i in range(len(buf)):
                    buf[i] = self.regs[(self.pointer + i) & 0xFF]
            else:
                self.pointer = buf[0]
                for i, b in enumerate(bytes(buf[1:])):
                    self.regs[(self.pointer + i) & 0xFF] = b
        in_hdr[0][0] = status
        return 1 + (len(data[0][0]) if data and data[0][1] and status == 0 else 0)


def test_i2c_register_access_and_fail_next(guest):
    bus = I2cBus()
    dev, drv = make(guest, 34, 1 << I2.VIRTIO_I2C_F_ZERO_LENGTH_REQUEST, [16], b"", bus)
    try:
        i2c = I2.VirtioI2c(drv)
        i2c.start()
        i2c.write_reg(0x50, 0x10, b"\x01\x02\x03")
        assert bytes(bus.regs[0x10:0x13]) == b"\x01\x02\x03"
        bus.seen.clear()
        assert i2c.read_reg(0x50, 0x11, 2) == b"\x02\x03"
        # Address shifted left by one; FAIL_NEXT on all but the last; M_RD on the read.
        assert bus.seen == [(0xA0, I2.VIRTIO_I2C_FLAGS_FAIL_NEXT), (0xA0, I2.VIRTIO_I2C_FLAGS_M_RD)]
        msgs = [I2.I2cMsg(0x51, b"\x00"), I2.I2cMsg(0x50, read=True, length=1)]
        assert i2c.transfer(msgs) == 0  # the first fails, so the group fails
        assert msgs[1].status == 1
        with pytest.raises(DeviceError, match="reading register"):
            i2c.read_reg(0x51, 0)
        i2c.close()
        assert guest.ram.allocated_bytes() == 0
    finally:
        dev.close()


# -- virtio-gpio -----------------------------------------------------------------------


class GpioChip:
    """virtio-gpio request decoding per spec 5.17.6 with 4 lines and the IRQ eventq."""

    NAMES = b"led0\0\0button\0reset\0"

    def __init__(self):
        self.direction = [0] * 4
        self.value = [0] * 4
        self.irq_type = [0] * 4
        self.pending_irq: dict[int, memoryview] = {}

    def config(self) -> bytes:
        return struct.pack("<HHI", 4, 0, len(self.NAMES))

    def __call__(self, queue, bufs):
        if queue == 1:  # eventq: keep the buffer until the line fires
            (req, _), (resp, _) = bufs
            gpio = struct.unpack("<H", req)[0]
            self.pending_irq[gpio] = resp
            return None
        (req, w0), (resp, w1) = bufs
        assert not w0 and w1 and len(req) == 8
        type_, gpio, value = struct.unpack("<HHI", req)
        status, out = 0, 0
        if type_ == GP.VIRTIO_GPIO_MSG_GET_NAMES:
            assert len(resp) == 1 + len(self.NAMES)
            resp[1:] = self.NAMES
        elif gpio >= 4:
            status = 1
        elif type_ == GP.VIRTIO_GPIO_MSG_GET_DIRECTION:
            out = self.direction[gpio]
        elif type_ == GP.VIRTIO_GPIO_MSG_SET_DIRECTION:
            self.direction[gpio] = value
        elif type_ == GP.VIRTIO_GPIO_MSG_GET_VALUE:
            out = self.value[gpio]
        elif type_ == GP.VIRTIO_GPIO_MSG_SET_VALUE:
            status = 0 if self.direction[gpio] == GP.VIRTIO_GPIO_DIRECTION_OUT else 1
            if status == 0:
                self.value[gpio] = value
        elif type_ == GP.VIRTIO_GPIO_MSG_IRQ_TYPE:
            self.irq_type[gpio] = value
        else:
            status = 1
        resp[0] = status
        if type_ != GP.VIRTIO_GPIO_MSG_GET_NAMES:
            assert len(resp) == 2
            resp[1] = out
        return len(resp)


def test_gpio_lines_names_and_errors(guest):
    chip = GpioChip()
    dev, drv = make(guest, 41, 0, [8], chip.config(), chip)
    try:
        gpio = GP.VirtioGpio(drv, irq=False)
        gpio.start()
        assert (gpio.ngpio, gpio.has_irq) == (4, False)
        assert gpio.get_names() == ["led0", "", "button", "reset"]
        gpio.set_direction(0, GP.VIRTIO_GPIO_DIRECTION_OUT)
        gpio.set_value(0, 1)
        assert chip.value[0] == 1 and gpio.get_value(0) == 1
        assert gpio.get_direction(0) == GP.VIRTIO_GPIO_DIRECTION_OUT
        with pytest.raises(DeviceError, match="SET_VALUE of line 2 failed"):
            gpio.set_value(2, 1)  # an input line
        with pytest.raises(SimulatorError, match="no GPIO line 9"):
            gpio.get_value(9)
        gpio.close()
    finally:
        dev.close()


def test_gpio_interrupt_through_eventq(guest):
    chip = GpioChip()
    dev, drv = make(guest, 41, 1 << GP.VIRTIO_GPIO_F_IRQ, [8, 8], chip.config(), chip)
    try:
        gpio = GP.VirtioGpio(drv)
        gpio.start()
        assert gpio.has_irq
        gpio.set_irq_type(2, GP.VIRTIO_GPIO_IRQ_TYPE_EDGE_RISING)
        assert chip.irq_type[2] == GP.VIRTIO_GPIO_IRQ_TYPE_EDGE_RISING
        gpio.arm_irq(2)
        for _ in range(500):  # the device thread picks the request up
            if 2 in chip.pending_irq:
                break
            threading.Event().wait(0.01)
        # The line fires: the device completes the queued interrupt request.
        side = dev.sides[1]
        chip.pending_irq.pop(2)[0] = GP.VIRTIO_GPIO_IRQ_STATUS_VALID
        side.push(side.avail[2], 1)  # the only request queued on the eventq
        with dev.cond:
            dev.state.raise_interrupt(R.INT_VRING)
            dev.cond.notify_all()
        assert gpio.wait_irq_events(timeout=5) == [(2, GP.VIRTIO_GPIO_IRQ_STATUS_VALID)]
        gpio.close()
    finally:
        dev.close()
