"""The reference i2c/gpio backends, run as real processes and driven over vhost-user.

A raw front-end (tests/backends/frontend.py) shares a memfd as guest RAM and drives split rings.
Forged descriptors play the hostile guest; the backend must refuse them and keep serving.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import frontend as fe
from tests.backends import gpio, i2c
from tests.backends import protocol as p
from tests.backends.guest_memory import XEN_MMAP_FOREIGN, XEN_MMAP_GRANT, XEN_MMAP_NO_ADVANCE_MAP
from xvf.errors import VhostUserError

ROOT = Path(__file__).resolve().parents[2]
BASE_FEATURES = (
    p.bit(p.F_VERSION_1)
    | p.bit(p.F_PROTOCOL_FEATURES)
    | p.bit(p.F_NOTIFY_ON_EMPTY)
    | p.bit(p.F_INDIRECT_DESC)
    | p.bit(p.F_EVENT_IDX)
)
WANT_PROTO = p.bit(p.PF_MQ) | p.bit(p.PF_REPLY_ACK) | p.bit(p.PF_CONFIG)
DRIVER_FEATURES = p.bit(p.F_VERSION_1) | p.bit(p.F_PROTOCOL_FEATURES) | p.bit(p.F_INDIRECT_DESC) | 1


class Backend:
    def __init__(self, module: str, sock: Path, *args: str) -> None:
        self.sock = str(sock)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"tests.backends.{module}", "--socket-path", self.sock, *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{module} backend did not start: {self.proc.stderr.read()}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()


@pytest.fixture
def i2c_backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend("i2c", tmp_path / "i2c.sock0")
    yield b
    b.stop()


@pytest.fixture
def gpio_backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend("gpio", tmp_path / "gpio.sock0")
    yield b
    b.stop()


def i2c_session(b: Backend, features: int = DRIVER_FEATURES) -> fe.Session:
    return fe.connect(b.sock, [64], features, WANT_PROTO)


def gpio_session(b: Backend, **kw) -> fe.Session:
    features = DRIVER_FEATURES | (1 << gpio.F_IRQ)
    return fe.connect(b.sock, [64, 64], features, WANT_PROTO, **kw)


# ---- i2c helpers ----------------------------------------------------------------------------


def i2c_chain(s: fe.Session, addr: int, read: bool, data: bytes | int) -> tuple[list, int, int]:
    """Descriptors for one virtio-i2c request; returns (bufs, status gpa, data gpa)."""
    ram = s.ram
    hdr = ram.alloc(8)
    ram.write(hdr, i2c.OUT_HDR.pack(addr << 1, 0, i2c.FLAGS_M_RD if read else 0))
    status = ram.alloc(1)
    ram.write(status, b"\xee")
    bufs = [(hdr, 8, False)]
    buf = 0
    n = data if read else len(data)
    if n:
        buf = ram.alloc(n)
        if not read:
            ram.write(buf, data)
        bufs.append((buf, n, read))
    bufs.append((status, 1, True))
    return bufs, status, buf


def i2c_transfer(s: fe.Session, msgs: list[tuple[int, bool, bytes | int]], indirect=False):
    """One I2C transfer (all messages queued, one kick). Returns [(status, data, used_len)]."""
    q = s.queues[0]
    made = []
    for addr, read, data in msgs:
        bufs, status, buf = i2c_chain(s, addr, read, data)
        head = q.add_indirect(bufs) if indirect else q.add_chain(bufs)
        made.append((head, status, buf, read, data))
    q.notify()
    used = {u.head: u.length for u in q.get_used(len(msgs))}
    out = []
    for head, status, buf, read, data in made:
        got = s.ram.read(buf, data) if read and data else None
        out.append((s.ram.read(status, 1)[0], got, used[head]))
    return out


def rtc_set(s: fe.Session, regs: bytes) -> None:
    [(st, _, _)] = i2c_transfer(s, [(i2c.RTC_ADDR, False, bytes([0]) + regs)])
    assert st == i2c.MSG_OK


def rtc_get(s: fe.Session, start: int = 0, n: int = 7) -> bytes:
    res = i2c_transfer(s, [(i2c.RTC_ADDR, False, bytes([start])), (i2c.RTC_ADDR, True, n)])
    assert [r[0] for r in res] == [i2c.MSG_OK, i2c.MSG_OK]
    return res[1][1]


def bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def unbcd(b: int) -> int:
    return (b >> 4) * 10 + (b & 0xF)


# ---- i2c ------------------------------------------------------------------------------------


def test_i2c_offers_what_vhost_device_i2c_offers(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        assert s.features == BASE_FEATURES | (1 << i2c.F_ZERO_LENGTH_REQUEST)
        # MQ only (vhost-device-i2c), plus XEN_MMAP as a rust-vmm `xen` build adds it.
        assert s.protocol_features == p.bit(p.PF_MQ) | p.bit(p.PF_XEN_MMAP)
        assert s.fe.get_u64(p.GET_QUEUE_NUM) == 1
        s.fe.set(p.SET_VRING_NUM, p.VRING_STATE.pack(0, 1024))  # the maximum is accepted
    finally:
        s.close()


def test_i2c_queue_size_above_1024_drops_the_connection(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        s.fe.send(p.SET_VRING_NUM, p.VRING_STATE.pack(0, 2048))
        with pytest.raises((VhostUserError, ConnectionError)):
            s.fe.get_u64(p.GET_FEATURES)
    finally:
        s.close()
    assert i2c_backend.alive()
    s = i2c_session(i2c_backend)
    s.close()


def test_rtc_time_registers_write_then_read_halted(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        # 2024-02-29 (Thursday: DS1307 day 5 with Sunday = 1) 23:59:58, clock halted (CH).
        regs = bytes([0x80 | 0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24])
        rtc_set(s, regs)
        assert rtc_get(s) == regs
        # 12-hour mode: 11 PM is 0x40 | 0x20 | 0x11.
        rtc_set(s, bytes([0x80 | 0x07, 0x30, 0x40 | 0x20 | 0x11, 0x02, 0x01, 0x01, 0x25]))
        assert rtc_get(s)[2] == 0x71
        # Start at register 4 (date) and read 3: date, month, year.
        assert rtc_get(s, 4, 3) == bytes([0x01, 0x01, 0x25])
    finally:
        s.close()


def test_rtc_clock_runs_from_the_written_time(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        rtc_set(s, bytes([0x00, 0x00, 0x12, 0x02, 0x15, 0x06, 0x26]))  # 2026-06-15 12:00:00 Mon
        r = rtc_get(s)
        assert r[0] & 0x80 == 0
        got = dt.datetime(
            2000 + unbcd(r[6]), unbcd(r[5]), unbcd(r[4]), unbcd(r[2]), unbcd(r[1]), unbcd(r[0])
        )
        elapsed = (got - dt.datetime(2026, 6, 15, 12, 0, 0)).total_seconds()
        assert 0 <= elapsed < 60
        assert r[3] == 0x02
    finally:
        s.close()


def test_rtc_nvram_pointer_wraps_and_state_survives_reconnect(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        [(st, _, used)] = i2c_transfer(s, [(i2c.RTC_ADDR, False, bytes([0x3E, 0xAB, 0xCD, 0x80]))])
        assert (st, used) == (i2c.MSG_OK, 1 + 4)
        # 0x3e, 0x3f are NVRAM; the pointer then wraps to 0x00 (seconds, CH set -> halted).
        assert rtc_get(s, 0x3E, 3)[:2] == b"\xab\xcd"
    finally:
        s.close()
    s = i2c_session(i2c_backend)
    try:
        assert rtc_get(s, 0x3E, 2) == b"\xab\xcd"
    finally:
        s.close()


def test_eeprom_write_read(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        [(st, _, _)] = i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x10hello")])
        assert st == i2c.MSG_OK
        res = i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x10"), (i2c.EEPROM_ADDR, True, 5)])
        assert res[1][:2] == (i2c.MSG_OK, b"hello")
        assert res[1][2] == 1 + 5
    finally:
        s.close()


def test_transfer_to_empty_address_fails(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        [(st, data, used)] = i2c_transfer(s, [(0x20, True, 2)])
        assert (st, data, used) == (i2c.MSG_ERR, b"\0\0", 1)  # no data length on error
        [(st, _, used)] = i2c_transfer(s, [(0x21, False, b"\x00\x01")])
        assert (st, used) == (i2c.MSG_ERR, 1)
        # One status for the whole transfer: a good message next to a NAKed one fails too.
        res = i2c_transfer(s, [(i2c.RTC_ADDR, False, b"\x08"), (0x22, True, 1)])
        assert [r[0] for r in res] == [i2c.MSG_ERR, i2c.MSG_ERR]
    finally:
        s.close()


def test_zero_length_request_on_plain_i2c_adapter_fails(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        [(st, _, used)] = i2c_transfer(s, [(i2c.RTC_ADDR, False, b"")])
        assert (st, used) == (i2c.MSG_ERR, 1)
    finally:
        s.close()


def test_zero_length_request_on_smbus_adapter_probes_the_address(tmp_path: Path) -> None:
    b = Backend("i2c", tmp_path / "i2c.sock0", "--smbus")
    s = i2c_session(b)
    try:
        assert i2c_transfer(s, [(i2c.RTC_ADDR, False, b"")])[0][:1] == (i2c.MSG_OK,)
        assert i2c_transfer(s, [(i2c.RTC_ADDR, True, 0)])[0][:1] == (i2c.MSG_OK,)
        assert i2c_transfer(s, [(0x30, False, b"")])[0][:1] == (i2c.MSG_ERR,)
        # SMBus limits: a 7-byte block read is not an SMBus transfer.
        res = i2c_transfer(s, [(i2c.RTC_ADDR, False, b"\x00"), (i2c.RTC_ADDR, True, 7)])
        assert res[1][0] == i2c.MSG_ERR
        res = i2c_transfer(s, [(i2c.RTC_ADDR, False, b"\x08\x5a")])  # byte-data write
        assert res[0][0] == i2c.MSG_OK
        res = i2c_transfer(s, [(i2c.RTC_ADDR, False, b"\x08"), (i2c.RTC_ADDR, True, 1)])
        assert res[1][:2] == (i2c.MSG_OK, b"\x5a")
    finally:
        s.close()
        b.stop()


def test_indirect_descriptors_and_event_idx(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend, DRIVER_FEATURES | p.bit(p.F_EVENT_IDX))
    try:
        assert s.queues[0].event_idx
        rtc_set(s, bytes([0x80, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]))
        for _ in range(5):  # with EVENT_IDX every completion must still be signalled
            res = i2c_transfer(
                s, [(i2c.RTC_ADDR, False, b"\x04"), (i2c.RTC_ADDR, True, 3)], indirect=True
            )
            assert res[1][:2] == (i2c.MSG_OK, b"\x01\x01\x00")
    finally:
        s.close()


# ---- malformed descriptors ------------------------------------------------------------------


def _status_untouched_and_refused(s: fe.Session, head: int, status: int) -> None:
    [u] = s.queues[0].get_used(1)
    assert (u.head, u.length) == (head, 0)
    assert s.ram.read(status, 1) == b"\xee"


def test_malformed_chains_are_refused_and_the_backend_keeps_serving(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    q = s.queues[0]
    try:
        # 1. Buffer address outside guest memory.
        bufs, status, _ = i2c_chain(s, i2c.RTC_ADDR, True, 4)
        bufs[1] = (fe.GPA_BASE + fe.MEM_SIZE + 0x1000, 4, True)
        head = q.add_chain(bufs)
        q.notify()
        _status_untouched_and_refused(s, head, status)

        # 2. A buffer that starts inside memory but runs past its end (length overflow).
        bufs, status, _ = i2c_chain(s, i2c.RTC_ADDR, True, 4)
        bufs[1] = (fe.GPA_BASE + fe.MEM_SIZE - 8, 0xFFFFFFFF, True)
        head = q.add_chain(bufs)
        q.notify()
        _status_untouched_and_refused(s, head, status)

        # 3. A loop: 0 -> 1 -> 0 -> ...
        hdr = s.ram.alloc(8)
        s.ram.write(hdr, i2c.OUT_HDR.pack(i2c.RTC_ADDR << 1, 0, 0))
        a, b = q.free.pop(0), q.free.pop(0)
        q.write_desc(a, hdr, 8, p.DESC_F_NEXT, b)
        q.write_desc(b, hdr, 8, p.DESC_F_NEXT, a)
        q.publish(a)
        q.notify()
        [u] = q.get_used(1)
        assert (u.head, u.length) == (a, 0)
        q.free.append(b)

        # 4. Next index outside the queue.
        c = q.free.pop(0)
        q.write_desc(c, hdr, 8, p.DESC_F_NEXT, 5000)
        q.publish(c)
        q.notify()
        [u] = q.get_used(1)
        assert (u.head, u.length) == (c, 0)

        # 5. Indirect table inside an indirect table, and one with a bad length.
        inner = s.ram.alloc(16)
        s.ram.write(inner, p.DESC.pack(hdr, 8, 0, 0))
        outer = s.ram.alloc(16)
        s.ram.write(outer, p.DESC.pack(inner, 16, p.DESC_F_INDIRECT, 0))
        d = q.free.pop(0)
        q.write_desc(d, outer, 16, p.DESC_F_INDIRECT)
        q.publish(d)
        e = q.free.pop(0)
        q.write_desc(e, outer, 15, p.DESC_F_INDIRECT)
        q.publish(e)
        q.notify()
        assert sorted((u.head, u.length) for u in q.get_used(2)) == sorted([(d, 0), (e, 0)])

        # 6. Wrong shape for i2c (header of 4 bytes).
        bufs, status, _ = i2c_chain(s, i2c.RTC_ADDR, True, 1)
        bufs[0] = (bufs[0][0], 4, False)
        head = q.add_chain(bufs)
        q.notify()
        _status_untouched_and_refused(s, head, status)

        # The queue still works.
        [(st, _, used)] = i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x00")])
        assert (st, used) == (i2c.MSG_OK, 2)
    finally:
        s.close()
    assert i2c_backend.alive()


def test_avail_index_jump_stops_the_queue_not_the_backend(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    q = s.queues[0]
    try:
        s.ram.set_u16(q.avail + 2, q.avail_idx + q.size + 1)
        q.notify()
        # The backend must not consume anything; GET_FEATURES still answers on the socket.
        assert s.fe.get_u64(p.GET_FEATURES) == s.features
        assert s.ram.u16(q.used + 2) == 0
    finally:
        s.close()
    assert i2c_backend.alive()
    s = i2c_session(i2c_backend)
    try:
        assert i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x00")])[0][0] == i2c.MSG_OK
    finally:
        s.close()


# ---- memory table / Xen mmap ----------------------------------------------------------------


def test_mem_table_with_mmap_offset(i2c_backend: Backend) -> None:
    ram = fe.GuestRam(mmap_offset=0x3000)
    s = fe.connect(i2c_backend.sock, [64], DRIVER_FEATURES, WANT_PROTO, ram=ram)
    try:
        [(st, _, _)] = i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x20xy")])
        assert st == i2c.MSG_OK
        res = i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x20"), (i2c.EEPROM_ADDR, True, 2)])
        assert res[1][1] == b"xy"
    finally:
        s.close()


def test_xen_mmap_plain_fd_flags_are_mapped(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend, xen=(0, 7))
    try:
        assert gpio_request(s, gpio.MSG_GET_DIRECTION, 0)[0] == gpio.STATUS_OK
    finally:
        s.close()


@pytest.mark.parametrize(
    "flags",
    [XEN_MMAP_FOREIGN, XEN_MMAP_GRANT, XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP,
     XEN_MMAP_FOREIGN | XEN_MMAP_NO_ADVANCE_MAP, XEN_MMAP_NO_ADVANCE_MAP, 0x4],
)  # fmt: skip
def test_xen_mmap_foreign_grant_or_invalid_flags_are_refused(
    gpio_backend: Backend, flags: int
) -> None:
    with pytest.raises(VhostUserError, match="NAKed"):
        gpio_session(gpio_backend, xen=(flags, 7))
    assert gpio_backend.alive()
    gpio_session(gpio_backend).close()


def test_short_memory_fd_is_refused(gpio_backend: Backend) -> None:
    ram = fe.GuestRam()
    os.ftruncate(ram.fd, 0x1000)  # the region claims 1 MiB
    with pytest.raises(VhostUserError, match="NAKed"):
        gpio_session(gpio_backend, ram=ram)
    assert gpio_backend.alive()


def test_require_xen_mmap_drops_front_ends_that_do_not_ack_it(tmp_path: Path) -> None:
    b = Backend("gpio", tmp_path / "gpio.sock0", "--require-xen-mmap")
    try:
        with pytest.raises((VhostUserError, ConnectionError)):
            gpio_session(b)
        s = gpio_session(b, xen=(0, 1))
        try:
            assert gpio_request(s, gpio.MSG_GET_DIRECTION, 1)[0] == gpio.STATUS_OK
        finally:
            s.close()
    finally:
        b.stop()


# ---- gpio -----------------------------------------------------------------------------------


def gpio_request(s: fe.Session, rtype: int, line: int, value: int = 0, resp_len: int = 2):
    """Returns (status, data after status, used length)."""
    q = s.queues[gpio.REQUEST_QUEUE]
    req = s.ram.alloc(8)
    s.ram.write(req, gpio.REQUEST.pack(rtype, line, value))
    resp = s.ram.alloc(resp_len)
    head = q.add_chain([(req, 8, False), (resp, resp_len, True)])
    q.notify()
    [u] = q.get_used(1)
    assert u.head == head
    out = s.ram.read(resp, resp_len)
    return out[0], out[1:], u.length


NAMES = [f"dummy{i}" for i in range(8)]


def test_gpio_offers_what_vhost_device_gpio_offers(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend)
    try:
        assert s.features == BASE_FEATURES | (1 << gpio.F_IRQ)
        assert s.protocol_features == (
            p.bit(p.PF_MQ) | p.bit(p.PF_CONFIG) | p.bit(p.PF_REPLY_ACK) | p.bit(p.PF_XEN_MMAP)
        )
        assert s.fe.get_u64(p.GET_QUEUE_NUM) == 2
        s.fe.set(p.SET_VRING_NUM, p.VRING_STATE.pack(1, 256))
        with pytest.raises(VhostUserError, match="NAKed"):
            s.fe.set(p.SET_VRING_NUM, p.VRING_STATE.pack(1, 512))
    finally:
        s.close()


def test_gpio_config_and_names(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend)
    try:
        blob = b"".join(n.encode() + b"\0" for n in NAMES)
        assert s.fe.get_config(0, 8) == gpio.CONFIG.pack(8, 0, len(blob))
        assert s.fe.get_config(4, 4) == len(blob).to_bytes(4, "little")
        assert s.fe.get_config(0, 16) == b""  # beyond the config space: size 0 reply
        st, data, used = gpio_request(s, gpio.MSG_GET_LINE_NAMES, 0, resp_len=1 + len(blob))
        assert (st, data, used) == (gpio.STATUS_OK, blob, 1 + len(blob))
        # A names buffer of the wrong size is an error, as in vhost-device-gpio.
        assert gpio_request(s, gpio.MSG_GET_LINE_NAMES, 0, resp_len=8)[0] == gpio.STATUS_ERR
    finally:
        s.close()


def test_gpio_custom_names(tmp_path: Path) -> None:
    b = Backend("gpio", tmp_path / "gpio.sock0", "--names", "led,button,reset")
    s = gpio_session(b)
    try:
        blob = b"led\0button\0reset\0"
        assert s.fe.get_config(0, 8) == gpio.CONFIG.pack(3, 0, len(blob))
        assert gpio_request(s, gpio.MSG_GET_LINE_NAMES, 0, resp_len=1 + len(blob))[1] == blob
    finally:
        s.close()
        b.stop()


def test_gpio_direction_and_value_loop_back(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend)
    try:
        assert gpio_request(s, gpio.MSG_GET_DIRECTION, 3)[:2] == (gpio.STATUS_OK, b"\x00")
        assert gpio_request(s, gpio.MSG_GET_VALUE, 3)[0] == gpio.STATUS_ERR  # no value yet
        # Output before a value is refused; set the value first, as Linux does.
        assert gpio_request(s, gpio.MSG_SET_DIRECTION, 3, gpio.DIRECTION_OUT)[0] == 1
        assert gpio_request(s, gpio.MSG_SET_VALUE, 3, 1)[0] == gpio.STATUS_OK
        assert gpio_request(s, gpio.MSG_SET_DIRECTION, 3, gpio.DIRECTION_OUT)[0] == 0
        assert gpio_request(s, gpio.MSG_GET_DIRECTION, 3)[:2] == (0, bytes([gpio.DIRECTION_OUT]))
        assert gpio_request(s, gpio.MSG_GET_VALUE, 3)[:2] == (gpio.STATUS_OK, b"\x01")
        assert gpio_request(s, gpio.MSG_SET_VALUE, 3, 0)[0] == gpio.STATUS_OK
        assert gpio_request(s, gpio.MSG_GET_VALUE, 3)[:2] == (gpio.STATUS_OK, b"\x00")
        assert gpio_request(s, gpio.MSG_GET_VALUE, 4)[0] == gpio.STATUS_ERR  # other line untouched
    finally:
        s.close()
    s = gpio_session(gpio_backend)  # line state belongs to the chip and outlives the connection
    try:
        assert gpio_request(s, gpio.MSG_GET_VALUE, 3)[:2] == (gpio.STATUS_OK, b"\x00")
    finally:
        s.close()


def test_gpio_invalid_requests_get_error_status(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend)
    try:
        for rtype, line, value in [
            (gpio.MSG_GET_VALUE, 8, 0),  # no such line
            (gpio.MSG_SET_VALUE, 1000, 1),
            (gpio.MSG_GET_DIRECTION, 0xFFFF, 0),
            (gpio.MSG_SET_VALUE, 0, 2),  # value not 0/1
            (gpio.MSG_SET_DIRECTION, 0, 7),  # no such direction
            (gpio.MSG_IRQ_TYPE, 0, 0x10),  # no such irq type
            (0x99, 0, 0),  # no such request
        ]:
            st, data, used = gpio_request(s, rtype, line, value)
            assert (st, data, used) == (gpio.STATUS_ERR, b"\x00", 2), (rtype, line, value)
    finally:
        s.close()
    assert gpio_backend.alive()


def test_gpio_interrupt_on_rising_edge_and_buffer_return(gpio_backend: Backend) -> None:
    s = gpio_session(gpio_backend)
    evq = s.queues[gpio.EVENT_QUEUE]

    def queue_irq_buffer(line: int) -> tuple[int, int]:
        req = s.ram.alloc(2)
        s.ram.write(req, gpio.IRQ_REQUEST.pack(line))
        st = s.ram.alloc(1)
        s.ram.write(st, b"\xee")
        head = evq.add_chain([(req, 2, False), (st, 1, True)])
        evq.notify()
        return head, st

    try:
        # No irq type set: the buffer comes straight back as invalid.
        head, st = queue_irq_buffer(2)
        [u] = evq.get_used(1)
        assert (u.head, u.length, s.ram.read(st, 1)) == (head, 1, b"\x00")

        assert gpio_request(s, gpio.MSG_SET_VALUE, 2, 0)[0] == 0
        assert gpio_request(s, gpio.MSG_IRQ_TYPE, 2, gpio.IRQ_TYPE_EDGE_RISING)[0] == 0
        head, st = queue_irq_buffer(2)
        assert gpio_request(s, gpio.MSG_SET_VALUE, 2, 0)[0] == 0  # no edge
        assert s.ram.read(st, 1) == b"\xee"
        assert gpio_request(s, gpio.MSG_SET_VALUE, 2, 1)[0] == 0  # rising edge
        [u] = evq.get_used(1)
        assert (u.head, u.length, s.ram.read(st, 1)) == (head, 1, b"\x01")

        # Disabling the interrupt returns a waiting buffer as invalid.
        head, st = queue_irq_buffer(2)
        assert gpio_request(s, gpio.MSG_IRQ_TYPE, 2, gpio.IRQ_TYPE_NONE)[0] == 0
        [u] = evq.get_used(1)
        assert (u.head, s.ram.read(st, 1)) == (head, b"\x00")
        # Changing a set irq type without going through NONE is an error.
        assert gpio_request(s, gpio.MSG_IRQ_TYPE, 2, gpio.IRQ_TYPE_EDGE_BOTH)[0] == 0
        assert gpio_request(s, gpio.MSG_IRQ_TYPE, 2, gpio.IRQ_TYPE_EDGE_RISING)[0] == 1
    finally:
        s.close()


def test_gpio_survives_disconnect_mid_handshake_and_serves_next(gpio_backend: Backend) -> None:
    f = fe.Frontend(gpio_backend.sock)
    f.send(p.SET_OWNER)
    f.send(p.GET_FEATURES)
    f.sock.sendall(p.HEADER.pack(p.SET_FEATURES, p.VERSION, 8)[:6])  # half a header, then gone
    f.close()
    s = gpio_session(gpio_backend)
    try:
        assert gpio_request(s, gpio.MSG_GET_DIRECTION, 0)[0] == gpio.STATUS_OK
    finally:
        s.close()
    assert gpio_backend.alive()


def test_get_vring_base_stops_the_ring_and_reports_next_avail(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    q = s.queues[0]
    try:
        i2c_transfer(s, [(i2c.EEPROM_ADDR, False, b"\x00"), (i2c.EEPROM_ADDR, True, 1)])
        s.fe.send(p.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
        assert p.VRING_STATE.unpack(s.fe.recv(p.GET_VRING_BASE)) == (0, 2)
        bufs, status, _ = i2c_chain(s, i2c.EEPROM_ADDR, True, 1)
        q.add_chain(bufs)
        q.notify()  # the backend closed its kick fd: nothing may be consumed
        assert s.fe.get_u64(p.GET_FEATURES) == s.features  # a round trip, so it had the chance
        assert s.ram.u16(q.used + 2) == 2
        assert s.ram.read(status, 1) == b"\xee"
    finally:
        s.close()


def test_i2c_has_no_config_space_get_config_drops_the_front_end(i2c_backend: Backend) -> None:
    s = i2c_session(i2c_backend)
    try:
        with pytest.raises((VhostUserError, ConnectionError)):
            s.fe.get_config(0, 4)
    finally:
        s.close()
    assert i2c_backend.alive()


# ---- no compiled extensions ------------------------------------------------------------------


def pure_python_tree(dst: Path) -> None:
    """Copy only the Python sources of xvf and tests/backends: the shape of a checkout whose
    Cython extensions were never built in place (xvf pip-installed elsewhere, or not at all)."""
    for src in [ROOT / "tests" / "__init__.py", *(ROOT / "xvf").rglob("*.py")]:
        out = dst / src.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
    for src in (ROOT / "tests" / "backends").glob("*.py"):
        out = dst / src.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())


@pytest.mark.parametrize("module", ["i2c", "gpio"])
def test_backends_start_without_xvf_compiled_extensions(tmp_path: Path, module: str) -> None:
    tree = tmp_path / "checkout"
    pure_python_tree(tree)
    # -S: no site-packages, so neither an installed xvf nor the editable finder is reachable.
    py = [sys.executable, "-S", "-B"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    probe = subprocess.run(
        [
            *py,
            "-c",
            "import importlib.util as u, sys, xvf\n"
            f"import tests.backends.{module}\n"
            "assert u.find_spec('xvf.hotpath._gnttab') is None, 'compiled modules are reachable'\n"
            "loaded = [m.__file__ for n, m in sys.modules.items() if n.startswith('xvf')]\n"
            "assert all(f.endswith('.py') for f in loaded), loaded\n"
            "print(xvf.__file__)",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(tree))
    helped = subprocess.run(
        [*py, "-m", f"tests.backends.{module}", "--help"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--socket-path" in helped.stdout
    sock = tmp_path / f"{module}.sock0"
    proc = subprocess.Popen(
        [*py, "-m", f"tests.backends.{module}", "--socket-path", str(sock)],
        cwd=tree,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the backend did not start listening"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    assert "listening on" in proc.stderr.read()
