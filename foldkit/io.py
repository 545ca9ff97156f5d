"""Loading and saving models safely.

- Loading turns every way a file can be unusable into an InputError with one sentence: missing,
  a directory, empty, not protobuf, a protobuf that is not a model, dangling references, external
  data that is missing, truncated or outside the model's folder.
- Saving is atomic (temp file in the destination folder, rename; fsync first when durable), deterministic
  (deterministic protobuf serialization) and never overwrites the input unless asked.
"""

from __future__ import annotations

import collections
import os
import shutil
import stat
import tempfile
from typing import Callable, Optional

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


def _expected_nbytes(t: TensorProto) -> Optional[int]:
    """Bytes the tensor's dims and type call for, or None for a type without a fixed size."""
    numel = 1
    for d in t.dims:
        numel *= d
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}.get(t.data_type)
    if bits:
        return (numel * bits + 7) // 8
    try:
        return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _ext_problem(t: TensorProto, root: str) -> Optional[str]:
    """Why the external tensor ``t`` cannot be read safely, or None. Every size claim (offset,
    length, dims) is checked against the file before anything is read."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc or os.path.isabs(loc) or "\0" in loc:
        return f"tensor '{t.name}' has external data location {loc!r}, which is not a relative path"
    full = os.path.realpath(os.path.join(root, loc))
    if os.path.commonpath([root, full]) != root:
        return f"tensor '{t.name}' points to external data '{loc}' outside the model's folder"
    if not os.path.isfile(full):
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
    if offset + expected > os.path.getsize(full):
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
    for t in external_tensors(model):
        problem = _ext_problem(t, root)
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
    for t in external_tensors(model):
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if loc and "\0" not in loc and not os.path.isabs(loc):
            full = os.path.join(folder, loc)
            if full not in files and not same_file(full, path):
                files.append(full)
    return files


def _identity(path: str):
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))


def guard_outputs(outputs: dict, inputs=(), allow_same: dict = None) -> None:
    """Refuse, before any work, every output that cannot be written safely (exit 2):

    - an output that is the same file as an input (decided by device and inode, so hard links,
      symbolic links and other spellings of a path are caught) or as another output;
    - an output that is a directory, or an existing file that is neither a regular file nor a
      character device or FIFO (those are written through, never replaced: ``-o /dev/null``);
    - an output whose folder does not exist or whose name is longer than the file system allows.

    ``outputs``: {option label: path or None}; ``inputs``: paths that must survive unchanged;
    ``allow_same``: {label: input path} pairs that may coincide (``--in-place``).
    """
    allow_same = allow_same or {}
    seen = {}
    ins = [(p, _identity(p)) for p in inputs if p]
    for label, path in outputs.items():
        if not path:
            continue
        path = os.fspath(path)
        where = f"{path} ({label})"
        if os.path.isdir(path):
            raise InputError(f"{where}: is a directory; give a file name")
        if os.path.exists(path) and not (os.path.isfile(path) or _write_through(path)):
            raise InputError(f"{where}: exists and is not a regular file; refusing to replace it")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"{where}: folder '{folder}' does not exist")
        if len(os.fsencode(os.path.basename(path))) > NAME_MAX:
            raise InputError(f"{where}: file name is longer than {NAME_MAX} bytes")
        ident = _identity(path)
        for other, oid in ins:
            if ident == oid and not (label in allow_same and same_file(allow_same[label], other)):
                raise InputError(f"{where}: is the input file {other}; refusing to overwrite an input"
                                 + (" (use --in-place)" if label == "-o" else ""))
        if ident in seen:
            raise InputError(f"{where}: is also the {seen[ident]} output; give each output its own file")
        seen[ident] = label


NAME_MAX = 255


def _temp_prefix(path: str) -> str:
    """'.NAME.' for temp files beside ``path``, shortened so that the temp name fits NAME_MAX."""
    base = os.fsencode(os.path.basename(path))[:180]
    return "." + base.decode("utf-8", "ignore") + "."


def _write_through(path: str) -> bool:
    """An existing character device or FIFO (``/dev/null``, a pipe): written into, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def file_state(paths) -> list:
    """(path, size, mtime in ns, inode) of each file: what :func:`check_unchanged` compares."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((p, None, None, None))
    return out


def check_unchanged(state: list) -> None:
    """Raise InputError when a file of ``state`` (:func:`file_state`) changed since: another
    process rewrote, truncated or replaced an input while foldkit read it, so what was read (and
    verified against) may not be what the file holds."""
    for path, *before in state:
        now = file_state([path])[0][1:]
        if list(now) != list(before):
            raise InputError(f"{path}: changed while foldkit read it (another process rewrote, truncated or "
                             "replaced it); nothing was written")


def atomic_write(path: str, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    On any exception (KeyboardInterrupt and SystemExit from SIGINT/SIGTERM included) the temp file is
    removed and ``path`` is left as it was.
    """
    f = _AtomicFile(path, durable)
    try:
        f.file.write(data)
        f.commit()
    except BaseException:
        f.discard()
        raise


def copy_atomic(src: str, dst: str, durable: bool = False) -> None:
    """``dst`` becomes a byte-for-byte copy of ``src``, atomically (streamed: any size)."""
    f = _AtomicFile(dst, durable)
    try:
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, f.file, 1 << 20)
        f.commit()
    except BaseException:
        f.discard()
        raise


def serialize(model: ModelProto) -> bytes:
    try:
        return model.SerializeToString(deterministic=True)
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        raise InputError(f"the model is too large for a single file ({e}); use external data") from None


# the paths this process committed last (bounded: a long-running caller does not accumulate them),
# so that an interrupted command can say what it had already written
COMMITTED: collections.deque = collections.deque(maxlen=64)

# test hook: called with a step name between the steps of a commit (tests stop the process there)
_after_step: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


class _AtomicFile:
    """A temp file that becomes ``path`` on commit() and disappears otherwise: beside ``path``, or
    under its own name in ``tmp_dir`` (a private folder beside it, for files that must keep their
    final names until committed, such as a model and the data file it names).

    A symbolic link is followed (its target is replaced, the link kept). A character device or FIFO
    is written through: the content goes to a temp file first and is copied in on commit."""

    def __init__(self, path: str, durable: bool = False, tmp_dir: Optional[str] = None):
        path = os.fspath(path)
        if os.path.islink(path):
            path = os.path.realpath(path)
        self.path = path
        self.durable = durable
        self.through = _write_through(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise InputError(f"{self.path}: folder '{folder}' does not exist")
        if self.through:
            fd, self.tmp = tempfile.mkstemp(prefix=".foldkit-", suffix=".tmp")
        elif tmp_dir is None:
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(self.path), suffix=".tmp")
        else:
            self.tmp = os.path.join(tmp_dir, os.path.basename(self.path))
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file = os.fdopen(fd, "wb")

    def finish(self) -> None:
        """Complete the temp file (flushed, fsynced when durable, closed); commit() renames it."""
        if self.file.closed:
            return
        self.file.flush()
        if self.durable:  # the rename is atomic for other processes either way; fsync survives power loss
            os.fsync(self.file.fileno())
        self.file.close()

    def rename(self, name: str) -> None:
        """Give the finished temp file (in its private folder) and its destination a new base name."""
        new_tmp = os.path.join(os.path.dirname(self.tmp), name)
        os.rename(self.tmp, new_tmp)
        self.tmp = new_tmp
        self.path = os.path.join(os.path.dirname(self.path), name)

    def commit(self) -> None:
        self.finish()
        if self.through:
            with open(self.tmp, "rb") as src, open(self.path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.unlink(self.tmp)
            COMMITTED.append(self.path)
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.path)
        COMMITTED.append(self.path)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class _HashingWriter:
    """A binary file that also hashes what is written to it (the data file's content name).

    The hash of a block runs on a worker thread while the block is written (hashlib and file
    writes both release the GIL), so naming the file by its content costs little more than the
    write itself; each write returns only when both are done, so a caller may reuse its buffer."""

    MIN_PARALLEL = 1 << 16

    def __init__(self, file):
        import hashlib

        self.file = file
        self.hash = hashlib.sha256()
        self._pool = None

    def write(self, data) -> None:
        if memoryview(data).nbytes < self.MIN_PARALLEL:
            self.hash.update(data)
            self.file.write(data)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldkit-hash")
        pending = self._pool.submit(self.hash.update, data)
        try:
            self.file.write(data)
        finally:
            pending.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def hexdigest(self) -> str:
        self.close()
        return self.hash.hexdigest()


def data_file_name(model_name: str, digest: str) -> str:
    """``NAME.<16 hex of the content's SHA-256>.data``: a name no older model refers to unless it
    holds the same bytes, valid UTF-8 (it is stored in the model) and within NAME_MAX."""
    stem = os.fsencode(model_name).decode("utf-8", "backslashreplace")
    while len(stem.encode("utf-8")) > NAME_MAX - 22:
        stem = stem[:-1]
    return f"{stem}.{digest[:16]}.data"


def save_model(model: ModelProto, path: str, input_path: Optional[str] = None, in_place: bool = False,
               base_dir: Optional[str] = None, external: Optional[bool] = None,
               tensors=None, durable: bool = False,
               before_commit: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Write ``model`` atomically. Tensors left on disk by a lazy load (or in external data files,
    relative to ``base_dir``) are streamed, never loaded whole, and so are the folded tensors that
    ``tensors`` (the fold's foldkit.tensors.TensorStore) holds.

    ``before_commit(path)`` runs on the complete written files (``path``: the model's temp file,
    its data file beside it) before they take their final names; if it raises, nothing is written.

    ``external``: True puts every top-level initializer of 1 KiB or more into a data file beside
    the model, named ``NAME.<hash>.data`` after its content (see :func:`data_file_name`); None
    (default) does so only when the model would exceed protobuf's 2 GB limit. The pair commits as
    a transaction: the data file takes a name no older model refers to (unless it holds the same
    bytes), the model is renamed over the old one last, and only then are the data files the old
    model named removed. A crash at any instant leaves the old pair or the new pair, never a mix.
    Returns the data file's path, if one was written.
    """
    path = os.fspath(path)
    if input_path is not None and os.path.exists(path) and same_file(path, input_path) and not in_place:
        raise InputError(f"{path}: output is the input file; refusing to overwrite it (use --in-place)")
    if external is None:
        external = wire.needs_external(model)
    if external and _write_through(path):
        raise InputError(f"{path}: a model with external data needs a regular file as its output")
    if os.path.islink(path):
        path = os.path.realpath(path)
    nested = [t.name for g in list(iter_graphs(model.graph))[1:] for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    if nested and base_dir is None:
        raise InputError("external data in subgraphs needs the model's folder")
    folder = os.path.dirname(os.path.abspath(path))
    keep = set()  # files the input needs: never removed, even when the old output named them too
    if input_path is not None and not (in_place and same_file(path, input_path)):
        keep = {_identity(f) for f in model_files(input_path)}
    old_data = [f for f in model_files(path)[1:] if os.path.isfile(f)] if os.path.isfile(path) else []
    files = []
    orphan = None  # a data file committed for a model that then was not
    hashing = None
    # a model and its data file are written under their final names in a private folder, so that
    # ``before_commit`` can load the pair as it will be; a single file needs no folder
    tmp_dir = tempfile.mkdtemp(dir=folder, prefix=".foldkit-") if external and os.path.isdir(folder) else None
    try:
        out = _AtomicFile(path, durable, tmp_dir)
        files.append(out)
        data = _AtomicFile(os.path.join(folder, ".pending.data"), durable, tmp_dir) if external else None
        if data:
            files.append(data)
        m = model
        if nested:  # rare: read subgraph external tensors into memory, the writer handles the top level
            m = ModelProto()
            m.CopyFrom(model)
            for g in list(iter_graphs(m.graph))[1:]:
                for t in g.initializer:
                    if t.data_location == TensorProto.EXTERNAL:
                        onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)
                        t.data_location = TensorProto.DEFAULT
                        del t.external_data[:]
        hashing = _HashingWriter(data.file) if data else None

        def data_name() -> str:  # called once every payload is in the data file
            data.finish()
            data.rename(data_file_name(os.path.basename(path), hashing.hexdigest()))
            return os.path.basename(data.path)

        wire.write_model(m, out.file, base_dir or ".", hashing, data_name if data else None, tensors=tensors)
        for f in files:
            f.finish()
        if before_commit is not None:
            before_commit(out.tmp)
        _step("written")
        if data:
            data_existed = os.path.exists(data.path)  # then with these very bytes: its name is their hash
            data.commit()  # a new name (or the same bytes under the same name): nothing old changes
            if not data_existed:
                orphan = data.path
            _step("data committed")
        out.commit()  # the switch: from here on the new pair is the model
        orphan = None
        _step("model committed")
        if data:
            for f in old_data:
                ident = _identity(f)
                if ident not in keep and not same_file(f, data.path) and \
                        os.path.dirname(os.path.realpath(f)) == os.path.realpath(folder):
                    try:
                        os.unlink(f)
                    except OSError:
                        pass
            _step("old data removed")
        return data.path if data else None
    except BaseException:
        for f in files:
            f.discard()
        if orphan is not None:
            try:
                os.unlink(orphan)
                COMMITTED.remove(orphan)
            except (OSError, ValueError):
                pass
        raise
    finally:
        if hashing is not None:
            hashing.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
