"""The real Xen platform: /dev/xen/privcmd, evtchn and gntdev on a Dom0 (see platform.py)."""
