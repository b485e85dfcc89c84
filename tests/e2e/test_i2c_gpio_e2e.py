"""virtio-i2c and virtio-gpio traffic from a simulated guest through xvf.

No third-party i2c or gpio vhost-user backend can be installed here (rust-vmm's
vhost-device-* are on crates.io only), so the backends are the in-tree
reference ones under tests/backends/, run as separate processes like the real
daemons; tests/backends/README.md says where they differ from vhost-device.
"""

from __future__ import annotations

import os

import pytest

from xvf.platform.sim.drivers.gpio import VIRTIO_GPIO_DIRECTION_OUT, VirtioGpio
from xvf.platform.sim.drivers.i2c import I2cMsg, VirtioI2c
from xvf.platform.sim.guest import attach

pytestmark = pytest.mark.e2e

RTC = 0x68  # DS1307-style RTC on the reference i2c backend
EEPROM = 0x50


@pytest.fixture
def backends(sockets, start_ref_backend):
    start_ref_backend("i2c", os.path.join(sockets, "i2c.sock0"))
    start_ref_backend("gpio", os.path.join(sockets, "gpio.sock0"))
    return sockets


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_rtc_over_i2c_and_gpio_lines(hypervisor, backends, start_frontend, foreign):
    usage = "0" if foreign else "1"
    line = (
        f'virtio = [ "type=virtio,device22, transport=mmio, grant_usage={usage}", '
        f'"type=virtio,device29, transport=mmio, grant_usage={usage}" ]'
    )
    fe = start_frontend(backends, foreign=foreign)
    dom = hypervisor.create_domain("periph", memory_mib=32, vcpus=2, virtio=line)
    fe.wait_log("gpio.sock0")

    i2c = VirtioI2c(attach(dom, 0))
    i2c.start()
    # Set the clock halted (seconds bit 7) so it reads back exactly: 23:59:45, Sat 31 Dec 2033
    time_regs = bytes([0x80 | 0x45, 0x59, 0x23, 0x07, 0x31, 0x12, 0x33])
    i2c.write_reg(RTC, 0x00, time_regs)
    assert i2c.read_reg(RTC, 0x00, 7) == time_regs
    i2c.write_reg(EEPROM, 0x10, b"xvf!")
    assert i2c.read_reg(EEPROM, 0x10, 4) == b"xvf!"
    # a transfer to an address with no chip fails and says so
    msg = I2cMsg(addr=0x20, read=True, length=1)
    assert i2c.transfer([msg]) == 0
    assert msg.status not in (None, 0)

    gpio = VirtioGpio(attach(dom, 1, vcpu=1))
    gpio.start()
    assert gpio.ngpio == 8
    assert gpio.get_names() == [f"dummy{i}" for i in range(8)]
    gpio.set_value(3, 1)
    gpio.set_direction(3, VIRTIO_GPIO_DIRECTION_OUT, 1)
    assert gpio.get_direction(3) == VIRTIO_GPIO_DIRECTION_OUT
    assert gpio.get_value(3) == 1
    gpio.set_value(3, 0)
    assert gpio.get_value(3) == 0
    i2c.close()
    gpio.close()
    # like rust-vmm's vhost-device, the reference backends map the guest themselves
    mode = "foreign" if foreign else "grant"
    assert fe.log().count(f"{mode} regions (Xen mmap), mapped by the backend") == 2
    assert "ERROR" not in fe.log()


def test_a_nacked_read_through_the_grant_relay_reports_its_error(
    hypervisor, sockets, start_ref_backend, start_frontend
):
    """The reference i2c backend, like rust-vmm's vhost-device-i2c, answers a failed
    transfer with used len 1 although its status byte trails the read buffer. Built
    without XEN_MMAP it is served through xvf's grant relay, which used to copy back
    only `len` bytes of the first buffer: the guest then read a successful 0x00."""
    start_ref_backend("i2c", os.path.join(sockets, "i2c.sock0"), "--no-xen-mmap")
    fe = start_frontend(sockets, foreign=False)
    line = 'virtio = [ "type=virtio,device22, transport=mmio, grant_usage=1" ]'
    dom = hypervisor.create_domain("nack", memory_mib=32, vcpus=1, virtio=line)
    fe.wait_log("i2c.sock0")
    i2c = VirtioI2c(attach(dom, 0))
    i2c.start()
    assert i2c.read_reg(RTC, 0x00, 1)  # an answered read works through the relay
    msg = I2cMsg(addr=0x20, read=True, length=4)  # no chip there
    assert i2c.transfer([msg]) == 0
    assert msg.status == 1, f"status {msg.status}: the error did not reach the guest"
    i2c.close()
    assert "shadow rings relayed by xvf" in fe.log()


@pytest.mark.kernel_eventfds
def test_grant_regions_hand_kicks_and_interrupts_to_the_kernel(
    hypervisor, backends, start_frontend
):
    """The backends map the guest's grants themselves, so xvf need not see their kicks:
    the Dom0 kernel carries them (privcmd ioeventfd/irqfd), as in foreign mode."""
    line = 'virtio = [ "type=virtio,device22, transport=mmio, grant_usage=1" ]'
    fe = start_frontend(backends, foreign=False)
    dom = hypervisor.create_domain("offload", memory_mib=32, vcpus=1, virtio=line)
    fe.wait_log("interrupts injected by")
    assert "QueueNotify handled by the kernel (privcmd ioeventfd)" in fe.log()
    assert "interrupts injected by the kernel (privcmd irqfd)" in fe.log()
    i2c = VirtioI2c(attach(dom, 0))
    i2c.start()
    for i in range(8):
        i2c.write_reg(EEPROM, 0x20 + i, bytes([i]))
    assert i2c.read_reg(EEPROM, 0x20, 8) == bytes(range(8))
    assert dom.ioeventfd_hits > 0  # notifies completed without an ioreq to xvf
    i2c.close()
    assert "grant regions (Xen mmap), mapped by the backend" in fe.log()
    hypervisor.destroy_domain(dom.domid)
    assert hypervisor.held_at_destroy[dom.domid] == []  # offloads released first
    assert "ERROR" not in fe.log()


@pytest.mark.kernel_eventfds
def test_the_relay_keeps_kicks_with_xvf_and_raises_interrupts_through_the_kernel(
    hypervisor, sockets, start_frontend, start_ref_backend
):
    """The relay must see every kick (it copies the request first), so QueueNotify
    stays with xvf; its interrupts go through the kernel's irqfd, which xvf signals
    after copying the completions back (no set_irq_level dm_op)."""
    start_ref_backend("i2c", os.path.join(sockets, "i2c.sock0"), "--no-xen-mmap")
    line = 'virtio = [ "type=virtio,device22, transport=mmio, grant_usage=1" ]'
    fe = start_frontend(sockets, foreign=False)
    dom = hypervisor.create_domain("relay", memory_mib=32, vcpus=1, virtio=line)
    fe.wait_log("interrupts injected by")
    assert "QueueNotify handled by xvf (ioreq service loop)" in fe.log()
    assert "interrupts injected by the kernel (privcmd irqfd)" in fe.log()
    i2c = VirtioI2c(attach(dom, 0))
    i2c.start()
    i2c.write_reg(EEPROM, 0x30, b"relay")
    assert i2c.read_reg(EEPROM, 0x30, 5) == b"relay"
    assert dom.irqfd_hits >= 1 and dom.ioeventfd_hits == 0  # eventfd writes may coalesce
    i2c.close()
