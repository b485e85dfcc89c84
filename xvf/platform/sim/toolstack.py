"""What libxl does for `xl create` with a `virtio = [...]` line, for the simulator.

Sources read (Xen >= 4.18, facts only):

- tools/xl/xl_parse.c `parse_virtio_list`/`parse_virtio_config`: each list item
  is split at ","; keys `backend=` (domain name), `type=` (its value
  "virtio,deviceNN" contains a comma, which xl glues back), `transport=`
  (libxl_virtio_transport: "mmio"; "pci" only in out-of-tree branches) and
  `grant_usage=` (parsed with strtoul, so "1"/"0"). Anything else:
  "Unknown string ... in virtio spec". xl.cfg(5): type is the DT compatible
  "virtio,device<id>" with the id in lower-case hex without "0x";
  grant_usage defaults to enabled iff backend-domid != 0
  (libxl_virtio.c `libxl__device_virtio_setdefault`).
- tools/libs/light/libxl_arm.c `libxl__arch_domain_prepare_config`: virtio
  disks first, then `virtios[]` in config order; devices whose transport is
  not mmio are skipped. `alloc_virtio_mmio_base`: from GUEST_VIRTIO_MMIO_BASE
  (0x02000000) in VIRTIO_MMIO_DEV_SIZE (0x200) steps while
  base + 0x200 <= 0x02000000 + GUEST_VIRTIO_MMIO_SIZE (0x100000);
  `alloc_virtio_mmio_irq`: SPIs 33 (GUEST_VIRTIO_MMIO_SPI_FIRST) up to 43
  (..._LAST), one per device. So at most 11 mmio devices.
- tools/libs/light/libxl_virtio.c `libxl__set_xenstore_virtio` (backend keys
  only; no frontend keys of its own) and libxl_device.c `libxl__device_add`
  + `libxl__device_generic_add` (common keys, paths, permissions, one
  transaction retried on EAGAIN). devid: LIBXL_DEFINE_UPDATE_DEVID picks the
  next free one; with a fresh guest that is 0, 1, 2... in config order.

Node layout written for guest <domid>, backend domain <b>, device <devid>
(F = /local/domain/<domid>/device/virtio/<devid>,
 B = /local/domain/<b>/backend/virtio/<domid>/<devid>,
 L = /libxl/<domid>/device/virtio/<devid>), in this order, one transaction:

    rm L;  L/frontend = F;  L/backend = B
    rm F;  mkdir F;  perms F = n<domid> r<b>
    F/backend = B;  F/backend-id = <b>;  F/state = 1        (perms n<domid> r<b>)
    rm B;  mkdir B;  perms B = n<b> r<domid>
    B/frontend = F;  B/frontend-id = <domid>;  B/online = 1;  B/state = 1;
    B/irq = <decimal>;  B/base = <"%#" PRIx64, e.g. 0x2000000>;
    B/type = virtio,device<hex>;  B/transport = mmio;  B/grant_usage = 1|0
    L/<each key written under B, except frontend>  (libxl's copy of bents)

Removal (libxl__device_destroy): rm F, B and L, each followed by removing
parents that became empty (libxl__xs_path_cleanup).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from xvf.errors import ConfigError, XenStoreError
from xvf.hotpath._layout import (
    GUEST_VIRTIO_MMIO_BASE,
    GUEST_VIRTIO_MMIO_SIZE,
    GUEST_VIRTIO_MMIO_SPI_FIRST,
    GUEST_VIRTIO_MMIO_SPI_LAST,
    VIRTIO_MMIO_DEV_SIZE,
)
from xvf.protocols.xenbus import (
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CLOSING,
    XENBUS_STATE_INITIALISING,
    parse_compatible,
)
from xvf.protocols.xenstore import XenStore, XenStoreRequestError

# libxl waits this long for a backend to reach Closed on destroy (LIBXL_DESTROY_TIMEOUT)
LIBXL_DESTROY_TIMEOUT = 10.0
TOOLSTACK_DOMID = 0
TRANSPORTS = ("mmio",)
VIRTIO_DEVICE_TYPE_GENERIC = "virtio,device"
_TX_RETRIES = 100


@dataclass
class VirtioSpec:
    type: str
    transport: str = "mmio"
    backend_domid: int = 0
    grant_usage: bool | None = None  # None: libxl's default, enabled iff backend_domid != 0
    devid: int = 0
    base: int = 0
    irq: int = 0

    @property
    def device_id(self) -> int:
        return parse_compatible(self.type)

    @property
    def grants(self) -> bool:
        """grant_usage after libxl's defaulting."""
        if self.grant_usage is None:
            return self.backend_domid != TOOLSTACK_DOMID
        return self.grant_usage


def _parse_bool(key: str, value: str) -> bool:
    # xl reads this with strtoul, so "grant_usage=enabled" silently means 0 on a
    # real host. The simulator takes what xl takes and refuses the words that
    # would mislead there, rather than giving them a meaning xl does not.
    v = value.strip()
    try:
        return int(v, 0) != 0
    except ValueError:
        raise ConfigError(
            f"virtio {key}={value!r}: xl reads this as a number (strtoul), so {value!r} "
            f"would mean 0 on a real host; write {key}=1 or {key}=0"
        ) from None


def _parse_backend(value: str) -> int:
    v = value.strip()
    if v in ("Domain-0", "0"):
        return 0
    if v.isdigit() and int(v) < 0x7FF0:
        return int(v)
    raise ConfigError(
        f"virtio backend={value!r}: the simulator knows domains by number (or Domain-0)"
    )


def _parse_device(item: str, devid: int) -> VirtioSpec:
    tokens = [t.strip() for t in item.split(",")]
    fields: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok:
            raise ConfigError(f"empty option in virtio spec {item!r}")
        key, eq, value = tok.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f'unknown string "{tok}" in virtio spec {item!r}')
        # The type's own comma: xl glues "type=virtio" and the next token back.
        if key == "type" and value.strip() == "virtio" and i < len(tokens):
            value = f"virtio,{tokens[i]}"
            i += 1
        if key not in ("type", "transport", "backend", "grant_usage"):
            raise ConfigError(f'unknown string "{tok}" in virtio spec {item!r}')
        if key in fields:
            raise ConfigError(f"virtio option {key} given twice in {item!r}")
        fields[key] = value.strip()
    if "type" not in fields:
        raise ConfigError(f"virtio spec {item!r} has no type=virtio,device<id>")
    parse_compatible(fields["type"])
    transport = fields.get("transport", "mmio")
    if transport not in TRANSPORTS:
        raise ConfigError(f"virtio transport={transport!r} unsupported (only mmio)")
    spec = VirtioSpec(type=fields["type"], transport=transport, devid=devid)
    if "backend" in fields:
        spec.backend_domid = _parse_backend(fields["backend"])
    if "grant_usage" in fields:
        spec.grant_usage = _parse_bool("grant_usage", fields["grant_usage"])
    return spec


def parse_virtio_line(line: str) -> list[VirtioSpec]:
    """Parse `virtio = [ "...", ... ]`, a bare `[...]` list, or one device string."""
    text = line.strip()
    m = re.match(r"virtio\s*=\s*(.*)\Z", text, re.S)
    if m:
        text = m.group(1).strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise ConfigError(f"virtio list not closed with ']': {line!r}")
        body = text[1:-1].strip()
        items: list[str] = []
        pos = 0
        for mm in re.finditer(r"\s*(?:\"([^\"]*)\"|'([^']*)')\s*(,|\Z)", body):
            if mm.start() != pos:
                break
            items.append(mm.group(1) if mm.group(1) is not None else mm.group(2))
            pos = mm.end()
        if pos != len(body):
            raise ConfigError(f"cannot parse virtio list near {body[pos : pos + 30]!r}")
    else:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
        items = [text]
    if not any(i.strip() for i in items):
        return []
    return [_parse_device(item, devid) for devid, item in enumerate(items)]


def assign_mmio_resources(specs: list[VirtioSpec]) -> list[VirtioSpec]:
    """Give each mmio device its window and SPI, in order, like libxl on Arm."""
    base = GUEST_VIRTIO_MMIO_BASE
    irq = GUEST_VIRTIO_MMIO_SPI_FIRST
    out: list[VirtioSpec] = []
    for spec in specs:
        s = VirtioSpec(**vars(spec))
        if s.transport == "mmio":
            if base + VIRTIO_MMIO_DEV_SIZE > GUEST_VIRTIO_MMIO_BASE + GUEST_VIRTIO_MMIO_SIZE:
                raise ConfigError(f"ran out of reserved range for virtio MMIO base {base:#x}")
            if irq > GUEST_VIRTIO_MMIO_SPI_LAST:
                raise ConfigError(
                    f"ran out of reserved range for virtio MMIO IRQ {irq} "
                    f"(SPIs {GUEST_VIRTIO_MMIO_SPI_FIRST}-{GUEST_VIRTIO_MMIO_SPI_LAST})"
                )
            s.base, s.irq = base, irq
            base += VIRTIO_MMIO_DEV_SIZE
            irq += 1
        out.append(s)
    return out


def frontend_path(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/virtio/{devid}"


def backend_path(backend_domid: int, domid: int, devid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/virtio/{domid}/{devid}"


def libxl_path(domid: int, devid: int) -> str:
    return f"/libxl/{domid}/device/virtio/{devid}"


def backend_entries(domid: int, spec: VirtioSpec) -> list[tuple[str, str]]:
    """libxl__device_add's common keys, then libxl__set_xenstore_virtio's."""
    return [
        ("frontend-id", str(domid)),
        ("online", "1"),
        ("state", str(XENBUS_STATE_INITIALISING)),
        ("irq", str(spec.irq)),
        ("base", f"{spec.base:#x}"),
        ("type", spec.type),
        ("transport", spec.transport),
        ("grant_usage", "1" if spec.grants else "0"),
    ]


def _rm_checked(xs: XenStore, path: str, tx: int) -> None:
    """rm that treats "already gone" as done (libxl__xs_rm_checked)."""
    try:
        xs.rm(path, tx)
    except XenStoreRequestError as e:
        if e.name != "ENOENT":
            raise


def _write_device(xs: XenStore, tx: int, domid: int, spec: VirtioSpec) -> None:
    b = spec.backend_domid
    fe = frontend_path(domid, spec.devid)
    be = backend_path(b, domid, spec.devid)
    lx = libxl_path(domid, spec.devid)
    bents = backend_entries(domid, spec)
    _rm_checked(xs, lx, tx)
    xs.write(f"{lx}/frontend", fe, tx)
    xs.write(f"{lx}/backend", be, tx)
    _rm_checked(xs, fe, tx)
    xs.mkdir(fe, tx)
    fe_perms = [f"n{domid}", f"r{b}"]
    xs.set_perms(fe, fe_perms, tx)
    xs.write(f"{fe}/backend", be, tx)
    for key, value in (("backend-id", str(b)), ("state", str(XENBUS_STATE_INITIALISING))):
        xs.write(f"{fe}/{key}", value, tx)
        xs.set_perms(f"{fe}/{key}", fe_perms, tx)
    _rm_checked(xs, be, tx)
    xs.mkdir(be, tx)
    xs.set_perms(be, [f"n{b}", f"r{domid}"], tx)
    xs.write(f"{be}/frontend", fe, tx)
    for key, value in bents:
        xs.write(f"{be}/{key}", value, tx)
    for key, value in bents:
        xs.write(f"{lx}/{key}", value, tx)


def _in_transaction(xs: XenStore, what: str, body: Callable[[int], None]) -> None:
    for _ in range(_TX_RETRIES):
        tx = xs.transaction_start()
        try:
            body(tx)
        except BaseException:
            try:
                xs.transaction_end(tx, commit=False)
            except XenStoreError:
                pass
            raise
        if xs.transaction_end(tx, commit=True):
            return
    raise XenStoreError(f"{what}: transaction kept conflicting (EAGAIN) {_TX_RETRIES} times")


def add_virtio_devices(xs: XenStore, domid: int, specs: list[VirtioSpec]) -> None:
    """Write each device's frontend, backend and libxl nodes, like libxl_device.c."""
    for spec in specs:
        parse_compatible(spec.type)
        if spec.transport not in TRANSPORTS:
            raise ConfigError(f"virtio transport={spec.transport!r} unsupported (only mmio)")
        if spec.transport == "mmio" and not spec.base:
            raise ConfigError(f"virtio device {spec.devid} has no MMIO window: assign resources")

    def body(tx: int) -> None:
        for spec in specs:
            _write_device(xs, tx, domid, spec)

    _in_transaction(xs, f"adding virtio devices of domain {domid}", body)


def _path_cleanup(xs: XenStore, tx: int, path: str) -> None:
    """rm path, then every parent left empty (libxl__xs_path_cleanup)."""
    if xs.read(path, tx) is None:
        return
    xs.rm(path, tx)
    while True:
        path = path.rsplit("/", 1)[0]
        if not path or xs.read(path, tx) is None or xs.directory(path, tx):
            return
        xs.rm(path, tx)


def _backend_paths(xs: XenStore, domid: int, tx: int = 0) -> list[str]:
    base = f"/libxl/{domid}/device/virtio"
    paths = [xs.read(f"{base}/{devid}/backend", tx) for devid in xs.directory(base, tx)]
    return [p for p in paths if p and p.startswith("/local/domain/")]


def close_virtio_devices(xs: XenStore, domid: int, timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """What libxl__initiate_device_generic_remove does before removing a device:
    online=0 and state=Closing (5) unless the backend is already Closed, then wait up
    to `timeout` for every backend to write Closed (6). True if all did in time."""
    waiting: list[str] = []

    def body(tx: int) -> None:
        waiting.clear()
        for be in _backend_paths(xs, domid, tx):
            state = xs.read(f"{be}/state", tx)
            if state is None:
                continue  # backend gone already
            xs.write(f"{be}/online", "0", tx)
            if state.strip() != str(XENBUS_STATE_CLOSED):
                xs.write(f"{be}/state", str(XENBUS_STATE_CLOSING), tx)
                waiting.append(be)

    _in_transaction(xs, f"closing virtio devices of domain {domid}", body)
    deadline = time.monotonic() + timeout
    while waiting:
        waiting = [
            be
            for be in waiting
            if (xs.read(f"{be}/state") or "").strip() not in ("", str(XENBUS_STATE_CLOSED))
        ]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return not waiting


def remove_virtio_devices(xs: XenStore, domid: int) -> None:
    """Remove every virtio device of domid: frontend, backend and libxl nodes."""

    def body(tx: int) -> None:
        base = f"/libxl/{domid}/device/virtio"
        for devid in xs.directory(base, tx):
            lx = f"{base}/{devid}"
            fe = xs.read(f"{lx}/frontend", tx)
            be = xs.read(f"{lx}/backend", tx)
            for path in (fe, be):
                if path and path.startswith("/local/domain/"):
                    _path_cleanup(xs, tx, path)
            _path_cleanup(xs, tx, lx)
        # Devices written by another toolstack have no /libxl copy: use the frontends.
        fe_dir = f"/local/domain/{domid}/device/virtio"
        for devid in xs.directory(fe_dir, tx):
            be = xs.read(f"{fe_dir}/{devid}/backend", tx)
            if be and be.startswith("/local/domain/"):
                _path_cleanup(xs, tx, be)
            _path_cleanup(xs, tx, f"{fe_dir}/{devid}")

    _in_transaction(xs, f"removing virtio devices of domain {domid}", body)
