"""A guest's RAM is foreign-mapped once for all its devices (xvf.guest.ram), on the
software Xen: the first user maps it, the others share it, the last one unmaps."""

from __future__ import annotations

import threading

import pytest

from xvf.errors import XvfError
from xvf.guest.ram import GuestRam
from xvf.platform.sim.platform import SimPlatform


class CountingPlatform(SimPlatform):
    """The simulator's platform, counting the foreign mappings it makes."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.maps = 0

    def map_guest_memory(self, domid: int):  # type: ignore[no-untyped-def]
        self.maps += 1
        return super().map_guest_memory(domid)


def test_devices_of_one_guest_share_one_mapping_and_the_last_unmaps(hypervisor) -> None:
    dom = hypervisor.create_domain("ram", memory_mib=16, vcpus=1)
    platform = CountingPlatform(hypervisor.run_dir)
    ram = GuestRam(platform, dom.domid)
    got: list[object] = []
    workers = [threading.Thread(target=lambda: got.append(ram.acquire())) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert platform.maps == 1 and ram.users == 4
    assert all(m is got[0] for m in got)
    gpa = ram.memory.regions[0].gpa
    dom.ram.write(gpa, b"seen by every device")
    assert bytes(ram.memory.view(gpa, 20)) == b"seen by every device"
    for _ in range(3):
        ram.release()
    assert ram.mapped  # one device still uses it
    ram.release()
    assert not ram.mapped
    with pytest.raises(XvfError, match="not mapped"):
        ram.memory  # noqa: B018
    ram.release()  # one too many: harmless
    assert ram.users == 0
    ram.acquire()  # a device started later maps it anew
    assert platform.maps == 2
    ram.release()
    platform.close()
