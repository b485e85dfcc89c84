"""Reference vhost-user backends (i2c, gpio) that stand in for rust-vmm vhost-device in tests.

See README.md in this folder for what each one mirrors and where it differs.
"""
