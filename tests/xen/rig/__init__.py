"""The real-Xen rig: Xen arm64 + a Debian 13 Dom0 + Linux DomUs under qemu-system-aarch64 (TCG).

Everything is built from Debian's packages into a cache outside the checkout
(`XVF_RIG_CACHE`, default /var/tmp/xvf-rig), one resumable stage at a time. The one
input Debian does not give is an IOREQ-enabled hypervisor image (see hypervisor.py).
"""
