"""Contiguous mappings of pages in pure Python: the mmap module, with ctypes only where Python
has no word for it (a mapping's address, MAP_FIXED). No compiled xvf extension is needed, so the
backends also run from a source checkout whose extensions were never built in place.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Sequence

# These backends stand in for third-party ones (rust-vmm): they keep their own
# copy of these facts on purpose and never import xvf's (xvf.protocols.virtqueue).
PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT  # Xen's page (XEN_PAGE_SIZE), whatever the Dom0 kernel uses
# Python's mmap module does not export MAP_FIXED; 0x10 on Linux x86_64 and arm64 alike.
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,  # off_t of a 64-bit Linux
]
_libc.mmap.restype = ctypes.c_void_p


def address_of(mm: mmap.mmap) -> int:
    """Start address of a writable mmap object (privcmd wants it in MMAPBATCH_V2)."""
    probe = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe  # its export of `mm` goes with it, so `mm` can still be closed


class PageMapping:
    """Pages mapped contiguously in this process.

    `view()` hands out memoryviews (read-only ones for a read-only mapping: writing through one
    would fault). `close()` unmaps; while a view is alive the unmap is refused (BufferError),
    the pages then go with the last view. The callbacks added with `on_close` (the gntdev unmap
    ioctl, a software-Xen OP_GNT_UNMAP) run after the unmap attempt in any case, so grants are
    never leaked because a view was.
    """

    def __init__(self, mm: mmap.mmap, writable: bool) -> None:
        self._mm: mmap.mmap | None = mm
        self.length = len(mm)
        self.writable = writable
        self._after: list[Callable[[], object]] = []

    def __len__(self) -> int:
        return self.length

    @property
    def closed(self) -> bool:
        return self._mm is None

    def on_close(self, fn: Callable[[], object]) -> None:
        self._after.append(fn)

    def view(self) -> memoryview:
        if self._mm is None:
            raise BufferError("page mapping is closed")
        mv = memoryview(self._mm)
        if self.writable:
            return mv
        ro = mv.toreadonly()
        mv.release()
        return ro

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is None:
            return
        after, self._after = self._after, []
        try:
            mm.close()
        finally:
            errors: list[BaseException] = []
            for fn in after:
                try:
                    fn()
                except Exception as e:  # every step runs; the first failure is reported
                    errors.append(e)
            if errors:
                raise errors[0]


def map_file_pages(fd: int, offsets: Sequence[int], writable: bool) -> PageMapping:
    """The pages of `fd` at the given page-aligned offsets, mapped contiguously (the software
    Xen's gntdev: each granted frame is a page of the guest-RAM memfd). Raises OSError with
    errno set and `strerror` saying which step failed."""
    if not offsets:
        raise ValueError("no pages to map")
    for off in offsets:
        if off % PAGE or off < 0:
            raise ValueError(f"page offset {off:#x} is not page aligned")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    # One anonymous mmap object reserves the range and owns it (its close unmaps all of it);
    # each page is then put over its slot with MAP_FIXED.
    reserve = mmap.mmap(
        -1, len(offsets) * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
    try:
        base = address_of(reserve)
        for i, off in enumerate(offsets):
            want = base + i * PAGE
            got = _libc.mmap(want, PAGE, prot, mmap.MAP_SHARED | MAP_FIXED, fd, off)
            if got != want:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of the page at offset {off:#x}")
    except BaseException:
        reserve.close()
        raise
    return PageMapping(reserve, writable)
