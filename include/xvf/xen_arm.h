/* Arm guest memory map facts from Xen public/arch-arm.h that xvf relies on:
 * where a domU's RAM banks and the libxl virtio-mmio window live. */
#ifndef XVF_XEN_ARM_H
#define XVF_XEN_ARM_H

#define XVF_GUEST_RAM_BANKS          2u
#define XVF_GUEST_RAM0_BASE          0x40000000ull    /* up to 3 GiB at 1 GiB */
#define XVF_GUEST_RAM0_SIZE          0xc0000000ull
#define XVF_GUEST_RAM1_BASE          0x0200000000ull  /* the rest at 8 GiB */
#define XVF_GUEST_RAM1_SIZE          0xfe00000000ull

#define XVF_GUEST_VIRTIO_MMIO_BASE   0x02000000ull
#define XVF_GUEST_VIRTIO_MMIO_SIZE   0x00100000ull
#define XVF_GUEST_VIRTIO_MMIO_SPI_FIRST 33u
#define XVF_GUEST_VIRTIO_MMIO_SPI_LAST  43u
/* Each device's window inside it (libxl's VIRTIO_MMIO_DEV_SIZE, not a public header). */
#define XVF_VIRTIO_MMIO_DEV_SIZE     0x200u

#endif
