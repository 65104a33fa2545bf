"""A read-only file of a known size that keeps its own position.

The seeking shared by every such file in the server: a slice of another file, a sealed blob's
plaintext decrypted as it is read, a decompressed stream produced again as it is read. Each
subclass only implements ``readinto`` from ``self._pos``, within ``self._size``.
"""

from __future__ import annotations

import io

__all__ = ["PositionedReader"]


class PositionedReader(io.RawIOBase):
    """Readable and seekable over ``size`` bytes; a seek past the end reads nothing."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError("invalid whence")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos
