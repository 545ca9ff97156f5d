"""Where folded tensors wait until they are written (``defer``): in memory, or spilled to disk.

Both stores map a tensor name to its final bytes (already rounded to the tensor's dtype,
little-endian). The tensor's header in the model is marked external at ``wire.MEMORY``.

- :class:`MemoryPayloads`: numpy arrays (the default; about 1x the folded weights in RAM).
- :class:`SpillPayloads`: appended to a temp file that is unlinked as soon as it is created
  (read back through its descriptor, so nothing is ever left behind, even after SIGKILL), for
  models in the external-data regime: peak memory is then one tensor, not the model.

Either store also keeps recipes (:class:`foldkit.math.ScaledChannels`: a big weight scaled per
channel) as they are: the writer computes them block by block as it streams them out, so a folded
weight is never held whole. Reading one (a later fold of the same weight) computes it.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Optional

import numpy as np

from .math import ScaledChannels


def stream(recipe: ScaledChannels, files=None):
    """The recipe's bytes, block by block; then the input pages it read leave our resident set
    (``files``: graph.OpenFiles)."""
    for block in recipe.blocks():
        yield memoryview(block.reshape(-1).view(np.uint8))
    if files is not None:
        files.release()


class MemoryPayloads(dict):
    def __init__(self, files=None):
        super().__init__()
        self.files = files  # graph.OpenFiles: released after each recipe is streamed

    def put(self, name: str, arr) -> None:
        super().__setitem__(name, arr)

    def __getitem__(self, name: str) -> np.ndarray:
        value = super().__getitem__(name)
        if isinstance(value, ScaledChannels):
            value = value.array()
            super().__setitem__(name, value)
        return value

    def pop(self, name: str, *default):
        value = super().pop(name, *default)
        return value.array() if isinstance(value, ScaledChannels) else value

    def discard(self, name: str) -> None:
        super().pop(name, None)

    def kind_of(self, name: str) -> str:
        """foldkit.tensors.Location value of a payload held here."""
        return "recipe" if isinstance(dict.get(self, name), ScaledChannels) else "in memory"

    def arrays(self, name: str):
        """The payload as arrays in order: a recipe block by block (never whole), else the array."""
        value = super().__getitem__(name)
        if isinstance(value, ScaledChannels):
            yield from value.blocks()
        else:
            yield value

    def source(self, name: str):
        value = super().__getitem__(name)
        if isinstance(value, ScaledChannels):
            return ("blocks", value.nbytes, stream(value, self.files))
        return ("data", memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8)))

    def close(self) -> None:
        self.clear()


class SpillPayloads:
    ALIGN = 4096

    def __init__(self, folder: Optional[str] = None, files=None):
        self.recipes = {}  # name -> ScaledChannels, never spilled: they hold no folded bytes
        self.files = files
        fd, path = tempfile.mkstemp(prefix=".foldkit-spill-", dir=folder)
        os.unlink(path)  # the descriptor keeps it alive; no path, no leftovers
        self.fd = fd
        self.end = 0
        self.index = {}  # name -> (offset, length, dtype, shape)
        self._map = None

    def __contains__(self, name) -> bool:
        return name in self.index or name in self.recipes

    def kind_of(self, name: str) -> str:
        """foldkit.tensors.Location value of a payload held here."""
        return "recipe" if name in self.recipes else "spilled"

    def put(self, name: str, arr) -> None:
        self.discard(name)
        if isinstance(arr, ScaledChannels):
            self.recipes[name] = arr
            return
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
        if name in self.recipes:
            return self.recipes[name].array()
        offset, length, dtype, shape = self.index[name]
        if self._map is None or len(self._map) < self.end:
            self._map = mmap.mmap(self.fd, self.end, access=mmap.ACCESS_READ) if self.end else None
        return np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)

    def pop(self, name: str, default=None):
        if name not in self:
            return default
        arr = np.array(self[name])  # a private copy, not a view of the spill file
        self.discard(name)
        return arr

    def arrays(self, name: str):
        """The payload as arrays in order: a recipe block by block (never whole), else the array."""
        if name in self.recipes:
            yield from self.recipes[name].blocks()
        else:
            yield self[name]

    def discard(self, name: str) -> None:
        self.recipes.pop(name, None)
        self.index.pop(name, None)  # its spilled bytes stay unused in the unlinked file

    def source(self, name: str):
        if name in self.recipes:
            recipe = self.recipes[name]
            return ("blocks", recipe.nbytes, stream(recipe, self.files))
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
