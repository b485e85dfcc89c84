"""virtio-net guest driver (virtio 1.2 section 5.1), device id 1, without offloads.

Only VERSION_1 (and ACCESS_PLATFORM for grant DMA, added by the transport) is
negotiated: no MRG_RXBUF, checksum/GSO, control or multiple queues. Queue 0 is
receiveq1, queue 1 transmitq1. With VERSION_1 every packet is preceded by the
12-byte struct virtio_net_hdr_v1 (num_buffers is always there, section 5.1.6);
without offloads the driver sends it zeroed and gets back num_buffers = 1.

Each rx buffer is one device-writable 2 KiB descriptor (header + frame), which
holds any frame up to the 1514-byte Ethernet maximum; each tx packet is one
device-readable descriptor (header + frame) from a slot of its own.
"""

from __future__ import annotations

import struct
import time
from collections import deque

from xvf.errors import SimulatorError
from xvf.platform.sim.drivers import SlotPool
from xvf.platform.sim.virtio_driver import VirtioMmioDevice

VIRTIO_ID_NET = 1
RX_QUEUE = 0
TX_QUEUE = 1

# struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12
RX_BUF_SIZE = 2048
MAX_FRAME = RX_BUF_SIZE - NET_HDR_SIZE

# struct virtio_net_config: mac[6] at 0 (valid only with VIRTIO_NET_F_MAC)
VIRTIO_NET_F_MAC = 5
CFG_MAC = 0


class VirtioNet:
    """Driver of one virtio-net device with a single rx/tx queue pair."""

    def __init__(self, dev: VirtioMmioDevice, *, queue_size: int = 256) -> None:
        self.dev = dev
        self.ram = dev.ram
        self.queue_size = queue_size
        self.mac: bytes | None = None
        self._rx_slots: SlotPool | None = None
        self._tx_slots: SlotPool | None = None
        self._received: deque[bytes] = deque()

    def start(self) -> None:
        if self.dev.probe() != VIRTIO_ID_NET:
            raise SimulatorError(f"{self.dev.name}: device id {self.dev.device_id} is not net")
        # No device-specific feature wanted: the transport adds VERSION_1 (and
        # ACCESS_PLATFORM for grants), which is all this header layout assumes.
        self.dev.initialize(0, [self.queue_size, self.queue_size])
        if self.dev.has_feature(VIRTIO_NET_F_MAC):
            self.mac = self.dev.read_config_bytes(CFG_MAC, 6)
        rx_size = self.dev.queues[RX_QUEUE].size
        tx_size = self.dev.queues[TX_QUEUE].size
        self._rx_slots = SlotPool(self.ram, rx_size, RX_BUF_SIZE)
        self._tx_slots = SlotPool(self.ram, tx_size, RX_BUF_SIZE)
        # Fill the receive ring (the spec's driver requirement before expecting packets).
        for _ in range(rx_size):
            self._post_rx(self._rx_slots.take())
        self.dev.kick(RX_QUEUE)

    def close(self) -> None:
        self.dev.shutdown()  # the reset returns every buffer still posted
        for pool in (self._rx_slots, self._tx_slots):
            if pool is not None:
                pool.close()
        self._rx_slots = self._tx_slots = None

    def _post_rx(self, slot: int) -> None:
        self.dev.queues[RX_QUEUE].add([], [(slot, RX_BUF_SIZE)], slot)

    # -- transmit ---------------------------------------------------------------
    def send(self, frame: bytes, timeout: float | None = None) -> None:
        """Queue one Ethernet frame; waits (up to `timeout`) only for a free tx slot."""
        if self._tx_slots is None:
            raise SimulatorError(f"{self.dev.name}: driver not started")
        if not 14 <= len(frame) <= MAX_FRAME:
            raise SimulatorError(f"frame of {len(frame)} bytes (14..{MAX_FRAME})")
        self._reclaim_tx()
        vq = self.dev.queues[TX_QUEUE]
        while vq.num_free == 0:
            self._reclaim_tx(self.dev.wait_used(TX_QUEUE, "a tx slot", timeout))
        slot = self._tx_slots.take()
        buf = self.ram.view(slot, NET_HDR_SIZE + len(frame))
        NET_HDR.pack_into(buf, 0, 0, 0, 0, 0, 0, 0, 0)  # no offloads; num_buffers unused on tx
        buf[NET_HDR_SIZE:] = frame
        buf.release()
        try:
            vq.add([(slot, NET_HDR_SIZE + len(frame))], [], slot)
        except Exception:
            self._tx_slots.give(slot)
            raise
        self.dev.kick(TX_QUEUE)

    def _reclaim_tx(self, done: list[tuple[object, int]] | None = None) -> None:
        if done is None:
            done = self.dev.queues[TX_QUEUE].get_used()
        for slot, _ in done:
            self._tx_slots.give(slot)  # type: ignore[union-attr, arg-type]

    # -- receive ------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> bytes:
        """The next received frame (header stripped); SimulatorError after `timeout`."""
        limit = self.dev.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._received:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimulatorError(f"{self.dev.name}: no frame received within {limit}s")
            self._take_rx(self.dev.wait_used(RX_QUEUE, "a received frame", left))
        return self._received.popleft()

    def _take_rx(self, done: list[tuple[object, int]]) -> None:
        for token, written in done:
            slot = token
            if not isinstance(slot, int) or not NET_HDR_SIZE <= written <= RX_BUF_SIZE:
                raise SimulatorError(f"{self.dev.name}: rx buffer returned with length {written}")
            num_buffers = NET_HDR.unpack(self.ram.read(slot, NET_HDR_SIZE))[6]
            if num_buffers not in (0, 1):
                # Without MRG_RXBUF a packet must fit in one buffer (section 5.1.6.4).
                raise SimulatorError(f"{self.dev.name}: rx num_buffers {num_buffers}")
            self._received.append(self.ram.read(slot + NET_HDR_SIZE, written - NET_HDR_SIZE))
            self._post_rx(slot)  # the buffer goes straight back to the device
        if done:
            self.dev.kick(RX_QUEUE)
