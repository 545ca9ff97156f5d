"""Writing models safely: every output checked against every input before any work (the output
guard), atomic files (temp file in the destination folder, rename; fsync first when durable),
deterministic serialization, and the external-data pair committed like a transaction. Nothing
ever overwrites an input unless asked."""


import atexit
import collections
import os
import shutil
import stat
import tempfile
from typing import Callable, Optional

import onnx
from onnx import ModelProto, TensorProto

from .errors import InputError
from . import wire
from .graph import iter_graphs

from .reading import model_files, same_file
from .signals import held

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

# temp files and folders made and not yet committed or discarded: an exception that came before
# their owner could clean them up (or a process that ends anyway) leaves none behind, see _discard_live
_LIVE: dict = {}  # path -> True for a folder


def _discard_live() -> None:
    """Remove every temp file and folder still live: registered at exit (Python's, and foldkit's
    quick exit, which runs the same handlers), when whatever made them can no longer use them."""
    for path, folder in list(_LIVE.items()):
        if folder:
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
        _LIVE.pop(path, None)


atexit.register(_discard_live)
if hasattr(os, "register_at_fork"):  # a forked child (a user's data loader) never removes its parent's files
    os.register_at_fork(after_in_child=_LIVE.clear)


def _temp_folder(folder: str) -> str:
    """A private folder for files that must keep their final names until committed (recorded live)."""
    with held():
        path = tempfile.mkdtemp(dir=folder, prefix=".foldkit-")
        _LIVE[path] = True
    return path


def _remove_temp_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _LIVE.pop(path, None)


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
        self.tmp = self.file = None
        fd = None
        try:
            with held():  # made and recorded in one step: a signal never leaves a file nobody knows of
                if self.through:
                    fd, self.tmp = tempfile.mkstemp(prefix=".foldkit-", suffix=".tmp")
                elif tmp_dir is None:
                    fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(self.path), suffix=".tmp")
                else:
                    self.tmp = os.path.join(tmp_dir, os.path.basename(self.path))
                    fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                _LIVE[self.tmp] = False
                self.file = os.fdopen(fd, "wb")
        except BaseException:  # the held signal's exception included: the caller never gets this object
            if self.file is None and fd is not None:
                os.close(fd)
            if self.tmp is not None and self.tmp in _LIVE:
                self.discard()
            raise

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
        with held():
            os.rename(self.tmp, new_tmp)
            _LIVE.pop(self.tmp, None)
            _LIVE[new_tmp] = False
            self.tmp = new_tmp
        self.path = os.path.join(os.path.dirname(self.path), name)

    def commit(self) -> None:
        self.finish()
        if self.through:
            with open(self.tmp, "rb") as src, open(self.path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            with held():
                os.unlink(self.tmp)
                _LIVE.pop(self.tmp, None)
                COMMITTED.append(self.path)
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        with held():  # renamed and recorded as written in one step: an interrupt then names it
            os.replace(self.tmp, self.path)
            _LIVE.pop(self.tmp, None)
            COMMITTED.append(self.path)

    def discard(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
        _LIVE.pop(self.tmp, None)


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
        self.size = 0  # bytes written

    def write(self, data) -> None:
        self.size += memoryview(data).nbytes
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
    A model with no tensor of 1 KiB or more gets no data file (nothing would name it). Returns the
    data file's path, if one was written.
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
    old_data = []  # the data files the old output named: stale once an external-data pair replaces it
    if external:
        if input_path is not None and not (in_place and same_file(path, input_path)):
            keep = {_identity(f) for f in model_files(input_path)}
        old_data = [f for f in model_files(path)[1:] if os.path.isfile(f)] if os.path.isfile(path) else []
    files = []
    orphan = None  # a data file committed for a model that then was not
    hashing = None
    # a model and its data file are written under their final names in a private folder, so that
    # ``before_commit`` can load the pair as it will be; a single file needs no folder
    tmp_dir = _temp_folder(folder) if external and os.path.isdir(folder) else None
    out = data = None
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
        if data and hashing.size == 0:  # no tensor of 1 KiB or more: no data file (nothing would name it)
            data.discard()
            files.remove(data)
            data = None
        for f in files:
            f.finish()
        if before_commit is not None:
            before_commit(out.tmp)
        _step("written")
        if data:
            data_existed = os.path.exists(data.path)  # then with these very bytes: its name is their hash
            with held():  # committed and known as an orphan-to-be in one step
                data.commit()  # a new name (or the same bytes under the same name): nothing old changes
                if not data_existed:
                    orphan = data.path
            _step("data committed")
        with held():  # the switch: from here on the new pair is the model, and its data file is no orphan
            out.commit()
            orphan = None
        _step("model committed")
        if external:  # the data files the old model named are stale now (the new one names its own, or none)
            for f in old_data:
                ident = _identity(f)
                if ident not in keep and not (data and same_file(f, data.path)) and \
                        os.path.dirname(os.path.realpath(f)) == os.path.realpath(folder):
                    try:
                        os.unlink(f)
                    except OSError:
                        pass
            _step("old data removed")
        return data.path if data else None
    except BaseException:
        for f in (out, data):  # whichever were made (an empty data file is discarded already)
            if f is not None:
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
            _remove_temp_folder(tmp_dir)
