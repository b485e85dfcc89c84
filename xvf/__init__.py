"""xvf: a Xen vhost-user frontend (virtio-mmio device model for Xen guests)."""

# argparser holds it: argparse-manpage loads that file alone at build time
from xvf.app.argparser import VERSION as __version__

__all__ = ["__version__"]
