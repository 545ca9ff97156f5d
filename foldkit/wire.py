"""Large models without copying their weights: protobuf wire-format scanning and splice writing.

Protobuf has to hold a whole ModelProto in memory, and (de)serializing a 1.5 GB message costs
seconds and 2-3x its size in RAM. Folding touches a few hundred small tensors. So:

- :func:`lazy_load` memory-maps the file and walks the wire format of ModelProto -> GraphProto ->
  TensorProto. Every top-level initializer whose ``raw_data`` is at least ``threshold`` bytes is
  parsed *without* its payload and marked as external data pointing into the file itself
  (location = the file's name, offset, length). Only the small skeleton is parsed by protobuf.
  Passes then read exactly the tensors they fold (numpy_helper reads external data on demand).
- :func:`write_model` writes a model whose tensors may be external (into the source file, or true
  external data files) either as one self-contained file or with its tensors in one external data
  file. The small parts are serialized by protobuf itself, in field-number order, and tensor
  payloads are streamed from their source in chunks, so the output is byte-identical to
  ``SerializeToString(deterministic=True)`` of the fully loaded model, with memory bounded by the
  skeleton plus one chunk.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, TensorProto

CHUNK = 64 << 20
GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
SPARSE_INITIALIZER_FIELD = 15  # GraphProto.sparse_initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
TWO_GB = 2 ** 31 - 1


class WireError(ValueError):
    pass


def _varint(buf, pos: int):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        fstart = pos
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            _, pos = _varint(buf, pos)
            vstart = vend = pos
        elif wt == 1:
            vstart, pos = pos, pos + 8
            vend = pos
        elif wt == 2:
            n, pos = _varint(buf, pos)
            vstart, pos = pos, pos + n
            vend = pos
        elif wt == 5:
            vstart, pos = pos, pos + 4
            vend = pos
        else:
            raise WireError(f"unsupported wire type {wt}")
        if pos > end:
            raise WireError("field runs past its message")
        yield field, wt, fstart, vstart, vend


def lazy_load(path: str, threshold: int = 1024) -> Optional[ModelProto]:
    """The model at ``path`` with large top-level initializers left in the file (see module doc).

    Returns None when the file's layout is not the plain one (e.g. the graph field split in
    several pieces); the caller then loads it the ordinary way.
    """
    name = os.path.basename(path)
    try:
        name.encode("utf-8")  # the name becomes a tensor's location string: protobuf needs UTF-8
    except UnicodeEncodeError:
        return None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        top = list(_fields(mm, 0, size))
        graphs = [fl for fl in top if fl[0] == GRAPH_FIELD and fl[1] == 2]
        if len(graphs) != 1:
            return None
        _, _, gstart, gv0, gv1 = graphs[0]
        graph_parts = []
        lazified = 0
        for field, wt, fstart, v0, v1 in _fields(mm, gv0, gv1):
            if field == INITIALIZER_FIELD and wt == 2:
                raws = [x for x in _fields(mm, v0, v1) if x[0] == RAW_DATA_FIELD and x[1] == 2]
                if len(raws) == 1 and raws[0][4] - raws[0][3] >= threshold:
                    _, _, r0, rv0, rv1 = raws[0]
                    t = TensorProto()
                    t.ParseFromString(bytes(mm[v0:r0]) + bytes(mm[rv1:v1]))
                    if t.data_location == TensorProto.EXTERNAL:
                        return None
                    t.data_location = TensorProto.EXTERNAL
                    t.external_data.add(key="location", value=name)
                    t.external_data.add(key="offset", value=str(rv0))
                    t.external_data.add(key="length", value=str(rv1 - rv0))
                    body = t.SerializeToString()
                    graph_parts.append(bytes(mm[fstart:v0 - len(_encode_varint(v1 - v0))]) + _encode_varint(len(body)) + body)
                    lazified += 1
                    continue
            graph_parts.append(bytes(mm[fstart:v1]))
        if not lazified:
            return None
        model = ModelProto()
        model.ParseFromString(bytes(mm[0:gstart]) + bytes(mm[gv1:size]))
        model.graph.ParseFromString(b"".join(graph_parts))
        return model
    except (WireError, DecodeError, ValueError, RuntimeError):  # not the plain layout, or corrupt:
        return None  # the caller's ordinary parse says which, as one sentence
    finally:
        mm.close()


# --- writing ------------------------------------------------------------------------------------

MEMORY = "foldkit:memory"  # location of a payload held as a numpy array beside the skeleton


def _ext_info(t: TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def is_memory(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(e.key == "location" and e.value == MEMORY for e in t.external_data)


def payload_nbytes(t: TensorProto) -> int:
    """Payload size from the header alone: reading ``raw_data`` would copy it (upb returns new bytes)."""
    if t.data_location == TensorProto.EXTERNAL:
        return external_size(t)
    n = dims_nbytes(t)
    return t.ByteSize() if n is None else n


_PACKED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}  # two to a byte


def dims_nbytes(t: TensorProto) -> Optional[int]:
    """Bytes the tensor's dims and data type call for (4-bit types packed two to a byte), or None
    for a type without a fixed size."""
    from onnx.helper import tensor_dtype_to_np_dtype

    numel = 1
    for d in t.dims:
        numel *= d
    bits = _PACKED_BITS.get(t.data_type)
    if bits:
        return (numel * bits + 7) // 8
    try:
        return numel * tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def external_size(t: TensorProto) -> int:
    """The bytes an external tensor's payload takes in its file: its ``length``, or, where none is
    given (the field is optional), what its dims and data type take from ``offset`` on; never the
    rest of the file, which may hold more after it."""
    length = _ext_info(t).get("length")
    if length not in (None, ""):
        return int(length)
    return dims_nbytes(t) or 0


def _strip_external(t: TensorProto) -> TensorProto:
    """A copy of ``t``'s header: no data, no external-data fields."""
    h = copy_without(t, RAW_DATA_FIELD)  # never copy the payload
    h.ClearField("external_data")
    h.ClearField("data_location")
    h.ClearField("raw_data")
    return h


def _assign(target, fd, value) -> None:
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
        getattr(target, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def copy_without(msg, *field_numbers: int):
    """A copy of ``msg`` without the given fields (so a graph's payloads are not copied along)."""
    out = type(msg)()
    for fd, value in msg.ListFields():
        if fd.number not in field_numbers:
            _assign(out, fd, value)
    return out


def checker_view(model: ModelProto) -> ModelProto:
    """The model as onnx.checker should see it: every top-level initializer of 1 KiB or more (or on
    disk) becomes a graph input of the same type and shape. Structure, types and shapes are checked
    as before; payloads (validated by foldkit.io.check_tensors) are neither read nor copied.

    Top-level sparse initializers become typed graph inputs too (their dense type and dims): onnx's
    shape inference does not type a sparse initializer, so its full check fails on a valid model
    whose weights are sparse (which ONNX Runtime runs); and their payloads are not copied. Their
    layout is checked by foldkit.tensors.sparse_to_array when a fold reads them."""
    view = copy_without(model, GRAPH_FIELD)
    view.graph.CopyFrom(without_payloads(model.graph, lambda t: payload_nbytes(t) >= 1024))
    return view


def without_payloads(graph: GraphProto, big) -> GraphProto:
    """A copy of ``graph`` in which every sparse initializer, and every initializer on disk or for
    which ``big(tensor)`` holds, is a graph input of its type and dims instead (no payload copied)."""
    from onnx import helper

    out = copy_without(graph, INITIALIZER_FIELD, SPARSE_INITIALIZER_FIELD)
    inputs = {i.name for i in out.input}
    for t in graph.initializer:
        if not (t.data_location == TensorProto.EXTERNAL or big(t)):
            out.initializer.add().CopyFrom(t)
        elif t.name not in inputs:
            out.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for sp in graph.sparse_initializer:
        if sp.values.name not in inputs:
            out.input.append(helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    return out


def _split_serialize(msg, field_number: int):
    """Serialize ``msg`` (deterministic) into the bytes of fields before and after ``field_number``,
    leaving that field out."""
    before = type(msg)()
    after = type(msg)()
    for fd, value in msg.ListFields():
        if fd.number == field_number:
            continue
        target = before if fd.number < field_number else after
        _assign(target, fd, value)
    return before.SerializeToString(deterministic=True), after.SerializeToString(deterministic=True)


class Source:
    """Where the writer copies one tensor payload from: ``data`` (bytes in memory), ``file`` or
    ``fd`` (with ``offset`` and ``length``), or ``blocks`` (an iterable of buffers, ``length``
    bytes in all, computed as they are written). foldkit.tensors.TensorStore hands these out for
    the payloads it holds."""

    def __init__(self, data=None, file: str = None, offset: int = 0, length: int = 0, fd: Optional[int] = None,
                 blocks=None):
        self.data, self.file, self.offset, self.fd, self.blocks = data, file, offset, fd, blocks
        self.length = length if data is None else (data.nbytes if isinstance(data, memoryview) else len(data))

    def copy_to(self, out) -> None:
        if self.data is not None:
            out.write(self.data)
            return
        if self.blocks is not None:
            done = 0
            for block in self.blocks:
                out.write(block)
                done += block.nbytes
            if done != self.length:
                raise WireError(f"a computed payload gave {done} bytes, not {self.length}")
            return
        if self.fd is not None:
            done = 0
            while done < self.length:
                chunk = os.pread(self.fd, min(CHUNK, self.length - done), self.offset + done)
                if not chunk:
                    raise WireError("spill file ended early")
                out.write(chunk)
                done += len(chunk)
            return
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise WireError(f"external data file {self.file} ended early")
                out.write(chunk)
                left -= len(chunk)


def _tensor_source(t: TensorProto, base_dir: str, tensors=None) -> Source:
    info = _ext_info(t)
    if info.get("location") == MEMORY:  # a deferred payload: its store says where it is
        return tensors.source(t)
    return Source(file=os.path.join(base_dir, info["location"]), offset=int(info.get("offset", 0) or 0),
                  length=external_size(t))


def needs_external(model: ModelProto) -> bool:
    """True when the model, with its external tensors embedded, would exceed protobuf's 2 GB limit.

    Payload sizes are added up from the tensors (no serialization); 16 MiB of margin covers the
    rest of a model whose structure is that large."""
    total = 0
    for t in model.graph.initializer:
        total += payload_nbytes(t)
        if total >= TWO_GB:
            return True
    if total < TWO_GB - (16 << 20):
        return False
    return copy_without(model, GRAPH_FIELD).ByteSize() + model.graph.ByteSize() >= TWO_GB


def write_model(model: ModelProto, out, base_dir: str, data_out=None, data_location=None,
                align: int = 4096, tensors=None) -> None:
    """Write ``model`` to the binary file ``out``.

    Top-level external initializers (read from ``base_dir``) are embedded, unless ``data_out`` (an
    open binary file whose name, relative to the model, is ``data_location``) is given: then every
    top-level initializer of at least 1 KiB goes there, each at an ``align``-aligned offset.
    ``data_location`` may be a callable, called once the data file is complete, that returns the
    name (so the name can depend on the content). ``tensors`` (foldkit.tensors.TensorStore)
    gives the payloads of tensors marked external at MEMORY.
    """
    inits = list(model.graph.initializer)
    head, tail = _split_serialize(model.graph, INITIALIZER_FIELD)
    parts = []  # (header bytes or a header TensorProto to name, payload source or None, trailer bytes)
    data_pos = 0
    for t in inits:
        ext = t.data_location == TensorProto.EXTERNAL
        if data_out is not None:
            src = _tensor_source(t, base_dir, tensors) if ext else (
                Source(data=t.raw_data) if t.HasField("raw_data") and payload_nbytes(t) >= 1024 else None)
            if src is not None:
                pad = (-data_pos) % align
                data_out.write(b"\0" * pad)
                data_pos += pad
                src.copy_to(data_out)
                h = _strip_external(t)
                h.data_location = TensorProto.EXTERNAL
                h.external_data.add(key="location", value="")
                h.external_data.add(key="offset", value=str(data_pos))
                h.external_data.add(key="length", value=str(src.length))
                data_pos += src.length
                parts.append((h, None, b""))
                continue
            parts.append((t.SerializeToString(deterministic=True), None, b""))
            continue
        if not ext and (not t.HasField("raw_data") or payload_nbytes(t) < CHUNK // 64):
            parts.append((t.SerializeToString(deterministic=True), None, b""))
            continue
        src = _tensor_source(t, base_dir, tensors) if ext else Source(data=t.raw_data)
        h = _strip_external(t)
        before, after = _split_serialize(h, RAW_DATA_FIELD)
        raw_key = _encode_varint((RAW_DATA_FIELD << 3) | 2) + _encode_varint(src.length)
        parts.append((before + raw_key, src, after))
    if data_out is not None:
        location = data_location() if callable(data_location) else data_location
        for k, (hdr, src, trl) in enumerate(parts):
            if isinstance(hdr, TensorProto):
                hdr.external_data[0].value = location
                parts[k] = (hdr.SerializeToString(deterministic=True), src, trl)
    graph_len = len(head) + len(tail)
    init_key = _encode_varint((INITIALIZER_FIELD << 3) | 2)
    for hdr, src, trl in parts:
        n = len(hdr) + (src.length if src else 0) + len(trl)
        graph_len += len(init_key) + len(_encode_varint(n)) + n
    mbefore, mafter = _split_serialize(model, GRAPH_FIELD)
    out.write(mbefore)
    out.write(_encode_varint((GRAPH_FIELD << 3) | 2) + _encode_varint(graph_len))
    out.write(head)
    for hdr, src, trl in parts:
        n = len(hdr) + (src.length if src else 0) + len(trl)
        out.write(init_key + _encode_varint(n) + hdr)
        if src is not None:
            src.copy_to(out)
        out.write(trl)
    out.write(tail)
    out.write(mafter)
