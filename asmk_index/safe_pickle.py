"""Restricted unpickling of data files that are pickles by the field's convention.

The revisitop ground truth (``gnd_*.pkl``) and the ``asmk`` package's codebook state are pickles.
A plain ``pickle.load`` runs whatever callables the file names (``os.system``, ``eval``...), so a
downloaded file could run code. :func:`load_restricted` reads them with an unpickler whose
``find_class`` allows only plain containers and numpy arrays / dtypes / scalars; any other global
raises :class:`UnsafePickleError` naming the file and the refused global, before anything runs.
"""
from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:                                        # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:                         # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]
import _codecs

# Harmless builtins: plain value types a pickle may construct (protocols 0-2 name them as globals).
_BUILTINS = ("set", "frozenset", "complex", "bytearray", "slice", "range")
# numpy's array reconstruction: ndarray/dtype constructors and the module helpers its
# ``__reduce__`` names (module path differs between numpy 1.x and 2.x, both may be in a file).
_NUMPY_HELPERS = {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name in _BUILTINS:
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)       # Python 2 spelling
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("_codecs", "encode")] = _codecs.encode                     # bytes in protocol 2
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for package in ("numpy.core", "numpy._core"):
        for name, helper in _NUMPY_HELPERS.items():
            allowed[(f"{package}.multiarray", name)] = helper
        if hasattr(_numeric, "_frombuffer"):                            # protocol 5 arrays
            allowed[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class UnsafePickleError(ValueError):
    """A pickle asked for a global that :func:`load_restricted` does not allow."""

    def __init__(self, source: str, module: str, name: str):
        self.source, self.module, self.name = source, module, name
        super().__init__(
            f"{source}: refused to unpickle the global {module}.{name}: only plain containers "
            f"(dict, list, tuple, set, str, numbers) and numpy arrays are allowed in this file, "
            f"and unpickling anything else could run code; if the file is yours and trusted, "
            f"convert it to plain data")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` (``source`` names the file
    in errors). Persistent ids are refused as well."""

    def __init__(self, file: BinaryIO, *, source: str, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(self.source, module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.source}: persistent ids are not allowed ({pid!r})")


def loads_restricted(data: bytes, *, source: str = "pickle data", encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` allowing only plain containers and numpy arrays (see module docstring)."""
    return RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()


def load_restricted(path: str | os.PathLike, *, encoding: str = "ASCII") -> Any:
    """Unpickle the file at ``path`` allowing only plain containers and numpy arrays.

    Raises FileNotFoundError for a missing file, :class:`UnsafePickleError` (a ValueError) for a
    refused global, ValueError naming the file for a damaged or non-pickle file. ``encoding``:
    how Python 2 ``str`` objects are decoded (``"latin1"`` for Python 2 pickles with numpy arrays).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pickle file at {path}")
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, source=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                TypeError, ValueError, UnicodeDecodeError, MemoryError) as error:
            raise ValueError(f"{path}: not a readable pickle file ({type(error).__name__}: "
                             f"{error})") from error


__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "UnsafePickleError", "load_restricted",
           "loads_restricted"]
