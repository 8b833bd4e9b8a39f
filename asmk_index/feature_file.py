"""HDF5 feature files shared by local (MDA) and global (GLAM) descriptors.

Layout of one file (all row arrays share one row axis; image ``i`` owns rows
``offsets[i]:offsets[i + 1]``)::

    descriptors        (N, dim) float32   chunked, resizable
    fields/<name>      (N,)               one per extra per-row array (attention, head, x, y...)
    names/             (n,) strings       image names, in the order they were added
    offsets            (n+1,) int64       offsets[-1] = rows owned by finished images
    failures/names/    (f,) strings       images that could not be processed (an append-only log;
    failures/reasons/  (f,) strings       a later record of the same name replaces the reason)
    attrs: format_version, kind ('local'|'global'), dim, fields (JSON {name: dtype}),
           attributes (JSON: model configuration etc.)

A list of strings is stored as UTF-8 bytes ``<group>/utf8`` (uint8) and ``<group>/offsets``
((m+1,) int64, string ``i`` is ``utf8[offsets[i]:offsets[i+1]]``), not as HDF5 variable-length
strings: those live in a global heap that a killed writer can leave inconsistent (reopening then
fails with "bad heap index"), while plain numeric arrays are simply cut back.

Crash safety: :meth:`FeatureFileWriter.add` writes the rows first, then appends the name, then
extends ``offsets`` (the commit point), and flushes. Rows beyond ``offsets[-1]`` or names beyond
``len(offsets) - 1`` belong to an image whose write was cut off; readers ignore them and a
resuming writer discards them, so a finished image is never lost and a half one never appears.
(HDF5 itself can be damaged by a crash in the middle of a metadata write; such a file is reported
as corrupt, naming the file.) A new file is created under a temporary name and renamed into place,
so a file at ``path`` always has the full structure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from .persistence import _jsonable, atomic_file
from .validation import check_descriptors

FEATURE_FORMAT_VERSION = 1
FEATURE_KINDS = ("local", "global")
DESCRIPTORS = "descriptors"
_CHUNK_BYTES = 1 << 19          # target size of one chunk of the row datasets
_OFFSET_CHUNK = 1024            # entries per chunk of the offsets datasets
_TEXT_CHUNK = 1 << 16           # bytes per chunk of the UTF-8 text datasets


def _canonical_fields(fields: Mapping | None) -> dict[str, str]:
    """``{name: dtype}`` -> ``{name: numpy dtype string}``, validated."""
    result = {}
    for name, dtype in dict(fields or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or name == DESCRIPTORS:
            raise ValueError(f"invalid field name {name!r}: use an identifier other than "
                             f"{DESCRIPTORS!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as error:
            raise ValueError(f"field {name!r}: not a numpy dtype: {dtype!r}") from error
        if dtype.kind not in "biuf":
            raise ValueError(f"field {name!r}: dtype {dtype} is not numeric")
        result[name] = dtype.str
    return result


def _canonical_attributes(attributes: Mapping | None, path) -> str:
    """JSON text of ``attributes`` with sorted keys (so two equal dicts compare equal)."""
    try:
        return json.dumps(_jsonable(dict(attributes or {})), sort_keys=True)
    except TypeError as error:
        raise ValueError(f"{path}: attributes must be JSON-serialisable ({error})") from error


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise
    except OSError as error:
        if not path.exists():
            raise FileNotFoundError(f"no feature file at {path}") from error
        if "lock" in str(error).lower():
            raise OSError(f"{path}: cannot open the feature file, it is locked (open for writing "
                          f"elsewhere?) ({error})") from error
        raise ValueError(f"{path}: corrupt or not an HDF5 feature file ({error})") from error


def _read_header(handle: h5py.File, path: Path) -> tuple[str, int, dict[str, str], str]:
    """``(kind, dim, fields, attributes JSON)`` of an open feature file, or ``ValueError``."""
    try:
        version = int(handle.attrs["format_version"])
        kind = str(handle.attrs["kind"])
        dim = int(handle.attrs["dim"])
        fields = json.loads(handle.attrs["fields"])
        attributes = json.dumps(json.loads(handle.attrs["attributes"]), sort_keys=True)
        for name in (DESCRIPTORS, "offsets") + _STRING_COLUMNS:
            if name not in handle:
                raise KeyError(name)
        for name in fields:
            if f"fields/{name}" not in handle:
                raise KeyError(f"fields/{name}")
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: corrupt feature file or not a feature file (missing or bad "
                         f"{error})") from error
    if version != FEATURE_FORMAT_VERSION:
        raise ValueError(f"{path}: feature file format version mismatch: stored {version}, this "
                         f"code reads {FEATURE_FORMAT_VERSION}; extract the features again")
    return kind, dim, fields, attributes


# ---------------------------------------------------------------------- string columns
_STRING_COLUMNS = ("names/utf8", "names/offsets", "failures/names/utf8",
                   "failures/names/offsets", "failures/reasons/utf8", "failures/reasons/offsets")


def _create_strings(parent: h5py.Group, name: str) -> None:
    group = parent.create_group(name)
    _resizable(group, "utf8", (0,), np.uint8, _TEXT_CHUNK)
    _resizable(group, "offsets", (1,), np.int64, _OFFSET_CHUNK)


def _string_count(group: h5py.Group) -> int:
    """Strings committed in ``group`` (its offsets are the commit point)."""
    return group["offsets"].shape[0] - 1


def _append_strings(group: h5py.Group, strings: list[str]) -> None:
    encoded = [string.encode("utf-8") for string in strings]
    offsets = group["offsets"]
    end = int(offsets[offsets.shape[0] - 1])
    data = np.frombuffer(b"".join(encoded), np.uint8)
    text = group["utf8"]
    text.resize(end + data.size, axis=0)
    if data.size:
        text[end:] = data
    _append(offsets, end + np.cumsum([len(item) for item in encoded], dtype=np.int64))


def _truncate_strings(group: h5py.Group, count: int) -> None:
    """Keep the first ``count`` strings; drop bytes of a cut-off append."""
    offsets = group["offsets"]
    if offsets.shape[0] != count + 1:
        offsets.resize(count + 1, axis=0)
    end = int(offsets[count])
    if group["utf8"].shape[0] != end:
        group["utf8"].resize(end, axis=0)


def _read_strings(group: h5py.Group, count: int, path: Path) -> list[str]:
    offsets = np.asarray(group["offsets"][:count + 1], np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > group["utf8"].shape[0]:
        raise ValueError(f"{path}: corrupt feature file: bad string offsets in {group.name}")
    data = group["utf8"][:offsets[-1]].tobytes()
    try:
        return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: corrupt feature file: bad UTF-8 in {group.name}") from error


def _committed_counts(handle: h5py.File, path: Path) -> tuple[int, int, int]:
    """``(images, rows, failure records)`` of finished writes (see the module docstring)."""
    offsets = handle["offsets"]
    images = offsets.shape[0] - 1
    if images < 0 or _string_count(handle["names"]) < images:
        raise ValueError(f"{path}: corrupt feature file: {_string_count(handle['names'])} names "
                         f"for {offsets.shape[0]} offsets")
    rows = int(offsets[images])
    if rows > handle[DESCRIPTORS].shape[0]:
        raise ValueError(f"{path}: corrupt feature file: offsets end at row {rows} but only "
                         f"{handle[DESCRIPTORS].shape[0]} descriptor rows are stored")
    failures = _string_count(handle["failures/names"])
    if _string_count(handle["failures/reasons"]) < failures:
        raise ValueError(f"{path}: corrupt feature file: failure names without reasons")
    return images, rows, failures


def _latest_failures(names: list[str], reasons: list[str]) -> dict[str, str]:
    """``{name: reason}`` from the failure log, the last record of a name winning."""
    failures: dict[str, str] = {}
    for name, reason in zip(names, reasons):
        failures[name] = reason
    return failures


def _resizable(group: h5py.Group, name: str, shape: tuple, dtype, chunk_rows: int) -> None:
    group.create_dataset(name, shape=shape, maxshape=(None,) + tuple(shape[1:]), dtype=dtype,
                         chunks=(chunk_rows,) + tuple(shape[1:]))


def _append(dataset: h5py.Dataset, values) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    if len(values):
        dataset[start:] = values


class FeatureFileWriter:
    """Append images' descriptors (and per-row fields) to a feature file, creating or resuming it.

    ``kind`` is 'local' or 'global'; ``fields`` maps extra per-row arrays to dtypes (e.g.
    ``{"attention": "float32", "x": "float32"}``); ``attributes`` is a JSON-able dict stored with
    the file (model configuration). Reopening an existing file resumes it (``done`` holds the names
    already stored); a file made with another kind/dim/fields/attributes raises ``ValueError``.
    ``flush_every`` adds are written to disk at once (1: after every add).
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, dim: int,
                 fields: Mapping[str, str | np.dtype] | None = None,
                 attributes: Mapping | None = None, flush_every: int = 1):
        self.path = Path(path)
        if kind not in FEATURE_KINDS:
            raise ValueError(f"{self.path}: kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"{self.path}: dim must be a positive integer, got {dim!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.kind, self.dim = kind, int(dim)
        self.fields = _canonical_fields(fields)
        self._attributes = _canonical_attributes(attributes, self.path)
        self.attributes = json.loads(self._attributes)
        self.flush_every = int(flush_every)
        self._pending = 0
        if not self.path.exists():
            self._create()
        self._handle = _open_h5(self.path, "a")
        try:
            self._resume()
        except BaseException:
            self._handle.close()
            raise

    def _create(self) -> None:
        """Write an empty file with the full structure under a temporary name, then rename it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as temporary:
            with h5py.File(temporary, "w") as handle:
                handle.attrs["format_version"] = FEATURE_FORMAT_VERSION
                handle.attrs["kind"] = self.kind
                handle.attrs["dim"] = self.dim
                handle.attrs["fields"] = json.dumps(self.fields, sort_keys=True)
                handle.attrs["attributes"] = self._attributes
                row_chunk = max(1, _CHUNK_BYTES // (4 * self.dim))
                _resizable(handle, DESCRIPTORS, (0, self.dim), np.float32, row_chunk)
                fields = handle.create_group("fields")
                for name, dtype in self.fields.items():
                    _resizable(fields, name, (0,), np.dtype(dtype), row_chunk)
                _resizable(handle, "offsets", (1,), np.int64, _OFFSET_CHUNK)
                _create_strings(handle, "names")
                failures = handle.create_group("failures")
                _create_strings(failures, "names")
                _create_strings(failures, "reasons")

    def _resume(self) -> None:
        """Check the header matches, drop a cut-off partial write, load the names stored."""
        handle = self._handle
        kind, dim, fields, attributes = _read_header(handle, self.path)
        mismatches = []
        if kind != self.kind:
            mismatches.append(f"kind {kind!r} != {self.kind!r}")
        if dim != self.dim:
            mismatches.append(f"dim {dim} != {self.dim}")
        if fields != self.fields:
            mismatches.append(f"fields {fields} != {self.fields}")
        if attributes != self._attributes:
            mismatches.append(f"attributes {attributes} != {self._attributes}")
        if mismatches:
            raise ValueError(f"{self.path}: feature file mismatch (stored vs requested: "
                             f"{'; '.join(mismatches)}); use another file or the same settings")
        images, rows, failures = _committed_counts(handle, self.path)
        for dataset in [handle[DESCRIPTORS]] + [handle[f"fields/{n}"] for n in self.fields]:
            if dataset.shape[0] != rows:
                dataset.resize(rows, axis=0)
        _truncate_strings(handle["names"], images)
        _truncate_strings(handle["failures/names"], failures)
        _truncate_strings(handle["failures/reasons"], failures)
        handle.flush()
        self._rows = rows
        self.done: set[str] = set(_read_strings(handle["names"], images, self.path))
        self._failures = _latest_failures(
            _read_strings(handle["failures/names"], failures, self.path),
            _read_strings(handle["failures/reasons"], failures, self.path))

    @property
    def failed(self) -> set[str]:
        """Names recorded with :meth:`add_failure` (and not stored successfully since)."""
        return set(self._failures) - self.done

    def _check_open(self) -> None:
        if self._handle is None or not self._handle.id.valid:
            raise ValueError(f"{self.path}: the feature file writer is closed")

    def add(self, name: str, descriptors: np.ndarray, **fields: np.ndarray) -> None:
        """Store one image: ``descriptors`` (n, dim) float32 (n may be 0) and each field (n,)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: image name must be a non-empty string, got {name!r}")
        if name in self.done:
            raise ValueError(f"{self.path}: image {name!r} is already stored")
        descriptors = check_descriptors(descriptors, dim=self.dim, allow_empty=True,
                                        name=f"{name}: descriptors")
        rows = descriptors.shape[0]
        if set(fields) != set(self.fields):
            raise ValueError(f"{self.path}: image {name!r}: fields given {sorted(fields)}, "
                             f"the file "
                             f"stores {sorted(self.fields)}")
        values = {}
        for field, dtype in self.fields.items():
            value = np.asarray(fields[field])
            if value.shape != (rows,):
                raise ValueError(f"{self.path}: image {name!r}: field {field!r} has shape "
                                 f"{value.shape}, expected ({rows},)")
            if value.size and not np.isfinite(value.astype(np.float64)).all():
                raise ValueError(f"{self.path}: image {name!r}: field {field!r} has NaN/inf")
            values[field] = value.astype(np.dtype(dtype))
        handle = self._handle
        end = self._rows + rows
        # 1. rows (a crash here leaves rows beyond offsets[-1]: discarded on resume)
        for dataset, value in [(handle[DESCRIPTORS], descriptors)] + [
                (handle[f"fields/{f}"], v) for f, v in values.items()]:
            dataset.resize(end, axis=0)
            if rows:
                dataset[self._rows:end] = value
        # 2. name, 3. offset: the commit point
        _append_strings(handle["names"], [name])
        _append(handle["offsets"], np.array([end], dtype=np.int64))
        self._rows = end
        self.done.add(name)
        self._count_write()

    def add_failure(self, name: str, reason: str) -> None:
        """Record that image ``name`` could not be processed (a later record replaces the reason;
        a later successful :meth:`add` removes it from :attr:`FeatureFile.failures`)."""
        self._check_open()
        if name in self.done:
            raise ValueError(f"{self.path}: image {name!r} is already stored; it cannot also fail")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: image name must be a non-empty string, got {name!r}")
        reason = str(reason)
        _append_strings(self._handle["failures/reasons"], [reason])   # the name commits
        _append_strings(self._handle["failures/names"], [name])
        self._failures[name] = reason
        self._count_write()

    def _count_write(self) -> None:
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write everything added so far to disk."""
        self._check_open()
        self._handle.flush()
        self._pending = 0

    def close(self) -> None:
        if self._handle is not None and self._handle.id.valid:
            self._handle.flush()
            self._handle.close()
        self._handle = None

    def __len__(self) -> int:
        return len(self.done)

    def __enter__(self) -> "FeatureFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FeatureFile:
    """Read a feature file; only finished images are visible (see the module docstring).

    ``names`` (n images), ``offsets`` (n+1,) int64 (image ``i`` owns rows
    ``offsets[i]:offsets[i+1]``), ``kind``, ``dim``, ``attributes``, ``field_names``,
    ``failures`` [(name, reason)].
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no feature file at {self.path}")
        self._handle = _open_h5(self.path, "r")
        try:
            self.kind, self.dim, fields, attributes = _read_header(self._handle, self.path)
            self.attributes: dict = json.loads(attributes)
            self.field_names: list[str] = list(fields)
            self.field_dtypes = {name: np.dtype(dtype) for name, dtype in fields.items()}
            images, self._rows, failures = _committed_counts(self._handle, self.path)
            self.names: list[str] = _read_strings(self._handle["names"], images, self.path)
            self.offsets: np.ndarray = np.asarray(self._handle["offsets"][:images + 1], np.int64)
            if np.any(np.diff(self.offsets) < 0) or self.offsets[0] != 0:
                raise ValueError(f"{self.path}: corrupt feature file: offsets are not increasing")
            failures = _latest_failures(
                _read_strings(self._handle["failures/names"], failures, self.path),
                _read_strings(self._handle["failures/reasons"], failures, self.path))
        except BaseException:
            self._handle.close()
            raise
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            self._handle.close()
            raise ValueError(f"{self.path}: corrupt feature file: duplicate image names")
        self.failures: list[tuple[str, str]] = [
            (name, reason) for name, reason in failures.items() if name not in self._index]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_descriptors(self) -> int:
        return self._rows

    def _check_open(self) -> None:
        if not self._handle.id.valid:
            raise ValueError(f"{self.path}: the feature file is closed")

    def index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no image named {name!r}") from None

    def get(self, name_or_index: str | int) -> dict[str, np.ndarray]:
        """``{"descriptors": (n, dim) float32, <field>: (n,)}`` of one image, by name or index."""
        self._check_open()
        if isinstance(name_or_index, str):
            index = self.index_of(name_or_index)
        elif isinstance(name_or_index, (int, np.integer)):
            index = int(name_or_index)
            if not -len(self) <= index < len(self):
                raise IndexError(f"{self.path}: image index {index} out of range "
                                 f"(the file has {len(self)} images)")
            index %= len(self)
        else:
            raise TypeError(f"expected an image name or index, got {type(name_or_index).__name__}")
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        result = {DESCRIPTORS: np.asarray(self._handle[DESCRIPTORS][start:end], np.float32)}
        for field in self.field_names:
            result[field] = self._handle[f"fields/{field}"][start:end]
        return result

    def all_descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(descriptors (N, dim) float32, image index (N,) int64)`` of every finished image."""
        self._check_open()
        descriptors = np.asarray(self._handle[DESCRIPTORS][:self._rows], np.float32)
        counts = np.diff(self.offsets)
        return descriptors, np.repeat(np.arange(len(self), dtype=np.int64), counts)

    def field(self, field_name: str) -> np.ndarray:
        """Per-row field ``field_name`` over every finished image, (N,)."""
        self._check_open()
        if field_name not in self.field_dtypes:
            raise KeyError(f"{self.path}: no field {field_name!r} (fields: {self.field_names})")
        return self._handle[f"fields/{field_name}"][:self._rows]

    def close(self) -> None:
        if self._handle.id.valid:
            self._handle.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
