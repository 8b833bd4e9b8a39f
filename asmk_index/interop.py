"""Interoperability with the ``asmk`` package (HOW, FIRe): read its codebook state."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .codebook import Codebook
from .safe_pickle import UnsafePickleError, load_restricted

ASMK_CODEBOOK_TYPE = "Codebook"


def codebook_from_asmk_state(state) -> Codebook:
    """Our :class:`Codebook` from an ``asmk`` ``Codebook.state_dict()`` or its pickle file path.

    The state is ``{"type": "Codebook", "params": {"size": K}, "state": {"centroids": (K, D)}}``.
    A file is read with a restricted unpickler (plain containers and numpy arrays only, see
    :mod:`asmk_index.safe_pickle`): a pickle that asks for anything else raises
    :class:`~asmk_index.safe_pickle.UnsafePickleError` and runs nothing.
    Raises ValueError (FileNotFoundError for a missing file) naming what is wrong.
    """
    source = "asmk codebook state"
    if isinstance(state, (str, os.PathLike)):
        path = Path(state)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no asmk codebook file at {path}")
        try:
            state = load_restricted(path)
        except UnsafePickleError:
            raise
        except ValueError as error:
            raise ValueError(f"{path}: not a readable asmk codebook pickle ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a dict state_dict, got {type(state).__name__}")
    if state.get("type") != ASMK_CODEBOOK_TYPE:
        raise ValueError(f"{source}: wrong type {state.get('type')!r}, expected an asmk "
                         f"{ASMK_CODEBOOK_TYPE!r} state_dict (is this an IVF or kernel state?)")
    centroids = (state.get("state") or {}).get("centroids")
    if centroids is None:
        raise ValueError(f"{source}: the codebook state has no centroids (untrained codebook)")
    centroids = np.asarray(centroids)
    size = (state.get("params") or {}).get("size")
    if isinstance(size, str) and size[-1:] in ("k", "M"):
        size = int(size[:-1]) * {"k": 1024, "M": 1024 ** 2}[size[-1]]
    if size is not None and centroids.ndim == 2 and int(size) != centroids.shape[0]:
        raise ValueError(f"{source}: params say {size} words but there are "
                         f"{centroids.shape[0]} centroids")
    try:
        return Codebook.from_centroids(centroids)
    except ValueError as error:
        raise ValueError(f"{source}: invalid centroids ({error})") from error
