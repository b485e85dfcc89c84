"""The platforms xvf serves guests on: real Xen (`xen`) and the software Xen (`sim`),
both behind the Protocols of `interface`. Empty, so that importing the simulator's
pure-Python parts (as the reference backends do) loads no compiled module."""
