# Python-visible API of _relay.pyx, for mypy.

from collections.abc import Callable
from typing import Any

from xvf.hotpath._ioreq import FdHandler, MmioState

MAX_REFS_PER_MAP: int
MAX_BATCH: int
DEFAULT_SHADOW_SIZE: int
PAGE_SIZE: int

def grant_span(addr: int, length: int) -> tuple[list[int], int]: ...

class ShadowMemory:
    """One memfd owned by xvf: the only memory region the backend sees."""

    ALIGN: int
    size: int
    capacity: int
    uva: int
    fd: int
    mem: memoryview
    def __init__(self, size: int = ...) -> None: ...
    def alloc(self, length: int, align: int = ...) -> int | None: ...
    def free(self, offset: int) -> None: ...
    @property
    def free_extents(self) -> list[tuple[int, int]]: ...
    @property
    def waiting_queues(self) -> int: ...
    def close(self) -> None: ...

class GrantRelayQueue(FdHandler):
    """Relays one guest split virtqueue through a shadow ring in `shadow`."""

    index: int
    num: int
    where: str
    mapper: Any  # xvf.protocols.grant_relay.GrantPages
    shadow: ShadowMemory
    state: MmioState
    backend_kick_fd: int
    backend_call_fd: int
    guest_kick_fd: int
    notice_fd: int
    bad_requests: int
    relayed_requests: int
    copied_bytes: int
    stalled: bool
    stopped: bool
    broken: bool
    quiesced: bool
    on_broken: Callable[[str], None] | None
    last_avail: int
    shadow_desc: int
    shadow_avail: int
    shadow_used: int
    def __init__(
        self,
        index: int,
        num: int,
        desc: int,
        avail: int,
        used: int,
        mapper: Any,
        shadow: ShadowMemory,
        state: MmioState,
        kick_fd_to_backend: int,
        call_fd_from_backend: int = -1,
        label: str = "",
        on_broken: Callable[[str], None] | None = None,
    ) -> None: ...
    @property
    def counters(self) -> tuple[int, int, int]: ...
    @property
    def vring_addrs(self) -> tuple[int, int, int]: ...
    def on_guest_kick(self) -> None: ...
    def resume(self) -> None: ...
    def on_backend_call(self) -> None: ...
    def drain_notices(self) -> None: ...
    def in_flight(self) -> int: ...
    def quiesce(self) -> None: ...
    def backend_used_idx(self) -> int: ...
    def shadow_avail_idx(self) -> int: ...
    def stop(self) -> int: ...
