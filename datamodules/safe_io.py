"""Reading data files that may come from anywhere: no code runs, and every failure names the file.

Pickles: `pickle.load` calls whatever callable a file names, so a file planted under a data root could run any
code at setup. The CIFAR batches (Py2 cPickle, or Py3 protocol 2 for our fixtures) only need numpy's
array/scalar reconstruction and, from Py3 writers, `_codecs.encode` for bytes. Everything else is
refused before it is looked up. A restricted unpickler protects real copies and test fixtures alike,
where an md5 check would reject every fixture (their bytes differ from the published files).
MATLAB files: scipy's loadmat builds arrays and structs only (MATLAB objects come back as opaque
arrays, v7.3/HDF5 files are refused), so it runs no code; `load_mat` only names the file on failure.
"""
from __future__ import annotations

import _codecs
import pickle
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own array/scalar rebuilders, whatever
_SCALAR = np.int64(0).__reduce__()[0]                # module numpy keeps them in


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as Py3 protocol-2 pickles use it for bytes (latin-1 only: no codec lookup)."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}; a data pickle only uses latin-1")
    return _codecs.encode(text, "latin-1", errors)


# (module, name) -> object; numpy.core is the Py2 / numpy-1 spelling of numpy._core
ALLOWED_GLOBALS = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class DataUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only ALLOWED_GLOBALS; any other global is an UnpicklingError."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a data file may only hold "
                                         "numpy arrays, numbers, strings, lists and dicts") from None


def load_data_pickle(path: str | Path, encoding: str = "latin1"):
    """The object pickled in `path`, loaded without running code; any failure names the file and the fix."""
    try:
        with open(path, "rb") as f:
            return DataUnpickler(f, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError) as err:
        raise ValueError(f"{path}: not a valid data pickle ({err}); replace it with the file from the "
                         "official archive (delete it and pass --data.download true, or unpack the archive "
                         "again)") from err


def load_mat(path: str | Path, keys: tuple[str, ...], **options) -> dict:
    """The variables `keys` of a MATLAB file (scipy.io.loadmat `options`); a broken file or a missing
    variable names the file and the fix."""
    try:
        mat = loadmat(path, **options)
        return {key: mat[key] for key in keys}
    except (MatReadError, ValueError, KeyError, IndexError, TypeError, NotImplementedError, OSError) as err:
        raise ValueError(f"{path}: not a readable MATLAB file with variables {list(keys)} ({err!r}); replace "
                         "it with the file from the official download") from err


def read_rows(path: str | Path, columns: int, skip: int = 0, maxsplit: int = -1) -> list[list[str]]:
    """Whitespace-split fields of every non-blank line after the first `skip` lines (split at most `maxsplit`
    times); a binary file or a line without `columns` fields names the file, the line and the fix."""
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text list ({err}); replace it with the file from the official "
                         "archive") from err
    rows = []
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split(maxsplit=maxsplit)
        if fields and len(fields) != columns:
            raise ValueError(f"{path}, line {number}: {line.strip()[:100]!r} has {len(fields)} field(s), "
                             f"expected {columns}; repair the line or replace the file with the official one")
        if fields:
            rows.append(fields)
    return rows


def int_column(path: str | Path, values: list[str], what: str) -> np.ndarray:
    """`values` (one column of `path`) as int64; a non-integer names the file and the value."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: a {what} that is not an integer ({err}); repair the line or replace the "
                         "file with the official one") from err
