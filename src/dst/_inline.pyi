from collections.abc import Callable

class Inline:
    """Serves runs of READs and plain WRITEs on a file (see ``_inline.c``)."""

    def __init__(
        self,
        fd: int,
        size: int,
        max_block: int,
        structured: bool,
        writable: bool,
        sink: Callable[[bytes], object],
    ) -> None: ...
    def __call__(self, buf: bytearray, pos: int, end: int, budget: int) -> tuple[int, int]: ...
    def close(self) -> None: ...
