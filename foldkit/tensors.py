"""Where tensor bytes live, and how foldkit reads and writes them.

A tensor's bytes are in one of these places (:func:`location_of` names it):

- ``inline``: in the protobuf (raw_data or a typed field);
- ``in file``: left in the source file by a lazy load, or in an external-data file (read through
  :class:`OpenFiles`, a read-only mmap whose pages leave the resident set after each rewrite);
- ``in memory``: a folded tensor waiting in a payload store (the header is marked external at
  ``wire.MEMORY``): a numpy array, or a recipe (:class:`foldkit.math.ScaledChannels`) computed
  block by block as it is written;
- ``spilled``: the same, kept in an unlinked temp file (:class:`SpillPayloads`).

The payload stores (:class:`MemoryPayloads`, :class:`SpillPayloads`) are in foldkit.payloads; this
module is the one place that turns a TensorProto into an array and an array into a TensorProto.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from .attrs import FLOAT_TYPES  # noqa: F401  (re-exported: one definition, in attrs)
from .math import ScaledChannels
from .wire import MEMORY, is_memory


class Location(str, Enum):
    INLINE = "inline"
    IN_FILE = "in file"
    IN_MEMORY = "in memory"
    RECIPE = "recipe"
    SPILLED = "spilled"


def location_of(t: TensorProto, payloads=None) -> Location:
    """Where the bytes of ``t`` are (``payloads``: the model's payload store, if any)."""
    if t.data_location != TensorProto.EXTERNAL:
        return Location.INLINE
    if not is_memory(t):
        return Location.IN_FILE
    if payloads is not None:
        kind = getattr(payloads, "kind_of", None)
        if kind is not None:
            return Location(kind(t.name))
    return Location.IN_MEMORY


_RAW_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
              TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.INT64,
              TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}


class OpenFiles:
    """External data files mapped once each (read-only). Tensors are read-only views of the map:
    no copy, no zero-filled pages. :meth:`release` drops the mapped pages from this process's
    resident set after each rewrite (they stay in the page cache and fault back in if read again),
    so peak memory is that of the tensors foldkit creates, not of the file."""

    def __init__(self):
        self.maps = {}

    def view(self, path: str, length: int, offset: int) -> memoryview:
        import mmap

        m = self.maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if offset + length > len(m):
            raise ValueError(f"{path} ends before the tensor does")
        return memoryview(m)[offset:offset + length]

    def release(self, payloads=None) -> None:
        import mmap

        if payloads is not None and hasattr(payloads, "release"):
            payloads.release()
        for m in self.maps.values():
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # an array still views it: let the GC unmap it
                pass
        self.maps.clear()


def to_array(t: TensorProto, index) -> np.ndarray:
    """The tensor's values (read-only when they come from external data or memory payloads)."""
    base_dir, files = index.base_dir, index.files
    if t.data_location == TensorProto.EXTERNAL and t.name in index.payloads:
        return index.payloads[t.name]
    if t.data_location == TensorProto.EXTERNAL and t.data_type in _RAW_TYPES:
        info = {e.key: e.value for e in t.external_data}
        try:
            offset, length = int(info.get("offset", 0) or 0), int(info["length"])
            dtype = np.dtype(np_dtype(t.data_type)).newbyteorder("<")
            count = 1
            for d in t.dims:
                count *= d
            if count * dtype.itemsize == length:
                data = files.view(os.path.join(base_dir or "", info["location"]), length, offset)
                return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(t.dims))
        except (KeyError, ValueError, OSError):
            pass  # fall back to onnx's reader, which raises a precise error
    return numpy_helper.to_array(t, base_dir or "")


def np_dtype(data_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(data_type)


def _header(array: np.ndarray, data_type: int, into: TensorProto) -> np.ndarray:
    """Make ``into`` (name and doc kept, all else cleared) the header of ``array`` cast to
    ``data_type``, little-endian; returns that array (a ScaledChannels is returned as is)."""
    lazy = isinstance(array, ScaledChannels)
    arr = array if lazy else np.ascontiguousarray(np.asarray(array).astype(np_dtype(data_type), copy=False))
    if not lazy and arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    name, doc = into.name, into.doc_string
    into.Clear()
    into.name, into.doc_string = name, doc
    into.dims.extend(arr.shape)
    into.data_type = data_type
    return arr


def memory_tensor(array: np.ndarray, data_type: int, into: TensorProto) -> np.ndarray:
    """Make ``into`` a header whose payload is held in memory (wire.MEMORY); returns the payload."""
    arr = _header(array, data_type, into)
    into.data_location = TensorProto.EXTERNAL
    into.external_data.add(key="location", value=MEMORY)
    into.external_data.add(key="length", value=str(arr.nbytes))
    return arr


def materialize(model: ModelProto, payloads) -> None:
    """Put in-memory payloads into their tensors (for code that needs a self-contained proto)."""
    for t in model.graph.initializer:
        if is_memory(t):
            make_tensor(payloads.pop(t.name), t.data_type, into=t)


def make_tensor(array: np.ndarray, data_type: int, into: Optional[TensorProto] = None) -> TensorProto:
    """A raw-data TensorProto (little-endian) of ``array`` (or a ScaledChannels) cast to
    ``data_type``, built in ``into`` when given (its name is kept; data, dims and external-data
    fields are replaced)."""
    t = into if into is not None else TensorProto()
    t.raw_data = _header(array, data_type, t).tobytes()
    return t




class TensorStore:
    """The one owner of a fold's tensor bytes: the mapped source files, the store folded tensors
    wait in (memory or a spill file), and the policy that decides where a new tensor goes.

    ``defer``: a new top-level tensor of ``DEFER_BYTES`` or more waits in the payload store (its
    header marked external at wire.MEMORY) until written; with ``spill_dir`` the store is an
    unlinked temp file there. Otherwise tensors go straight into the protobuf."""

    DEFER_BYTES = 1 << 20

    def __init__(self, base_dir: Optional[str] = None, defer: bool = False, spill_dir: Optional[str] = None):
        from .payloads import MemoryPayloads, SpillPayloads

        self.base_dir = base_dir
        self.defer = defer or spill_dir is not None
        self.files = OpenFiles()
        self.payloads = SpillPayloads(spill_dir, self.files) if spill_dir is not None else MemoryPayloads(self.files)

    def array(self, t: TensorProto) -> np.ndarray:
        """The values of ``t``, wherever they are (read-only when mapped or held as a payload)."""
        return to_array(t, self)

    def place(self, array, data_type: int, into: TensorProto, top_level: bool) -> None:
        """Make ``into`` hold ``array`` (already rounded): in the protobuf, or as a payload when the
        policy defers it (a top-level tensor of DEFER_BYTES or more)."""
        size = array.nbytes if isinstance(array, ScaledChannels) else np.asarray(array).nbytes
        if self.defer and top_level and size >= self.DEFER_BYTES:
            self.payloads.put(into.name, memory_tensor(array, data_type, into))
        else:
            self.payloads.discard(into.name)
            make_tensor(array, data_type, into=into)

    def release(self) -> None:
        """Pages read since the last call leave the resident set (they stay in the page cache)."""
        self.files.release(self.payloads)

    def discard(self, name: str) -> None:
        self.payloads.discard(name)
