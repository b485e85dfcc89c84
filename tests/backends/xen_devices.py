"""Real Xen's /dev/xen/privcmd and /dev/xen/gntdev, as a Xen-aware vhost-user backend uses them.

On real Xen the front-end hands the backend its own open privcmd (FOREIGN regions) or gntdev
(GRANT regions) fd in SET_MEM_TABLE, and the backend maps guest memory through it itself, as
rust-vmm's vm-memory does with its `xen` feature:

- FOREIGN: mmap the privcmd fd (shared, the size of the region), then IOCTL_PRIVCMD_MMAPBATCH_V2
  fills that range with the guest's frames. It must cover the whole mapping in one call (on
  first use the kernel insists on the whole VMA), and per-frame errors come back in an array
  even when the ioctl itself succeeds.
- GRANT: IOCTL_GNTDEV_MAP_GRANT_REF registers the refs and returns an index; an mmap of the
  gntdev fd at that offset maps them (writable or read-only, as the mmap asks). Undone by
  munmap first, then IOCTL_GNTDEV_UNMAP_GRANT_REF.

Layouts are those of Linux's include/uapi/xen/{privcmd,gntdev}.h on a 64-bit little-endian
Dom0 (arm64, x86_64); tests/unit/test_ref_backend_xen_mmap.py compares them with Debian's
headers. Failures raise OSError with errno set and `strerror` naming the step that failed
(without the errno text, which the caller adds).
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import stat
import struct

from .pages import PAGE, PageMapping, address_of

PRIVCMD = "privcmd"
GNTDEV = "gntdev"
NODES = {PRIVCMD: "/dev/xen/privcmd", GNTDEV: "/dev/xen/gntdev"}
DOMID_INVALID = 0x7FF4


def ioc_none(type_: str, nr: int, size: int) -> int:
    """_IOC(_IOC_NONE, type, nr, size) in the asm-generic encoding (arm64 and x86_64 use it)."""
    return (size << 16) | (ord(type_) << 8) | nr


# privcmd_mmapbatch_v2 {unsigned int num; domid_t dom; (pad); __u64 addr; const xen_pfn_t *arr;
# int *err}
MMAPBATCH_V2 = struct.Struct("=IH2xQQQ")
# privcmd_dm_op {domid_t dom; __u16 num; (pad); const privcmd_dm_op_buf *ubufs}: only the probe
PRIVCMD_DM_OP = struct.Struct("=HH4xQ")
# ioctl_gntdev_grant_ref {__u32 domid; __u32 ref}
GRANT_REF = struct.Struct("=II")
# ioctl_gntdev_map_grant_ref {__u32 count; __u32 pad; __u64 index; grant_ref refs[count]}
MAP_GRANT_REF = struct.Struct("=IIQ")
# ioctl_gntdev_unmap_grant_ref {__u64 index; __u32 count; __u32 pad}
UNMAP_GRANT_REF = struct.Struct("=QII")

IOCTL_PRIVCMD_MMAPBATCH_V2 = ioc_none("P", 4, MMAPBATCH_V2.size)
IOCTL_PRIVCMD_DM_OP = ioc_none("P", 5, PRIVCMD_DM_OP.size)
# The header declares refs[1], so its sizeof (and the number) includes one ref.
IOCTL_GNTDEV_MAP_GRANT_REF = ioc_none("G", 0, MAP_GRANT_REF.size + GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = ioc_none("G", 1, UNMAP_GRANT_REF.size)


def pack_mmapbatch_v2(num: int, domid: int, addr: int, arr: int, err: int) -> bytes:
    return MMAPBATCH_V2.pack(num, domid, addr, arr, err)


def pack_map_grant_ref(domid: int, first_ref: int, count: int, index: int = 0) -> bytes:
    """The header and `count` consecutive refs of one domain (the kernel fills in `index`)."""
    refs = array.array("I")
    for ref in range(first_ref, first_ref + count):
        refs.extend((domid, ref))
    return MAP_GRANT_REF.pack(count, 0, index) + refs.tobytes()


def pack_unmap_grant_ref(index: int, count: int) -> bytes:
    return UNMAP_GRANT_REF.pack(index, count, 0)


# An index gntdev never hands out (it counts up from 0): unmapping it changes nothing.
_PROBE_INDEX = 1 << 62


def ioctl(fd: int, request: int, arg: bytearray) -> None:
    """ioctl(2) with an argument the kernel may write back into (tests replace this)."""
    fcntl.ioctl(fd, request, arg, True)


def _is_privcmd(fd: int) -> bool:
    # A dm_op with no buffers does nothing: privcmd answers 0, or EPERM if the fd is restricted.
    try:
        ioctl(fd, IOCTL_PRIVCMD_DM_OP, bytearray(PRIVCMD_DM_OP.pack(DOMID_INVALID, 0, 0)))
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _is_gntdev(fd: int) -> bool:
    try:
        ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, bytearray(pack_unmap_grant_ref(_PROBE_INDEX, 1)))
    except OSError as e:
        return e.errno == errno.ENOENT  # gntdev: no such mapping
    return False


_PROBES = {PRIVCMD: _is_privcmd, GNTDEV: _is_gntdev}


def identify(fd: int) -> str | None:
    """PRIVCMD or GNTDEV if `fd` is that Xen device, else None.

    The device node's st_rdev decides where the node exists. Where it does not (a container
    without /dev/xen, say), an ioctl that changes nothing asks the device itself.
    """
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode):
        return None
    for kind, path in NODES.items():
        try:
            node = os.stat(path)
        except OSError:
            node = None
        if node is not None and stat.S_ISCHR(node.st_mode):
            if node.st_rdev == st.st_rdev:
                return kind
        elif _PROBES[kind](fd):
            return kind
    return None


def map_foreign(fd: int, domid: int, gfn: int, count: int) -> PageMapping:
    """Guest frames gfn .. gfn + count - 1 of `domid`, mapped writable through privcmd `fd`."""
    what = f"IOCTL_PRIVCMD_MMAPBATCH_V2 of {count} frames from gfn {gfn:#x}"
    try:
        mm = mmap.mmap(fd, count * PAGE, flags=mmap.MAP_SHARED)
    except OSError as e:
        raise OSError(e.errno, f"mmap of {count * PAGE:#x} bytes of privcmd") from e
    try:
        gfns = array.array("Q", range(gfn, gfn + count))  # xen_pfn_t: 64 bits on arm64/x86_64
        errs = array.array("i", bytes(4 * count))
        arg = pack_mmapbatch_v2(
            count, domid, address_of(mm), gfns.buffer_info()[0], errs.buffer_info()[0]
        )
        try:
            ioctl(fd, IOCTL_PRIVCMD_MMAPBATCH_V2, bytearray(arg))
            failed = 0
        except OSError as e:
            failed = e.errno or errno.EIO
        # Frames that failed stay unmapped (touching them is SIGBUS), even when the ioctl
        # returns 0, so the array decides; ENOENT (paged out) also fails the ioctl.
        bad = [i for i, err in enumerate(errs) if err] if any(errs) else []
        if bad:
            first = bad[0]
            raise OSError(
                abs(errs[first]),
                f"{what}: {len(bad)} frames failed, the first gfn {gfn + first:#x}"
                + (f" (ioctl: {errno.errorcode.get(failed, failed)})" if failed else ""),
            )
        if failed:
            raise OSError(failed, what)
    except BaseException:
        mm.close()
        raise
    return PageMapping(mm, writable=True)


def unmap_grant_ref(fd: int, index: int, count: int) -> None:
    try:
        ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, bytearray(pack_unmap_grant_ref(index, count)))
    except OSError as e:
        raise OSError(
            e.errno, f"IOCTL_GNTDEV_UNMAP_GRANT_REF of {count} grants at index {index:#x}"
        ) from e


def map_grants(fd: int, domid: int, first_ref: int, count: int, writable: bool) -> PageMapping:
    """Grant refs first_ref .. first_ref + count - 1 of `domid`, mapped contiguously through
    gntdev `fd`; closing the mapping unmaps it, then removes the refs from gntdev."""
    arg = bytearray(pack_map_grant_ref(domid, first_ref, count))
    try:
        ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
    except OSError as e:
        raise OSError(e.errno, f"IOCTL_GNTDEV_MAP_GRANT_REF of {count} grants") from e
    index = MAP_GRANT_REF.unpack_from(arg)[2]
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        # Linux maps the grants now (auto-translated Dom0), so a writable mmap of a read-only
        # grant fails here.
        mm = mmap.mmap(fd, count * PAGE, flags=mmap.MAP_SHARED, prot=prot, offset=index)
    except (OSError, ValueError, OverflowError) as e:  # the latter two: an index mmap refuses
        try:
            unmap_grant_ref(fd, index, count)
        except OSError:
            pass  # the mmap failure is the one to report
        access = "writable" if writable else "read-only"
        err = getattr(e, "errno", None) or errno.EINVAL
        raise OSError(err, f"{access} mmap of {count} grants at gntdev index {index:#x}") from e
    mapping = PageMapping(mm, writable)
    mapping.on_close(lambda: unmap_grant_ref(fd, index, count))
    return mapping
