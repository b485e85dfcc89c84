"""Simulated toolstack (libxl's virtio nodes) and the frontend's discovery, via a real XenStored."""

from __future__ import annotations

import pytest

from xvf.daemon.discovery import VirtioDeviceNode, read_virtio_devices, watch_paths
from xvf.errors import ConfigError
from xvf.platform.sim import toolstack
from xvf.platform.sim.toolstack import (
    VirtioSpec,
    add_virtio_devices,
    assign_mmio_resources,
    parse_virtio_line,
    remove_virtio_devices,
)
from xvf.protocols.xenstore import XenStore

I2C_GPIO = (
    'virtio = [ "type=virtio,device22, transport=mmio, grant_usage=1", "type=virtio,device29" ]'
)


# -- parsing -----------------------------------------------------------------------


def test_parse_full_line():
    specs = parse_virtio_line(I2C_GPIO)
    assert specs == [
        VirtioSpec(type="virtio,device22", transport="mmio", grant_usage=True, devid=0),
        VirtioSpec(type="virtio,device29", devid=1),
    ]
    assert [s.device_id for s in specs] == [34, 41]
    assert [s.grants for s in specs] == [True, False]  # default: backend dom0 -> no grants


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('"type=virtio,device1a"', VirtioSpec(type="virtio,device1a")),
        ("type=virtio,device1a,backend=3", VirtioSpec(type="virtio,device1a", backend_domid=3)),
        (
            "type=virtio,device2, grant_usage=0, backend=Domain-0",
            VirtioSpec(type="virtio,device2", grant_usage=False),
        ),
        ("[ 'type=virtio,device22' ]", VirtioSpec(type="virtio,device22")),
        (
            "type=virtio,device22, transport=mmio, grant_usage=1",
            VirtioSpec(type="virtio,device22", grant_usage=True),
        ),
    ],
)
def test_parse_single_device_forms(text, expect):
    assert parse_virtio_line(text) == [expect]


def test_backend_other_than_dom0_defaults_to_grants():
    (spec,) = parse_virtio_line("type=virtio,device22,backend=2")
    assert spec.grant_usage is None and spec.grants is True


def test_empty_list_is_no_devices():
    assert parse_virtio_line("virtio = [ ]") == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("type=virtio,device", "lower-case hex"),
        ("type=virtio,deviceXY", "lower-case hex"),
        ("type=virtio,device1A", "lower-case hex"),
        ("type=virtio,device0x22", "lower-case hex"),
        ("type=i2c", "lower-case hex"),
        ("transport=mmio", "no type"),
        ("type=virtio,device22,transport=pci", "only mmio"),
        ("type=virtio,device22,transport=ccw", "only mmio"),
        ("type=virtio,device22,grant_usage=maybe", "write grant_usage=1 or grant_usage=0"),
        # xl would read these with strtoul as 0: refused rather than given a meaning
        ("type=virtio,device22,grant_usage=enabled", "would mean 0 on a real host"),
        ("type=virtio,device22,irq=40", "unknown string"),
        ("type=virtio,device22,base=0x2000000", "unknown string"),
        ("type=virtio,device22,bogus", "unknown string"),
        ("type=virtio,device22,,transport=mmio", "empty option"),
        ("type=virtio,device22,type=virtio,device29", "twice"),
        ("type=virtio,device22,backend=dom-name", "by number"),
        ('virtio = [ "type=virtio,device22" ', "not closed"),
        ('virtio = [ "type=virtio,device22" "type=virtio,device29" ]', "cannot parse"),
        ("virtio = [ type=virtio,device22 ]", "cannot parse"),
    ],
)
def test_parse_rejects_nonsense(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_virtio_line(text)


# -- MMIO resources ------------------------------------------------------------------


def test_mmio_windows_and_spis_in_config_order():
    specs = assign_mmio_resources(parse_virtio_line(I2C_GPIO + ""))
    assert [(s.base, s.irq) for s in specs] == [(0x2000000, 33), (0x2000200, 34)]


def test_eleven_devices_fit_twelve_do_not():
    line = "virtio = [ " + ", ".join(['"type=virtio,device22"'] * 11) + " ]"
    specs = assign_mmio_resources(parse_virtio_line(line))
    assert [s.irq for s in specs] == list(range(33, 44))
    assert specs[-1].base == 0x2000000 + 10 * 0x200
    assert [s.devid for s in specs] == list(range(11))
    with pytest.raises(ConfigError, match="IRQ 44"):
        assign_mmio_resources([*specs, VirtioSpec(type="virtio,device22", devid=11)])


def test_assign_does_not_mutate_input():
    specs = parse_virtio_line(I2C_GPIO)
    assign_mmio_resources(specs)
    assert specs[0].base == 0 and specs[0].irq == 0


# -- the nodes libxl writes ------------------------------------------------------------


def expected_nodes(domid: int, b: int, devid: int, base: str, irq: int, typ: str, grant: str):
    fe = f"/local/domain/{domid}/device/virtio/{devid}"
    be = f"/local/domain/{b}/backend/virtio/{domid}/{devid}"
    lx = f"/libxl/{domid}/device/virtio/{devid}"
    bents = {
        "frontend-id": str(domid),
        "online": "1",
        "state": "1",
        "irq": str(irq),
        "base": base,
        "type": typ,
        "transport": "mmio",
        "grant_usage": grant,
    }
    nodes = {fe: "", f"{fe}/backend": be, f"{fe}/backend-id": str(b), f"{fe}/state": "1"}
    nodes |= {be: "", f"{be}/frontend": fe} | {f"{be}/{k}": v for k, v in bents.items()}
    nodes |= {lx: "", f"{lx}/frontend": fe, f"{lx}/backend": be}
    nodes |= {f"{lx}/{k}": v for k, v in bents.items()}
    return nodes


def test_add_writes_libxl_layout_exactly(xsd, xs):
    before = set(xsd.snapshot())
    add_virtio_devices(xs, 5, assign_mmio_resources(parse_virtio_line(I2C_GPIO)))
    after = xsd.snapshot()
    want = expected_nodes(5, 0, 0, "0x2000000", 33, "virtio,device22", "1")
    want |= expected_nodes(5, 0, 1, "0x2000200", 34, "virtio,device29", "0")
    parents = {
        "/libxl", "/libxl/5", "/libxl/5/device", "/libxl/5/device/virtio",
        "/local/domain/5", "/local/domain/5/device", "/local/domain/5/device/virtio",
        "/local/domain/0/backend", "/local/domain/0/backend/virtio",
        "/local/domain/0/backend/virtio/5",
    }  # fmt: skip
    new = {p: v.decode() for p, v in after.items() if p not in before}
    assert set(new) == set(want) | parents
    assert {p: new[p] for p in want} == want
    fe, be = "/local/domain/5/device/virtio/0", "/local/domain/0/backend/virtio/5/0"
    assert xs.get_perms(fe) == ["n5", "r0"]
    assert xs.get_perms(f"{fe}/state") == ["n5", "r0"]
    assert xs.get_perms(be) == ["n0", "r5"]
    assert xs.get_perms(f"{be}/irq") == ["n0", "r5"]


def test_add_is_one_transaction(xsd, xs):
    watcher = XenStore(xsd.path, timeout=5)
    try:
        watcher.watch("/local/domain/0/backend/virtio", "be")
        assert watcher.wait_events(5) == [("/local/domain/0/backend/virtio", "be")]
        tx_before = xsd._next_tx
        add_virtio_devices(xs, 2, assign_mmio_resources(parse_virtio_line(I2C_GPIO)))
        assert xsd._next_tx == tx_before + 1
    finally:
        watcher.close()


def test_add_retries_after_eagain(xsd, xs, monkeypatch):
    """A conflicting write during the first attempt forces EAGAIN; the retry lands."""
    other = XenStore(xsd.path, timeout=5)
    real_write = toolstack._write_device
    attempts = []

    def racing_write(x, tx, domid, spec):
        attempts.append(tx)
        if len(attempts) == 1:
            other.write(toolstack.libxl_path(domid, spec.devid) + "/frontend", "racer")
        real_write(x, tx, domid, spec)

    monkeypatch.setattr(toolstack, "_write_device", racing_write)
    try:
        specs = assign_mmio_resources(parse_virtio_line("type=virtio,device22"))
        add_virtio_devices(xs, 4, specs)
        assert len(attempts) == 2
        assert xs.read("/libxl/4/device/virtio/0/frontend") == "/local/domain/4/device/virtio/0"
    finally:
        other.close()


def test_add_refuses_unassigned_or_bad_specs(xs):
    with pytest.raises(ConfigError, match="no MMIO window"):
        add_virtio_devices(xs, 1, [VirtioSpec(type="virtio,device22")])
    with pytest.raises(ConfigError):
        add_virtio_devices(xs, 1, [VirtioSpec(type="virtio,dev", base=0x2000000, irq=33)])
    assert xs.directory("/local/domain/0/backend") == []


def test_round_trip_and_removal(xsd, xs):
    xs.write("/local/domain/7/name", "g7")
    xs.write("/local/domain/8/name", "g8")
    add_virtio_devices(xs, 7, assign_mmio_resources(parse_virtio_line(I2C_GPIO)))
    add_virtio_devices(
        xs, 8, assign_mmio_resources(parse_virtio_line("type=virtio,device1a,grant_usage=1"))
    )
    devices, errors = read_virtio_devices(xs, 0)
    assert errors == []
    assert devices == [
        VirtioDeviceNode(7, 0, "virtio,device22", 34, 0x2000000, 33, "mmio", True,
                         "/local/domain/0/backend/virtio/7/0"),
        VirtioDeviceNode(7, 1, "virtio,device29", 41, 0x2000200, 34, "mmio", False,
                         "/local/domain/0/backend/virtio/7/1"),
        VirtioDeviceNode(8, 0, "virtio,device1a", 26, 0x2000000, 33, "mmio", True,
                         "/local/domain/0/backend/virtio/8/0"),
    ]  # fmt: skip
    remove_virtio_devices(xs, 7)
    devices, errors = read_virtio_devices(xs, 0)
    assert [(d.domid, d.devid) for d in devices] == [(8, 0)]
    assert xs.directory("/local/domain/7") == ["name"]  # only what the toolstack added is gone
    assert xs.read("/libxl/7") is None
    remove_virtio_devices(xs, 8)
    assert read_virtio_devices(xs, 0) == ([], [])
    assert xs.read("/local/domain/0/backend") is None
    remove_virtio_devices(xs, 8)  # idempotent


def test_other_backend_domain_is_separate(xs):
    specs = assign_mmio_resources(parse_virtio_line("type=virtio,device22,backend=3"))
    add_virtio_devices(xs, 9, specs)
    assert read_virtio_devices(xs, 0) == ([], [])
    devices, errors = read_virtio_devices(xs, 3)
    assert errors == [] and [(d.domid, d.grant_usage) for d in devices] == [(9, True)]
    assert xs.read("/local/domain/9/device/virtio/0/backend-id") == "3"


def test_watch_paths_see_devices_come_and_go(xsd, xs):
    watcher = XenStore(xsd.path, timeout=5)
    try:
        paths = watch_paths(0)
        assert paths == ["/local/domain/0/backend/virtio", "@releaseDomain"]
        for p in paths:
            watcher.watch(p, "xvf")
        assert sorted(watcher.wait_events(5)) == sorted((p, "xvf") for p in paths)
        add_virtio_devices(xs, 6, assign_mmio_resources(parse_virtio_line(I2C_GPIO)))
        got = watcher.wait_events(5)
        assert got and all(p.startswith("/local/domain/0/backend/virtio/6") for p, _ in got)
        xsd.release_domain(6)
        got = []
        while ("@releaseDomain", "xvf") not in got:
            more = watcher.wait_events(5)
            assert more
            got += more
    finally:
        watcher.close()


# -- malformed nodes ---------------------------------------------------------------------


# libxl writes state 1 (Initialising) in the same transaction as the other keys
GOOD = {
    "type": "virtio,device22", "transport": "mmio", "base": "0x2000000", "irq": "33",
    "state": "1",
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "bad_key", "bad_text"),
    [
        ({"base": "0xzz"}, "base", "'0xzz'"),
        ({"base": "12abc"}, "base", "'12abc'"),
        ({"base": "0x1000"}, "base", "outside"),
        ({"base": "0x2000100"}, "base", "unaligned"),
        ({"base": "0x2100000"}, "base", "outside"),
        ({"irq": "32"}, "irq", "'32'"),
        ({"irq": "44"}, "irq", "'44'"),
        ({"irq": "-1"}, "irq", "not a number"),
        ({"transport": "pci"}, "transport", "'pci'"),
        ({"type": "virtio,deviceXY"}, "type", "'virtio,deviceXY'"),
        ({"type": "virtio,mmio"}, "type", "'virtio,mmio'"),
        ({"type": "virtio,device"}, "type", "'virtio,device'"),
        ({"grant_usage": "enabled"}, "grant_usage", "'enabled'"),
        ({"type": None}, "type", "missing"),
        ({"transport": None}, "transport", "missing"),
        ({"base": None}, "base", "missing"),
        ({"irq": None}, "irq", "missing"),
    ],
)
def test_malformed_entry_is_reported_and_others_survive(xs, change, bad_key, bad_text):
    good_dev = "/local/domain/0/backend/virtio/1/0"
    bad_dev = "/local/domain/0/backend/virtio/1/1"
    for k, v in GOOD.items():
        xs.write(f"{good_dev}/{k}", v)
    for k, v in (GOOD | change).items():
        if v is not None:
            xs.write(f"{bad_dev}/{k}", v)
    if all(v is None for v in change.values()):
        xs.mkdir(bad_dev)
    devices, errors = read_virtio_devices(xs, 0)
    assert [(d.domid, d.devid) for d in devices] == [(1, 0)]
    assert len(errors) == 1
    msg = str(errors[0])
    assert msg.startswith(f"{bad_dev}/{bad_key}:")
    assert bad_text in msg


def test_decimal_base_from_older_libxl_and_default_grants(xs):
    dev = "/local/domain/2/backend/virtio/4/0"
    for k, v in (GOOD | {"base": str(0x2000400)}).items():
        xs.write(f"{dev}/{k}", v)
    devices, errors = read_virtio_devices(xs, 2)
    assert errors == []
    assert devices[0].base == 0x2000400
    assert devices[0].grant_usage is True  # absent: enabled iff backend domain != 0


def test_non_numeric_directories_are_reported(xs):
    root = "/local/domain/0/backend/virtio"
    xs.write(f"{root}/guest/0/type", "virtio,device22")
    xs.write(f"{root}/3/zero/type", "virtio,device22")
    for k, v in GOOD.items():
        xs.write(f"{root}/3/1/{k}", v)
    devices, errors = read_virtio_devices(xs, 0)
    assert [(d.domid, d.devid) for d in devices] == [(3, 1)]
    assert sorted(str(e) for e in errors) == [
        f"{root}/3/zero: 'zero' is not a device id",
        f"{root}/guest: 'guest' is not a domain id",
    ]


def test_a_node_written_key_by_key_is_judged_once_its_state_is_there(xs):
    """Another toolstack may write a device key by key (libxl writes it in one
    transaction). Until its state is written, as the xenbus convention has it last,
    the node is neither served nor reported; then it is served."""
    dev = "/local/domain/0/backend/virtio/6/0"
    for k in ("type", "transport", "base"):  # irq, grant_usage to come
        xs.write(f"{dev}/{k}", GOOD[k])
        assert read_virtio_devices(xs, 0) == ([], [])
    xs.write(f"{dev}/irq", GOOD["irq"])
    xs.write(f"{dev}/grant_usage", "0")
    assert read_virtio_devices(xs, 0) == ([], [])
    xs.write(f"{dev}/state", "1")
    devices, errors = read_virtio_devices(xs, 0)
    assert errors == []
    assert [(d.domid, d.irq, d.grant_usage, d.state) for d in devices] == [(6, 33, False, 1)]


def test_no_backend_directory_is_empty(xs):
    assert read_virtio_devices(xs, 0) == ([], [])


def test_a_removal_during_the_walk_is_not_a_half_entry(xsd, xs):
    """Seen on real Xen: xvf's walk overlapped libxl's removal of a destroyed guest's
    device and reported it as malformed ('base: missing'). A device's keys are read as
    one snapshot now; the removal (one transaction, committed by another client between
    two of our reads) makes the walk retry and find the device gone."""
    xs.write("/local/domain/5/name", "g5")
    add_virtio_devices(xs, 5, assign_mmio_resources(parse_virtio_line(I2C_GPIO)))
    remover = XenStore(xsd.path, timeout=5)

    class RacingXenStore(XenStore):
        raced = False

        def read(self, path: str, tx: int = 0) -> str | None:
            value = super().read(path, tx)
            if path.endswith("/5/0/type") and not RacingXenStore.raced:
                RacingXenStore.raced = True
                remove_virtio_devices(remover, 5)  # libxl's destroy, mid-walk
            return value

    walker = RacingXenStore(xsd.path, timeout=5)
    try:
        devices, errors = read_virtio_devices(walker, 0)
    finally:
        walker.close()
        remover.close()
    assert RacingXenStore.raced
    assert errors == []
    assert [(d.domid, d.devid) for d in devices if d.domid == 5] == []
