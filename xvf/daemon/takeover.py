"""What an xvf that was killed leaves behind, so that the next one can take over.

IOREQ servers belong to Dom0, not to the process that created them: after a SIGKILL the
dead xvf's servers stay, enabled, with their MMIO windows mapped. Their vCPU event
channels fall back to unbound when its /dev/xen/evtchn closes, and a vCPU caught in the
middle of an access waits on its slot for good. Xen hands an access to the enabled
server with the highest id whose ranges contain it (ioreq_server_select), so a new server
gets the windows only if its id is higher. Each server xvf creates is therefore recorded
in xenstore, and a later xvf retires the recorded ones once it serves that guest itself
(xvf.guest.guest.Guest.retire): it answers their waiting vCPUs, then destroys them.

Layout, per guest: /local/domain/<own domid>/xvf/<guest domid>/ioreq-servers = "<id> ...",
and .../vm = the guest's /local/domain/<domid>/vm (libxl's /vm/<uuid>) when they were
made: a record of an earlier domain that had the same domid is dropped, never acted on
(its servers died with it, and the ids may be another device model's now).
"""

from __future__ import annotations

import logging

from xvf.errors import XvfError
from xvf.protocols.xenstore import XenStore

log = logging.getLogger("xvf.daemon.takeover")


class ServerRecord:
    """The IOREQ servers this daemon (or one before it) created, per guest."""

    def __init__(self, xs: XenStore, own_domid: int) -> None:
        self.xs = xs
        self.root = f"/local/domain/{own_domid}/xvf"

    def _path(self, domid: int) -> str:
        return f"{self.root}/{domid}/ioreq-servers"

    def _read(self, domid: int) -> list[int]:
        raw = self.xs.read(self._path(domid)) or ""
        return [int(t) for t in raw.split() if t.isdigit() and len(t) <= 3]

    def _identity(self, domid: int) -> str | None:
        return self.xs.read(f"/local/domain/{domid}/vm")

    def recorded(self) -> dict[int, list[int]]:
        """{guest domid: [server ids]} left by earlier runs for guests that still run;
        records of guests gone (or of an earlier domain with the same id) are dropped."""
        out: dict[int, list[int]] = {}
        try:
            names = self.xs.directory(self.root)
        except XvfError as exc:
            log.warning("cannot read %s: %s", self.root, exc)
            return out
        for name in names:
            if not (name.isdigit() and len(name) <= 5):
                continue
            domid = int(name)
            ids = self._read(domid)
            vm = self.xs.read(f"{self.root}/{domid}/vm")
            if ids and vm is not None and vm == self._identity(domid):
                out[domid] = ids
            else:
                self.forget(domid)
        return out

    def _write(self, domid: int, ids: list[int]) -> None:
        try:
            if ids:
                self.xs.write(self._path(domid), " ".join(str(i) for i in sorted(set(ids))))
                self.xs.write(f"{self.root}/{domid}/vm", self._identity(domid) or "")
            else:
                self.xs.rm(f"{self.root}/{domid}")
        except XvfError as exc:  # only a later takeover is worse off
            log.warning("cannot record IOREQ servers of dom%d in %s: %s", domid, self.root, exc)

    def add(self, domid: int, server_id: int) -> None:
        self._write(domid, [*self._read(domid), server_id])

    def remove(self, domid: int, server_id: int) -> None:
        self._write(domid, [i for i in self._read(domid) if i != server_id])

    def forget(self, domid: int) -> None:
        self._write(domid, [])
