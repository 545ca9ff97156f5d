"""Where folded tensors wait until they are written (``defer``): in memory, or spilled to disk.

Both stores map a tensor name to its final bytes (already rounded to the tensor's dtype,
little-endian). The tensor's header in the model is marked external at ``wire.MEMORY``.

- :class:`MemoryPayloads`: numpy arrays (the default; about 1x the folded weights in RAM).
- :class:`SpillPayloads`: appended to a temp file that is unlinked as soon as it is created
  (read back through its descriptor, so nothing is ever left behind, even after SIGKILL), for
  models in the external-data regime: peak memory is then one tensor, not the model.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Optional

import numpy as np


class MemoryPayloads(dict):
    def put(self, name: str, arr: np.ndarray) -> None:
        self[name] = arr

    def source(self, name: str):
        arr = self[name]
        return ("data", memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

    def close(self) -> None:
        self.clear()


class SpillPayloads:
    ALIGN = 4096

    def __init__(self, folder: Optional[str] = None):
        fd, path = tempfile.mkstemp(prefix=".foldkit-spill-", dir=folder)
        os.unlink(path)  # the descriptor keeps it alive; no path, no leftovers
        self.fd = fd
        self.end = 0
        self.index = {}  # name -> (offset, length, dtype, shape)
        self._map = None

    def __contains__(self, name) -> bool:
        return name in self.index

    def put(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        self.end += (-self.end) % self.ALIGN
        data = memoryview(arr.reshape(-1).view(np.uint8))
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], self.end + written)
        self.index[name] = (self.end, arr.nbytes, arr.dtype, arr.shape)
        self.end += arr.nbytes
        self._map = None

    def __getitem__(self, name: str) -> np.ndarray:
        offset, length, dtype, shape = self.index[name]
        if self._map is None or len(self._map) < self.end:
            self._map = mmap.mmap(self.fd, self.end, access=mmap.ACCESS_READ) if self.end else None
        return np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)

    def pop(self, name: str, default=None):
        if name not in self.index:
            return default
        arr = np.array(self[name])  # a private copy: the region may be reused by nobody, but keep it simple
        del self.index[name]
        return arr

    def source(self, name: str):
        offset, length, _, _ = self.index[name]
        return ("fd", self.fd, offset, length)

    def release(self) -> None:
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._map = None
        try:
            os.close(self.fd)
        except OSError:
            pass

    def __del__(self):
        self.close()
