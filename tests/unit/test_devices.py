"""The device table against its sources, DT compatible parsing and socket naming.

Each fact group names where its values come from (repository + path). Where the
rust-vmm backend and QEMU disagree the rust-vmm value wins: xvf's QueueNumMax must
not exceed the backend's max_queue_size, and GET_CONFIG must not ask for more than
the backend's config struct (libvhost-user and several rust-vmm backends answer a
larger request with an empty reply).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.qsd import QsdExport, qsd_export
from tests.vhost_handshake import handshake
from xvf.device.types import (
    BY_ID,
    BY_NAME,
    DEVICE_TYPES,
    DeviceType,
    device_type,
    parse_compatible,
    socket_name,
)
from xvf.errors import ConfigError
from xvf.protocols.vhost_user import VhostUserError, VhostUserFrontend
from xvf.protocols.vhost_user_wire import ProtocolFeature

VIRTIO_IDS_H = "/usr/include/linux/virtio_ids.h"


def _row(name: str) -> tuple[int, int, int, int]:
    d = BY_NAME[name]
    return d.virtio_id, d.num_queues, d.queue_size, d.config_size


def test_table_is_consistent() -> None:
    assert len(BY_ID) == len(BY_NAME) == len(DEVICE_TYPES)
    for d in DEVICE_TYPES:
        assert BY_ID[d.virtio_id] is d and BY_NAME[d.name] is d
        assert d.num_queues >= 1
        # split-ring sizes are powers of two, at most 32768 (virtio spec 2.7)
        assert 0 < d.queue_size <= 32768 and d.queue_size & (d.queue_size - 1) == 0
        # the vhost-user GET_CONFIG payload carries at most 256 bytes
        assert 0 <= d.config_size <= 256


def test_virtio_ids_match_debian_linux_headers() -> None:
    # Debian 12 linux-libc-dev: /usr/include/linux/virtio_ids.h (Linux 6.1 uapi).
    if not os.path.exists(VIRTIO_IDS_H):
        pytest.skip("linux-libc-dev headers not installed")
    with open(VIRTIO_IDS_H) as f:
        ids = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"#define\s+VIRTIO_ID_(\w+)\s+(\d+)", f.read())
        }
    header_name = {
        "net": "NET",
        "blk": "BLOCK",
        "console": "CONSOLE",
        "rng": "RNG",
        "scsi": "SCSI",
        "gpu": "GPU",
        "input": "INPUT",
        "vsock": "VSOCK",
        "sound": "SOUND",
        "fs": "FS",
        "scmi": "SCMI",
        "i2c": "I2C_ADAPTER",
        "can": "CAN",
        "gpio": "GPIO",
    }
    for name, macro in header_name.items():
        assert BY_NAME[name].virtio_id == ids[macro], name
    # SPI is newer than Linux 6.1: VIRTIO_ID_SPI 45 was added to
    # include/uapi/linux/virtio_ids.h in 2025 (virtio spec 1.4 "SPI controller"),
    # and QEMU hw/virtio/vhost-user-spi.c uses it.
    assert BY_NAME["spi"].virtio_id == 45
    assert "SPI" not in ids or ids["SPI"] == 45


def test_config_sizes_match_debian_linux_headers(tmp_path) -> None:
    # sizeof() of the uapi config structs, compiled against Debian's headers.
    # blk and net are checked by offsetof: xvf asks only for the part its
    # backends' feature bits use (see test_blk_values / test_net_values).
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists(VIRTIO_IDS_H):
        pytest.skip("no C compiler or no linux-libc-dev headers")
    structs = {
        "console": ("virtio_console.h", "sizeof(struct virtio_console_config)"),
        "scsi": ("virtio_scsi.h", "sizeof(struct virtio_scsi_config)"),
        "gpu": ("virtio_gpu.h", "sizeof(struct virtio_gpu_config)"),
        "input": ("virtio_input.h", "sizeof(struct virtio_input_config)"),
        "vsock": ("virtio_vsock.h", "sizeof(struct virtio_vsock_config)"),
        "sound": ("virtio_snd.h", "sizeof(struct virtio_snd_config)"),
        "fs": ("virtio_fs.h", "sizeof(struct virtio_fs_config)"),
        "gpio": ("virtio_gpio.h", "sizeof(struct virtio_gpio_config)"),
        "blk": ("virtio_blk.h", "offsetof(struct virtio_blk_config, max_secure_erase_sectors)"),
        "net": ("virtio_net.h", "offsetof(struct virtio_net_config, speed)"),
    }
    src = ["#include <stdio.h>", "#include <stddef.h>"]
    src += [f"#include <linux/{hdr}>" for hdr, _ in structs.values()]
    src.append("int main(void) {")
    src += [f'printf("{name} %zu\\n", (size_t){expr});' for name, (_, expr) in structs.items()]
    src.append("return 0; }")
    c_file, exe = tmp_path / "sizes.c", tmp_path / "sizes"
    c_file.write_text("\n".join(src) + "\n")
    subprocess.run([cc, "-o", str(exe), str(c_file)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10)
    sizes = {name: int(v) for name, v in (line.split() for line in out.stdout.splitlines())}
    assert sizes.keys() == structs.keys()
    for name, size in sizes.items():
        assert BY_NAME[name].config_size == size, name


# --- one test per fact group; each value cites its source -------------------------


def test_net_values() -> None:
    # id 1: virtio spec 1.2 5 "Device Types". Queues receiveq1, transmitq1 (no
    # control vq): spec 5.1.2. No rust-vmm net backend exists; ring size 256 is the
    # rx/tx default of QEMU hw/net/virtio-net.c (VIRTIO_NET_RX/TX_QUEUE_DEFAULT_SIZE).
    # Config 12 = mac[6] + status + max_virtqueue_pairs + mtu, i.e.
    # offsetof(struct virtio_net_config, speed) in Linux include/uapi/linux/virtio_net.h.
    assert _row("net") == (1, 2, 256, 12)


def test_blk_values() -> None:
    # id 2. No rust-vmm blk backend; QEMU hw/block/vhost-user-blk.c properties:
    # num-queues VHOST_USER_BLK_AUTO_NUM_QUEUES (1 without PCI/MSI-X) and
    # queue-size 128; qemu-storage-daemon's export also sets seg_max = 128 - 2
    # (block/export/vhost-user-blk-server.c). Config 60 = what QEMU's
    # virtio_blk_cfg_size_params give for DISCARD + WRITE_ZEROES (the features QSD
    # offers): offsetof(struct virtio_blk_config, max_secure_erase_sectors).
    assert _row("blk") == (2, 1, 128, 60)


def test_console_values() -> None:
    # id 3. rust-vmm/vhost-device staging/vhost-device-console/src/vhu_console.rs:
    # NUM_QUEUES 4 (rx, tx, ctrl rx, ctrl tx), QUEUE_SIZE 128; config
    # staging/vhost-device-console/src/virtio_console.rs VirtioConsoleConfig
    # (cols u16, rows u16, max_nr_ports u32, emerg_wr u32) = 12 bytes.
    assert _row("console") == (3, 4, 128, 12)


def test_rng_values() -> None:
    # id 4. rust-vmm/vhost-device crates/rng/src/vhu_rng.rs: QUEUE_SIZE 1024,
    # NUM_QUEUES 1; no config space (spec 5.4.4), no CONFIG protocol feature.
    assert _row("rng") == (4, 1, 1024, 0)


def test_scsi_values() -> None:
    # id 8. rust-vmm/vhost-device vhost-device-scsi/src/vhu_scsi.rs: num_queues
    # 2 + 1 request queue, max_queue_size 128 ("qemu assumes this by default");
    # get_config serves struct virtio_scsi_config = 36 bytes.
    assert _row("scsi") == (8, 3, 128, 36)


def test_gpu_values() -> None:
    # id 16. rust-vmm/vhost-device staging/vhost-device-gpu/src/protocol.rs:
    # QUEUE_SIZE 1024, NUM_QUEUES 2 (control, cursor), VirtioGpuConfig 4 x Le32 = 16.
    # QEMU hw/display/virtio-gpu-base.c adds its queues with size 256; rust-vmm
    # wins, and QEMU's contrib vhost-user-gpu (libvhost-user) accepts up to 1024.
    assert _row("gpu") == (16, 2, 1024, 16)


def test_input_values() -> None:
    # id 18. rust-vmm/vhost-device vhost-device-input/src/vhu_input.rs:
    # QUEUE_SIZE 1024, NUM_QUEUES 2; VuInputConfig is select, subsel, size,
    # reserved[5], val[128] = 136 bytes.
    assert _row("input") == (18, 2, 1024, 136)


def test_vsock_values() -> None:
    # id 19. rust-vmm/vhost-device crates/vhost-device-vsock/src/vhu_vsock.rs:
    # NUM_QUEUES 3 (rx, tx, event), QUEUE_SIZE 256, VirtioVsockConfig
    # { guest_cid: Le64 } = 8 bytes (get_config returns nothing past it).
    assert _row("vsock") == (19, 3, 256, 8)


def test_sound_values() -> None:
    # id 25. rust-vmm/vhost-device staging/vhost-device-sound/src/virtio_sound.rs:
    # NUM_QUEUES 4 (control, event, tx, rx), VirtioSoundConfig { jacks, streams,
    # chmaps } = 12 bytes; src/device.rs max_queue_size() 64 and get_config
    # returns an empty reply when offset + size > 12.
    assert _row("sound") == (25, 4, 64, 12)


def test_fs_values() -> None:
    # id 26. No rust-vmm fs backend in vhost-device. The seed's frontend crate
    # vireshk/vhost crates/vhost-user-frontend/src/lib.rs queue_num_and_size:
    # Fs => (2, 1024) (hiprio + 1 request queue). QEMU hw/virtio/vhost-user-fs.c
    # defaults to queue-size 128 and num-request-queues 1. Config: struct
    # virtio_fs_config tag[36] + num_request_queues = 40 (spec 1.2 adds
    # notify_buf_size only with VIRTIO_FS_F_NOTIFICATION, which no backend offers).
    assert _row("fs") == (26, 2, 1024, 40)


def test_scmi_values() -> None:
    # id 32. rust-vmm/vhost-device crates/vhost-device-scmi/src/vhu_scmi.rs:
    # QUEUE_SIZE 1024 ("must be apparently at least 1024 for MMIO"), NUM_QUEUES 2
    # (command, event); no config space, only the MQ protocol feature.
    assert _row("scmi") == (32, 2, 1024, 0)


def test_i2c_values() -> None:
    # id 34. rust-vmm/vhost-device crates/i2c/src/vhu_i2c.rs: QUEUE_SIZE 1024,
    # NUM_QUEUES 1, only the MQ protocol feature (no config). Same as the seed's
    # vireshk/vhost crates/vhost-user-frontend/src/lib.rs I2c => (1, 1024).
    assert _row("i2c") == (34, 1, 1024, 0)


def test_can_values() -> None:
    # id 36. rust-vmm/vhost-device staging/vhost-device-can/src/vhu_can.rs:
    # QUEUE_SIZE 64, NUM_QUEUES 3 (TX 0, RX 1, CTRL 2); src/can.rs
    # VirtioCanConfig { status: Le16 } = 2 bytes.
    assert _row("can") == (36, 3, 64, 2)


def test_gpio_values() -> None:
    # id 41. rust-vmm/vhost-device crates/vhost-device-gpio/src/vhu_gpio.rs:
    # QUEUE_SIZE 256, NUM_QUEUES 2 (request, event); struct virtio_gpio_config
    # (ngpio u16, padding[2], gpio_names_size u32) = 8. Seed crate agrees:
    # vireshk/vhost crates/vhost-user-frontend/src/lib.rs Gpio => (2, 256).
    assert _row("gpio") == (41, 2, 256, 8)


def test_spi_values() -> None:
    # id 45. rust-vmm/vhost-device vhost-device-spi/src/vhu_spi.rs: QUEUE_SIZE
    # 1024, NUM_QUEUES 1; VirtioSpiConfig 4 x u8 + 7 x Le32 = 32 bytes.
    assert _row("spi") == (45, 1, 1024, 32)


# --- DT compatible strings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("compatible", "virtio_id"),
    [
        ("virtio,device22", 34),  # I2C (Linux i2c-virtio.yaml)
        ("virtio,device29", 41),  # GPIO (Linux gpio-virtio.yaml)
        ("virtio,device1a", 26),  # FS (libxl writes the id in hex)
        ("virtio,device2", 2),
    ],
)
def test_parse_compatible(compatible: str, virtio_id: int) -> None:
    assert parse_compatible(compatible) == virtio_id


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "virtio,device",
        "virtio,mmio",
        "virtio,devicexyz",
        "virtio,device0x22",
        "virtio,device-1",
        "virtio,device123456789",  # more than 8 hex digits: not a u32
        "virtio device22",
        "VIRTIO,device22",
        "virtio,device22,extra",
        "virtio,device1A",  # the kernel matches "virtio,device%x": lower case only
        " virtio,device22",
    ],
)
def test_parse_compatible_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_compatible(bad)


def test_compatible_round_trips_and_device_type_lookup() -> None:
    for d in DEVICE_TYPES:
        assert parse_compatible(d.compatible) == d.virtio_id
        if d.refusal:
            with pytest.raises(ConfigError, match="not served"):
                device_type(d.compatible)
            continue
        assert device_type(d.compatible) is d
        assert device_type(d.virtio_id) is d
    # the seed (vireshk/xen-vhost-frontend src/supported_devices.rs) lists fs as 26
    # and formats it in decimal: "virtio,device26" is id 0x26 = 38, not FS.
    assert parse_compatible("virtio,device26") == 38
    with pytest.raises(ConfigError, match="not supported"):
        device_type("virtio,device26")
    with pytest.raises(ConfigError):
        device_type(5)  # balloon: not served


# --- socket names ------------------------------------------------------------------


def test_socket_names_follow_the_seed() -> None:
    # vireshk/xen-vhost-frontend src/device.rs: socket_path + name + ".sock" + index,
    # with names "i2c", "fs", "gpio" from src/supported_devices.rs.
    assert socket_name(BY_NAME["i2c"], 0) == "i2c.sock0"
    assert socket_name(BY_NAME["gpio"], 1) == "gpio.sock1"
    assert socket_name(BY_NAME["fs"], 12) == "fs.sock12"
    assert socket_name(BY_ID[2], 0) == "blk.sock0"
    names = {socket_name(d, 0) for d in DEVICE_TYPES}
    assert len(names) == len(DEVICE_TYPES)
    assert all(re.fullmatch(r"[a-z0-9]+\.sock0", n) for n in names)


def test_custom_device_type_socket_name() -> None:
    d = DeviceType("x", 99, 1, 8, 0, "test")
    assert d.compatible == "virtio,device63"
    assert socket_name(d, 3) == "x.sock3"


# --- blk against the real backend ---------------------------------------------------


@pytest.fixture
def qsd() -> Iterator[QsdExport]:
    yield from qsd_export()


def test_qsd_answers_blk_config_size(qsd: QsdExport) -> None:
    # qemu-storage-daemon (libvhost-user) answers GET_CONFIG of exactly the size xvf
    # asks for, and refuses one larger than its struct virtio_blk_config.
    blk = BY_NAME["blk"]
    with VhostUserFrontend(qsd.socket_path) as vu:
        handshake(vu, 1 << 32)  # VIRTIO_F_VERSION_1
        assert vu.protocol_features & ProtocolFeature.CONFIG
        assert vu.queue_num is not None and vu.queue_num >= blk.num_queues
        data = vu.get_config(0, blk.config_size)
        assert len(data) == blk.config_size
        assert int.from_bytes(data[0:8], "little") == qsd.image_size // 512
        # num_queues (offset 34) is what QSD was started with
        assert int.from_bytes(data[34:36], "little") == blk.num_queues
        with pytest.raises(VhostUserError, match="refused GET_CONFIG"):
            vu.get_config(0, 256)


def test_gpu_is_refused_with_the_reason() -> None:
    """vhost-user-gpu needs a display channel (VHOST_USER_GPU_SET_SOCKET) that xvf, a
    headless device model, does not provide: refused by name, not served half-working."""
    with pytest.raises(ConfigError, match="display channel"):
        device_type("virtio,device10")


def test_only_spec_writable_config_fields_are_writable() -> None:
    blk = BY_NAME["blk"]
    assert blk.config_writable(32, 1)  # writeback
    assert not blk.config_writable(0, 4)  # capacity
    assert not blk.config_writable(31, 2)  # straddles writeback
    assert BY_NAME["scsi"].config_writable(20, 4) and BY_NAME["scsi"].config_writable(24, 4)
    assert BY_NAME["input"].config_writable(0, 1) and not BY_NAME["input"].config_writable(2, 1)
    for name in ("i2c", "gpio", "fs", "net", "vsock", "sound"):
        assert not BY_NAME[name].config_writable(0, 1), name
