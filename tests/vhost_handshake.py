"""The front-end's side of a vhost-user handshake, for tests that drive a backend
directly. xvf's own handshake is its device's (xvf.device); this one asks for the
protocol features those tests use, in QEMU's order."""

from __future__ import annotations

from xvf.protocols.vhost_user import VhostUserFrontend
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF

# XEN_MMAP too: rust-vmm backends built with `xen` drop a front-end that does not ack it.
PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.XEN_MMAP


def handshake(fe: VhostUserFrontend, features: int, protocol: int = PROTOCOL) -> None:
    """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ), SET_OWNER and
    SET_FEATURES with the wanted `features` the backend offers."""
    offered = fe.get_features()
    acked = features & offered
    if offered & F_PROTOCOL_FEATURES:
        fe.set_protocol_features(fe.get_protocol_features() & protocol)
        if fe.protocol_features & PF.MQ:
            fe.get_queue_num()
        acked |= F_PROTOCOL_FEATURES
    fe.set_owner()
    fe.set_features(acked)
