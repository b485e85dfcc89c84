# include/xvf/xen_arm.h: the Arm guest memory map (RAM banks, virtio-mmio window).
cdef extern from "xvf/xen_arm.h" nogil:
    unsigned int XVF_GUEST_RAM_BANKS
    unsigned long long XVF_GUEST_RAM0_BASE, XVF_GUEST_RAM0_SIZE
    unsigned long long XVF_GUEST_RAM1_BASE, XVF_GUEST_RAM1_SIZE
    unsigned long long XVF_GUEST_VIRTIO_MMIO_BASE, XVF_GUEST_VIRTIO_MMIO_SIZE
    unsigned int XVF_GUEST_VIRTIO_MMIO_SPI_FIRST, XVF_GUEST_VIRTIO_MMIO_SPI_LAST
    unsigned int XVF_VIRTIO_MMIO_DEV_SIZE
