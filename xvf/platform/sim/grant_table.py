"""A guest's grant table, version 1 (Xen public/grant_table.h, include/xvf/xen_grant.h).

The entries live in their own memfd, as the shared grant frames do in Xen:
`grant_entry_v1 {u16 flags, u16 domid, u32 frame}`. The guest side is what
Linux's grant-table driver does (allocate references, grant, end access, free);
the mapper side is what Xen does when a backend maps a grant through gntdev
(check the entry, then set GTF_reading/GTF_writing while it is mapped).

One lock stands for Xen's atomic cmpxchg on the flags word: the guest and the
mapper run in different threads of the simulator process, and a grant copy runs
in the process that asked for it (xvf.platform.sim._grant_copy), so the lock is a
GrantLock, which processes share.
"""

from __future__ import annotations

import errno
import mmap
import os

from xvf.errors import GrantError
from xvf.hotpath._layout import PAGE_SIZE
from xvf.platform.sim._grant_copy import GrantLock

GTF_INVALID = 0
GTF_PERMIT_ACCESS = 1
GTF_TYPE_MASK = 3
GTF_READONLY = 1 << 2
GTF_READING = 1 << 3
GTF_WRITING = 1 << 4
ENTRY_SIZE = 8
# Xen reserves the first entries (console, xenstore); Linux never hands them out.
GNTTAB_NR_RESERVED_ENTRIES = 8


class GrantTable:
    """Grant table v1 of one guest: the guest's API and the mapper's checks."""

    def __init__(self, nr_entries: int = 4096) -> None:
        if nr_entries <= GNTTAB_NR_RESERVED_ENTRIES:
            raise GrantError(f"a grant table needs more than {GNTTAB_NR_RESERVED_ENTRIES} entries")
        self.nr_entries = nr_entries
        size = (nr_entries * ENTRY_SIZE + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self.fd = os.memfd_create("xvf-grant-table", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mmap = mmap.mmap(self.fd, size)
        raw = memoryview(self._mmap)
        self._h = raw.cast("H")  # flags at [4*ref], domid at [4*ref + 1]
        self._i = raw.cast("I")  # frame at [2*ref + 1]
        raw.release()
        self._lock = GrantLock()
        # 1 = free; searched with bytes.find for runs of consecutive refs.
        self._free = bytearray(b"\x01") * nr_entries
        self._free[:GNTTAB_NR_RESERVED_ENTRIES] = bytes(GNTTAB_NR_RESERVED_ENTRIES)
        self._cursor = GNTTAB_NR_RESERVED_ENTRIES
        # Mapper pins per ref: [read-only mappings, writable mappings].
        self._pins: dict[int, list[int]] = {}

    # -- entry access ---------------------------------------------------------
    def flags(self, ref: int) -> int:
        self._check_ref(ref)
        return self._h[4 * ref]

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of `ref`, as the shared frame holds them."""
        self._check_ref(ref)
        return self._h[4 * ref], self._h[4 * ref + 1], self._i[2 * ref + 1]

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise GrantError(f"bad grant ref {ref} (table has {self.nr_entries})", errno.EINVAL)

    @property
    def lock(self) -> GrantLock:
        """Held while Xen's side works on entries (a grant copy holds it throughout)."""
        return self._lock

    def retire(self) -> None:
        """The domain is gone: grant copies now find no domain."""
        self._lock.retire()

    def free_count(self) -> int:
        with self._lock:
            return self._free.count(1)

    # -- the guest's side -------------------------------------------------------
    def alloc_refs(self, n: int) -> int:
        """Reserve `n` consecutive refs; returns the first (gnttab_alloc_grant_reference_seq)."""
        if n <= 0:
            raise GrantError(f"cannot allocate {n} grant refs", errno.EINVAL)
        run = b"\x01" * n
        with self._lock:
            # Start after the last allocation, as refs cycle through a free list in Linux.
            first = self._free.find(run, self._cursor)
            if first < 0:
                first = self._free.find(run, GNTTAB_NR_RESERVED_ENTRIES)
            if first < 0:
                raise GrantError(
                    f"no {n} consecutive free grant refs ({self._free.count(1)} free)",
                    errno.ENOSPC,
                )
            self._free[first : first + n] = bytes(n)
            self._cursor = first + n
        return first

    def free_refs(self, first: int, n: int = 1) -> None:
        """Return refs to the free list; their entries must no longer grant access."""
        with self._lock:
            for ref in range(first, first + n):
                self._check_ref(ref)
                if ref < GNTTAB_NR_RESERVED_ENTRIES:
                    raise GrantError(f"grant ref {ref} is reserved", errno.EINVAL)
                if self._free[ref]:
                    raise GrantError(f"grant ref {ref} freed twice", errno.EINVAL)
                if self._h[4 * ref] & (GTF_READING | GTF_WRITING):
                    raise GrantError(f"grant ref {ref} freed while mapped", errno.EBUSY)
            for ref in range(first, first + n):
                self._h[4 * ref] = GTF_INVALID
                self._free[ref] = 1

    def grant_access(self, ref: int, domid: int, gfn: int, readonly: bool) -> None:
        """Let `domid` map frame `gfn` (gnttab_grant_foreign_access_ref)."""
        self._check_ref(ref)
        if not 0 <= gfn <= 0xFFFFFFFF:
            raise GrantError(f"frame {gfn:#x} does not fit a v1 grant entry", errno.EINVAL)
        with self._lock:
            if self._free[ref] or ref < GNTTAB_NR_RESERVED_ENTRIES:
                raise GrantError(
                    f"granting through ref {ref}, which is not allocated", errno.EINVAL
                )
            if self._h[4 * ref] & (GTF_READING | GTF_WRITING):
                raise GrantError(f"re-granting ref {ref} while it is mapped", errno.EBUSY)
            # frame and domid first, flags last: the flags make the entry valid.
            self._i[2 * ref + 1] = gfn
            self._h[4 * ref + 1] = domid
            self._h[4 * ref] = GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0)

    def end_access(self, ref: int) -> bool:
        """Revoke a grant unless it is mapped (gnttab_end_foreign_access_ref); True if revoked."""
        self._check_ref(ref)
        with self._lock:
            if self._h[4 * ref] & (GTF_READING | GTF_WRITING):
                return False
            self._h[4 * ref] = GTF_INVALID
            return True

    # -- the mapper's side (Xen, on behalf of gntdev) ---------------------------
    def lookup(self, ref: int, domid: int, writable: bool) -> int:
        """The frame `domid` may map through `ref`; GrantError says why not."""
        with self._lock:
            return self._validate(ref, domid, writable)

    def _validate(self, ref: int, domid: int, writable: bool) -> int:
        self._check_ref(ref)
        flags, owner, frame = self._h[4 * ref], self._h[4 * ref + 1], self._i[2 * ref + 1]
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS:
            raise GrantError(f"grant ref {ref} is not granted (flags {flags:#x})", errno.EPERM)
        if owner != domid:
            raise GrantError(
                f"grant ref {ref} is granted to domain {owner}, not {domid}", errno.EPERM
            )
        if writable and flags & GTF_READONLY:
            raise GrantError(f"grant ref {ref} is read-only, refused a writable map", errno.EACCES)
        return frame

    def map_ref(self, ref: int, domid: int, writable: bool) -> int:
        """lookup + mark_mapped in one atomic step; returns the frame."""
        with self._lock:
            frame = self._validate(ref, domid, writable)
            self._pin(ref, writable)
            return frame

    def mark_mapped(self, ref: int, writable: bool) -> None:
        """Record a mapping: GTF_reading (and GTF_writing) stay set until it is gone."""
        with self._lock:
            self._check_ref(ref)
            flags = self._h[4 * ref]
            # Re-checked under the lock: the guest may have ended access since lookup().
            if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS:
                raise GrantError(f"grant ref {ref} was revoked before it was mapped", errno.EPERM)
            if writable and flags & GTF_READONLY:
                raise GrantError(f"grant ref {ref} is read-only", errno.EACCES)
            self._pin(ref, writable)

    def _pin(self, ref: int, writable: bool) -> None:
        pins = self._pins.setdefault(ref, [0, 0])
        pins[1 if writable else 0] += 1
        self._h[4 * ref] |= GTF_READING | (GTF_WRITING if writable else 0)

    def mark_unmapped(self, ref: int, writable: bool | None = None) -> None:
        """Drop one mapping of `ref`. Without `writable`, a read-only pin goes first
        (so GTF_writing is never cleared early)."""
        with self._lock:
            self._check_ref(ref)
            pins = self._pins.get(ref)
            if pins is None:
                raise GrantError(f"grant ref {ref} is not mapped", errno.EINVAL)
            if writable is None:
                kind = 0 if pins[0] else 1
            else:
                kind = 1 if writable else 0
            if pins[kind] == 0:
                raise GrantError(f"grant ref {ref} has no such mapping", errno.EINVAL)
            pins[kind] -= 1
            flags = self._h[4 * ref]
            if not pins[1]:
                flags &= ~GTF_WRITING
            if not pins[0] and not pins[1]:
                flags &= ~GTF_READING
                del self._pins[ref]
            self._h[4 * ref] = flags

    def close(self) -> None:
        self._h.release()
        self._i.release()
        try:
            self._mmap.close()
        except BufferError:
            pass
        os.close(self.fd)
