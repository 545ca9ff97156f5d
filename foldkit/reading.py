"""Reading models safely: every way a file can be unusable is an InputError with one sentence
(missing, a directory, empty, not protobuf, a protobuf that is not a model, dangling references,
external data that is missing, truncated or outside the model's folder, tensors whose stated sizes
disagree with their data, strings that are not UTF-8), checked before anything is used."""


import os
from typing import Optional

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from .errors import InputError
from . import wire
from .graph import iter_graphs, subgraphs


def check_path(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")


def parse_model(data: bytes, source: str = "<bytes>") -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(f"{source}: not an ONNX model (protobuf parse failed: {str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})") from None
    if not model.HasField("graph") or model.ir_version < 1 or not model.opset_import and model.ir_version >= 3:
        raise InputError(f"{source}: not an ONNX model (no graph, IR version or opset import)")
    return model


def external_tensors(model: ModelProto):
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                yield t
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == TensorProto.EXTERNAL:
                    yield a.t


_expected_nbytes = wire.dims_nbytes  # bytes the dims and type call for (one definition, in wire)


def _file_facts(root: str, loc: str):
    """(resolved path, where it lies: "outside", "missing" or "ok", size in bytes) of the external
    data file ``loc`` under ``root``."""
    full = os.path.realpath(os.path.join(root, loc))
    if os.path.commonpath([root, full]) != root:
        return full, "outside", 0
    if not os.path.isfile(full):
        return full, "missing", 0
    return full, "ok", os.path.getsize(full)


def _ext_problem(t: TensorProto, root: str, files: Optional[dict] = None) -> Optional[str]:
    """Why the external tensor ``t`` cannot be read safely, or None. Every size claim (offset,
    length, dims) is checked against the file before anything is read. ``files``: a dict that
    remembers each file's facts across the calls of one check (the same file is resolved once)."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc or os.path.isabs(loc) or "\0" in loc:
        return f"tensor '{t.name}' has external data location {loc!r}, which is not a relative path"
    facts = files.get(loc) if files is not None else None
    if facts is None:
        facts = _file_facts(root, loc)
        if files is not None:
            files[loc] = facts
    full, where, size = facts
    if where == "outside":
        return f"tensor '{t.name}' points to external data '{loc}' outside the model's folder"
    if where == "missing":
        return f"external data file '{loc}' for tensor '{t.name}' is missing"
    try:
        offset = int(info.get("offset", 0) or 0)
        length = None if info.get("length") in (None, "") else int(info["length"])
    except ValueError:
        return f"tensor '{t.name}' has a non-numeric external data offset or length"
    if offset < 0 or (length is not None and length < 0):
        return f"tensor '{t.name}' has a negative external data offset or length"
    if any(d < 0 for d in t.dims):
        return f"tensor '{t.name}' has a negative dimension {list(t.dims)}"
    if t.data_type == TensorProto.STRING:
        return f"tensor '{t.name}' holds strings, which cannot be stored as external data"
    expected = _expected_nbytes(t)
    if expected is None:
        return f"tensor '{t.name}' has an undefined data type ({t.data_type})"
    if length is not None and length != expected:
        return f"tensor '{t.name}' has dims {list(t.dims)} ({expected} bytes) but external data length {length}"
    if offset + expected > size:
        return f"external data file '{loc}' is shorter than tensor '{t.name}' needs ({expected} bytes at offset {offset})"
    return None


def external_data_problems(model: ModelProto, base_dir: str) -> list:
    """(tensor name, sentence) for every external tensor that is not safely readable: a location
    outside ``base_dir`` (path traversal), an absolute path, a missing or too short file, an
    offset, length or dims that disagree with the file."""
    return [(name, sentence) for name, _, sentence in external_data_findings(model, base_dir)]


def external_data_findings(model: ModelProto, base_dir: str) -> list:
    """(subject, tensor names, sentence) for the external data that is not safely readable: a
    problem with the file itself (missing, not a relative path, outside the model's folder) is one
    entry for the file, naming every tensor that needs it; a problem with a tensor is its own entry."""
    root = os.path.realpath(base_dir)
    by_file = {}
    out = []
    files = {}
    for t in external_tensors(model):
        problem = _ext_problem(t, root, files)
        if not problem:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        full = os.path.realpath(os.path.join(root, loc)) if loc and "\0" not in loc and not os.path.isabs(loc) else None
        file_level = full is None or os.path.commonpath([root, full]) != root or not os.path.isfile(full)
        if not file_level:
            out.append((t.name, [t.name], problem))
        elif loc in by_file:
            by_file[loc][1].append(t.name)
        else:
            by_file[loc] = (loc, [t.name], problem)
            out.append(by_file[loc])
    return [(subject, names, sentence if len(names) == 1 else
             f"{sentence} (and {len(names) - 1} more tensor(s) in that file)") for subject, names, sentence in out]


def check_external_data(model: ModelProto, base_dir: str, source: str) -> None:
    problems = external_data_problems(model, base_dir)
    if problems:
        raise InputError(f"{source}: {problems[0][1]}")


def check_references(model: ModelProto, source: str = "model") -> None:
    """Every node input must be a graph input, an initializer, an earlier node output or an outer-scope value."""

    def visit(graph, outer: frozenset):
        known = set(outer)
        known.update(i.name for i in graph.input)
        known.update(t.name for t in graph.initializer)
        known.update(t.values.name for t in graph.sparse_initializer)
        known.add("")
        produced_later = set()
        for node in graph.node:
            produced_later.update(node.output)
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub, frozenset(known | produced_later))
            for name in node.input:
                if name not in known:
                    what = "is computed later (the graph is not topologically sorted)" if name in produced_later else "does not exist"
                    raise InputError(f"{source}: node '{node.name or node.op_type}' reads '{name}', which {what}")
            known.update(node.output)
        for out in graph.output:
            if out.name not in known:
                raise InputError(f"{source}: graph output '{out.name}' is not computed by the graph")

    visit(model.graph, frozenset())


def read_model(path: str) -> ModelProto:
    """Parse a model file without touching its external data."""
    path = os.fspath(path)
    check_path(path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_model(data, path)


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _tensor_problem(t: TensorProto) -> Optional[str]:
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension {list(t.dims)}"
    if t.data_type == TensorProto.UNDEFINED or t.data_type not in TensorProto.DataType.values():
        return f"has an undefined data type ({t.data_type})"
    if t.data_location == TensorProto.EXTERNAL:
        return None  # checked against its file by external_data_problems
    numel = 1
    for d in t.dims:
        numel *= d
    is_string = t.data_type == TensorProto.STRING
    if t.HasField("raw_data") and not is_string:
        expected = _expected_nbytes(t)
        if expected is None:
            return f"has an unknown data type {t.data_type}"
        if len(t.raw_data) != expected:
            return f"has dims {list(t.dims)} ({numel} values) but {len(t.raw_data)} bytes of data"
        return None
    if is_string and t.HasField("raw_data"):
        return "holds strings in raw_data, which ONNX does not allow"
    fields = [f for f in _TYPED_FIELDS if len(getattr(t, f))]
    if len(fields) > 1:
        return f"holds data in several fields ({', '.join(fields)})"
    if fields:
        try:
            expected_field = onnx.helper.tensor_dtype_to_field(t.data_type)
        except (KeyError, ValueError, TypeError):
            return f"has an unknown data type {t.data_type}"
        if fields[0] != expected_field:  # the reader would find no data, or misread it
            return f"of type {TensorProto.DataType.Name(t.data_type)} holds its data in {fields[0]}, not {expected_field}"
    held = len(getattr(t, fields[0])) if fields else 0
    if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        held //= 2
    if held != numel and not (held == 0 and numel == 0):
        return f"has dims {list(t.dims)} ({numel} values) but holds {held}"
    return None


def check_tensors(model: ModelProto, source: str = "model") -> None:
    """Every initializer and Constant tensor must hold exactly as many values as its dims say."""
    for g in iter_graphs(model.graph):
        tensors = [(t.name, t) for t in g.initializer]
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append((n.output[0] if n.output else n.name, a.t))
        for name, t in tensors:
            problem = _tensor_problem(t)
            if problem:
                raise InputError(f"{source}: tensor '{name}' {problem}")


def check_nodes(model: ModelProto, source: str = "model") -> None:
    """Nodes foldkit rewrites must have the outputs their operator requires."""
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and (not n.output or not n.output[0]):
                raise InputError(f"{source}: BatchNormalization node '{n.name}' has no output Y, which ONNX requires")


def _bad_string(msg) -> Optional[str]:
    """Where in ``msg`` the first string field that is not valid UTF-8 is (protobuf then hands it
    over as bytes, and nothing can write it back), as a field path, or None. Tensor payloads are
    never read; the path is built only for the bad field."""
    if type(msg) is TensorProto:  # its header only: ListFields would copy raw_data
        for f in ("name", "doc_string"):
            if type(getattr(msg, f)) is bytes:
                return f".{f}"
        for k, e in enumerate(msg.external_data):
            if type(e.key) is bytes or type(e.value) is bytes:
                return f".external_data[{k}]"
        return None
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            if fd.is_repeated:
                for k, sub in enumerate(value):
                    bad = _bad_string(sub)
                    if bad:
                        return f".{fd.name}[{k}]{bad}"
            else:
                bad = _bad_string(value)
                if bad:
                    return f".{fd.name}{bad}"
        elif fd.type == fd.TYPE_STRING and (bytes in map(type, value) if fd.is_repeated else type(value) is bytes):
            return f".{fd.name}"
    return None


def check_strings(model: ModelProto, source: str = "model") -> None:
    """ONNX strings (names, doc strings, metadata) are UTF-8; a model with one that is not is
    corrupt, and could not be written back."""
    bad = _bad_string(model)
    if bad:
        raise InputError(f"{source}: model{bad} is not valid UTF-8 (ONNX strings are UTF-8; the file is corrupt)")


def validate(model: ModelProto, source: str = "model") -> None:
    check_strings(model, source)
    check_tensors(model, source)
    check_nodes(model, source)
    check_references(model, source)


LAZY_THRESHOLD = 1024  # initializers of at least this many bytes stay in the file when loading lazily


def load_model(path: str, load_external: bool = True, lazy: bool = False) -> ModelProto:
    """Load and validate a model.

    ``lazy``: large initializers stay on disk (see foldkit.wire) and so does external data; tensors
    are read when a pass needs them. Otherwise external data is checked, then read into memory.
    """
    path = os.fspath(path)
    model = None
    if lazy:
        check_path(path)
        try:
            model = wire.lazy_load(path, LAZY_THRESHOLD)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        load_external = False
    if model is None:
        model = read_model(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    check_external_data(model, base_dir, path)
    if load_external and any(True for _ in external_tensors(model)):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, base_dir)
        except Exception as e:  # defensive: check_external_data should have caught it
            raise InputError(f"{path}: cannot read external data ({e})") from None
    validate(model, path)
    return model


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.realpath(a) == os.path.realpath(b)


def model_files(path: str, model: Optional[ModelProto] = None) -> list:
    """``path`` and every external-data file the model at ``path`` names (for the output guard)."""
    files = [os.fspath(path)]
    try:
        if model is None:
            model = wire.lazy_load(path, LAZY_THRESHOLD) or read_model(path)
    except (InputError, OSError, ValueError):
        return files
    folder = os.path.dirname(os.path.abspath(path))
    seen = set()
    for t in external_tensors(model):
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if loc in seen:
            continue
        seen.add(loc)
        if loc and "\0" not in loc and not os.path.isabs(loc):
            full = os.path.join(folder, loc)
            if full not in files and not same_file(full, path):
                files.append(full)
    return files
