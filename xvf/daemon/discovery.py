"""The frontend's reading of the virtio device nodes libxl writes.

Layout (see xvf/platform/sim/toolstack.py for where it comes from): for every guest
<domid> with virtio devices served by backend domain <b>,
/local/domain/<b>/backend/virtio/<domid>/<devid>/ holds type
("virtio,device<hex>"), transport ("mmio"), base ("0x2000000"; libxl before
4.18 wrote decimal, both parse), irq (decimal SPI), grant_usage ("1"/"0";
absent before 4.18: then libxl's default, enabled iff b != 0), plus
frontend, frontend-id, online and state.

xvf publishes in `state` whether it serves the device (xenbus states):
4 Connected once the device is served, 6 Closed when it is not (it failed, or
xvf stopped). The toolstack asks for a device to go away, as `xl destroy`
does, with online=0 and state 5 Closing; xvf then stops serving it and
answers 6 Closed, which libxl waits for (up to 10 s per device).

A bad entry never stops the walk: it becomes a ConfigError naming the node
and the offending value, and the other devices are still returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xvf.errors import ConfigError
from xvf.hotpath._layout import (
    GUEST_VIRTIO_MMIO_BASE,
    GUEST_VIRTIO_MMIO_SIZE,
    GUEST_VIRTIO_MMIO_SPI_FIRST,
    GUEST_VIRTIO_MMIO_SPI_LAST,
    VIRTIO_MMIO_DEV_SIZE,
)
from xvf.protocols.xenbus import XENBUS_STATE_CLOSING, parse_compatible
from xvf.protocols.xenstore import XenStore, XenStoreRequestError

TRANSPORTS = ("mmio",)


@dataclass(frozen=True)
class VirtioDeviceNode:
    domid: int
    devid: int
    compatible: str
    device_id: int
    base: int
    irq: int
    transport: str
    grant_usage: bool
    backend_path: str
    # The toolstack asked the backend to let go (online=0 or state Closing).
    closing: bool = False
    state: int | None = field(default=None, compare=False)  # its xenbus state now


def backend_dir(backend_domid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/virtio"


def watch_paths(backend_domid: int) -> list[str]:
    """What the daemon watches: its virtio backend directory (devices come and go)
    and @releaseDomain (a guest died; its nodes may linger until the toolstack
    removes them)."""
    return [backend_dir(backend_domid), "@releaseDomain"]


_HEX = frozenset("0123456789abcdefABCDEF")


def _ascii_digits(t: str) -> bool:
    # str.isdigit() alone also accepts "\u00b2" or Arabic-Indic digits.
    return t.isascii() and t.isdigit()


def _strtoul(text: str) -> int:
    """strtoul(text, NULL, 0) without its silent acceptance of trailing junk.

    Only ASCII digits: Python's int() would also take "_", signs and
    whitespace inside the number, and non-ASCII digits."""
    t = text.strip()
    if t.lower().startswith("0x") and len(t) > 2 and all(c in _HEX for c in t[2:]):
        return int(t[2:], 16)
    if len(t) > 1 and t.startswith("0") and _ascii_digits(t):
        return int(t, 8)
    if _ascii_digits(t):
        return int(t)
    raise ValueError(text)


def _bad(path: str, key: str, value: str | None, why: str) -> ConfigError:
    shown = "missing" if value is None else repr(value)
    return ConfigError(f"{path}/{key}: {shown}: {why}")


def parse_device(
    path: str, domid: int, devid: int, values: dict[str, str | None], backend_domid: int
) -> VirtioDeviceNode:
    """One device from its key values; ConfigError naming the node on bad input."""
    compatible = values.get("type")
    if compatible is None:
        raise _bad(path, "type", None, "required")
    try:
        device_id = parse_compatible(compatible)
    except ConfigError:
        raise _bad(path, "type", compatible, "expected virtio,device<lower-case hex id>") from None
    transport = values.get("transport")
    if transport is None:
        raise _bad(path, "transport", None, "required")
    if transport not in TRANSPORTS:
        raise _bad(path, "transport", transport, f"unsupported (known: {', '.join(TRANSPORTS)})")
    raw_base = values.get("base")
    if raw_base is None:
        raise _bad(path, "base", None, "required for mmio")
    try:
        base = _strtoul(raw_base)
    except ValueError:
        raise _bad(path, "base", raw_base, "not a number") from None
    lo, hi = GUEST_VIRTIO_MMIO_BASE, GUEST_VIRTIO_MMIO_BASE + GUEST_VIRTIO_MMIO_SIZE
    if base < lo or base + VIRTIO_MMIO_DEV_SIZE > hi or base % VIRTIO_MMIO_DEV_SIZE:
        raise _bad(
            path, "base", raw_base, f"outside the virtio MMIO range {lo:#x}-{hi:#x} or unaligned"
        )
    raw_irq = values.get("irq")
    if raw_irq is None:
        raise _bad(path, "irq", None, "required for mmio")
    try:
        irq = _strtoul(raw_irq)
    except ValueError:
        raise _bad(path, "irq", raw_irq, "not a number") from None
    if not GUEST_VIRTIO_MMIO_SPI_FIRST <= irq <= GUEST_VIRTIO_MMIO_SPI_LAST:
        raise _bad(
            path,
            "irq",
            raw_irq,
            f"outside SPIs {GUEST_VIRTIO_MMIO_SPI_FIRST}-{GUEST_VIRTIO_MMIO_SPI_LAST}",
        )
    raw_grant = values.get("grant_usage")
    if raw_grant is None:
        grant_usage = backend_domid != 0
    elif raw_grant.strip() in ("0", "1"):
        grant_usage = raw_grant.strip() == "1"
    else:
        raise _bad(path, "grant_usage", raw_grant, "expected 1 or 0")
    online = (values.get("online") or "1").strip()
    state = (values.get("state") or "").strip()
    closing = online == "0" or state == str(XENBUS_STATE_CLOSING)
    state_number = int(state) if _ascii_digits(state) and len(state) <= 2 else None
    return VirtioDeviceNode(
        domid=domid,
        devid=devid,
        compatible=compatible,
        device_id=device_id,
        base=base,
        irq=irq,
        transport=transport,
        grant_usage=grant_usage,
        backend_path=path,
        closing=closing,
        state=state_number,
    )


def _number(name: str) -> int | None:
    return int(name) if _ascii_digits(name) and len(name) <= 9 else None


DEVICE_KEYS = ("type", "transport", "base", "irq", "grant_usage", "online", "state")


def _read_device_values(xs: XenStore, path: str) -> dict[str, str | None] | None:
    """A device's keys as ONE snapshot, or None if the device is gone.

    libxl writes and removes a device's nodes in one transaction; read key by key, a
    walk that overlaps a removal sees half an entry (seen on real Xen while `xl destroy`
    ran). Read in a transaction, such a walk fails its commit (EAGAIN) and is repeated.
    """
    for _ in range(20):
        tx = xs.transaction_start()
        try:
            values = {k: xs.read(f"{path}/{k}", tx) for k in DEVICE_KEYS}
            gone = values["type"] is None and xs.read(path, tx) is None
        except BaseException:
            xs.transaction_end(tx, commit=False)
            raise
        if xs.transaction_end(tx, commit=True):
            return None if gone else values
    raise XenStoreRequestError("read", path, "EAGAIN")


def read_virtio_devices(
    xs: XenStore, backend_domid: int
) -> tuple[list[VirtioDeviceNode], list[ConfigError]]:
    """Every virtio device this backend domain should serve, and what was wrong."""
    devices: list[VirtioDeviceNode] = []
    errors: list[ConfigError] = []
    root = backend_dir(backend_domid)
    for dom_name in xs.directory(root):
        dom_path = f"{root}/{dom_name}"
        domid = _number(dom_name)
        if domid is None:
            errors.append(ConfigError(f"{dom_path}: {dom_name!r} is not a domain id"))
            continue
        for dev_name in xs.directory(dom_path):
            path = f"{dom_path}/{dev_name}"
            devid = _number(dev_name)
            if devid is None:
                errors.append(ConfigError(f"{path}: {dev_name!r} is not a device id"))
                continue
            try:
                values = _read_device_values(xs, path)
                if values is None:
                    continue  # removed while we walked
                if values["state"] is None:
                    # Not complete yet: libxl writes a device in one transaction with
                    # its state; a toolstack writing key by key writes the state last
                    # (the xenbus convention). Judged on the next watch event.
                    continue
                devices.append(parse_device(path, domid, devid, values, backend_domid))
            except ConfigError as e:
                errors.append(e)
            except XenStoreRequestError as e:
                # xenstored refused (e.g. EACCES): this entry only. A broken
                # connection (plain XenStoreError) propagates to the caller.
                errors.append(ConfigError(f"{path}: cannot read: {e}"))
    return devices, errors


def publish_state(xs: XenStore, node: VirtioDeviceNode, state: int) -> bool:
    """Write the device's backend `state`, unless the node is gone (never re-create it:
    a write would make the missing parents). False if it was gone."""
    for _ in range(10):
        tx = xs.transaction_start()
        try:
            if xs.read(f"{node.backend_path}/type", tx) is None:
                xs.transaction_end(tx, commit=False)
                return False
            if xs.read(f"{node.backend_path}/state", tx) != str(state):
                xs.write(f"{node.backend_path}/state", str(state), tx)
        except BaseException:
            xs.transaction_end(tx, commit=False)
            raise
        if xs.transaction_end(tx, commit=True):
            return True
    return False
