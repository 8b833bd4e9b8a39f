"""Crash-safe, versioned, checksummed storage for indexes and codebooks.

An index is a directory::

    DIR/manifest.json     {"format_version", "kind", "params", "counts", "files": {name: {...}}}
    DIR/<array>.npy       one file per array, each listed in the manifest with sha256, shape, dtype
    DIR/<sub>/...         optional nested components (their manifest's sha256 is in the parent's)

It is always written under a temporary name beside the target and renamed into place, so a crash
leaves either the old directory or the new one, never a half-written one. Reading verifies the
format version, the kind, and every file's checksum, shape and dtype, and raises
:class:`IndexFormatError` (a ``ValueError``) that names the file and says what is wrong.

A codebook (or any small object) can also be one ``.npz`` file: :func:`save_arrays_file` /
:func:`load_arrays_file`, written atomically with the same manifest inside.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 22


class IndexFormatError(ValueError):
    """A stored index or codebook is corrupt, of another version or kind, or does not match."""


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_array(array: np.ndarray) -> str:
    """Checksum of an array's contents, shape and dtype (used e.g. as a codebook hash)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_mode(directory: bool) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it is synced to disk, given
    the usual permissions and renamed onto ``target`` (a crash never leaves a half-written
    ``target``); on an exception it is removed and ``target`` is left untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _default_mode(directory=False))
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield temporary
        _fsync_directory(temporary)
        os.chmod(temporary, _default_mode(directory=True))
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, retired / "old")
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_arrays(directory: str | os.PathLike, *, kind: str, params: Mapping, counts: Mapping,
                 arrays: Mapping[str, np.ndarray], components: Mapping[str, Path] = (),
                 files: Sequence[str] = (), extra: Mapping | None = None) -> dict:
    """Write ``arrays`` as ``.npy`` files and a manifest into an existing (temporary) directory.

    ``components`` maps names of sub-directories already written inside ``directory`` (each with
    its own manifest) whose manifest checksums are recorded. ``files`` names other files already
    written there (model weights, YAML...) whose checksums are recorded and verified on reading,
    but which :func:`read_arrays` does not load. Returns the manifest.
    """
    directory = Path(directory)
    file_entries = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which cannot be stored safely")
        filename = f"{name}.npy"
        path = directory / filename
        with open(path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        file_entries[filename] = {"sha256": sha256_of_file(path), "shape": list(array.shape),
                                  "dtype": array.dtype.str}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"file {name!r} to checksum is not in {directory}")
        file_entries[name] = {"sha256": sha256_of_file(path)}
    component_entries = {}
    for name in dict(components):
        sub_manifest = directory / name / MANIFEST_NAME
        if not sub_manifest.is_file():
            raise FileNotFoundError(f"component {name!r} has no manifest at {sub_manifest}")
        component_entries[name] = {"manifest_sha256": sha256_of_file(sub_manifest)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "params": _jsonable(dict(params)),
        "counts": _jsonable(dict(counts)),
        "files": file_entries,
        "components": component_entries,
        **_jsonable(dict(extra or {})),
    }
    with open(directory / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def save_directory(target: str | os.PathLike, *, kind: str, params: Mapping, counts: Mapping,
                   arrays: Mapping[str, np.ndarray], extra: Mapping | None = None) -> dict:
    """Atomically write a directory of arrays with its manifest (see module docstring)."""
    with atomic_directory(target) as temporary:
        return write_arrays(temporary, kind=kind, params=params, counts=counts, arrays=arrays,
                            extra=extra)


def read_manifest(directory: str | os.PathLike, *, kind: str | None = None) -> dict:
    """Read and check a directory's manifest (version and kind), without reading its arrays."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no index at {directory}")
    if not directory.is_dir():
        raise IndexFormatError(f"{directory} is not an index directory (it is a file)")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IndexFormatError(f"{path}: manifest missing; {directory} is not an index directory "
                               "or was not written completely (corrupt)")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"{path}: corrupt manifest ({error})") from error
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise IndexFormatError(f"{path}: corrupt manifest (no format_version)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format version mismatch: stored {manifest['format_version']}, this code reads "
            f"{FORMAT_VERSION}; rebuild the index with this version")
    if kind is not None and manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: kind mismatch: this is a {manifest.get('kind')!r}, "
                               f"expected a {kind!r}")
    return manifest


def read_arrays(directory: str | os.PathLike, *, kind: str | None = None,
                verify: bool = True, mmap: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a directory written by :func:`write_arrays`; returns ``(manifest, arrays)``.

    Every file's checksum, shape and dtype is checked against the manifest (``verify=False`` skips
    the checksums, not the shapes), and every component's manifest checksum too.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, kind=kind)
    arrays = {}
    for filename, entry in manifest.get("files", {}).items():
        path = directory / filename
        if not path.is_file():
            raise IndexFormatError(f"{path}: file missing (corrupt index)")
        if verify and sha256_of_file(path) != entry["sha256"]:
            raise IndexFormatError(f"{path}: checksum mismatch, the file is corrupt")
        if "shape" not in entry:
            continue  # a checksummed file that is not an array (see write_arrays' files)
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as error:
            raise IndexFormatError(f"{path}: corrupt array file ({error})") from error
        if list(array.shape) != list(entry["shape"]) or array.dtype.str != entry["dtype"]:
            raise IndexFormatError(
                f"{path}: shape/dtype mismatch: manifest says {tuple(entry['shape'])} {entry['dtype']}, "
                f"file has {array.shape} {array.dtype.str}")
        arrays[filename[:-len(".npy")]] = array
    for name, entry in manifest.get("components", {}).items():
        sub_manifest = directory / name / MANIFEST_NAME
        if not sub_manifest.is_file():
            raise IndexFormatError(f"{sub_manifest}: component manifest missing (corrupt index)")
        if verify and sha256_of_file(sub_manifest) != entry["manifest_sha256"]:
            raise IndexFormatError(f"{sub_manifest}: checksum mismatch, component {name!r} is "
                                   "corrupt or was replaced")
    return manifest, arrays


def require(condition: bool, path: str | os.PathLike, message: str) -> None:
    """Raise :class:`IndexFormatError` naming ``path`` when a loaded object is inconsistent."""
    if not condition:
        raise IndexFormatError(f"{path}: {message}")


def save_arrays_file(path: str | os.PathLike, *, kind: str, params: Mapping,
                     arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write arrays plus a manifest (with per-array checksums) as one ``.npz`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "params": _jsonable(dict(params)),
        "checksums": {name: sha256_of_array(array) for name, array in arrays.items()},
    }
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, __manifest__=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8),
                 **arrays)


def load_arrays_file(path: str | os.PathLike, *, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`save_arrays_file`, verifying version, kind and checksums."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {name: data[name] for name in data.files}
    except Exception as error:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise IndexFormatError(f"{path}: corrupt file, not a readable {kind} ({error})") from error
    if "__manifest__" not in contents:
        raise IndexFormatError(f"{path}: corrupt or foreign file: no manifest inside")
    try:
        manifest = json.loads(contents.pop("__manifest__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path}: corrupt manifest ({error})") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: format version mismatch: stored "
                               f"{manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    if manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: kind mismatch: this is a {manifest.get('kind')!r}, "
                               f"expected a {kind!r}")
    for name, checksum in manifest.get("checksums", {}).items():
        if name not in contents:
            raise IndexFormatError(f"{path}: array {name!r} missing (corrupt)")
        if sha256_of_array(contents[name]) != checksum:
            raise IndexFormatError(f"{path}: checksum mismatch in array {name!r}, the file is corrupt")
    return manifest, contents
