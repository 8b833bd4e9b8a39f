"""HDF5 feature files shared by local (MDA) and global (GLAM) descriptors, checksummed per image.

Layout of one file (format version 2). A *record* is one image as one :meth:`FeatureFileWriter.add`
wrote it; record ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of the row arrays::

    descriptors        (N, dim) float32   chunked, resizable
    fields/<name>      (N,)               one per extra per-row array (attention, head, x, y...)
    images/<name>      (n, *shape)        one per per-image array (a global descriptor, the size...)
    checksums          (n, parts, 16) uint8  BLAKE2b of each record's parts (see below)
    names/             (n,) strings       the record's image name
    offsets            (n+1,) int64       offsets[-1] = rows owned by finished records
    retracted          (r,) int64         records a writer found corrupt (fill value -1)
    failures/names/    (f,) strings       images that could not be processed (an append-only log;
    failures/reasons/  (f,) strings       a later record of the same name replaces the reason)
    failures/checksums (f, 16) uint8      BLAKE2b of each failure's name and reason
    attrs: format_version, kind ('local'|'global'), dim, fields (JSON {name: dtype}),
           image_fields (JSON {name: [dtype, shape]}), attributes (JSON: model configuration etc.),
           header_checksum (BLAKE2b of the attributes before it)

A list of strings is stored as bytes ``<group>/utf8`` (uint8) and ``<group>/offsets``
((m+1,) int64, string ``i`` is ``utf8[offsets[i]:offsets[i+1]]``), not as HDF5 variable-length
strings: those live in a global heap that a killed writer can leave inconsistent (reopening then
fails with "bad heap index"), while plain numeric arrays are simply cut back. Strings are UTF-8
with surrogate escapes, so a file name that is not valid UTF-8 (``os.fsdecode`` of its bytes)
round-trips: its stored bytes are the file system's bytes.

Checksums: part 0 of a record covers its name and its rows (shapes and bytes of the descriptors,
then of the per-row fields in name order); part ``1 + j`` covers its name and its value of the
``j``-th image field (in name order). Readers verify what they return (:meth:`FeatureFile.get` every part, the
bulk reads the parts they read) and raise :class:`CorruptRecordError` naming the file and images.
A resuming writer verifies every record, logs a warning naming the images that fail, retracts
them (appends them to ``retracted``) and leaves them out of ``done``, so the extraction loop
extracts them again: the file is append-only, and the new record of the name supersedes the old
one (an image's record is the last record of its name that is not retracted).

Crash safety: :meth:`FeatureFileWriter.add` writes the rows, the image values and the checksums
first, then appends the name, then extends ``offsets`` (the commit point), and flushes. Data
beyond ``offsets[-1]`` or beyond ``len(offsets) - 1`` records belongs to a write that was cut off;
readers ignore it and a resuming writer discards it, so a finished image is never lost and a half
one never appears. HDF5 itself can be damaged (a crash in the middle of a metadata write, a
flipped byte in its metadata, a cut-off copy): such a file raises :class:`CorruptFeatureFileError`
("corrupt" or "truncated", naming the file), as do damaged header attributes (they carry their own
checksum) and, in a resuming writer, a chunk index whose chunks overlap (writing the images again
could not repair that file). A new file is created under a temporary name and renamed into place,
so a file at ``path`` always has the full structure.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from .persistence import _jsonable, atomic_file
from .validation import check_descriptors

logger = logging.getLogger(__name__)

FEATURE_FORMAT_VERSION = 2      # 2: per-record checksums, image fields, retracted records
FEATURE_KINDS = ("local", "global")
DESCRIPTORS = "descriptors"
RESERVED_NAMES = (DESCRIPTORS, "name", "image_values")   # add()'s own parameters
DIGEST_BYTES = 16               # BLAKE2b digest size of one checksum part
_DIGEST_PERSON = b"feature-file-v2"
_ROWS_PART = "rows"
_CHUNK_BYTES = 1 << 19          # target size of one chunk of the row datasets
_OFFSET_CHUNK = 1024            # entries per chunk of the offsets/checksums/image datasets
_TEXT_CHUNK = 1 << 16           # bytes per chunk of the UTF-8 text datasets
_VERIFY_BLOCK_BYTES = 1 << 26   # rows read at once when verifying many records
_NAMES_IN_MESSAGES = 10         # image names spelled out in one error or warning
# HDF5 1.8 file format: the superblock and object headers carry checksums, so damaged metadata
# is an error from HDF5 (with the oldest format, some damaged headers crash the library). The
# 1.10 format would also checksum chunk indexes, but it marks the file open for writing in its
# superblock, and a file whose writer was killed then no longer opens without h5clear.
_HDF5_LIBVER = ("v108", "v108")
# what h5py raises when HDF5 metadata or chunk indexes are damaged
_H5_ERRORS = (OSError, RuntimeError, KeyError)


class CorruptFeatureFileError(ValueError):
    """The feature file as a whole cannot be read (damaged HDF5 metadata, truncated, missing
    datasets); the message names the file and says what to do."""


class CorruptRecordError(ValueError):
    """Stored records fail their checksum or cannot be read: ``path``, ``names`` (the images),
    ``reasons`` ({name: what failed})."""

    def __init__(self, path: Path, reasons: Mapping[str, str]):
        self.path = Path(path)
        self.reasons = dict(reasons)
        self.names = list(self.reasons)
        shown = "; ".join(f"{name!r}: {reason}" for name, reason in
                          list(self.reasons.items())[:_NAMES_IN_MESSAGES])
        more = len(self.names) - _NAMES_IN_MESSAGES
        super().__init__(
            f"{self.path}: corrupt feature record(s) of {len(self.names)} image(s) ({shown}"
            f"{f'; and {more} more' if more > 0 else ''}); reopening the file with "
            f"FeatureFileWriter (e.g. re-running the extraction) extracts them again")


# ---------------------------------------------------------------------- header
def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_NAMES:
        raise ValueError(f"invalid {what} name {name!r}: use an identifier other than "
                         f"{', '.join(RESERVED_NAMES)}")


def _numeric_dtype(dtype, name: str) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"field {name!r}: not a numpy dtype: {dtype!r}") from error
    if dtype.kind not in "biuf":
        raise ValueError(f"field {name!r}: dtype {dtype} is not numeric")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _canonical_fields(fields: Mapping | None) -> dict[str, str]:
    """``{name: dtype}`` -> ``{name: numpy dtype string}``, validated."""
    result = {}
    for name, dtype in dict(fields or {}).items():
        _check_name(name, "field")
        result[name] = _numeric_dtype(dtype, name).str
    return result


def _canonical_image_fields(image_fields: Mapping | None,
                            fields: Mapping[str, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: dtype | (dtype, shape)}`` -> ``{name: (numpy dtype string, shape)}``, validated."""
    result = {}
    for name, spec in dict(image_fields or {}).items():
        _check_name(name, "image field")
        if name in fields:
            raise ValueError(f"image field {name!r} is also a per-row field: use distinct names")
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            dtype, shape = spec
        else:
            dtype, shape = spec, ()
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"image field {name!r}: shape must be positive integers, got {shape!r}")
        result[name] = (_numeric_dtype(dtype, name).str, tuple(int(s) for s in shape))
    return result


def _canonical_attributes(attributes: Mapping | None, path) -> str:
    """JSON text of ``attributes`` with sorted keys (so two equal dicts compare equal)."""
    try:
        return json.dumps(_jsonable(dict(attributes or {})), sort_keys=True)
    except TypeError as error:
        raise ValueError(f"{path}: attributes must be JSON-serialisable ({error})") from error


_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise
    except OSError as error:
        message = str(error)
        if not path.exists():
            raise FileNotFoundError(f"no feature file at {path}") from error
        truncated = _TRUNCATED.search(message)
        if truncated or "truncated file" in message:
            sizes = (f": {int(truncated.group(1))} of the {int(truncated.group(2))} bytes HDF5 "
                     f"expects" if truncated else "")
            raise CorruptFeatureFileError(
                f"{path}: the feature file is truncated{sizes} (a copy or a write was cut off); "
                f"delete it to extract the features again ({message})") from error
        if "unable to lock file" in message.lower():
            raise OSError(f"{path}: cannot open the feature file, it is locked (open for writing "
                          f"elsewhere?) ({message})") from error
        raise CorruptFeatureFileError(f"{path}: corrupt or not an HDF5 feature file; delete it to "
                                      f"extract the features again ({message})") from error


_REQUIRED = (DESCRIPTORS, "offsets", "checksums", "retracted", "names/utf8", "names/offsets",
             "failures/names/utf8", "failures/names/offsets", "failures/reasons/utf8",
             "failures/reasons/offsets", "failures/checksums")


_HEADER_ATTRIBUTES = ("format_version", "kind", "dim", "fields", "image_fields", "attributes")


def _header_checksum(values: Sequence) -> str:
    """BLAKE2b hex digest of the header attributes' values (in :data:`_HEADER_ATTRIBUTES` order)."""
    text = json.dumps([v.item() if isinstance(v, np.generic) else v for v in values])
    return hashlib.blake2b(text.encode("ascii"), digest_size=DIGEST_BYTES,
                           person=_DIGEST_PERSON).hexdigest()


class _Header:
    """What a feature file's attributes declare, verified against their checksum."""

    def __init__(self, handle: h5py.File, path: Path):
        try:
            stored = {name: handle.attrs[name] for name in _HEADER_ATTRIBUTES
                      if name in handle.attrs}
            checksum = handle.attrs.get("header_checksum")
        except _H5_ERRORS as error:
            raise CorruptFeatureFileError(f"{path}: corrupt feature file: cannot read its header "
                                          f"({type(error).__name__}: {error}); delete it to "
                                          f"extract the features again") from error
        version = stored.get("format_version")
        if checksum is None and version is not None and version != FEATURE_FORMAT_VERSION:
            raise ValueError(f"{path}: feature file format version mismatch: stored {version}, "
                             f"this code reads {FEATURE_FORMAT_VERSION}; extract the features "
                             f"again (delete the file)")
        if checksum is None or len(stored) != len(_HEADER_ATTRIBUTES):
            raise CorruptFeatureFileError(
                f"{path}: corrupt feature file or not a feature file (header attributes missing: "
                f"{sorted(set(_HEADER_ATTRIBUTES + ('header_checksum',)) - set(stored))})")
        if _header_checksum([stored[name] for name in _HEADER_ATTRIBUTES]) != str(checksum):
            raise CorruptFeatureFileError(f"{path}: corrupt feature file: its header fails its "
                                          f"checksum; delete it to extract the features again")
        if version != FEATURE_FORMAT_VERSION:
            raise ValueError(f"{path}: feature file format version mismatch: stored {version}, "
                             f"this code reads {FEATURE_FORMAT_VERSION}; extract the features "
                             f"again (delete the file)")
        self.kind = str(stored["kind"])
        self.dim = int(stored["dim"])
        self.fields: dict[str, str] = json.loads(stored["fields"])
        self.image_fields = {name: (dtype, tuple(shape)) for name, (dtype, shape)
                             in json.loads(stored["image_fields"]).items()}
        self.attributes = json.dumps(json.loads(stored["attributes"]), sort_keys=True)
        self.parts = [_ROWS_PART] + sorted(self.image_fields)
        with _h5_errors(path, "open its datasets"):
            for name in _REQUIRED + tuple(f"fields/{n}" for n in self.fields) + tuple(
                    f"images/{n}" for n in self.image_fields):
                if name not in handle:
                    raise CorruptFeatureFileError(f"{path}: corrupt feature file: dataset {name} "
                                                  f"is missing")
                handle[name].shape                      # opens the object: checks its header


@contextlib.contextmanager
def _h5_errors(path: Path, doing: str) -> Iterator[None]:
    """Turn HDF5's errors (damaged metadata, unreadable chunk indexes) into
    :class:`CorruptFeatureFileError` naming the file and what could not be done."""
    try:
        yield
    except (CorruptFeatureFileError, CorruptRecordError):
        raise
    except _H5_ERRORS as error:
        raise CorruptFeatureFileError(
            f"{path}: corrupt feature file ({_file_size(path)}): HDF5 cannot {doing} "
            f"({type(error).__name__}: {error}); delete it to extract the features again"
        ) from error


# ---------------------------------------------------------------------- string columns
def _create_strings(parent: h5py.Group, name: str) -> None:
    group = parent.create_group(name)
    _resizable(group, "utf8", (0,), np.uint8, _TEXT_CHUNK)
    _resizable(group, "offsets", (1,), np.int64, _OFFSET_CHUNK)


def _string_count(group: h5py.Group) -> int:
    """Strings committed in ``group`` (its offsets are the commit point)."""
    return group["offsets"].shape[0] - 1


def _encode_name(name: str) -> bytes:
    """An image name's stored bytes: UTF-8, surrogate escapes back to their bytes (os.fsencode)."""
    return name.encode("utf-8", "surrogateescape")


def _encode_text(text: str) -> bytes:
    """Stored bytes of a failure name or reason; never fails (a lone surrogate that no file system
    name decodes to is written backslash-escaped)."""
    try:
        return _encode_name(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _append_strings(group: h5py.Group, strings: list[str]) -> None:
    encoded = [_encode_text(string) for string in strings]
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
        raise CorruptFeatureFileError(f"{path}: corrupt feature file: bad string offsets in "
                                      f"{group.name}; delete it to extract the features again")
    data = group["utf8"][:offsets[-1]].tobytes()
    return [data[a:b].decode("utf-8", "surrogateescape") for a, b in zip(offsets[:-1], offsets[1:])]


def _latest_failures(names: list[str], reasons: list[str]) -> dict[str, str]:
    """``{name: reason}`` from the failure log, the last record of a name winning."""
    failures: dict[str, str] = {}
    for name, reason in zip(names, reasons):
        failures[name] = reason
    return failures


def _resizable(group: h5py.Group, name: str, shape: tuple, dtype, chunk_rows: int,
               fillvalue=None) -> None:
    group.create_dataset(name, shape=shape, maxshape=(None,) + tuple(shape[1:]), dtype=dtype,
                         chunks=(chunk_rows,) + tuple(shape[1:]), fillvalue=fillvalue)


def _append(dataset: h5py.Dataset, values) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    if len(values):
        dataset[start:] = values


# ---------------------------------------------------------------------- checksums
def _digest(name: bytes, part: str, arrays: Iterable[np.ndarray]) -> np.ndarray:
    """BLAKE2b (DIGEST_BYTES,) uint8 of a record's ``part``: its name, then each array's shape and
    bytes (arrays in their stored little-endian dtypes)."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_DIGEST_PERSON)
    digest.update(len(name).to_bytes(8, "little"))
    digest.update(name)
    digest.update(part.encode("ascii") + b"\0")
    for array in arrays:
        array = _c_order(array)
        digest.update(np.asarray(array.shape, "<i8").tobytes())
        digest.update(array)
    return np.frombuffer(digest.digest(), np.uint8)


def _c_order(array) -> np.ndarray:
    """``array`` as a C-contiguous array of the same shape (0-d stays 0-d, unlike
    ``np.ascontiguousarray``)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _chunk_extents(item) -> list[tuple[int, int]]:
    """``(byte offset, size)`` of every stored chunk of a chunked dataset (none for groups)."""
    extents: list[tuple[int, int]] = []
    if isinstance(item, h5py.Dataset) and item.chunks is not None:
        item.id.chunk_iter(lambda info: extents.append((int(info.byte_offset), int(info.size))))
    return extents


def _failure_digest(name: str, reason: str) -> np.ndarray:
    """Checksum of one failure record: its name and reason as stored."""
    return _digest(_encode_text(name), "failure", [np.frombuffer(_encode_text(reason), np.uint8)])


def _file_size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


class _Records:
    """The committed records of an open feature file: names, row ranges, checksums, retractions;
    reads records and verifies their checksums. Shared by the reader and the resuming writer."""

    def __init__(self, handle: h5py.File, path: Path, header: _Header):
        self.handle, self.path, self.header = handle, path, header
        with _h5_errors(path, "read its index (names, offsets, checksums)"):
            self._load()

    def _load(self) -> None:
        handle, path = self.handle, self.path
        offsets = handle["offsets"]
        self.count = offsets.shape[0] - 1
        names_count = _string_count(handle["names"])
        checksums = handle["checksums"]
        image_counts = [handle[f"images/{n}"].shape[0] for n in self.header.image_fields]
        if self.count < 0 or names_count < self.count or checksums.shape[0] < self.count or any(
                c < self.count for c in image_counts):
            raise CorruptFeatureFileError(
                f"{path}: corrupt feature file: {offsets.shape[0]} offsets for {names_count} names, "
                f"{checksums.shape[0]} checksums, {image_counts} image values; delete it to "
                f"extract the features again")
        if checksums.shape[1:] != (len(self.header.parts), DIGEST_BYTES):
            raise CorruptFeatureFileError(f"{path}: corrupt feature file: checksums have shape "
                                          f"{checksums.shape}")
        self.offsets = np.asarray(offsets[:self.count + 1], np.int64)
        self.rows = int(self.offsets[-1])
        stored_rows = handle[DESCRIPTORS].shape[0]
        if self.offsets[0] != 0 or not 0 <= self.rows <= stored_rows:
            raise CorruptFeatureFileError(
                f"{path}: corrupt feature file: offsets run from row {self.offsets[0]} to "
                f"{self.rows} but {stored_rows} descriptor rows are stored; delete it to extract "
                f"the features again")
        self.names = _read_strings(handle["names"], self.count, path)
        self.checksums = np.asarray(checksums[:self.count], np.uint8)
        retracted = np.asarray(handle["retracted"][:], np.int64)
        self.retracted = {int(r) for r in retracted if 0 <= r < self.count}
        self.failure_count = _string_count(handle["failures/names"])
        if (_string_count(handle["failures/reasons"]) < self.failure_count
                or handle["failures/checksums"].shape[0] < self.failure_count):
            raise CorruptFeatureFileError(f"{path}: corrupt feature file: failure names without "
                                          f"reasons or checksums")

    def live(self) -> list[int]:
        """Each name's record (its last one not retracted), in record order."""
        last: dict[str, int] = {}
        for record, name in enumerate(self.names):
            if record not in self.retracted:
                last[name] = record
        return sorted(last.values())

    def row_range(self, record: int) -> tuple[int, int] | None:
        """``(start, end)`` rows of ``record``, None when its offsets are impossible."""
        start, end = int(self.offsets[record]), int(self.offsets[record + 1])
        return (start, end) if 0 <= start <= end <= self.rows else None

    def failures(self) -> dict[str, str]:
        """``{name: reason}`` of the failure log; entries that fail their checksum are left out
        (with a warning: those images are simply tried again)."""
        handle, count = self.handle, self.failure_count
        names = _read_strings(handle["failures/names"], count, self.path)
        reasons = _read_strings(handle["failures/reasons"], count, self.path)
        checksums = np.asarray(handle["failures/checksums"][:count], np.uint8)
        intact = [np.array_equal(_failure_digest(name, reason), checksum)
                  for name, reason, checksum in zip(names, reasons, checksums)]
        if not all(intact):
            logger.warning("%s: %d failure record(s) fail their checksum and are ignored",
                           self.path, intact.count(False))
        return _latest_failures([n for n, ok in zip(names, intact) if ok],
                                [r for r, ok in zip(reasons, intact) if ok])

    # ------------------------------------------------------------------ reading
    def _read_rows(self, start: int, end: int) -> dict[str, np.ndarray]:
        handle = self.handle
        rows = {DESCRIPTORS: np.asarray(handle[DESCRIPTORS][start:end], "<f4")}
        for field, dtype in self.header.fields.items():
            rows[field] = np.asarray(handle[f"fields/{field}"][start:end], dtype)
        return rows

    def _read_images(self, first: int, stop: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(self.handle[f"images/{name}"][first:stop],
                                 self.header.image_fields[name][0]) for name in names}

    def _digest_rows(self, record: int, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        arrays = [rows[DESCRIPTORS]] + [rows[field] for field in sorted(self.header.fields)]
        return _digest(_encode_name(self.names[record]), _ROWS_PART, arrays)

    def scan(self, records: Sequence[int], *, rows: bool, images: Sequence[str],
             sink: Callable[[int, int, dict[str, np.ndarray]], None] | None = None
             ) -> dict[int, str]:
        """Read and verify ``records`` (their rows and/or the named image fields), in blocks of
        about ``_VERIFY_BLOCK_BYTES``.

        ``sink(position in records, record, values)`` receives each record that verifies
        (``values``: its rows and image values); returns ``{record: reason}`` of those that fail.
        """
        header = self.header
        row_bytes = 4 * header.dim + sum(np.dtype(d).itemsize for d in header.fields.values())
        image_bytes = sum(np.dtype(header.image_fields[n][0]).itemsize
                          * int(np.prod(header.image_fields[n][1], dtype=np.int64)) for n in images)
        bad: dict[int, str] = {}
        block: list[tuple[int, int]] = []
        block_bytes = 0
        for position, record in enumerate(records):
            span = self.row_range(record)
            if rows and span is None:
                bad[record] = (f"impossible row range {self.offsets[record]}:"
                               f"{self.offsets[record + 1]}")
                continue
            size = image_bytes + (row_bytes * (span[1] - span[0]) if rows else 0)
            if block and block_bytes + size > _VERIFY_BLOCK_BYTES:
                self._scan_block(block, rows, images, bad, sink)
                block, block_bytes = [], 0
            block.append((position, record))
            block_bytes += size
        if block:
            self._scan_block(block, rows, images, bad, sink)
        return bad

    def _scan_block(self, block: list[tuple[int, int]], rows: bool, images: Sequence[str],
                    bad: dict[int, str], sink) -> None:
        """Verify one block of ``(position, record)``, read at once (an HDF5 error reading it means
        damaged metadata: :class:`CorruptFeatureFileError`)."""
        with _h5_errors(self.path, "read the stored features"):
            values = self._read_block([record for _, record in block], rows, images)
        for index, (position, record) in enumerate(block):
            mine = self._slice(values, values["__index__"][index], images)
            failed = self._check(record, mine, rows, images)
            if failed:
                bad[record] = failed
            elif sink is not None:
                sink(position, record, mine)

    def _read_block(self, block: Sequence[int], rows: bool, images: Sequence[str]) -> dict:
        """One read of the rows spanning ``block`` and of its image values; ``__index__`` holds
        each record's (row start, row end, image position) inside the arrays read."""
        values: dict = {}
        first_row = 0
        if rows:
            spans = [self.row_range(record) for record in block]
            first_row, last_row = min(s[0] for s in spans), max(s[1] for s in spans)
            values.update(self._read_rows(first_row, last_row))
        first_record = min(block)
        if images:
            values.update(self._read_images(first_record, max(block) + 1, images))
        index = []
        for record in block:
            span = self.row_range(record) if rows else (0, 0)
            index.append((span[0] - first_row, span[1] - first_row, record - first_record))
        values["__index__"] = index
        return values

    @staticmethod
    def _slice(values: dict, own: tuple[int, int, int], images: Sequence[str]
               ) -> dict[str, np.ndarray]:
        start, end, position = own
        mine = {}
        for key, array in values.items():
            if key == "__index__":
                continue
            mine[key] = array[position] if key in images else array[start:end]
        return mine

    def _check(self, record: int, values: Mapping[str, np.ndarray], rows: bool,
               images: Sequence[str]) -> str | None:
        """None when the record's checked parts match their stored checksums, else what failed."""
        stored, parts = self.checksums[record], self.header.parts
        failed = []
        if rows and not np.array_equal(self._digest_rows(record, values), stored[0]):
            failed.append("its descriptors, per-row fields or name")
        name = _encode_name(self.names[record])
        for image_field in images:
            part = parts.index(image_field)
            if not np.array_equal(_digest(name, image_field, [values[image_field]]), stored[part]):
                failed.append(f"its {image_field!r} value or name")
        if not failed:
            return None
        return f"checksum mismatch in {' and '.join(failed)}"

    def read_verified(self, records: Sequence[int], *, rows: bool,
                      images: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows (concatenated in ``records`` order) and image values ((len(records), *shape)) of
        ``records``, every one verified; raises :class:`CorruptRecordError` naming the images whose
        parts fail."""
        header = self.header
        out: dict[str, np.ndarray] = {}
        row_starts = np.zeros(len(records) + 1, np.int64)
        if rows:
            spans = [self.row_range(r) or (0, 0) for r in records]
            row_starts[1:] = np.cumsum([end - start for start, end in spans])
            total = int(row_starts[-1])
            out[DESCRIPTORS] = np.empty((total, header.dim), np.float32)
            for field, dtype in header.fields.items():
                out[field] = np.empty(total, np.dtype(dtype))
        for name in images:
            dtype, shape = header.image_fields[name]
            out[name] = np.empty((len(records),) + shape, np.dtype(dtype))

        def sink(position: int, record: int, values: dict[str, np.ndarray]) -> None:
            for key, value in values.items():
                if key in images:
                    out[key][position] = value
                else:
                    out[key][row_starts[position]:row_starts[position + 1]] = value

        bad = self.scan(records, rows=rows, images=images, sink=sink)
        if bad:
            raise CorruptRecordError(self.path, {self.names[r]: reason for r, reason in bad.items()})
        return out


# ---------------------------------------------------------------------- writer
class FeatureFileWriter:
    """Append images' descriptors, per-row fields and per-image values to a feature file,
    creating or resuming it.

    ``kind`` is 'local' or 'global'; ``fields`` maps extra per-row arrays to dtypes (e.g.
    ``{"attention": "float32", "x": "float32"}``); ``image_fields`` maps per-image arrays to a
    dtype and a fixed shape (e.g. ``{"global": ("float32", (512,)), "image_size": ("int32",
    (2,))}``; a bare dtype is a scalar); ``attributes`` is a JSON-able dict stored with the file
    (model configuration). Reopening an existing file resumes it: every stored record is verified
    against its checksum; ``done`` holds the names stored intact, ``corrupt`` the names whose
    record failed (logged as a warning, retracted, to be added again). A file made with another
    kind/dim/fields/image_fields/attributes raises ``ValueError``; a damaged file raises
    :class:`CorruptFeatureFileError`. ``flush_every`` adds are written to disk at once (1: after
    every add).
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, dim: int,
                 fields: Mapping[str, str | np.dtype] | None = None,
                 image_fields: Mapping[str, object] | None = None,
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
        self.image_fields = _canonical_image_fields(image_fields, self.fields)
        self._parts = [_ROWS_PART] + sorted(self.image_fields)
        self._attributes = _canonical_attributes(attributes, self.path)
        self.attributes = json.loads(self._attributes)
        self.flush_every = int(flush_every)
        self._pending = 0
        self._handle = None
        self._broken: CorruptFeatureFileError | None = None
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
            with h5py.File(temporary, "w", libver=_HDF5_LIBVER) as handle:
                header = dict(zip(_HEADER_ATTRIBUTES, [
                    FEATURE_FORMAT_VERSION, self.kind, self.dim,
                    json.dumps(self.fields, sort_keys=True),
                    json.dumps(self.image_fields, sort_keys=True), self._attributes]))
                for name, value in header.items():
                    handle.attrs[name] = value
                handle.attrs["header_checksum"] = _header_checksum(
                    [handle.attrs[name] for name in _HEADER_ATTRIBUTES])
                row_chunk = max(1, _CHUNK_BYTES // (4 * self.dim))
                _resizable(handle, DESCRIPTORS, (0, self.dim), np.float32, row_chunk)
                fields = handle.create_group("fields")
                for name, dtype in self.fields.items():
                    _resizable(fields, name, (0,), np.dtype(dtype), row_chunk)
                images = handle.create_group("images")
                for name, (dtype, shape) in self.image_fields.items():
                    item_bytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
                    chunk = min(_OFFSET_CHUNK, max(1, _CHUNK_BYTES // item_bytes))
                    _resizable(images, name, (0,) + shape, np.dtype(dtype), chunk)
                _resizable(handle, "checksums", (0, len(self._parts), DIGEST_BYTES), np.uint8,
                           _OFFSET_CHUNK)
                _resizable(handle, "offsets", (1,), np.int64, _OFFSET_CHUNK)
                _resizable(handle, "retracted", (0,), np.int64, _OFFSET_CHUNK, fillvalue=-1)
                _create_strings(handle, "names")
                failures = handle.create_group("failures")
                _create_strings(failures, "names")
                _create_strings(failures, "reasons")
                _resizable(failures, "checksums", (0, DIGEST_BYTES), np.uint8, _OFFSET_CHUNK)

    def _resume(self) -> None:
        """Check the header matches, drop a cut-off partial write, verify every stored record,
        retract the corrupt ones and load the names stored intact."""
        handle = self._handle
        header = _Header(handle, self.path)
        mismatches = []
        for what, stored, requested in [("kind", header.kind, self.kind), ("dim", header.dim, self.dim),
                                        ("fields", header.fields, self.fields),
                                        ("image_fields", header.image_fields, self.image_fields),
                                        ("attributes", header.attributes, self._attributes)]:
            if stored != requested:
                mismatches.append(f"{what} {stored!r} != {requested!r}")
        if mismatches:
            raise ValueError(f"{self.path}: feature file mismatch (stored vs requested: "
                             f"{'; '.join(mismatches)}); use another file or the same settings")
        records = _Records(handle, self.path, header)
        with _h5_errors(self.path, "drop a cut-off write"):
            row_datasets = [handle[DESCRIPTORS]] + [handle[f"fields/{n}"] for n in self.fields]
            for dataset in row_datasets:
                if dataset.shape[0] != records.rows:
                    dataset.resize(records.rows, axis=0)
            for dataset in [handle["checksums"]] + [handle[f"images/{n}"] for n in self.image_fields]:
                if dataset.shape[0] != records.count:
                    dataset.resize(records.count, axis=0)
            _truncate_strings(handle["names"], records.count)
            _truncate_strings(handle["failures/names"], records.failure_count)
            _truncate_strings(handle["failures/reasons"], records.failure_count)
            if handle["failures/checksums"].shape[0] != records.failure_count:
                handle["failures/checksums"].resize(records.failure_count, axis=0)
            handle.flush()
        # every record not yet retracted, not only each name's last one: when a later record of a
        # name is retracted, an earlier one becomes the name's record and must be intact too
        kept = [r for r in range(records.count) if r not in records.retracted]
        bad = records.scan(kept, rows=True, images=sorted(self.image_fields))
        if bad:
            self._check_damage_is_data_only(records, bad)
            shown = "; ".join(f"{records.names[r]!r}: {reason}" for r, reason in
                              list(bad.items())[:_NAMES_IN_MESSAGES])
            logger.warning("%s: %d stored image(s) failed their checksum and will be extracted "
                           "again: %s%s", self.path, len(bad), shown,
                           "" if len(bad) <= _NAMES_IN_MESSAGES else
                           f" (and {len(bad) - _NAMES_IN_MESSAGES} more)")
            with _h5_errors(self.path, "record the corrupt records"):
                _append(handle["retracted"], np.array(sorted(bad), np.int64))
                handle.flush()
        records.retracted.update(bad)
        self._rows = records.rows
        self._count = records.count
        self.done: set[str] = {records.names[r] for r in records.live()}
        self.corrupt: list[str] = sorted({records.names[r] for r in bad} - self.done)
        with _h5_errors(self.path, "read its failure log"):
            self._failures = records.failures()

    def _check_damage_is_data_only(self, records: _Records, bad: Mapping[int, str]) -> None:
        """Raise :class:`CorruptFeatureFileError` when the records that fail their checksum point
        at damage to the file's structure rather than to stored values, as then writing the
        images again could not repair them: a chunk of data placed over another or past the end
        of the file (a damaged chunk index), or an image stored again after such a failure that
        fails again."""
        again = sorted({records.names[r] for r in bad}
                       & {records.names[r] for r in records.retracted})
        if again:
            raise CorruptFeatureFileError(
                f"{self.path}: corrupt feature file: image(s) {again[:_NAMES_IN_MESSAGES]} were "
                f"stored again after failing their checksum and fail again, so the file's "
                f"structure is damaged; delete it to extract the features again")
        with _h5_errors(self.path, "list its chunks"):
            extents = []
            self._handle.visititems(lambda name, item: extents.extend(
                (start, start + size, name) for start, size in _chunk_extents(item)))
        extents.sort()
        size = self.path.stat().st_size
        for (start, end, name), (next_start, _, next_name) in zip(extents, extents[1:] + [
                (size, size, "the end of the file")]):
            if end > next_start:
                raise CorruptFeatureFileError(
                    f"{self.path}: corrupt feature file: a chunk of {name} (bytes {start}-{end}) "
                    f"overlaps {next_name} (from byte {next_start}): its chunk index is damaged; "
                    f"delete it to extract the features again")

    @property
    def failed(self) -> set[str]:
        """Names recorded with :meth:`add_failure` (and not stored successfully since)."""
        return set(self._failures) - self.done

    def _check_open(self) -> None:
        if self._broken is not None:
            raise CorruptFeatureFileError(f"{self.path}: the feature file writer stopped after an "
                                          f"error: {self._broken}")
        if self._handle is None or not self._handle.id.valid:
            raise ValueError(f"{self.path}: the feature file writer is closed")

    @contextlib.contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """:func:`_h5_errors` for a write; after an HDF5 error the writer refuses further writes
        (a half-written record must not be followed by others)."""
        try:
            with _h5_errors(self.path, doing):
                yield
        except CorruptFeatureFileError as error:
            self._broken = error
            raise

    def _check_name(self, name: str) -> bytes:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: image name must be a non-empty string, got {name!r}")
        try:
            return _encode_name(name)
        except UnicodeEncodeError as error:
            raise ValueError(f"{self.path}: image name {name!r} cannot be stored (a lone "
                             f"surrogate that is not a file system byte: {error})") from None

    def add(self, name: str, descriptors: np.ndarray,
            image_values: Mapping[str, np.ndarray] | None = None, **fields: np.ndarray) -> None:
        """Store one image: ``descriptors`` (n, dim) float32 (n may be 0), each per-row field
        (n,) and each image field's value (its declared shape) in ``image_values``."""
        self._check_open()
        encoded_name = self._check_name(name)
        if name in self.done:
            raise ValueError(f"{self.path}: image {name!r} is already stored")
        descriptors = check_descriptors(descriptors, dim=self.dim, allow_empty=True,
                                        name=f"{name}: descriptors").astype("<f4", copy=False)
        rows = descriptors.shape[0]
        if set(fields) != set(self.fields):
            raise ValueError(f"{self.path}: image {name!r}: fields given {sorted(fields)}, "
                             f"the file stores {sorted(self.fields)}")
        image_values = dict(image_values or {})
        if set(image_values) != set(self.image_fields):
            raise ValueError(f"{self.path}: image {name!r}: image values given "
                             f"{sorted(image_values)}, the file stores {sorted(self.image_fields)}")
        values = {field: self._checked(name, f"field {field!r}", fields[field], dtype, (rows,))
                  for field, dtype in self.fields.items()}
        images = {field: self._checked(name, f"image field {field!r}", image_values[field],
                                       dtype, shape)
                  for field, (dtype, shape) in self.image_fields.items()}
        digests = np.stack(
            [_digest(encoded_name, _ROWS_PART,
                     [descriptors] + [values[field] for field in sorted(self.fields)])]
            + [_digest(encoded_name, field, [images[field]]) for field in self._parts[1:]])
        with self._writing(f"store image {name!r}"):
            handle = self._handle
            end = self._rows + rows
            # 1. rows, image values, checksums (a crash here leaves data beyond the commit point:
            #    discarded on resume)
            for dataset, value in [(handle[DESCRIPTORS], descriptors)] + [
                    (handle[f"fields/{f}"], v) for f, v in values.items()]:
                dataset.resize(end, axis=0)
                if rows:
                    dataset[self._rows:end] = value
            for field, value in images.items():
                dataset = handle[f"images/{field}"]
                dataset.resize(self._count + 1, axis=0)
                dataset[self._count] = value
            dataset = handle["checksums"]
            dataset.resize(self._count + 1, axis=0)
            dataset[self._count] = digests
            # 2. name, 3. offset: the commit point
            _append_strings(handle["names"], [name])
            _append(handle["offsets"], np.array([end], dtype=np.int64))
        self._rows = end
        self._count += 1
        self.done.add(name)
        self._count_write()

    def _checked(self, name: str, what: str, value, dtype: str, shape: tuple) -> np.ndarray:
        value = np.asarray(value)
        if value.shape != tuple(shape):
            raise ValueError(f"{self.path}: image {name!r}: {what} has shape {value.shape}, "
                             f"expected {tuple(shape)}")
        if value.size and not np.isfinite(value.astype(np.float64)).all():
            raise ValueError(f"{self.path}: image {name!r}: {what} has NaN/inf")
        return _c_order(value.astype(np.dtype(dtype)))

    def add_failure(self, name: str, reason: str) -> None:
        """Record that image ``name`` could not be processed (a later record replaces the reason;
        a later successful :meth:`add` removes it from :attr:`FeatureFile.failures`)."""
        self._check_open()
        if name in self.done:
            raise ValueError(f"{self.path}: image {name!r} is already stored; it cannot also fail")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: image name must be a non-empty string, got {name!r}")
        reason = str(reason)
        with self._writing(f"record the failure of {name!r}"):
            _append_strings(self._handle["failures/reasons"], [reason])   # the name commits
            _append(self._handle["failures/checksums"], _failure_digest(name, reason)[None])
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
        with _h5_errors(self.path, "write to disk"):
            self._handle.flush()
        self._pending = 0

    def close(self) -> None:
        if self._handle is not None and self._handle.id.valid:
            try:
                with _h5_errors(self.path, "write to disk"):
                    self._handle.flush()
            finally:
                self._handle.close()
        self._handle = None

    def __len__(self) -> int:
        return len(self.done)

    def __enter__(self) -> "FeatureFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- reader
class FeatureFile:
    """Read a feature file; only finished images are visible, each image's own record (see the
    module docstring); everything returned is verified against its checksum.

    ``names`` (n images, in the order of their records), ``offsets`` (n+1,) int64 (image ``i``
    owns rows ``offsets[i]:offsets[i+1]`` of :meth:`all_descriptors` and :meth:`field`),
    ``kind``, ``dim``, ``attributes``, ``field_names``, ``field_dtypes``, ``image_field_names``,
    ``image_fields`` ({name: (dtype, shape)}), ``failures`` [(name, reason)].
    Damaged HDF5 structure raises :class:`CorruptFeatureFileError` when the file is opened; a
    record that fails its checksum raises :class:`CorruptRecordError` when it is read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no feature file at {self.path}")
        self._handle = _open_h5(self.path, "r")
        try:
            header = _Header(self._handle, self.path)
            self._records = _Records(self._handle, self.path, header)
            with _h5_errors(self.path, "read its failure log"):
                failures = self._records.failures()
        except BaseException:
            self._handle.close()
            raise
        self.kind, self.dim = header.kind, header.dim
        self.attributes: dict = json.loads(header.attributes)
        self.field_names: list[str] = list(header.fields)
        self.field_dtypes = {name: np.dtype(dtype) for name, dtype in header.fields.items()}
        self.image_fields = {name: (np.dtype(dtype), shape)
                             for name, (dtype, shape) in header.image_fields.items()}
        self.image_field_names: list[str] = sorted(header.image_fields)
        self._live = self._records.live()
        self.names: list[str] = [self._records.names[r] for r in self._live]
        counts = [end - start for start, end in
                  (self._records.row_range(r) or (0, 0) for r in self._live)]
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]
                                                  ).astype(np.int64)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.failures: list[tuple[str, str]] = [
            (name, reason) for name, reason in failures.items() if name not in self._index]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_descriptors(self) -> int:
        return int(self.offsets[-1])

    def _check_open(self) -> None:
        if not self._handle.id.valid:
            raise ValueError(f"{self.path}: the feature file is closed")

    def index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no image named {name!r}") from None

    def get(self, name_or_index: str | int) -> dict[str, np.ndarray]:
        """``{"descriptors": (n, dim) float32, <field>: (n,), <image field>: (*shape)}`` of one
        image, by name or index, verified (:class:`CorruptRecordError` when it fails)."""
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
        values = self._records.read_verified([self._live[index]], rows=True,
                                             images=self.image_field_names)
        return {key: value[0] if key in self.image_fields else value
                for key, value in values.items()}

    def all_descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(descriptors (N, dim) float32, image index (N,) int64)`` of every image, verified."""
        self._check_open()
        values = self._records.read_verified(self._live, rows=True, images=())
        counts = np.diff(self.offsets)
        return values[DESCRIPTORS], np.repeat(np.arange(len(self), dtype=np.int64), counts)

    def field(self, field_name: str) -> np.ndarray:
        """Per-row field ``field_name`` over every image, (N,), verified (which reads the rows)."""
        self._check_open()
        if field_name not in self.field_dtypes:
            raise KeyError(f"{self.path}: no field {field_name!r} (fields: {self.field_names})")
        return self._records.read_verified(self._live, rows=True, images=())[field_name]

    def image_field(self, field_name: str) -> np.ndarray:
        """Per-image field ``field_name`` of every image, (n, *shape), verified."""
        self._check_open()
        if field_name not in self.image_fields:
            raise KeyError(f"{self.path}: no image field {field_name!r} (image fields: "
                           f"{self.image_field_names})")
        return self._records.read_verified(self._live, rows=False, images=[field_name])[field_name]

    def verify(self) -> list[str]:
        """Names of the images whose record fails its checksum (every part read and checked)."""
        self._check_open()
        bad = self._records.scan(self._live, rows=True, images=self.image_field_names)
        return [self._records.names[r] for r in sorted(bad)]

    def close(self) -> None:
        if self._handle.id.valid:
            self._handle.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CorruptFeatureFileError", "CorruptRecordError", "FEATURE_FORMAT_VERSION",
           "FeatureFile", "FeatureFileWriter"]
