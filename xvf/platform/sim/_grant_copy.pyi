# Python-visible API of _grant_copy.pyx, for mypy.

from collections.abc import Callable, Sequence

from typing_extensions import Buffer

def grant_copy(
    segments: bytearray,
    count: int,
    resolve: Callable[[int], tuple[Buffer, Sequence[tuple[int, Buffer]], object] | None],
    local: Sequence[tuple[int, Buffer]],
    dm_domid: int,
) -> None: ...
