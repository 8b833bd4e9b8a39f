"""Input checks shared by every object of ``asmk_index``: clear errors before any state changes."""
from __future__ import annotations

import numpy as np


def check_descriptors(descriptors, *, dim: int | None = None, name: str = "descriptors",
                      allow_empty: bool = False, check_finite: bool = True) -> np.ndarray:
    """Return ``descriptors`` as a C-contiguous float32 (N, D) array, or raise ``ValueError``.

    Rejects a wrong number of dimensions, a dimensionality other than ``dim``, non-numeric data,
    NaN and infinite values (naming how many rows and the first one), and an empty array unless
    ``allow_empty``. ``check_finite=False`` skips the NaN/inf check (for a caller that checks
    finiteness itself, e.g. in a compiled pass, and raises :func:`raise_non_finite`'s error).
    """
    array = np.asarray(descriptors)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                     or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric (N, D) array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name}: dimensionality mismatch: got {array.shape[1]}-d descriptors, "
                         f"expected {dim}-d")
    if array.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: no descriptors (an empty (0, {array.shape[1]}) array)")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not check_finite or (array.size and np.isfinite(array.min())
                            and np.isfinite(array.max())):
        return array  # fast path: min/max propagate NaN and inf without an (N, D) mask
    raise_non_finite(array, name)
    return array


def raise_non_finite(array: np.ndarray, name: str = "descriptors") -> None:
    """Raise the ValueError naming how many rows of ``array`` (N, D) hold NaN or inf and the first
    one; return quietly when every value is finite."""
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name}: {bad.size} row(s) contain NaN or inf values "
                         f"(first bad row: {bad[0]})")


def check_ids(ids, *, length: int | None = None, name: str = "image_ids") -> np.ndarray:
    """Return ``ids`` as a 1-D int64 array (of ``length`` items if given), or raise ``ValueError``."""
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of integer ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name}: ids must be integers, got dtype {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name}: expected {length} ids (one per descriptor), got {array.shape[0]}")
    return array.astype(np.int64, copy=False)
