"""Per-image local features for spatial verification: visual word, binary signature, x, y, scale.

Each database image's local features are kept as

    words       (n,) int32         nearest visual word of each descriptor
    signatures  (n, B) uint8       sign bits of the residual ``x - centroid[word]``, packed
                                   (``B = ceil(D / 8)``, :func:`binary_signatures`), the same
                                   binarisation as ASMK*/Hamming embedding
    xy          (n, 2) float32     position in the ORIGINAL image's pixels
    scale       (n,) float32       pyramid scale of the feature

with an image's features sorted by word (stable), so matching needs no sort at query time.

A store is built in RAM (:meth:`LocalFeatureStore.add`), saved whole as ``.npy`` arrays with a
manifest (:meth:`LocalFeatureStore.save`, :mod:`persistence`), and loaded memory-mapped
(:meth:`LocalFeatureStore.load`): only the pages of the images that are verified are read.
:meth:`add` appends an in-RAM chunk and :meth:`remove` drops images from the look-up table (their
rows stay in their chunk, unreachable, until the next save writes the live images only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .persistence import (IndexFormatError, check_counts, load_current, read_arrays, require,
                          save_directory)
from .validation import check_ids

LOCAL_STORE_KIND = "local_feature_store"
GEOMETRY_COLUMNS = 3            # local_geometry rows: x, y, scale
_FIELDS = ("words", "signatures", "xy", "scale")


def _field_layout(field: str, n_bytes: int) -> tuple[tuple[int, ...], type]:
    """(trailing shape, dtype) of one stored per-feature field."""
    return {"words": ((), np.int32), "signatures": ((n_bytes,), np.uint8),
            "xy": ((2,), np.float32), "scale": ((), np.float32)}[field]


def signature_bytes(dim: int) -> int:
    """Bytes of one packed binary signature of a ``dim``-d descriptor."""
    return (int(dim) + 7) // 8


def binary_signatures(descriptors: np.ndarray, words: np.ndarray,
                      centroids: np.ndarray) -> np.ndarray:
    """Sign bits of the residuals ``descriptors[i] - centroids[words[i, a]]``, packed.

    ``descriptors`` (N, D) float32, ``words`` (N,) or (N, A) integer ids -> (N, B) or (N, A, B)
    uint8 with ``B = ceil(D / 8)`` (bit order little: bit ``d % 8`` of byte ``d // 8`` is
    ``residual[d] > 0``, as ASMK* binarises an aggregated residual).
    """
    descriptors = np.asarray(descriptors, np.float32)
    words = np.asarray(words)
    residuals = descriptors.reshape(descriptors.shape[0], *([1] * (words.ndim - 1)), -1) \
        - centroids[words]
    return np.packbits(residuals > 0, axis=-1, bitorder="little")


def check_geometry(geometry, length: int, name: str = "local_geometry") -> np.ndarray:
    """``geometry`` as a finite (length, 3) float32 array (x, y, scale), or ``ValueError``."""
    array = np.asarray(geometry)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                     or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric (N, 3) array, got dtype {array.dtype}")
    if array.shape != (length, GEOMETRY_COLUMNS):
        raise ValueError(f"{name}: expected shape ({length}, {GEOMETRY_COLUMNS}) (x, y, scale "
                         f"per local descriptor), got {array.shape}")
    array = np.ascontiguousarray(array, np.float32)
    if array.size and not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(f"{name}: {bad.size} row(s) contain NaN or inf (first bad row: {bad[0]})")
    return array


@dataclass(frozen=True)
class ImageFeatures:
    """One image's stored local features (views, possibly of memory-mapped files), sorted by word:
    ``words`` (n,) int32, ``signatures`` (n, B) uint8, ``xy`` (n, 2) float32, ``scale`` (n,)."""

    words: np.ndarray
    signatures: np.ndarray
    xy: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return int(self.words.shape[0])


@dataclass(frozen=True)
class _Chunk:
    words: np.ndarray
    signatures: np.ndarray
    xy: np.ndarray
    scale: np.ndarray

    def rows(self, start: int, stop: int) -> ImageFeatures:
        return ImageFeatures(self.words[start:stop], self.signatures[start:stop],
                             self.xy[start:stop], self.scale[start:stop])

    def nbytes(self, in_ram: bool) -> int:
        if not in_ram:
            return 0
        return int(sum(getattr(self, field).nbytes for field in _FIELDS))


class LocalFeatureStore:
    """Local features (word, signature, x, y, scale) of each image, keyed by int64 image id."""

    def __init__(self, dim: int):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self._chunks: list[_Chunk] = []
        self._mapped: list[bool] = []              # chunk i is memory-mapped (not in RAM)
        # look-up table, one row per image in insertion order
        self._ids = np.empty(0, np.int64)
        self._chunk_of = np.empty(0, np.int64)
        self._start = np.empty(0, np.int64)
        self._stop = np.empty(0, np.int64)
        self._reindex()

    # ------------------------------------------------------------------ look-ups
    def _reindex(self) -> None:
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Table row of each id, -1 where absent."""
        if self._ids.size == 0:
            return np.full(ids.shape, -1, np.int64)
        position = np.minimum(np.searchsorted(self._sorted_ids, ids), self._ids.size - 1)
        return np.where(self._sorted_ids[position] == ids, self._order[position], -1)

    @property
    def signature_bytes(self) -> int:
        return signature_bytes(self.dim)

    @property
    def image_ids(self) -> np.ndarray:
        """Ids of the stored images in insertion order (a copy), (n,) int64."""
        return self._ids.copy()

    @property
    def n_features(self) -> int:
        return int((self._stop - self._start).sum())

    def __len__(self) -> int:
        return int(self._ids.size)

    def contains(self, image_ids) -> np.ndarray:
        """(M,) bool: which ids have stored features."""
        return self._rows_of(check_ids(image_ids)) >= 0

    def counts(self, image_ids) -> np.ndarray:
        """(M,) int64 number of stored features of each image (0 for unknown ids)."""
        rows = self._rows_of(check_ids(image_ids))
        counts = np.zeros(rows.shape, np.int64)
        found = rows >= 0
        counts[found] = self._stop[rows[found]] - self._start[rows[found]]
        return counts

    def get(self, image_id: int) -> ImageFeatures:
        """The stored features of one image (``KeyError`` when it has none)."""
        row = int(self._rows_of(check_ids(image_id))[0])
        if row < 0:
            raise KeyError(f"image id {int(image_id)} has no stored local features")
        return self._chunks[self._chunk_of[row]].rows(int(self._start[row]), int(self._stop[row]))

    def memory_bytes(self) -> int:
        """Bytes held in RAM: chunks built in this process and the look-up table (memory-mapped
        chunks are not counted: the OS pages them in and out)."""
        table = self._ids.nbytes * 4 + self._order.nbytes + self._sorted_ids.nbytes
        return int(table + sum(chunk.nbytes(not mapped)
                               for chunk, mapped in zip(self._chunks, self._mapped)))

    # ------------------------------------------------------------------ mutation
    def add(self, image_ids, words, signatures, geometry) -> None:
        """Store features of new images: per feature its image id (N,), word (N,), packed signature
        (N, B) uint8 and geometry (N, 3) (x, y, scale). An image's features may be interleaved
        with others'; every id must be new. Unchanged on error."""
        ids = check_ids(image_ids)
        n = ids.size
        words = np.asarray(words)
        if words.shape != (n,) or not np.issubdtype(words.dtype, np.integer):
            raise ValueError(f"words: expected ({n},) integers, got {words.shape} {words.dtype}")
        if n and (words.min() < 0 or words.max() > np.iinfo(np.int32).max):
            raise ValueError("words: ids must be non-negative int32 values")
        signatures = np.asarray(signatures)
        if signatures.shape != (n, self.signature_bytes) or signatures.dtype != np.uint8:
            raise ValueError(f"signatures: expected ({n}, {self.signature_bytes}) uint8, got "
                             f"{signatures.shape} {signatures.dtype}")
        geometry = check_geometry(geometry, n)
        if n == 0:
            return
        # group by image (first appearance order), then by word inside an image (both stable)
        new_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        if (self._rows_of(new_ids) >= 0).any():
            present = new_ids[self._rows_of(new_ids) >= 0]
            raise ValueError(f"image_ids: {present.size} image(s) already have stored local "
                             f"features, e.g. {present[:5].tolist()} (remove them first)")
        appearance = np.argsort(first, kind="stable")          # images in order of appearance
        rank = np.empty_like(appearance)
        rank[appearance] = np.arange(appearance.size)
        order = np.lexsort((words, rank[inverse.reshape(-1)]))
        counts = np.bincount(rank[inverse.reshape(-1)], minlength=new_ids.size)
        stops = np.cumsum(counts)
        chunk = _Chunk(words=np.ascontiguousarray(words[order], np.int32),
                       signatures=np.ascontiguousarray(signatures[order]),
                       xy=np.ascontiguousarray(geometry[order, :2]),
                       scale=np.ascontiguousarray(geometry[order, 2]))
        self._append_chunk(chunk, new_ids[appearance], stops - counts, stops, mapped=False)

    def _append_chunk(self, chunk: _Chunk, ids, starts, stops, *, mapped: bool) -> None:
        self._chunks.append(chunk)
        self._mapped.append(mapped)
        number = len(self._chunks) - 1
        self._ids = np.concatenate([self._ids, ids]).astype(np.int64)
        self._chunk_of = np.concatenate([self._chunk_of, np.full(len(ids), number, np.int64)])
        self._start = np.concatenate([self._start, starts]).astype(np.int64)
        self._stop = np.concatenate([self._stop, stops]).astype(np.int64)
        self._reindex()

    def remove(self, image_ids) -> None:
        """Forget images (all must be stored, no duplicates; else ``KeyError``/``ValueError`` and
        nothing changes). Chunks left without a live image are released."""
        ids = check_ids(image_ids)
        if np.unique(ids).size != ids.size:
            raise ValueError("image_ids: duplicate ids in one remove")
        rows = self._rows_of(ids)
        if (rows < 0).any():
            raise KeyError(f"image_ids: {int((rows < 0).sum())} id(s) without stored local "
                           f"features, e.g. {ids[rows < 0][:5].tolist()}")
        keep = np.ones(self._ids.size, bool)
        keep[rows] = False
        self._ids, self._chunk_of = self._ids[keep], self._chunk_of[keep]
        self._start, self._stop = self._start[keep], self._stop[keep]
        used = np.unique(self._chunk_of)
        renumber = np.full(len(self._chunks), -1, np.int64)
        renumber[used] = np.arange(used.size)
        self._chunks = [self._chunks[i] for i in used]
        self._mapped = [self._mapped[i] for i in used]
        self._chunk_of = renumber[self._chunk_of]
        self._reindex()

    # ------------------------------------------------------------------ persistence
    def arrays(self) -> dict[str, np.ndarray]:
        """The live images as contiguous arrays in insertion order: ``image_ids`` (n,),
        ``offsets`` (n + 1,) int64 and the per-feature fields (image ``i`` owns rows
        ``offsets[i]:offsets[i + 1]``)."""
        counts = self._stop - self._start
        offsets = np.zeros(self._ids.size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        result = {"image_ids": self._ids.copy(), "offsets": offsets}
        for field in _FIELDS:
            parts = [getattr(self._chunks[c], field)[s:e]
                     for c, s, e in zip(self._chunk_of, self._start, self._stop)]
            trailing, dtype = _field_layout(field, self.signature_bytes)
            result[field] = np.concatenate(parts) if parts else np.empty((0, *trailing), dtype)
        return result

    def save(self, directory: str | os.PathLike) -> None:
        """Publish the live images' features (manifest + checksummed ``.npy`` arrays; a new
        version, or plainly as a component of a directory being published)."""
        arrays = self.arrays()
        save_directory(directory, kind=LOCAL_STORE_KIND, params={"dim": self.dim},
                       counts={"images": len(self), "features": int(arrays["offsets"][-1])},
                       arrays=arrays)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True,
             verify: bool = True) -> "LocalFeatureStore":
        """Read a store written by :meth:`save` (its current version), memory-mapped by default
        (``verify``: check the files' checksums, which reads them once). ``IndexFormatError``
        when inconsistent."""
        return load_current(directory, lambda version: cls._load_version(version, mmap, verify))

    @classmethod
    def _load_version(cls, directory: Path, mmap: bool, verify: bool) -> "LocalFeatureStore":
        manifest, arrays = read_arrays(directory, kind=LOCAL_STORE_KIND, verify=verify, mmap=mmap)
        try:
            store = cls(int(manifest["params"]["dim"]))
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFormatError(f"{directory}: corrupt manifest parameters ({error})") from error
        missing = {"image_ids", "offsets", *_FIELDS} - set(arrays)
        require(not missing, directory, f"corrupt store: arrays {sorted(missing)} missing")
        ids, offsets = arrays["image_ids"], np.asarray(arrays["offsets"])
        images = int(ids.shape[0])
        features = int(arrays["words"].shape[0])
        require(ids.ndim == 1 and ids.dtype == np.int64 and np.unique(ids).size == images,
                directory, f"image_ids: expected distinct int64 ids, got {ids.shape} {ids.dtype}")
        require(offsets.shape == (images + 1,) and offsets.dtype == np.int64
                and offsets[0] == 0 and offsets[-1] == features
                and bool(np.all(np.diff(offsets) >= 0)), directory,
                f"offsets inconsistent with {images} images and {features} features (corrupt)")
        check_counts(directory, manifest, {"images": images, "features": features})
        for field in _FIELDS:
            trailing, dtype = _field_layout(field, store.signature_bytes)
            require(arrays[field].shape == (features, *trailing) and arrays[field].dtype == dtype,
                    directory, f"{field}: expected {(features, *trailing)} {np.dtype(dtype).name}, "
                    f"got {arrays[field].shape} {arrays[field].dtype} (corrupt)")
        if images:
            chunk = _Chunk(**{field: arrays[field] for field in _FIELDS})
            store._append_chunk(chunk, np.asarray(ids), offsets[:-1], offsets[1:], mapped=mmap)
        return store

