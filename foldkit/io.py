"""Loading and saving models safely: foldkit.reading (every way a file can be unusable is one
sentence, checked before use) and foldkit.writing (the output guard, atomic files, the external-data
pair commit). Every name this module held is re-exported here, so ``from foldkit import io as fio``
keeps working; the test hooks of a commit (``_after_step``) and the list of what was written
(``COMMITTED``) live in foldkit.writing."""

from __future__ import annotations

from .reading import (check_path, parse_model, external_tensors, _expected_nbytes, _ext_problem,
                      external_data_problems, external_data_findings, check_external_data, check_references,
                      read_model, _TYPED_FIELDS, _tensor_problem, check_tensors, check_nodes, _bad_string,
                      check_strings, validate, LAZY_THRESHOLD, load_model, same_file, model_files)
from .writing import (_identity, guard_outputs, NAME_MAX, _temp_prefix, _write_through, file_state,
                      check_unchanged, atomic_write, copy_atomic, serialize, COMMITTED, _step,
                      _AtomicFile, _HashingWriter, data_file_name, save_model)

__all__ = ["check_path", "parse_model", "external_tensors", "_expected_nbytes", "_ext_problem",
           "external_data_problems", "external_data_findings", "check_external_data", "check_references",
           "read_model", "_TYPED_FIELDS", "_tensor_problem", "check_tensors", "check_nodes", "_bad_string",
           "check_strings", "validate", "LAZY_THRESHOLD", "load_model", "same_file", "model_files",
           "_identity", "guard_outputs", "NAME_MAX", "_temp_prefix", "_write_through", "file_state",
           "check_unchanged", "atomic_write", "copy_atomic", "serialize", "COMMITTED", "_step",
           "_AtomicFile", "_HashingWriter", "data_file_name", "save_model"]
