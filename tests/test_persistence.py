"""Crash-safe, versioned, checksummed storage (asmk_index.persistence), in one process; the tests
with several processes are in test_concurrent_writers.py."""
import functools
import json
import os
import threading

import numpy as np
import pytest

from asmk_index import persistence
from asmk_index.persistence import IndexFormatError


def _arrays():
    rng = np.random.default_rng(0)
    return {"codes": rng.integers(0, 2**63, size=(50, 2), dtype=np.uint64),
            "ids": np.arange(50, dtype=np.int64)}


def _read(target, kind="toy"):
    """(manifest, arrays) of the current version of a published directory."""
    return persistence.load_current(target, functools.partial(persistence.read_arrays, kind=kind))


def test_directory_round_trip(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={"alpha": 3.0}, counts={"images": 50},
                               arrays=_arrays())
    manifest, arrays = _read(target)
    assert manifest["params"] == {"alpha": 3.0} and manifest["counts"] == {"images": 50}
    for name, array in _arrays().items():
        np.testing.assert_array_equal(arrays[name], array)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    version = persistence.current_version(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["CURRENT", version.name, persistence.LOCK_NAME])           # no temporary, no holder
    assert sorted(p.name for p in version.iterdir()) == ["codes.npy", "ids.npy", "manifest.json"]
    with pytest.raises(ValueError, match="versioned"):              # components need one version
        persistence.read_arrays(target)
    assert persistence.read_manifest(target, kind="toy")["counts"] == {"images": 50}


def test_crash_while_writing_keeps_old_directory(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError):
        with persistence.publish_directory(target) as temporary:
            persistence.write_arrays(temporary, kind="toy", params={}, counts={},
                                     arrays={"ids": np.zeros(3)})
            raise RuntimeError("simulated crash")
    _, arrays = _read(target)
    assert arrays["ids"].shape == (50,)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_versions_readers_keep_the_previous_one_and_older_ones_are_removed(tmp_path):
    target = tmp_path / "index"
    names = []
    for number in range(4):
        persistence.save_directory(target, kind="toy", params={"n": number}, counts={},
                                   arrays={"ids": np.arange(number)})
        names.append(persistence.current_version(target).name)
        if number == 1:
            resolved_earlier = persistence.current_version(target)
    assert len(set(names)) == 4 and names == sorted(names)
    versions = sorted(p.name for p in target.iterdir() if p.name.startswith("v"))
    assert versions == names[2:]                                     # the current and previous
    assert not resolved_earlier.exists()
    manifest, arrays = _read(target)
    assert manifest["params"] == {"n": 3} and arrays["ids"].tolist() == [0, 1, 2]
    _, previous = persistence.read_arrays(target / names[2], kind="toy")
    assert previous["ids"].tolist() == [0, 1]


def test_the_flat_layout_still_loads_and_the_next_write_replaces_it(tmp_path):
    target = tmp_path / "index"
    with persistence.atomic_directory(target) as temporary:          # an index of the older layout
        persistence.write_arrays(temporary, kind="toy", params={}, counts={}, arrays=_arrays())
        (temporary / "extra.txt").write_text("old")
    assert persistence.current_version(target) == target
    assert _read(target)[1]["ids"].shape == (50,)
    persistence.save_directory(target, kind="toy", params={}, counts={},
                               arrays={"ids": np.arange(3)})
    version = persistence.current_version(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["CURRENT", version.name, persistence.LOCK_NAME])
    assert _read(target)[1]["ids"].tolist() == [0, 1, 2]


def test_a_directory_that_is_not_an_index_is_not_overwritten(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    assert (target / "holiday.jpg").read_bytes() == b"jpeg"
    assert not [p for p in target.iterdir() if p.name.startswith((".tmp-", "v", "CURRENT"))]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        persistence.save_directory(tmp_path / "file", kind="toy", params={}, counts={}, arrays={})


def test_components_inside_a_version_are_plain_directories(tmp_path):
    target = tmp_path / "index"
    with persistence.publish_directory(target) as temporary:
        persistence.save_directory(temporary / "part", kind="toy", params={}, counts={},
                                   arrays=_arrays())
        persistence.save_arrays_file(temporary / "codebook.npz", kind="codebook", params={},
                                     arrays={"centroids": np.zeros((2, 2), np.float32)})
        persistence.write_arrays(temporary, kind="outer", params={}, counts={}, arrays={},
                                 components={"part": temporary / "part"})
    version = persistence.current_version(target)
    assert sorted(p.name for p in version.iterdir()) == ["codebook.npz", "manifest.json", "part"]
    assert sorted(p.name for p in (version / "part").iterdir()) == [
        "codes.npy", "ids.npy", "manifest.json"]
    assert persistence.current_version(version / "part") == version / "part"
    legacy = tmp_path / "legacy"                  # the same inside the older atomic_directory
    with persistence.atomic_directory(legacy) as temporary:
        persistence.save_directory(temporary / "part", kind="toy", params={}, counts={},
                                   arrays=_arrays())
        persistence.save_arrays_file(temporary / "codebook.npz", kind="codebook", params={},
                                     arrays={"centroids": np.zeros((2, 2), np.float32)})
    assert sorted(p.name for p in legacy.iterdir()) == ["codebook.npz", "part"]
    assert sorted(p.name for p in (legacy / "part").iterdir()) == [
        "codes.npy", "ids.npy", "manifest.json"]


def test_the_next_write_removes_temporaries_of_dead_writers(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    stale = [target / ".tmp-4242-abc", tmp_path / ".index.tmp-xyz", tmp_path / ".index.old-xyz"]
    for path in stale:
        path.mkdir()
        (path / "half.npy").write_bytes(b"x" * 100)
    (target / ".CURRENT.tmp-q1").write_text("{")
    persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    assert not any(path.exists() for path in stale)
    assert not (target / ".CURRENT.tmp-q1").exists()
    codebook = tmp_path / "codebook.npz"                       # a single file's temporaries too
    (tmp_path / ".codebook.npz.tmp-dead").write_bytes(b"half")
    persistence.save_arrays_file(codebook, kind="codebook", params={},
                                 arrays={"centroids": np.zeros((2, 2), np.float32)})
    assert not (tmp_path / ".codebook.npz.tmp-dead").exists()


def test_the_writer_lock_is_reentrant_and_excludes_other_threads(tmp_path):
    target = tmp_path / "index"
    outcome = {}

    def read_modify_write():
        with persistence.writer_lock(target, timeout=0):
            with persistence.writer_lock(target, timeout=0):
                pass
            persistence.save_directory(target, kind="toy", params={}, counts={},
                                       arrays=_arrays())       # a save inside the held lock
            other = threading.Thread(target=try_from_another_thread)
            other.start()
            other.join()
        outcome["done"] = True

    def try_from_another_thread():
        try:
            with persistence.writer_lock(target, timeout=0):
                outcome["other"] = "acquired"
        except persistence.WriterLockedError as error:
            outcome["other"] = str(error)

    worker = threading.Thread(target=read_modify_write, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert outcome.get("done"), "the save inside the held lock deadlocked"
    assert f"pid {os.getpid()}" in outcome["other"]
    assert not (target / persistence.HOLDER_NAME).exists()          # released with its record
    with persistence.writer_lock(target, timeout=0):
        assert json.loads((target / persistence.HOLDER_NAME).read_text())["pid"] == os.getpid()


def test_load_current_retries_only_when_a_writer_replaced_the_directory(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={"n": 0}, counts={}, arrays={})
    seen = []

    def load_while_a_writer_publishes(version):
        seen.append(version.name)
        if len(seen) == 1:                      # the version is replaced twice and removed
            for number in (1, 2):
                persistence.save_directory(target, kind="toy", params={"n": number}, counts={},
                                           arrays={})
        return persistence.read_arrays(version, kind="toy")[0]["params"]["n"]

    assert persistence.load_current(target, load_while_a_writer_publishes) == 2
    assert len(seen) == 2 and seen[0] != seen[1]
    calls = []

    def broken(version):
        calls.append(version)
        raise IndexFormatError(f"{version}: damaged")

    with pytest.raises(IndexFormatError, match="damaged"):     # nothing changed: no retry
        persistence.load_current(target, broken)
    assert len(calls) == 1


@pytest.mark.parametrize("layout", ["published", "component"])
@pytest.mark.parametrize("damage, words", [
    ("flip", ("checksum",)), ("truncate", ("checksum", "corrupt")), ("delete", ("missing",)),
    ("manifest", ("corrupt",)), ("version", ("version", "mismatch")), ("kind", ("kind", "mismatch")),
])
def test_damage_is_refused_with_a_clear_error(tmp_path, damage, words, layout):
    target = tmp_path / "index"
    if layout == "published":
        persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
        directory = persistence.current_version(target)
    else:                                       # a plain component directory
        target.mkdir()
        persistence.write_arrays(target, kind="toy", params={}, counts={}, arrays=_arrays())
        directory = target
    codes = directory / "codes.npy"
    manifest_path = directory / "manifest.json"
    if damage == "flip":
        data = bytearray(codes.read_bytes())
        data[-1] ^= 0xFF
        codes.write_bytes(bytes(data))
    elif damage == "truncate":
        codes.write_bytes(codes.read_bytes()[:100])
    elif damage == "delete":
        codes.unlink()
    elif damage == "manifest":
        manifest_path.write_text("{not json")
    else:
        manifest = json.loads(manifest_path.read_text())
        manifest["format_version" if damage == "version" else "kind"] = 999 if damage == "version" else "other"
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError) as error:
        _read(target)
    message = str(error.value)
    assert any(word in message for word in words), message
    assert str(target) in message


def test_an_edited_published_manifest_is_refused(tmp_path):
    """The top manifest is the one file no other checksum covers: CURRENT records its checksum."""
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={"alpha": 3.0}, counts={"images": 50},
                               arrays=_arrays())
    manifest_path = persistence.current_version(target) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["params"]["alpha"] = 1.0
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(IndexFormatError, match="edited or is corrupt") as error:
        _read(target)
    assert str(manifest_path) in str(error.value)


def test_check_counts_names_the_manifest_and_both_numbers(tmp_path):
    manifest = {"counts": {"images": 23, "vectors": 400}}
    persistence.check_counts(tmp_path, manifest, {"images": 23, "vectors": 400})
    with pytest.raises(IndexFormatError) as error:
        persistence.check_counts(tmp_path, manifest, {"images": 24, "vectors": 400})
    assert str(tmp_path / "manifest.json") in str(error.value)
    message = str(error.value)
    assert "counts.images" in message and "23" in message and "24" in message
    for stored, actual in (({"images": True, "vectors": 400}, {"images": 1, "vectors": 400}),
                           ({"images": "23", "vectors": 400}, {"images": 23, "vectors": 400}),
                           ({"images": 23}, {"images": 23, "vectors": 400}),
                           ({"images": 23, "words": 2}, {"images": 23})):
        with pytest.raises(IndexFormatError, match="mismatch"):
            persistence.check_counts(tmp_path, {"counts": stored}, actual)


def _small_indexes():
    """A two-stage index (with its global and ASMK* components) over 12 random images."""
    from asmk_index.codebook import Codebook
    from asmk_index.two_stage import TwoStageIndex
    rng = np.random.default_rng(5)
    index = TwoStageIndex.create(Codebook.from_centroids(
        rng.standard_normal((8, 16)).astype(np.float32)), 24)
    ids = np.arange(12, dtype=np.int64) + 100
    index.add(rng.standard_normal((12, 24)).astype(np.float32), ids,
              rng.standard_normal((120, 16)).astype(np.float32), np.repeat(ids, 10))
    return index


def _edit_top_manifest(target, edit):
    """Edit the manifest a reader resolves and record its new checksum in CURRENT (when the
    directory is versioned), so that only the loader's own checks can refuse it."""
    pointer_path = target / "CURRENT"
    pointer = json.loads(pointer_path.read_text()) if pointer_path.exists() else None
    manifest_path = (target / pointer["version"] if pointer else target) / "manifest.json"
    original = json.loads(manifest_path.read_text())
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    if pointer:
        pointer["manifest_sha256"] = persistence.sha256_of_file(manifest_path)
        pointer_path.write_text(json.dumps(pointer))
    return manifest_path, original


@pytest.mark.parametrize("component, count, value", [
    ("two_stage", "images", 13), ("two_stage", "images", 1000000), ("two_stage", "asmk_images", 11),
    ("asmk", "images", 11), ("asmk", "vectors", 119), ("asmk", "segments", 2),
    ("global", "images", 13), ("global", "trained_nlist", 4),
])
def test_an_edited_count_is_refused(tmp_path, component, count, value):
    """Every count in a manifest is checked against the data (12 images, 120 descriptors)."""
    from asmk_index.asmk import AsmkIndex
    from asmk_index.global_index import GlobalIndex
    from asmk_index.two_stage import TwoStageIndex
    two_stage = _small_indexes()
    index, cls = {"two_stage": (two_stage, TwoStageIndex),
                  "asmk": (two_stage.asmk_index, AsmkIndex),
                  "global": (two_stage.global_index, GlobalIndex)}[component]
    target = tmp_path / component
    index.save(target)
    assert len(cls.load(target)) == 12
    manifest_path, original = _edit_top_manifest(target, lambda manifest: manifest["counts"].update(
        {count: value}))
    with pytest.raises(IndexFormatError) as error:
        cls.load(target)
    message = str(error.value)
    assert str(manifest_path) in message and f"counts.{count}" in message, message
    assert str(value) in message and str(original["counts"][count]) in message, message



def test_single_file_round_trip_and_corruption(tmp_path):
    path = tmp_path / "codebook.npz"
    centroids = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    persistence.save_arrays_file(path, kind="codebook", params={"size": 16},
                                 arrays={"centroids": centroids})
    manifest, arrays = persistence.load_arrays_file(path, kind="codebook")
    np.testing.assert_array_equal(arrays["centroids"], centroids)
    assert manifest["params"]["size"] == 16
    with pytest.raises(IndexFormatError, match="kind mismatch"):
        persistence.load_arrays_file(path, kind="index")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IndexFormatError, match="corrupt"):
        persistence.load_arrays_file(path, kind="codebook")


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="object"):
        persistence.save_directory(tmp_path / "x", kind="toy", params={}, counts={},
                                   arrays={"names": np.array(["a", None], dtype=object)})
    assert [p.name for p in (tmp_path / "x").iterdir()] == [persistence.LOCK_NAME]
    with pytest.raises(IndexFormatError, match="manifest missing"):   # nothing was published
        _read(tmp_path / "x")


def test_written_files_and_directories_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the result must not stay private."""
    import os
    umask = os.umask(0o022)
    try:
        persistence.save_directory(tmp_path / "index", kind="toy", params={}, counts={},
                                   arrays=_arrays())
        persistence.save_arrays_file(tmp_path / "codebook.npz", kind="codebook", params={},
                                     arrays={"centroids": np.zeros((2, 2), np.float32)})
        with persistence.atomic_file(tmp_path / "model.bin") as temporary:
            temporary.write_bytes(b"weights")
    finally:
        os.umask(umask)
    assert (tmp_path / "index").stat().st_mode & 0o777 == 0o755
    version = persistence.current_version(tmp_path / "index")
    assert version.stat().st_mode & 0o777 == 0o755
    assert (version / "codes.npy").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "index" / "CURRENT").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "codebook.npz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.bin").read_bytes() == b"weights"
    assert (tmp_path / "model.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_file_leaves_the_old_file_on_a_crash(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with persistence.atomic_file(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("simulated crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
