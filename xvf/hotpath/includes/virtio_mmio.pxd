# include/xvf/virtio_mmio.h: the virtio-mmio v2 registers the hot path answers.
cdef extern from "xvf/virtio_mmio.h" nogil:
    unsigned int XVF_VIRTIO_MMIO_QUEUE_NOTIFY, XVF_VIRTIO_MMIO_INTERRUPT_STATUS
    unsigned int XVF_VIRTIO_MMIO_INTERRUPT_ACK, XVF_VIRTIO_MMIO_STATUS
    unsigned int XVF_VIRTIO_MMIO_INT_VRING, XVF_VIRTIO_MMIO_INT_CONFIG
    unsigned int XVF_VIRTIO_STATUS_DRIVER_OK, XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET
