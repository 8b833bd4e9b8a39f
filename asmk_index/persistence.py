"""Crash-safe, versioned, checksummed storage for indexes and codebooks, with one writer at a time.

A component directory (plain; also the layout of indexes written before versioning)::

    DIR/manifest.json     {"format_version", "kind", "params", "counts", "files": {name: {...}}}
    DIR/<array>.npy       one file per array, each listed in the manifest with sha256, shape, dtype
    DIR/<sub>/...         optional nested components (their manifest's sha256 is in the parent's)

A user-facing directory (an index, a codebook directory) is *published* in versions, so a reader
always sees one whole version, whatever a writer does meanwhile::

    TARGET/CURRENT              {"version": NAME, "manifest_sha256": ...}, replaced atomically
    TARGET/v000007-1f3a9c2e/    the current version: a component directory as above (immutable)
    TARGET/v000006-0b4d77e1/    the previous version, kept for a reader that resolved it just before
    TARGET/.writer.lock         the writers' OS file lock (filelock)
    TARGET/.writer.json         who holds the lock: pid, host, command line, since when
    TARGET/.tmp-<pid>-*/        a version being written (a dead writer's is removed by the next one)

Writers use :func:`publish_directory` (it takes :func:`writer_lock`, removes a dead writer's
temporaries, yields a fresh directory and, on success, syncs it and flips ``CURRENT``); a
read-modify-write holds :func:`writer_lock` across load, change and save (the lock is re-entrant
within a process). Readers use :func:`load_current` (resolve ``CURRENT`` once with
:func:`current_version`, load that version, and retry on the new version if a writer replaced it
meanwhile). Components written inside a version being published (e.g. a two-stage index's "global"
and "asmk") stay plain directories: :func:`publish_directory` and :func:`publish_file` detect that
they are inside a write in progress of this process.

Reading verifies the format version, the kind, every file's checksum, shape and dtype, the top
manifest's checksum recorded in ``CURRENT``, and (in the loaders) every count against the data,
and raises :class:`IndexFormatError` (a ``ValueError``) that names the file and says what is wrong.

A codebook (or any small object) can also be one ``.npz`` file: :func:`save_arrays_file` /
:func:`load_arrays_file`, written atomically (under a writer lock beside the file) with the same
manifest inside.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from filelock import FileLock, Timeout

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
POINTER_NAME = "CURRENT"                 # the published version of a versioned directory
VERSION_PREFIX = "v"                     # version directories: v<number, 6+ digits>-<8 hex>
TEMP_PREFIX = ".tmp-"                    # a version being written, inside TARGET
LOCK_NAME = ".writer.lock"               # the OS file lock in TARGET (.NAME.writer.lock by a file)
HOLDER_NAME = ".writer.json"             # the lock holder's record, next to the lock file
LOCK_POLL_SECONDS = 0.05                 # how often a waiting writer retries the lock
HOLDER_RECORD_GRACE_SECONDS = 1.0        # a new holder writes its record right after locking
LOAD_ATTEMPTS = 8                        # loads of a directory that writers keep replacing
HOLDER_COMMAND_CHARS = 300               # command line kept in the holder record
_HASH_CHUNK = 1 << 22
_VERSION_RE = re.compile(rf"{VERSION_PREFIX}(\d{{6,}})-[0-9a-f]{{8}}")

logger = logging.getLogger(__name__)
T = TypeVar("T")


class IndexFormatError(ValueError):
    """A stored index or codebook is corrupt, of another version or kind, or does not match."""


class WriterLockedError(TimeoutError):
    """Another writer holds the lock of ``target``; ``holder`` is its record (pid, host, command,
    since) or None when it left none."""

    def __init__(self, target: str | os.PathLike, holder: dict | None, timeout: float | None):
        self.target, self.holder, self.timeout = Path(target), holder, timeout
        waited = f" after waiting {timeout:g} s" if timeout else ""
        super().__init__(f"{target} is being written by another writer: {describe_holder(holder)}; "
                         f"refused{waited} (wait for it to finish, or pass a longer timeout)")


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


def _fsync_tree(root: Path) -> None:
    """Sync every file and directory under ``root`` (files written without fsync included)."""
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(directory))


def _default_mode(directory: bool) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------- writes in progress (this process)
_active_guard = threading.Lock()
_active_writes: set[str] = set()        # real paths of temporary directories being written


@contextlib.contextmanager
def _write_in_progress(temporary: Path) -> Iterator[None]:
    key = os.path.realpath(temporary)
    with _active_guard:
        _active_writes.add(key)
    try:
        yield
    finally:
        with _active_guard:
            _active_writes.discard(key)


def _inside_write_in_progress(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (inside) a temporary directory this process is writing right now: a
    component of a version being published, written plainly (no lock, no versions)."""
    real = os.path.realpath(path)
    with _active_guard:
        active = tuple(_active_writes)
    return any(real == key or real.startswith(key + os.sep) for key in active)


# ---------------------------------------------------------------- the writer lock
class _ProcessLock:
    """One lock file's state in this process: the OS lock, the thread that holds it, the depth."""

    def __init__(self, lock_file: Path):
        self.thread_lock = threading.RLock()
        self.file_lock = FileLock(str(lock_file))
        self.depth = 0


_locks_guard = threading.Lock()
_process_locks: dict[str, _ProcessLock] = {}


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's locks or writes."""
    global _locks_guard, _active_guard
    _locks_guard, _active_guard = threading.Lock(), threading.Lock()
    _process_locks.clear()
    _active_writes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _holder_record() -> dict:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(command.split())[:HOLDER_COMMAND_CHARS],     # one line
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def describe_holder(holder: dict | None) -> str:
    """One line naming a lock holder from its record (see :func:`writer_lock`)."""
    if not holder:
        return "an unknown process (it left no holder record)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (command: "
            f"{holder.get('command')}), holding the lock since {holder.get('since')}")


def read_holder(holder_file: str | os.PathLike) -> dict | None:
    """The record a lock holder wrote, or None (no holder, or a record being replaced)."""
    try:
        record = json.loads(Path(holder_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_holder(holder_file: Path) -> None:
    temporary = holder_file.with_name(f"{holder_file.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(_holder_record()), encoding="utf-8")
    os.chmod(temporary, _default_mode(directory=False))
    os.replace(temporary, holder_file)


def _lock_files(target: Path, *, inside: bool) -> tuple[Path, Path]:
    """(lock file, holder record) of ``target``: inside a directory, beside a single file."""
    if inside:
        return target / LOCK_NAME, target / HOLDER_NAME
    return (target.with_name(f".{target.name}{LOCK_NAME}"),
            target.with_name(f".{target.name}{HOLDER_NAME}"))


def _acquire_thread_lock(lock: threading.RLock, timeout: float | None) -> bool:
    if timeout is None:
        return lock.acquire()
    if timeout <= 0:
        return lock.acquire(blocking=False)
    return lock.acquire(timeout=timeout)


def _wait_for_holder(holder_file: Path) -> dict | None:
    """The holder's record; a holder that has just taken the lock gets a moment to write it."""
    deadline = time.monotonic() + HOLDER_RECORD_GRACE_SECONDS
    while (holder := read_holder(holder_file)) is None and time.monotonic() < deadline:
        time.sleep(LOCK_POLL_SECONDS)
    return holder


def _acquire_file_lock(lock: FileLock, target: Path, holder_file: Path,
                       timeout: float | None) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        holder = _wait_for_holder(holder_file)
    if timeout is not None and timeout <= 0:
        raise WriterLockedError(target, holder, timeout)
    logger.warning("%s is being written by %s; waiting for it to finish", target,
                   describe_holder(holder))
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=LOCK_POLL_SECONDS)
    except Timeout:
        raise WriterLockedError(target, read_holder(holder_file), timeout) from None


@contextlib.contextmanager
def _locked(target: Path, lock_file: Path, holder_file: Path,
            timeout: float | None) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(lock_file)
    with _locks_guard:
        entry = _process_locks.get(key)
        if entry is None:
            entry = _process_locks[key] = _ProcessLock(lock_file)
    started = time.monotonic()
    if not _acquire_thread_lock(entry.thread_lock, timeout):
        raise WriterLockedError(target, read_holder(holder_file), timeout)  # another thread here
    try:
        if entry.depth == 0:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            _acquire_file_lock(entry.file_lock, target, holder_file, left)
            try:
                _write_holder(holder_file)
            except BaseException:
                entry.file_lock.release()
                raise
        entry.depth += 1
        try:
            yield
        finally:
            entry.depth -= 1
            if entry.depth == 0:
                with contextlib.suppress(OSError):
                    holder_file.unlink()        # before the release: never the next holder's
                entry.file_lock.release()
    finally:
        entry.thread_lock.release()


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, *, timeout: float | None = None) -> Iterator[None]:
    """Hold the writer lock of ``target`` (an index or codebook directory, created if missing,
    with the lock inside it; or an existing single file, with the lock beside it).

    An OS file lock (filelock): it is released when the holder exits, even when killed. The holder
    records pid, host, command line and since when in ``.writer.json``, so another writer can say
    whom it waits for. ``timeout=None`` waits as long as it takes (logging once whom it waits
    for), ``timeout=0`` refuses at once and ``timeout=s`` after s seconds, with
    :class:`WriterLockedError` naming the holder. Re-entrant within one process (a save inside a
    held lock does not deadlock); another thread of the process waits like another process.
    """
    target = Path(target)
    inside = not target.is_file()
    with _locked(target, *_lock_files(target, inside=inside), timeout):
        yield


# ---------------------------------------------------------------- writing
def _is_own_entry(name: str) -> bool:
    """Whether an entry of a versioned directory is part of the versioning machinery."""
    return (name in (POINTER_NAME, LOCK_NAME, HOLDER_NAME) or _is_temporary_entry(name)
            or _VERSION_RE.fullmatch(name) is not None)


def _is_temporary_entry(name: str) -> bool:
    return (name.startswith(TEMP_PREFIX) or name.startswith(f".{POINTER_NAME}.tmp-")
            or name.startswith(f"{HOLDER_NAME}."))


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries that interrupted writes of ``target`` left: versions being written
    inside it (``TARGET/.tmp-*``, pointer temporaries) and the older layout's siblings
    (``.NAME.tmp-*``, ``.NAME.old-*`` beside it, also a single file's atomic temporaries).

    Call it only while holding :func:`writer_lock` of ``target``: then every temporary there
    belongs to a writer that died (this process's own writes in progress are skipped). Returns
    the removed paths.
    """
    target = Path(target)
    candidates = []
    if target.is_dir():
        candidates += [entry for entry in target.iterdir() if _is_temporary_entry(entry.name)]
    parent = target.parent
    if parent.is_dir():
        prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
        candidates += [entry for entry in parent.iterdir() if entry.name.startswith(prefixes)]
    removed = []
    for entry in candidates:
        if not _inside_write_in_progress(entry):
            _remove(entry)
            removed.append(entry)
    if removed:
        logger.info("%s: removed %d temporaries of interrupted writes: %s", target, len(removed),
                    ", ".join(entry.name for entry in removed))
    return removed


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it is synced to disk, given
    the usual permissions and renamed onto ``target`` (a crash never leaves a half-written
    ``target``); on an exception it is removed and ``target`` is left untouched. No lock: see
    :func:`publish_file` for a file that several processes may write."""
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
def publish_file(target: str | os.PathLike, *,
                 lock_timeout: float | None = None) -> Iterator[Path]:
    """:func:`atomic_file` under the writer lock of ``target`` (beside it), removing the
    temporaries of earlier writers that died first. Inside a directory being published by this
    process it is a plain :func:`atomic_file` (the directory's own lock covers it)."""
    target = Path(target)
    if _inside_write_in_progress(target):
        with atomic_file(target) as temporary:
            yield temporary
        return
    with _locked(target, *_lock_files(target, inside=False), lock_timeout):
        remove_stale_temporaries(target)
        with atomic_file(target) as temporary:
            yield temporary


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left untouched.
    The older, flat layout: no lock, and a reader may see the swap (two renames) half done. A
    user-facing directory is written with :func:`publish_directory` instead; this stays for
    directories no other process reads or writes meanwhile.
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
        with _write_in_progress(temporary):
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


def _check_publish_target(target: Path) -> None:
    """Refuse to publish into a directory that holds something else than an index."""
    if (target / POINTER_NAME).exists() or (target / MANIFEST_NAME).is_file():
        return
    foreign = sorted(entry.name for entry in target.iterdir() if not _is_own_entry(entry.name))
    if foreign:
        raise FileExistsError(
            f"{target} exists and is not an index or codebook directory (no {POINTER_NAME} or "
            f"{MANIFEST_NAME}; it holds {', '.join(foreign[:5])}): remove it or choose another "
            "path")


def _version_number(name: str) -> int:
    match = _VERSION_RE.fullmatch(name)
    return int(match.group(1)) if match else 0


def _commit(target: Path, temporary: Path) -> tuple[str, str | None]:
    """Sync ``temporary``, rename it to the next version and point ``CURRENT`` at it; returns
    (new version, previous version or None)."""
    manifest = temporary / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(f"nothing to publish at {target}: no {MANIFEST_NAME} was written in "
                         f"{temporary}")
    _fsync_tree(temporary)
    os.chmod(temporary, _default_mode(directory=True))
    try:
        previous = _read_pointer(target)
    except IndexFormatError as error:               # a damaged pointer is replaced
        logger.warning("%s", error)
        previous = None
    number = 1 + max((_version_number(entry.name) for entry in target.iterdir()), default=0)
    name = f"{VERSION_PREFIX}{number:06d}-{secrets.token_hex(4)}"
    os.replace(temporary, target / name)
    _fsync_directory(target)
    pointer = {"version": name, "manifest_sha256": sha256_of_file(target / name / MANIFEST_NAME)}
    with atomic_file(target / POINTER_NAME) as path:
        path.write_text(json.dumps(pointer), encoding="utf-8")
    return name, previous["version"] if previous else None


def _prune(target: Path, keep: set[str]) -> None:
    """Remove versions other than ``keep`` and, after a first versioned write over the flat
    layout, that layout's files (its manifest last, so an interrupted removal is redone). The new
    version is already published: a failure here is logged, not raised."""
    try:
        flat = (target / MANIFEST_NAME).is_file()
        for entry in target.iterdir():
            if _VERSION_RE.fullmatch(entry.name) and entry.name not in keep:
                _remove(entry)
            elif flat and not _is_own_entry(entry.name) and entry.name != MANIFEST_NAME:
                _remove(entry)
        if flat:
            _remove(target / MANIFEST_NAME)
    except OSError as error:
        logger.warning("%s: could not remove old versions (%s); the next write retries", target,
                       error)


@contextlib.contextmanager
def publish_directory(target: str | os.PathLike, *,
                      lock_timeout: float | None = None) -> Iterator[Path]:
    """Write a new version of the directory ``target``: yield a fresh directory to fill (a
    manifest must be written into it); on success it is synced and becomes ``target``'s
    current version with one atomic replace of ``TARGET/CURRENT``.

    Holds :func:`writer_lock` (``lock_timeout`` as there) throughout, and first removes the
    temporaries of writers that died. After the flip, versions other than the new and the
    previous one are removed (a reader that resolved the previous one a moment ago still finds
    it). On an exception the fresh directory is removed and ``target`` is left as it was. A
    ``target`` inside a directory this process is publishing (a component) is written plainly:
    it is created and yielded as it is.
    """
    target = Path(target)
    if _inside_write_in_progress(target):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    with writer_lock(target, timeout=lock_timeout):
        _check_publish_target(target)
        remove_stale_temporaries(target)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=target))
        try:
            with _write_in_progress(temporary):
                yield temporary
            version, previous = _commit(target, temporary)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _prune(target, {version} | ({previous} if previous else set()))


# ---------------------------------------------------------------- reading a published directory
def _read_pointer(target: Path) -> dict | None:
    """``TARGET/CURRENT`` as a dict, None when there is none (the flat layout)."""
    path = target / POINTER_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        pointer = json.loads(text)
    except ValueError as error:
        raise IndexFormatError(f"{path}: corrupt version pointer ({error})") from error
    if (not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str)
            or _VERSION_RE.fullmatch(pointer["version"]) is None
            or not isinstance(pointer.get("manifest_sha256"), str)):
        raise IndexFormatError(f"{path}: corrupt version pointer (no valid version name and "
                               "manifest checksum)")
    return pointer


def current_version(target: str | os.PathLike) -> Path:
    """The directory to read ``target`` from: its current version (resolve it once and read
    everything from it), or ``target`` itself in the flat layout (older indexes, components).

    The version's manifest must have the checksum ``CURRENT`` recorded when it was published
    (:class:`IndexFormatError` otherwise: an edited or damaged manifest).
    """
    target = Path(target)
    pointer = _read_pointer(target)
    if pointer is None:
        if not target.exists():
            raise FileNotFoundError(f"no index at {target}")
        return target
    version = target / pointer["version"]
    manifest = version / MANIFEST_NAME
    try:
        digest = sha256_of_file(manifest)
    except FileNotFoundError:
        raise IndexFormatError(f"{manifest}: missing: {target / POINTER_NAME} names version "
                               f"{pointer['version']}, which is not there (corrupt)") from None
    if digest != pointer["manifest_sha256"]:
        raise IndexFormatError(f"{manifest}: checksum mismatch with the one recorded in "
                               f"{target / POINTER_NAME} when it was published: the manifest "
                               "was edited or is corrupt")
    return version


def _version_token(target: Path) -> tuple | None:
    """What changes when a writer replaces ``target``: the pointer, or the flat manifest's
    identity (a flat directory swapped by :func:`atomic_directory`)."""
    try:
        return ("pointer", (target / POINTER_NAME).read_bytes())
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        stat = (target / MANIFEST_NAME).stat()
    except OSError:
        return None
    return ("flat", stat.st_ino, stat.st_mtime_ns, stat.st_size)


def load_current(target: str | os.PathLike, load: Callable[[Path], T], *,
                 attempts: int = LOAD_ATTEMPTS) -> T:
    """``load(current_version(target))``; when it fails (files gone or changed) and a writer
    has replaced ``target`` meanwhile, again on the new version (at most ``attempts`` times), so
    a healthy directory is never reported corrupt. A failure while ``target`` did not change is
    raised as it is."""
    target = Path(target)
    for attempt in range(1, attempts + 1):
        token = _version_token(target)
        try:
            return load(current_version(target))
        except (OSError, ValueError) as error:
            if attempt == attempts or _version_token(target) == token:
                raise
            logger.info("%s changed while it was read (%s); reading the new version", target,
                        error)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- manifests and arrays
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
    """Publish a directory of arrays with its manifest (see :func:`publish_directory`)."""
    with publish_directory(target) as temporary:
        return write_arrays(temporary, kind=kind, params=params, counts=counts, arrays=arrays,
                            extra=extra)


def read_manifest(directory: str | os.PathLike, *, kind: str | None = None) -> dict:
    """Read and check a directory's manifest (version and kind), without reading its arrays; a
    versioned directory's current version is read."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no index at {directory}")
    if not directory.is_dir():
        raise IndexFormatError(f"{directory} is not an index directory (it is a file)")
    directory = current_version(directory)
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
    the checksums, not the shapes), and every component's manifest checksum too. ``directory`` is
    one version (see :func:`load_current`); a versioned directory itself is refused, because its
    components must be read from the same version.
    """
    directory = Path(directory)
    if (directory / POINTER_NAME).exists():
        raise ValueError(f"{directory} is a versioned directory: read it through "
                         "load_current(directory, load) or current_version(directory)")
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


def check_counts(directory: str | os.PathLike, manifest: Mapping,
                 actual: Mapping[str, int | None]) -> None:
    """Check every count of ``manifest`` (read from ``directory``) against ``actual``, the
    counts measured on the loaded data: the same names, and each value equal (an int, or None
    where nothing is counted). :class:`IndexFormatError` names the manifest and both numbers."""
    path = Path(directory) / MANIFEST_NAME
    stored = manifest.get("counts")
    require(isinstance(stored, Mapping), path, "counts missing (corrupt manifest)")
    unknown, missing = sorted(set(stored) - set(actual)), sorted(set(actual) - set(stored))
    require(not unknown and not missing, path,
            f"counts mismatch: unexpected {unknown}, missing {missing} (corrupt manifest)")
    for name, value in actual.items():
        number = stored[name]
        valid = number is None or (isinstance(number, int) and not isinstance(number, bool))
        require(valid and number == value, path,
                f"counts.{name} mismatch: the manifest says {number!r}, the data hold {value!r} "
                "(corrupt or edited manifest)")


def save_arrays_file(path: str | os.PathLike, *, kind: str, params: Mapping,
                     arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write arrays plus a manifest (with per-array checksums) as one ``.npz`` file,
    under the file's writer lock (see :func:`publish_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "params": _jsonable(dict(params)),
        "checksums": {name: sha256_of_array(array) for name, array in arrays.items()},
    }
    with publish_file(path) as temporary, open(temporary, "wb") as handle:
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
