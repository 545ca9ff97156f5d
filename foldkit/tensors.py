"""Where tensor bytes live, and how foldkit reads and writes them.

A tensor's bytes are in one of these places (:func:`location_of` names it):

- ``inline``: in the protobuf (raw_data or a typed field);
- ``in file``: left in the source file by a lazy load, or in an external-data file (read through
  :class:`OpenFiles`, a read-only mmap whose pages leave the resident set after each rewrite);
- ``in memory``: a folded tensor waiting in a payload store (the header is marked external at
  ``wire.MEMORY``): a numpy array, or a recipe (:class:`foldkit.math.ScaledChannels`) computed
  block by block as it is written;
- ``spilled``: the same, kept in an unlinked temp file (:class:`SpillPayloads`).

:class:`TensorStore` owns all of it for one fold: the graph index reads arrays through it, passes
hand it new tensors (:meth:`TensorStore.place`: the policy deciding where they go lives there and
nowhere else), and the writer streams every deferred payload from it as a typed
:class:`foldkit.wire.Source`. This module is the one place that turns a TensorProto into an array
and an array into a TensorProto.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from enum import Enum
from typing import Optional

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from .attrs import FLOAT_TYPES  # noqa: F401  (re-exported: one definition, in attrs)
from .math import ScaledChannels
from .signals import held
from .wire import MEMORY, Source, external_size, is_memory, payload_nbytes


class Location(str, Enum):
    INLINE = "inline"
    IN_FILE = "in file"
    IN_MEMORY = "in memory"
    RECIPE = "recipe"
    SPILLED = "spilled"


def location_of(t: TensorProto, store=None) -> Location:
    """Where the bytes of ``t`` are (``store``: the model's TensorStore, if any)."""
    if t.data_location != TensorProto.EXTERNAL:
        return Location.INLINE
    if not is_memory(t):
        return Location.IN_FILE
    if store is not None:
        return store.location(t.name)
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

        from .errors import InputError

        m = self.maps.get(path)
        if m is None:
            try:
                with open(path, "rb") as f:
                    m = self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:  # gone, or emptied (mmap refuses an empty file)
                raise InputError(f"{path}: changed while foldkit read it ({getattr(e, 'strerror', None) or e}); "
                                 "another process rewrote or removed it?") from None
        if offset + length > len(m):  # validated at load: the file changed since
            raise InputError(f"{path}: changed while foldkit read it: it now ends at {len(m)} bytes, before the "
                             f"tensor data at {offset}..{offset + length}; another process truncated or rewrote it?")
        return memoryview(m)[offset:offset + length]

    def release(self) -> None:
        import mmap

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


def to_array(t: TensorProto, store: "TensorStore") -> np.ndarray:
    """The tensor's values (read-only when they come from external data or a payload store)."""
    base_dir, files = store.base_dir, store.files
    if t.data_location == TensorProto.EXTERNAL and t.name in store.payloads:
        return store.payloads[t.name]
    if t.data_location == TensorProto.EXTERNAL and t.data_type in _RAW_TYPES:
        info = {e.key: e.value for e in t.external_data}
        try:
            offset, length = int(info.get("offset", 0) or 0), external_size(t)
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


def sparse_to_array(sp: onnx.SparseTensorProto, store: "TensorStore", source: str = "model") -> np.ndarray:
    """The dense values of the sparse tensor ``sp`` (zeros where it stores nothing), after checking
    its layout as ONNX states it: values 1-D with NNZ entries; indices int64, [NNZ] linear indices or
    [NNZ, rank] coordinates, each within the dims. A bad one is an InputError naming the tensor."""
    from .errors import InputError

    name, dims = sp.values.name, [int(d) for d in sp.dims]
    where = f"{source}: sparse initializer '{name}'"
    if any(d < 0 for d in dims):
        raise InputError(f"{where} has a negative dimension {dims}")
    if len(sp.values.dims) != 1:
        raise InputError(f"{where} has values of shape {list(sp.values.dims)}, not 1-D")
    nnz = int(sp.values.dims[0])
    if sp.indices.data_type != TensorProto.INT64 or list(sp.indices.dims) not in ([nnz], [nnz, len(dims)]):
        raise InputError(f"{where} has indices of type {sp.indices.data_type} and shape {list(sp.indices.dims)} "
                         f"for {nnz} values of a rank-{len(dims)} tensor (ONNX wants int64 [NNZ] or [NNZ, rank])")
    try:
        values = np.asarray(to_array(sp.values, store)).reshape(-1)
        indices = np.asarray(to_array(sp.indices, store), dtype=np.int64)
    except (ValueError, OSError) as e:
        raise InputError(f"{where} cannot be read ({e})") from None
    size = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if indices.ndim == 2:
        bad = (indices < 0) | (indices >= np.asarray(dims, np.int64).reshape(1, -1))
        if bad.any():
            raise InputError(f"{where} has an index outside its dims {dims}")
        indices = np.ravel_multi_index(tuple(indices.T), dims) if nnz else indices.reshape(-1)
    elif nnz and (indices.min() < 0 or indices.max() >= size):
        raise InputError(f"{where} has a linear index outside its {size} values")
    dense = np.zeros(size, dtype=values.dtype)
    dense[indices] = values
    return dense.reshape(dims)


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


def make_tensor(array: np.ndarray, data_type: int, into: Optional[TensorProto] = None) -> TensorProto:
    """A raw-data TensorProto (little-endian) of ``array`` (or a ScaledChannels) cast to
    ``data_type``, built in ``into`` when given (its name is kept; data, dims and external-data
    fields are replaced)."""
    t = into if into is not None else TensorProto()
    t.raw_data = _header(array, data_type, t).tobytes()
    return t


def _recipe_bytes(recipe: ScaledChannels):
    """The recipe's bytes, block by block (never the whole folded weight)."""
    for block in recipe.blocks():
        yield memoryview(block.reshape(-1).view(np.uint8))


class MemoryPayloads(dict):
    """Deferred payloads as numpy arrays (about 1x the folded weights in RAM), or recipes."""

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

    def location(self, name: str) -> Location:
        return Location.RECIPE if isinstance(dict.get(self, name), ScaledChannels) else Location.IN_MEMORY

    def arrays(self, name: str):
        """The payload as arrays in order: a recipe block by block (never whole), else the array."""
        value = super().__getitem__(name)
        if isinstance(value, ScaledChannels):
            yield from value.blocks()
        else:
            yield value

    def source(self, name: str) -> Source:
        value = super().__getitem__(name)
        if isinstance(value, ScaledChannels):
            return Source(length=value.nbytes, blocks=_recipe_bytes(value))
        return Source(data=memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8)))

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.clear()


class SpillPayloads:
    """Deferred payloads appended to a temp file that is unlinked as soon as it is created (read
    back through its descriptor, so nothing is ever left behind, even after SIGKILL), for models in
    the external-data regime: peak memory is then one tensor, not the model. Recipes are kept as
    they are (they hold no folded bytes)."""

    ALIGN = 4096

    def __init__(self, folder: Optional[str] = None):
        self.recipes = {}  # name -> ScaledChannels, never spilled: they hold no folded bytes
        with held():  # a signal between the two would leave the file behind
            fd, path = tempfile.mkstemp(prefix=".foldkit-spill-", dir=folder)
            os.unlink(path)  # the descriptor keeps it alive; no path, no leftovers
        self.fd = fd
        self.end = 0
        self.index = {}  # name -> (offset, length, dtype, shape)
        self._map = None

    def __contains__(self, name) -> bool:
        return name in self.index or name in self.recipes

    def location(self, name: str) -> Location:
        return Location.RECIPE if name in self.recipes else Location.SPILLED

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

    def source(self, name: str) -> Source:
        if name in self.recipes:
            recipe = self.recipes[name]
            return Source(length=recipe.nbytes, blocks=_recipe_bytes(recipe))
        offset, length, _, _ = self.index[name]
        return Source(fd=self.fd, offset=offset, length=length)

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


class TensorStore:
    """The one owner of a fold's tensor bytes: the mapped source files, the store folded tensors
    wait in (memory or a spill file), and the policy that decides where a new tensor goes.

    ``defer``: a new top-level tensor of ``DEFER_BYTES`` or more waits in the payload store (its
    header marked external at wire.MEMORY) until written; with ``spill_dir`` the store is an
    unlinked temp file there, when ``model``'s top-level tensors total ``spill_above`` bytes or
    more (0: always; sizes from the headers, nothing is read). Otherwise tensors go straight into
    the protobuf."""

    DEFER_BYTES = 1 << 20

    def __init__(self, base_dir: Optional[str] = None, defer: bool = False, spill_dir: Optional[str] = None,
                 spill_above: int = 0, model: Optional[ModelProto] = None):
        if spill_dir is not None and spill_above > 0 and model is not None:
            if sum(payload_nbytes(t) for t in model.graph.initializer) < spill_above:
                spill_dir = None
        self.base_dir = base_dir
        self.defer = defer or spill_dir is not None
        self.files = OpenFiles()
        self.payloads = SpillPayloads(spill_dir) if spill_dir is not None else MemoryPayloads()

    # -- reading -------------------------------------------------------------------------------
    def array(self, t: TensorProto) -> np.ndarray:
        """The values of ``t``, wherever they are (read-only when mapped or held as a payload)."""
        return to_array(t, self)

    def blocks(self, t: TensorProto):
        """The values of ``t`` as arrays in order: a recipe block by block (never whole), anything
        else as one array. The pages read leave the resident set once the last block is out."""
        try:
            if is_memory(t) and t.name in self.payloads:
                yield from self.payloads.arrays(t.name)
            else:
                yield self.array(t)
        finally:
            self.release()

    def location(self, name: str) -> Location:
        """Where a tensor marked external at wire.MEMORY waits (in memory, recipe or spilled)."""
        return self.payloads.location(name) if name in self.payloads else Location.IN_MEMORY

    def __contains__(self, name: str) -> bool:
        """A payload is held here for ``name``."""
        return name in self.payloads

    # -- writing -------------------------------------------------------------------------------
    def place(self, array, data_type: int, into: TensorProto, top_level: bool) -> None:
        """Make ``into`` hold ``array`` (already rounded): in the protobuf, or as a payload when the
        policy defers it (a top-level tensor of DEFER_BYTES or more). The source pages read to
        compute it then leave the resident set."""
        size = array.nbytes if isinstance(array, ScaledChannels) else np.asarray(array).nbytes
        if self.defer and top_level and size >= self.DEFER_BYTES:
            self.payloads.put(into.name, memory_tensor(array, data_type, into))
        else:
            self.payloads.discard(into.name)
            make_tensor(array, data_type, into=into)
        self.release()

    def source(self, t: TensorProto) -> Source:
        """The deferred payload of ``t`` for the writer (foldkit.wire.write_model). A recipe is
        computed block by block as it is written; then the pages it read leave the resident set."""
        src = self.payloads.source(t.name)
        if src.blocks is not None:
            src.blocks = self._released_after(src.blocks)
        return src

    def _released_after(self, blocks):
        yield from blocks
        self.release()

    def materialize(self, model: ModelProto) -> None:
        """Put the deferred payloads into their tensors (for code that needs a self-contained proto)."""
        for t in model.graph.initializer:
            if is_memory(t) and t.name in self.payloads:
                make_tensor(self.payloads.pop(t.name), t.data_type, into=t)

    # -- memory --------------------------------------------------------------------------------
    def release(self) -> None:
        """Pages read since the last call leave the resident set (they stay in the page cache)."""
        self.payloads.release()
        if self.files.maps:
            self.files.release()

    def discard(self, name: str) -> None:
        self.payloads.discard(name)
