"""virtio-fs guest driver (virtio 1.2 section 5.11), device id 26: a minimal FUSE client.

Config space: `u8 tag[36]` then `le32 num_request_queues`. Queue 0 is hiprio
(FORGET and INTERRUPT only; this driver sends neither, it only sets it up, as
Linux does), queues 1.. are request queues. Each FUSE request is one chain:
device-readable `fuse_in_header` + arguments (+ write data), then device-writable
`fuse_out_header` + reply. Struct layouts and opcodes are Linux's
include/uapi/linux/fuse.h.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct

from xvf.errors import SimulatorError
from xvf.platform.sim.drivers import DeviceError
from xvf.platform.sim.virtio_driver import VirtioMmioDevice
from xvf.protocols import virtio as R

VIRTIO_ID_FS = 26
CFG_TAG = 0
TAG_SIZE = 36
CFG_NUM_REQUEST_QUEUES = 36
HIPRIO_QUEUE = 0
REQUEST_QUEUE = 1

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 36  # what QEMU 7.2's virtiofsd speaks
FUSE_ROOT_ID = 1

FUSE_LOOKUP = 1
FUSE_GETATTR = 3
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_RELEASE = 18
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_CREATE = 35

FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_MAX_PAGES = 1 << 22

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_write time_gran max_pages ... flags2
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII88x")  # nodeid generation entry/attr valid (+nsec), attr
ATTR_OUT = struct.Struct("<QII88x")  # attr_valid attr_valid_nsec dummy, attr
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RW_IN = struct.Struct("<QQIIQII")  # fuse_read_in and fuse_write_in share this layout
WRITE_OUT = struct.Struct("<II")  # size padding
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner


class FuseError(DeviceError):
    """The file server answered a FUSE request with an error."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")
        self.errno = err


def _attr_fields(reply: bytes, offset: int) -> dict[str, int]:
    f = ATTR.unpack_from(reply, offset)
    return {"ino": f[0], "size": f[1], "mode": f[9], "nlink": f[10], "uid": f[11], "gid": f[12]}


class VirtioFs:
    """Driver of one virtio-fs device; requests go one at a time on request queue 1."""

    def __init__(self, dev: VirtioMmioDevice, *, queue_size: int = 128) -> None:
        self.dev = dev
        self.ram = dev.ram
        self.queue_size = queue_size
        self.tag = ""
        self.num_request_queues = 0
        self.minor = 0  # negotiated FUSE minor version
        self.max_write = 4096
        self._unique = itertools.count(1)

    def start(self) -> None:
        if self.dev.probe() != VIRTIO_ID_FS:
            raise SimulatorError(f"{self.dev.name}: device id {self.dev.device_id} is not fs")
        # Read the config before queue setup, as Linux's virtio_fs_probe does: it needs
        # the request queue count to know how many queues to set up.
        self.dev.negotiate(0)
        raw = self.dev.read_config_bytes(CFG_TAG, TAG_SIZE)
        self.tag = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.num_request_queues = self.dev.read_config(CFG_NUM_REQUEST_QUEUES, 4)
        if not self.tag:
            self.dev._fail("empty tag in config space (Linux's virtio_fs refuses it)")
        if self.num_request_queues == 0:
            self.dev._fail("no request queues in config space")
        try:
            for index in (HIPRIO_QUEUE, REQUEST_QUEUE):
                self.dev.setup_queue(index, self.queue_size)
            self.dev.driver_ok()
        except Exception:
            self.dev._add_status(R.STATUS_FAILED)  # tell the device, as initialize() does
            raise

    def close(self) -> None:
        self.dev.shutdown()

    # -- one request ---------------------------------------------------------------
    def request(self, opcode: int, nodeid: int, args: bytes, reply_size: int, what: str) -> bytes:
        """Send one FUSE request; returns the reply body (without fuse_out_header)."""
        unique = next(self._unique)
        head = IN_HEADER.pack(
            IN_HEADER.size + len(args), opcode, unique, nodeid, os.getuid(), os.getgid(),
            os.getpid(), 0, 0,
        )  # fmt: skip
        in_len = IN_HEADER.size + len(args)
        out_len = OUT_HEADER.size + reply_size
        req_gpa = self.ram.alloc(in_len)
        rep_gpa = self.ram.alloc(out_len)
        self.ram.write(req_gpa, head + args)
        self.ram.write(rep_gpa, bytes(out_len))
        # header and reply body in separate buffers, as Linux lays them out
        ins = [(rep_gpa, OUT_HEADER.size)]
        if reply_size:
            ins.append((rep_gpa + OUT_HEADER.size, reply_size))
        token = ("fuse", unique)
        self.dev.queues[REQUEST_QUEUE].add([(req_gpa, in_len)], ins, token)
        self.dev.kick(REQUEST_QUEUE)
        done = self.dev.wait_used(REQUEST_QUEUE, what)
        # wait_used may hand back buffers of another request only if several were in
        # flight; this driver has one at a time, so anything else is a device bug.
        if [t for t, _ in done] != [token]:
            raise SimulatorError(f"{self.dev.name}: unexpected completions {done!r} for {what}")
        written = done[0][1]
        reply = self.ram.read(rep_gpa, out_len)
        self.ram.free(req_gpa)
        self.ram.free(rep_gpa)
        length, error, got_unique = OUT_HEADER.unpack_from(reply)
        if got_unique != unique:
            raise SimulatorError(f"{what}: reply for request {got_unique}, sent {unique}")
        if error:
            raise FuseError(what, -error)
        if length < OUT_HEADER.size or length > out_len or written < length:
            raise SimulatorError(
                f"{what}: reply length {length} (device wrote {written}, buffer {out_len})"
            )
        return reply[OUT_HEADER.size : length]

    # -- operations ----------------------------------------------------------------
    def init(self) -> None:
        """FUSE_INIT: agree on the protocol version and the largest write."""
        args = INIT_IN.pack(
            FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0,
            FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES, 0,
        )  # fmt: skip
        reply = self.request(FUSE_INIT, 0, args, INIT_OUT.size, "FUSE_INIT")
        if len(reply) < 24:  # FUSE_COMPAT_22_INIT_OUT_SIZE: up to max_write
            raise SimulatorError(f"FUSE_INIT reply of {len(reply)} bytes")
        reply = reply.ljust(INIT_OUT.size, b"\0")
        major, minor, _ra, _flags, _bg, _cong, max_write = INIT_OUT.unpack(reply)[:7]
        if major != FUSE_KERNEL_VERSION:
            raise SimulatorError(f"FUSE_INIT: server speaks major version {major}")
        self.minor = min(minor, FUSE_KERNEL_MINOR_VERSION)
        self.max_write = max(4096, max_write)

    def lookup(self, name: str, parent: int = FUSE_ROOT_ID) -> dict[str, int]:
        reply = self.request(
            FUSE_LOOKUP, parent, name.encode() + b"\0", ENTRY_OUT.size, f"LOOKUP {name}"
        )
        nodeid = ENTRY_OUT.unpack_from(reply)[0]
        return {"nodeid": nodeid, **_attr_fields(reply, 40)}

    def getattr(self, nodeid: int) -> dict[str, int]:
        reply = self.request(
            FUSE_GETATTR, nodeid, GETATTR_IN.pack(0, 0, 0), ATTR_OUT.size, "GETATTR"
        )
        return _attr_fields(reply, 16)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        reply = self.request(FUSE_OPEN, nodeid, OPEN_IN.pack(flags, 0), OPEN_OUT.size, "OPEN")
        return OPEN_OUT.unpack_from(reply)[0]

    def create(
        self, name: str, mode: int = 0o644, flags: int = os.O_WRONLY, parent: int = FUSE_ROOT_ID
    ) -> tuple[int, int]:
        """FUSE_CREATE; returns (nodeid, fh)."""
        args = CREATE_IN.pack(flags | os.O_CREAT, mode, 0o022, 0) + name.encode() + b"\0"
        reply = self.request(
            FUSE_CREATE, parent, args, ENTRY_OUT.size + OPEN_OUT.size, f"CREATE {name}"
        )
        return ENTRY_OUT.unpack_from(reply)[0], OPEN_OUT.unpack_from(reply, ENTRY_OUT.size)[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        args = RW_IN.pack(fh, offset, size, 0, 0, os.O_RDONLY, 0)
        return self.request(FUSE_READ, nodeid, args, size, f"READ {size} at {offset}")

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        """FUSE_WRITE in pieces of at most max_write; returns the bytes written."""
        done = 0
        while done < len(data):
            piece = data[done : done + self.max_write]
            args = RW_IN.pack(fh, offset + done, len(piece), 0, 0, os.O_WRONLY, 0) + piece
            reply = self.request(
                FUSE_WRITE, nodeid, args, WRITE_OUT.size, f"WRITE {len(piece)} at {done}"
            )
            n = WRITE_OUT.unpack_from(reply)[0]
            if n == 0:
                raise DeviceError(f"{self.dev.name}: WRITE at {offset + done} wrote nothing")
            done += n
        return done

    def flush(self, nodeid: int, fh: int) -> None:
        self.request(FUSE_FLUSH, nodeid, FLUSH_IN.pack(fh, 0, 0, 0), 0, "FLUSH")

    def release(self, nodeid: int, fh: int, flags: int = os.O_RDONLY) -> None:
        self.request(FUSE_RELEASE, nodeid, RELEASE_IN.pack(fh, flags, 0, 0), 0, "RELEASE")
