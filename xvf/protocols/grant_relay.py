"""Shadow-virtqueue relay: grant-mode guests served by backends that cannot map grants.

In grant mode every address the guest puts in a ring is a grant DMA address
(bit 63 set, `(first_ref << 12) + offset`, consecutive refs per page). A
standard vhost-user backend only understands addresses inside the memory
regions it was given. So xvf gives it one region it owns (`ShadowMemory`),
builds a shadow split ring there per guest queue, and relays requests
(`GrantRelayQueue`): guest kick -> copy the request's buffers from its grants
into bounce buffers, post a shadow chain, kick the backend; backend call -> copy
the device-written bytes back to the guest's grants, complete the guest's used
ring, interrupt. This is the technique of QEMU's vDPA shadow virtqueues; the
copies are Xen's grant copy (gntdev GRANT_COPY), as QEMU's xen-block does, so
only the rings are ever mapped.

Batching: the requests one kick finds (up to MAX_BATCH, MAX_REFS_PER_MAP grant
refs) are copied in by one `copy` call, and the completions one backend call
finds are copied back by one. A request whose grant Xen refuses is refused alone
(at completion: completed with len 0); if a call fails as a whole, each request
is copied on its own.

Malformed guest chains are never forwarded: they are completed with used len 0
and counted in `GrantRelayQueue.bad_requests` (for virtio-blk the guest then
sees a request that wrote nothing, not a status, which is good enough for a
broken or hostile driver). A chain is read once and checked whole: every
address a grant address, no zero length, no loop, next indices in range, an
indirect table (flattened into the shadow ring) not nested, not chained, a whole
number of descriptors no longer than the queue. A ring the guest breaks (an avail
index further ahead than the queue is long, a head outside it) stops the queue
and `on_broken` marks the device DEVICE_NEEDS_RESET. A used id the backend
never got is logged (rate-limited) and skipped.

The rings and copies are C (xvf/hotpath/_relay.pyx: no Python object per
request), and so is the copy call (a GrantCopier: gntdev's ioctl, or the software
Xen's copier). A queue's kicks and calls run without the GIL on its guest's
service thread (the queue is an FdHandler of that thread's ServiceLoop); its logs
and a broken ring reach the daemon's thread through `notice_fd`.
"""

from __future__ import annotations

from typing import Protocol

from xvf.errors import RelayError
from xvf.hotpath import _relay
from xvf.hotpath._gnttab import GrantCopier, GrantMapping
from xvf.hotpath._relay import (
    DEFAULT_SHADOW_SIZE,
    MAX_BATCH,
    MAX_REFS_PER_MAP,
    GrantRelayQueue,
    grant_span,
)
from xvf.protocols import virtio as V
from xvf.protocols.vhost_user_wire import VhostUserRegion

__all__ = [
    "DEFAULT_SHADOW_SIZE",
    "GUEST_FEATURE_MASK",
    "MAX_BATCH",
    "MAX_REFS_PER_MAP",
    "GrantPages",
    "GrantRelayQueue",
    "RelayError",
    "ShadowMemory",
    "grant_span",
    "relay_guest_features",
]

# Feature bits the guest must not be offered in relay mode: the relay completes
# in backend order, not necessarily in avail order (IN_ORDER). Packed rings are
# never offered by xvf. INDIRECT_DESC is supported (tables are flattened into
# the shadow ring). EVENT_IDX works either way: the relay keeps avail_event
# (guest) and used_event (shadow) at "notify me of every buffer" and simply
# always notifies the other side (extra notifications are allowed); masking it
# too saves nothing measurable here.
GUEST_FEATURE_MASK = ~(1 << V.F_IN_ORDER)


def relay_guest_features(features: int) -> int:
    """The device features to offer a grant-mode guest when the relay serves it."""
    return features & GUEST_FEATURE_MASK


class GrantPages(Protocol):
    """What the relay needs of a grant mapper: mapping the rings, copying the data.
    The platform's GrantMapper (xvf.platform.interface) is one; declared here so
    that this protocol layer needs nothing from the platform layer above it."""

    domid: int

    def map(self, refs: list[int], writable: bool) -> GrantMapping: ...
    def unmap(self, refs: list[int]) -> None: ...
    def copier(self, address: int, size: int) -> GrantCopier: ...


class ShadowMemory(_relay.ShadowMemory):
    """One memfd owned by xvf: the only memory region the backend sees (gpa 0..size)."""

    def region(self) -> VhostUserRegion:
        return VhostUserRegion(gpa=0, size=self.size, uva=self.uva, fd=self.fd, fd_offset=0)
