"""Both platforms offer every method of the seam (xvf.platform.interface) with the
same parameters. mypy checks the whole structure (`_is_a_platform` in each
platform module); this catches a renamed or missing method without it."""

from __future__ import annotations

import inspect

import pytest

from xvf.platform import interface as I
from xvf.platform.sim import platform as S
from xvf.platform.xen import platform as X

PAIRS = [
    (I.Platform, X.XenPlatform),
    (I.Platform, S.SimPlatform),
    (I.EventChannelHandle, X.XenEventChannelHandle),
    (I.EventChannelHandle, S.SimEventChannelHandle),
    (I.IoreqServerHandle, X.XenIoreqServer),
    (I.IoreqServerHandle, S.SimIoreqServer),
    (I.GuestMemory, X.XenGuestMemory),
    (I.GuestMemory, S.SimGuestMemory),
    (I.GrantMapper, X.XenGrantMapper),
    (I.GrantMapper, S.SimGrantMapper),
]


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(value)
        for name, value in vars(cls).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


@pytest.mark.parametrize("protocol,impl", PAIRS, ids=lambda c: c.__name__)
def test_implementation_has_every_method_of_the_seam(protocol: type, impl: type) -> None:
    for name, wanted in _methods(protocol).items():
        got = getattr(impl, name, None)
        assert inspect.isfunction(got), f"{impl.__name__} lacks {name}()"
        assert list(inspect.signature(got).parameters) == list(wanted.parameters), (
            f"{impl.__name__}.{name}{inspect.signature(got)} differs from the seam's {wanted}"
        )
